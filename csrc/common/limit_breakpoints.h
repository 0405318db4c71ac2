// The limit breakpoints of a chunk: where, within rows row_offset .. row_offset + n, the running state
// must be read out for each query. They let queries of several checkpoints (different limits) share
// one pass over the history; the label-mass and dual-form merges plan them on the host for every device.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace metaclm {

// Queries sorted by limit, and for each limit inside (row_offset, row_offset + n] the local row at
// which the running sums must be read out.
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
