// CUDA glue of the NaN/Inf row check (kernel in check_finite_rows_kernel.cu), used by dual_form_apply.
#include "glue.h"

namespace metaclm {

void check_finite_rows_cuda(const at::Tensor& rows, int64_t row_offset, const char* name) {
  auto block = rows.contiguous();
  auto flag = new_row_flags(block, 1);
  check_cuda(cuda::first_nonfinite_row(block.data_ptr(), dtype_code(block), block.size(0), block.size(1), row_offset,
                                       reinterpret_cast<unsigned long long*>(flag.data_ptr<int64_t>()),
                                       current_stream()),
             "first_nonfinite_row kernel");
  const int64_t bad = flag.item<int64_t>();
  TORCH_CHECK_VALUE(bad < 0, name, " row ", bad, " contains NaN or Inf");
}

}  // namespace metaclm
