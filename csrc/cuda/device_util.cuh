// Device helpers shared by the CUDA kernels: reading fp32/fp16/bf16 history elements as fp32,
// dispatching on the element type, and error-checked launches. Torch-free (see kernels.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels.cuh"

namespace metaclm {
namespace cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Records global row `row` as holding NaN/Inf if x is not finite (the lowest such row wins).
__device__ __forceinline__ void note_if_nonfinite(float x, int64_t row, unsigned long long* bad_row) {
  if (!isfinite(x)) atomicMin(bad_row, static_cast<unsigned long long>(row));
}

// Calls fn(T{}) with the C++ element type of `dtype`; cudaErrorInvalidValue for an unknown code.
template <typename Fn>
cudaError_t dispatch_dtype(Dtype dtype, Fn&& fn) {
  switch (dtype) {
    case Dtype::kFloat32: return fn(float{});
    case Dtype::kFloat16: return fn(__half{});
    case Dtype::kBFloat16: return fn(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Number of streaming multiprocessors of the current device (0 on error, which the caller reports).
inline cudaError_t sm_count(int* count) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace metaclm
