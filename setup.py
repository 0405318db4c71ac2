"""Build metaclm_ext._C: CPU kernels always, CUDA kernels when torch has CUDA and a toolkit is found.

Install torch first, then `pip install .`: build_backend/torch_aware.py builds against that torch (see
README); `pip install --no-build-isolation .` does the same without an isolated build environment.
"""
import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - only hit by a misconfigured build
    raise SystemExit(
        "metaclm_ext builds against the torch of the environment it is installed into, and this one has "
        "none. Install torch first (pip install -r requirements.txt for the CPU build, or your CUDA build "
        "of torch), then run pip install . again."
    ) from exc

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def extension():
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("METACLM_NO_CUDA", "0") != "1"
    )
    # -march=native: this is a source build for the machine it runs on; METACLM_PORTABLE=1 turns it off.
    arch = [] if os.environ.get("METACLM_PORTABLE", "0") == "1" else ["-march=native"]
    cxx = ["-O3", "-g0", "-fopenmp", "-std=c++17", *arch]
    sources = _sources("csrc/*.cpp") + _sources("csrc/common/*.cpp") + _sources("csrc/cpu/*.cpp")
    if not with_cuda:
        return CppExtension(
            "metaclm_ext._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )
    sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    # No -g0 here: nvcc rejects it (and emits no host debug info unless asked with -g).
    nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
    for arch_code in os.environ.get("METACLM_CUDA_ARCHS", "80;90").split(";"):
        nvcc += [f"-gencode=arch=compute_{arch_code},code=sm_{arch_code}"]
    return CUDAExtension(
        "metaclm_ext._C",
        sources,
        define_macros=[("METACLM_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="metaclm_ext",
    version="0.1.0",
    description="Transformers as inner optimisation over their training history (arXiv 2310.05884): "
    "C++/CUDA history kernels and research toolkit",
    packages=find_packages(include=["metaclm_ext", "metaclm_ext.*"]),
    package_data={"metaclm_ext": ["paper-numbers.json"]},
    python_requires=">=3.10",
    # torch is not listed: the extension is built against, and must run with, the torch already installed.
    install_requires=["numpy>=1.26", "tqdm>=4.66"],
    extras_require={  # the research toolkit beyond the kernels and the store (requirements.txt pins a tested set)
        "toolkit": ["transformers>=4.46", "tokenizers", "safetensors", "accelerate", "gguf", "faiss-cpu>=1.8",
                    "matplotlib>=3.8", "scikit-learn>=1.4", "scipy", "exrex>=0.11", "gensim>=4.3"],
    },
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["metaclm = metaclm_ext.cli:main"]},
    zip_safe=False,
)
