// pybind11 bindings for the CUDA kernels (module fastser._C_cuda); raw pointers and the stream
// handle come from Python, so this links only the CUDA runtime, not libtorch.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "center_loss_cuda.h"

namespace py = pybind11;

template <typename T> static T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

static void check(const char* err) {
  if (err != nullptr && err[0] != '\0') throw std::runtime_error(std::string("fastser CUDA kernel: ") + err);
}

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "fastser CUDA kernels (raw pointers; see fastser/ops/_native.py)";
  m.def("center_loss_forward", [](int dtype, uintptr_t x, uintptr_t labels, uintptr_t centers,
                                  int64_t B, int64_t D, int64_t C, uintptr_t row_loss,
                                  uintptr_t diff, uintptr_t stream) {
    check(fastser::center_loss_forward_cuda(dtype, ptr<void>(x), ptr<int64_t>(labels), ptr<float>(centers),
                                            B, D, C, ptr<float>(row_loss), ptr<float>(diff), stream));
  });
  m.def("center_loss_backward",
        [](int dtype, uintptr_t diff, uintptr_t labels, uintptr_t counts, int64_t B, int64_t D,
           int64_t C, uintptr_t row_scale, int64_t row_scale_stride, uintptr_t grad_x,
           uintptr_t centers, double alpha, uintptr_t grad_centers, uintptr_t stream) {
          check(fastser::center_loss_backward_cuda(
              dtype, ptr<float>(diff), ptr<int64_t>(labels), ptr<int64_t>(counts), B, D, C,
              ptr<float>(row_scale), row_scale_stride, ptr<void>(grad_x), ptr<float>(centers),
              static_cast<float>(alpha), ptr<float>(grad_centers), stream));
        });
  m.def("center_loss_segment_update",
        [](uintptr_t diff, uintptr_t order, uintptr_t offsets, int64_t D, int64_t C,
           uintptr_t row_scale, int64_t row_scale_stride, uintptr_t centers, double alpha,
           uintptr_t grad_centers, uintptr_t stream) {
          check(fastser::center_loss_segment_update_cuda(
              ptr<float>(diff), ptr<int64_t>(order), ptr<int64_t>(offsets), D, C,
              ptr<float>(row_scale), row_scale_stride, ptr<float>(centers),
              static_cast<float>(alpha), ptr<float>(grad_centers), stream));
        });
  m.def("device_count", &fastser::cuda_device_count);
}
