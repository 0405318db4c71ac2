// CPU kernel of dual_form_apply:  out[q] = sum_{t < limit[q]} errors[t] <inputs[t], queries[q]>.
// By linearity this is (sum_{t < limit[q]} errors[t] (x) inputs[t]) queries[q]: the stream accumulates
// the weight change of the layer (fp64 [D_out, D_in], blocks of rows multiplied in fp32 by ATen's GEMM)
// and applies it to each query when it passes the query's limit. Work is O(N * D_in * D_out) whatever
// the number of queries, and the accumulation in fp64 keeps the exact-reconstruction check honest.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <mutex>
#include <type_traits>

#include "rows.h"

namespace metaclm {
namespace {

constexpr int64_t kGemmRows = 8192;  // rows summed in fp32 (a unit) before adding into the fp64 accumulator
// Rows per GEMM of a CPU thread: both staged blocks (fp32) stay in L2, and ATen's single-thread GEMM
// runs fastest at this depth (measured on this project's 2-core Xeon, 128 x K x 128: 136 GFLOP/s at
// K = 512, 93 at K = 8192, the depth of one GEMM per unit).
constexpr int64_t kCpuGemmRows = 512;

// Adds errors[begin:end]^T inputs[begin:end] into weight_delta (fp64 [D_out, D_in]) in units of
// kGemmRows rows: a unit's product is summed in fp32, units are added in fp64.
// * CPU: threads take whole units (so each unit's fp32 sum, and the result up to fp64 rounding, does
//   not depend on the number of threads) and multiply kCpuGemmRows rows at a time with single-thread
//   GEMMs; fp16/bf16 rows are staged as fp32 in per-thread buffers. Every row is checked for NaN/Inf
//   while it is in cache; the first bad row (inputs before errors on the same row) is raised after.
// * GPU: one device GEMM per unit; a check per block would cost a device sync, so the caller checks
//   the chunk once up front.
struct WeightDeltaAccumulator {
  const at::Tensor& inputs;
  const at::Tensor& errors;
  int64_t row_offset;
  at::Tensor& weight_delta;

  void add(int64_t begin, int64_t end) {
    if (begin >= end) return;
    if (!inputs.is_cpu()) {
      for (int64_t b = begin; b < end; b += kGemmRows) {
        const int64_t e = std::min(end, b + kGemmRows);
        weight_delta.add_(at::mm(errors.slice(0, b, e).to(at::kFloat).t(), inputs.slice(0, b, e).to(at::kFloat)));
      }
      return;
    }
    const auto x_all = inputs.contiguous(), e_all = errors.contiguous();  // the row checks assume [n, d]
    std::atomic<int64_t> bad_input{kNoRow}, bad_error{kNoRow};
    std::mutex add_mutex;
    at::parallel_for(0, (end - begin + kGemmRows - 1) / kGemmRows, 1, [&](int64_t u_begin, int64_t u_end) {
      const auto f32 = x_all.options().dtype(at::kFloat);
      at::Tensor unit_sum = at::empty({e_all.size(1), x_all.size(1)}, f32), x32, e32;
      at::Tensor thread_sum = at::zeros_like(weight_delta);
      for (int64_t u = u_begin; u < u_end; ++u) {
        const int64_t unit_end = std::min(end, begin + (u + 1) * kGemmRows);
        unit_sum.zero_();
        for (int64_t b = begin + u * kGemmRows; b < unit_end; b += kCpuGemmRows) {
          const int64_t e = std::min(unit_end, b + kCpuGemmRows);
          const auto x = stage_checked(x_all.slice(0, b, e), x32, b, bad_input);
          const auto err = stage_checked(e_all.slice(0, b, e), e32, b, bad_error);
          if (!x.defined() || !err.defined()) return;  // raised below
          unit_sum.addmm_(err.t(), x);
        }
        thread_sum.add_(unit_sum);
      }
      std::lock_guard<std::mutex> guard(add_mutex);
      weight_delta.add_(thread_sum);
    });
    const int64_t bad = std::min(bad_input.load(), bad_error.load());
    TORCH_CHECK_VALUE(bad == kNoRow, bad == bad_input.load() ? "inputs" : "errors", " row ", row_offset + bad,
                      " contains NaN or Inf");
  }

 private:
  static constexpr int64_t kNoRow = std::numeric_limits<int64_t>::max();

  // The rows [first, first + n) as fp32, checked: fp32 rows in place, others converted into `buffer`.
  // Undefined (and `bad` lowered to the first bad row) if a row holds NaN or Inf.
  static at::Tensor stage_checked(const at::Tensor& rows, at::Tensor& buffer, int64_t first, std::atomic<int64_t>& bad) {
    const int64_t n = rows.size(0), d = rows.size(1);
    if (rows.scalar_type() != at::kFloat && !buffer.defined()) buffer = at::empty({kCpuGemmRows, d}, rows.options().dtype(at::kFloat));
    at::Tensor out = rows;
    dispatch_history_dtype(rows.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const T* data = rows.data_ptr<T>();
      float* staged = std::is_same_v<T, float> ? nullptr : buffer.data_ptr<float>();
      for (int64_t r = 0; r < n; ++r) {
        if (!row_is_finite(data + r * d, d)) {
          lower_to(bad, first + r);
          out = at::Tensor();
          return;
        }
        if (staged) row_to_float(data + r * d, d, staged + r * d);
      }
      if (staged) out = buffer.narrow(0, 0, n);
    });
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> dual_form_apply_merge_cpu(const at::Tensor& queries, const at::Tensor& inputs,
                                                             const at::Tensor& errors, int64_t row_offset,
                                                             const at::Tensor& limit, const at::Tensor& weight_delta,
                                                             const at::Tensor& out) {
  return dual_form_apply_merge_any(queries, inputs, errors, row_offset, limit, weight_delta, out, &check_finite_rows);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> dual_form_apply_merge_any(const at::Tensor& queries, const at::Tensor& inputs,
                                                             const at::Tensor& errors, int64_t row_offset,
                                                             const at::Tensor& limit, const at::Tensor& weight_delta,
                                                             const at::Tensor& out, FiniteRowCheck check_finite) {
  TORCH_CHECK_VALUE(queries.dim() == 2 && queries.scalar_type() == at::kFloat, "queries must be float32 [Q, D_in]");
  check_history(inputs, "inputs");
  check_history(errors, "errors");
  const int64_t nq = queries.size(0), d_in = queries.size(1);
  const int64_t n = inputs.size(0);
  TORCH_CHECK_VALUE(inputs.size(1) == d_in, "inputs width ", inputs.size(1), " != queries width ", d_in);
  TORCH_CHECK_VALUE(errors.size(0) == n, "errors has ", errors.size(0), " rows, inputs has ", n);
  const int64_t d_out = errors.size(1);
  check_limit(limit, nq);
  TORCH_CHECK_VALUE(weight_delta.scalar_type() == at::kDouble && weight_delta.dim() == 2 &&
                        weight_delta.size(0) == d_out && weight_delta.size(1) == d_in,
                    "weight_delta must be float64 [D_out, D_in]");
  TORCH_CHECK_VALUE(out.scalar_type() == at::kDouble && out.dim() == 2 && out.size(0) == nq && out.size(1) == d_out,
                    "out must be float64 [Q, D_out]");

  auto delta = weight_delta.contiguous().clone();
  auto result = out.contiguous().clone();
  auto lim = limit.to(at::kCPU).contiguous();  // breakpoints are planned on the host
  const int64_t* limp = lim.data_ptr<int64_t>();
  const Breakpoints bp = breakpoints_in_chunk(lim, row_offset, n);
  auto q64 = queries.to(at::kDouble);
  if (!inputs.is_cpu()) {
    check_finite(inputs, row_offset, "inputs");
    check_finite(errors, row_offset, "errors");
  }
  WeightDeltaAccumulator accumulate{inputs, errors, row_offset, delta};
  int64_t done = 0;
  for (int64_t o = bp.begin; o < bp.end; ++o) {
    const int64_t qi = bp.order[o];
    const int64_t stop = limp[qi] - row_offset;
    if (stop > done) {
      accumulate.add(done, stop);
      done = stop;
    }
    result[qi].copy_(at::mv(delta, q64[qi]));
  }
  accumulate.add(done, n);
  return {delta, result};
}

TORCH_LIBRARY_IMPL(metaclm_ext, CPU, m) { m.impl("dual_form_apply_merge", &dual_form_apply_merge_cpu); }

}  // namespace metaclm
