#pragma once
#include <cstdint>

namespace fastser {

// dtype codes shared with fastser/ops/_native.py
enum DTypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// num_threads: the OpenMP team for large batches (the caller passes torch.get_num_threads()).
// Returns -1, or the index of the first label outside [0, C) (nothing is written then).
int64_t center_loss_forward_cpu(int dtype, const void* x, const int64_t* labels,
                                const void* centers, int64_t B, int64_t D, int64_t C,
                                void* row_loss, void* diff, int num_threads);

// grad_x may be null. At most one of centers (Wen update, in place) and grad_centers (zeroed
// by the caller) is non-null. row_scale[i * stride] is the upstream gradient of row i's loss.
void center_loss_backward_cpu(int dtype, const void* diff, const int64_t* labels, int64_t B,
                              int64_t D, int64_t C, const void* row_scale, int64_t row_scale_stride,
                              void* grad_x, void* centers, double alpha, void* grad_centers,
                              int num_threads);

bool has_openmp();
int max_threads();

}  // namespace fastser
