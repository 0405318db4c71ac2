"""CUDA-only concerns of the kernels (skipped without a GPU): k up to 1100 over head dims up to 128 (the
shared-memory selection lists), ties across row blocks, CUDA's own errors (tensors on two devices, k
beyond shared memory), streaming a CPU row source through pinned buffers, and compute-sanitizer where
the machine has it. The reference comparisons of test_ops.py run on CUDA too (parametrized over devices).
"""
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import metaclm_ext
from metaclm_ext.ops import TensorRows
from helpers import DTYPES, assert_selection_equal, assert_topk_chunking_matches_reference, on_cpu, requires_cuda
from helpers import small_ints

pytestmark = [pytest.mark.cuda, requires_cuda]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each op on CUDA at a small size: the case compute-sanitizer runs (scripts/device_check.sh runs it too).
SANITIZER_CASE = os.path.join(REPO, "scripts", "cuda_sanitizer_case.py")


@settings(max_examples=25)
@given(
    q=st.integers(1, 20), h=st.integers(1, 4), dh=st.sampled_from([1, 3, 8, 16, 32, 64, 128]),
    n=st.integers(1, 3000), k_frac=st.floats(0.0, 1.0), chunk=st.integers(1, 3000),
    seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(DTYPES),
)
def test_topk_cuda_property_long_selection_lists(q, h, dh, n, k_frac, chunk, seed, dtype):
    """k up to 1100 (the selection lists in shared memory) for the head dims the CUDA plan tiles."""
    k = max(1, min(n, int(round(k_frac * min(n, 1100)))))
    assert_topk_chunking_matches_reference("cuda", q, h, dh, n, k, chunk, seed, dtype)


def test_topk_cuda_ties_across_row_blocks_go_to_lower_rows():
    """All scores equal over a history split into many row blocks: the k lowest rows, in order."""
    history = torch.ones(50_000, 16, device="cuda")
    got = metaclm_ext.history_topk(torch.ones(3, 16, device="cuda"), history, 300)
    expected = torch.arange(300).expand(3, 1, 300)
    assert torch.equal(got.top.indices.cpu(), expected) and torch.equal(got.last.indices.cpu(), expected)
    assert bool((got.top.values == 16.0).all())


# ---- bad inputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_non_finite_history_names_row(bad, dtype):
    history = torch.randn(5000, 8).to(dtype)
    history[3210, 5] = bad
    history = history.cuda()
    queries = torch.randn(3, 2, 4, device="cuda")
    with pytest.raises(ValueError, match=r"history row 3210 contains NaN or Inf"):
        metaclm_ext.history_topk(queries, history, 5, chunk_rows=1000)
    # The raw op checks every row of its chunk, also past every query's limit (as the CPU kernel does).
    keys = torch.full((3, 2, 5), float("-inf"), device="cuda")
    idx = torch.full((3, 2, 5), 2**63 - 1, dtype=torch.int64, device="cuda")
    with pytest.raises(ValueError, match=r"history row 3210 contains NaN or Inf"):
        torch.ops.metaclm_ext.history_topk_merge(queries, history, 0, torch.full((3,), 10, device="cuda"),
                                                 keys, idx, keys, idx)
    with pytest.raises(ValueError, match=r"history row 3210 contains NaN or Inf"):
        metaclm_ext.history_label_mass(queries, history, torch.zeros(5000, dtype=torch.int64, device="cuda"), 1)
    with pytest.raises(ValueError, match=r"inputs row 3210 contains NaN or Inf"):
        metaclm_ext.dual_form_apply(torch.randn(2, 8, device="cuda"), history, torch.randn(5000, 3, device="cuda"))
    with pytest.raises(ValueError, match=r"errors row 3210 contains NaN or Inf"):
        metaclm_ext.dual_form_apply(torch.randn(2, 8, device="cuda"), torch.randn(5000, 8, device="cuda"), history)


def test_cuda_bad_labels_name_row():
    queries, history = torch.randn(3, 2, 4, device="cuda"), torch.randn(50, 8, device="cuda")
    labels = torch.zeros(50, dtype=torch.int64, device="cuda")
    labels[17] = 4
    with pytest.raises(ValueError, match=r"labels row 17 is 4, outside \[0, num_labels = 4\)"):
        metaclm_ext.history_label_mass(queries, history, labels, 4)
    labels[17] = -1
    with pytest.raises(ValueError, match=r"labels row 17 is -1"):
        metaclm_ext.history_label_mass(queries, history, labels, 4, chunk_rows=7)


def test_cuda_query_against_cpu_tensor_is_refused():
    with pytest.raises(ValueError, match=r"queries are on cuda:0 but history is on cpu.*TensorRows"):
        metaclm_ext.history_topk(torch.randn(3, 8, device="cuda"), torch.randn(50, 8), 5)
    with pytest.raises(ValueError, match=r"labels is on cpu"):
        metaclm_ext.history_label_mass(torch.randn(3, 8, device="cuda"), torch.randn(50, 8, device="cuda"),
                                       torch.zeros(50, dtype=torch.int64), 2)


def test_cuda_raw_op_rejects_mixed_devices_and_huge_k():
    q = torch.randn(3, 2, 4, device="cuda")
    keys = torch.full((3, 2, 5), float("-inf"), device="cuda")
    idx = torch.zeros(3, 2, 5, dtype=torch.int64, device="cuda")
    lim = torch.full((3,), 50, device="cuda")
    with pytest.raises(ValueError, match=r"limit is on cpu but queries are on cuda:0"):
        torch.ops.metaclm_ext.history_topk_merge(q, torch.randn(50, 8, device="cuda"), 0, lim.cpu(), keys, idx, keys, idx)
    n = 1 << 17
    with pytest.raises(ValueError, match=r"k = 131072 .* more shared memory"):
        metaclm_ext.history_topk(torch.randn(1, 8, device="cuda"), torch.randn(n, 8, device="cuda"), n)


# ---- streaming a CPU row source to the GPU ------------------------------------------------------------


class FailingRows(TensorRows):
    """A row source whose disk 'fails' after a few chunks."""

    def iter_chunks(self, chunk_rows, stop):
        for i, item in enumerate(super().iter_chunks(chunk_rows, stop)):
            if i == 3:
                raise OSError("disk went away")
            yield item


@pytest.mark.parametrize("dtype", DTYPES)
def test_streaming_from_cpu_rows_equals_in_memory(dtype, gen):
    queries = small_ints((5, 4, 16), gen)
    history = small_ints((7000, 64), gen, dtype=dtype)
    labels = torch.randint(0, 7, (7000,), generator=gen)
    flat = small_ints((5, 24), gen)
    limit = torch.tensor([7000, 3, 4567, 0, 6999])
    threads = threading.active_count()
    for chunk_rows in (333, 4096):
        got = metaclm_ext.history_topk(queries.cuda(), TensorRows(history), 50, limit=limit, chunk_rows=chunk_rows)
        want = metaclm_ext.history_topk(queries.cuda(), history.cuda(), 50, limit=limit)
        assert_selection_equal(on_cpu(got.top), on_cpu(want.top))
        assert_selection_equal(on_cpu(got.last), on_cpu(want.last))
        mass = metaclm_ext.history_label_mass(queries.cuda(), TensorRows(history), TensorRows(labels), 7,
                                              limit=limit, chunk_rows=chunk_rows)
        assert torch.equal(mass, metaclm_ext.history_label_mass(queries.cuda(), history.cuda(), labels.cuda(), 7,
                                                                limit=limit, chunk_rows=chunk_rows))
        x, e = history[:, :24].contiguous(), history[:, 24:40].contiguous()
        dual = metaclm_ext.dual_form_apply(flat.cuda(), TensorRows(x), TensorRows(e), limit=limit, chunk_rows=chunk_rows)
        assert torch.equal(dual, metaclm_ext.dual_form_apply(flat.cuda(), x.cuda(), e.cuda(), limit=limit,
                                                             chunk_rows=chunk_rows))
    assert threading.active_count() == threads, "a reader thread outlived its stream"


def test_streaming_errors_surface_and_stop_the_reader(gen):
    history = torch.randn(5000, 8, generator=gen)
    threads = threading.active_count()
    with pytest.raises(OSError, match="disk went away"):
        metaclm_ext.history_topk(torch.randn(2, 8, device="cuda"), FailingRows(history), 5, chunk_rows=500)
    history[4321, 2] = float("nan")
    with pytest.raises(ValueError, match=r"history row 4321 contains NaN or Inf"):
        metaclm_ext.history_topk(torch.randn(2, 8, device="cuda"), TensorRows(history), 5, chunk_rows=500)
    assert threading.active_count() == threads


# ---- memory checking -------------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer not on PATH")
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck", "initcheck"])
def test_compute_sanitizer_clean(tool):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(["compute-sanitizer", f"--tool={tool}", "--error-exitcode=1", sys.executable, SANITIZER_CASE],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
