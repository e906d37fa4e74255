#pragma once
#include <cstdint>

namespace fastser {

// All pointers are device pointers; stream is a cudaStream_t passed as an integer.
// Each returns an empty string on success, else the CUDA error text.
const char* center_loss_forward_cuda(int dtype, const void* x, const int64_t* labels,
                                     const float* centers, int64_t B, int64_t D, int64_t C,
                                     float* row_loss, float* diff, uintptr_t stream);

// counts: rows per class (int64, C), used by the Wen update. grad_x may be null.
// At most one of centers / grad_centers is non-null (grad_centers zeroed by the caller).
const char* center_loss_backward_cuda(int dtype, const float* diff, const int64_t* labels,
                                      const int64_t* counts, int64_t B, int64_t D, int64_t C,
                                      const float* row_scale, int64_t row_scale_stride,
                                      void* grad_x, float* centers, float alpha,
                                      float* grad_centers, uintptr_t stream);

// Deterministic class sums: order = rows sorted by label (stable), offsets = exclusive prefix
// sum of counts (C + 1). One thread per (class, column) sums its segment in order; no atomics.
const char* center_loss_segment_update_cuda(const float* diff, const int64_t* order,
                                            const int64_t* offsets, int64_t D, int64_t C,
                                            const float* row_scale, int64_t row_scale_stride,
                                            float* centers, float alpha, float* grad_centers,
                                            uintptr_t stream);

int cuda_device_count();

}  // namespace fastser
