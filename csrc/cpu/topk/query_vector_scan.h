// The query-vector scan of history_topk, for heads of kQueryDh dimensions (the paper's attention
// heads). There the roles flip: 16 queries of one head are one vector (their dimensions stay in
// registers for the whole block), each history value is broadcast, and one row against 16 queries is
// one score vector. Rows need no transpose, only conversion to fp32 and a split by head. A tile of 2
// query vectors x 4 rows keeps 16 query, 8 score and up to 4 floor vectors in registers and is tested
// at once over its rows (scan_until_candidate). On heads this short it keeps the FMA units far busier
// than the row-vector scan (timings in the commit history).
// Needs AVX-512 F and DQ (isa.h); without them every head takes the row-vector scan.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "../row_readers.h"
#include "blocks.h"
#include "isa.h"
#include "selection.h"

namespace metaclm::topk {
namespace {  // internal linkage: parts of history_topk.cpp (see there)

constexpr int64_t kQueryDh = 8;

class QueryVectorScan;  // defined where kHaveQueryVectorScan

#if METACLM_QUERY_VECTOR_SCAN
constexpr int64_t kQueryBlockRows = 2048;  // rows per block of the query-vector scan (a head's slice: 64 KB)
constexpr int64_t kQueryTileRows = 4;

// The queries laid out for the query-vector scan: [H][Dh][padded Q], zero past nq; per-lane limits
// (zero past nq, so padding lanes never count) and each vector's largest limit.
struct QueryVectors {
  std::vector<float> transposed;
  std::vector<int64_t> limit, vector_max_limit;
  int64_t vectors, padded_nq;
  QueryVectors(const float* queries, const int64_t* lim, int64_t nq, int64_t nh)
      : vectors((nq + kLanes - 1) / kLanes), padded_nq(vectors * kLanes) {
    transposed.assign(nh * kQueryDh * padded_nq, 0.f);
    limit.assign(padded_nq, 0);
    vector_max_limit.assign(vectors, 0);
    for (int64_t q = 0; q < nq; ++q) {
      for (int64_t h = 0; h < nh; ++h) {
        for (int64_t j = 0; j < kQueryDh; ++j) transposed[(h * kQueryDh + j) * padded_nq + q] = queries[(q * nh + h) * kQueryDh + j];
      }
      limit[q] = lim[q];
      vector_max_limit[q / kLanes] = std::max(vector_max_limit[q / kLanes], lim[q]);
    }
  }
};

// Converts rows [0, n) of a [n, H * kQueryDh] block to fp32 laid out as [H][head_stride] with rows of
// kQueryDh floats, zero-padding to whole tiles. Returns false if the block holds a NaN or Inf.
template <typename T>
bool load_block_by_head(const T* rows, int64_t n, int64_t nh, int64_t head_stride, float* out) {
  if (!row_is_finite(rows, n * nh * kQueryDh)) return false;  // the block is contiguous: one check
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t h = 0; h < nh; ++h) row_to_float(rows + (r * nh + h) * kQueryDh, kQueryDh, out + h * head_stride + r * kQueryDh);
  }
  const int64_t padded = (n + kQueryTileRows - 1) / kQueryTileRows * kQueryTileRows;
  for (int64_t h = 0; h < nh; ++h) std::fill(out + h * head_stride + n * kQueryDh, out + h * head_stride + padded * kQueryDh, 0.f);
  return true;
}

// What one head of a block is scored against: all query vectors of head h.
struct QueryBlockTask {
  const float* slice;  // [rows padded to tiles][kQueryDh] fp32 rows of head h
  int64_t rows;        // rows in the block
  int64_t base_row;    // global row number of the block's first row
  const QueryVectors* queries;
  int64_t h;
  NextBlockPrefetch* prefetch;
};

// The rare path: a tile may hold candidates. Offers each score that passes its query's current floors
// (the scan's copies may be looser), skipping padding rows and lanes at or past their limit (padding
// lanes have limit 0). Returns a bit per query vector of the tile that made an offer: only their
// floors can have moved.
template <int QV>
__attribute__((noinline)) unsigned offer_query_tile(const QueryBlockTask& t, int64_t v0, int64_t r0,
                                                const float (&scores)[kQueryTileRows][QV][kLanes], ThreadSelections& selections) {
  const float* top_floors = selections.top_floors(t.h);
  const float* last_floors = selections.last_floors(t.h);
  unsigned offered = 0;
  for (int64_t r = 0; r < kQueryTileRows && r0 + r < t.rows; ++r) {
    const int64_t row = t.base_row + r0 + r;
    for (int v = 0; v < QV; ++v) {
      const int64_t lane0 = (v0 + v) * kLanes;
      const int64_t* limit = t.queries->limit.data() + lane0;
      const __m512 score = _mm512_loadu_ps(scores[r][v]);
      for (uint32_t pass = _mm512_cmp_ps_mask(score, _mm512_loadu_ps(top_floors + lane0), _CMP_GE_OQ); pass; pass &= pass - 1) {
        const int lane = __builtin_ctz(pass);
        if (row < limit[lane]) selections.offer(lane0 + lane, t.h, false, scores[r][v][lane], row), offered |= 1u << v;
      }
      for (uint32_t pass = _mm512_cmp_ps_mask(score, _mm512_loadu_ps(last_floors + lane0), _CMP_LE_OQ); pass; pass &= pass - 1) {
        const int lane = __builtin_ctz(pass);
        if (row < limit[lane]) selections.offer(lane0 + lane, t.h, true, -scores[r][v][lane], row), offered |= 1u << v;
      }
    }
  }
  return offered;
}

// The fp32 scores of rows r0 .. r0+3 against query vectors q: acc[r][v].
template <int QV>
__attribute__((always_inline)) inline void query_tile_scores(const float* slice, int64_t r0, const __m512 (&q)[QV][kQueryDh],
                                                             __m512 (&acc)[kQueryTileRows][QV]) {
  for (int64_t r = 0; r < kQueryTileRows; ++r) {
    const float* x = slice + (r0 + r) * kQueryDh;
    for (int v = 0; v < QV; ++v) acc[r][v] = _mm512_mul_ps(_mm512_set1_ps(x[0]), q[v][0]);
    for (int64_t j = 1; j < kQueryDh; ++j) {
      const __m512 xj = _mm512_set1_ps(x[j]);
      for (int v = 0; v < QV; ++v) acc[r][v] = _mm512_fmadd_ps(xj, q[v][j], acc[r][v]);
    }
  }
}

// Scores tiles from row r0 on until one may hold a candidate; returns that tile's first row, its scores
// in `scores`, or `end`.
// Two tests of a tile, both conservative (the offers check exactly):
// * by magnitude: max |score| >= min(top floor, -last floor). A score at or above the top floor or at
//   or below the last floor always passes (for any signs of the floors), and the maximum magnitude
//   over the rows is one VRANGEPS per row. Used while every lane's floors are near-symmetric around
//   zero (so few rows pass spuriously), the usual case once the selections have filled.
// * by extremes: max score >= top floor or min score <= last floor: a max and a min per row.
template <int QV, bool kByMagnitude>
__attribute__((always_inline)) inline int64_t scan_until_candidate(const float* slice, int64_t r0, int64_t end,
                                                                   const __m512 (&q)[QV][kQueryDh],
                                                                   const __m512 (&top)[QV], const __m512 (&last)[QV],
                                                                   float (&scores)[kQueryTileRows][QV][kLanes]) {
  constexpr int kMaxAbs = 0b1011;  // VRANGEPS: the larger magnitude, sign cleared
  __m512 bound[QV];
  for (int v = 0; v < QV; ++v) bound[v] = _mm512_min_ps(top[v], -last[v]);
  for (; r0 < end; r0 += kQueryTileRows) {
    __m512 acc[kQueryTileRows][QV];
    query_tile_scores<QV>(slice, r0, q, acc);
    __mmask16 any = 0;
    for (int v = 0; v < QV; ++v) {
      if (kByMagnitude) {
        __m512 mag = _mm512_range_ps(acc[0][v], acc[1][v], kMaxAbs);
        for (int64_t r = 2; r < kQueryTileRows; ++r) mag = _mm512_range_ps(mag, acc[r][v], kMaxAbs);
        any |= _mm512_cmp_ps_mask(mag, bound[v], _CMP_GE_OQ);
      } else {
        __m512 hi = acc[0][v], lo = acc[0][v];
        for (int64_t r = 1; r < kQueryTileRows; ++r) {
          hi = _mm512_max_ps(hi, acc[r][v]);
          lo = _mm512_min_ps(lo, acc[r][v]);
        }
        any |= _mm512_cmp_ps_mask(hi, top[v], _CMP_GE_OQ) | _mm512_cmp_ps_mask(lo, last[v], _CMP_LE_OQ);
      }
    }
    if (__builtin_expect(any != 0, 0)) {
      for (int64_t r = 0; r < kQueryTileRows; ++r) {
        for (int v = 0; v < QV; ++v) _mm512_storeu_ps(scores[r][v], acc[r][v]);
      }
      return r0;
    }
  }
  return end;
}

// Scores the block's head slice against query vectors v0 .. v0+QV-1.
template <int QV>
void scan_query_vectors(const QueryBlockTask& t, int64_t v0, ThreadSelections& selections) {
  const QueryVectors& qs = *t.queries;
  const float* top_floors = selections.top_floors(t.h);
  const float* last_floors = selections.last_floors(t.h);
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __m512 q[QV][kQueryDh], top[QV], last[QV];
  __mmask16 done[QV];  // lanes whose limit the block starts at or past: their floors are never reached
  int64_t end = 0;     // rows of the block below some lane's limit
  const __m512i base = _mm512_set1_epi64(t.base_row);
  for (int v = 0; v < QV; ++v) {
    for (int64_t j = 0; j < kQueryDh; ++j) q[v][j] = _mm512_loadu_ps(qs.transposed.data() + (t.h * kQueryDh + j) * qs.padded_nq + (v0 + v) * kLanes);
    const int64_t* limit = qs.limit.data() + (v0 + v) * kLanes;
    done[v] = static_cast<__mmask16>(_mm512_cmple_epi64_mask(_mm512_loadu_si512(limit), base) |
                                     (_mm512_cmple_epi64_mask(_mm512_loadu_si512(limit + 8), base) << 8));
    end = std::max(end, std::min(t.rows, qs.vector_max_limit[v0 + v] - t.base_row));
  }
  for (int64_t r0 = 0; r0 < end; r0 += kQueryTileRows) {
    // (Re)load the floors, which offers move, and pick the test: by magnitude while every lane's
    // floors are within 4:3 of each other's magnitude (done lanes: both infinite, always within).
    bool symmetric = true;
    for (int v = 0; v < QV; ++v) {
      top[v] = _mm512_mask_mov_ps(_mm512_loadu_ps(top_floors + (v0 + v) * kLanes), done[v], inf);
      last[v] = _mm512_mask_mov_ps(_mm512_loadu_ps(last_floors + (v0 + v) * kLanes), done[v], -inf);
      const __m512 low = _mm512_min_ps(top[v], -last[v]), high = _mm512_max_ps(top[v], -last[v]);
      symmetric &= _mm512_cmp_ps_mask(_mm512_mul_ps(low, _mm512_set1_ps(4.f)), _mm512_mul_ps(high, _mm512_set1_ps(3.f)), _CMP_GE_OQ) == 0xFFFF;
    }
    alignas(64) float scores[kQueryTileRows][QV][kLanes];
    r0 = symmetric ? scan_until_candidate<QV, true>(t.slice, r0, end, q, top, last, scores)
                   : scan_until_candidate<QV, false>(t.slice, r0, end, q, top, last, scores);
    if (r0 < end) offer_query_tile<QV>(t, v0, r0, scores, selections);
  }
}

void scan_head_by_query(const QueryBlockTask& t, ThreadSelections& selections) {
  int64_t v = 0;
  for (; v + 2 <= t.queries->vectors; v += 2, t.prefetch->step()) scan_query_vectors<2>(t, v, selections);
  if (v < t.queries->vectors) {
    scan_query_vectors<1>(t, v, selections);
    t.prefetch->step();
  }
}

// The scan as history_topk_merge drives it (see Fp32RowScan).
class QueryVectorScan {
 public:
  explicit QueryVectorScan(const ScanQueries& q) : q_(q), vectors_(q.queries, q.limit, q.nq, q.nh) {}

  static int64_t block_rows(int64_t /*dh*/) { return kQueryBlockRows; }
  // Prefetch steps per block: the tile groups of 2 query vectors, per head.
  int64_t steps_per_block() const { return q_.nh * ((q_.nq + 2 * kLanes - 1) / (2 * kLanes)); }

  // A thread's block as fp32 by head, [H][stride] with rows of kQueryDh floats (one spare cache line
  // per head, as in Fp32RowScan).
  struct Buffers {
    explicit Buffers(const QueryVectorScan& scan) : stride(kQueryBlockRows * kQueryDh + kLanes), block(scan.q_.nh * stride) {}
    int64_t stride;
    std::vector<float> block;
  };

  // Scores rows [0, n) of a block (global rows base_row ...) against every query head; false, before
  // any is scored, if the block holds a NaN or Inf.
  template <typename T>
  bool score_block(const T* rows, int64_t n, int64_t base_row, Buffers& buf, ThreadSelections& selections,
                   NextBlockPrefetch* prefetch) const {
    return for_each_head(rows, n, base_row, buf, prefetch,
                         [&](const QueryBlockTask& task) { scan_head_by_query(task, selections); });
  }

 protected:
  // Loads the block into buf and calls score_head with each head's task; false if the block holds a
  // NaN or Inf.
  template <typename T, typename ScoreHead>
  bool for_each_head(const T* rows, int64_t n, int64_t base_row, Buffers& buf, NextBlockPrefetch* prefetch,
                     ScoreHead&& score_head) const {
    if (!load_block_by_head(rows, n, q_.nh, buf.stride, buf.block.data())) return false;
    for (int64_t h = 0; h < q_.nh; ++h) {
      score_head(QueryBlockTask{buf.block.data() + h * buf.stride, n, base_row, &vectors_, h, prefetch});
    }
    return true;
  }

  ScanQueries q_;
  QueryVectors vectors_;
};
#endif

}  // namespace
}  // namespace metaclm::topk
