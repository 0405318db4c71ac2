// The int8 screen of the row-vector layout, for heads of 64k dimensions (the paper's FFN histories):
// blocks of rows and the queries scaled to int8 (int8_bound.h), a register tile of 8 queries x 3 vectors
// of 16 rows scored exactly in int32 by VPDPBUSD, and the rows within the error bound of a floor scored
// again in fp32 and offered. Needs AVX-512 VNNI and BW (isa.h); without them such heads take the fp32
// row-vector scan.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../row_readers.h"
#include "blocks.h"
#include "int8_bound.h"
#include "isa.h"
#include "selection.h"

namespace metaclm::topk {
namespace {  // internal linkage: parts of history_topk.cpp (see there)

// Heads the screen takes (where the build has it).
inline bool use_int8_screen(int64_t dh) { return dh % 64 == 0 && dh <= kInt8MaxDh; }

class Int8RowScreen;  // defined where kHaveInt8Screen

#if METACLM_INT8_SCREEN
constexpr int64_t kInt8StepRows = 3 * kLanes;  // rows of one step of the 8-query x 3-row-vector tile
constexpr int64_t kInt8BlockRows = 2 * kInt8StepRows;

// Converts rows [0, n) of a [n, H * dh] block (dh a multiple of 64) to fp32 row-major in `rows_out`
// (for the rescoring) and to int8 slices per head, [H][dh / 4][stride] words, padding rows to a
// whole steps of the scan (48) with x~ = 0. Returns false if the block holds a NaN or Inf.
template <typename T>
bool load_int8_block(const T* rows, int64_t n, int64_t nh, int64_t dh, int64_t stride, float* rows_out,
                     uint32_t* words, Int8Slice* slices) {
  const int64_t d = nh * dh;
  for (int64_t h = 0; h < nh; ++h) {
    __m512 m = _mm512_setzero_ps();
    __mmask16 bad = 0;
    float norm2 = 0;
    for (int64_t r = 0; r < n; ++r) {
      __m512 sq = _mm512_setzero_ps();
      for (int64_t j = h * dh; j < (h + 1) * dh; j += kLanes) {
        const __m512 x = load16(rows + r * d + j);
        _mm512_storeu_ps(rows_out + r * d + j, x);
        const __m512 a = _mm512_abs_ps(x);
        bad |= _mm512_cmp_ps_mask(a, _mm512_set1_ps(std::numeric_limits<float>::max()), _CMP_NLE_UQ);
        m = _mm512_max_ps(m, a);
        sq = _mm512_fmadd_ps(x, x, sq);
      }
      norm2 = std::max(norm2, _mm512_reduce_add_ps(sq));
    }
    if (bad) return false;
    const float x_max = _mm512_reduce_max_ps(m);
    // The fp32 sum of squares is within dh 2^-24 of the true one (and no larger than dh x_max^2).
    const float x_norm = std::sqrt(std::min(norm2 * 1.001f, dh * x_max * x_max * 1.001f));
    slices[h] = {words + h * (dh / 4) * stride, x_max / 127, x_max, x_norm};
  }
  __m512i lo[4], hi[4];
  for (int s = 0; s < 4; ++s) {
    lo[s] = _mm512_load_si512(kTransposeIndex.lo[s]);
    hi[s] = _mm512_load_si512(kTransposeIndex.hi[s]);
  }
  const __m512i flip = _mm512_set1_epi32(static_cast<int32_t>(0x80808080u));  // x~ -> x~ + 128
  const int64_t padded = (n + kInt8StepRows - 1) / kInt8StepRows * kInt8StepRows;
  for (int64_t h = 0; h < nh; ++h) {
    const __m512 inv = _mm512_set1_ps(slices[h].x_max > 0 ? 127 / slices[h].x_max : 0.f);
    for (int64_t r = 0; r < padded; r += kLanes) {
      for (int64_t c = 0; c < dh; c += 64) {  // 16 rows x 64 dimensions: a 16 x 16 tile of words
        __m512 tile[16];
        for (int i = 0; i < 16; ++i) {
          __m512i packed = _mm512_setzero_si512();
          if (r + i < n) {
            const float* x = rows_out + (r + i) * d + h * dh + c;
            __m128i part[4];
            for (int p = 0; p < 4; ++p)
              part[p] = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + 16 * p), inv)));
            packed = _mm512_inserti32x4(_mm512_castsi128_si512(part[0]), part[1], 1);
            packed = _mm512_inserti32x4(packed, part[2], 2);
            packed = _mm512_inserti32x4(packed, part[3], 3);
          }
          tile[i] = _mm512_castsi512_ps(_mm512_xor_si512(packed, flip));
        }
        transpose16(tile, lo, hi);
        for (int j = 0; j < 16; ++j)
          _mm512_storeu_ps(reinterpret_cast<float*>(slices[h].words + (c / 4 + j) * stride + r), tile[j]);
      }
    }
  }
  return true;
}

// What one block's head h is screened against: every query's head h.
struct Int8BlockTask {
  Int8Slice slice;
  int64_t stride;        // words between consecutive word-columns of the slice
  const float* rows;     // [rows, D] fp32, for the rescoring
  int64_t d;
  int64_t rows_in_block;
  int64_t base_row;
  const float* queries;  // [Q, H, Dh] fp32
  const Int8Queries* int8;
  const int64_t* limit;
  int64_t nq, nh, h, dh;
  NextBlockPrefetch* prefetch;
};

// The fp32 score of one row against one query head: 16-lane partial sums, then their sum.
inline float rescore(const float* q, const float* x, int64_t dh) {
  __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(x));
  for (int64_t j = kLanes; j < dh; j += kLanes) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + j), _mm512_loadu_ps(x + j), acc);
  return _mm512_reduce_add_ps(acc);
}

// Screens the block against QB queries (qi .. qi+QB-1) of head h, 3 vectors of 16 rows per step;
// DH > 0 fixes the head dimension at compile time.
template <int DH, int QB>
void screen_queries(const Int8BlockTask& t, int64_t qi, ThreadSelections& selections) {
  constexpr int S = kInt8StepRows / kLanes;
  const int64_t words = (DH > 0 ? DH : t.dh) / 4;
  const int8_t* qb[QB];
  const float* qf[QB];
  __m512i bias[QB];
  QueryGroup<QB> g(selections, t.h, qi, t.nh, t.limit, t.rows_in_block, t.base_row);
  __mmask8 valid = 0;
  for (int b = 0; b < QB; ++b) {
    qb[b] = t.int8->query(t.h, qi + b);
    qf[b] = t.queries + ((qi + b) * t.nh + t.h) * t.dh;
    bias[b] = _mm512_set1_epi32(t.int8->bias[t.h * t.nq + qi + b]);
    valid |= (g.n_valid[b] > 0) << b;
  }
  int32_t top_t[8], last_t[8];
  // The floors are stored back before the thresholds are read from them, and after every move.
  auto refresh = [&] {
    g.store(selections, t.h, qi);
    int8_thresholds(*t.int8, t.h, qi, t.slice, selections.top_floors(t.h), selections.last_floors(t.h), valid, top_t, last_t);
  };
  refresh();
  for (int64_t r0 = 0; r0 < g.n_max; r0 += kLanes * S) {
    const uint32_t* x_at = t.slice.words + r0;
    __m512i acc[QB][S];
    for (int b = 0; b < QB; ++b)
      for (int s = 0; s < S; ++s) acc[b][s] = bias[b];
#pragma GCC unroll 32
    for (int64_t g = 0; g < words; ++g) {
      __m512i x[S];
      for (int s = 0; s < S; ++s) x[s] = _mm512_loadu_si512(x_at + g * t.stride + s * kLanes);
      for (int b = 0; b < QB; ++b) {
        int32_t qword;
        std::memcpy(&qword, qb[b] + 4 * g, 4);
        const __m512i qv = _mm512_set1_epi32(qword);
        for (int s = 0; s < S; ++s) acc[b][s] = _mm512_dpbusd_epi32(acc[b][s], x[s], qv);
      }
    }
    // Hot path: lanes below both thresholds' reach clear no bit of `none`.
    __mmask16 none = 0xFFFF;
    for (int b = 0; b < QB; ++b) {
      for (int s = 0; s < S; ++s) {
        none = _mm512_mask_cmplt_epi32_mask(none, acc[b][s], _mm512_set1_epi32(top_t[b]));
        none = _mm512_mask_cmpgt_epi32_mask(none, acc[b][s], _mm512_set1_epi32(last_t[b]));
      }
    }
    if (__builtin_expect(none == 0xFFFF, 1)) continue;
    bool offered = false;
    for (int b = 0; b < QB; ++b) {
      for (int s = 0; s < S; ++s) {
        const int64_t first = r0 + s * kLanes;
        uint32_t pass = _mm512_cmpge_epi32_mask(acc[b][s], _mm512_set1_epi32(top_t[b])) |
                        _mm512_cmple_epi32_mask(acc[b][s], _mm512_set1_epi32(last_t[b]));
        for (; pass; pass &= pass - 1) {
          const int64_t local = first + __builtin_ctz(pass);
          if (local >= g.n_valid[b]) break;
          const float score = rescore(qf[b], t.rows + local * t.d + t.h * t.dh, t.dh);
          offered |= offer_score(score, t.base_row + local, g.top[b], g.last[b], g.top_floor[b], g.last_floor[b]);
        }
      }
    }
    if (offered) refresh();
  }
}

template <int DH>
void screen_block(const Int8BlockTask& t, ThreadSelections& selections) {
  int64_t qi = 0;
  for (; qi + 8 <= t.nq; qi += 8, t.prefetch->step()) screen_queries<DH, 8>(t, qi, selections);
  for (; qi < t.nq; ++qi, t.prefetch->step()) screen_queries<DH, 1>(t, qi, selections);
}

using ScreenFn = void (*)(const Int8BlockTask&, ThreadSelections&);
ScreenFn pick_screen(int64_t dh) {
  switch (dh) {
    case 64: return screen_block<64>;
    case 128: return screen_block<128>;
    default: return screen_block<0>;
  }
}

// The screen as history_topk_merge drives it (see Fp32RowScan).
class Int8RowScreen {
 public:
  explicit Int8RowScreen(const ScanQueries& q) : q_(q), int8_(q.queries, q.nq, q.nh, q.dh), screen_(pick_screen(q.dh)) {}

  static int64_t block_rows(int64_t /*dh*/) { return kInt8BlockRows; }
  // Prefetch steps per block: the tile groups of 8 queries, per head.
  int64_t steps_per_block() const { return q_.nh * ((q_.nq + 7) / 8); }

  // A thread's block as fp32 rows [rows, D] (for the rescoring) and as int8 words [H][Dh / 4][stride]
  // (one spare cache line per word-column, as in Fp32RowScan).
  struct Buffers {
    explicit Buffers(const Int8RowScreen& screen)
        : stride(kInt8BlockRows + kLanes), rows(kInt8BlockRows * screen.q_.nh * screen.q_.dh),
          words(screen.q_.nh * screen.q_.dh / 4 * stride), slices(screen.q_.nh) {}
    int64_t stride;
    std::vector<float> rows;
    std::vector<uint32_t> words;
    std::vector<Int8Slice> slices;
  };

  // Screens rows [0, n) of a block (global rows base_row ...) against every query head; false, before
  // any is scored, if the block holds a NaN or Inf.
  template <typename T>
  bool score_block(const T* rows, int64_t n, int64_t base_row, Buffers& buf, ThreadSelections& selections,
                   NextBlockPrefetch* prefetch) const {
    if (!load_int8_block(rows, n, q_.nh, q_.dh, buf.stride, buf.rows.data(), buf.words.data(), buf.slices.data())) {
      return false;
    }
    const int64_t d = q_.nh * q_.dh;
    for (int64_t h = 0; h < q_.nh; ++h) {
      screen_({buf.slices[h], buf.stride, buf.rows.data(), d, n, base_row, q_.queries, &int8_, q_.limit, q_.nq, q_.nh,
               h, q_.dh, prefetch},
              selections);
    }
    return true;
  }

 private:
  ScanQueries q_;
  Int8Queries int8_;
  ScreenFn screen_;
};
#endif

}  // namespace
}  // namespace metaclm::topk
