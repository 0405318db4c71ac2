#include "dual_form_merge.h"

#include "limit_breakpoints.h"

namespace metaclm {

std::tuple<at::Tensor, at::Tensor> dual_form_apply_merge_any(const at::Tensor& queries, const at::Tensor& inputs,
                                                             const at::Tensor& errors, int64_t row_offset,
                                                             const at::Tensor& limit, const at::Tensor& weight_delta,
                                                             const at::Tensor& out, AddRowProducts add_row_products) {
  const int64_t n = inputs.size(0);
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
      add_row_products(inputs, errors, row_offset, done, stop, delta);
      done = stop;
    }
    result[qi].copy_(at::mv(delta, q64[qi]));
  }
  if (done < n) add_row_products(inputs, errors, row_offset, done, n, delta);
  return {delta, result};
}

}  // namespace metaclm
