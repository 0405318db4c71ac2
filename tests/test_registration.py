"""Operator registration: schemas, fake kernels (torch.compile), opcheck, the CUDA device code."""
import glob
import os
import shutil
import subprocess

import pytest
import torch

import metaclm_ext
from metaclm_ext.ops import PAD_INDEX
from helpers import requires_cuda

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = sorted(glob.glob(os.path.join(REPO, "csrc", "cuda", "*.cu")))


def _topk_args(gen, device="cpu"):
    q = torch.randn(3, 2, 4, generator=gen)
    h = torch.randn(40, 8, generator=gen)
    keys = torch.full((3, 2, 5), float("-inf"))
    idx = torch.full((3, 2, 5), PAD_INDEX, dtype=torch.int64)
    lim = torch.tensor([40, 3, 17])
    args = (q, h, 0, lim, keys, idx, keys.clone(), idx.clone())
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def _label_args(gen, device="cpu"):
    q = torch.randn(3, 2, 4, generator=gen)
    h = torch.randn(40, 8, generator=gen)
    lab = torch.randint(0, 5, (40,), generator=gen)
    args = (q, h, lab, 0, torch.tensor([40, 3, 17]), torch.zeros(5, 8, dtype=torch.float64),
            torch.zeros(3, 2, 5, dtype=torch.float64))
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def _dual_args(gen, device="cpu"):
    args = (torch.randn(3, 8, generator=gen), torch.randn(40, 8, generator=gen), torch.randn(40, 6, generator=gen),
            0, torch.tensor([40, 3, 17]), torch.zeros(6, 8, dtype=torch.float64), torch.zeros(3, 6, dtype=torch.float64))
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


OPS = [
    ("history_topk_merge", _topk_args),
    ("history_label_mass_merge", _label_args),
    ("dual_form_apply_merge", _dual_args),
]


@pytest.mark.parametrize("name, make_args", OPS)
def test_opcheck(name, make_args, gen):
    torch.library.opcheck(getattr(torch.ops.metaclm_ext, name).default, make_args(gen))


@requires_cuda
@pytest.mark.parametrize("name, make_args", OPS)
def test_opcheck_cuda(name, make_args, gen):
    torch.library.opcheck(getattr(torch.ops.metaclm_ext, name).default, make_args(gen, "cuda"))


def test_compiles_under_torch_compile(gen):
    args = _topk_args(gen)
    compiled = torch.compile(lambda *a: torch.ops.metaclm_ext.history_topk_merge(*a), fullgraph=True, backend="eager")
    for got, want in zip(compiled(*args), torch.ops.metaclm_ext.history_topk_merge(*args)):
        assert torch.equal(got, want)


def test_public_op_under_torch_compile(gen):
    q, h = torch.randn(3, 8, generator=gen), torch.randn(100, 8, generator=gen)
    compiled = torch.compile(metaclm_ext.history_topk, backend="eager")
    got, want = compiled(q, h, 4), metaclm_ext.history_topk(q, h, 4)
    assert torch.equal(got.top.indices, want.top.indices) and torch.equal(got.last.values, want.last.values)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=os.path.basename)
def test_cuda_device_code_compiles(source, tmp_path):
    """CI has no GPU: compiling the torch-free device code with nvcc is how CUDA errors get caught."""
    cmd = ["nvcc", "-c", "-std=c++17", "-O1", "--expt-relaxed-constexpr",
           "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
           "-I", os.path.join(REPO, "csrc"), source, "-o", str(tmp_path / "out.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_import_error_message_is_clear(tmp_path):
    """A checkout without the built extension fails with instructions, not a bare ImportError."""
    pkg = tmp_path / "metaclm_ext"
    shutil.copytree(os.path.dirname(metaclm_ext.__file__), pkg,
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    proc = subprocess.run([os.sys.executable, "-c", "import metaclm_ext"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "pip install --no-build-isolation ." in proc.stderr
