// CUDA glue of history_topk_merge: checks, allocation, launch (kernels in history_topk_kernel.cu).
#include <torch/library.h>

#include "../common/checks.h"
#include "glue.h"

namespace metaclm {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> history_topk_merge_cuda(
    const at::Tensor& queries, const at::Tensor& history, int64_t row_offset, const at::Tensor& limit,
    const at::Tensor& top_keys, const at::Tensor& top_indices, const at::Tensor& last_keys,
    const at::Tensor& last_indices) {
  check_same_device(queries, {{"history", history}, {"limit", limit}, {"top_keys", top_keys},
                              {"top_indices", top_indices}, {"last_keys", last_keys}, {"last_indices", last_indices}});
  const int64_t k =
      check_topk_merge_args(queries, history, row_offset, limit, top_keys, top_indices, last_keys, last_indices);
  const int64_t nq = queries.size(0), nh = queries.size(1), dh = queries.size(2);
  const int64_t n = history.size(0);
  c10::cuda::CUDAGuard guard(queries.device());
  if (n == 0 || nq == 0) {
    return {top_keys.clone(), top_indices.clone(), last_keys.clone(), last_indices.clone()};
  }
  TORCH_CHECK_VALUE(n <= INT32_MAX, "history chunk of ", n, " rows is too long for the CUDA kernel (at most 2^31 - 1); "
                    "pass a smaller chunk_rows");
  cuda::TopkPlan plan;
  int64_t max_k = 0;
  const cudaError_t planned = cuda::topk_plan(nq, nh, dh, n, k, &plan, &max_k);
  TORCH_CHECK_VALUE(planned != cudaErrorInvalidValue, "history_topk on CUDA: k = ", k, " with head dim ", dh,
                    " needs more shared memory per block than this GPU has (largest k here: ", max_k, ")");
  check_cuda(planned, "history_topk plan");

  auto q = queries.contiguous();
  auto hist = history.contiguous();
  auto lim = limit.contiguous();
  auto tk = top_keys.contiguous(), ti = top_indices.contiguous();
  auto lk = last_keys.contiguous(), li = last_indices.contiguous();
  auto out_tk = at::empty_like(tk), out_ti = at::empty_like(ti);
  auto out_lk = at::empty_like(lk), out_li = at::empty_like(li);
  const int64_t cand = 2 * int64_t{plan.row_blocks} * nq * nh * k;
  auto cand_keys = at::empty({cand}, tk.options());
  auto cand_indices = at::empty({cand}, ti.options());
  auto flag = new_row_flags(q, 1);
  check_cuda(cuda::history_topk_merge(
                 q.data_ptr<float>(), hist.data_ptr(), dtype_code(hist), n, nq, nh, dh, row_offset,
                 lim.data_ptr<int64_t>(), k, tk.data_ptr<float>(), ti.data_ptr<int64_t>(), lk.data_ptr<float>(),
                 li.data_ptr<int64_t>(), out_tk.data_ptr<float>(), out_ti.data_ptr<int64_t>(),
                 out_lk.data_ptr<float>(), out_li.data_ptr<int64_t>(), cand_keys.data_ptr<float>(),
                 cand_indices.data_ptr<int64_t>(), plan, reinterpret_cast<unsigned long long*>(flag.data_ptr<int64_t>()),
                 current_stream()),
             "history_topk kernels");
  const int64_t bad = flag.item<int64_t>();
  TORCH_CHECK_VALUE(bad < 0, "history row ", bad, " contains NaN or Inf");
  return {out_tk, out_ti, out_lk, out_li};
}

}  // namespace

TORCH_LIBRARY_IMPL(metaclm_ext, CUDA, m) { m.impl("history_topk_merge", &history_topk_merge_cuda); }

}  // namespace metaclm
