"""`metaclm attribute`: which fine-tuning tokens each recorded layer retrieves for each position of a text.

One forward of the checkpoint gives every recorded module's input at every position (the queries); then
per module one history_topk pass over its input field (all positions at once) and one dual_form_apply
pass over its inputs and errors, both limited to the rows recorded before the checkpoint. The result is
one JSON-ready dict (described in docs/attribution.md) that the Markdown summary and the HTML page render.
"""
from __future__ import annotations

import math
import time
from typing import Optional

from tqdm.auto import tqdm

from ..store import HistoryStore
from .context import RowContexts
from .queries import load_checkpoint, text_queries
from .retrieve import ModuleRetrieval, Share, retrieve
from .run import AttributionRun

DEFINITIONS = {
    "score": "w_t = <x_t, x>: the dual-form weight of fine-tuning row t for the module's input x at the position "
             "(fp32 inner product of the stored fp16/fp32 input x_t with x; per head over its head_dim block when "
             "per_head)",
    "top": "the k rows with the largest w_t among the rows recorded before the checkpoint (ties to the earlier row)",
    "last": "the k rows with the smallest (most negative) w_t",
    "contribution": "C = sum_t e_t w_t over every row before the checkpoint (metaclm_ext.dual_form_apply; with "
                    "plain SGD the module's weight change applied to x); C_S = sum over the selected rows only",
    "ratio": "||C_S|| / ||C||: at least 0, above 1 where the other rows cancel part of the selection's term",
    "cosine": "<C_S, C> / (||C_S|| ||C||): 1 when the selection points exactly where the whole contribution does",
}


def attribute(run_folder, text: str, *, position: Optional[int] = None, k: int = 10,
              layers: Optional[list[int]] = None, checkpoint: Optional[int] = None, per_head: bool = False,
              progress: bool = True) -> dict:
    """Attribute ``text`` (every position, or ``position``) to the fine-tuning history of ``run_folder``.

    ValueError / FileNotFoundError (with the reason) for a missing run, history or checkpoint, a text
    longer than the model's context, a position outside the text, or k larger than the checkpoint's rows.
    """
    started = time.time()
    run = AttributionRun(run_folder)
    chosen = run.checkpoint(checkpoint)
    modules = run.select(layers)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= chosen.rows:
        raise ValueError(f"k must be an int in [1, {chosen.rows}] (the rows before checkpoint {chosen.step}), got {k!r}")
    model, tokenizer = load_checkpoint(chosen.path)
    queries = text_queries(model, tokenizer, text, modules)
    length = len(queries.token_ids)
    if position is not None and not -length <= position < length:
        raise ValueError(f"position {position} is outside the text's {length} tokens (0..{length - 1})")
    positions = list(range(length)) if position is None else [position % length]
    rows_store = HistoryStore(run.store.path, verify=False)
    found: list[ModuleRetrieval] = []
    for module in tqdm(modules, desc="attribute", unit="module", disable=not progress):
        found.append(retrieve(run.store, rows_store, module, queries.inputs[module.input_field][positions], k,
                              chosen.rows, per_head))
    contexts = RowContexts(run.store, tokenizer, run.titles)
    return {
        "run": str(run.folder), "model": run.info.get("model"), "corpus": run.info.get("corpus"),
        "checkpoint": {"step": chosen.step, "rows": chosen.rows, "path": str(chosen.path)},
        "history": {"path": str(run.store.path), "rows": len(run.store)},
        "text": text, "context": queries.context, "k": k, "per_head": per_head,
        "tokens": [{"position": i, "id": t, "text": s} for i, (t, s) in enumerate(zip(queries.token_ids, queries.tokens))],
        "positions": positions,
        "modules": [{"key": r.module.key, "module": r.module.module, "role": r.module.role, "layer": r.module.layer,
                     "heads": r.heads, "input_field": r.module.input_field, "error_field": r.module.error_field}
                    for r in found],
        "definitions": DEFINITIONS,
        "results": {str(p): {r.module.key: module_result(r, i) for r in found} for i, p in enumerate(positions)},
        "rows": {str(row): contexts.describe(row) for row in sorted(selected_rows(found))},
        "seconds": round(time.time() - started, 2),
    }


def selected_rows(found: list[ModuleRetrieval]) -> set[int]:
    return {int(i) for r in found for sel in (r.top, r.last) for i in sel.indices.reshape(-1).tolist() if i >= 0}


def module_result(r: ModuleRetrieval, query: int) -> list[dict]:
    """One entry per head: the top and last rows as [row, score] pairs and the contribution shares."""
    def pairs(sel, h):
        return [[int(i), float(v)] for i, v in zip(sel.indices[query, h].tolist(), sel.values[query, h].tolist())
                if i >= 0]

    return [{"top": pairs(r.top, h), "last": pairs(r.last, h), "total_norm": finite(r.total_norm[query, h]),
             "top_share": share_entry(r.top_share, query, h), "last_share": share_entry(r.last_share, query, h)}
            for h in range(r.heads)]


def share_entry(s: Share, query: int, head: int) -> dict:
    return {"norm": finite(s.norm[query, head]), "ratio": finite(s.ratio[query, head]),
            "cosine": finite(s.cosine[query, head])}


def finite(value) -> Optional[float]:
    """A float for JSON, None for NaN (JSON has no NaN: the page's JSON.parse would reject it)."""
    value = float(value)
    return None if math.isnan(value) else value
