"""Generated documentation agrees with the committed results it is generated from."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_benchmarks_page_matches_the_json_results():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "results_doc.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
