// Shared helpers of the CPU kernels (and of the CUDA glue in csrc/cuda/, which reuses the argument
// checks, the breakpoints and the device-agnostic dual-form merge): argument checks, reading history
// rows of any float dtype as fp32, and the limit breakpoints that let queries of several checkpoints
// share one pass.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

namespace metaclm {

inline void check_history(const at::Tensor& history, const char* name) {
  TORCH_CHECK_VALUE(history.dim() == 2, name, " must be 2-D [rows, dim], got ", history.dim(), "-D");
  TORCH_CHECK_VALUE(
      history.scalar_type() == at::kFloat || history.scalar_type() == at::kHalf ||
          history.scalar_type() == at::kBFloat16,
      name, " must be float32, float16 or bfloat16, got ", history.scalar_type());
}

inline void check_limit(const at::Tensor& limit, int64_t num_queries) {
  TORCH_CHECK_VALUE(
      limit.dim() == 1 && limit.size(0) == num_queries && limit.scalar_type() == at::kLong,
      "limit must be int64 [", num_queries, "], got ", limit.scalar_type(), " ", limit.sizes());
}

// Checks the arguments of history_topk_merge; returns k.
inline int64_t check_topk_merge_args(const at::Tensor& queries, const at::Tensor& history, const at::Tensor& limit,
                                     const at::Tensor& top_keys, const at::Tensor& top_indices,
                                     const at::Tensor& last_keys, const at::Tensor& last_indices) {
  TORCH_CHECK_VALUE(queries.dim() == 3 && queries.scalar_type() == at::kFloat,
                    "queries must be float32 [Q, H, Dh], got ", queries.scalar_type(), " ", queries.sizes());
  check_history(history, "history");
  const int64_t nq = queries.size(0), nh = queries.size(1), dh = queries.size(2);
  const int64_t d = history.size(1);
  TORCH_CHECK_VALUE(d == nh * dh, "history width ", d, " != heads * head_dim = ", nh, " * ", dh);
  check_limit(limit, nq);
  TORCH_CHECK_VALUE(top_keys.dim() == 3 && top_keys.size(0) == nq && top_keys.size(1) == nh,
                    "top_keys must be [Q, H, k]");
  for (const auto& t : {top_keys, last_keys}) {
    TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat && t.sizes() == top_keys.sizes(), "bad heap keys");
  }
  for (const auto& t : {top_indices, last_indices}) {
    TORCH_CHECK_VALUE(t.scalar_type() == at::kLong && t.sizes() == top_keys.sizes(), "bad heap indices");
  }
  return top_keys.size(2);
}

// Checks the arguments of history_label_mass_merge; returns the number of labels.
inline int64_t check_label_mass_merge_args(const at::Tensor& queries, const at::Tensor& history,
                                           const at::Tensor& labels, const at::Tensor& limit,
                                           const at::Tensor& label_sums, const at::Tensor& mass) {
  TORCH_CHECK_VALUE(queries.dim() == 3 && queries.scalar_type() == at::kFloat,
                    "queries must be float32 [Q, H, Dh]");
  check_history(history, "history");
  const int64_t nq = queries.size(0), nh = queries.size(1), dh = queries.size(2);
  const int64_t n = history.size(0), d = history.size(1);
  TORCH_CHECK_VALUE(d == nh * dh, "history width ", d, " != heads * head_dim = ", nh, " * ", dh);
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == n && labels.scalar_type() == at::kLong,
                    "labels must be int64 [", n, "], got ", labels.scalar_type(), " ", labels.sizes());
  check_limit(limit, nq);
  TORCH_CHECK_VALUE(label_sums.dim() == 2 && label_sums.size(1) == d && label_sums.scalar_type() == at::kDouble,
                    "label_sums must be float64 [L, D]");
  const int64_t num_labels = label_sums.size(0);
  TORCH_CHECK_VALUE(mass.dim() == 3 && mass.size(0) == nq && mass.size(1) == nh && mass.size(2) == num_labels &&
                        mass.scalar_type() == at::kDouble,
                    "mass must be float64 [Q, H, L]");
  return num_labels;
}

// The ValueError for a label outside [0, num_labels) at global row `row`.
inline void raise_bad_label(int64_t row, int64_t label, int64_t num_labels) {
  TORCH_CHECK_VALUE(false, "labels row ", row, " is ", label, ", outside [0, num_labels = ", num_labels, ")");
}

// Calls fn(scalar_t{}) with the history's element type.
template <typename Fn>
inline void dispatch_history_dtype(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default: TORCH_CHECK_VALUE(false, "unsupported history dtype ", t);
  }
}

// Lowers `first` to `value` if that is smaller, atomically: the first bad row over threads that each
// stop at their own first one.
inline void lower_to(std::atomic<int64_t>& first, int64_t value) {
  int64_t seen = first.load();
  while (value < seen && !first.compare_exchange_weak(seen, value)) {
  }
}

// The exponent field of each float format: all ones means Inf or NaN.
template <typename T> struct ExponentField;
template <> struct ExponentField<float> { using Bits = uint32_t; static constexpr Bits kMask = 0x7f800000u; };
template <> struct ExponentField<c10::Half> { using Bits = uint16_t; static constexpr Bits kMask = 0x7c00u; };
template <> struct ExponentField<c10::BFloat16> { using Bits = uint16_t; static constexpr Bits kMask = 0x7f80u; };

// True if the row holds no NaN or Inf. An integer OR-reduction of exponent tests, which the compiler
// vectorises (a float reduction such as sum(x - x) it may not reorder, so it would run one add per cycle).
template <typename T>
inline bool row_is_finite(const T* row, int64_t d) {
  using Field = ExponentField<T>;
  const auto* bits = reinterpret_cast<const typename Field::Bits*>(row);
  typename Field::Bits bad = 0;
  for (int64_t j = 0; j < d; ++j) bad |= static_cast<typename Field::Bits>((bits[j] & Field::kMask) == Field::kMask);
  return bad == 0;
}

// A row of d elements as fp32 into out[0, d). Written so that it vectorises: F16C for fp16, a 16-bit
// shift for bf16 (c10's scalar conversions would be called element by element).
inline void row_to_float(const float* row, int64_t d, float* out) { std::memcpy(out, row, d * sizeof(float)); }
inline void row_to_float(const c10::BFloat16* row, int64_t d, float* out) {
  const auto* bits = reinterpret_cast<const uint16_t*>(row);
  for (int64_t j = 0; j < d; ++j) {
    const uint32_t wide = static_cast<uint32_t>(bits[j]) << 16;
    std::memcpy(out + j, &wide, sizeof(wide));
  }
}
inline void row_to_float(const c10::Half* row, int64_t d, float* out) {
  int64_t j = 0;
#if defined(__F16C__)
  for (; j + 8 <= d; j += 8)
    _mm256_storeu_ps(out + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j))));
#endif
  for (; j < d; ++j) out[j] = static_cast<float>(row[j]);
}

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
#endif

// Raises ValueError naming the first history row (global row number) that holds NaN or Inf.
void check_finite_rows(const at::Tensor& rows, int64_t row_offset, const char* name);

// The dual-form merge on any device (csrc/cpu/dual_form_apply.cpp): ATen GEMMs on the tensors' device.
// check_finite is that device's NaN/Inf row check, run once per chunk off the CPU (on the CPU the rows
// are checked block by block while in cache).
using FiniteRowCheck = void (*)(const at::Tensor& rows, int64_t row_offset, const char* name);
std::tuple<at::Tensor, at::Tensor> dual_form_apply_merge_any(const at::Tensor& queries, const at::Tensor& inputs,
                                                             const at::Tensor& errors, int64_t row_offset,
                                                             const at::Tensor& limit, const at::Tensor& weight_delta,
                                                             const at::Tensor& out, FiniteRowCheck check_finite);

// Queries sorted by limit, and for each limit inside (row_offset, row_offset + n] the local row at
// which the running sums must be read out. Used by the label-mass and dual-form merges.
struct Breakpoints {
  std::vector<int64_t> order;  // query ids sorted by limit
  int64_t begin = 0, end = 0;  // order[begin:end] have limits inside this chunk
};

inline Breakpoints breakpoints_in_chunk(const at::Tensor& limit, int64_t row_offset, int64_t n) {
  const int64_t* lim = limit.data_ptr<int64_t>();
  const int64_t q = limit.size(0);
  Breakpoints b;
  b.order.resize(q);
  std::iota(b.order.begin(), b.order.end(), 0);
  std::stable_sort(b.order.begin(), b.order.end(), [&](int64_t a, int64_t c) { return lim[a] < lim[c]; });
  // A query whose limit is exactly row_offset was read out by the previous chunk, except at the very
  // start of the stream (limit 0), whose answer is the zero the state starts with.
  auto first = std::upper_bound(b.order.begin(), b.order.end(), row_offset,
                                [&](int64_t value, int64_t id) { return value < lim[id]; });
  auto last = std::upper_bound(b.order.begin(), b.order.end(), row_offset + n,
                               [&](int64_t value, int64_t id) { return value < lim[id]; });
  b.begin = first - b.order.begin();
  b.end = last - b.order.begin();
  return b;
}

}  // namespace metaclm
