"""The paper's published numbers, read from paper-numbers.json (never retyped in code)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

ENV_VAR = "METACLM_PAPER_NUMBERS"
# Where the JSON lives in this project's layout: a `shared/paper/` folder beside the checkout.
_CANDIDATES = [
    Path(__file__).resolve().parents[2] / "shared" / "paper" / "paper-numbers.json",
    Path("/work/shared/paper/paper-numbers.json"),
]


def paper_numbers_path() -> Optional[Path]:
    """The JSON file: $METACLM_PAPER_NUMBERS if set (must exist), else the first candidate that exists."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env)
        if not path.is_file():
            raise FileNotFoundError(f"{ENV_VAR}={env} does not name a file")
        return path
    return next((p for p in _CANDIDATES if p.is_file()), None)


def paper_numbers() -> Optional[dict]:
    """The paper's numbers as a dict, or None when the JSON is not available on this machine."""
    path = paper_numbers_path()
    return None if path is None else json.loads(path.read_text())
