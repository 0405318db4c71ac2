"""The float dtypes a history may hold, by the names the store manifest and the command line use."""
from __future__ import annotations

import torch

__all__ = ["HISTORY_DTYPES", "HISTORY_DTYPE_NAMES"]

HISTORY_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HISTORY_DTYPES = tuple(HISTORY_DTYPE_NAMES.values())
