// CPU kernel of history_label_mass. The mass of label l for query q, head h is
//   sum_{t < limit[q], labels[t] = l} <history[t, h], q_h>  =  <sum_{t < limit[q], labels[t] = l} history[t, h], q_h>,
// so one pass accumulates per-label row sums (fp32 within units of rows, fp64 across them) and reads
// them out against each query when the stream passes its limit: O(N * D) work instead of O(N * Q * D),
// and no score is ever stored.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <mutex>
#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "../common/limit_breakpoints.h"
#include "row_readers.h"

namespace metaclm {
namespace {

// Rows summed per label in fp32 before the sums go into fp64: an fp32 table takes half the cache
// traffic of an fp64 one and no fp32-to-fp64 conversion per element. The error of a unit's fp32 sum is
// at most (kUnitRows - 1) * 2^-24 times the sum of its |elements|, as in dual_form_apply's units.
// (This constant and the two below were set by timings: benchmarks/results/cpu.json, commit history.)
constexpr int64_t kUnitRows = 8192;
// Each unit ends by adding the sums of the labels it touched into fp64, up to min(L, kUnitRows) rows of
// work: past a quarter of the unit's rows that costs more than it saves, and rows go straight into the
// fp64 sums.
constexpr int64_t kMaxUnitLabels = kUnitRows / 4;
// Rows are prefetched this far ahead of the one being added: the hardware prefetcher alone leaves the
// stream waiting on memory.
constexpr int64_t kPrefetchBytes = 4096;

// Adds a row of d elements into dst[0, d) (fp32 or fp64); scratch holds d floats.
template <typename T, typename Acc>
inline void add_row(const T* row, int64_t d, Acc* dst, float* scratch) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= d; j += 16) {  // 16 at a time in 512-bit vectors (GCC's auto-vectoriser picks 256)
    const __m512 x = load16(row + j);
    if constexpr (std::is_same_v<Acc, float>) {
      _mm512_storeu_ps(dst + j, _mm512_add_ps(_mm512_loadu_ps(dst + j), x));
    } else {
      const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1));
      _mm512_storeu_pd(dst + j, _mm512_add_pd(_mm512_loadu_pd(dst + j), _mm512_cvtps_pd(_mm512_castps512_ps256(x))));
      _mm512_storeu_pd(dst + j + 8, _mm512_add_pd(_mm512_loadu_pd(dst + j + 8), _mm512_cvtps_pd(high)));
    }
  }
#endif
  row_to_float(row + j, d - j, scratch);
  for (int64_t t = 0; t < d - j; ++t) dst[j + t] += scratch[t];
}

inline bool all_finite(const std::vector<double>& x) {
  bool finite = true;
  for (const double v : x) finite &= std::isfinite(v);
  return finite;
}

// One thread's label sums: fp32 sums of the current unit of rows, added into fp64 sums at its end (or,
// past kMaxUnitLabels labels, every row straight into the fp64 sums).
struct ThreadLabelSums {
  int64_t d;
  std::vector<double> sums;          // [L, d], fp64 over the thread's units
  std::vector<float> unit;           // [L, d], fp32 over the current unit (zero outside it); empty: fp64 only
  std::vector<uint8_t> state;        // per label: kUntouched, kTouched in this unit, kRedo in fp64
  std::vector<int64_t> touched;      // the labels touched in this unit, each once
  std::vector<float> scratch;
  static constexpr uint8_t kUntouched = 0, kTouched = 1, kRedo = 2;

  ThreadLabelSums(int64_t num_labels, int64_t dim)
      : d(dim), sums(num_labels * dim, 0.0), scratch(dim) {
    if (num_labels <= kMaxUnitLabels) {
      unit.assign(num_labels * dim, 0.0f);
      state.assign(num_labels, kUntouched);
      touched.reserve(std::min<int64_t>(num_labels, kUnitRows));
    }
  }

  // Adds rows [begin, end) into the unit, up to the first label outside [0, L), and then into the fp64
  // sums; returns the end of the rows added.
  template <typename T>
  int64_t add_unit(const T* rows, const int64_t* labels, int64_t begin, int64_t end) {
    const uint64_t num_labels = sums.size() / d;
    const int64_t row_bytes = d * static_cast<int64_t>(sizeof(T));
    const bool in_fp32 = !unit.empty();
    for (int64_t r = begin; r < end; ++r) {
      const int64_t l = labels[r];
      if (static_cast<uint64_t>(l) >= num_labels) {
        end = r;
        break;
      }
      const char* ahead = reinterpret_cast<const char*>(rows + r * d) + kPrefetchBytes;
      for (int64_t c = 0; c < row_bytes; c += 64) __builtin_prefetch(ahead + c);
      if (!in_fp32) {
        add_row(rows + r * d, d, sums.data() + l * d, scratch.data());
        continue;
      }
      if (state[l] == kUntouched) {
        state[l] = kTouched;
        touched.push_back(l);
      }
      add_row(rows + r * d, d, unit.data() + l * d, scratch.data());
    }
    if (!in_fp32) return end;
    // A label whose fp32 sum is not finite (a NaN/Inf row, or fp32/bf16 rows too large for an fp32
    // sum) is added again row by row in fp64: finite rows never leave a non-finite fp64 sum, so a
    // non-finite one still means a bad row.
    bool redo = false;
    for (const int64_t l : touched) {
      float* s = unit.data() + l * d;
      if (row_is_finite(s, d)) {
        double* dst = sums.data() + l * d;
        for (int64_t j = 0; j < d; ++j) dst[j] += s[j];
        state[l] = kUntouched;
      } else {
        state[l] = kRedo;
        redo = true;
      }
      std::fill(s, s + d, 0.0f);
    }
    if (redo) {
      for (int64_t r = begin; r < end; ++r) {
        if (state[labels[r]] == kRedo) add_row(rows + r * d, d, sums.data() + labels[r] * d, scratch.data());
      }
      for (const int64_t l : touched) state[l] = kUntouched;
    }
    touched.clear();
    return end;
  }
};

// Adds rows [begin, end) into sums[label] (fp64 [L, D]); threads keep private sums and add them up.
// The history is read once, unchecked: a NaN or Inf in a row makes its label's sum NaN or Inf (finite
// fp16/fp32 values cannot overflow an fp64 sum), so a thread checks its sums once at the end and only
// then looks for the row. A thread stops at its first bad label; first_bad (the lowest over threads)
// names the first bad row.
template <typename T>
void accumulate_rows(const T* rows, const int64_t* labels, int64_t begin, int64_t end, int64_t d,
                     int64_t num_labels, double* sums, std::atomic<int64_t>& first_bad) {
  if (begin >= end) return;
  std::mutex add_mutex;
  at::parallel_for(begin, end, kUnitRows, [&](int64_t b, int64_t e) {
    ThreadLabelSums local(num_labels, d);
    int64_t stop = b;  // rows [b, stop) are added: all, or up to the first bad label
    while (stop < e) {
      const int64_t unit_end = std::min(e, stop + kUnitRows);
      stop = local.add_unit(rows, labels, stop, unit_end);
      if (stop < unit_end) break;
    }
    if (!all_finite(local.sums)) {  // a row before stop holds NaN or Inf: the first one is the thread's first bad row
      int64_t r = b;
      while (r < stop && row_is_finite(rows + r * d, d)) ++r;
      stop = r;
    }
    if (stop < e) {
      lower_to(first_bad, stop);
      return;
    }
    std::lock_guard<std::mutex> guard(add_mutex);
    for (int64_t j = 0; j < num_labels * d; ++j) sums[j] += local.sums[j];
  });
}

// Labels read out at a time: their slice of the transposed sums (D x block fp64) stays in L2 while
// every query of a thread reads it, where query by query each query would stream all the sums.
constexpr int64_t kReadOutBlockBytes = 256 << 10;
// Labels summed at once in registers (4 AVX-512 vectors of fp64: enough independent FMAs to hide
// their latency), so a label's mass is stored once rather than loaded and stored per dimension.
constexpr int kLanes = 32;

// mass[q, h, :] = sum_j queries[q, h, j] * sums[:, h * dh + j] for the queries ids[0, count): the sums
// transposed once per head to [dh, L] rows, so the labels of a query head are contiguous in each row.
void read_out_by_labels(const double* sums, const float* queries, const int64_t* ids, int64_t count, int64_t nh,
                        int64_t dh, int64_t num_labels, double* mass) {
  const int64_t d = nh * dh;
  std::vector<double> by_head(d * num_labels);  // [H, Dh, L]
  for (int64_t l0 = 0; l0 < num_labels; l0 += 64)  // 64 labels at a time: both sides stay in cache
    for (int64_t c = 0; c < d; ++c)
      for (int64_t l = l0; l < std::min(num_labels, l0 + 64); ++l) by_head[c * num_labels + l] = sums[l * d + c];
  const int64_t block = std::max<int64_t>(64, kReadOutBlockBytes / (d * static_cast<int64_t>(sizeof(double))));
  at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
    for (int64_t l0 = 0; l0 < num_labels; l0 += block) {
      const int64_t l1 = std::min(num_labels, l0 + block);
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t h = 0; h < nh; ++h) {
          const float* qh = queries + (ids[i] * nh + h) * dh;
          double* out = mass + (ids[i] * nh + h) * num_labels;
          const double* columns = by_head.data() + h * dh * num_labels;
          int64_t l = l0;
          for (; l + kLanes <= l1; l += kLanes) {  // kLanes sums in registers over the head's dh columns
            double acc[kLanes] = {};
            for (int64_t j = 0; j < dh; ++j) {
              const double w = qh[j];
              const double* column = columns + j * num_labels + l;
              for (int t = 0; t < kLanes; ++t) acc[t] += w * column[t];
            }
            std::copy(acc, acc + kLanes, out + l);
          }
          for (; l < l1; ++l) {
            double sum = 0.0;
            for (int64_t j = 0; j < dh; ++j) sum += qh[j] * columns[j * num_labels + l];
            out[l] = sum;
          }
        }
      }
    }
  });
}

// mass[q, h, :] = sums[:, h * dh : (h + 1) * dh] @ queries[q, h] for the queries ids[0, count): one
// fp64 GEMM per head on the sums as they lie (each head's columns are a strided [L, dh] view).
void read_out_by_gemm(const at::Tensor& sums, const at::Tensor& queries, const int64_t* ids, int64_t count, double* mass) {
  const int64_t nh = queries.size(1), dh = queries.size(2), num_labels = sums.size(0);
  const auto chosen = at::from_blob(const_cast<int64_t*>(ids), {count}, at::kLong);
  const auto q = queries.index_select(0, chosen).to(at::kDouble);  // [count, H, dh]
  for (int64_t h = 0; h < nh; ++h) {
    const auto head = at::mm(q.select(1, h), sums.narrow(1, h * dh, dh).t()).contiguous();  // [count, L]
    const double* rows = head.data_ptr<double>();
    for (int64_t i = 0; i < count; ++i)
      std::memcpy(mass + (ids[i] * nh + h) * num_labels, rows + i * num_labels, num_labels * sizeof(double));
  }
}

// The read-out of the queries ids[0, count) at the current sums. Heads of 16 or more dimensions take
// the GEMMs, short heads such as the attention's 8 x 8 the loop over labels, where a GEMM multiplies
// 8-long vectors (the crossover, timed, is in the commit history).
void read_out(const at::Tensor& sums, const at::Tensor& queries, const int64_t* ids, int64_t count, double* mass) {
  const int64_t nh = queries.size(1), dh = queries.size(2);
  if (dh >= 16) {
    read_out_by_gemm(sums, queries, ids, count, mass);
  } else {
    read_out_by_labels(sums.data_ptr<double>(), queries.data_ptr<float>(), ids, count, nh, dh, sums.size(0), mass);
  }
}

std::tuple<at::Tensor, at::Tensor> history_label_mass_merge_cpu(
    const at::Tensor& queries, const at::Tensor& history, const at::Tensor& labels, int64_t row_offset,
    const at::Tensor& limit, const at::Tensor& label_sums, const at::Tensor& mass) {
  const int64_t num_labels = check_label_mass_merge_args(queries, history, labels, row_offset, limit, label_sums, mass);
  const int64_t n = history.size(0), d = history.size(1);
  auto lab = labels.contiguous();
  const int64_t* lp = lab.data_ptr<int64_t>();
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};

  auto q = queries.contiguous();
  auto hist = history.contiguous();
  const auto lim = limit.contiguous();
  const int64_t* limp = lim.data_ptr<int64_t>();
  const Breakpoints bp = breakpoints_in_chunk(lim, row_offset, n);
  auto out_sums = label_sums.contiguous().clone();
  // Every query read out here is overwritten: the old mass is copied only if some are not.
  auto out_mass = bp.end - bp.begin == q.size(0) ? at::empty_like(mass, at::MemoryFormat::Contiguous)
                                                 : mass.contiguous().clone();
  double* sums = out_sums.data_ptr<double>();

  dispatch_history_dtype(hist.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* hp = hist.data_ptr<T>();
    int64_t done = 0;
    for (int64_t o = bp.begin; o < bp.end;) {
      const int64_t stop = limp[bp.order[o]] - row_offset;
      int64_t group_end = o + 1;  // the queries read out at the same row
      while (group_end < bp.end && limp[bp.order[group_end]] == limp[bp.order[o]]) ++group_end;
      accumulate_rows(hp, lp, done, stop, d, num_labels, sums, first_bad);
      if (first_bad.load() != std::numeric_limits<int64_t>::max()) return;
      done = std::max(done, stop);
      read_out(out_sums, q, bp.order.data() + o, group_end - o, out_mass.data_ptr<double>());
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
