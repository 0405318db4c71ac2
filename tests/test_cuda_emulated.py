"""The CUDA device code (csrc/cuda/*.cu) run on CPU threads through tests/cuda_emu/emu.h, checked
against the CPU kernels and the references. With no GPU in CI this is how the kernels' logic (tiles,
selection lists, thresholds, block merges, worst-first state, row/label error reports) and their
block-level synchronisation get exercised; GPU-only behaviour is covered by test_cuda.py on a GPU.
"""
import ctypes
import glob
import os
import re
import shutil
import subprocess

import pytest
import torch

from metaclm_ext import reference as ref
from metaclm_ext.ops import PAD_INDEX, HistoryTopK, _finalize_selection
from helpers import DTYPES
from helpers import RTOL, assert_selection_close, assert_selection_equal, random_limits, small_ints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_INCLUDE = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")
pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(CUDA_INCLUDE, "cuda_fp16.h")) or shutil.which("g++") is None,
    reason="needs the CUDA toolkit headers and g++",
)
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
I64, I32, PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
INVALID_VALUE = 1  # cudaErrorInvalidValue


def _rewrite(source: str) -> str:
    """A kernel launch `k<<<grid, block, smem, stream>>>(args)` becomes emu::launch(k, grid, ..., args),
    and the dynamic shared memory array a pointer to the emulator's per-launch buffer."""
    source = source.replace("extern __shared__ __align__(16) char smem_raw[];", "char* smem_raw = emu::shared_base;")
    return re.sub(r"([\w:]+(?:<\w+>)?)<<<(.*?)>>>\(", r"emu::launch(\1, \2, ", source, flags=re.S)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    build = tmp_path_factory.mktemp("cuda_emu")
    for path in glob.glob(os.path.join(REPO, "csrc", "cuda", "*.cu*")):
        with open(path) as f:
            text = f.read()
        (build / os.path.basename(path)).write_text(_rewrite(text) if path.endswith(".cu") else text)
    lib_path = build / "libemu.so"
    cmd = ["g++", "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-Wno-attributes",
           f"-I{build}", f"-I{os.path.join(REPO, 'tests', 'cuda_emu')}", f"-I{CUDA_INCLUDE}",
           os.path.join(REPO, "tests", "cuda_emu", "harness.cpp"), "-o", str(lib_path)]
    # METACLM_EMU_SANITIZE=address builds the emulator with ASan (run python with LD_PRELOAD=libasan.so).
    if os.environ.get("METACLM_EMU_SANITIZE"):
        cmd.insert(1, f"-fsanitize={os.environ['METACLM_EMU_SANITIZE']}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lib = ctypes.CDLL(str(lib_path))
    lib.emu_configure.argtypes = [I32, I32]
    lib.emu_topk_merge.argtypes = [PTR, PTR, I32, I64, I64, I64, I64, I64, PTR, I64, PTR, PTR, PTR, PTR, PTR, PTR,
                                   PTR, PTR, PTR, ctypes.POINTER(I64), ctypes.POINTER(I32), ctypes.POINTER(I32)]
    lib.emu_label_sums.argtypes = [PTR, I32, PTR, I64, I64, I64, I64, I64, PTR, PTR, PTR]
    lib.emu_label_readout.argtypes = [PTR, PTR, PTR, I64, I64, I64, I64, PTR]
    lib.emu_first_nonfinite_row.argtypes = [PTR, I32, I64, I64, I64, PTR]
    lib.emu_configure(4, 227 * 1024)  # an H100's shared memory, few SMs: several row blocks
    return lib


def _p(t):
    return ctypes.c_void_p(t.data_ptr())


def _flag():
    return torch.full((1,), -1, dtype=torch.int64)


def _topk_state(q, h, k):
    keys = torch.full((q, h, k), float("-inf"))
    idx = torch.full((q, h, k), PAD_INDEX, dtype=torch.int64)
    return [keys, idx, keys.clone(), idx.clone()]


def _merge(lib, queries, rows, offset, limit, state):
    """One emulated history_topk_merge; returns (new state, bad row or -1, plan (max_k, row_blocks, P))."""
    q_, h, dh = queries.shape
    k = state[0].shape[2]
    out = [torch.empty_like(t) for t in state]
    bad, max_k, row_blocks, per_block = _flag(), I64(), I32(), I32()
    err = lib.emu_topk_merge(_p(queries), _p(rows), DTYPE_CODE[rows.dtype], rows.shape[0], q_, h, dh, offset,
                             _p(limit), k, *map(_p, state), *map(_p, out), _p(bad), ctypes.byref(max_k),
                             ctypes.byref(row_blocks), ctypes.byref(per_block))
    assert err == 0, f"cudaError {err}"
    return out, int(bad), (max_k.value, row_blocks.value, per_block.value)


def _emu_topk(lib, queries, history, k, limit, chunk_rows=None, cpu_every_other=False):
    """history_topk through the emulated kernel, chunk by chunk like metaclm_ext.ops does."""
    queries = queries.float().contiguous()
    state = _topk_state(queries.shape[0], queries.shape[1], k)
    chunk_rows = chunk_rows or history.shape[0]
    for i, offset in enumerate(range(0, int(limit.max()), chunk_rows)):
        rows = history[offset : offset + chunk_rows].contiguous()
        if cpu_every_other and i % 2:  # the CPU kernel must accept the emulated state (a valid heap)
            state = list(torch.ops.metaclm_ext.history_topk_merge(queries, rows, offset, limit, *state))
            continue
        state, bad, _ = _merge(lib, queries, rows, offset, limit, state)
        assert bad == -1
    return HistoryTopK(_finalize_selection(state[0], state[1], False), _finalize_selection(state[2], state[3], True))


# (Q, H, Dh, N, k): a few of test_ops' shapes, head dims 8..128, two query groups (Q > 16), k = 1024.
SHAPES = [
    (1, 1, 1, 1, 1),
    (3, 8, 8, 700, 10),
    (2, 1, 64, 900, 300),
    (20, 2, 16, 500, 7),
    (7, 2, 3, 513, 4),
    (2, 1, 128, 1500, 1024),
    (2, 1, 96, 400, 33),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_emulated_topk_exact_matches_reference(emu, shape, dtype, gen):
    q_, h, dh, n, k = shape
    queries = small_ints((q_, h, dh), gen)
    history = small_ints((n, h * dh), gen, dtype=dtype)
    limit = random_limits(gen, q_, n)
    want = ref.history_topk_reference(queries, history, k, limit=limit)
    for chunk_rows, mixed in ((None, False), (97, False), (131, True)):
        got = _emu_topk(emu, queries, history, k, limit, chunk_rows, cpu_every_other=mixed)
        assert_selection_equal(got.top, want.top)
        assert_selection_equal(got.last, want.last)


@pytest.mark.parametrize("shape", SHAPES[1:4])
def test_emulated_topk_random_floats(emu, shape, gen):
    q_, h, dh, n, k = shape
    queries, history = torch.randn(q_, h, dh, generator=gen), torch.randn(n, h * dh, generator=gen)
    limit = random_limits(gen, q_, n)
    got = _emu_topk(emu, queries, history, k, limit, 211)
    want = ref.history_topk_reference(queries, history, k, limit=limit)
    scores = ref.history_scores(queries, history, dtype=torch.float64)
    valid = torch.arange(n) < limit[:, None]
    assert_selection_close(got.top, want.top, scores, valid, True, RTOL[torch.float32])
    assert_selection_close(got.last, want.last, scores, valid, False, RTOL[torch.float32])


def test_emulated_topk_ties_across_row_blocks(emu):
    history = torch.ones(3000, 8)
    limit = torch.tensor([3000, 3000])
    _, _, (_, row_blocks, _) = _merge(emu, torch.ones(2, 1, 8), history, 0, limit, _topk_state(2, 1, 50))
    assert row_blocks > 1, "the tie test must span several row blocks"
    got = _emu_topk(emu, torch.ones(2, 1, 8), history, 50, limit)
    assert got.top.indices.tolist() == [[list(range(50))]] * 2
    assert got.last.indices.tolist() == [[list(range(50))]] * 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_topk_reports_first_nonfinite_row(emu, dtype):
    history = torch.randn(2000, 16).to(dtype)
    history[1234, 3] = float("nan")
    history[1500, 0] = float("inf")
    queries = torch.randn(3, 2, 8)
    for limit in (torch.tensor([2000, 5, 7]), torch.tensor([10, 10, 10])):  # also past every limit
        _, bad, _ = _merge(emu, queries, history[1000:], 1000, limit, _topk_state(3, 2, 5))
        assert bad == 1234


def test_emulated_topk_plan_limits_k_by_shared_memory(emu):
    emu.emu_configure(4, 100 * 1024)
    try:
        state = _topk_state(1, 1, 4096)
        out = [torch.empty_like(t) for t in state]
        max_k, rb, pb = I64(), I32(), I32()
        history = torch.randn(5000, 64)
        err = emu.emu_topk_merge(_p(torch.randn(1, 1, 64)), _p(history), 0, 5000, 1, 1, 64, 0, _p(torch.tensor([5000])),
                                 4096, *map(_p, state), *map(_p, out), _p(_flag()), ctypes.byref(max_k),
                                 ctypes.byref(rb), ctypes.byref(pb))
        assert err == INVALID_VALUE and 1024 <= max_k.value < 4096
    finally:
        emu.emu_configure(4, 227 * 1024)


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_label_sums_and_readout(emu, dtype, gen):
    n, h, dh, num_labels = 1500, 2, 8, 5
    history = small_ints((n, h * dh), gen, dtype=dtype)
    labels = torch.randint(0, num_labels, (n,), generator=gen)
    labels[:300] = 2  # a long run of one label: one flush per thread
    sums = torch.zeros(num_labels, h * dh, dtype=torch.float64)
    bad_value, bad_label = _flag(), _flag()
    for begin, end in ((0, 700), (700, 701), (701, n)):
        assert emu.emu_label_sums(_p(history), DTYPE_CODE[dtype], _p(labels), begin, end, h * dh, num_labels, 5000,
                                  _p(sums), _p(bad_value), _p(bad_label)) == 0
    want = torch.zeros_like(sums).index_add_(0, labels, history.double())
    assert torch.equal(sums, want) and int(bad_value) == -1 and int(bad_label) == -1
    queries = small_ints((4, h, dh), gen)
    ids = torch.tensor([3, 0])
    mass = torch.full((4, h, num_labels), -7.0, dtype=torch.float64)
    assert emu.emu_label_readout(_p(sums), _p(queries), _p(ids), 2, h, dh, num_labels, _p(mass)) == 0
    expected = torch.einsum("lhd,qhd->qhl", sums.view(num_labels, h, dh), queries.double())
    assert torch.equal(mass[ids], expected[ids]) and bool((mass[[1, 2]] == -7.0).all())


def test_emulated_label_sums_report_rows(emu, gen):
    history = torch.randn(900, 8, generator=gen)
    labels = torch.randint(0, 3, (900,), generator=gen)
    labels[444], labels[600] = 3, -1
    history[700, 1] = float("-inf")
    sums = torch.zeros(3, 8, dtype=torch.float64)
    bad_value, bad_label = _flag(), _flag()
    assert emu.emu_label_sums(_p(history), 0, _p(labels), 0, 900, 8, 3, 100, _p(sums), _p(bad_value), _p(bad_label)) == 0
    assert int(bad_label) == 544 and int(bad_value) == 800


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_first_nonfinite_row(emu, dtype):
    rows = torch.randn(3000, 12).to(dtype)
    flag = _flag()
    assert emu.emu_first_nonfinite_row(_p(rows), DTYPE_CODE[dtype], 3000, 12, 10, _p(flag)) == 0
    assert int(flag) == -1
    rows[2999, 11], rows[1717, 0] = float("nan"), float("inf")
    assert emu.emu_first_nonfinite_row(_p(rows), DTYPE_CODE[dtype], 3000, 12, 10, _p(flag)) == 0
    assert int(flag) == 1727
