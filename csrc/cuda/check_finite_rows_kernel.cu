// NaN/Inf detection over a block of rows (used by dual_form_apply; the other ops fuse the check into
// the pass that reads the rows anyway).
#include "device_util.cuh"

namespace metaclm {
namespace cuda {
namespace {

template <typename T>
__global__ void first_nonfinite_row_kernel(const T* data, int64_t rows, int64_t width, int64_t row_offset,
                                           unsigned long long* bad_row) {
  const int64_t total = rows * width;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    note_if_nonfinite(to_float(data[e]), row_offset + e / width, bad_row);
  }
}

}  // namespace

cudaError_t first_nonfinite_row(const void* data, Dtype dtype, int64_t rows, int64_t width, int64_t row_offset,
                                unsigned long long* bad_row, cudaStream_t stream) {
  if (rows <= 0 || width <= 0) return cudaSuccess;
  int sms = 0;
  cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>(ceil_div(rows * width, kThreads), int64_t{sms} * 8);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    first_nonfinite_row_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        static_cast<const T*>(data), rows, width, row_offset, bad_row);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace metaclm
