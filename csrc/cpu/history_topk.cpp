// CPU kernel of history_topk: scores of history rows against every (query, head), fused with the
// selection of the top-k and last-k rows, so the [Q, N] score matrix never exists.
//
// Rows are taken in blocks (sized so one head's slice fits L1), converted once to fp32 (checking for
// NaN/Inf on the way) and transposed to [D][rows], so that 16 consecutive rows of one head are one
// vector. A register tile of queries (8 for short heads, 6 for long) is scored together against 32 or
// 64 rows, so each history vector loaded feeds several FMAs. Every score vector is compared with the
// current k-th best keys of its query (two vector compares); only rows that pass (rare once the
// selections are full) take the scalar path into them. Threads split the rows, keep private
// selections seeded with the incoming state's floors, and merge them into the state's heaps at the end
// under the total order (key desc, row asc), so the result depends neither on the number of threads
// nor on the chunking.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <atomic>
#include <mutex>

#include "rows.h"

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

// Rows per block for head dimension dh: as many as keep one head's slice in L1, a multiple of kStep.
inline int64_t block_rows_for(int64_t dh) {
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
// The floors (top worst key, -last worst key) of all selections sit together in one small array, so
// scanning a block reads QB adjacent floors rather than 2 * QB lists scattered over megabytes.
struct ThreadSelections {
  std::vector<float> top_key, last_key;
  std::vector<int64_t> top_index, last_index;
  std::vector<float> floors;  // [QH][2]: top worst key, -(last worst key)
  int64_t k;
  ThreadSelections(int64_t qh, int64_t k, const float* in_top_key, const float* in_last_key)
      : top_key(qh * k), last_key(qh * k), top_index(qh * k, kPadIndex), last_index(qh * k, kPadIndex),
        floors(2 * qh), k(k) {
    for (int64_t j = 0; j < qh; ++j) {
      std::fill_n(top_key.data() + j * k, k, in_top_key[j * k]);  // [0] is a heap's worst entry
      std::fill_n(last_key.data() + j * k, k, in_last_key[j * k]);
      floors[2 * j] = in_top_key[j * k];
      floors[2 * j + 1] = -in_last_key[j * k];
    }
  }
  LocalTopK top(int64_t qh) { return {top_key.data() + qh * k, top_index.data() + qh * k, k}; }
  LocalTopK last(int64_t qh) { return {last_key.data() + qh * k, last_index.data() + qh * k, k}; }
};

#if defined(__AVX512F__)
// 16 consecutive elements of a row as fp32.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16(const c10::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

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
inline void transpose16(__m512 r[16], const __m512i lo[4], const __m512i hi[4]) {
  for (int s = 0, b = 8; s < 4; ++s, b >>= 1) {
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
    const int64_t row_bytes = d * static_cast<int64_t>(sizeof(T));
    for (; r + 16 <= n; r += 16) {
      // The next 16 rows are needed in a moment: start their cache lines now.
      const char* next = reinterpret_cast<const char*>(rows + std::min(r + 16, n - 1) * d);
      for (int64_t off = 0; off < 16 * row_bytes; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
      for (int64_t j0 = 0; j0 < d; j0 += 16) {
        __m512 tile[16];
        for (int i = 0; i < 16; ++i) tile[i] = load16(rows + (r + i) * d + j0);
        transpose16(tile, lo, hi);
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
};

// Offers the lanes of one score vector (rows first .. first+15 of the block) that pass the floors.
__attribute__((noinline)) void offer_lanes(vfloat acc, int64_t first, int64_t n_valid, int64_t base_row,
                                           LocalTopK& top, LocalTopK& last, float& top_floor, float& last_floor) {
  uint32_t pass = pass_mask(acc, top_floor, last_floor);
  while (pass) {
    const int lane = __builtin_ctz(pass);
    pass &= pass - 1;
    if (first + lane >= n_valid) break;
    const float score = acc[lane];
    const int64_t row = base_row + first + lane;
    if (top.offer(score, row)) top_floor = top.worst_key();
    if (last.offer(-score, row)) last_floor = -last.worst_key();
  }
}

// Scores the block against QB queries (qi .. qi+QB-1) of head h at once, S vectors of 16 rows per step,
// so each history vector loaded feeds QB FMAs and each query value S, and offers the candidates to their selections. DH > 0 fixes the head dimension
// at compile time (fully unrolled); 0 means the runtime task.dh.
template <int DH, int QB, int S>
void scan_queries(const BlockTask& t, int64_t qi, ThreadSelections& selections) {
  const int64_t dh = DH > 0 ? DH : t.dh;
  const float* q[QB];
  LocalTopK top[QB], last[QB];
  float top_floor[QB], last_floor[QB];
  int64_t n_valid[QB];
  int64_t n_max = 0;
  for (int b = 0; b < QB; ++b) {
    const int64_t qh = (qi + b) * t.nh + t.h;
    q[b] = t.queries + qh * dh;
    top[b] = selections.top(qh);
    last[b] = selections.last(qh);
    top_floor[b] = selections.floors[2 * qh];
    last_floor[b] = selections.floors[2 * qh + 1];
    n_valid[b] = std::min(t.rows, t.limit[qi + b] - t.base_row);
    n_max = std::max(n_max, n_valid[b]);
  }
  for (int64_t r0 = 0; r0 < n_max; r0 += kLanes * S) {
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
        pass[b][s] = pass_mask(acc[b][s], top_floor[b], last_floor[b]);
        any |= pass[b][s];
      }
    }
    if (__builtin_expect(any != 0, 0)) {
      for (int b = 0; b < QB; ++b) {
        for (int64_t s = 0; s < S; ++s) {
          if (pass[b][s]) offer_lanes(acc[b][s], r0 + s * kLanes, n_valid[b], t.base_row, top[b], last[b], top_floor[b], last_floor[b]);
        }
      }
    }
  }
  for (int b = 0; b < QB; ++b) {
    const int64_t qh = (qi + b) * t.nh + t.h;
    selections.floors[2 * qh] = top_floor[b];
    selections.floors[2 * qh + 1] = last_floor[b];
  }
}

// Scores the block against every query of head h. Register tiles measured on this project's 2-core
// Xeon (AVX-512, one 512-bit load per cycle): 8 queries x 2 row vectors for short heads (Dh = 8, where
// the per-vector compares weigh), 6 x 4 for long ones (D = 128: fewer loads per FMA).
template <int DH>
void scan_block(const BlockTask& t, ThreadSelections& selections) {
  const int64_t dh = DH > 0 ? DH : t.dh;
  int64_t qi = 0;
  if (dh >= 32) {
    for (; qi + 6 <= t.nq; qi += 6) scan_queries<DH, 6, 4>(t, qi, selections);
    for (; qi < t.nq; ++qi) scan_queries<DH, 1, 4>(t, qi, selections);
  } else {
    for (; qi + 8 <= t.nq; qi += 8) scan_queries<DH, 8, 2>(t, qi, selections);
    for (; qi < t.nq; ++qi) scan_queries<DH, 1, 2>(t, qi, selections);
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
  std::mutex merge_mutex;
  std::atomic<int64_t> first_bad_block{std::numeric_limits<int64_t>::max()};

  dispatch_history_dtype(hist.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* hp = hist.data_ptr<T>();
    const int64_t block_rows = block_rows_for(dh);
    const int64_t blocks = (n + block_rows - 1) / block_rows;
    at::parallel_for(0, blocks, 1, [&](int64_t b_begin, int64_t b_end) {
      ThreadSelections local(qh, k, in_top_keys.const_data_ptr<float>(), in_last_keys.const_data_ptr<float>());
      // One spare cache line per dimension: a power-of-two stride would map every dimension's row of
      // the block to the same few cache sets (measured: the transposing stores ran 2x slower).
      const int64_t stride = block_rows + kLanes;
      std::vector<float> block(d * stride);
      for (int64_t b = b_begin; b < b_end; ++b) {
        const int64_t first = b * block_rows;
        const int64_t rows = std::min(block_rows, n - first);
        if (!load_block(hp + first * d, rows, d, stride, block.data())) {
          lower_to(first_bad_block, b);  // reported after the loop
          return;
        }
        const int64_t base = row_offset + first;
        for (int64_t h = 0; h < nh; ++h) {
          scan({block.data() + h * dh * stride, stride, rows, base, qp, limp, nq, nh, h, dh}, local);
        }
      }
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
    const int64_t first = first_bad_block.load() * block_rows_for(dh);
    check_finite_rows(hist.slice(0, first, std::min(n, first + block_rows_for(dh))), row_offset + first, "history");
  }
  return {out_top_keys, out_top_indices, out_last_keys, out_last_indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(metaclm_ext, CPU, m) { m.impl("history_topk_merge", &history_topk_merge_cpu); }

}  // namespace metaclm
