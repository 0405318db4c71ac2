"""The front door: what a user sees when the extension is missing, and the build backend's promise."""
import shutil
import subprocess
import sys
from pathlib import Path

import metaclm_ext

PACKAGE = Path(metaclm_ext.__file__).resolve().parent
REPO = Path(__file__).resolve().parent.parent


def _import_error(tmp_path: Path) -> str:
    proc = subprocess.run([sys.executable, "-c", "import metaclm_ext"], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0
    return proc.stderr


def test_source_tree_without_extension_says_how_to_build(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "metaclm_ext", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    (tmp_path / "setup.py").write_text("")
    err = _import_error(tmp_path)
    assert "source tree" in err and "pip install -e ." in err


def test_installed_package_without_extension_says_how_to_rebuild(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "metaclm_ext", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    err = _import_error(tmp_path)
    assert "could not be loaded" in err and "source tree" not in err


def test_build_backend_never_lists_torch():
    """A torch in build requirements would download a multi-GB wheel into pip's isolated build."""
    text = (REPO / "pyproject.toml").read_text()
    requires = text.split("requires = [", 1)[1].split("]", 1)[0]
    assert "torch" not in requires
    assert 'build-backend = "torch_aware"' in text
