"""metaclm_ext: transformers as an inner optimisation over their training history.

Implements the tools of Wu & Varshney, "A Meta-Learning Perspective on Transformers for Causal
Language Modeling" (arXiv 2310.05884): C++/CUDA kernels that score a query against every row of a
recorded training history (the dual-form weighting factors w_t = <x_t, x>) and reduce the scores to
top-k / last-k rows, per-label mass, or the exact dual-form output of a linear layer.
"""
from pathlib import Path

import torch  # noqa: F401  (must be imported before _C: the extension links against libtorch)


def _missing_extension_message(exc: ImportError) -> str:
    package = Path(__file__).resolve().parent
    if (package.parent / "setup.py").is_file() and not any(package.glob("_C*.so")):
        return (
            f"metaclm_ext is being imported from its source tree ({package.parent}), where the compiled "
            "extension metaclm_ext._C has not been built. Either build it in place for development with "
            "`pip install -e .`, or run from another directory so that Python imports the installed package "
            "(`pip install .` or `make install`)."
        )
    return (
        f"metaclm_ext's compiled extension metaclm_ext._C could not be loaded ({exc}). Rebuild it with "
        "`pip install .` (or `make install`) in an environment whose torch is the one you import now; "
        "see README.md."
    )


try:
    from . import _C  # noqa: F401  (registers the torch.ops.metaclm_ext operators)
except ImportError as exc:
    raise ImportError(_missing_extension_message(exc)) from exc

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
