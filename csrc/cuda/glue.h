// Helpers of the CUDA glue (ATen side): device checks, CUDA error checks, the dtype code of a history
// and the error flags through which kernels report the first bad row. Compiled only when torch has CUDA.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <initializer_list>
#include <utility>

#include "kernels.cuh"

namespace metaclm {

// Raises a RuntimeError naming the CUDA call that failed.
inline void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

// ValueError unless every named tensor is on the device of `anchor` (the queries).
inline void check_same_device(const at::Tensor& anchor, std::initializer_list<std::pair<const char*, at::Tensor>> others) {
  for (const auto& named : others) {
    TORCH_CHECK_VALUE(named.second.device() == anchor.device(), named.first, " is on ", named.second.device(),
                      " but queries are on ", anchor.device());
  }
}

inline cuda::Dtype dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::Dtype::kFloat32;
    case at::kHalf: return cuda::Dtype::kFloat16;
    case at::kBFloat16: return cuda::Dtype::kBFloat16;
    default: TORCH_CHECK_VALUE(false, "unsupported history dtype ", t.scalar_type());
  }
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// `count` device flags holding "no bad row" (all bits set), for the kernels' atomicMin reports.
inline at::Tensor new_row_flags(const at::Tensor& like, int64_t count) {
  return at::full({count}, -1, like.options().dtype(at::kLong));
}

// A flag's bad row, or -1 if none (reading it waits for the kernels that set it).
inline int64_t flagged_row(const at::Tensor& host_flags, int64_t i) { return host_flags.data_ptr<int64_t>()[i]; }

// ValueError naming the first row of a [rows, width] CUDA block holding NaN or Inf, as check_finite_rows
// does on the CPU.
void check_finite_rows_cuda(const at::Tensor& rows, int64_t row_offset, const char* name);

}  // namespace metaclm
