"""Plain PyTorch twins of the history operators, for tests and as the definition of their semantics.

Each twin names the public op it mirrors (``metaclm_ext.ops``) and the merge operator whose CPU and CUDA
kernels that op streams the history through (``torch.ops.metaclm_ext.*_merge``, schemas in
csrc/metaclm_ext.cpp), with the shapes it takes and returns. Shapes: Q queries, N history rows, H heads of
Dh dimensions (D = H * Dh). The twins materialise the whole [Q, H, N] score matrix in one piece, so they
are for small inputs only, and return CPU tensors.
"""
from __future__ import annotations

from typing import Optional

import torch

from .ops import HistoryTopK, Selection


def _heads(queries: torch.Tensor, width: int, heads: Optional[int]) -> torch.Tensor:
    """Queries [Q, D] (``heads`` heads of D / heads, one by default) or [Q, H, Dh] as [Q, H, Dh]: the reshape
    of ``ops.as_heads``, without its checks."""
    if queries.dim() == 2:
        h = heads or 1
        queries = queries.reshape(queries.shape[0], h, width // h)
    return queries


def _valid(limit, num_queries: int, num_rows: int) -> torch.Tensor:
    """bool [Q, N]: row t is a candidate for query q (t < limit[q]; ``limit`` None, an int or [Q])."""
    lim = torch.full((num_queries,), num_rows) if limit is None else torch.as_tensor(limit).expand(num_queries)
    return torch.arange(num_rows) < lim.to(torch.int64).cpu()[:, None]  # [Q, N]


def history_scores(queries, history, heads=None, dtype=torch.float32) -> torch.Tensor:
    """The scores the ops are defined by, all at once: [Q, H, N] with
    ``scores[q, h, t] = <history[t, h*Dh:(h+1)*Dh], queries[q, h]>`` computed in ``dtype``.

    ``history_topk_merge`` computes them row by row, accumulating in fp32; ``history_label_mass_merge``
    sums them per label through linearity (per-label row sums, then one product per label).
    queries [Q, D] or [Q, H, Dh], history [N, D].
    """
    q = _heads(queries, history.shape[1], heads).to(dtype)
    hist = history.to(dtype).reshape(history.shape[0], q.shape[1], q.shape[2])
    return torch.einsum("qhd,nhd->qhn", q, hist)


def history_topk_reference(queries, history, k=10, *, limit=None, heads=None) -> HistoryTopK:
    """Twin of ``metaclm_ext.history_topk`` (the ``history_topk_merge`` kernels and ``ops._finalize_selection``).

    queries [Q, D] or [Q, H, Dh], history [N, D], ``limit`` None, an int or [Q] -> HistoryTopK(top, last),
    each a Selection of values fp32 [Q, H, k] and indices int64 [Q, H, k]: top by score descending, last
    ascending, ties to the lower row; where fewer than k rows are candidates, index -1 with value -inf
    (top) / +inf (last).
    """
    scores = history_scores(queries, history, heads).cpu()
    valid = _valid(limit, scores.shape[0], scores.shape[2])[:, None, :].expand_as(scores)

    def select(fill: float, descending: bool) -> Selection:
        s = scores.masked_fill(~valid, fill)
        order = torch.argsort(s, dim=-1, descending=descending, stable=True)[..., :k]
        keep = valid.gather(-1, order)
        return Selection(s.gather(-1, order), order.masked_fill(~keep, -1))

    return HistoryTopK(select(float("-inf"), True), select(float("inf"), False))


def history_label_mass_reference(queries, history, labels, num_labels, *, limit=None, heads=None) -> torch.Tensor:
    """Twin of ``metaclm_ext.history_label_mass`` (the ``history_label_mass_merge`` kernels).

    queries [Q, D] or [Q, H, Dh], history [N, D], labels int [N] in [0, num_labels), ``limit`` None, an int
    or [Q] -> fp64 [Q, H, num_labels]: the sum of the candidate rows' scores per label (the op returns fp32).
    """
    scores = history_scores(queries, history, heads, torch.float64).cpu()
    valid = _valid(limit, scores.shape[0], scores.shape[2])[:, None, :]
    scores = scores * valid
    mass = torch.zeros(scores.shape[0], scores.shape[1], num_labels, dtype=torch.float64)
    mass.index_add_(2, labels.cpu().to(torch.int64), scores)
    return mass


def dual_form_apply_reference(queries, inputs, errors, *, limit=None) -> torch.Tensor:
    """Twin of ``metaclm_ext.dual_form_apply`` (the ``dual_form_apply_merge`` kernels).

    queries [Q, D_in], inputs [N, D_in], errors [N, D_out], ``limit`` None, an int or [Q] -> fp64 [Q, D_out]
    with ``out[q] = sum_{t < limit[q]} errors[t] * <inputs[t], queries[q]>`` (the op returns fp32).
    """
    scores = (inputs.double() @ queries.double().T).cpu()  # [N, Q]
    scores = scores * _valid(limit, queries.shape[0], inputs.shape[0]).T
    return scores.T @ errors.double().cpu()
