#include "rows.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>

namespace metaclm {

void check_finite_rows(const at::Tensor& rows, int64_t row_offset, const char* name) {
  const int64_t n = rows.size(0), d = rows.size(1);
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  dispatch_history_dtype(rows.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* data = rows.data_ptr<T>();
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* row = data + r * d;
        // x - x is 0 for finite x and NaN for NaN/Inf: one branch-free reduction per row.
        float probe = 0.f;
        for (int64_t j = 0; j < d; ++j) {
          const float x = static_cast<float>(row[j]);
          probe += x - x;
        }
        if (probe != 0.f) {
          int64_t seen = first_bad.load();
          while (r < seen && !first_bad.compare_exchange_weak(seen, r)) {
          }
          return;
        }
      }
    });
  });
  const int64_t bad = first_bad.load();
  TORCH_CHECK_VALUE(bad == std::numeric_limits<int64_t>::max(), name, " row ", bad + row_offset,
                    " contains NaN or Inf");
}

}  // namespace metaclm
