// CUDA glue of dual_form_apply_merge: the device-agnostic merge (csrc/common/dual_form_merge.h) with one
// ATen GEMM per unit of rows (cuBLAS for CUDA tensors). A NaN/Inf check per block would cost a device
// sync each, so the chunk is checked once up front.
#include <torch/library.h>

#include <algorithm>

#include "../common/checks.h"
#include "../common/dual_form_merge.h"
#include "glue.h"

namespace metaclm {
namespace {

void add_row_products_cuda(const at::Tensor& inputs, const at::Tensor& errors, int64_t /*row_offset*/,
                           int64_t begin, int64_t end, at::Tensor& weight_delta) {
  for (int64_t b = begin; b < end; b += kDualFormUnitRows) {
    const int64_t e = std::min(end, b + kDualFormUnitRows);
    weight_delta.add_(at::mm(errors.slice(0, b, e).to(at::kFloat).t(), inputs.slice(0, b, e).to(at::kFloat)));
  }
}

std::tuple<at::Tensor, at::Tensor> dual_form_apply_merge_cuda(const at::Tensor& queries, const at::Tensor& inputs,
                                                              const at::Tensor& errors, int64_t row_offset,
                                                              const at::Tensor& limit, const at::Tensor& weight_delta,
                                                              const at::Tensor& out) {
  check_same_device(queries, {{"inputs", inputs}, {"errors", errors}, {"limit", limit},
                              {"weight_delta", weight_delta}, {"out", out}});
  c10::cuda::CUDAGuard guard(queries.device());
  check_dual_form_merge_args(queries, inputs, errors, row_offset, limit, weight_delta, out);
  check_finite_rows_cuda(inputs, row_offset, "inputs");
  check_finite_rows_cuda(errors, row_offset, "errors");
  return dual_form_apply_merge_any(queries, inputs, errors, row_offset, limit, weight_delta, out,
                                   &add_row_products_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(metaclm_ext, CUDA, m) { m.impl("dual_form_apply_merge", &dual_form_apply_merge_cuda); }

}  // namespace metaclm
