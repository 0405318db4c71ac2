// Launch API of the CUDA kernels: plain C functions on raw device pointers, so that the device code
// (csrc/cuda/*.cu) needs no torch headers and `nvcc -c` compiles it on a machine whose torch is CPU-only.
// The ATen glue (csrc/cuda/*.cpp) checks arguments, allocates, and calls these on the current stream.
// Every function returns the first CUDA error it met (cudaSuccess otherwise).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace metaclm {
namespace cuda {

// Element type of a history; the glue maps at::ScalarType onto it.
enum class Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Heap padding index (INT64_MAX) and "no bad row" marker of the error flags.
constexpr int64_t kPadIndex = INT64_MAX;
constexpr unsigned long long kNoRow = ~0ull;

// ---- history_topk ---------------------------------------------------------------------------------
// Plan of one history_topk merge: how many queries share a block, how many row blocks split the chunk,
// and the shared memory each kernel needs. Filled by topk_plan; the glue allocates the candidate buffer
// (2 * row_blocks * Q * H * k keys and indices) from it.
struct TopkPlan {
  int queries_per_block = 0;
  int tile_rows = 0;
  int row_blocks = 0;
  size_t select_smem = 0;
  size_t merge_smem = 0;
};

// Chooses the plan for the current device. Returns cudaErrorInvalidValue if k does not fit in shared
// memory even with one query per block (*max_k then holds the largest k that fits).
cudaError_t topk_plan(int64_t num_queries, int64_t heads, int64_t head_dim, int64_t rows, int64_t k,
                      TopkPlan* plan, int64_t* max_k);

// Folds history rows [0, rows) (global rows row_offset + r) into the top-k / last-k states.
// queries: fp32 [Q, H, Dh]; history: [rows, H * Dh] of `dtype`, row-major; limit: int64 [Q] (device).
// state_*: [Q, H, k], any order (a heap or a sorted list); out_*: [Q, H, k] the merged state, sorted
// worst-first (which is also a valid heap for the CPU kernel). cand_keys / cand_indices: scratch of
// 2 * plan.row_blocks * Q * H * k entries. *bad_row (device) receives the lowest global row holding
// NaN or Inf (kNoRow if none); the caller must reset it to kNoRow before the call.
cudaError_t history_topk_merge(const float* queries, const void* history, Dtype dtype, int64_t rows,
                               int64_t num_queries, int64_t heads, int64_t head_dim, int64_t row_offset,
                               const int64_t* limit, int64_t k, const float* state_top_keys,
                               const int64_t* state_top_indices, const float* state_last_keys,
                               const int64_t* state_last_indices, float* out_top_keys, int64_t* out_top_indices,
                               float* out_last_keys, int64_t* out_last_indices, float* cand_keys,
                               int64_t* cand_indices, const TopkPlan& plan, unsigned long long* bad_row,
                               cudaStream_t stream);

// ---- history_label_mass ---------------------------------------------------------------------------
// sums[labels[r], :] += history[r, :] (fp64) for r in [begin, end). Rows with a label outside
// [0, num_labels) are skipped and reported in *bad_label_row, rows with NaN/Inf in *bad_value_row
// (lowest global row, row_offset + r).
cudaError_t label_sums_accumulate(const void* history, Dtype dtype, const int64_t* labels, int64_t begin,
                                  int64_t end, int64_t width, int64_t num_labels, int64_t row_offset,
                                  double* sums, unsigned long long* bad_value_row,
                                  unsigned long long* bad_label_row, cudaStream_t stream);

// mass[q, h, l] = <sums[l, h*Dh:(h+1)*Dh], queries[q, h]> for the `count` queries q = query_ids[i].
cudaError_t label_mass_readout(const double* sums, const float* queries, const int64_t* query_ids,
                               int64_t count, int64_t heads, int64_t head_dim, int64_t num_labels,
                               double* mass, cudaStream_t stream);

// ---- shared -----------------------------------------------------------------------------------------
// *bad_row = lowest global row (row_offset + r) of a [rows, width] block holding NaN or Inf; the
// caller resets it to kNoRow first.
cudaError_t first_nonfinite_row(const void* data, Dtype dtype, int64_t rows, int64_t width, int64_t row_offset,
                                unsigned long long* bad_row, cudaStream_t stream);

}  // namespace cuda
}  // namespace metaclm
