// CPU kernel of history_topk: scores of history rows against every (query, head), fused with the
// selection of the top-k and last-k rows, so the [Q, N] score matrix never exists.
//
// Rows are taken in blocks, converted once to fp32 (checking for NaN/Inf on the way), and scored in
// register tiles, in one of two layouts:
// * query vectors (heads of 8 dimensions, the paper's attention heads): 16 queries of one head are
//   one vector, each history value is broadcast, a tile is 2 query vectors x 4 rows;
// * row vectors (any other head dimension): the block is transposed to [D][rows] so that 16 rows of
//   one head are one vector; a tile is 8 queries x 2 row vectors (Dh < 32), 6 x 4 (Dh 32 to 63)
//   or 8 x 3 (Dh >= 64).
// Each tile is compared with the current k-th best keys (floors) of its queries; only tiles that may
// hold a candidate (rare once the selections are full) take the scalar path into the selections.
// Heads of 64k dimensions (the paper's FFN histories) are instead screened by exact int8 scores
// (VPDPBUSD) against floors widened by a proven error bound, and the few rows that pass are scored
// again in fp32 (see Int8Queries); this needs AVX-512 VNNI, else they take the row-vector scan.
// Threads split the rows, keep private selections seeded with the incoming state's floors, and merge
// them into the state's heaps at the end under the total order (key desc, row asc), so the result
// depends neither on the number of threads nor on the chunking.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <mutex>
#include <optional>

#include "../common/checks.h"
#include "row_readers.h"

// The query-vector scan (heads of 8 dimensions) needs AVX-512 F and DQ; without them every head
// takes the row-vector scan.
#if defined(__AVX512F__) && defined(__AVX512DQ__)
#define METACLM_QUERY_VECTOR_SCAN 1
#else
#define METACLM_QUERY_VECTOR_SCAN 0
#endif
// The int8 screen (heads of 64k dimensions) needs AVX-512 VNNI and BW; without them such heads take the
// fp32 row-vector scan.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define METACLM_INT8_SCREEN 1
#else
#define METACLM_INT8_SCREEN 0
#endif

namespace metaclm {
namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kMaxSubBlocks = 4;  // a scan step covers up to 4 vectors of rows
constexpr int64_t kStep = kLanes * kMaxSubBlocks;  // blocks are padded to whole steps
constexpr int64_t kMaxBlockRows = 512;  // multiple of kStep
constexpr int64_t kSliceFloats = 4096;  // a head slice of a block stays within 16 KB (L1)
constexpr int64_t kPadIndex = std::numeric_limits<int64_t>::max();

typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));
// The same vector read from any float address: one unaligned vector load. (A memcpy into a vfloat is
// not: GCC tuned for Ice Lake prefers 256-bit moves, copies it in two halves through the stack, and
// the 512-bit reload then stalls on store forwarding; measured 4x slower on a 2-core Xeon.)
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

inline bool better(float av, int64_t ai, float bv, int64_t bi) { return av > bv || (av == bv && ai < bi); }

// A k-entry heap whose root is the worst kept entry; keys and indices in two parallel arrays.
struct Heap {
  float* key;
  int64_t* index;
  int64_t k;

  // Replaces the root if (v, i) is better than it. Returns true if it did.
  bool offer(float v, int64_t i) {
    if (!better(v, i, key[0], index[0])) return false;
    int64_t pos = 0;
    for (;;) {
      int64_t child = 2 * pos + 1;
      if (child >= k) break;
      if (child + 1 < k && better(key[child], index[child], key[child + 1], index[child + 1])) ++child;
      if (!better(v, i, key[child], index[child])) break;  // the worse child is worse than v: stop
      key[pos] = key[child];
      index[pos] = index[child];
      pos = child;
    }
    key[pos] = v;
    index[pos] = i;
    return true;
  }
};

// A thread's private selection of the k best (key, index) pairs, worst_key() the key a candidate must
// reach. For k <= kSortedMaxK a list sorted best first: a candidate enters at the back and shifts past
// the few entries it beats (most enter just above the worst), which measured cheaper than a heap's
// sift-down with its unpredictable branches. For larger k, a heap.
constexpr int64_t kSortedMaxK = 32;

struct LocalTopK {
  float* key;
  int64_t* index;
  int64_t k;

  bool offer(float v, int64_t i) {
    if (k > kSortedMaxK) return Heap{key, index, k}.offer(v, i);
    if (!better(v, i, key[k - 1], index[k - 1])) return false;
    int64_t pos = k - 1;
    for (; pos > 0 && better(v, i, key[pos - 1], index[pos - 1]); --pos) {
      key[pos] = key[pos - 1];
      index[pos] = index[pos - 1];
    }
    key[pos] = v;
    index[pos] = i;
    return true;
  }
  float worst_key() const { return k > kSortedMaxK ? key[0] : key[k - 1]; }
};

// Private selections of one thread: [QH, k] keys and indices for top and last. They start full of
// placeholders (index kPadIndex) at the worst key of the heaps passed in, so a row that cannot beat
// the state of earlier chunks is never offered (without them every chunk and every thread would
// refill its selections from -inf). Placeholders are skipped when the thread's selections are merged.
// The floors (top worst key, -last worst key) sit together in a small [H][2][padded Q] array, so a scan
// reads adjacent floors (16 queries' floors are one vector) rather than lists scattered over megabytes.
// Queries past nq (padding of the last vector of queries) get floors no score reaches.
struct ThreadSelections {
  // Each selection is one slot of whole cache lines, k indices then k keys: for k <= 10 two lines,
  // which the two prefetches of an offer (below) cover.
  std::vector<int64_t> storage;
  int64_t* slots;           // 64-byte aligned start of slot 0
  int64_t slot_words;       // int64 words per slot
  std::vector<float> floors;
  int64_t nh, k, padded_nq;
  ThreadSelections(int64_t nq, int64_t nh, int64_t k, const float* in_top_key, const float* in_last_key)
      : slot_words((k * 12 + 63) / 64 * 8), nh(nh), k(k), padded_nq((nq + kLanes - 1) / kLanes * kLanes) {
    storage.resize(2 * nq * nh * slot_words + 8);
    slots = storage.data() + (8 - reinterpret_cast<uintptr_t>(storage.data()) / 8 % 8) % 8;
    floors.resize(2 * nh * padded_nq);
    for (int64_t h = 0; h < nh; ++h) {
      std::fill_n(top_floors(h), padded_nq, std::numeric_limits<float>::infinity());
      std::fill_n(last_floors(h), padded_nq, -std::numeric_limits<float>::infinity());
    }
    for (int64_t q = 0; q < nq; ++q) {
      for (int64_t h = 0; h < nh; ++h) {
        const int64_t j = q * nh + h;
        for (auto [sel, in_key] : {std::pair{top(j), in_top_key}, std::pair{last(j), in_last_key}}) {
          std::fill_n(sel.key, k, in_key[j * k]);  // [0] is a heap's worst entry
          std::fill_n(sel.index, k, kPadIndex);
        }
        top_floors(h)[q] = in_top_key[j * k];
        last_floors(h)[q] = -in_last_key[j * k];
      }
    }
  }
  LocalTopK slot(int64_t i) {
    int64_t* base = slots + i * slot_words;
    return {reinterpret_cast<float*>(base + k), base, k};
  }
  LocalTopK top(int64_t qh) { return slot(2 * qh); }
  LocalTopK last(int64_t qh) { return slot(2 * qh + 1); }
  float* top_floors(int64_t h) { return floors.data() + 2 * h * padded_nq; }   // [padded Q] of head h
  float* last_floors(int64_t h) { return floors.data() + (2 * h + 1) * padded_nq; }

  // Offers of the query-vector scan wait in a short queue, their selection's lines prefetched when
  // queued, so an offer applied kOfferDelay offers later finds them in cache instead of stalling on a
  // miss (the selections of thousands of queries span megabytes; measured about 10% faster at
  // Q = 3600, H = 8, 100k rows). A floor then lags its selection by the few offers queued, which only
  // lets a few more candidates through to the exact check. flush() before reading the selections.
  static constexpr int kOfferDelay = 8;
  struct Offer {
    float key;  // the score for top, its negation for last
    int32_t q, h;
    bool last;
    int64_t row;
  };
  Offer queued[kOfferDelay];
  int n_queued = 0;

  void offer(int64_t q, int64_t h, bool last, float key, int64_t row) {
    const int64_t* slot_start = slots + (2 * (q * nh + h) + last) * slot_words;
    __builtin_prefetch(slot_start);
    __builtin_prefetch(slot_start + slot_words - 1);
    Offer& entry = queued[n_queued < kOfferDelay ? n_queued++ : apply_oldest()];
    entry = {key, static_cast<int32_t>(q), static_cast<int32_t>(h), last, row};
  }
  void flush() {
    for (int i = 0; i < n_queued; ++i) apply(queued[i]);
    n_queued = oldest = 0;
  }

 private:
  int oldest = 0;
  // Applies the oldest queued offer and returns its place for the new one.
  int apply_oldest() {
    const int at = oldest;
    apply(queued[at]);
    oldest = (oldest + 1) % kOfferDelay;
    return at;
  }
  void apply(const Offer& o) {
    LocalTopK sel = slot(2 * (o.q * nh + o.h) + o.last);
    if (!sel.offer(o.key, o.row)) return;
    if (o.last) last_floors(o.h)[o.q] = -sel.worst_key();
    else top_floors(o.h)[o.q] = sel.worst_key();
  }
};

#if defined(__AVX512F__)
// Permute indices for transpose16: at stage s (block size b = 8 >> s), lo picks row i's own columns
// without bit b and row i+b's columns shifted down by b; hi the converse.
struct TransposeIndex {
  alignas(64) int32_t lo[4][16], hi[4][16];
  TransposeIndex() {
    for (int s = 0, b = 8; s < 4; ++s, b >>= 1) {
      for (int c = 0; c < 16; ++c) {
        lo[s][c] = (c & b) ? 16 + c - b : c;
        hi[s][c] = (c & b) ? 16 + c : c + b;
      }
    }
  }
};
const TransposeIndex kTransposeIndex;

// In-place transpose of a 16x16 fp32 tile held as 16 rows: swap the off-diagonal b x b blocks for
// b = 8, 4, 2, 1 (each swap is two two-source permutes per row pair).
__attribute__((always_inline)) inline void transpose16(__m512 (&r)[16], const __m512i (&lo)[4], const __m512i (&hi)[4]) {
#pragma GCC unroll 4
  for (int s = 0; s < 4; ++s) {
    const int b = 8 >> s;
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      if (i & b) continue;
      const __m512 top = r[i], bottom = r[i + b];
      r[i] = _mm512_permutex2var_ps(top, lo[s], bottom);
      r[i + b] = _mm512_permutex2var_ps(top, hi[s], bottom);
    }
  }
}
#endif

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

// Pulls the thread's next block of rows into L2 a few lines per step while the current block is scored
// (a step: one tile group of the scan), so loading it afterwards reads from cache rather than waiting
// on memory: a core streams rows far slower than it scores them in cache.
class NextBlockPrefetch {
 public:
  void start(const void* next, int64_t bytes, int64_t steps) {
    at_ = static_cast<const char*>(next);
    end_ = at_ + (next ? bytes : 0);
    per_step_ = ((bytes + 63) / 64 + steps - 1) / std::max<int64_t>(steps, 1) * 64;
  }
  void step() {
    const char* stop = std::min(end_, at_ + per_step_);
    for (; at_ < stop; at_ += 64) __builtin_prefetch(at_, 0, 2);  // prefetcht1: into L2
  }

 private:
  const char* at_ = nullptr;
  const char* end_ = nullptr;
  int64_t per_step_ = 0;
};

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

// Offers one exact score of `row` to a query's top and last selections; returns true if a floor moved.
inline bool offer_score(float score, int64_t row, LocalTopK& top, LocalTopK& last, float& top_floor, float& last_floor) {
  bool moved = false;
  if (score >= top_floor && top.offer(score, row)) top_floor = top.worst_key(), moved = true;  // the floors
  if (score <= last_floor && last.offer(-score, row)) last_floor = -last.worst_key(), moved = true;  // first: spare a miss
  return moved;
}

// The selections of queries qi .. qi+QB-1 of head h while a scan of the row-vector layout passes one
// block: their lists, local copies of their floors (store() writes them back), and how many of the
// block's rows each may take (its limit can cut the block).
template <int QB>
struct QueryGroup {
  LocalTopK top[QB], last[QB];
  float top_floor[QB], last_floor[QB];
  int64_t n_valid[QB];
  int64_t n_max = 0;  // rows of the block below some query's limit
  QueryGroup(ThreadSelections& selections, int64_t h, int64_t qi, int64_t nh, const int64_t* limit, int64_t rows,
             int64_t base_row) {
    for (int b = 0; b < QB; ++b) {
      const int64_t qh = (qi + b) * nh + h;
      top[b] = selections.top(qh);
      last[b] = selections.last(qh);
      top_floor[b] = selections.top_floors(h)[qi + b];
      last_floor[b] = selections.last_floors(h)[qi + b];
      n_valid[b] = std::min(rows, limit[qi + b] - base_row);
      n_max = std::max(n_max, n_valid[b]);
    }
  }
  void store(ThreadSelections& selections, int64_t h, int64_t qi) const {
    for (int b = 0; b < QB; ++b) {
      selections.top_floors(h)[qi + b] = top_floor[b];
      selections.last_floors(h)[qi + b] = last_floor[b];
    }
  }
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

// Scores the block against every query of head h. Register tiles measured on this project's 2-core
// Xeon (AVX-512, one 512-bit load per cycle): 8 queries x 2 row vectors for short heads (where the
// per-vector compares weigh), 6 x 4 for heads of 32 to 63, and 8 x 3 over 48-row blocks for heads of
// 64 or more (D = 128, Q = 200, 1M rows: about 10% faster than 6 x 4 over 64-row blocks, median of
// 10 alternating pairs, fp16 and fp32).
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

constexpr int64_t kInt8StepRows = 3 * kLanes;  // rows of one step of the 8-query x 3-row-vector tile
constexpr int64_t kInt8BlockRows = 2 * kInt8StepRows;

#if METACLM_INT8_SCREEN
// Int8 screening for heads of 64k dimensions (the paper's FFN histories). VPDPBUSD multiplies 64 byte
// pairs per instruction where an FMA multiplies 16 floats: on this project's Ice Lake Xeon one VPDPBUSD
// issues per cycle against two FMAs, twice the multiply-adds. Scores computed in int8 are only
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
// compares only. On 1M Gaussian rows (D = 128, Q = 200, k = 10) 164k of the 200M (query, row) pairs
// were rescored; tests/test_ops.py builds a row that errs by nearly E.
constexpr int32_t kNeverPasses = 1 << 30;  // beyond any |q~.x~| (dh * 127 * 127 < 2^30 for dh < 66,000)
constexpr int64_t kInt8MaxDh = 65536;

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
bool use_int8_screen(int64_t dh) { return dh % 64 == 0 && dh <= kInt8MaxDh; }
#else
bool use_int8_screen(int64_t) { return false; }
#endif

constexpr int64_t kQueryBlockRows = 512;  // rows per block of the query-vector scan (a head's slice: 16 KB)

#if METACLM_QUERY_VECTOR_SCAN
// Query-vector scan, for heads of kQueryDh dimensions. There the roles flip: 16 queries of one head are
// one vector (their dimensions stay in registers for the whole block), each history value is
// broadcast, and one row against 16 queries is one score vector. Rows need no transpose, only
// conversion to fp32 and a split by head. A tile of 2 query vectors x 4 rows keeps 16 query, 8 score
// and up to 4 floor vectors in registers and is tested at once over its rows (scan_until_candidate).
// Measured on this project's 2-core Xeon, 1M rows, 8 heads, Q = 200, fp16, with floors no row
// passes (the scan alone, best of 6): row-vector scan 0.180 s, query vectors tested by extremes
// 0.135 s, by magnitude 0.112 s (119 G multiply-adds/s, about 80% of the FMA units' peak).
constexpr int64_t kQueryDh = 8;
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
// lanes have limit 0).
template <int QV>
__attribute__((noinline)) void offer_query_tile(const QueryBlockTask& t, int64_t v0, int64_t r0,
                                                const float (&scores)[kQueryTileRows][QV][kLanes], ThreadSelections& selections) {
  const float* top_floors = selections.top_floors(t.h);
  const float* last_floors = selections.last_floors(t.h);
  for (int64_t r = 0; r < kQueryTileRows && r0 + r < t.rows; ++r) {
    const int64_t row = t.base_row + r0 + r;
    for (int v = 0; v < QV; ++v) {
      const int64_t lane0 = (v0 + v) * kLanes;
      const int64_t* limit = t.queries->limit.data() + lane0;
      const __m512 score = _mm512_loadu_ps(scores[r][v]);
      for (uint32_t pass = _mm512_cmp_ps_mask(score, _mm512_loadu_ps(top_floors + lane0), _CMP_GE_OQ); pass; pass &= pass - 1) {
        const int lane = __builtin_ctz(pass);
        if (row < limit[lane]) selections.offer(lane0 + lane, t.h, false, scores[r][v][lane], row);
      }
      for (uint32_t pass = _mm512_cmp_ps_mask(score, _mm512_loadu_ps(last_floors + lane0), _CMP_LE_OQ); pass; pass &= pass - 1) {
        const int lane = __builtin_ctz(pass);
        if (row < limit[lane]) selections.offer(lane0 + lane, t.h, true, -scores[r][v][lane], row);
      }
    }
  }
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

#if METACLM_INT8_SCREEN
// The query-vector scan screened in int8, as heads of 64k dimensions are (see Int8Queries): per row
// and head two VPDPBUSD per 16 queries (the row's 8 bytes broadcast as two words) where fp32 takes
// eight FMAs. A tile of 4 rows x 2 query vectors is compared with integer thresholds; a tile that may
// hold a candidate is scored in fp32 exactly as the fp32 scan scores it and offered.

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
  auto refresh = [&] {
    for (int v = 0; v < QV; ++v) query_vector_thresholds(t, sc, v0 + v, live[v], selections, top[v], last[v]);
  };
  refresh();
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
    offer_query_tile<QV>(t, v0, r0, scores, selections);
    refresh();
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
#endif

bool use_query_vectors(int64_t dh) { return dh == kQueryDh; }
#else
bool use_query_vectors(int64_t) { return false; }
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> history_topk_merge_cpu(
    const at::Tensor& queries, const at::Tensor& history, int64_t row_offset, const at::Tensor& limit,
    const at::Tensor& top_keys, const at::Tensor& top_indices, const at::Tensor& last_keys,
    const at::Tensor& last_indices) {
  const int64_t k = check_topk_merge_args(queries, history, limit, top_keys, top_indices, last_keys, last_indices);
  const int64_t nq = queries.size(0), nh = queries.size(1), dh = queries.size(2);
  const int64_t n = history.size(0), d = history.size(1);

  auto q = queries.contiguous();
  auto hist = history.contiguous();
  auto lim = limit.contiguous();
  const auto in_top_keys = top_keys.contiguous(), in_last_keys = last_keys.contiguous();  // read-only: seeds
  auto out_top_keys = in_top_keys.clone();
  auto out_top_indices = top_indices.contiguous().clone();
  auto out_last_keys = in_last_keys.clone();
  auto out_last_indices = last_indices.contiguous().clone();
  const float* qp = q.data_ptr<float>();
  const int64_t* limp = lim.data_ptr<int64_t>();
  const ScanFn scan = pick_scan(dh);
  const int64_t qh = nq * nh;
  // Short heads are scanned with 16 queries per vector, others with 16 rows per vector.
  const bool by_query = use_query_vectors(dh);
#if METACLM_QUERY_VECTOR_SCAN
  std::optional<QueryVectors> query_vectors;
  if (by_query) query_vectors.emplace(qp, limp, nq, nh);
#endif
  // Heads of 64k dimensions, and the query-vector scan, are screened in int8 where the CPU has VNNI.
  const bool int8_screen = !by_query && use_int8_screen(dh);
#if METACLM_INT8_SCREEN
  std::optional<Int8Queries> int8_queries;
  if (int8_screen || by_query) int8_queries.emplace(qp, nq, nh, dh);
  const ScreenFn screen = int8_screen ? pick_screen(dh) : nullptr;
#if METACLM_QUERY_VECTOR_SCAN
  std::optional<QueryWords> query_words;
  if (by_query) query_words.emplace(*int8_queries, nh, query_vectors->padded_nq);
#endif
#endif
  const int64_t block_rows = by_query ? kQueryBlockRows : int8_screen ? kInt8BlockRows : block_rows_for(dh);
  // Prefetch steps per block: the scans' tile groups (at least; row vectors: 6 or 8 queries each).
  const int64_t scan_steps = nh * (by_query ? (nq + 2 * kLanes - 1) / (2 * kLanes) : (nq + 7) / 8);
  std::mutex merge_mutex;
  std::atomic<int64_t> first_bad_block{std::numeric_limits<int64_t>::max()};

  dispatch_history_dtype(hist.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* hp = hist.data_ptr<T>();
    const int64_t blocks = (n + block_rows - 1) / block_rows;
    at::parallel_for(0, blocks, 1, [&](int64_t b_begin, int64_t b_end) {
      ThreadSelections local(nq, nh, k, in_top_keys.const_data_ptr<float>(), in_last_keys.const_data_ptr<float>());
      // One spare cache line per dimension (row-vector scan) or head (query-vector scan): a
      // power-of-two stride would map them all to the same few cache sets (measured: the transposing
      // stores ran 2x slower).
      const int64_t stride = by_query ? block_rows * dh + kLanes : block_rows + kLanes;
      std::vector<float> block(int8_screen ? block_rows * d : (by_query ? nh : d) * stride);
#if METACLM_INT8_SCREEN
      std::vector<uint32_t> head_words(by_query ? kQueryBlockRows * kQueryDh / 4 : 0);  // one head's int8 rows
      std::vector<uint32_t> words(int8_screen ? d / 4 * stride : 0);  // [H][Dh / 4][stride]
      std::vector<Int8Slice> slices(nh);
#endif
      NextBlockPrefetch prefetch;
      for (int64_t b = b_begin; b < b_end; ++b) {
        const int64_t first = b * block_rows;
        const int64_t rows = std::min(block_rows, n - first);
        const int64_t base = row_offset + first;
        const int64_t next_rows = b + 1 < b_end ? std::min(block_rows, n - first - block_rows) : 0;
        prefetch.start(next_rows ? hp + (first + block_rows) * d : nullptr, next_rows * d * sizeof(T), scan_steps);
#if METACLM_QUERY_VECTOR_SCAN
        if (by_query) {
          if (!load_block_by_head(hp + first * d, rows, nh, stride, block.data())) {
            lower_to(first_bad_block, b);  // reported after the loop
            return;
          }
          for (int64_t h = 0; h < nh; ++h) {
            const QueryBlockTask task{block.data() + h * stride, rows, base, &*query_vectors, h, &prefetch};
#if METACLM_INT8_SCREEN
            const int64_t padded = (rows + kQueryTileRows - 1) / kQueryTileRows * kQueryTileRows;
            const QueryScreen sc{&*int8_queries, &*query_words, quantize_head_slice(task.slice, padded, head_words.data())};
            screen_head_by_query(task, sc, local);
#else
            scan_head_by_query(task, local);
#endif
          }
          continue;
        }
#endif
#if METACLM_INT8_SCREEN
        if (int8_screen) {
          if (!load_int8_block(hp + first * d, rows, nh, dh, stride, block.data(), words.data(), slices.data())) {
            lower_to(first_bad_block, b);
            return;
          }
          for (int64_t h = 0; h < nh; ++h) {
            screen({slices[h], stride, block.data(), d, rows, base, qp, &*int8_queries, limp, nq, nh, h, dh, &prefetch}, local);
          }
          continue;
        }
#endif
        if (!load_block(hp + first * d, rows, d, stride, block.data())) {
          lower_to(first_bad_block, b);
          return;
        }
        for (int64_t h = 0; h < nh; ++h) {
          scan({block.data() + h * dh * stride, stride, rows, base, qp, limp, nq, nh, h, dh, &prefetch}, local);
        }
      }
      local.flush();
      std::lock_guard<std::mutex> guard(merge_mutex);
      float* tk = out_top_keys.data_ptr<float>();
      int64_t* ti = out_top_indices.data_ptr<int64_t>();
      float* lk = out_last_keys.data_ptr<float>();
      int64_t* li = out_last_indices.data_ptr<int64_t>();
      for (int64_t j = 0; j < qh; ++j) {
        Heap top{tk + j * k, ti + j * k, k}, last{lk + j * k, li + j * k, k};
        const LocalTopK ltop = local.top(j), llast = local.last(j);
        for (int64_t e = 0; e < k; ++e) {
          if (ltop.index[e] != kPadIndex) top.offer(ltop.key[e], ltop.index[e]);
          if (llast.index[e] != kPadIndex) last.offer(llast.key[e], llast.index[e]);
        }
      }
    });
  });
  // A block with NaN/Inf stopped its thread; name the exact row (the rescan touches that block only).
  if (first_bad_block.load() != std::numeric_limits<int64_t>::max()) {
    const int64_t first = first_bad_block.load() * block_rows;
    check_finite_rows(hist.slice(0, first, std::min(n, first + block_rows)), row_offset + first, "history");
  }
  return {out_top_keys, out_top_indices, out_last_keys, out_last_indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(metaclm_ext, CPU, m) { m.impl("history_topk_merge", &history_topk_merge_cpu); }

}  // namespace metaclm
