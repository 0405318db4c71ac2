// The merge of dual_form_apply on any device:  out[q] = sum_{t < limit[q]} errors[t] <inputs[t], queries[q]>.
// By linearity this is (sum_{t < limit[q]} errors[t] (x) inputs[t]) queries[q]: the stream accumulates
// the weight change of the layer (fp64 [D_out, D_in]) and applies it to each query when it passes the
// query's limit. Work is O(N * D_in * D_out) whatever the number of queries, and the accumulation in
// fp64 keeps the exact-reconstruction check honest. Each device supplies the accumulation of row
// products (csrc/cpu/dual_form_apply.cpp, csrc/cuda/dual_form_apply.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace metaclm {

// Rows whose products are summed in fp32 (a unit) before the sum goes into the fp64 weight change, on
// every device, so that results agree across devices up to fp64 rounding.
constexpr int64_t kDualFormUnitRows = 8192;

// weight_delta += errors[begin:end]^T inputs[begin:end] (begin < end, rows local to the chunk; row_offset names
// them in errors), raising ValueError for a NaN/Inf row where the device checks rows as it goes.
using AddRowProducts = void (*)(const at::Tensor& inputs, const at::Tensor& errors, int64_t row_offset,
                                int64_t begin, int64_t end, at::Tensor& weight_delta);

// dual_form_apply_merge on arguments already checked (check_dual_form_merge_args).
std::tuple<at::Tensor, at::Tensor> dual_form_apply_merge_any(const at::Tensor& queries, const at::Tensor& inputs,
                                                             const at::Tensor& errors, int64_t row_offset,
                                                             const at::Tensor& limit, const at::Tensor& weight_delta,
                                                             const at::Tensor& out, AddRowProducts add_row_products);

}  // namespace metaclm
