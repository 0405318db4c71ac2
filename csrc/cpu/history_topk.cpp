// CPU kernel of history_topk: scores of history rows against every (query, head), fused with the
// selection of the top-k and last-k rows, so the [Q, N] score matrix never exists.
//
// Rows are taken in blocks, converted once to fp32 (checking for NaN/Inf on the way), and scored in
// register tiles by one of the scans in topk/, which choose_scan picks by head dimension:
// * query vectors (heads of 8 dimensions, the paper's attention heads): 16 queries of one head are
//   one vector, each history value is broadcast (topk/query_vector_scan.h);
// * row vectors (any other head dimension): 16 rows of one head are one vector (topk/fp32_row_scan.h);
// * heads of 64k dimensions (the paper's FFN histories), and the query vectors, screened by exact
//   int8 scores (VPDPBUSD) against floors widened by a proven error bound, the few rows that pass
//   scored again in fp32 (topk/int8_bound.h, int8_row_screen.h, query_vector_int8_screen.h).
// Scans the build's ISA lacks (topk/isa.h) leave their heads to the row-vector scan.
// Threads split the rows or, with many queries, the queries into parts of equal work
// (topk/thread_split.h), keep private selections seeded with the incoming state's floors, and merge them
// into the state's heaps at the end under the total order (key desc, row asc), so the result depends
// neither on the number of threads nor on the chunking (topk/selection.h).
// The headers in topk/ are parts of this one translation unit: their code has internal linkage, as in
// a single file, so the compiler inlines and specialises the kernels as freely.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <mutex>

#include "../common/checks.h"
#include "row_readers.h"
#include "topk/blocks.h"
#include "topk/fp32_row_scan.h"
#include "topk/int8_row_screen.h"
#include "topk/isa.h"
#include "topk/query_vector_int8_screen.h"
#include "topk/query_vector_scan.h"
#include "topk/selection.h"
#include "topk/thread_split.h"

namespace metaclm {
namespace {

using namespace topk;

// A chunk of history rows and the merge state it is folded into: the incoming heaps' keys seed the
// threads' floors; out_* start as copies of the incoming heaps and receive the threads' selections.
struct TopkChunk {
  const at::Tensor& history;  // [n, H * Dh], contiguous
  int64_t row_offset;
  int64_t k;
  const float* in_top_keys;
  const float* in_last_keys;
  at::Tensor& out_top_keys;
  at::Tensor& out_top_indices;
  at::Tensor& out_last_keys;
  at::Tensor& out_last_indices;
};

// One thread's part of a chunk (topk/thread_split.h): its queries' private selections over its blocks,
// seeded with their incoming floors and merged into their rows of the state at the end. A block that
// holds a NaN or Inf stops the part, its number lowered into first_bad_block.
template <typename Scan, typename T>
void scan_part(const ScanQueries& queries, const TopkChunk& chunk, const T* hp, const WorkPart& part,
               std::mutex& merge_mutex, std::atomic<int64_t>& first_bad_block) {
  const int64_t q0 = part.query_begin, nh = queries.nh, k = chunk.k, state_offset = q0 * nh * k;
  const ScanQueries mine{queries.queries + q0 * nh * queries.dh, queries.limit + q0, part.query_end - q0, nh, queries.dh};
  const Scan scan(mine);
  const int64_t n = chunk.history.size(0), d = chunk.history.size(1);
  const int64_t block_rows = Scan::block_rows(queries.dh), steps_per_block = scan.steps_per_block();
  ThreadSelections local(mine.nq, nh, k, chunk.in_top_keys + state_offset, chunk.in_last_keys + state_offset);
  typename Scan::Buffers buffers(scan);
  NextBlockPrefetch prefetch;
  for (int64_t b = part.block_begin; b < part.block_end; ++b) {
    const int64_t first = b * block_rows;
    const int64_t rows = std::min(block_rows, n - first);
    const int64_t next_rows = b + 1 < part.block_end ? std::min(block_rows, n - first - block_rows) : 0;
    prefetch.start(next_rows ? hp + (first + block_rows) * d : nullptr, next_rows * d * sizeof(T), steps_per_block);
    if (!scan.score_block(hp + first * d, rows, chunk.row_offset + first, buffers, local, &prefetch)) {
      lower_to(first_bad_block, b);  // reported after the parts
      return;
    }
  }
  local.flush();
  std::lock_guard<std::mutex> guard(merge_mutex);
  merge_into_state(local, mine.nq * nh, chunk.out_top_keys.data_ptr<float>() + state_offset,
                   chunk.out_top_indices.data_ptr<int64_t>() + state_offset,
                   chunk.out_last_keys.data_ptr<float>() + state_offset,
                   chunk.out_last_indices.data_ptr<int64_t>() + state_offset);
}

// Folds the chunk into the state with Scan, one part of equal work per thread.
template <typename Scan>
void merge_chunk(const ScanQueries& queries, const TopkChunk& chunk) {
  const int64_t n = chunk.history.size(0);
  const int64_t block_rows = Scan::block_rows(queries.dh);
  const std::vector<WorkPart> parts =
      split_work(queries.limit, queries.nq, chunk.row_offset, n, block_rows, at::get_num_threads(), kLanes);
  std::mutex merge_mutex;
  std::atomic<int64_t> first_bad_block{std::numeric_limits<int64_t>::max()};
  dispatch_history_dtype(chunk.history.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* hp = chunk.history.data_ptr<T>();
    at::parallel_for(0, static_cast<int64_t>(parts.size()), 1, [&](int64_t p_begin, int64_t p_end) {
      for (int64_t p = p_begin; p < p_end; ++p) scan_part<Scan>(queries, chunk, hp, parts[p], merge_mutex, first_bad_block);
    });
  });
  // A block with NaN/Inf stopped its part; name the exact row (the rescan touches that block only).
  if (first_bad_block.load() != std::numeric_limits<int64_t>::max()) {
    const int64_t first = first_bad_block.load() * block_rows;
    check_finite_rows(chunk.history.slice(0, first, std::min(n, first + block_rows)), chunk.row_offset + first,
                      "history");
  }
}

using ChunkMerge = void (*)(const ScanQueries&, const TopkChunk&);

// The scan for heads of dh dimensions: the query-vector layout for heads of 8 (screened in int8 where
// the ISA has it), the int8 screen for heads of 64k, else the fp32 row-vector scan, which takes any head.
ChunkMerge choose_scan(int64_t dh) {
  if (dh == kQueryDh) {
    if constexpr (kHaveQueryVectorScan && kHaveInt8Screen) return merge_chunk<QueryVectorInt8Screen>;
    else if constexpr (kHaveQueryVectorScan) return merge_chunk<QueryVectorScan>;
  }
  if constexpr (kHaveInt8Screen) {
    if (use_int8_screen(dh)) return merge_chunk<Int8RowScreen>;
  }
  return merge_chunk<Fp32RowScan>;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> history_topk_merge_cpu(
    const at::Tensor& queries, const at::Tensor& history, int64_t row_offset, const at::Tensor& limit,
    const at::Tensor& top_keys, const at::Tensor& top_indices, const at::Tensor& last_keys,
    const at::Tensor& last_indices) {
  const int64_t k =
      check_topk_merge_args(queries, history, row_offset, limit, top_keys, top_indices, last_keys, last_indices);
  const int64_t nq = queries.size(0), nh = queries.size(1), dh = queries.size(2);

  auto q = queries.contiguous();
  auto hist = history.contiguous();
  auto lim = limit.contiguous();
  const auto in_top_keys = top_keys.contiguous(), in_last_keys = last_keys.contiguous();  // read-only: seeds
  auto out_top_keys = in_top_keys.clone();
  auto out_top_indices = top_indices.contiguous().clone();
  auto out_last_keys = in_last_keys.clone();
  auto out_last_indices = last_indices.contiguous().clone();
  const ScanQueries scanned{q.data_ptr<float>(), lim.data_ptr<int64_t>(), nq, nh, dh};
  const TopkChunk chunk{hist, row_offset, k, in_top_keys.const_data_ptr<float>(), in_last_keys.const_data_ptr<float>(),
                        out_top_keys, out_top_indices, out_last_keys, out_last_indices};
  choose_scan(dh)(scanned, chunk);
  return {out_top_keys, out_top_indices, out_last_keys, out_last_indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(metaclm_ext, CPU, m) { m.impl("history_topk_merge", &history_topk_merge_cpu); }

}  // namespace metaclm
