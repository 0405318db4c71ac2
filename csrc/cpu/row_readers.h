// Reading history rows on the CPU: dispatch on the element type, NaN/Inf tests, and conversion of
// fp32/fp16/bf16 rows to fp32 (vectorised with F16C and AVX-512 where the build targets them).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <atomic>
#include <cstdint>
#include <cstring>

namespace metaclm {

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

}  // namespace metaclm
