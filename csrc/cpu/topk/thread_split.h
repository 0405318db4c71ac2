// How the threads of one history_topk merge share a chunk: each thread takes a part, a range of the
// chunk's blocks of rows and a range of the queries, of about equal work. A row's work is one unit for
// loading it plus one per query whose limit lies beyond it (the scans skip a query's rows past its
// limit). With per-query limits, as in the analysis (the queries of each checkpoint limited to the rows
// recorded up to it), early rows are live for every query and late rows for few, so even splits by rows
// or by queries would leave one thread most of the work.
//
// Split by rows, every thread scans every query over its rows, and each pays again the start of every
// selection: a selection that starts empty takes about k ln(rows / k) offers, most of them in its first
// rows, each a rescoring and an insertion. Split by queries, every thread reads every row but fills its
// queries' selections once. With many queries the offers outweigh the reading; with few, the reading
// outweighs them and rows are split.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace metaclm::topk {
namespace {  // internal linkage: parts of history_topk.cpp (see there)

// Queries per thread from which the threads split the queries rather than the rows.
constexpr int64_t kMinQueriesPerPart = 64;

// A thread's share of a chunk: blocks [block_begin, block_end), queries [query_begin, query_end).
struct WorkPart {
  int64_t block_begin, block_end, query_begin, query_end;
};

// Each query's live rows in the chunk of rows [first_row, first_row + n) (global row numbers).
inline std::vector<int64_t> live_rows(const int64_t* limit, int64_t nq, int64_t first_row, int64_t n) {
  std::vector<int64_t> live(nq);
  for (int64_t q = 0; q < nq; ++q) live[q] = std::clamp<int64_t>(limit[q] - first_row, 0, n);
  return live;
}

// [n + 1] running sums of `values`, 0 first.
inline std::vector<double> prefix_sums(const std::vector<int64_t>& values) {
  std::vector<double> prefix(values.size() + 1, 0.0);
  for (size_t i = 0; i < values.size(); ++i) prefix[i + 1] = prefix[i] + static_cast<double>(values[i]);
  return prefix;
}

// Block boundaries [parts + 1] (0 first, `blocks` last) splitting the blocks of rows
// [first_row, first_row + n) (global row numbers) into `parts` ranges of about equal work.
inline std::vector<int64_t> balanced_block_ranges(const int64_t* limit, int64_t nq, int64_t first_row, int64_t n,
                                                   int64_t block_rows, int64_t parts) {
  const int64_t blocks = (n + block_rows - 1) / block_rows;
  parts = std::max<int64_t>(1, std::min(parts, blocks));
  // Each query's live rows in the chunk, ascending, and their prefix sums: the work of rows [0, r) is
  // r + sum over queries of min(live rows, r).
  std::vector<int64_t> live = live_rows(limit, nq, first_row, n);
  std::sort(live.begin(), live.end());
  const std::vector<double> prefix = prefix_sums(live);
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

// Query boundaries [parts + 1] (0 first, nq last), multiples of `align` (the scans' vectors of queries)
// but the last, splitting the queries into `parts` contiguous ranges of about equal work over the chunk.
inline std::vector<int64_t> balanced_query_ranges(const int64_t* limit, int64_t nq, int64_t first_row, int64_t n,
                                                  int64_t parts, int64_t align) {
  // The work of queries [0, q): their live rows (every part loads every row).
  const std::vector<double> prefix = prefix_sums(live_rows(limit, nq, first_row, n));
  std::vector<int64_t> bounds(parts + 1, nq);
  bounds[0] = 0;
  for (int64_t p = 1; p < parts; ++p) {
    const double target = prefix[nq] * static_cast<double>(p) / static_cast<double>(parts);
    const int64_t q = std::lower_bound(prefix.begin(), prefix.end(), target) - prefix.begin();
    bounds[p] = std::clamp<int64_t>((q + align / 2) / align * align, bounds[p - 1], nq);
  }
  return bounds;
}

// The threads' parts: by queries where every thread gets at least kMinQueriesPerPart of them, else by rows.
inline std::vector<WorkPart> split_work(const int64_t* limit, int64_t nq, int64_t first_row, int64_t n,
                                        int64_t block_rows, int64_t threads, int64_t align) {
  const int64_t blocks = (n + block_rows - 1) / block_rows;
  std::vector<WorkPart> parts;
  if (threads > 1 && nq >= threads * kMinQueriesPerPart) {
    const std::vector<int64_t> bounds = balanced_query_ranges(limit, nq, first_row, n, threads, align);
    for (int64_t p = 0; p < threads; ++p) {
      if (bounds[p] < bounds[p + 1]) parts.push_back({0, blocks, bounds[p], bounds[p + 1]});
    }
  } else {
    const std::vector<int64_t> bounds = balanced_block_ranges(limit, nq, first_row, n, block_rows, threads);
    for (size_t p = 0; p + 1 < bounds.size(); ++p) parts.push_back({bounds[p], bounds[p + 1], 0, nq});
  }
  return parts;
}

}  // namespace
}  // namespace metaclm::topk
