"""scripts/device_check.sh, the one command a lent GPU machine runs, rehearsed here: its syntax, shellcheck
where installed, and its dry run (every step but the build, with the metaclm_ext these tests import)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import metaclm_ext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "device_check.sh")


def test_device_check_syntax():
    proc = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_device_check_shellcheck():
    proc = subprocess.run(["shellcheck", SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_device_check_needs_an_output_folder():
    proc = subprocess.run(["bash", SCRIPT, "--dry-run"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage:" in proc.stderr


@pytest.mark.slow
def test_device_check_dry_run(tmp_path):
    """Every step runs and passes, and the outputs are the few files a GPU machine sends back."""
    package_parent = os.path.dirname(os.path.dirname(metaclm_ext.__file__))
    env = dict(os.environ, DEVICE_CHECK_PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])))
    out = tmp_path / "out"
    proc = subprocess.run(["bash", SCRIPT, "--dry-run", "--no-build", str(out)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["passed"]
    assert [s["step"] for s in summary["steps"]] == ["env", "check", "tests", "sanitizer-case", "bench"]
    assert all(s["status"] == "passed" for s in summary["steps"])
    tests = next(s for s in summary["steps"] if s["step"] == "tests")
    assert any(" tests collected" in line for line in tests["last_lines"]), tests["last_lines"]
    names = sorted(p.name for p in out.iterdir())
    assert all(p.is_file() for p in out.iterdir()) and len(names) <= 8, names
    assert {"device_check.log", "summary.json", "check_cuda_build.json"} <= set(names)
    assert any(name.startswith("bench_cuda-") and name.endswith("-smoke.json") for name in names)
