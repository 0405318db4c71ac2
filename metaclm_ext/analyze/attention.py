"""Attention over the training history (Figures 3 and 10): which recorded instances a query weights most.

For a validation query at checkpoint E, the weighting factor of history row t is w_t = <x_t, x> with x the
query's input of a c_proj and x_t the same c_proj's input recorded at training step t (Eq. 6 per attention
head, Eq. 8 for the FFN). Rows recorded up to epoch E are the history of checkpoint E, so the queries of
all checkpoints go through ``history_topk`` together with a per-query ``limit``: each store field is read
once, whatever the number of checkpoints. The measure is the percentage of the top-k (and last-k) rows
whose label equals the query's, aggregated over heads and queries.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .. import distributed
from ..history_names import parse_field_name
from ..ops import history_topk
from ..training.history import LABEL_COLUMNS

LABELS = ("seed", "seed_next_token", "next_token")
MODULES = {"attn": "MHSA", "mlp": "FFN"}


def query_labels(seed: torch.Tensor, next_token: torch.Tensor, vocab_size: int) -> dict[str, np.ndarray]:
    """The three ground truths of a query, numbered as the store's columns are (training.history.LABEL_COLUMNS)."""
    seed, nxt = seed.numpy().astype(np.int64), next_token.numpy().astype(np.int64)
    return {"seed": seed, "next_token": nxt, "seed_next_token": seed * vocab_size + nxt}


def same_label_percent(indices: torch.Tensor, history_labels: np.ndarray, labels: np.ndarray,
                       groups: np.ndarray, num_groups: int) -> np.ndarray:
    """Per group: 100 * (selected rows with the query's label) / (selected rows), over heads and queries.

    indices [Q, H, k] (-1 = no row), history_labels [N], labels [Q], groups [Q] in [0, num_groups).
    """
    idx = indices.cpu().numpy()
    valid = idx >= 0
    match = (history_labels[np.where(valid, idx, 0)] == labels[:, None, None]) & valid
    hits = np.bincount(groups, weights=match.sum((1, 2)), minlength=num_groups)
    total = np.bincount(groups, weights=valid.sum((1, 2)), minlength=num_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 100.0 * hits / total, np.nan)


def chance_percent(history_labels: np.ndarray, limits: np.ndarray, labels: np.ndarray,
                   groups: np.ndarray, num_groups: int) -> np.ndarray:
    """Per group: the expected same-label percentage of rows drawn uniformly from each query's history."""
    num_classes = int(max(history_labels.max(initial=0), labels.max(initial=0))) + 1
    share = np.empty(len(labels))
    for lim in np.unique(limits):
        at = limits == lim
        freq = np.bincount(history_labels[:lim], minlength=num_classes) / max(int(lim), 1)
        share[at] = freq[labels[at]]
    return 100.0 * np.bincount(groups, weights=share, minlength=num_groups) / np.bincount(groups, minlength=num_groups)


def topk_over_history(queries: torch.Tensor, store, field: str, k: int, limit: torch.Tensor, heads: int):
    """history_topk of a store field; in a process group (torchrun) each rank streams only its shards
    (split_store) and every rank gets the whole history's answer, the single process's."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return history_topk(queries, store[field], k=k, limit=limit, heads=heads)
    start, stop = distributed.split_store(store, dist.get_world_size())[dist.get_rank()]
    queries = queries.contiguous()
    # rank 0's queries: forward passes on other machines may differ in the last bit
    distributed.collective("broadcast of the queries", None, lambda: dist.broadcast(queries, src=0))
    return distributed.history_topk(queries, store.rows(start, stop)[field], k, row_offset=start, limit=limit,
                                    heads=heads)


def history_attention(store, queries: dict[str, torch.Tensor], labels: dict[str, np.ndarray],
                      limits: np.ndarray, groups: np.ndarray, num_groups: int, heads: int, k: int = 10,
                      progress: bool = True, history_labels: Optional[dict[str, np.ndarray]] = None) -> dict:
    """Same-label percentages of the top-k and last-k history rows, per field, label and group.

    ``queries`` maps a store field ("attn_in.l" / "mlp_in.l") to [Q, width] query vectors; attention fields
    are scored per head (``heads`` heads), FFN fields as one vector. ``history_labels`` {label: [N]} gives
    each history row's labels (default: the store's columns named by LABELS); ``labels`` gives the
    queries' under the same names. Returns
    {"fields": {field: {label: {"top": [G], "last": [G]}}}, "chance": {label: [G]}}.
    """
    if history_labels is None:
        history_labels = {name: store.read(LABEL_COLUMNS[name]) for name in LABELS}
    out = {"fields": {}, "chance": {name: chance_percent(history_labels[name], limits, labels[name], groups,
                                                         num_groups).tolist() for name in history_labels}}
    for field, q in tqdm(queries.items(), desc="attention over history", unit="field", disable=not progress):
        if field not in store:
            raise ValueError(f"the history store {store.path} has no field {field!r} (has {sorted(store.fields)})")
        res = topk_over_history(q, store, field, k, torch.as_tensor(limits, device=q.device),
                                heads if parse_field_name(field).module == "attn" else 1)
        out["fields"][field] = {
            name: {side: same_label_percent(sel.indices, history_labels[name], labels[name], groups,
                                            num_groups).tolist()
                   for side, sel in (("top", res.top), ("last", res.last))}
            for name in history_labels
        }
    return out
