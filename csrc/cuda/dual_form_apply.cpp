// CUDA glue of dual_form_apply_merge: the device-agnostic merge of csrc/cpu/dual_form_apply.cpp (ATen
// GEMMs, which run on cuBLAS for CUDA tensors) with the CUDA NaN/Inf row check.
#include <torch/library.h>

#include "../cpu/rows.h"
#include "glue.h"

namespace metaclm {
namespace {

std::tuple<at::Tensor, at::Tensor> dual_form_apply_merge_cuda(const at::Tensor& queries, const at::Tensor& inputs,
                                                              const at::Tensor& errors, int64_t row_offset,
                                                              const at::Tensor& limit, const at::Tensor& weight_delta,
                                                              const at::Tensor& out) {
  check_same_device(queries, {{"inputs", inputs}, {"errors", errors}, {"limit", limit},
                              {"weight_delta", weight_delta}, {"out", out}});
  c10::cuda::CUDAGuard guard(queries.device());
  return dual_form_apply_merge_any(queries, inputs, errors, row_offset, limit, weight_delta, out,
                                   &check_finite_rows_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(metaclm_ext, CUDA, m) { m.impl("dual_form_apply_merge", &dual_form_apply_merge_cuda); }

}  // namespace metaclm
