// CPU kernel of history_label_mass. The mass of label l for query q, head h is
//   sum_{t < limit[q], labels[t] = l} <history[t, h], q_h>  =  <sum_{t < limit[q], labels[t] = l} history[t, h], q_h>,
// so one pass accumulates per-label row sums (fp64) and reads them out against each query when the
// stream passes its limit: O(N * D) work instead of O(N * Q * D), and no score is ever stored.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <mutex>

#include "rows.h"

namespace metaclm {
namespace {

// Adds rows [begin, end) into sums[label] (fp64 [L, D]); threads keep private sums and add them up.
template <typename T>
void accumulate_rows(const T* rows, const int64_t* labels, int64_t begin, int64_t end, int64_t d,
                     int64_t num_labels, double* sums) {
  if (begin >= end) return;
  std::mutex add_mutex;
  at::parallel_for(begin, end, 8192, [&](int64_t b, int64_t e) {
    std::vector<double> local(num_labels * d, 0.0);
    for (int64_t r = b; r < e; ++r) {
      double* dst = local.data() + labels[r] * d;
      const T* row = rows + r * d;
      for (int64_t j = 0; j < d; ++j) dst[j] += static_cast<float>(row[j]);
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
  check_finite_rows(history, row_offset, "history");
  auto lab = labels.contiguous();
  const int64_t* lp = lab.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) {
    if (lp[r] < 0 || lp[r] >= num_labels) raise_bad_label(r + row_offset, lp[r], num_labels);
  }

  auto q = queries.contiguous();
  auto hist = history.contiguous();
  auto out_sums = label_sums.contiguous().clone();
  auto out_mass = mass.contiguous().clone();
  const float* qp = q.data_ptr<float>();
  const int64_t* limp = limit.contiguous().data_ptr<int64_t>();
  double* sums = out_sums.data_ptr<double>();
  double* mp = out_mass.data_ptr<double>();
  const Breakpoints bp = breakpoints_in_chunk(limit.contiguous(), row_offset, n);

  dispatch_history_dtype(hist.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* hp = hist.data_ptr<T>();
    int64_t done = 0;
    for (int64_t o = bp.begin; o < bp.end; ++o) {
      const int64_t qi = bp.order[o];
      const int64_t stop = limp[qi] - row_offset;
      accumulate_rows(hp, lp, done, stop, d, num_labels, sums);
      done = std::max(done, stop);
      for (int64_t h = 0; h < nh; ++h) {
        const float* qv = qp + (qi * nh + h) * dh;
        for (int64_t l = 0; l < num_labels; ++l) {
          const double* s = sums + l * d + h * dh;
          double acc = 0.0;
          for (int64_t j = 0; j < dh; ++j) acc += s[j] * qv[j];
          mp[(qi * nh + h) * num_labels + l] = acc;
        }
      }
    }
    accumulate_rows(hp, lp, done, n, d, num_labels, sums);
  });
  return {out_sums, out_mass};
}

}  // namespace

TORCH_LIBRARY_IMPL(metaclm_ext, CPU, m) { m.impl("history_label_mass_merge", &history_label_mass_merge_cpu); }

}  // namespace metaclm
