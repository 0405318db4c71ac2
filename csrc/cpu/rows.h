// Shared helpers of the CPU kernels: argument checks, reading history rows of any float dtype as
// fp32, and the limit breakpoints that let queries of several checkpoints share one pass.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

namespace metaclm {

inline void check_history(const at::Tensor& history, const char* name) {
  TORCH_CHECK_VALUE(history.dim() == 2, name, " must be 2-D [rows, dim], got ", history.dim(), "-D");
  TORCH_CHECK_VALUE(
      history.scalar_type() == at::kFloat || history.scalar_type() == at::kHalf ||
          history.scalar_type() == at::kBFloat16,
      name, " must be float32, float16 or bfloat16, got ", history.scalar_type());
}

inline void check_limit(const at::Tensor& limit, int64_t num_queries) {
  TORCH_CHECK_VALUE(
      limit.dim() == 1 && limit.size(0) == num_queries && limit.scalar_type() == at::kLong,
      "limit must be int64 [", num_queries, "], got ", limit.scalar_type(), " ", limit.sizes());
}

// Calls fn(scalar_t{}) with the history's element type.
template <typename Fn>
inline void dispatch_history_dtype(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default: TORCH_CHECK_VALUE(false, "unsupported history dtype ", t);
  }
}

// Raises ValueError naming the first history row (global row number) that holds NaN or Inf.
void check_finite_rows(const at::Tensor& rows, int64_t row_offset, const char* name);

// Queries sorted by limit, and for each limit inside (row_offset, row_offset + n] the local row at
// which the running sums must be read out. Used by the label-mass and dual-form merges.
struct Breakpoints {
  std::vector<int64_t> order;  // query ids sorted by limit
  int64_t begin = 0, end = 0;  // order[begin:end] have limits inside this chunk
};

inline Breakpoints breakpoints_in_chunk(const at::Tensor& limit, int64_t row_offset, int64_t n) {
  const int64_t* lim = limit.data_ptr<int64_t>();
  const int64_t q = limit.size(0);
  Breakpoints b;
  b.order.resize(q);
  std::iota(b.order.begin(), b.order.end(), 0);
  std::stable_sort(b.order.begin(), b.order.end(), [&](int64_t a, int64_t c) { return lim[a] < lim[c]; });
  // A query whose limit is exactly row_offset was read out by the previous chunk, except at the very
  // start of the stream (limit 0), whose answer is the zero the state starts with.
  auto first = std::upper_bound(b.order.begin(), b.order.end(), row_offset,
                                [&](int64_t value, int64_t id) { return value < lim[id]; });
  auto last = std::upper_bound(b.order.begin(), b.order.end(), row_offset + n,
                               [&](int64_t value, int64_t id) { return value < lim[id]; });
  b.begin = first - b.order.begin();
  b.end = last - b.order.begin();
  return b;
}

}  // namespace metaclm
