// Int8 screening for heads of 64k dimensions (the paper's FFN histories). VPDPBUSD multiplies 64 byte
// pairs per instruction where an FMA multiplies 16 floats: on Ice Lake one VPDPBUSD issues per cycle
// against two FMAs, twice the multiply-adds. Scores computed in int8 are only
// approximate, so they screen: each block of rows and each query is scaled to int8 (per head, by its
// largest magnitude), the scan computes every approximate score exactly in int32, and a row whose
// approximation is within a proven error bound E of a floor is scored again in fp32 and offered. So
// the selections are the same as an fp32 scan's: every row the fp32 score would let in is rescored.
//
// Error bound E, with x = s_x x~ + dx (|dx| <= 0.5001 s_x, rounding of x / s_x), q = s_q q~ + dq:
//   |q.x - s_q s_x q~.x~| <= s_x * 0.5001 s_q |q~|_1 + min(max|x| |dq|_1, max|x|_2 |dq|_2),
// plus the fp32 rescore's own rounding, at most dh 2^-23 times the same min with q for dq (max over
// the block's rows). A row may pass only if q~.x~ >= (top floor - E) / (s_q s_x) or
// <= (last floor + E) / (s_q s_x): integer thresholds, so the hot loop is VPDPBUSD and integer
// compares only. Once the selections are full few rows come within E of a floor, so few are rescored;
// tests/test_ops.py builds a row that errs by nearly E.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "isa.h"

namespace metaclm::topk {
namespace {  // internal linkage: parts of history_topk.cpp (see there)

constexpr int64_t kInt8MaxDh = 65536;  // heads the screen takes: q~.x~ stays below kNeverPasses

#if METACLM_INT8_SCREEN
constexpr int32_t kNeverPasses = 1 << 30;  // beyond any |q~.x~| (dh * 127 * 127 < 2^30 for dh < 66,000)

// Each query's head scaled to int8, [H][Q][Dh] bytes, and per (head, query) what its thresholds need,
// in [H][Q] arrays so that 8 adjacent queries are one vector of doubles.
struct Int8Queries {
  std::vector<int8_t> bytes;
  std::vector<double> inv_s_q;    // 1 / s_q; 0 for a zero query
  std::vector<double> row_term;   // 0.5001 s_q |q~|_1: times s_x, the rows' rounding
  std::vector<double> max_term;   // |dq|_1 + dh 2^-23 |q|_1: times max|x|, the query's rounding and fp32
  std::vector<double> norm_term;  // |dq|_2 + dh 2^-23 |q|_2: the same times max |x|_2 (Cauchy-Schwarz)
  std::vector<int32_t> bias;      // -128 sum q~: VPDPBUSD multiplies x~ + 128 (unsigned bytes)
  int64_t nq, dh;
  Int8Queries(const float* queries, int64_t nq, int64_t nh, int64_t dh)
      : bytes(nh * nq * dh), inv_s_q(nh * nq), row_term(nh * nq), max_term(nh * nq), norm_term(nh * nq), bias(nh * nq), nq(nq), dh(dh) {
    const double fp32_error = dh * 0x1p-23;
    for (int64_t h = 0; h < nh; ++h) {
      for (int64_t q = 0; q < nq; ++q) {
        const float* v = queries + (q * nh + h) * dh;
        double q_max = 0;
        for (int64_t j = 0; j < dh; ++j) q_max = std::max(q_max, std::fabs(static_cast<double>(v[j])));
        const double s_q = q_max / 127;
        int8_t* out = bytes.data() + (h * nq + q) * dh;
        double l1 = 0, dq1 = 0, dq2 = 0, q1 = 0, q2 = 0;
        int32_t sum = 0;
        for (int64_t j = 0; j < dh; ++j) {
          const double x = v[j];
          const int32_t b = q_max > 0 ? static_cast<int32_t>(std::clamp(std::nearbyint(x / s_q), -127.0, 127.0)) : 0;
          out[j] = static_cast<int8_t>(b);
          sum += b;
          l1 += std::abs(b);
          dq1 += std::fabs(x - s_q * b);
          dq2 += (x - s_q * b) * (x - s_q * b);
          q1 += std::fabs(x);
          q2 += x * x;
        }
        const int64_t i = h * nq + q;
        inv_s_q[i] = q_max > 0 ? 1 / s_q : 0;
        row_term[i] = 0.5001 * s_q * l1;
        max_term[i] = (dq1 + fp32_error * q1) * (1 + 1e-9);
        norm_term[i] = (std::sqrt(dq2) + fp32_error * std::sqrt(q2)) * (1 + 1e-9);
        bias[i] = -128 * sum;
      }
    }
  }
  const int8_t* query(int64_t h, int64_t q) const { return bytes.data() + (h * nq + q) * dh; }
};

// A block's head h in int8: x~ + 128 as unsigned bytes, four dimensions per 32-bit word laid out
// [Dh / 4][stride] (16 rows of one word are one vector); its scale s_x, largest magnitude and
// largest row norm.
struct Int8Slice {
  uint32_t* words;
  float s_x, x_max, x_norm;
};

// Thresholds on q~.x~ of queries qi .. qi+7 of head h against one block: a row may pass only if
// q~.x~ >= top[b] or <= last[b]. Lanes outside `valid` (no valid row in the block) get thresholds
// nothing reaches. Where the query or the block is zero every score is exactly 0, and so is q~.x~.
inline void int8_thresholds(const Int8Queries& iq, int64_t h, int64_t qi, const Int8Slice& x, const float* top_floors,
                            const float* last_floors, __mmask8 valid, int32_t* top, int32_t* last) {
  const __m512d never = _mm512_set1_pd(kNeverPasses), zero = _mm512_setzero_pd();
  const int64_t i = h * iq.nq + qi;
  const __m512d top_floor = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(valid, top_floors + qi));
  const __m512d last_floor = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(valid, last_floors + qi));
  const __m512d inv_s_q = _mm512_maskz_loadu_pd(valid, iq.inv_s_q.data() + i);
  const __m512d e = _mm512_mul_pd(
      _mm512_fmadd_pd(_mm512_set1_pd(x.s_x), _mm512_maskz_loadu_pd(valid, iq.row_term.data() + i),
                      _mm512_min_pd(_mm512_mul_pd(_mm512_set1_pd(x.x_max), _mm512_maskz_loadu_pd(valid, iq.max_term.data() + i)),
                                    _mm512_mul_pd(_mm512_set1_pd(x.x_norm), _mm512_maskz_loadu_pd(valid, iq.norm_term.data() + i)))),
      _mm512_set1_pd(1 + 1e-6));
  const __m512d inv = _mm512_mul_pd(inv_s_q, _mm512_set1_pd(x.s_x > 0 ? 1 / static_cast<double>(x.s_x) : 0));
  const __m512d lo = _mm512_sub_pd(_mm512_floor_pd(_mm512_mul_pd(_mm512_sub_pd(top_floor, e), inv)), _mm512_set1_pd(1));
  const __m512d hi = _mm512_add_pd(_mm512_ceil_pd(_mm512_mul_pd(_mm512_add_pd(last_floor, e), inv)), _mm512_set1_pd(1));
  __m512d top_t = _mm512_max_pd(_mm512_min_pd(lo, never), -never);  // +-inf floors clamp
  __m512d last_t = _mm512_max_pd(_mm512_min_pd(hi, never), -never);
  const __mmask8 exact = _mm512_cmp_pd_mask(inv, zero, _CMP_EQ_OQ);
  top_t = _mm512_mask_blend_pd(exact, top_t, _mm512_mask_blend_pd(_mm512_cmp_pd_mask(top_floor, zero, _CMP_LE_OQ), never, -never));
  last_t = _mm512_mask_blend_pd(exact, last_t, _mm512_mask_blend_pd(_mm512_cmp_pd_mask(last_floor, zero, _CMP_GE_OQ), -never, never));
  top_t = _mm512_mask_blend_pd(valid, never, top_t);
  last_t = _mm512_mask_blend_pd(valid, -never, last_t);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(top), _mm512_cvtpd_epi32(top_t));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(last), _mm512_cvtpd_epi32(last_t));
}
#endif

}  // namespace
}  // namespace metaclm::topk
