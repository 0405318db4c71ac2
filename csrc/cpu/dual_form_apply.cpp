// CPU kernel of dual_form_apply: the accumulation of row products under the device-agnostic merge
// (csrc/common/dual_form_merge.h), with every row checked for NaN/Inf while it is in cache.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <mutex>

#include "../common/checks.h"
#include "../common/dual_form_merge.h"
#include "row_readers.h"

namespace metaclm {
namespace {

// A CPU thread's fp32 product of one unit: blocks of rows are staged as fp32 (and checked for NaN/Inf
// while in cache), then multiplied into `sum` = errors^T inputs of the unit so far.
//
// With AVX-512 the product is a register-tiled rank update (6 x 64 tiles of the sum in 24 zmm
// accumulators; per row, 4 loads of inputs and 6 broadcasts of errors feed 24 FMAs) over blocks of 64
// rows that stay in L1, on 64-byte aligned buffers padded to whole tiles: near the FMA units' peak,
// where ATen's GEMM packs its operands on every call (timings in the commit history). For sums larger
// than L2 holds (use_tiles), and without AVX-512, ATen's GEMM multiplies 512-row blocks.
class UnitProduct {
 public:
  UnitProduct(int64_t d_out, int64_t d_in)
      : d_out_(d_out), d_in_(d_in), tiled_(use_tiles(d_out, d_in)), block_rows_(tiled_ ? kTileBlockRows : kGemmBlockRows),
        ld_e_(tiled_ ? round_up(d_out, kTileRows) : d_out), ld_x_(tiled_ ? round_up(d_in, kTileCols) : d_in) {
    // The CPU allocator aligns to 64 bytes, and rows of whole tiles keep every row aligned: the tiles'
    // 512-bit loads run at full speed only when aligned.
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    // Zeros: the padding is never written, and must not hold denormals or NaN that the tiles multiply.
    staged_e_ = at::zeros({block_rows_, ld_e_}, f32);
    staged_x_ = at::zeros({block_rows_, ld_x_}, f32);
    sum_ = at::zeros({ld_e_, ld_x_}, f32);
  }

  // Rows staged and multiplied at a time.
  int64_t block_rows() const { return block_rows_; }

  void zero() { sum_.zero_(); }

  // The unit's sum so far, [D_out, D_in].
  at::Tensor sum() const { return sum_.narrow(0, 0, d_out_).narrow(1, 0, d_in_); }

  // Stages rows [b, e) of errors and inputs (at most block_rows()) and adds their product into the sum.
  // False (with the bad row lowered into bad_error or bad_input) if a row holds NaN or Inf.
  bool add_block(const at::Tensor& errors, const at::Tensor& inputs, int64_t b, int64_t e,
                 std::atomic<int64_t>& bad_error, std::atomic<int64_t>& bad_input) {
    const bool errors_finite = stage(errors, b, e, staged_e_, bad_error);
    const bool inputs_finite = stage(inputs, b, e, staged_x_, bad_input);  // both: the first bad row may be either
    if (!errors_finite || !inputs_finite) return false;
#if defined(__AVX512F__)
    if (tiled_) {
      const float* ep = staged_e_.data_ptr<float>();
      const float* xp = staged_x_.data_ptr<float>();
      float* cp = sum_.data_ptr<float>();
      // The next block's rows are requested into L2 a few lines per tile while this block is multiplied:
      // staging otherwise waited on memory.
      const int64_t next_end = std::min(errors.size(0), e + (e - b));
      NextRows next_e(errors, e, next_end), next_x(inputs, e, next_end);
      const int64_t tiles = (ld_e_ / kTileRows) * (ld_x_ / kTileCols);
      const int64_t lines_per_tile = (std::max(next_e.lines(), next_x.lines()) + tiles - 1) / tiles;
      for (int64_t i = 0; i < ld_e_; i += kTileRows) {
        for (int64_t j = 0; j < ld_x_; j += kTileCols) {
          next_e.prefetch(lines_per_tile);
          next_x.prefetch(lines_per_tile);
          rank_update_tile(ep + i, xp + j, e - b, cp + i * ld_x_ + j);
        }
      }
      return true;
    }
#endif
    sum().addmm_(staged_e_.narrow(0, 0, e - b).narrow(1, 0, d_out_).t(), staged_x_.narrow(0, 0, e - b).narrow(1, 0, d_in_));
    return true;
  }

 private:
  static constexpr int64_t kTileRows = 6, kTileCols = 64, kTileBlockRows = 64, kGemmBlockRows = 512;
  static constexpr int64_t kMaxTiledSumBytes = 256 << 10;

  static int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

  // Tiles while the unit's sum stays in L2: every 64-row block loads and stores the whole sum, which
  // for wider layers outruns the cache, where the GEMM's own blocking does not (the 256 KB crossover
  // was timed: commit history).
  static bool use_tiles(int64_t d_out, int64_t d_in) {
#if defined(__AVX512F__)
    return round_up(d_out, kTileRows) * round_up(d_in, kTileCols) * static_cast<int64_t>(sizeof(float)) <= kMaxTiledSumBytes;
#else
    return false;
#endif
  }

  // Rows [b, e) of `rows` as fp32 into the first rows of `staged`; false (and `bad` lowered to the
  // first bad row) if a row holds NaN or Inf.
  static bool stage(const at::Tensor& rows, int64_t b, int64_t e, at::Tensor& staged, std::atomic<int64_t>& bad) {
    const int64_t d = rows.size(1), ld = staged.size(1);
    float* out = staged.data_ptr<float>();
    bool finite = true;
    dispatch_history_dtype(rows.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const T* data = rows.data_ptr<T>();
      for (int64_t r = b; r < e && finite; ++r) {
        const T* row = data + r * d;
        float* dst = out + (r - b) * ld;
        int64_t j = 0;
#if defined(__AVX512F__)
        // 16 at a time, checked after the conversion (NaN and Inf stay NaN and Inf in fp32): one pass
        // over the row where row_is_finite then row_to_float take two
        const __m512i exponent = _mm512_set1_epi32(0x7f800000);
        __mmask16 special = 0;
        for (; j + 16 <= d; j += 16) {
          const __m512 v = load16(row + j);
          _mm512_storeu_ps(dst + j, v);
          special |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v), exponent), exponent);
        }
        finite = special == 0;
#endif
        finite = finite && row_is_finite(row + j, d - j);
        if (!finite) {
          lower_to(bad, r);
        } else {
          row_to_float(row + j, d - j, dst + j);
        }
      }
    });
    return finite;
  }

#if defined(__AVX512F__)
  // Rows [b, e) of a tensor (b <= e), requested into L2 a number of 64-byte lines at a time.
  struct NextRows {
    const char* cursor;
    const char* end;
    NextRows(const at::Tensor& rows, int64_t b, int64_t e)
        : cursor(static_cast<const char*>(rows.data_ptr()) + b * rows.size(1) * rows.element_size()),
          end(cursor + (e - b) * rows.size(1) * rows.element_size()) {}
    int64_t lines() const { return (end - cursor + 63) / 64; }
    void prefetch(int64_t count) {
      for (; count > 0 && cursor < end; --count, cursor += 64) _mm_prefetch(cursor, _MM_HINT_T1);
    }
  };

  // sum[i][j] += sum_t e[t][i] x[t][j] for a kTileRows x kTileCols tile, t over `rows` staged rows.
  void rank_update_tile(const float* e, const float* x, int64_t rows, float* c) const {
    constexpr int kVectors = kTileCols / 16;
    __m512 acc[kTileRows][kVectors];
    for (int i = 0; i < kTileRows; ++i)
      for (int v = 0; v < kVectors; ++v) acc[i][v] = _mm512_loadu_ps(c + i * ld_x_ + 16 * v);
    for (int64_t t = 0; t < rows; ++t) {
      __m512 xv[kVectors];
      for (int v = 0; v < kVectors; ++v) xv[v] = _mm512_loadu_ps(x + t * ld_x_ + 16 * v);
      for (int i = 0; i < kTileRows; ++i) {
        const __m512 ev = _mm512_set1_ps(e[t * ld_e_ + i]);
        for (int v = 0; v < kVectors; ++v) acc[i][v] = _mm512_fmadd_ps(ev, xv[v], acc[i][v]);
      }
    }
    for (int i = 0; i < kTileRows; ++i)
      for (int v = 0; v < kVectors; ++v) _mm512_storeu_ps(c + i * ld_x_ + 16 * v, acc[i][v]);
  }
#endif

  int64_t d_out_, d_in_;
  bool tiled_;
  int64_t block_rows_, ld_e_, ld_x_;
  at::Tensor staged_e_, staged_x_, sum_;
};

// Adds errors[begin:end]^T inputs[begin:end] into weight_delta (fp64 [D_out, D_in]) in units of
// kDualFormUnitRows rows: a unit's product is summed in fp32, units are added in fp64. Threads take
// whole units (so each unit's fp32 sum, and the result up to fp64 rounding, does not depend on the
// number of threads), each with its own UnitProduct. Every row is checked for NaN/Inf while it is in
// cache; the first bad row (inputs before errors on the same row) is raised after.
void add_row_products_cpu(const at::Tensor& inputs, const at::Tensor& errors, int64_t row_offset, int64_t begin,
                          int64_t end, at::Tensor& weight_delta) {
  constexpr int64_t kNoRow = std::numeric_limits<int64_t>::max();
  const auto x_all = inputs.contiguous(), e_all = errors.contiguous();  // the row checks assume [n, d]
  std::atomic<int64_t> bad_input{kNoRow}, bad_error{kNoRow};
  std::mutex add_mutex;
  at::parallel_for(0, (end - begin + kDualFormUnitRows - 1) / kDualFormUnitRows, 1, [&](int64_t u_begin, int64_t u_end) {
    UnitProduct unit(e_all.size(1), x_all.size(1));
    at::Tensor thread_sum = at::zeros_like(weight_delta);
    for (int64_t u = u_begin; u < u_end; ++u) {
      const int64_t unit_end = std::min(end, begin + (u + 1) * kDualFormUnitRows);
      unit.zero();
      for (int64_t b = begin + u * kDualFormUnitRows; b < unit_end; b += unit.block_rows()) {
        const int64_t e = std::min(unit_end, b + unit.block_rows());
        if (!unit.add_block(e_all, x_all, b, e, bad_error, bad_input)) return;  // raised below
      }
      thread_sum.add_(unit.sum());
    }
    std::lock_guard<std::mutex> guard(add_mutex);
    weight_delta.add_(thread_sum);
  });
  const int64_t bad = std::min(bad_input.load(), bad_error.load());
  TORCH_CHECK_VALUE(bad == kNoRow, bad == bad_input.load() ? "inputs" : "errors", " row ", row_offset + bad,
                    " contains NaN or Inf");
}

std::tuple<at::Tensor, at::Tensor> dual_form_apply_merge_cpu(const at::Tensor& queries, const at::Tensor& inputs,
                                                             const at::Tensor& errors, int64_t row_offset,
                                                             const at::Tensor& limit, const at::Tensor& weight_delta,
                                                             const at::Tensor& out) {
  check_dual_form_merge_args(queries, inputs, errors, row_offset, limit, weight_delta, out);
  return dual_form_apply_merge_any(queries, inputs, errors, row_offset, limit, weight_delta, out, &add_row_products_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(metaclm_ext, CPU, m) { m.impl("dual_form_apply_merge", &dual_form_apply_merge_cpu); }

}  // namespace metaclm
