// The CPU NaN/Inf row check that names the first bad row (see row_readers.h).
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <limits>

#include "row_readers.h"

namespace metaclm {

void check_finite_rows(const at::Tensor& rows_any_layout, int64_t row_offset, const char* name) {
  const at::Tensor rows = rows_any_layout.contiguous();  // the scan below assumes [n, d] row-major
  const int64_t n = rows.size(0), d = rows.size(1);
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  dispatch_history_dtype(rows.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* data = rows.data_ptr<T>();
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (!row_is_finite(data + r * d, d)) {
          lower_to(first_bad, r);
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
