// C entry points over the CUDA launch functions, built against emu.h so that tests/test_cuda_emulated.py
// can run the device code on the CPU through ctypes. The .cu files come from a copy of csrc/cuda whose
// kernel launches and shared-memory declarations were rewritten for the emulator (see that test).
#include "emu.h"

#include "history_topk_kernel.cu"
#include "check_finite_rows_kernel.cu"
#include "history_label_mass_kernel.cu"

using namespace metaclm::cuda;

extern "C" {

void emu_configure(int sms, int smem_optin) {
  emu::sm_count = sms;
  emu::smem_optin = smem_optin;
}

// Plans and runs one history_topk merge. Returns the cudaError_t; *max_k receives the plan's largest k.
int emu_topk_merge(const float* queries, const void* history, int dtype, int64_t rows, int64_t nq, int64_t nh,
                   int64_t dh, int64_t row_offset, const int64_t* limit, int64_t k, const float* tk,
                   const int64_t* ti, const float* lk, const int64_t* li, float* out_tk, int64_t* out_ti,
                   float* out_lk, int64_t* out_li, unsigned long long* bad_row, int64_t* max_k, int* row_blocks,
                   int* queries_per_block) {
  TopkPlan plan;
  cudaError_t err = topk_plan(nq, nh, dh, rows, k, &plan, max_k);
  if (err != cudaSuccess) return err;
  *row_blocks = plan.row_blocks;
  *queries_per_block = plan.queries_per_block;
  std::vector<float> cand_keys(2 * static_cast<size_t>(plan.row_blocks) * nq * nh * k);
  std::vector<int64_t> cand_indices(cand_keys.size());
  return history_topk_merge(queries, history, static_cast<Dtype>(dtype), rows, nq, nh, dh, row_offset, limit, k, tk,
                            ti, lk, li, out_tk, out_ti, out_lk, out_li, cand_keys.data(), cand_indices.data(), plan,
                            bad_row, nullptr);
}

int emu_label_sums(const void* history, int dtype, const int64_t* labels, int64_t begin, int64_t end, int64_t width,
                   int64_t num_labels, int64_t row_offset, double* sums, unsigned long long* bad_value,
                   unsigned long long* bad_label) {
  return label_sums_accumulate(history, static_cast<Dtype>(dtype), labels, begin, end, width, num_labels, row_offset,
                               sums, bad_value, bad_label, nullptr);
}

int emu_label_readout(const double* sums, const float* queries, const int64_t* ids, int64_t count, int64_t heads,
                      int64_t head_dim, int64_t num_labels, double* mass) {
  return label_mass_readout(sums, queries, ids, count, heads, head_dim, num_labels, mass, nullptr);
}

int emu_first_nonfinite_row(const void* data, int dtype, int64_t rows, int64_t width, int64_t row_offset,
                            unsigned long long* bad_row) {
  return first_nonfinite_row(data, static_cast<Dtype>(dtype), rows, width, row_offset, bad_row, nullptr);
}
}
