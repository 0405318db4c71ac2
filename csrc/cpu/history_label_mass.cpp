// CPU kernel of history_label_mass. The mass of label l for query q, head h is
//   sum_{t < limit[q], labels[t] = l} <history[t, h], q_h>  =  <sum_{t < limit[q], labels[t] = l} history[t, h], q_h>,
// so one pass accumulates per-label row sums (fp64) and reads them out against each query when the
// stream passes its limit: O(N * D) work instead of O(N * Q * D), and no score is ever stored.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <mutex>

#include "rows.h"

namespace metaclm {
namespace {

// Adds rows [begin, end) into sums[label] (fp64 [L, D]); threads keep private sums and add them up.
// The rows are checked on the way (finite values, labels in range), so the history is read once: a
// thread stops at its first bad row and first_bad (the lowest over threads) names it afterwards.
template <typename T>
void accumulate_rows(const T* rows, const int64_t* labels, int64_t begin, int64_t end, int64_t d,
                     int64_t num_labels, double* sums, std::atomic<int64_t>& first_bad) {
  if (begin >= end) return;
  std::mutex add_mutex;
  at::parallel_for(begin, end, 8192, [&](int64_t b, int64_t e) {
    std::vector<double> local(num_labels * d, 0.0);
    std::vector<float> row(d);
    for (int64_t r = b; r < e; ++r) {
      const T* src = rows + r * d;
      if (!row_is_finite(src, d) || labels[r] < 0 || labels[r] >= num_labels) {
        lower_to(first_bad, r);
        return;
      }
      double* dst = local.data() + labels[r] * d;
      row_to_float(src, d, row.data());
      for (int64_t j = 0; j < d; ++j) dst[j] += row[j];
    }
    std::lock_guard<std::mutex> guard(add_mutex);
    for (int64_t j = 0; j < num_labels * d; ++j) sums[j] += local[j];
  });
}

std::tuple<at::Tensor, at::Tensor> history_label_mass_merge_cpu(
    const at::Tensor& queries, const at::Tensor& history, const at::Tensor& labels, int64_t row_offset,
    const at::Tensor& limit, const at::Tensor& label_sums, const at::Tensor& mass) {
  const int64_t num_labels = check_label_mass_merge_args(queries, history, labels, limit, label_sums, mass);
  const int64_t nh = queries.size(1), dh = queries.size(2);
  const int64_t n = history.size(0), d = history.size(1);
  auto lab = labels.contiguous();
  const int64_t* lp = lab.data_ptr<int64_t>();
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};

  auto q = queries.contiguous();
  auto hist = history.contiguous();
  auto out_sums = label_sums.contiguous().clone();
  auto out_mass = mass.contiguous().clone();
  const auto lim = limit.contiguous();
  const int64_t* limp = lim.data_ptr<int64_t>();
  double* sums = out_sums.data_ptr<double>();
  const auto q64 = q.to(at::kDouble);
  const Breakpoints bp = breakpoints_in_chunk(lim, row_offset, n);

  dispatch_history_dtype(hist.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* hp = hist.data_ptr<T>();
    int64_t done = 0;
    for (int64_t o = bp.begin; o < bp.end;) {
      const int64_t stop = limp[bp.order[o]] - row_offset;
      int64_t group_end = o + 1;  // the queries read out at the same row, in one batched product
      while (group_end < bp.end && limp[bp.order[group_end]] == limp[bp.order[o]]) ++group_end;
      accumulate_rows(hp, lp, done, stop, d, num_labels, sums, first_bad);
      if (first_bad.load() != std::numeric_limits<int64_t>::max()) return;
      done = std::max(done, stop);
      const auto ids = at::tensor(std::vector<int64_t>(bp.order.begin() + o, bp.order.begin() + group_end));
      // mass[q, h, l] = <sums[l, h, :], q[q, h, :]>: [H, G, Dh] x [H, Dh, L] -> [G, H, L]
      const auto per_head_sums = out_sums.view({num_labels, nh, dh}).permute({1, 2, 0});
      const auto group = q64.index_select(0, ids).permute({1, 0, 2});
      out_mass.index_copy_(0, ids, at::bmm(group, per_head_sums).permute({1, 0, 2}));
      o = group_end;
    }
    accumulate_rows(hp, lp, done, n, d, num_labels, sums, first_bad);
  });
  const int64_t bad = first_bad.load();
  if (bad != std::numeric_limits<int64_t>::max()) {  // the first bad row: its values, else its label
    check_finite_rows(hist.slice(0, bad, bad + 1), row_offset + bad, "history");
    raise_bad_label(row_offset + bad, lp[bad], num_labels);
  }
  return {out_sums, out_mass};
}

}  // namespace

TORCH_LIBRARY_IMPL(metaclm_ext, CPU, m) { m.impl("history_label_mass_merge", &history_label_mass_merge_cpu); }

}  // namespace metaclm
