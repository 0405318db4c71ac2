"""The error boundary of `metaclm` and the scripts: every failure becomes one line on stderr and an exit code.

Exit 2 is bad input (a flag, a path, a file's content: the user can fix it), exit 1 a failure of the machine
or of the program (no space, an I/O error, out of memory, a torch runtime error: its first line only), 130
an interrupt. No traceback unless ``METACLM_DEBUG=1``, which re-raises so the full traceback is printed.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

# Bad input: what the user named or fed in is wrong. StoreError is a ValueError; the OSError subclasses here
# describe the path the user gave (missing, already there, a file where a folder is expected, not theirs).
BAD_INPUT = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
             PermissionError)
DEBUG_VARIABLE = "METACLM_DEBUG"


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_guarded(prog: str, action: Callable[[], int]) -> int:
    """``action()``'s exit code, or the exit code of its failure after printing ``PROG: error: ...``."""
    try:
        return int(action() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        if isinstance(exc, BAD_INPUT):  # in full: a StoreError may list every bad file, one a line
            print(f"{prog}: error: {str(exc).strip() or type(exc).__name__}", file=sys.stderr)
            return 2
        print(f"{prog}: error: {type(exc).__name__}: {one_line(exc)} (a failure of the machine or of metaclm, not "
              f"of your input; {DEBUG_VARIABLE}=1 shows the traceback)", file=sys.stderr)
        return 1
