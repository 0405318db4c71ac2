// CPU kernel of history_topk: scores of history rows against every (query, head), fused with the
// selection of the top-k and last-k rows, so the [Q, N] score matrix never exists.
//
// Rows are taken in blocks of kBlockRows, converted once to fp32 and transposed to [D][rows] so that
// 16 consecutive rows of one head are one vector. For each (query, head) a block costs Dh vector FMAs
// per 16 rows plus two vector compares against the current k-th best keys; only rows that pass (rare
// once the heaps are full) take the scalar path into the heaps. Threads split the rows, keep private
// heaps and merge them at the end under the total order (key desc, row asc), so the result does not
// depend on the number of threads or on the chunking.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <mutex>

#include "rows.h"

namespace metaclm {
namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kBlockRows = 256;  // multiple of kLanes * kSubBlocks
constexpr int64_t kSubBlocks = 4;    // 64 rows per step: one broadcast query value feeds 4 FMAs
constexpr int64_t kPadIndex = std::numeric_limits<int64_t>::max();

typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline bool any_lane(vint m) {
  uint64_t parts[kLanes / 2];
  std::memcpy(parts, &m, sizeof(m));
  uint64_t acc = 0;
  for (int64_t i = 0; i < kLanes / 2; ++i) acc |= parts[i];
  return acc != 0;
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
      if (!better(v, i, key[child], index[child])) break;  // child is worse than the new entry: stop
      key[pos] = key[child];
      index[pos] = index[child];
      pos = child;
    }
    key[pos] = v;
    index[pos] = i;
    return true;
  }
};

// Private heaps of one thread: [QH, k] keys and indices for top and last.
struct HeapSet {
  std::vector<float> top_key, last_key;
  std::vector<int64_t> top_index, last_index;
  int64_t k;
  HeapSet(int64_t qh, int64_t k)
      : top_key(qh * k, -INFINITY), last_key(qh * k, -INFINITY),
        top_index(qh * k, kPadIndex), last_index(qh * k, kPadIndex), k(k) {}
  Heap top(int64_t qh) { return {top_key.data() + qh * k, top_index.data() + qh * k, k}; }
  Heap last(int64_t qh) { return {last_key.data() + qh * k, last_index.data() + qh * k, k}; }
};

// Converts rows [0, n) of a [n, D] block to fp32 laid out as [D][kBlockRows], zero-padding the tail.
template <typename T>
void load_block(const T* rows, int64_t n, int64_t d, float* out) {
  for (int64_t r = 0; r < n; ++r) {
    const T* row = rows + r * d;
    for (int64_t j = 0; j < d; ++j) out[j * kBlockRows + r] = static_cast<float>(row[j]);
  }
  const int64_t padded = (n + kLanes * kSubBlocks - 1) / (kLanes * kSubBlocks) * (kLanes * kSubBlocks);
  for (int64_t j = 0; j < d; ++j) std::fill(out + j * kBlockRows + n, out + j * kBlockRows + padded, 0.f);
}

// Scores rows [0, n_valid) of one transposed head slice against one query head and offers the
// candidates to its heaps. DH > 0 fixes the head dimension at compile time; 0 means runtime dh.
template <int DH>
void scan_head(const float* slice, int64_t n_valid, const float* q, int64_t dh_runtime, int64_t base_row,
               Heap top, Heap last) {
  const int64_t dh = DH > 0 ? DH : dh_runtime;
  float top_floor = top.key[0];
  float last_floor = -last.key[0];  // a score <= this may enter the last-k heap
  constexpr int64_t step = kLanes * kSubBlocks;
  for (int64_t r0 = 0; r0 < n_valid; r0 += step) {
    vfloat acc[kSubBlocks] = {};
    for (int64_t j = 0; j < dh; ++j) {
      const float qj = q[j];
      const float* col = slice + j * kBlockRows + r0;
      for (int64_t s = 0; s < kSubBlocks; ++s) {
        vfloat h;
        std::memcpy(&h, col + s * kLanes, sizeof(h));
        acc[s] += h * qj;
      }
    }
    for (int64_t s = 0; s < kSubBlocks; ++s) {
      // >= and <= (not > and <): a tie with the floor may still win on its row number.
      const vint pass = (acc[s] >= top_floor) | (acc[s] <= last_floor);
      if (!any_lane(pass)) continue;
      const int64_t lane_end = std::min<int64_t>(kLanes, n_valid - r0 - s * kLanes);
      for (int64_t lane = 0; lane < lane_end; ++lane) {
        if (!pass[lane]) continue;
        const float score = acc[s][lane];
        const int64_t row = base_row + r0 + s * kLanes + lane;
        if (top.offer(score, row)) top_floor = top.key[0];
        if (last.offer(-score, row)) last_floor = -last.key[0];
      }
    }
  }
}

using ScanFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, Heap, Heap);

ScanFn pick_scan(int64_t dh) {
  switch (dh) {
    case 8: return scan_head<8>;
    case 16: return scan_head<16>;
    case 32: return scan_head<32>;
    case 64: return scan_head<64>;
    case 128: return scan_head<128>;
    default: return scan_head<0>;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> history_topk_merge_cpu(
    const at::Tensor& queries, const at::Tensor& history, int64_t row_offset, const at::Tensor& limit,
    const at::Tensor& top_keys, const at::Tensor& top_indices, const at::Tensor& last_keys,
    const at::Tensor& last_indices) {
  const int64_t k = check_topk_merge_args(queries, history, limit, top_keys, top_indices, last_keys, last_indices);
  const int64_t nq = queries.size(0), nh = queries.size(1), dh = queries.size(2);
  const int64_t n = history.size(0), d = history.size(1);
  check_finite_rows(history, row_offset, "history");

  auto q = queries.contiguous();
  auto hist = history.contiguous();
  auto lim = limit.contiguous();
  auto out_top_keys = top_keys.contiguous().clone();
  auto out_top_indices = top_indices.contiguous().clone();
  auto out_last_keys = last_keys.contiguous().clone();
  auto out_last_indices = last_indices.contiguous().clone();
  const float* qp = q.data_ptr<float>();
  const int64_t* limp = lim.data_ptr<int64_t>();
  const ScanFn scan = pick_scan(dh);
  const int64_t qh = nq * nh;
  std::mutex merge_mutex;

  dispatch_history_dtype(hist.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* hp = hist.data_ptr<T>();
    const int64_t blocks = (n + kBlockRows - 1) / kBlockRows;
    at::parallel_for(0, blocks, 1, [&](int64_t b_begin, int64_t b_end) {
      HeapSet local(qh, k);
      std::vector<float> block(d * kBlockRows);
      for (int64_t b = b_begin; b < b_end; ++b) {
        const int64_t first = b * kBlockRows;
        const int64_t rows = std::min(kBlockRows, n - first);
        load_block(hp + first * d, rows, d, block.data());
        const int64_t base = row_offset + first;
        for (int64_t h = 0; h < nh; ++h) {
          const float* slice = block.data() + h * dh * kBlockRows;
          for (int64_t i = 0; i < nq; ++i) {
            const int64_t n_valid = std::min(rows, limp[i] - base);
            if (n_valid <= 0) continue;
            scan(slice, n_valid, qp + (i * nh + h) * dh, dh, base, local.top(i * nh + h), local.last(i * nh + h));
          }
        }
      }
      std::lock_guard<std::mutex> guard(merge_mutex);
      float* tk = out_top_keys.data_ptr<float>();
      int64_t* ti = out_top_indices.data_ptr<int64_t>();
      float* lk = out_last_keys.data_ptr<float>();
      int64_t* li = out_last_indices.data_ptr<int64_t>();
      for (int64_t j = 0; j < qh; ++j) {
        Heap top{tk + j * k, ti + j * k, k}, last{lk + j * k, li + j * k, k};
        Heap ltop = local.top(j), llast = local.last(j);
        for (int64_t e = 0; e < k; ++e) {
          if (ltop.index[e] != kPadIndex) top.offer(ltop.key[e], ltop.index[e]);
          if (llast.index[e] != kPadIndex) last.offer(llast.key[e], llast.index[e]);
        }
      }
    });
  });
  return {out_top_keys, out_top_indices, out_last_keys, out_last_indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(metaclm_ext, CPU, m) { m.impl("history_topk_merge", &history_topk_merge_cpu); }

}  // namespace metaclm
