"""Where a result came from: the code's commit and the machine, recorded in every stage.json and REPORT.md."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def _checkout_commit(folder: Path, marker: str) -> str:
    """``sha[ + uncommitted changes]`` of the git checkout holding ``folder`` if it tracks ``marker``; raises else."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    git("ls-files", "--error-unmatch", marker)  # an installed copy inside some other checkout is not one
    sha, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    return f"{sha}{' + uncommitted changes' if dirty else ''}"


def commit() -> str:
    """The checkout's commit (and whether it had uncommitted changes), else the package version.

    An installed package (as `make demo` runs it) is not a checkout: then the working directory's checkout
    of this project is named, the one `pip install .` is normally run from.
    """
    from .. import __version__

    try:
        return f"{_checkout_commit(Path(__file__).resolve().parent.parent, '__init__.py')} (metaclm_ext {__version__})"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        sha = _checkout_commit(Path.cwd(), "metaclm_ext/__init__.py")
        return f"{sha} (installed metaclm_ext {__version__}; the checkout in the working directory)"
    except (OSError, subprocess.SubprocessError):
        return f"metaclm_ext {__version__} (not a git checkout)"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    cpu = cpu_model()
    try:
        mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal"))
        ram = f"{mem_kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        ram = "RAM unknown"
    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "ram": ram, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "device": device, "load_average": list(load) if load else None}
