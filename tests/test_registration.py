"""Operator registration: schemas, fake kernels (torch.compile), opcheck, the CUDA device code."""
import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch

import metaclm_ext
from metaclm_ext.ops import PAD_INDEX
from helpers import DEVICES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = sorted(glob.glob(os.path.join(REPO, "csrc", "cuda", "*.cu")))
# Every source of a CPU-only build besides the schemas: the CPU kernels and the device-independent code.
HOST_SOURCES = sorted(
    glob.glob(os.path.join(REPO, "csrc", "cpu", "*.cpp")) + glob.glob(os.path.join(REPO, "csrc", "common", "*.cpp"))
)


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, make_args", OPS)
def test_opcheck(name, make_args, device, gen):
    torch.library.opcheck(getattr(torch.ops.metaclm_ext, name).default, make_args(gen, device))


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
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # the flags a real CUDAExtension build adds

    # -Werror all-warnings: e.g. a __host__ call from __device__ code is only a warning, and a real bug.
    cmd = ["nvcc", "-c", "-std=c++17", "-O1", "--expt-relaxed-constexpr", "-Werror", "all-warnings", *COMMON_NVCC_FLAGS,
           "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
           "-I", os.path.join(REPO, "csrc"), source, "-o", str(tmp_path / "out.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


CUDA_INCLUDE = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")


@pytest.mark.skipif(not os.path.exists(os.path.join(CUDA_INCLUDE, "cuda_runtime_api.h")) or shutil.which("c++") is None,
                    reason="no CUDA toolkit headers or no C++ compiler")
def test_cuda_glue_syntax(tmp_path):
    """The ATen glue of the CUDA ops (csrc/cuda/*.cpp) only builds with a CUDA torch; a CPU wheel still
    ships the c10/cuda headers, so a syntax check (one translation unit for speed) catches its errors."""
    from torch.utils.cpp_extension import include_paths

    unity = tmp_path / "cuda_glue.cpp"
    unity.write_text("".join(f'#include "{p}"\n' for p in sorted(glob.glob(os.path.join(REPO, "csrc", "cuda", "*.cpp")))))
    # The CPU wheel lacks c10's generated cuda_cmake_macros.h (only export macros); this define skips it.
    cmd = ["c++", "-fsyntax-only", "-std=c++17", "-Werror", "-Wall", "-Wno-c++20-extensions",
           "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", *(f"-I{p}" for p in include_paths()), f"-I{CUDA_INCLUDE}",
           f"-I{sysconfig.get_paths()['include']}", str(unity)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
@pytest.mark.parametrize("source", HOST_SOURCES, ids=os.path.basename)
def test_cpu_kernels_compile_without_native_isa(source):
    """The build uses -march=native (METACLM_PORTABLE=1 drops it), and the CPU kernels have AVX-512 and
    F16C paths with fallbacks: check that the fallbacks compile for plain x86-64 as well."""
    from torch.utils.cpp_extension import include_paths

    cmd = ["c++", "-fsyntax-only", "-std=c++17", "-fopenmp", "-Wno-psabi", *(f"-I{p}" for p in include_paths()),
           f"-I{sysconfig.get_paths()['include']}", "-I", os.path.join(REPO, "csrc"), source]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_packaged_paper_numbers_are_the_shared_ones():
    """metaclm_ext ships a verbatim copy of ../shared/paper/paper-numbers.json: numbers are never retyped."""
    from metaclm_ext import paper

    shared = os.path.join(REPO, "..", "shared", "paper", "paper-numbers.json")
    assert os.path.exists(paper.PACKAGED)
    if os.path.exists(shared):  # present in the project's checkouts and CI
        with open(shared, "rb") as a, open(paper.PACKAGED, "rb") as b:
            assert a.read() == b.read(), "metaclm_ext/paper-numbers.json differs from shared/paper: copy it again"
    assert "table1_nondecreasing_norm_percent" in paper.paper_numbers()
