// How the threads of one history_topk merge share a chunk's blocks of rows: contiguous ranges of equal
// work. A row's work is one unit for loading it plus one per query whose limit lies beyond it (the scans
// skip a query's rows past its limit). With per-query limits, as in the analysis (the queries of each
// checkpoint limited to the rows recorded up to it), early rows are live for every query and late rows
// for few, so an even split by rows would leave the first thread most of the work.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace metaclm::topk {
namespace {  // internal linkage: parts of history_topk.cpp (see there)

// Block boundaries [parts + 1] (0 first, `blocks` last) splitting the blocks of rows
// [first_row, first_row + n) (global row numbers) into `parts` ranges of about equal work.
inline std::vector<int64_t> balanced_block_ranges(const int64_t* limit, int64_t nq, int64_t first_row, int64_t n,
                                                   int64_t block_rows, int64_t parts) {
  const int64_t blocks = (n + block_rows - 1) / block_rows;
  parts = std::max<int64_t>(1, std::min(parts, blocks));
  // Each query's live rows in the chunk, ascending, and their prefix sums: the work of rows [0, r) is
  // r + sum over queries of min(live rows, r).
  std::vector<int64_t> live(nq);
  for (int64_t q = 0; q < nq; ++q) live[q] = std::clamp<int64_t>(limit[q] - first_row, 0, n);
  std::sort(live.begin(), live.end());
  std::vector<double> prefix(nq + 1, 0.0);
  for (int64_t q = 0; q < nq; ++q) prefix[q + 1] = prefix[q] + static_cast<double>(live[q]);
  auto work_before = [&](int64_t r) {
    const int64_t below = std::lower_bound(live.begin(), live.end(), r) - live.begin();  // queries with live < r
    return static_cast<double>(r) + prefix[below] + static_cast<double>(r) * static_cast<double>(nq - below);
  };
  const double total = work_before(n);
  std::vector<int64_t> bounds(parts + 1, blocks);
  bounds[0] = 0;
  for (int64_t p = 1; p < parts; ++p) {
    const double target = total * static_cast<double>(p) / static_cast<double>(parts);
    int64_t lo = bounds[p - 1], hi = blocks;  // the first block boundary whose work before reaches target
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (work_before(std::min(n, mid * block_rows)) >= target) hi = mid;
      else lo = mid + 1;
    }
    bounds[p] = lo;
  }
  return bounds;
}

}  // namespace
}  // namespace metaclm::topk
