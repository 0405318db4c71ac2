"""pytest-benchmark: the three ops against chunked torch and FAISS on the paper's shapes.

Attention histories: H = 8 heads of Dh = 8, fp16; FFN histories: D = 128; Q = 200 validation queries;
k = 10. Size: METACLM_BENCH_ROWS (default: a smoke size). Every benchmark also checks its answer
against the baseline, so a fast wrong kernel cannot pass.
"""
import pytest
import torch

import metaclm_ext
from metaclm_ext import baselines, reference

K = 10


def _same_top_values(ours, theirs_values):
    assert torch.allclose(ours.values, theirs_values, rtol=1e-4, atol=1e-4)


@pytest.mark.benchmark(group="history_topk attn H=8 Dh=8 fp16")
def test_topk_attn_ours(benchmark, attn_data):
    queries, history = attn_data
    res = benchmark(metaclm_ext.history_topk, queries, history, K)
    (top_v, _), (last_v, _) = baselines.torch_topk(queries, history, K)
    _same_top_values(res.top, top_v)
    _same_top_values(res.last, last_v)


@pytest.mark.benchmark(group="history_topk attn H=8 Dh=8 fp16")
def test_topk_attn_torch(benchmark, attn_data):
    queries, history = attn_data
    benchmark(baselines.torch_topk, queries, history, K)


@pytest.mark.benchmark(group="history_topk attn H=8 Dh=8 fp16")
def test_topk_attn_faiss(benchmark, attn_data):
    queries, history = attn_data
    indexes = baselines.faiss_indexes(history, 8)
    out = benchmark(baselines.faiss_topk, queries, indexes, K)
    ours = metaclm_ext.history_topk(queries, history, K)
    assert torch.allclose(ours.top.values[:, 0], torch.from_numpy(out[0][0][0]), rtol=1e-4, atol=1e-4)


@pytest.mark.benchmark(group="history_topk attn per-checkpoint limits")
def test_topk_attn_checkpoint_limits(benchmark, attn_data):
    """The analysis' shape: the queries of 30 checkpoints together, each group limited to the rows
    recorded up to its checkpoint (scripts/bench_table.py --analysis-only at the paper's size)."""
    _, history = attn_data
    checkpoints, per = 30, 20
    queries = torch.randn(checkpoints * per, 8, 8, generator=torch.Generator().manual_seed(3))
    limit = torch.arange(1, checkpoints + 1).mul(history.shape[0]).div(checkpoints, rounding_mode="floor")
    limit = limit.repeat_interleave(per)
    res = benchmark(metaclm_ext.history_topk, queries, history, K, limit=limit)
    want = reference.history_topk_reference(queries, history, K, limit=limit)
    _same_top_values(res.top, want.top.values)
    _same_top_values(res.last, want.last.values)


@pytest.mark.benchmark(group="history_topk ffn D=128 fp16")
def test_topk_ffn_ours(benchmark, ffn_data):
    queries, inputs, _ = ffn_data
    res = benchmark(metaclm_ext.history_topk, queries, inputs, K)
    (top_v, _), _ = baselines.torch_topk(queries[:, None], inputs, K)
    _same_top_values(res.top, top_v)


@pytest.mark.benchmark(group="history_topk ffn D=128 fp16")
def test_topk_ffn_torch(benchmark, ffn_data):
    queries, inputs, _ = ffn_data
    benchmark(baselines.torch_topk, queries[:, None], inputs, K)


@pytest.mark.benchmark(group="history_topk ffn D=128 fp16")
def test_topk_ffn_faiss(benchmark, ffn_data):
    queries, inputs, _ = ffn_data
    indexes = baselines.faiss_indexes(inputs, 1)
    benchmark(baselines.faiss_topk, queries[:, None], indexes, K)


@pytest.mark.benchmark(group="history_label_mass attn 280 labels")
def test_label_mass_ours(benchmark, attn_data):
    queries, history = attn_data
    labels = torch.randint(0, 280, (history.shape[0],), generator=torch.Generator().manual_seed(2))
    got = benchmark(metaclm_ext.history_label_mass, queries, history, labels, 280)
    want = baselines.torch_label_mass(queries, history, labels, 280)
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-2)


@pytest.mark.benchmark(group="history_label_mass attn 280 labels")
def test_label_mass_torch(benchmark, attn_data):
    queries, history = attn_data
    labels = torch.randint(0, 280, (history.shape[0],), generator=torch.Generator().manual_seed(2))
    benchmark(baselines.torch_label_mass, queries, history, labels, 280)


@pytest.mark.benchmark(group="dual_form_apply D=128 fp16")
def test_dual_form_ours(benchmark, ffn_data):
    queries, inputs, errors = ffn_data
    got = benchmark(metaclm_ext.dual_form_apply, queries, inputs, errors)
    want = baselines.torch_dual_form(queries, inputs, errors)
    assert torch.allclose(got.double(), want, rtol=1e-3, atol=1e-1)


@pytest.mark.benchmark(group="dual_form_apply D=128 fp16")
def test_dual_form_torch(benchmark, ffn_data):
    queries, inputs, errors = ffn_data
    benchmark(baselines.torch_dual_form, queries, inputs, errors)


@pytest.mark.benchmark(group="history_label_mass attn 280 labels")
def test_label_mass_torch_linear(benchmark, attn_data):
    queries, history = attn_data
    labels = torch.randint(0, 280, (history.shape[0],), generator=torch.Generator().manual_seed(2))
    got = benchmark(baselines.torch_label_mass_linear, queries, history, labels, 280)
    assert torch.allclose(got, baselines.torch_label_mass(queries, history, labels, 280), rtol=1e-4, atol=1e-2)


@pytest.mark.benchmark(group="dual_form_apply D=128 fp16")
def test_dual_form_torch_linear(benchmark, ffn_data):
    queries, inputs, errors = ffn_data
    got = benchmark(baselines.torch_dual_form_linear, queries, inputs, errors)
    assert torch.allclose(got, baselines.torch_dual_form(queries, inputs, errors), rtol=1e-3, atol=1e-1)
