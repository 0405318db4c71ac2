"""The training text around a history row, rebuilt from the store's int64 columns.

A row is one trained token: position ``position`` of training sequence ``sequence`` (numbered across the
whole run), holding input token ``token`` and trained to predict ``target``. The recorder appends each
micro-batch's rows sequence by sequence in position order, so a sequence's rows are one contiguous run of
the store; its tokens are the rows' tokens plus the last row's target (the last position has no row).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..store import HistoryStore

LEFT = 12  # tokens shown before a row's token
RIGHT = 6  # tokens shown after it, starting with the one it was trained to predict


class RowContexts:
    """Describes rows of ``store`` (token, surrounding text, step, article) with ``tokenizer``."""

    def __init__(self, store: HistoryStore, tokenizer, titles: dict[int, str], left: int = LEFT, right: int = RIGHT):
        self.columns = {name: store.read(name) for name in ("step", "sequence", "position", "token", "target")}
        self.article = store.read("article") if "article" in store.columns else None
        sequence = self.columns["sequence"]
        # Start row of each contiguous run of one sequence, and one past the last row.
        self.run_starts = np.concatenate([[0], np.flatnonzero(np.diff(sequence) != 0) + 1, [len(sequence)]])
        self.tokenizer, self.titles, self.left, self.right = tokenizer, titles, left, right

    def sequence_tokens(self, row: int) -> dict[int, int]:
        """position -> token of the training sequence that holds ``row``."""
        run = int(np.searchsorted(self.run_starts, row, side="right")) - 1
        lo, hi = int(self.run_starts[run]), int(self.run_starts[run + 1])
        positions, tokens = self.columns["position"][lo:hi], self.columns["token"][lo:hi]
        out = dict(zip(positions.tolist(), tokens.tolist()))
        out.setdefault(int(positions[-1]) + 1, int(self.columns["target"][hi - 1]))
        return out

    def describe(self, row: int) -> dict:
        """The row's step, sequence, position, article (id and title), and its text: ``left`` (the tokens
        before it), ``token``, ``right`` (those after it, the first being ``next``, its target)."""
        c = self.columns
        position = int(c["position"][row])
        tokens = self.sequence_tokens(row)
        before = [tokens[p] for p in range(position - self.left, position) if p in tokens]
        after = [tokens[p] for p in range(position + 1, position + 1 + self.right) if p in tokens]
        article: Optional[int] = None if self.article is None else int(self.article[row])
        return {"row": row, "step": int(c["step"][row]), "sequence": int(c["sequence"][row]), "position": position,
                "article": article, "title": None if article is None else self.titles.get(article),
                "left": self.decode(before), "token": self.decode([int(c["token"][row])]),
                "next": self.decode([int(c["target"][row])]), "right": self.decode(after)}

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if ids else ""
