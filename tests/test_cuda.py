"""The CUDA kernels against the CPU kernels and the plain PyTorch references (skipped without a GPU).

Same comparisons as test_ops.py, plus CUDA-only concerns: head dims 8..128 and k up to 2048 (the
shared-memory selection lists), many row blocks and query groups, ties across blocks, streaming a CPU
row source through pinned buffers, and compute-sanitizer where the machine has it.
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
from metaclm_ext import reference as ref
from metaclm_ext.ops import TensorRows
from helpers import DTYPES, requires_cuda
from helpers import RTOL, assert_selection_close, assert_selection_equal, assert_sums_close, random_limits, small_ints
from helpers import dual_form_scale, label_mass_scale
from test_ops import SHAPES

pytestmark = requires_cuda

# test_ops' shapes plus head dims 8..128 (and FFN-sized 768), k up to 2048, more than 16 queries (several
# query groups per head), and histories long enough to be split over many row blocks.
CUDA_SHAPES = SHAPES + [
    (4, 8, 8, 3000, 64),
    (3, 4, 16, 2500, 128),
    (5, 2, 64, 4000, 1000),
    (2, 1, 128, 6000, 1024),
    (3, 1, 96, 1200, 17),
    (2, 1, 768, 700, 50),
    (33, 2, 16, 900, 8),
    (1, 1, 64, 4100, 2048),
]


def _cuda(*tensors):
    return [t.cuda() for t in tensors]


def _cpu_selection(sel):
    return type(sel)(sel.values.cpu(), sel.indices.cpu())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_topk_exact_scores_cuda_equals_cpu_and_reference(shape, dtype, gen):
    """Integer-valued data: CUDA, CPU and reference agree bitwise (indices, ties and values)."""
    q_, h, dh, n, k = shape
    queries = small_ints((q_, h, dh), gen, dtype=dtype)
    history = small_ints((n, h * dh), gen, dtype=dtype)
    limit = random_limits(gen, q_, n)
    want = ref.history_topk_reference(queries, history, k, limit=limit)
    cpu = metaclm_ext.history_topk(queries, history, k, limit=limit)
    for chunk_rows in (None, 97):
        got = metaclm_ext.history_topk(*_cuda(queries, history), k, limit=limit.cuda(), chunk_rows=chunk_rows)
        assert got.top.indices.is_cuda
        for g, w, c in ((got.top, want.top, cpu.top), (got.last, want.last, cpu.last)):
            assert_selection_equal(_cpu_selection(g), w)
            assert_selection_equal(_cpu_selection(g), c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_topk_random_floats_cuda_match_reference(shape, dtype, gen):
    q_, h, dh, n, k = shape
    queries = torch.randn(q_, h, dh, generator=gen)
    history = torch.randn(n, h * dh, generator=gen).to(dtype)
    limit = random_limits(gen, q_, n)
    got = metaclm_ext.history_topk(*_cuda(queries, history), k, limit=limit)
    want = ref.history_topk_reference(queries, history, k, limit=limit)
    scores = ref.history_scores(queries, history, dtype=torch.float64)
    valid = torch.arange(n) < limit[:, None]
    assert_selection_close(_cpu_selection(got.top), want.top, scores, valid, True, RTOL[torch.float32])
    assert_selection_close(_cpu_selection(got.last), want.last, scores, valid, False, RTOL[torch.float32])


@settings(max_examples=25)
@given(
    q=st.integers(1, 20), h=st.integers(1, 4), dh=st.sampled_from([1, 3, 8, 16, 32, 64, 128]),
    n=st.integers(1, 3000), k_frac=st.floats(0.0, 1.0), chunk=st.integers(1, 3000),
    seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(DTYPES),
)
def test_topk_cuda_property_chunking_and_reference(q, h, dh, n, k_frac, chunk, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    k = max(1, min(n, int(round(k_frac * min(n, 1100)))))
    queries = small_ints((q, h, dh), gen, dtype=dtype)
    history = small_ints((n, h * dh), gen, dtype=dtype)
    limit = torch.randint(0, n + 1, (q,), generator=gen)
    got = metaclm_ext.history_topk(*_cuda(queries, history), k, limit=limit, chunk_rows=chunk)
    want = ref.history_topk_reference(queries, history, k, limit=limit)
    assert_selection_equal(_cpu_selection(got.top), want.top)
    assert_selection_equal(_cpu_selection(got.last), want.last)


def test_topk_cuda_ties_across_row_blocks_go_to_lower_rows():
    """All scores equal over a history split into many row blocks: the k lowest rows, in order."""
    history = torch.ones(50_000, 16, device="cuda")
    got = metaclm_ext.history_topk(torch.ones(3, 16, device="cuda"), history, 300)
    expected = torch.arange(300).expand(3, 1, 300)
    assert torch.equal(got.top.indices.cpu(), expected) and torch.equal(got.last.indices.cpu(), expected)
    assert bool((got.top.values == 16.0).all())


def test_topk_cuda_padding_when_fewer_candidates_than_k(gen):
    history = torch.randn(20, 8, generator=gen).cuda()
    queries = torch.randn(3, 8, generator=gen).cuda()
    got = metaclm_ext.history_topk(queries, history, 6, limit=torch.tensor([0, 2, 20]))
    want = metaclm_ext.history_topk(queries.cpu(), history.cpu(), 6, limit=torch.tensor([0, 2, 20]))
    assert torch.equal(got.top.indices.cpu(), want.top.indices)
    assert torch.equal(got.last.indices.cpu(), want.last.indices)
    assert torch.isneginf(got.top.values[0]).all() and torch.isposinf(got.last.values[0]).all()


def test_topk_cuda_query_dtype_mixes(gen):
    history = small_ints((400, 16), gen, dtype=torch.float16)
    for qdtype in DTYPES:
        queries = small_ints((3, 2, 8), gen, dtype=qdtype)
        got = metaclm_ext.history_topk(*_cuda(queries, history), 5)
        want = ref.history_topk_reference(queries.float(), history, 5)
        assert_selection_equal(_cpu_selection(got.top), want.top)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_label_mass_cuda_matches_reference(shape, dtype, gen):
    q_, h, dh, n, _ = shape
    num_labels = int(torch.randint(1, 12, (1,), generator=gen))
    queries = torch.randn(q_, h, dh, generator=gen)
    history = torch.randn(n, h * dh, generator=gen).to(dtype)
    labels = torch.randint(0, num_labels, (n,), generator=gen)
    limit = random_limits(gen, q_, n)
    want = ref.history_label_mass_reference(queries, history, labels, num_labels, limit=limit)
    scale = label_mass_scale(queries, history)
    for chunk_rows in (None, 61):
        got = metaclm_ext.history_label_mass(*_cuda(queries, history, labels), num_labels, limit=limit,
                                             chunk_rows=chunk_rows)
        assert got.is_cuda and got.dtype == torch.float32 and got.shape == (q_, h, num_labels)
        assert_sums_close(got, want, scale)


@settings(max_examples=25)
@given(n=st.integers(1, 3000), labels=st.integers(1, 9), chunk=st.integers(1, 3000), seed=st.integers(0, 2**31 - 1))
def test_label_mass_cuda_property_exact_on_integer_data(n, labels, chunk, seed):
    gen = torch.Generator().manual_seed(seed)
    queries = small_ints((3, 2, 4), gen)
    history = small_ints((n, 8), gen)
    lab = torch.randint(0, labels, (n,), generator=gen)
    limit = torch.randint(0, n + 1, (3,), generator=gen)
    got = metaclm_ext.history_label_mass(*_cuda(queries, history, lab), labels, limit=limit, chunk_rows=chunk)
    want = ref.history_label_mass_reference(queries, history, lab, labels, limit=limit)
    assert torch.equal(got.cpu().double(), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", [(1, 1, 1, 1), (5, 64, 64, 1000), (3, 128, 64, 2500), (8, 7, 13, 300), (200, 16, 4, 90)])
def test_dual_form_cuda_matches_reference(dims, dtype, gen):
    q_, d_in, d_out, n = dims
    queries = torch.randn(q_, d_in, generator=gen)
    inputs = torch.randn(n, d_in, generator=gen).to(dtype)
    errors = torch.randn(n, d_out, generator=gen).to(dtype)
    limit = random_limits(gen, q_, n)
    want = ref.dual_form_apply_reference(queries, inputs, errors, limit=limit)
    scale = dual_form_scale(queries, inputs, errors)
    for chunk_rows in (None, 37):
        got = metaclm_ext.dual_form_apply(*_cuda(queries, inputs, errors), limit=limit.cuda(), chunk_rows=chunk_rows)
        assert got.is_cuda and got.dtype == torch.float32 and got.shape == (q_, d_out)
        assert_sums_close(got, want, scale)


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
        assert_selection_equal(_cpu_selection(got.top), _cpu_selection(want.top))
        assert_selection_equal(_cpu_selection(got.last), _cpu_selection(want.last))
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

SANITIZED = """
import torch, metaclm_ext
g = torch.Generator().manual_seed(0)
for dh, k in ((8, 3), (64, 100), (128, 1024)):
    h = torch.randint(-3, 4, (3000, 2 * dh), generator=g).half().cuda()
    q = torch.randn(20, 2, dh, generator=g).cuda()
    metaclm_ext.history_topk(q, h, k, limit=torch.randint(0, 3001, (20,), generator=g), chunk_rows=1111)
    metaclm_ext.history_label_mass(q, h, torch.randint(0, 5, (3000,), generator=g).cuda(), 5, chunk_rows=1111)
metaclm_ext.dual_form_apply(torch.randn(4, 16).cuda(), torch.randn(300, 16).cuda(), torch.randn(300, 8).cuda())
torch.cuda.synchronize()
"""


@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer not on PATH")
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck", "initcheck"])
def test_compute_sanitizer_clean(tool):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(["compute-sanitizer", f"--tool={tool}", "--error-exitcode=1", sys.executable, "-c", SANITIZED],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
