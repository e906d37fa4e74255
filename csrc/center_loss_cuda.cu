// Fused center loss, CUDA kernels (raw pointers, launched on the caller's stream; no libtorch).
// Same contract as the CPU kernels: the forward writes diff = x - c_y in fp32 and the per-row
// squared distance; the backward turns diff into grad_x and, in the same pass, scatters the
// Wen update (or the center gradient) with fp32 atomics.
#include "center_loss_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace fastser {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // one warp per row, 256 threads per block

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

template <typename T>
__global__ void forward_kernel(const T* __restrict__ x, const int64_t* __restrict__ labels,
                               const float* __restrict__ centers, int64_t B, int64_t D, int64_t C,
                               float* __restrict__ row_loss, float* __restrict__ diff) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= B) return;
  const int64_t label = labels[row];
  const bool valid = label >= 0 && label < C;  // the host checks labels; never read out of bounds
  const T* xr = x + row * D;
  const float* cr = centers + (valid ? label : 0) * D;
  float* dr = diff + row * D;
  float acc = 0.f;
  for (int64_t d = lane; d < D; d += kWarp) {
    const float v = to_float(xr[d]) - cr[d];
    dr[d] = v;
    acc += v * v;
  }
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if (lane == 0) row_loss[row] = valid ? acc : __int_as_float(0x7fc00000);  // NaN flags a bad row
}

template <typename T>
__global__ void backward_kernel(const float* __restrict__ diff, const int64_t* __restrict__ labels,
                                const int64_t* __restrict__ counts, int64_t B, int64_t D, int64_t C,
                                const float* __restrict__ row_scale, int64_t row_scale_stride,
                                T* __restrict__ grad_x, float* centers, float alpha,
                                float* grad_centers) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= B) return;
  const int64_t label = labels[row];
  const bool valid = label >= 0 && label < C;
  const float g = row_scale[row * row_scale_stride];
  const float* dr = diff + row * D;
  const float coef = (centers != nullptr && valid) ? alpha / (1.f + static_cast<float>(counts[label])) : 0.f;
  for (int64_t d = lane; d < D; d += kWarp) {
    const float v = dr[d];
    if (grad_x != nullptr) grad_x[row * D + d] = from_float<T>(g * v);
    if (!valid) continue;
    if (centers != nullptr) atomicAdd(centers + label * D + d, coef * v);
    else if (grad_centers != nullptr) atomicAdd(grad_centers + label * D + d, -g * v);
  }
}

__global__ void segment_update_kernel(const float* __restrict__ diff, const int64_t* __restrict__ order,
                                      const int64_t* __restrict__ offsets, int64_t D, int64_t C,
                                      const float* __restrict__ row_scale, int64_t row_scale_stride,
                                      float* centers, float alpha, float* grad_centers) {
  const int64_t j = blockIdx.y;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= C || d >= D) return;
  const int64_t begin = offsets[j], end = offsets[j + 1];
  if (begin == end) return;
  float sum = 0.f;
  for (int64_t k = begin; k < end; ++k) {
    const int64_t i = order[k];
    const float w = centers != nullptr ? 1.f : row_scale[i * row_scale_stride];
    sum += w * diff[i * D + d];
  }
  if (centers != nullptr) centers[j * D + d] += alpha * sum / (1.f + static_cast<float>(end - begin));
  else grad_centers[j * D + d] = -sum;
}

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? "" : cudaGetErrorString(err);
}

unsigned row_blocks(int64_t B) { return static_cast<unsigned>((B + kRowsPerBlock - 1) / kRowsPerBlock); }

}  // namespace

const char* center_loss_forward_cuda(int dtype, const void* x, const int64_t* labels,
                                     const float* centers, int64_t B, int64_t D, int64_t C,
                                     float* row_loss, float* diff, uintptr_t stream) {
  if (B == 0) return "";
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid(row_blocks(B)), block(kRowsPerBlock * kWarp);
  switch (dtype) {
    case 0: forward_kernel<float><<<grid, block, 0, s>>>(static_cast<const float*>(x), labels, centers, B, D, C, row_loss, diff); break;
    case 1: forward_kernel<__half><<<grid, block, 0, s>>>(static_cast<const __half*>(x), labels, centers, B, D, C, row_loss, diff); break;
    case 2: forward_kernel<__nv_bfloat16><<<grid, block, 0, s>>>(static_cast<const __nv_bfloat16*>(x), labels, centers, B, D, C, row_loss, diff); break;
    default: return "unsupported dtype code for the CUDA center loss";
  }
  return last_error();
}

const char* center_loss_backward_cuda(int dtype, const float* diff, const int64_t* labels,
                                      const int64_t* counts, int64_t B, int64_t D, int64_t C,
                                      const float* row_scale, int64_t row_scale_stride,
                                      void* grad_x, float* centers, float alpha,
                                      float* grad_centers, uintptr_t stream) {
  if (B == 0) return "";
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid(row_blocks(B)), block(kRowsPerBlock * kWarp);
  switch (dtype) {
    case 0: backward_kernel<float><<<grid, block, 0, s>>>(diff, labels, counts, B, D, C, row_scale, row_scale_stride, static_cast<float*>(grad_x), centers, alpha, grad_centers); break;
    case 1: backward_kernel<__half><<<grid, block, 0, s>>>(diff, labels, counts, B, D, C, row_scale, row_scale_stride, static_cast<__half*>(grad_x), centers, alpha, grad_centers); break;
    case 2: backward_kernel<__nv_bfloat16><<<grid, block, 0, s>>>(diff, labels, counts, B, D, C, row_scale, row_scale_stride, static_cast<__nv_bfloat16*>(grad_x), centers, alpha, grad_centers); break;
    default: return "unsupported dtype code for the CUDA center loss";
  }
  return last_error();
}

const char* center_loss_segment_update_cuda(const float* diff, const int64_t* order,
                                            const int64_t* offsets, int64_t D, int64_t C,
                                            const float* row_scale, int64_t row_scale_stride,
                                            float* centers, float alpha, float* grad_centers,
                                            uintptr_t stream) {
  if (C == 0 || D == 0) return "";
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const int threads = 128;
  const dim3 grid(static_cast<unsigned>((D + threads - 1) / threads), static_cast<unsigned>(C));
  segment_update_kernel<<<grid, threads, 0, s>>>(diff, order, offsets, D, C, row_scale,
                                                  row_scale_stride, centers, alpha, grad_centers);
  return last_error();
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

}  // namespace fastser
