"""The paper's published numbers, read from paper-numbers.json (never retyped in code).

The package ships a verbatim copy of the project's ``shared/paper/paper-numbers.json`` (a test checks
the two are byte-identical wherever ``shared/`` is present), so reports can put our numbers beside
the paper's on any machine. ``$METACLM_PAPER_NUMBERS`` points at another copy.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

ENV_VAR = "METACLM_PAPER_NUMBERS"
PACKAGED = Path(__file__).resolve().parent / "paper-numbers.json"


def paper_numbers_path() -> Path:
    """$METACLM_PAPER_NUMBERS if set (it must exist), else the packaged copy."""
    env = os.environ.get(ENV_VAR)
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"{ENV_VAR}={env} does not name a file")
        return Path(env)
    return PACKAGED


@lru_cache(maxsize=None)
def _load(path: str) -> dict:
    return json.loads(Path(path).read_text())


def paper_numbers() -> dict:
    """The paper's tables and claims as a dict."""
    return _load(str(paper_numbers_path()))
