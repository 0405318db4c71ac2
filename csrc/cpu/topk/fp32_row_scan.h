// The fp32 row-vector scan of history_topk, for heads of any dimension: the block is transposed to
// [D][rows] so that 16 rows of one head are one vector; a register tile is 8 queries x 2 row vectors
// (Dh < 32), 6 x 4 (Dh 32 to 63) or 8 x 3 (Dh >= 64). Each tile is compared with the current k-th best
// keys (floors) of its queries; only tiles that may hold a candidate (rare once the selections are full)
// take the scalar path into the selections. Portable: GCC vector extensions, AVX-512 where built for.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../row_readers.h"
#include "blocks.h"
#include "selection.h"

namespace metaclm::topk {
namespace {  // internal linkage: parts of history_topk.cpp (see there)

constexpr int64_t kMaxSubBlocks = 4;  // a scan step covers up to 4 vectors of rows
constexpr int64_t kStep = kLanes * kMaxSubBlocks;  // blocks are padded to whole steps
constexpr int64_t kMaxBlockRows = 512;  // multiple of kStep
constexpr int64_t kSliceFloats = 4096;  // a head slice of a block stays within 16 KB (L1)

typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));
// The same vector read from any float address: one unaligned vector load. (A memcpy into a vfloat is
// not: GCC tuned for Ice Lake prefers 256-bit moves, copies it in two halves through the stack, and
// the 512-bit reload then stalls on store forwarding.)
typedef float vfloat_unaligned __attribute__((vector_size(kLanes * sizeof(float)), aligned(4), may_alias));
inline vfloat load_vfloat(const float* p) { return *reinterpret_cast<const vfloat_unaligned*>(p); }

// Rows per block for head dimension dh: as many as keep one head's slice in L1, a multiple of kStep;
// for heads of 64 or more, 48 rows (one step of the 8 x 3 tile; the slice, padded to 64 rows, is 32 KB
// at dh = 128 where 64 rows made 40 KB, which the queries streaming past pushed out of L1).
inline int64_t block_rows_for(int64_t dh) {
  if (dh >= 64) return kLanes * 3;
  return std::max(kStep, std::min(kMaxBlockRows, kSliceFloats / dh / kStep * kStep));
}

// Bit i set if lane i of acc may enter a selection: acc >= top_floor or acc <= last_floor (>= and <=,
// not > and <: a tie with the floor may still win on its row number).
inline uint32_t pass_mask(vfloat acc, float top_floor, float last_floor) {
#if defined(__AVX512F__)
  const __m512 a = reinterpret_cast<__m512>(acc);
  return _mm512_cmp_ps_mask(a, _mm512_set1_ps(top_floor), _CMP_GE_OQ) |
         _mm512_cmp_ps_mask(a, _mm512_set1_ps(last_floor), _CMP_LE_OQ);
#else
  const vint pass = (acc >= top_floor) | (acc <= last_floor);
  uint32_t bits = 0;
  for (int64_t i = 0; i < kLanes; ++i) bits |= static_cast<uint32_t>(pass[i] != 0) << i;
  return bits;
#endif
}

// Converts rows [0, n) of a [n, D] block to fp32 laid out as [D][stride], zero-padding the tail to
// a multiple of kStep. Returns false if the block holds a NaN or Inf (x - x is then NaN).
template <typename T>
bool load_block(const T* rows, int64_t n, int64_t d, int64_t stride, float* out) {
  int64_t r = 0;
#if defined(__AVX512F__)
  if (d % 16 == 0) {  // 16 x 16 tiles: vector convert, register transpose, vector stores
    __m512i lo[4], hi[4];
    for (int s = 0; s < 4; ++s) {
      lo[s] = _mm512_load_si512(kTransposeIndex.lo[s]);
      hi[s] = _mm512_load_si512(kTransposeIndex.hi[s]);
    }
    for (; r + 16 <= n; r += 16) {
      for (int64_t j0 = 0; j0 < d; j0 += 16) {
        __m512 tile[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) tile[i] = load16(rows + (r + i) * d + j0);
        transpose16(tile, lo, hi);
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j) _mm512_storeu_ps(out + (j0 + j) * stride + r, tile[j]);
      }
    }
  }
#endif
  for (; r < n; ++r) {
    const T* row = rows + r * d;
    for (int64_t j = 0; j < d; ++j) out[j * stride + r] = static_cast<float>(row[j]);
  }
  const int64_t padded = (n + kStep - 1) / kStep * kStep;
  vfloat probe = {};
  for (int64_t j = 0; j < d; ++j) {
    float* col = out + j * stride;
    std::fill(col + n, col + padded, 0.f);
    for (int64_t r = 0; r < padded; r += kLanes) {
      const vfloat x = load_vfloat(col + r);
      probe += x - x;
    }
  }
  for (int64_t i = 0; i < kLanes; ++i)
    if (probe[i] != 0.f) return false;
  return true;
}

// What one block of rows is scored against: every query's head h.
struct BlockTask {
  const float* slice;    // [Dh][stride] fp32 rows of head h
  int64_t stride;        // floats between consecutive dimensions of the slice
  int64_t rows;          // rows in the block
  int64_t base_row;      // global row number of the block's first row
  const float* queries;  // [Q, H, Dh]
  const int64_t* limit;  // [Q]
  int64_t nq, nh, h, dh;
  NextBlockPrefetch* prefetch;
};

// Offers the lanes of one score vector (rows first .. first+15 of the block) that pass the floors.
__attribute__((noinline)) void offer_lanes(vfloat acc, int64_t first, int64_t n_valid, int64_t base_row,
                                           LocalTopK& top, LocalTopK& last, float& top_floor, float& last_floor) {
  uint32_t pass = pass_mask(acc, top_floor, last_floor);
  while (pass) {
    const int lane = __builtin_ctz(pass);
    pass &= pass - 1;
    if (first + lane >= n_valid) break;
    offer_score(acc[lane], base_row + first + lane, top, last, top_floor, last_floor);
  }
}

// Scores the block against QB queries (qi .. qi+QB-1) of head h at once, S vectors of 16 rows per step,
// so each history vector loaded feeds QB FMAs and each query value S, and offers the candidates to their selections. DH > 0 fixes the head dimension
// at compile time (fully unrolled); 0 means the runtime task.dh.
template <int DH, int QB, int S>
void scan_queries(const BlockTask& t, int64_t qi, ThreadSelections& selections) {
  const int64_t dh = DH > 0 ? DH : t.dh;
  const float* q[QB];
  for (int b = 0; b < QB; ++b) q[b] = t.queries + ((qi + b) * t.nh + t.h) * dh;
  QueryGroup<QB> g(selections, t.h, qi, t.nh, t.limit, t.rows, t.base_row);
  for (int64_t r0 = 0; r0 < g.n_max; r0 += kLanes * S) {
    const float* x_at = t.slice + r0;
    vfloat acc[QB][S];
    {  // the first dimension multiplies, so the accumulators need no zeroing
      vfloat x[S];
      for (int64_t s = 0; s < S; ++s) x[s] = load_vfloat(x_at + s * kLanes);
      for (int b = 0; b < QB; ++b) {
        for (int64_t s = 0; s < S; ++s) acc[b][s] = x[s] * q[b][0];
      }
    }
#pragma GCC unroll 16
    for (int64_t j = 1; j < dh; ++j) {
      vfloat x[S];
      for (int64_t s = 0; s < S; ++s) x[s] = load_vfloat(x_at + j * t.stride + s * kLanes);
      for (int b = 0; b < QB; ++b) {
        const float qj = q[b][j];
        for (int64_t s = 0; s < S; ++s) acc[b][s] += x[s] * qj;
      }
    }
    // Hot path: only compare; the rare passing vectors go to the selections outside the unrolled loop.
    uint32_t pass[QB][S];
    uint32_t any = 0;
    for (int b = 0; b < QB; ++b) {
      for (int64_t s = 0; s < S; ++s) {
        pass[b][s] = pass_mask(acc[b][s], g.top_floor[b], g.last_floor[b]);
        any |= pass[b][s];
      }
    }
    if (__builtin_expect(any != 0, 0)) {
      for (int b = 0; b < QB; ++b) {
        for (int64_t s = 0; s < S; ++s) {
          if (pass[b][s]) offer_lanes(acc[b][s], r0 + s * kLanes, g.n_valid[b], t.base_row, g.top[b], g.last[b], g.top_floor[b], g.last_floor[b]);
        }
      }
    }
  }
  g.store(selections, t.h, qi);
}

// Scores the block against every query of head h, with the register tile that suits the head on a
// core with one 512-bit load per cycle: 8 queries x 2 row vectors for short heads (where the
// per-vector compares weigh), 6 x 4 for heads of 32 to 63, and 8 x 3 over 48-row blocks for heads of
// 64 or more (timings in the commit history and benchmarks/results/cpu.json).
template <int DH>
void scan_block(const BlockTask& t, ThreadSelections& selections) {
  const int64_t dh = DH > 0 ? DH : t.dh;
  int64_t qi = 0;
  if (dh >= 64) {
    for (; qi + 8 <= t.nq; qi += 8, t.prefetch->step()) scan_queries<DH, 8, 3>(t, qi, selections);
    for (; qi < t.nq; ++qi, t.prefetch->step()) scan_queries<DH, 1, 3>(t, qi, selections);
  } else if (dh >= 32) {
    for (; qi + 6 <= t.nq; qi += 6, t.prefetch->step()) scan_queries<DH, 6, 4>(t, qi, selections);
    for (; qi < t.nq; ++qi, t.prefetch->step()) scan_queries<DH, 1, 4>(t, qi, selections);
  } else {
    for (; qi + 8 <= t.nq; qi += 8, t.prefetch->step()) scan_queries<DH, 8, 2>(t, qi, selections);
    for (; qi < t.nq; ++qi, t.prefetch->step()) scan_queries<DH, 1, 2>(t, qi, selections);
  }
}

using ScanFn = void (*)(const BlockTask&, ThreadSelections&);

ScanFn pick_scan(int64_t dh) {
  switch (dh) {
    case 8: return scan_block<8>;
    case 16: return scan_block<16>;
    case 32: return scan_block<32>;
    case 64: return scan_block<64>;
    case 128: return scan_block<128>;
    default: return scan_block<0>;
  }
}

// The scan as history_topk_merge drives it: blocks of block_rows() rows, each loaded by one thread
// into its Buffers and scored against every query head.
class Fp32RowScan {
 public:
  explicit Fp32RowScan(const ScanQueries& q) : q_(q), scan_(pick_scan(q.dh)) {}

  static int64_t block_rows(int64_t dh) { return block_rows_for(dh); }
  // Prefetch steps per block: the tile groups of 8 (or 6) queries, per head.
  int64_t steps_per_block() const { return q_.nh * ((q_.nq + 7) / 8); }

  // A thread's block as fp32 [D][stride]. One spare cache line per dimension: a power-of-two stride
  // would map them all to the same few cache sets, where the transposing stores evict each other.
  struct Buffers {
    explicit Buffers(const Fp32RowScan& scan)
        : stride(block_rows(scan.q_.dh) + kLanes), block(scan.q_.nh * scan.q_.dh * stride) {}
    int64_t stride;
    std::vector<float> block;
  };

  // Scores rows [0, n) of a block (global rows base_row ...) against every query head; false, before
  // any is scored, if the block holds a NaN or Inf.
  template <typename T>
  bool score_block(const T* rows, int64_t n, int64_t base_row, Buffers& buf, ThreadSelections& selections,
                   NextBlockPrefetch* prefetch) const {
    if (!load_block(rows, n, q_.nh * q_.dh, buf.stride, buf.block.data())) return false;
    for (int64_t h = 0; h < q_.nh; ++h) {
      scan_({buf.block.data() + h * q_.dh * buf.stride, buf.stride, n, base_row, q_.queries, q_.limit, q_.nq, q_.nh, h,
             q_.dh, prefetch},
            selections);
    }
    return true;
  }

 private:
  ScanQueries q_;
  ScanFn scan_;
};

}  // namespace
}  // namespace metaclm::topk
