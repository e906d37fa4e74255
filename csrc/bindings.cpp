// pybind11 bindings for the CPU kernels (module fastser._C). Pointers arrive as integers from
// tensor.data_ptr(), so this extension never links against libtorch.
#include <pybind11/pybind11.h>

#include "center_loss_cpu.h"
#include "mel_chain_cpu.h"

namespace py = pybind11;
using fastser::center_loss_backward_cpu;
using fastser::center_loss_forward_cpu;

template <typename T> static T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastser CPU kernels (raw pointers; see fastser/ops/_native.py)";
  m.def(
      "center_loss_forward",
      [](int dtype, uintptr_t x, uintptr_t labels, uintptr_t centers, int64_t B, int64_t D,
         int64_t C, uintptr_t row_loss, uintptr_t diff, int num_threads) {
        py::gil_scoped_release release;
        return center_loss_forward_cpu(dtype, ptr<void>(x), ptr<int64_t>(labels), ptr<void>(centers),
                                       B, D, C, ptr<void>(row_loss), ptr<void>(diff), num_threads);
      },
      "Returns -1, or the index of the first label outside [0, C).");
  m.def("center_loss_backward",
        [](int dtype, uintptr_t diff, uintptr_t labels, int64_t B, int64_t D, int64_t C,
           uintptr_t row_scale, int64_t row_scale_stride, uintptr_t grad_x, uintptr_t centers,
           double alpha, uintptr_t grad_centers, int num_threads) {
          py::gil_scoped_release release;
          center_loss_backward_cpu(dtype, ptr<void>(diff), ptr<int64_t>(labels), B, D, C,
                                   ptr<void>(row_scale), row_scale_stride, ptr<void>(grad_x),
                                   ptr<void>(centers), alpha, ptr<void>(grad_centers), num_threads);
        });
  m.def("mel_chain",
        [](uintptr_t spec, int64_t B, int64_t T, int64_t F, uintptr_t frames, uintptr_t fb, int64_t M,
           double power, bool to_db, double amin, double log_ref, bool ref_max, bool use_top_db,
           double top_db, uintptr_t dct, uintptr_t lift, int64_t K, uintptr_t mel_out, uintptr_t mfcc_out,
           int num_threads) {
          py::gil_scoped_release release;
          fastser::mel_chain_cpu(ptr<float>(spec), B, T, F, ptr<int64_t>(frames), ptr<float>(fb), M, power,
                                 to_db, amin, log_ref, ref_max, use_top_db, top_db, ptr<float>(dct),
                                 ptr<float>(lift), K, ptr<float>(mel_out), ptr<float>(mfcc_out), num_threads);
        },
        "Fused |X|^p -> mel -> dB -> top_db -> DCT on a frame-major complex64 STFT (0 = null pointer).");
  m.def("has_openmp", &fastser::has_openmp);
  m.def("max_threads", &fastser::max_threads);
}
