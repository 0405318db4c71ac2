"""Plain PyTorch twins of the history operators, for tests and as the definition of their semantics.

They materialise the whole [Q, H, N] score matrix, so they are for small inputs only.
"""
from __future__ import annotations

from typing import Optional

import torch

from .ops import HistoryTopK, Selection


def _heads(queries: torch.Tensor, width: int, heads: Optional[int]) -> torch.Tensor:
    if queries.dim() == 2:
        h = heads or 1
        queries = queries.reshape(queries.shape[0], h, width // h)
    return queries


def _valid(limit, num_queries: int, num_rows: int) -> torch.Tensor:
    lim = torch.full((num_queries,), num_rows) if limit is None else torch.as_tensor(limit).expand(num_queries)
    return torch.arange(num_rows) < lim.to(torch.int64).cpu()[:, None]  # [Q, N]


def history_scores(queries, history, heads=None, dtype=torch.float32) -> torch.Tensor:
    """All scores [Q, H, N]: <history[t, head h], queries[q, h]>."""
    q = _heads(queries, history.shape[1], heads).to(dtype)
    hist = history.to(dtype).reshape(history.shape[0], q.shape[1], q.shape[2])
    return torch.einsum("qhd,nhd->qhn", q, hist)


def history_topk_reference(queries, history, k=10, *, limit=None, heads=None) -> HistoryTopK:
    scores = history_scores(queries, history, heads).cpu()
    valid = _valid(limit, scores.shape[0], scores.shape[2])[:, None, :].expand_as(scores)

    def select(fill: float, descending: bool) -> Selection:
        s = scores.masked_fill(~valid, fill)
        order = torch.argsort(s, dim=-1, descending=descending, stable=True)[..., :k]
        keep = valid.gather(-1, order)
        return Selection(s.gather(-1, order), order.masked_fill(~keep, -1))

    return HistoryTopK(select(float("-inf"), True), select(float("inf"), False))


def history_label_mass_reference(queries, history, labels, num_labels, *, limit=None, heads=None) -> torch.Tensor:
    scores = history_scores(queries, history, heads, torch.float64).cpu()
    valid = _valid(limit, scores.shape[0], scores.shape[2])[:, None, :]
    scores = scores * valid
    mass = torch.zeros(scores.shape[0], scores.shape[1], num_labels, dtype=torch.float64)
    mass.index_add_(2, labels.cpu().to(torch.int64), scores)
    return mass


def dual_form_apply_reference(queries, inputs, errors, *, limit=None) -> torch.Tensor:
    scores = (inputs.double() @ queries.double().T).cpu()  # [N, Q]
    scores = scores * _valid(limit, queries.shape[0], inputs.shape[0]).T
    return scores.T @ errors.double().cpu()
