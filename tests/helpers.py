"""Helpers shared by the tests: comparisons for the kernel tests, a timeout for calls that could hang, and a
store rewritten in small shards (so that every rank of a distributed test gets some)."""
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import metaclm_ext
from metaclm_ext import reference as ref
from metaclm_ext.distributed import split_store
from metaclm_ext.store import HistoryStore, HistoryWriter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# The devices the reference tests run on: the CPU always, CUDA where torch sees a GPU (skipped otherwise).
# Marked `cuda`, as test_cuda.py is, so `pytest -m cuda` selects every CUDA test (scripts/device_check.sh).
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])]

# Value tolerances for kernel vs reference (relative to the largest score of the query head).
RTOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def small_ints(shape, gen, low=-3, high=4, dtype=torch.float32):
    """Integer-valued floats: every score is exact in fp32, so ties and indices can be compared exactly."""
    return torch.randint(low, high, shape, generator=gen).to(dtype)


def random_limits(gen, q, n):
    """Per-query limits [Q]: random, with the full history for query 0 and two rows for query 1."""
    lim = torch.randint(0, n + 1, (q,), generator=gen)
    lim[0] = n
    if q > 1:
        lim[1] = min(n, 2)
    return lim


def on_device(device, *tensors):
    return [t.to(device) for t in tensors]


def on_cpu(selection):
    """A Selection (values, indices) of any device, on the CPU for comparisons."""
    return type(selection)(selection.values.cpu(), selection.indices.cpu())


def assert_selection_equal(got, want):
    """Bitwise equality of a Selection (indices and values), used where scores are exact."""
    assert torch.equal(got.indices, want.indices), (got.indices, want.indices)
    assert torch.equal(got.values, want.values), (got.values, want.values)


def assert_topk_chunking_matches_reference(device, q, h, dh, n, k, chunk_rows, seed, dtype):
    """history_topk on `device` of integer data (random limits, the given chunking) is the reference's
    answer bitwise: the body of the property tests, which draw the shapes."""
    gen = torch.Generator().manual_seed(seed)
    queries = small_ints((q, h, dh), gen, dtype=dtype)
    history = small_ints((n, h * dh), gen, dtype=dtype)
    limit = torch.randint(0, n + 1, (q,), generator=gen)
    got = metaclm_ext.history_topk(*on_device(device, queries, history), k, limit=limit, chunk_rows=chunk_rows)
    want = ref.history_topk_reference(queries, history, k, limit=limit)
    assert_selection_equal(on_cpu(got.top), want.top)
    assert_selection_equal(on_cpu(got.last), want.last)


def assert_selection_close(got, want, scores, valid, descending, rtol):
    """Real-valued inputs: values within tolerance of the reference; indices identical wherever the
    reference score is distinct (more than 2 tolerances from both neighbours in the sorted scores);
    every returned index carries its true score. scores [Q, H, N] (fp64 reference), valid [Q, N]."""
    tol = rtol * scores.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6)
    finite = want.indices >= 0
    assert torch.equal(got.indices >= 0, finite), "padding differs"
    diff = (got.values.double() - want.values.double()).abs().masked_fill(~finite, 0)
    assert bool((diff <= tol).all()), f"max value error {float(diff.max())}"
    fill = float("-inf") if descending else float("inf")
    full = torch.sort(scores.masked_fill(~valid[:, None, :], fill), dim=-1, descending=descending).values
    k = want.indices.shape[-1]
    inf = torch.full_like(full[..., :1], float("inf"))
    step = (full[..., 1:] - full[..., :-1]).abs()
    gap_prev = torch.cat([inf, step], -1)[..., :k]
    gap_next = torch.cat([step, inf], -1)[..., :k]
    distinct = finite & (gap_prev > 2 * tol) & (gap_next > 2 * tol)
    assert torch.equal(got.indices[distinct], want.indices[distinct]), "indices differ at distinct scores"
    picked = scores.gather(-1, got.indices.clamp_min(0))
    err = (picked - got.values.double()).abs().masked_fill(~finite, 0)
    assert bool((err <= tol).all()), "a returned index does not carry its returned score"


def label_mass_scale(queries, history):
    """Sum of |scores| per query head [Q, H, 1]: the size of the numbers a label mass adds up."""
    return ref.history_scores(queries, history, dtype=torch.float64).abs().sum(-1, keepdim=True)


def dual_form_scale(queries, inputs, errors):
    """Sum of |terms| per output [Q, D_out]: the size of the numbers a dual form adds up."""
    return (inputs.double() @ queries.double().T).abs().T @ errors.double().abs()


def assert_sums_close(got, want, scale):
    """An fp32 result of summed terms (any device) within RTOL[fp32] of the fp64 reference, relative to
    `scale` (clamped at 1e-6)."""
    assert bool(((got.cpu().double() - want).abs() <= RTOL[torch.float32] * scale.clamp_min(1e-6)).all())


def run_with_timeout(fn, timeout_s: float) -> dict:
    """{"result": fn()} or {"error": the exception it raised}, run on a daemon thread; the calling test fails
    if fn is still running after `timeout_s` (a hang is a failure, not a stuck test run)."""
    outcome = {}

    def run():
        try:
            outcome["result"] = fn()
        except BaseException as exc:  # handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"{fn} still running after {timeout_s} s: it hangs"
    return outcome


def reshard_store(path: Path, shard_rows: int, ranks: int = 2) -> None:
    """Rewrite the store at ``path`` in place with shards of ``shard_rows`` rows (same rows, fields, attrs);
    asserts that split_store gives each of ``ranks`` ranks some rows."""
    original = HistoryStore(path)
    rows = {name: original.read(name) for name in [*original.fields, *original.columns]}
    staged = path.with_name(path.name + ".resharded")
    with HistoryWriter.create(staged, fields=original.fields, columns=original.columns, shard_rows=shard_rows,
                              attrs=original.attrs) as writer:
        writer.append(rows)
    shutil.rmtree(path)
    staged.rename(path)
    assert all(stop > start for start, stop in split_store(HistoryStore(path), ranks))


def torchrun_cli(ranks: int, args: list, cwd: Path) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node ranks -m metaclm_ext.cli *args`, run from ``cwd`` (outside the
    source tree, so the installed package is the one imported)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(ranks), "-m", "metaclm_ext.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd)
