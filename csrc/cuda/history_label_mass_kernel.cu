// CUDA kernels of history_label_mass, mirroring csrc/cpu/history_label_mass.cpp: one pass adds every
// history row into the fp64 sum of its label, and when the stream passes a query's limit the sums are
// read out against that query (mass = <label sum, query>, by linearity of the score). The accumulating
// pass also checks the rows for NaN/Inf and the labels for range, so the chunk is read once.
#include "device_util.cuh"

namespace metaclm {
namespace cuda {
namespace {

constexpr int kColumns = 128;  // threads per block, one history column each

// Block (x, y): columns [x * kColumns, ...), rows [begin + y * rows_per_block, ...). Each thread runs
// down its column and flushes its fp64 partial sum with one atomic add whenever the label changes.
template <typename T>
__global__ void label_sums_kernel(const T* history, const int64_t* labels, int64_t begin, int64_t end,
                                  int64_t width, int64_t num_labels, int64_t row_offset, int64_t rows_per_block,
                                  double* sums, unsigned long long* bad_value_row,
                                  unsigned long long* bad_label_row) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColumns + threadIdx.x;
  const int64_t r0 = begin + static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < end ? r0 + rows_per_block : end;
  const bool reports_labels = col == 0;
  if (col >= width) return;
  int64_t current = -1;
  double acc = 0.0;
  for (int64_t r = r0; r < r1; ++r) {
    const float x = to_float(history[r * width + col]);
    note_if_nonfinite(x, row_offset + r, bad_value_row);
    const int64_t label = labels[r];
    if (label < 0 || label >= num_labels) {
      if (reports_labels) atomicMin(bad_label_row, static_cast<unsigned long long>(row_offset + r));
      continue;
    }
    if (label != current) {
      if (current >= 0) atomicAdd(sums + current * width + col, acc);
      current = label;
      acc = 0.0;
    }
    acc += static_cast<double>(x);
  }
  if (current >= 0) atomicAdd(sums + current * width + col, acc);
}

// One thread per (query id, head, label).
__global__ void label_mass_readout_kernel(const double* sums, const float* queries, const int64_t* query_ids,
                                          int64_t count, int64_t heads, int64_t head_dim, int64_t num_labels,
                                          double* mass) {
  const int64_t total = count * heads * num_labels;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    const int64_t l = t % num_labels;
    const int64_t h = (t / num_labels) % heads;
    const int64_t q = query_ids[t / (num_labels * heads)];
    const double* s = sums + l * heads * head_dim + h * head_dim;
    const float* qv = queries + (q * heads + h) * head_dim;
    double acc = 0.0;
    for (int64_t j = 0; j < head_dim; ++j) acc += s[j] * static_cast<double>(qv[j]);
    mass[(q * heads + h) * num_labels + l] = acc;
  }
}

}  // namespace

cudaError_t label_sums_accumulate(const void* history, Dtype dtype, const int64_t* labels, int64_t begin,
                                  int64_t end, int64_t width, int64_t num_labels, int64_t row_offset,
                                  double* sums, unsigned long long* bad_value_row,
                                  unsigned long long* bad_label_row, cudaStream_t stream) {
  if (end <= begin || width <= 0) return cudaSuccess;
  int sms = 0;
  cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  const int64_t col_blocks = ceil_div(width, kColumns);
  // Enough row blocks to fill the device a few times over, but at least 64 rows each.
  const int64_t want = std::max<int64_t>(1, ceil_div(int64_t{sms} * 4, col_blocks));
  const int64_t row_blocks = std::min<int64_t>({want, ceil_div(end - begin, 64), 65535});
  const int64_t rows_per_block = ceil_div(end - begin, row_blocks);
  if (col_blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(row_blocks));
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    label_sums_kernel<T><<<grid, kColumns, 0, stream>>>(static_cast<const T*>(history), labels, begin, end, width,
                                                       num_labels, row_offset, rows_per_block, sums,
                                                       bad_value_row, bad_label_row);
    return cudaGetLastError();
  });
}

cudaError_t label_mass_readout(const double* sums, const float* queries, const int64_t* query_ids,
                               int64_t count, int64_t heads, int64_t head_dim, int64_t num_labels,
                               double* mass, cudaStream_t stream) {
  const int64_t total = count * heads * num_labels;
  if (total <= 0) return cudaSuccess;
  int sms = 0;
  cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>(ceil_div(total, kThreads), int64_t{sms} * 8);
  label_mass_readout_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      sums, queries, query_ids, count, heads, head_dim, num_labels, mass);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace metaclm
