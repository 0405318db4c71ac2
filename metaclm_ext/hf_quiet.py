"""One progress bar per run, ours: transformers' own bars (each from_pretrained / save_pretrained shard) off."""
from __future__ import annotations

__all__ = ["quiet_transformers"]


def quiet_transformers() -> None:
    """No per-call progress bars from save_pretrained / from_pretrained (one bar per run is ours)."""
    from transformers.utils import logging  # transformers takes seconds to import: only where a model is made

    logging.disable_progress_bar()
