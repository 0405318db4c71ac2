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

// Adds errors[begin:end]^T inputs[begin:end] into weight_delta (fp64 [D_out, D_in]), kGemmRows rows at
// a time. fp16/bf16 blocks are staged as fp32 in buffers reused from block to block. On the CPU every
// block is checked for NaN/Inf while it is in cache: fp16/bf16 by the staging copy itself, fp32 (used
// in place) right after the GEMM has read it, before its product is added (measured: either beats a
// separate pass over the chunk). On a GPU a check costs a device sync, so the caller checks the chunk
// once up front instead (check_each_block = false).
struct WeightDeltaAccumulator {
  const at::Tensor& inputs;
  const at::Tensor& errors;
  int64_t row_offset;
  bool check_each_block;
  at::Tensor& weight_delta;
  at::Tensor x32, e32;  // staging buffers, allocated on first use

  at::Tensor as_float(const at::Tensor& rows, at::Tensor& buffer, int64_t first_row, const char* name) {
    if (rows.scalar_type() == at::kFloat) return rows;
    if (!buffer.defined()) buffer = at::empty({kGemmRows, rows.size(1)}, rows.options().dtype(at::kFloat));
    if (!check_each_block) return buffer.narrow(0, 0, rows.size(0)).copy_(rows);
    return copy_rows_checked(rows, buffer, row_offset + first_row, name);
  }

  void check_if_in_place(const at::Tensor& rows, int64_t first_row, const char* name) {
    if (check_each_block && rows.scalar_type() == at::kFloat) check_finite_rows(rows, row_offset + first_row, name);
  }

  void add(int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b += kGemmRows) {
      const int64_t e = std::min(end, b + kGemmRows);
      const auto x = inputs.slice(0, b, e), err = errors.slice(0, b, e);
      const auto x32_rows = as_float(x, x32, b, "inputs");  // inputs first: their error is reported first
      const auto product = at::mm(as_float(err, e32, b, "errors").t(), x32_rows);
      check_if_in_place(x, b, "inputs");
      check_if_in_place(err, b, "errors");
      weight_delta.add_(product);
    }
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
  const bool on_cpu = inputs.is_cpu();
  if (!on_cpu) {
    check_finite(inputs, row_offset, "inputs");
    check_finite(errors, row_offset, "errors");
  }
  WeightDeltaAccumulator accumulate{inputs, errors, row_offset, on_cpu, delta};
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
