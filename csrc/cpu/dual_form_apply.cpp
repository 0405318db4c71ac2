// CPU kernel of dual_form_apply:  out[q] = sum_{t < limit[q]} errors[t] <inputs[t], queries[q]>.
// By linearity this is (sum_{t < limit[q]} errors[t] (x) inputs[t]) queries[q]: the stream accumulates
// the weight change of the layer (fp64 [D_out, D_in], blocks of rows multiplied in fp32 by ATen's GEMM)
// and applies it to each query when it passes the query's limit. Work is O(N * D_in * D_out) whatever
// the number of queries, and the accumulation in fp64 keeps the exact-reconstruction check honest.
#include <torch/library.h>

#include "rows.h"

namespace metaclm {
namespace {

constexpr int64_t kGemmRows = 8192;  // rows summed in fp32 before adding into the fp64 accumulator

void accumulate(const at::Tensor& inputs, const at::Tensor& errors, int64_t begin, int64_t end,
                at::Tensor& weight_delta) {
  for (int64_t b = begin; b < end; b += kGemmRows) {
    const int64_t e = std::min(end, b + kGemmRows);
    auto x = inputs.slice(0, b, e).to(at::kFloat);
    auto err = errors.slice(0, b, e).to(at::kFloat);
    weight_delta.add_(at::mm(err.t(), x).to(at::kDouble));
  }
}

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
  check_finite(inputs, row_offset, "inputs");
  check_finite(errors, row_offset, "errors");

  auto delta = weight_delta.contiguous().clone();
  auto result = out.contiguous().clone();
  auto lim = limit.to(at::kCPU).contiguous();  // breakpoints are planned on the host
  const int64_t* limp = lim.data_ptr<int64_t>();
  const Breakpoints bp = breakpoints_in_chunk(lim, row_offset, n);
  auto q64 = queries.to(at::kDouble);
  int64_t done = 0;
  for (int64_t o = bp.begin; o < bp.end; ++o) {
    const int64_t qi = bp.order[o];
    const int64_t stop = limp[qi] - row_offset;
    if (stop > done) {
      accumulate(inputs, errors, done, stop, delta);
      done = stop;
    }
    result[qi].copy_(at::mv(delta, q64[qi]));
  }
  accumulate(inputs, errors, done, n, delta);
  return {delta, result};
}

TORCH_LIBRARY_IMPL(metaclm_ext, CPU, m) { m.impl("dual_form_apply_merge", &dual_form_apply_merge_cpu); }

}  // namespace metaclm
