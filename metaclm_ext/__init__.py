"""metaclm_ext: transformers as an inner optimisation over their training history.

Implements the tools of Wu & Varshney, "A Meta-Learning Perspective on Transformers for Causal
Language Modeling" (arXiv 2310.05884): C++/CUDA kernels that score a query against every row of a
recorded training history (the dual-form weighting factors w_t = <x_t, x>) and reduce the scores to
top-k / last-k rows, per-label mass, or the exact dual-form output of a linear layer.
"""
import torch  # noqa: F401  (must be imported before _C: the extension links against libtorch)

try:
    from . import _C  # noqa: F401  (registers the torch.ops.metaclm_ext operators)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "metaclm_ext's compiled extension metaclm_ext._C could not be loaded "
        f"({exc}). Build it with `pip install --no-build-isolation .` (or `make install`) in an "
        "environment whose torch is the one you import now; see README.md."
    ) from exc

from .ops import (  # noqa: E402
    HistoryTopK,
    Selection,
    dual_form_apply,
    history_label_mass,
    history_topk,
)
from .store import HistoryStore, HistoryWriter, StoreError  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "HistoryStore",
    "HistoryTopK",
    "HistoryWriter",
    "Selection",
    "StoreError",
    "dual_form_apply",
    "history_label_mass",
    "history_topk",
]
