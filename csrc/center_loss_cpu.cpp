// Fused center loss, CPU kernels (raw pointers, no libtorch).
//
// forward : one pass over the batch -> per-row squared distance and diff = x - c_y (fp32/fp64),
//           which is all the backward needs (the centers are never read again, so an in-place
//           update cannot race with a later read).
// backward: one pass -> grad_x = g_i * diff_i, plus either the Wen update of the centers or
//           the center gradient. Class sums are taken per class segment (counting sort by
//           label), so no atomics, no per-thread C x D scratch, and the result is bit-identical
//           for any thread count.
// Threads: the caller passes torch's intra-op thread count (one OpenMP team size for the whole
// process), and work is handed out in dynamic chunks: on a loaded machine a descheduled thread
// then delays the step by one chunk, not by its static share of the batch.
#include "center_loss_cpu.h"

#include <cmath>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastser {
namespace {

constexpr int64_t kParallelMinWork = 1 << 18;  // below this, waking the OpenMP team costs more than it saves
constexpr int64_t kChunkD = 256;                // columns handled by one work item of the class-sum loop
constexpr int64_t kRowChunk = 16;               // rows handed to a thread at a time

inline int team(int64_t work, int num_threads) { return work >= kParallelMinWork && num_threads > 1 ? num_threads : 1; }

template <typename T>
int64_t forward_impl(const T* x, const int64_t* labels, const T* centers, int64_t B, int64_t D,
                     int64_t C, T* row_loss, T* diff, int num_threads) {
  for (int64_t i = 0; i < B; ++i) {
    if (labels[i] < 0 || labels[i] >= C) return i;  // checked before anything is written
  }
#pragma omp parallel for schedule(dynamic, kRowChunk) num_threads(team(B * D, num_threads))
  for (int64_t i = 0; i < B; ++i) {
    const T* xi = x + i * D;
    const T* ci = centers + labels[i] * D;
    T* di = diff + i * D;
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < D; ++d) {
      const T v = xi[d] - ci[d];
      di[d] = v;
      acc += v * v;
    }
    row_loss[i] = acc;
  }
  return -1;
}

template <typename T>
void backward_impl(const T* diff, const int64_t* labels, int64_t B, int64_t D, int64_t C,
                   const T* row_scale, int64_t row_scale_stride, T* grad_x, T* centers, T alpha,
                   T* grad_centers, int num_threads) {
  const int threads = team(B * D, num_threads);
  // grad_x = g_i * diff_i
  if (grad_x != nullptr) {
#pragma omp parallel for schedule(dynamic, kRowChunk) num_threads(threads)
    for (int64_t i = 0; i < B; ++i) {
      const T g = row_scale[i * row_scale_stride];
      const T* di = diff + i * D;
      T* gi = grad_x + i * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) gi[d] = g * di[d];
    }
  }
  if (centers == nullptr && grad_centers == nullptr) return;

  // Counting sort of the rows by label: offsets[j]..offsets[j+1] are the rows of class j.
  std::vector<int64_t> offsets(C + 1, 0), order(B), present;
  for (int64_t i = 0; i < B; ++i) ++offsets[labels[i] + 1];
  for (int64_t j = 0; j < C; ++j) {
    if (offsets[j + 1] > 0) present.push_back(j);
    offsets[j + 1] += offsets[j];
  }
  {
    std::vector<int64_t> cursor(offsets.begin(), offsets.end() - 1);
    for (int64_t i = 0; i < B; ++i) order[cursor[labels[i]]++] = i;
  }

  const int64_t n_chunks = (D + kChunkD - 1) / kChunkD;
  const int64_t n_items = static_cast<int64_t>(present.size()) * n_chunks;
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> sum(kChunkD);
#pragma omp for schedule(dynamic, 4)
    for (int64_t item = 0; item < n_items; ++item) {
      const int64_t j = present[item / n_chunks];
      const int64_t d0 = (item % n_chunks) * kChunkD;
      const int64_t len = std::min(kChunkD, D - d0);
      std::fill(sum.begin(), sum.begin() + len, T(0));
      for (int64_t k = offsets[j]; k < offsets[j + 1]; ++k) {
        const int64_t i = order[k];
        const T w = centers != nullptr ? T(1) : row_scale[i * row_scale_stride];
        const T* di = diff + i * D + d0;
#pragma omp simd
        for (int64_t d = 0; d < len; ++d) sum[d] += w * di[d];
      }
      if (centers != nullptr) {
        // Wen et al. (2016): c_j += alpha * sum_i (x_i - c_j) / (1 + n_j)
        const T coef = alpha / (T(1) + T(offsets[j + 1] - offsets[j]));
        T* cj = centers + j * D + d0;
#pragma omp simd
        for (int64_t d = 0; d < len; ++d) cj[d] += coef * sum[d];
      } else {
        // dL/dc_j = -sum_i g_i (x_i - c_j); rows of absent classes stay as the caller zeroed them
        T* gj = grad_centers + j * D + d0;
#pragma omp simd
        for (int64_t d = 0; d < len; ++d) gj[d] = -sum[d];
      }
    }
  }
}

}  // namespace

int64_t center_loss_forward_cpu(int dtype, const void* x, const int64_t* labels,
                                const void* centers, int64_t B, int64_t D, int64_t C,
                                void* row_loss, void* diff, int num_threads) {
  if (dtype == kFloat64)
    return forward_impl(static_cast<const double*>(x), labels, static_cast<const double*>(centers),
                        B, D, C, static_cast<double*>(row_loss), static_cast<double*>(diff), num_threads);
  return forward_impl(static_cast<const float*>(x), labels, static_cast<const float*>(centers), B,
                      D, C, static_cast<float*>(row_loss), static_cast<float*>(diff), num_threads);
}

void center_loss_backward_cpu(int dtype, const void* diff, const int64_t* labels, int64_t B,
                              int64_t D, int64_t C, const void* row_scale, int64_t row_scale_stride,
                              void* grad_x, void* centers, double alpha, void* grad_centers,
                              int num_threads) {
  if (dtype == kFloat64) {
    backward_impl(static_cast<const double*>(diff), labels, B, D, C,
                  static_cast<const double*>(row_scale), row_scale_stride,
                  static_cast<double*>(grad_x), static_cast<double*>(centers), alpha,
                  static_cast<double*>(grad_centers), num_threads);
  } else {
    backward_impl(static_cast<const float*>(diff), labels, B, D, C,
                  static_cast<const float*>(row_scale), row_scale_stride,
                  static_cast<float*>(grad_x), static_cast<float*>(centers),
                  static_cast<float>(alpha), static_cast<float*>(grad_centers), num_threads);
  }
}

bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace fastser
