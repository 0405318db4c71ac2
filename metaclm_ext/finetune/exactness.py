"""The exactness check of a fine-tuning run: its recorded errors rebuild every recorded weight change.

The float32 store (history-fp32/) is judged against the bound the fine-tuning feature promises, relative
error 1e-4 (its layers keep float64 weights, precision.py, which leaves ~1e-7); the float16 store
(history/) rounds x_t and e_t themselves, so its errors are reported only.
"""
from __future__ import annotations

from ..recording import dualcheck_store
from ..recording.verify import DEFAULT_MAX_QUERIES
from .runfolder import HISTORY, HISTORY_FP32, MANIFEST, load_run

TOLERANCE = 1e-4


def check_run(path, max_queries: int = DEFAULT_MAX_QUERIES, tolerance: float = TOLERANCE) -> dict[str, dict]:
    """{store folder name: dualcheck_store report} for every history store of the run; ValueError for a
    run without one."""
    run = load_run(path)
    present = [name for name in (HISTORY_FP32, HISTORY) if (run.path / name / MANIFEST).exists()]
    if not present:
        raise ValueError(f"{run.path} has no recorded history ({HISTORY}/ and {HISTORY_FP32}/ are missing): "
                         "nothing to check")
    return {name: dualcheck_store(run.path / name, max_queries=max_queries, tolerance=tolerance) for name in present}
