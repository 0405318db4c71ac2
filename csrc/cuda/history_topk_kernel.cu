// CUDA kernels of history_topk: the scores of history rows against every (query, head) are computed in
// shared-memory tiles and reduced on the fly to the top-k and last-k of each (query, head); the [Q, N]
// score matrix never exists, in shared or in device memory. Same semantics as csrc/cpu/history_topk.cpp:
// keys where larger is better (top: score, last: -score), total order (key desc, row asc), so ties go
// to the lower row, and only rows t < limit[q] are candidates.
//
// Two kernels per merge:
//  1. select: block (head h, group of P queries, row block y) loads tiles of R history rows of head h
//     into shared memory as fp32, scores them against its P queries, and keeps, per query and for top
//     and last, a sorted list of its best k rows. Rows are only staged if they beat the list's
//     threshold: the worst entry of the incoming state (a row worse than it can never make the final
//     k), then the list's own k-th entry once the list is full. Staged rows are merged into the list by
//     rank (each entry's position is its count of better entries), which needs no sort. The block
//     writes its lists (k entries, padded) to a candidate buffer of [2, row_blocks, Q*H, k].
//  2. merge: block (q*H + h, top|last) folds the incoming state and the row_blocks candidate lists into
//     the k best, written worst-first (an ascending array is also a valid heap for the CPU kernel).
#include "device_util.cuh"

namespace metaclm {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMergeStage = 256;  // staged entries per batch in the merge kernel
constexpr int kMaxQueriesPerBlock = 16;
constexpr size_t kTargetSmem = 96 * 1024;  // fits two blocks per SM on sm_80 and sm_90
constexpr int64_t kCandidateBudget = int64_t{256} << 20;  // bytes of candidate buffer per merge
constexpr int kMaxRowBlocks = 256;

__device__ __forceinline__ bool better(float ka, int64_t ia, float kb, int64_t ib) {
  return ka > kb || (ka == kb && ia < ib);
}

// The worst of two entries under the total order (for the state thresholds).
__device__ __forceinline__ void keep_worse(float& k, int64_t& i, float k2, int64_t i2) {
  if (better(k, i, k2, i2)) {
    k = k2;
    i = i2;
  }
}

// Lists of one block, each in shared memory: `best` (sorted best-first, count[l] entries, capacity k),
// `tmp` (capacity k, merge output), `stage` (unsorted, stage_n[l] entries, capacity S). Entry indices are
// of type I and mean global row base + index. thr_* is each list's admission threshold.
template <typename I>
struct Lists {
  int count_lists, k, stage_cap;
  int64_t base;
  float* best_key;
  I* best_idx;
  float* tmp_key;
  I* tmp_idx;
  float* stage_key;
  I* stage_idx;
  int* count;
  int* stage_n;
  float* thr_key;
  int64_t* thr_idx;

  // Stages (key, idx) into list l if it beats the threshold. Any thread, any time between merges.
  __device__ __forceinline__ void offer(int l, float key, I idx) {
    if (!better(key, base + idx, thr_key[l], thr_idx[l])) return;
    const int slot = atomicAdd(stage_n + l, 1);
    stage_key[l * stage_cap + slot] = key;
    stage_idx[l * stage_cap + slot] = idx;
  }

  // Merges every non-empty stage into its list. All threads of the block must call it.
  __device__ void merge() {
    __syncthreads();  // stages complete
    for (int l = 0; l < count_lists; ++l) {
      const int m = stage_n[l];
      if (m == 0) continue;
      const int c = count[l];
      const float* bk = best_key + static_cast<int64_t>(l) * k;
      const I* bi = best_idx + static_cast<int64_t>(l) * k;
      const float* sk = stage_key + l * stage_cap;
      const I* si = stage_idx + l * stage_cap;
      for (int e = threadIdx.x; e < c + m; e += blockDim.x) {
        float key;
        I idx;
        int pos;
        if (e < c) {
          key = bk[e];
          idx = bi[e];
          pos = e;  // plus the staged entries better than it
        } else {
          key = sk[e - c];
          idx = si[e - c];
          // plus the list entries better than it: a prefix of the sorted list, found by bisection
          int lo = 0, hi = c;
          while (lo < hi) {
            const int mid = (lo + hi) / 2;
            if (better(bk[mid], base + bi[mid], key, base + idx)) lo = mid + 1; else hi = mid;
          }
          pos = lo;
        }
        for (int j = 0; j < m; ++j) pos += better(sk[j], base + si[j], key, base + idx);
        if (pos < k) {
          tmp_key[static_cast<int64_t>(l) * k + pos] = key;
          tmp_idx[static_cast<int64_t>(l) * k + pos] = idx;
        }
      }
    }
    __syncthreads();
    for (int l = 0; l < count_lists; ++l) {
      const int m = stage_n[l];
      if (m == 0) continue;
      const int n = min(k, count[l] + m);
      for (int e = threadIdx.x; e < n; e += blockDim.x) {
        best_key[static_cast<int64_t>(l) * k + e] = tmp_key[static_cast<int64_t>(l) * k + e];
        best_idx[static_cast<int64_t>(l) * k + e] = tmp_idx[static_cast<int64_t>(l) * k + e];
      }
    }
    __syncthreads();
    for (int l = threadIdx.x; l < count_lists; l += blockDim.x) {
      const int m = stage_n[l];
      if (m == 0) continue;
      const int n = min(k, count[l] + m);
      count[l] = n;
      stage_n[l] = 0;
      if (n == k) {  // full: its k-th entry beats the old threshold, since every entry did on entry
        thr_key[l] = best_key[static_cast<int64_t>(l) * k + k - 1];
        thr_idx[l] = base + best_idx[static_cast<int64_t>(l) * k + k - 1];
      }
    }
    __syncthreads();
  }
};

// Bump allocator over dynamic shared memory, 16-byte aligned pieces. With base == nullptr it only
// measures, so the host computes the size with the same code the kernel uses to lay it out.
struct SmemLayout {
  char* base;
  size_t used = 0;
  template <typename T>
  __host__ __device__ T* take(int64_t count) {
    T* p = base ? reinterpret_cast<T*>(base + used) : nullptr;
    used += (static_cast<size_t>(count) * sizeof(T) + 15) / 16 * 16;
    return p;
  }
};

struct SelectSmem {
  float* tile;     // [R][Dh + 1]
  float* queries;  // [P rounded up to 4][Dh], zero-padded
  float* scores;   // [P][R]
  int64_t* limit;  // [P]
  Lists<int32_t> lists;
};

__host__ __device__ inline int round4(int p) { return (p + 3) / 4 * 4; }

__device__ __host__ inline SelectSmem layout_select(SmemLayout& s, int p, int r, int dh, int k) {
  SelectSmem out;
  const int lists = 2 * p;
  out.tile = s.take<float>(static_cast<int64_t>(r) * (dh + 1));
  out.queries = s.take<float>(static_cast<int64_t>(round4(p)) * dh);
  out.scores = s.take<float>(static_cast<int64_t>(p) * r);
  out.limit = s.take<int64_t>(p);
  out.lists.count_lists = lists;
  out.lists.k = k;
  out.lists.stage_cap = r;
  out.lists.best_key = s.take<float>(static_cast<int64_t>(lists) * k);
  out.lists.best_idx = s.take<int32_t>(static_cast<int64_t>(lists) * k);
  out.lists.tmp_key = s.take<float>(static_cast<int64_t>(lists) * k);
  out.lists.tmp_idx = s.take<int32_t>(static_cast<int64_t>(lists) * k);
  out.lists.stage_key = s.take<float>(static_cast<int64_t>(lists) * r);
  out.lists.stage_idx = s.take<int32_t>(static_cast<int64_t>(lists) * r);
  out.lists.count = s.take<int>(lists);
  out.lists.stage_n = s.take<int>(lists);
  out.lists.thr_key = s.take<float>(lists);
  out.lists.thr_idx = s.take<int64_t>(lists);
  return out;
}

struct MergeSmem {
  Lists<int64_t> lists;
};

__device__ __host__ inline MergeSmem layout_merge(SmemLayout& s, int k) {
  MergeSmem out;
  out.lists.count_lists = 1;
  out.lists.k = k;
  out.lists.stage_cap = kMergeStage;
  out.lists.base = 0;
  out.lists.best_key = s.take<float>(k);
  out.lists.best_idx = s.take<int64_t>(k);
  out.lists.tmp_key = s.take<float>(k);
  out.lists.tmp_idx = s.take<int64_t>(k);
  out.lists.stage_key = s.take<float>(kMergeStage);
  out.lists.stage_idx = s.take<int64_t>(kMergeStage);
  out.lists.count = s.take<int>(1);
  out.lists.stage_n = s.take<int>(1);
  out.lists.thr_key = s.take<float>(1);
  out.lists.thr_idx = s.take<int64_t>(1);
  return out;
}

struct SelectArgs {
  const float* queries;
  int64_t rows, num_queries, heads, row_offset, rows_per_block;
  int head_dim, k, per_block, tile_rows;
  const int64_t* limit;
  const float* state_keys[2];
  const int64_t* state_indices[2];
  float* cand_keys;
  int64_t* cand_indices;
  unsigned long long* bad_row;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) topk_select_kernel(const T* __restrict__ history, SelectArgs a) {
  extern __shared__ __align__(16) char smem_raw[];
  SmemLayout layout{smem_raw};
  const int P = a.per_block, R = a.tile_rows, dh = a.head_dim, k = a.k;
  SelectSmem s = layout_select(layout, P, R, dh, k);
  Lists<int32_t>& lists = s.lists;
  lists.base = a.row_offset;

  const int64_t groups = (a.num_queries + P - 1) / P;
  const int64_t h = blockIdx.x / groups;
  const int64_t q0 = (blockIdx.x % groups) * P;
  const int valid = static_cast<int>(min(static_cast<int64_t>(P), a.num_queries - q0));
  const int64_t width = a.heads * dh;
  const int64_t qh_total = a.num_queries * a.heads;
  const int tid = threadIdx.x;

  // Queries (zero rows past the group), limits, empty lists.
  for (int e = tid; e < round4(P) * dh; e += blockDim.x) {
    const int p = e / dh;
    s.queries[e] = p < valid ? a.queries[((q0 + p) * a.heads + h) * dh + e % dh] : 0.f;
  }
  for (int p = tid; p < P; p += blockDim.x) s.limit[p] = p < valid ? a.limit[q0 + p] : 0;
  for (int l = tid; l < 2 * P; l += blockDim.x) {
    lists.count[l] = 0;
    lists.stage_n[l] = 0;
  }
  // Thresholds: the worst entry of the incoming state, one warp per list.
  const int warp = tid / 32, lane = tid % 32;
  for (int l = warp; l < 2 * P; l += blockDim.x / 32) {
    float wk = INFINITY;  // (+inf, -1) is better than any entry: the neutral start of a "worst" search
    int64_t wi = -1;
    const int p = l % P, kind = l / P;
    if (p < valid) {
      const int64_t base = ((q0 + p) * a.heads + h) * k;
      for (int e = lane; e < k; e += 32) keep_worse(wk, wi, a.state_keys[kind][base + e], a.state_indices[kind][base + e]);
    }
    for (int off = 16; off > 0; off /= 2) {
      const float ok = __shfl_down_sync(0xffffffffu, wk, off);
      const int64_t oi = __shfl_down_sync(0xffffffffu, wi, off);
      keep_worse(wk, wi, ok, oi);
    }
    if (lane == 0) {
      lists.thr_key[l] = p < valid ? wk : INFINITY;  // lists of absent queries admit nothing
      lists.thr_idx[l] = p < valid ? wi : -1;
    }
  }
  __syncthreads();
  int64_t limit_max = 0;
  for (int p = 0; p < valid; ++p) limit_max = max(limit_max, s.limit[p]);
  // The first query group of each head checks every row for NaN/Inf, even past its queries' limits.
  const bool checker = blockIdx.x % groups == 0;

  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * a.rows_per_block;
  const int64_t r_end = min(a.rows, r_begin + a.rows_per_block);
  const int ld = dh + 1;  // odd stride: threads reading consecutive rows hit distinct banks
  for (int64_t t0 = r_begin; t0 < r_end; t0 += R) {
    const int tn = static_cast<int>(min(static_cast<int64_t>(R), r_end - t0));
    const bool scoring = a.row_offset + t0 < limit_max;
    if (!scoring && !checker) break;
    for (int e = tid; e < tn * dh; e += blockDim.x) {
      const int r = e / dh, j = e % dh;
      const float x = to_float(history[(t0 + r) * width + h * dh + j]);
      note_if_nonfinite(x, a.row_offset + t0 + r, a.bad_row);
      s.tile[r * ld + j] = x;
    }
    __syncthreads();
    if (scoring) {
      // Scores, four queries per thread so that each tile value read feeds four FMAs.
      for (int item = tid; item < round4(P) / 4 * tn; item += blockDim.x) {
        const int r = item % tn, g = item / tn;
        const float* x = s.tile + r * ld;
        const float* q = s.queries + g * 4 * dh;
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
        for (int j = 0; j < dh; ++j) {
          const float v = x[j];
          a0 += v * q[j];
          a1 += v * q[dh + j];
          a2 += v * q[2 * dh + j];
          a3 += v * q[3 * dh + j];
        }
        const float acc[4] = {a0, a1, a2, a3};
        for (int u = 0; u < 4; ++u) {
          if (g * 4 + u < P) s.scores[(g * 4 + u) * R + r] = acc[u];
        }
      }
      __syncthreads();
      for (int item = tid; item < valid * tn; item += blockDim.x) {
        const int p = item / tn, r = item % tn;
        if (a.row_offset + t0 + r >= s.limit[p]) continue;
        const float score = s.scores[p * R + r];
        lists.offer(p, score, static_cast<int32_t>(t0 + r));
        lists.offer(P + p, -score, static_cast<int32_t>(t0 + r));
      }
      lists.merge();
    } else {
      __syncthreads();  // the tile is rewritten next
    }
  }

  // Candidates out: [kind][row block][q * H + h][k], padded with (-inf, kPadIndex).
  for (int l = 0; l < 2 * P; ++l) {
    const int p = l % P, kind = l / P;
    if (p >= valid) continue;
    const int64_t slot = ((static_cast<int64_t>(kind) * gridDim.y + blockIdx.y) * qh_total + (q0 + p) * a.heads + h) * k;
    for (int e = tid; e < k; e += blockDim.x) {
      const bool real = e < lists.count[l];
      a.cand_keys[slot + e] = real ? lists.best_key[static_cast<int64_t>(l) * k + e] : -INFINITY;
      a.cand_indices[slot + e] = real ? a.row_offset + lists.best_idx[static_cast<int64_t>(l) * k + e] : kPadIndex;
    }
  }
}

struct MergeArgs {
  int64_t qh_total, row_blocks;
  int k;
  const float* state_keys[2];
  const int64_t* state_indices[2];
  const float* cand_keys;
  const int64_t* cand_indices;
  float* out_keys[2];
  int64_t* out_indices[2];
};

__global__ void __launch_bounds__(kThreads) topk_merge_kernel(MergeArgs a) {
  extern __shared__ __align__(16) char smem_raw[];
  SmemLayout layout{smem_raw};
  const int k = a.k;
  MergeSmem s = layout_merge(layout, k);
  Lists<int64_t>& lists = s.lists;
  const int64_t qh = blockIdx.x;
  const int kind = blockIdx.y;
  if (threadIdx.x == 0) {
    lists.count[0] = 0;
    lists.stage_n[0] = 0;
    lists.thr_key[0] = -INFINITY;  // the padding entry: every real entry beats it
    lists.thr_idx[0] = kPadIndex;
  }
  __syncthreads();
  // Sources, as one sequence: the state's k entries, then each row block's k candidates.
  const int64_t total = static_cast<int64_t>(k) * (1 + a.row_blocks);
  for (int64_t b0 = 0; b0 < total; b0 += kMergeStage) {
    for (int64_t e = b0 + threadIdx.x; e < min(total, b0 + kMergeStage); e += blockDim.x) {
      float key;
      int64_t idx;
      if (e < k) {
        key = a.state_keys[kind][qh * k + e];
        idx = a.state_indices[kind][qh * k + e];
      } else {
        const int64_t block = (e - k) / k, j = (e - k) % k;
        const int64_t at = ((kind * a.row_blocks + block) * a.qh_total + qh) * k + j;
        key = a.cand_keys[at];
        idx = a.cand_indices[at];
      }
      if (idx != kPadIndex) lists.offer(0, key, idx);
    }
    lists.merge();
  }
  // Worst-first: padding, then the list reversed.
  const int c = lists.count[0];
  for (int e = threadIdx.x; e < k; e += blockDim.x) {
    const bool pad = e < k - c;
    a.out_keys[kind][qh * k + e] = pad ? -INFINITY : lists.best_key[k - 1 - e];
    a.out_indices[kind][qh * k + e] = pad ? kPadIndex : lists.best_idx[k - 1 - e];
  }
}

size_t select_smem_bytes(int p, int r, int dh, int k) {
  SmemLayout s{nullptr};
  layout_select(s, p, r, dh, k);
  return s.used;
}

size_t merge_smem_bytes(int k) {
  SmemLayout s{nullptr};
  layout_merge(s, k);
  return s.used;
}

// Rows per tile: a power of two (at most 256) keeping the fp32 tile [R][Dh + 1] at most 64 KiB,
// about 32 KiB for the usual head dims (Dh 8..32: 256 rows, 64: 128, 128: 64, 768: 16).
int tile_rows_for(int64_t head_dim) {
  int r = 256;
  while (r > 1 && static_cast<int64_t>(r) * (head_dim + 1) > 16384) r /= 2;
  return r;
}

}  // namespace

cudaError_t topk_plan(int64_t num_queries, int64_t heads, int64_t head_dim, int64_t rows, int64_t k,
                      TopkPlan* plan, int64_t* max_k) {
  int device = 0, optin = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess) err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  const int r = tile_rows_for(head_dim);
  // Largest k with one query per block (the select kernel needs the most shared memory).
  const size_t fixed = select_smem_bytes(1, r, static_cast<int>(head_dim), 0);
  const size_t per_1024 = select_smem_bytes(1, r, static_cast<int>(head_dim), 1024) - fixed;
  *max_k = static_cast<size_t>(optin) > fixed ? static_cast<int64_t>((optin - fixed) * 1024 / per_1024) : 0;
  while (*max_k > 0 && select_smem_bytes(1, r, static_cast<int>(head_dim), static_cast<int>(*max_k)) > static_cast<size_t>(optin)) --*max_k;
  if (k > *max_k || rows > INT32_MAX || merge_smem_bytes(static_cast<int>(k)) > static_cast<size_t>(optin)) {
    return cudaErrorInvalidValue;
  }
  const int kk = static_cast<int>(k), dh = static_cast<int>(head_dim);
  int p = static_cast<int>(std::min<int64_t>(kMaxQueriesPerBlock, num_queries));
  const size_t budget = select_smem_bytes(1, r, dh, kk) <= kTargetSmem ? kTargetSmem : static_cast<size_t>(optin);
  while (p > 1 && select_smem_bytes(p, r, dh, kk) > budget) --p;
  plan->queries_per_block = p;
  plan->tile_rows = r;
  plan->select_smem = select_smem_bytes(p, r, dh, kk);
  plan->merge_smem = merge_smem_bytes(kk);
  // Row blocks: enough blocks to fill the device four times over, at least two tiles each, and a
  // candidate buffer within kCandidateBudget.
  const int64_t blocks_x = heads * ceil_div(num_queries, p);
  const int64_t entry_bytes = 2 * num_queries * heads * k * (sizeof(float) + sizeof(int64_t));
  int64_t y = ceil_div(int64_t{sms} * 4, blocks_x);
  y = std::min<int64_t>({y, ceil_div(rows, 2 * r), kMaxRowBlocks, std::max<int64_t>(1, kCandidateBudget / entry_bytes)});
  plan->row_blocks = static_cast<int>(std::max<int64_t>(1, y));
  return cudaSuccess;
}

cudaError_t history_topk_merge(const float* queries, const void* history, Dtype dtype, int64_t rows,
                               int64_t num_queries, int64_t heads, int64_t head_dim, int64_t row_offset,
                               const int64_t* limit, int64_t k, const float* state_top_keys,
                               const int64_t* state_top_indices, const float* state_last_keys,
                               const int64_t* state_last_indices, float* out_top_keys, int64_t* out_top_indices,
                               float* out_last_keys, int64_t* out_last_indices, float* cand_keys,
                               int64_t* cand_indices, const TopkPlan& plan, unsigned long long* bad_row,
                               cudaStream_t stream) {
  if (rows <= 0 || num_queries <= 0 || heads <= 0) return cudaSuccess;
  const int64_t blocks_x = heads * ceil_div(num_queries, plan.queries_per_block);
  const int64_t qh_total = num_queries * heads;
  if (blocks_x > 0x7fffffff || qh_total > 0x7fffffff || plan.row_blocks > 65535) return cudaErrorInvalidValue;
  SelectArgs sa{};
  sa.queries = queries;
  sa.rows = rows;
  sa.num_queries = num_queries;
  sa.heads = heads;
  sa.row_offset = row_offset;
  sa.rows_per_block = ceil_div(ceil_div(rows, plan.row_blocks), plan.tile_rows) * plan.tile_rows;
  sa.head_dim = static_cast<int>(head_dim);
  sa.k = static_cast<int>(k);
  sa.per_block = plan.queries_per_block;
  sa.tile_rows = plan.tile_rows;
  sa.limit = limit;
  sa.state_keys[0] = state_top_keys;
  sa.state_keys[1] = state_last_keys;
  sa.state_indices[0] = state_top_indices;
  sa.state_indices[1] = state_last_indices;
  sa.cand_keys = cand_keys;
  sa.cand_indices = cand_indices;
  sa.bad_row = bad_row;
  // Row blocks past the last row (rows_per_block rounded up to whole tiles) write padding only.
  const dim3 select_grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(plan.row_blocks));
  cudaError_t err = dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    cudaError_t e = cudaFuncSetAttribute(topk_select_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(plan.select_smem));
    if (e != cudaSuccess) return e;
    topk_select_kernel<T><<<select_grid, kThreads, plan.select_smem, stream>>>(static_cast<const T*>(history), sa);
    return cudaGetLastError();
  });
  if (err != cudaSuccess) return err;

  MergeArgs ma{};
  ma.qh_total = qh_total;
  ma.row_blocks = plan.row_blocks;
  ma.k = static_cast<int>(k);
  ma.state_keys[0] = state_top_keys;
  ma.state_keys[1] = state_last_keys;
  ma.state_indices[0] = state_top_indices;
  ma.state_indices[1] = state_last_indices;
  ma.cand_keys = cand_keys;
  ma.cand_indices = cand_indices;
  ma.out_keys[0] = out_top_keys;
  ma.out_keys[1] = out_last_keys;
  ma.out_indices[0] = out_top_indices;
  ma.out_indices[1] = out_last_indices;
  err = cudaFuncSetAttribute(topk_merge_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(plan.merge_smem));
  if (err != cudaSuccess) return err;
  topk_merge_kernel<<<dim3(static_cast<unsigned>(qh_total), 2), kThreads, plan.merge_smem, stream>>>(ma);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace metaclm
