// Operator schemas of metaclm_ext, declared once. CPU implementations live in csrc/cpu/, CUDA ones in
// csrc/cuda/; each registers itself with TORCH_LIBRARY_IMPL, so one dispatcher serves both devices.
//
// Every op is a *merge*: it folds one chunk of the history (rows row_offset .. row_offset+n) into a
// running state and returns the new state. The Python wrappers in metaclm_ext/ops.py stream chunks
// (slices of a tensor, or shards of a HistoryStore) through these ops, so memory stays bounded by the
// chunk size and a store far larger than RAM is processed in one pass.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import metaclm_ext._C` loads this library, which runs the static registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(metaclm_ext, m) {
  // State (k-entry heaps, keys: larger is better): top keys are scores, last keys are negated scores;
  // padding entries have key -inf and index INT64_MAX. queries: fp32 [Q, H, Dh]; history [n, H*Dh].
  m.def(
      "history_topk_merge(Tensor queries, Tensor history, int row_offset, Tensor limit, "
      "Tensor top_keys, Tensor top_indices, Tensor last_keys, Tensor last_indices) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // State: per-label sums of history rows seen so far (fp64 [L, D]) and the mass (fp64 [Q, H, L]),
  // written for each query when the stream passes its limit.
  m.def(
      "history_label_mass_merge(Tensor queries, Tensor history, Tensor labels, int row_offset, "
      "Tensor limit, Tensor label_sums, Tensor mass) -> (Tensor, Tensor)");
  // State: the accumulated weight change sum_t errors[t] (x) inputs[t] (fp64 [D_out, D_in]) and the
  // outputs (fp64 [Q, D_out]), written for each query when the stream passes its limit.
  m.def(
      "dual_form_apply_merge(Tensor queries, Tensor inputs, Tensor errors, int row_offset, "
      "Tensor limit, Tensor weight_delta, Tensor out) -> (Tensor, Tensor)");
}
