// The query-vector scan screened in int8, as heads of 64k dimensions are (int8_bound.h): per row
// and head two VPDPBUSD per 16 queries (the row's 8 bytes broadcast as two words) where fp32 takes
// eight FMAs. A tile of 4 rows x 2 query vectors is compared with integer thresholds; a tile that may
// hold a candidate is scored in fp32 exactly as the fp32 scan scores it and offered. For heads of
// kQueryDh dimensions where the build has both the query-vector scan and the int8 screen (isa.h).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "blocks.h"
#include "int8_bound.h"
#include "isa.h"
#include "query_vector_scan.h"
#include "selection.h"

namespace metaclm::topk {
namespace {  // internal linkage: parts of history_topk.cpp (see there)

class QueryVectorInt8Screen;  // defined where kHaveQueryVectorScan and kHaveInt8Screen

#if METACLM_QUERY_VECTOR_SCAN && METACLM_INT8_SCREEN
// The queries' int8 words for the query-vector screen, [H][2][padded Q] (zero past nq), and their
// biases [H][padded Q].
struct QueryWords {
  std::vector<int32_t> words, bias;
  int64_t padded_nq;
  QueryWords(const Int8Queries& iq, int64_t nh, int64_t padded_nq) : words(nh * 2 * padded_nq), bias(nh * padded_nq), padded_nq(padded_nq) {
    for (int64_t h = 0; h < nh; ++h) {
      for (int64_t q = 0; q < iq.nq; ++q) {
        for (int64_t j = 0; j < 2; ++j) std::memcpy(&words[(h * 2 + j) * padded_nq + q], iq.query(h, q) + 4 * j, 4);
        bias[h * padded_nq + q] = iq.bias[h * iq.nq + q];
      }
    }
  }
};

// A block's head slice ([padded rows][kQueryDh] fp32) in int8: words [padded rows][2] of x~ + 128.
inline Int8Slice quantize_head_slice(const float* slice, int64_t padded_rows, uint32_t* words) {
  __m512 m = _mm512_setzero_ps();
  for (int64_t i = 0; i < padded_rows * kQueryDh; i += kLanes) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(slice + i)));
  const float x_max = _mm512_reduce_max_ps(m);
  const __m512 inv = _mm512_set1_ps(x_max > 0 ? 127 / x_max : 0.f);
  const __m128i flip = _mm_set1_epi8(static_cast<char>(0x80));
  for (int64_t i = 0; i < padded_rows * kQueryDh; i += kLanes) {
    const __m128i bytes = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(slice + i), inv)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(words + i / 4), _mm_xor_si128(bytes, flip));
  }
  // No row-norm bound here: for 8 dimensions max|x| |dq|_1 is nearly as tight.
  return {words, x_max / 127, x_max, std::numeric_limits<float>::max()};
}

// What the screen of one head of a block needs beyond the fp32 scan's task.
struct QueryScreen {
  const Int8Queries* int8;
  const QueryWords* words;
  Int8Slice x;
};

// Thresholds of query vector v's live lanes on the raw sums q~.(x~ + 128) (the bias folded in).
inline void query_vector_thresholds(const QueryBlockTask& t, const QueryScreen& sc, int64_t v, __mmask16 live,
                                    ThreadSelections& selections, __m512i& top, __m512i& last) {
  alignas(64) int32_t top_t[kLanes], last_t[kLanes];
  for (int half = 0; half < 2; ++half) {
    int8_thresholds(*sc.int8, t.h, v * kLanes + 8 * half, sc.x, selections.top_floors(t.h), selections.last_floors(t.h),
                    static_cast<__mmask8>(live >> (8 * half)), top_t + 8 * half, last_t + 8 * half);
  }
  const __m512i bias = _mm512_loadu_si512(sc.words->bias.data() + t.h * sc.words->padded_nq + v * kLanes);
  top = _mm512_sub_epi32(_mm512_load_si512(top_t), bias);
  last = _mm512_sub_epi32(_mm512_load_si512(last_t), bias);
}

template <int QV>
void screen_query_vectors(const QueryBlockTask& t, const QueryScreen& sc, int64_t v0, ThreadSelections& selections) {
  const QueryVectors& qs = *t.queries;
  __m512i qw[QV][2], top[QV], last[QV];
  __mmask16 live[QV];
  int64_t end = 0;  // rows of the block below some lane's limit
  const __m512i base = _mm512_set1_epi64(t.base_row);
  for (int v = 0; v < QV; ++v) {
    for (int j = 0; j < 2; ++j) qw[v][j] = _mm512_loadu_si512(sc.words->words.data() + (t.h * 2 + j) * qs.padded_nq + (v0 + v) * kLanes);
    const int64_t* limit = qs.limit.data() + (v0 + v) * kLanes;
    live[v] = static_cast<__mmask16>(_mm512_cmpgt_epi64_mask(_mm512_loadu_si512(limit), base) |
                                     (_mm512_cmpgt_epi64_mask(_mm512_loadu_si512(limit + 8), base) << 8));
    end = std::max(end, std::min(t.rows, qs.vector_max_limit[v0 + v] - t.base_row));
  }
  if (end <= 0) return;  // the block lies past every lane's limit: no thresholds to compute
  for (int v = 0; v < QV; ++v) query_vector_thresholds(t, sc, v0 + v, live[v], selections, top[v], last[v]);
  const int32_t* x = reinterpret_cast<const int32_t*>(sc.x.words);
  for (int64_t r0 = 0; r0 < end; r0 += kQueryTileRows) {
    __m512i acc[kQueryTileRows][QV];
    for (int64_t r = 0; r < kQueryTileRows; ++r) {
      const __m512i x0 = _mm512_set1_epi32(x[(r0 + r) * 2]), x1 = _mm512_set1_epi32(x[(r0 + r) * 2 + 1]);
      for (int v = 0; v < QV; ++v) acc[r][v] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), x0, qw[v][0]), x1, qw[v][1]);
    }
    __mmask16 none[kQueryTileRows];  // one chain of masked compares per row: short dependency chains
    for (int64_t r = 0; r < kQueryTileRows; ++r) {
      none[r] = 0xFFFF;
      for (int v = 0; v < QV; ++v) {
        none[r] = _mm512_mask_cmplt_epi32_mask(none[r], acc[r][v], top[v]);
        none[r] = _mm512_mask_cmpgt_epi32_mask(none[r], acc[r][v], last[v]);
      }
    }
    if (__builtin_expect((none[0] & none[1] & none[2] & none[3]) == 0xFFFF, 1)) continue;
    __m512 q[QV][kQueryDh], exact[kQueryTileRows][QV];
    for (int v = 0; v < QV; ++v) {
      for (int64_t j = 0; j < kQueryDh; ++j) q[v][j] = _mm512_loadu_ps(qs.transposed.data() + (t.h * kQueryDh + j) * qs.padded_nq + (v0 + v) * kLanes);
    }
    query_tile_scores<QV>(t.slice, r0, q, exact);
    alignas(64) float scores[kQueryTileRows][QV][kLanes];
    for (int64_t r = 0; r < kQueryTileRows; ++r) {
      for (int v = 0; v < QV; ++v) _mm512_store_ps(scores[r][v], exact[r][v]);
    }
    // Thresholds follow the floors of the vectors that made offers; a vector whose tile passed the
    // screen but offered nothing keeps its floors, and so its thresholds.
    const unsigned offered = offer_query_tile<QV>(t, v0, r0, scores, selections);
    for (int v = 0; v < QV; ++v) {
      if (offered >> v & 1u) query_vector_thresholds(t, sc, v0 + v, live[v], selections, top[v], last[v]);
    }
  }
}

void screen_head_by_query(const QueryBlockTask& t, const QueryScreen& sc, ThreadSelections& selections) {
  int64_t v = 0;
  for (; v + 2 <= t.queries->vectors; v += 2, t.prefetch->step()) screen_query_vectors<2>(t, sc, v, selections);
  if (v < t.queries->vectors) {
    screen_query_vectors<1>(t, sc, v, selections);
    t.prefetch->step();
  }
}

// The screen as history_topk_merge drives it (see Fp32RowScan): the query-vector scan's blocks, each
// head's rows quantised to int8 in turn.
class QueryVectorInt8Screen : public QueryVectorScan {
 public:
  explicit QueryVectorInt8Screen(const ScanQueries& q)
      : QueryVectorScan(q), int8_(q.queries, q.nq, q.nh, q.dh), words_(int8_, q.nh, vectors_.padded_nq) {}

  struct Buffers : QueryVectorScan::Buffers {
    explicit Buffers(const QueryVectorInt8Screen& screen)
        : QueryVectorScan::Buffers(screen), head_words(kQueryBlockRows * kQueryDh / 4) {}
    std::vector<uint32_t> head_words;  // one head's int8 rows
  };

  template <typename T>
  bool score_block(const T* rows, int64_t n, int64_t base_row, Buffers& buf, ThreadSelections& selections,
                   NextBlockPrefetch* prefetch) const {
    return for_each_head(rows, n, base_row, buf, prefetch, [&](const QueryBlockTask& task) {
      const int64_t padded = (n + kQueryTileRows - 1) / kQueryTileRows * kQueryTileRows;
      const QueryScreen sc{&int8_, &words_, quantize_head_slice(task.slice, padded, buf.head_words.data())};
      screen_head_by_query(task, sc, selections);
    });
  }

 private:
  Int8Queries int8_;
  QueryWords words_;
};
#endif

}  // namespace
}  // namespace metaclm::topk
