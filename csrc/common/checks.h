// Argument checks of the merge operators, shared by the CPU kernels and the CUDA glue: each raises a
// ValueError naming the argument, so a bad call fails the same way on every device. Widths of 0 are
// refused here because the kernels divide by them.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace metaclm {

inline void check_history(const at::Tensor& history, const char* name) {
  TORCH_CHECK_VALUE(history.dim() == 2, name, " must be 2-D [rows, dim], got ", history.dim(), "-D");
  TORCH_CHECK_VALUE(
      history.scalar_type() == at::kFloat || history.scalar_type() == at::kHalf ||
          history.scalar_type() == at::kBFloat16,
      name, " must be float32, float16 or bfloat16, got ", history.scalar_type());
  TORCH_CHECK_VALUE(history.size(1) >= 1, name, " width must be >= 1, got ", history.size(1));
}

// queries: fp32 [Q, H, Dh] with at least one head of at least one dimension.
inline void check_head_queries(const at::Tensor& queries) {
  TORCH_CHECK_VALUE(queries.dim() == 3 && queries.scalar_type() == at::kFloat,
                    "queries must be float32 [Q, H, Dh], got ", queries.scalar_type(), " ", queries.sizes());
  TORCH_CHECK_VALUE(queries.size(1) >= 1 && queries.size(2) >= 1,
                    "queries heads and head_dim must be >= 1, got [Q, H, Dh] = ", queries.sizes());
}

// Global row number of the chunk's first row.
inline void check_row_offset(int64_t row_offset) {
  TORCH_CHECK_VALUE(row_offset >= 0, "row_offset must be >= 0, got ", row_offset);
}

inline void check_limit(const at::Tensor& limit, int64_t num_queries) {
  TORCH_CHECK_VALUE(
      limit.dim() == 1 && limit.size(0) == num_queries && limit.scalar_type() == at::kLong,
      "limit must be int64 [", num_queries, "], got ", limit.scalar_type(), " ", limit.sizes());
}

// Checks the arguments of history_topk_merge; returns k.
inline int64_t check_topk_merge_args(const at::Tensor& queries, const at::Tensor& history, int64_t row_offset,
                                     const at::Tensor& limit, const at::Tensor& top_keys, const at::Tensor& top_indices,
                                     const at::Tensor& last_keys, const at::Tensor& last_indices) {
  check_head_queries(queries);
  check_history(history, "history");
  check_row_offset(row_offset);
  const int64_t nq = queries.size(0), nh = queries.size(1), dh = queries.size(2);
  const int64_t d = history.size(1);
  TORCH_CHECK_VALUE(d == nh * dh, "history width ", d, " != heads * head_dim = ", nh, " * ", dh);
  check_limit(limit, nq);
  TORCH_CHECK_VALUE(top_keys.dim() == 3 && top_keys.size(0) == nq && top_keys.size(1) == nh,
                    "top_keys must be [Q, H, k]");
  TORCH_CHECK_VALUE(top_keys.size(2) >= 1, "top_keys must be [Q, H, k] with k >= 1, got ", top_keys.sizes());
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
                                           const at::Tensor& labels, int64_t row_offset, const at::Tensor& limit,
                                           const at::Tensor& label_sums, const at::Tensor& mass) {
  check_head_queries(queries);
  check_history(history, "history");
  check_row_offset(row_offset);
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

// Checks the arguments of dual_form_apply_merge.
inline void check_dual_form_merge_args(const at::Tensor& queries, const at::Tensor& inputs, const at::Tensor& errors,
                                       int64_t row_offset, const at::Tensor& limit, const at::Tensor& weight_delta,
                                       const at::Tensor& out) {
  TORCH_CHECK_VALUE(queries.dim() == 2 && queries.scalar_type() == at::kFloat, "queries must be float32 [Q, D_in]");
  check_history(inputs, "inputs");
  check_history(errors, "errors");
  check_row_offset(row_offset);
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
}

// The ValueError for a label outside [0, num_labels) at global row `row`.
inline void raise_bad_label(int64_t row, int64_t label, int64_t num_labels) {
  TORCH_CHECK_VALUE(false, "labels row ", row, " is ", label, ", outside [0, num_labels = ", num_labels, ")");
}

}  // namespace metaclm
