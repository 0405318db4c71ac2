// CUDA glue of history_label_mass_merge: the host plans the limit breakpoints (as on the CPU), the
// kernels in history_label_mass_kernel.cu accumulate the label sums between breakpoints and read them out.
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/limit_breakpoints.h"
#include "glue.h"

namespace metaclm {
namespace {

std::tuple<at::Tensor, at::Tensor> history_label_mass_merge_cuda(
    const at::Tensor& queries, const at::Tensor& history, const at::Tensor& labels, int64_t row_offset,
    const at::Tensor& limit, const at::Tensor& label_sums, const at::Tensor& mass) {
  check_same_device(queries, {{"history", history}, {"labels", labels}, {"limit", limit},
                              {"label_sums", label_sums}, {"mass", mass}});
  const int64_t num_labels = check_label_mass_merge_args(queries, history, labels, row_offset, limit, label_sums, mass);
  const int64_t nh = queries.size(1), dh = queries.size(2);
  const int64_t n = history.size(0), d = history.size(1);
  c10::cuda::CUDAGuard guard(queries.device());

  auto q = queries.contiguous();
  auto hist = history.contiguous();
  auto lab = labels.contiguous();
  auto out_sums = label_sums.contiguous().clone();
  auto out_mass = mass.contiguous().clone();
  auto lim = limit.to(at::kCPU).contiguous();
  const int64_t* limp = lim.data_ptr<int64_t>();
  const Breakpoints bp = breakpoints_in_chunk(lim, row_offset, n);
  auto order = at::tensor(at::IntArrayRef(bp.order), at::kLong).to(q.device());
  auto flags = new_row_flags(q, 2);  // [first NaN/Inf row, first bad label row]
  auto* bad_value = reinterpret_cast<unsigned long long*>(flags.data_ptr<int64_t>());
  const cudaStream_t stream = current_stream();
  auto accumulate = [&](int64_t begin, int64_t end) {
    check_cuda(cuda::label_sums_accumulate(hist.data_ptr(), dtype_code(hist), lab.data_ptr<int64_t>(), begin, end, d,
                                           num_labels, row_offset, out_sums.data_ptr<double>(), bad_value,
                                           bad_value + 1, stream),
               "label_sums_accumulate kernel");
  };
  int64_t done = 0;
  for (int64_t o = bp.begin; o < bp.end;) {
    // Queries sharing this limit are read out together.
    const int64_t stop = limp[bp.order[o]] - row_offset;
    int64_t o_end = o;
    while (o_end < bp.end && limp[bp.order[o_end]] == limp[bp.order[o]]) ++o_end;
    if (stop > done) {
      accumulate(done, stop);
      done = stop;
    }
    check_cuda(cuda::label_mass_readout(out_sums.data_ptr<double>(), q.data_ptr<float>(),
                                        order.data_ptr<int64_t>() + o, o_end - o, nh, dh, num_labels,
                                        out_mass.data_ptr<double>(), stream),
               "label_mass_readout kernel");
    o = o_end;
  }
  accumulate(done, n);
  // The CPU kernel checks values before labels; the same precedence here.
  auto host_flags = flags.to(at::kCPU);
  const int64_t bad_row = flagged_row(host_flags, 0), bad_label = flagged_row(host_flags, 1);
  TORCH_CHECK_VALUE(bad_row < 0, "history row ", bad_row, " contains NaN or Inf");
  if (bad_label >= 0) raise_bad_label(bad_label, lab[bad_label - row_offset].item<int64_t>(), num_labels);
  return {out_sums, out_mass};
}

}  // namespace

TORCH_LIBRARY_IMPL(metaclm_ext, CUDA, m) { m.impl("history_label_mass_merge", &history_label_mass_merge_cuda); }

}  // namespace metaclm
