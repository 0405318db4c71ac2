"""Per recorded module: the fine-tuning rows a text's positions attend to most and least, and how much of
the module's fine-tuning contribution they carry.

For a query x (the module's input at one position) and the history rows t < limit (the rows recorded
before the checkpoint), the module's fine-tuning contribution is

    C(x) = sum_t e_t <x_t, x>          (plain SGD: (W_ckpt - W_start) x)

and w_t = <x_t, x> is row t's dual-form weight. With heads (attention, ``per_head``), x_t and x split into
the heads' blocks of head_dim and everything is per head h: w_t^h = <x_t^h, x^h>, C_h(x) = sum_t e_t w_t^h,
and C(x) = sum_h C_h(x). For a selection S (the top-k or last-k rows by w_t) this reports

    norm      ||C_S|| with C_S = sum_{t in S} e_t w_t      (the selected rows' part of the contribution)
    ratio     ||C_S|| / ||C||                               (>= 0; above 1 where the other rows cancel part of it)
    cosine    <C_S, C> / (||C_S|| ||C||)                    (whether the selected rows point where the total does)

C comes from :func:`metaclm_ext.dual_form_apply` over every row before the limit, C_S from the selected
rows' errors read from the store and the weights history_topk returned.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..ops import Selection, dual_form_apply, history_topk
from ..store import HistoryStore
from ..store.scales import true_units
from .run import RecordedModule


@dataclass
class Share:
    """A selection's part of the contribution, per (query, head): each [Q, H] float64."""
    norm: torch.Tensor
    ratio: torch.Tensor  # NaN where the total contribution is 0
    cosine: torch.Tensor  # NaN where either part is 0


@dataclass
class ModuleRetrieval:
    module: RecordedModule
    heads: int  # 1 (whole width) or the module's heads
    top: Selection  # [Q, H, k] rows by w_t, descending
    last: Selection  # [Q, H, k] ascending
    total_norm: torch.Tensor  # [Q, H] ||C||
    top_share: Share
    last_share: Share


def query_heads(module: RecordedModule, per_head: bool) -> int:
    """How many heads a module's queries are split into: its attention heads with ``per_head``, else 1."""
    return module.heads if per_head and module.role == "attn" and module.heads else 1


def head_masked(queries: torch.Tensor, heads: int) -> torch.Tensor:
    """[Q, D] -> [Q * H, D]: query q's head h keeps its block of D / H and is zero elsewhere, so that
    dual_form_apply gives C_h(x) = sum_t e_t <x_t^h, x^h> for each head."""
    q, d = queries.shape
    mask = torch.zeros(heads, d)
    for h in range(heads):
        mask[h, h * (d // heads) : (h + 1) * (d // heads)] = 1
    return (queries[:, None, :] * mask).reshape(q * heads, d)


def read_rows(store: HistoryStore, field: str, rows: torch.Tensor) -> torch.Tensor:
    """fp32 [len(rows), D]: the given rows of ``field`` (one read per distinct row)."""
    unique, inverse = torch.unique(rows, return_inverse=True)
    picked = torch.stack([torch.from_numpy(store.read(field, r, r + 1)[0]).float() for r in unique.tolist()])
    return picked[inverse]


def selection_contribution(store: HistoryStore, field: str, selection: Selection) -> torch.Tensor:
    """C_S = sum_{t in S} e_t w_t per (query, head), in true units: float64 [Q, H, D_out]."""
    q, h, k = selection.indices.shape
    errors = read_rows(store, field, selection.indices.reshape(-1)).double().reshape(q, h, k, -1)
    return true_units(store.attrs, field, (errors * selection.values.double()[..., None]).sum(2))


def share(part: torch.Tensor, total: torch.Tensor) -> Share:
    """Share of ``part`` [Q, H, D] in ``total`` [Q, H, D] (float64)."""
    part_norm, total_norm = part.norm(dim=-1), total.norm(dim=-1)
    ratio = part_norm / total_norm
    cosine = (part * total).sum(-1) / (part_norm * total_norm)
    return Share(part_norm, ratio.masked_fill(total_norm == 0, float("nan")),
                 cosine.masked_fill((part_norm == 0) | (total_norm == 0), float("nan")))


def retrieve(store: HistoryStore, rows_store: HistoryStore, module: RecordedModule, queries: torch.Tensor, k: int,
             limit: int, per_head: bool, chunk_rows: Optional[int] = None) -> ModuleRetrieval:
    """Top-k and last-k rows of ``module``'s history before ``limit`` for each query [Q, D] (one
    history_topk pass), their contribution shares (one dual_form_apply pass).

    ``rows_store`` is the same store opened with ``verify=False`` for the single-row reads of the selected
    errors: with verification every row read would re-read its whole shard for the checksum, and the
    passes over ``store`` have verified every shard already.
    """
    heads = query_heads(module, per_head)
    n = queries.shape[0]
    found = history_topk(queries, store[module.input_field], k, limit=limit, heads=heads, chunk_rows=chunk_rows)
    total = dual_form_apply(head_masked(queries, heads), store[module.input_field], store[module.error_field],
                            limit=limit, chunk_rows=chunk_rows).double().reshape(n, heads, -1)
    total = true_units(store.attrs, module.error_field, total)
    return ModuleRetrieval(
        module, heads, found.top, found.last, total.norm(dim=-1),
        share(selection_contribution(rows_store, module.error_field, found.top), total),
        share(selection_contribution(rows_store, module.error_field, found.last), total))
