"""Baselines the kernels are measured against, and this machine's limits, measured in the same run; shared
by the benchmarks in benchmarks/ and the tables of scripts/bench_table.py and scripts/bench_cuda.py.

* torch: chunked matmul (scores of a chunk for all query heads), then topk for the top and for the last,
  merged across chunks: what one writes without a custom kernel.
* FAISS: exact inner-product search (IndexFlatIP) per head; last-k is a second search with negated
  queries. The index is built outside the timed region (favouring FAISS).
* limit: max(bytes read / memory read bandwidth, flops / sgemm rate).

Label mass and the dual form are linear in the rows, so besides the baseline by scores (O(N Q D)) each
has a torch baseline by linearity (O(N D), as the kernels work): the honest best baseline. FAISS has no
operation for either (they sum over all rows rather than select), so they have no FAISS baseline.
"""
from __future__ import annotations

import time

import torch

CHUNK_ROWS = 1 << 18
SCORE_BUDGET = 1 << 27  # scores per chunk (512 MB of fp32), whatever the number of query heads


def torch_topk(queries: torch.Tensor, history: torch.Tensor, k: int):
    """Top-k and last-k (values, indices) [Q, H, k] by chunked matmul + topk."""
    q, h, dh = queries.shape
    chunk = max(4096, min(CHUNK_ROWS, SCORE_BUDGET // (q * h)))
    best_top = best_last = None
    for start in range(0, history.shape[0], chunk):
        rows = history[start : start + chunk].float().view(-1, h, dh)
        scores = torch.einsum("qhd,nhd->qhn", queries, rows)
        kk = min(k, scores.shape[-1])
        top = scores.topk(kk, dim=-1)
        last = scores.topk(kk, dim=-1, largest=False)
        top = (top.values, top.indices + start)
        last = (last.values, last.indices + start)
        best_top = top if best_top is None else _merge(best_top, top, k, True)
        best_last = last if best_last is None else _merge(best_last, last, k, False)
    return best_top, best_last


def _merge(a, b, k, largest):
    values = torch.cat([a[0], b[0]], -1)
    indices = torch.cat([a[1], b[1]], -1)
    sel = values.topk(k, dim=-1, largest=largest)
    return sel.values, indices.gather(-1, sel.indices)


def faiss_indexes(history: torch.Tensor, heads: int):
    """One IndexFlatIP per head over fp32 rows (FAISS has no fp16 flat index)."""
    import faiss  # here, not at the top: the torch baselines (bench_cuda.py's, on GPU hosts) run without FAISS

    dh = history.shape[1] // heads
    indexes = []
    for h in range(heads):
        index = faiss.IndexFlatIP(dh)
        index.add(history[:, h * dh : (h + 1) * dh].float().contiguous().numpy())
        indexes.append(index)
    return indexes


def faiss_topk(queries: torch.Tensor, indexes, k: int):
    """Top-k and last-k per head: two exact searches per head (queries and negated queries)."""
    out = []
    for h, index in enumerate(indexes):
        qh = queries[:, h].contiguous().numpy()
        out.append((index.search(qh, k), index.search(-qh, k)))
    return out


def torch_label_mass(queries, history, labels, num_labels):
    """Label mass by scores: chunked einsum of every (query head, row), summed per label."""
    q, h, dh = queries.shape
    mass = torch.zeros(q, h, num_labels, dtype=torch.float64)
    for start in range(0, history.shape[0], CHUNK_ROWS):
        rows = history[start : start + CHUNK_ROWS].float().view(-1, h, dh)
        scores = torch.einsum("qhd,nhd->qhn", queries, rows).double()
        mass.index_add_(2, labels[start : start + CHUNK_ROWS], scores)
    return mass


def torch_label_mass_linear(queries, history, labels, num_labels):
    """Label mass by linearity, as the kernel does: per-label row sums (fp64 index_add_), then one einsum."""
    q, h, dh = queries.shape
    sums = torch.zeros(num_labels, history.shape[1], dtype=torch.float64)
    for start in range(0, history.shape[0], CHUNK_ROWS):
        sums.index_add_(0, labels[start : start + CHUNK_ROWS], history[start : start + CHUNK_ROWS].double())
    return torch.einsum("qhd,lhd->qhl", queries.double(), sums.view(num_labels, h, dh))


def torch_dual_form(queries, inputs, errors):
    """Dual form by scores: <x_t, q> for every (query, row), then the error rows weighted by them."""
    out = torch.zeros(queries.shape[0], errors.shape[1], dtype=torch.float64)
    for start in range(0, inputs.shape[0], CHUNK_ROWS):
        scores = inputs[start : start + CHUNK_ROWS].float() @ queries.T
        out += (scores.T @ errors[start : start + CHUNK_ROWS].float()).double()
    return out


def torch_dual_form_linear(queries, inputs, errors):
    """Dual form by linearity, as the kernel does: the weight change sum_t e_t (x) x_t (fp32 GEMM per
    chunk, fp64 across chunks), then applied to the queries."""
    delta = torch.zeros(errors.shape[1], inputs.shape[1], dtype=torch.float64)
    for start in range(0, inputs.shape[0], CHUNK_ROWS):
        delta += (errors[start : start + CHUNK_ROWS].float().T @ inputs[start : start + CHUNK_ROWS].float()).double()
    return queries.double() @ delta.T


def best_time(fn, repeat: int = 3, budget_s: float = float("inf")) -> float:
    """Best of `repeat` runs; stops repeating once `budget_s` seconds are spent (a slow baseline runs once)."""
    best, spent = float("inf"), 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
        if spent >= budget_s:
            break
    return best


def memory_read_gbps(nbytes: int = 1 << 30) -> float:
    """Read bandwidth: a sum over a buffer far larger than the caches."""
    buf = torch.ones(nbytes // 4)
    return nbytes / best_time(lambda: buf.sum()) / 1e9


def sgemm_gflops(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_time(lambda: a @ b) / 1e9


def floor_seconds(nbytes: float, flops: float, read_gbps: float, gflops: float) -> float:
    """The machine's floor for a pass that reads `nbytes` and does `flops`: max(bytes / bandwidth, flops / sgemm)."""
    return max(nbytes / (read_gbps * 1e9), flops / (gflops * 1e9))
