"""`metaclm finetune-analyze RUN`: the paper's Figure 3 question asked of a fine-tuned real LM.

For every held-out sentence position with a next token (never trained on), at every checkpoint after the
start, the query of a recorded module is its input there (the checkpoint's model run with forward hooks).
The rows it attends to most (top-k) and least (last-k) among the history recorded up to that checkpoint
come from one ``history_topk`` pass per store field over all checkpoints' queries, with a per-query
limit; attention output projections are scored per head (heads x head_dim from the store's attrs), the
FFN down projection as one head of its full width. The measure is the share of those rows from the same
document as the query ("article"), from the same document and with the same next token
("article_next_token"), and with the same next token ("next_token"), beside chance: the same share for
rows drawn uniformly from the query's history (from the label frequencies).
"""
from __future__ import annotations

import random
import time
from functools import partial
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer

from ..analyze.attention import history_attention
from ..probe.models import load_model
from .layers import LayerView
from .runfolder import FinetuneRun, load_run
from .train import LABEL_COLUMN, model_context

LABELS = ("article", "article_next_token", "next_token")


@dataclass
class AnalysisConfig:
    k: int = 10
    max_queries: int = 256  # held-out positions per checkpoint (a seeded sample when there are more)
    seed: int = 0

    def check(self) -> None:
        for name in ("k", "max_queries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class HeldOut:
    sentences: list[torch.Tensor]       # token ids per sentence
    positions: list[list[int]]          # chosen query positions per sentence (each has a next token)
    article: np.ndarray                 # [Q] per query, in sentence order
    next_token: np.ndarray              # [Q]


def heldout_queries(run: FinetuneRun, tokenizer, context: Optional[int], cfg: AnalysisConfig) -> HeldOut:
    """The held-out sentences tokenized as training text is, and a seeded sample of ``max_queries``
    positions that have a next token. ValueError for a sentence longer than the model's context."""
    sentences, owners = [], []
    for article, info in run.articles["articles"].items():
        for text in info["heldout"]:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if context is not None and len(ids) > context:
                raise ValueError(f"a held-out sentence of {article} has {len(ids)} tokens, longer than the model's "
                                 f"context of {context}")
            if len(ids) >= 2:
                sentences.append(torch.tensor(ids))
                owners.append(int(article))
    candidates = [(s, p) for s, ids in enumerate(sentences) for p in range(len(ids) - 1)]
    if not candidates:
        raise ValueError(f"{run.path} has no held-out sentence to query (fine-tune with --heldout-sentences >= 1 "
                         "on documents of several sentences)")
    if len(candidates) > cfg.max_queries:
        candidates = sorted(random.Random(cfg.seed).sample(candidates, cfg.max_queries))
    positions = [[] for _ in sentences]
    for s, p in candidates:
        positions[s].append(p)
    return HeldOut(sentences, positions, np.array([owners[s] for s, _ in candidates], dtype=np.int64),
                   np.array([int(sentences[s][p + 1]) for s, p in candidates], dtype=np.int64))


@torch.no_grad()
def module_inputs(checkpoint, modules: list[dict], layers: list[int], heldout: HeldOut) -> dict[str, torch.Tensor]:
    """{input field: [Q, width]}: each recorded module's input at the held-out query positions, from the
    checkpoint's model (float32)."""
    lm = load_model(str(checkpoint))
    view = LayerView(lm, layers)
    captured: dict[str, list[torch.Tensor]] = {m["input_field"]: [] for m in modules}
    current: dict[str, list[int]] = {}

    def take_input(field, _module, inputs, _output):
        captured[field].append(inputs[0][0, current["positions"]].float())

    handles = [view.get_submodule(m["module"]).register_forward_hook(partial(take_input, m["input_field"]))
               for m in modules]
    try:
        for ids, positions in zip(heldout.sentences, heldout.positions):
            if positions:
                current["positions"] = positions
                lm.model(input_ids=ids[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {field: torch.cat(parts) for field, parts in captured.items()}


def _codes(history: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both label arrays renumbered 0..C-1 together (chance counts labels with np.bincount)."""
    _, inverse = np.unique(np.concatenate([history, queries]), return_inverse=True)
    return inverse[:len(history)], inverse[len(history):]


def same_article_analysis(path, cfg: AnalysisConfig = AnalysisConfig(), progress: bool = True) -> dict:
    """Every number of the analysis, as plain data (report.write_outputs writes the files)."""
    cfg.check()
    started = time.perf_counter()
    run = load_run(path)
    store = run.history()
    modules = store.attrs["recording"]["modules"]
    layers = sorted({m["layer"] for m in modules})
    steps_column = store.read("step")
    checkpoints = [c["step"] for c in run.summary["checkpoints"]
                   if int(np.searchsorted(steps_column, c["step"])) >= cfg.k]
    if not checkpoints:
        raise ValueError(f"{run.path}: no checkpoint has {cfg.k} history rows before it (fine-tune for more steps)")
    limits_by_step = [int(np.searchsorted(steps_column, s)) for s in checkpoints]
    tokenizer = AutoTokenizer.from_pretrained(run.checkpoint(0))
    heldout = heldout_queries(run, tokenizer, model_context(AutoConfig.from_pretrained(run.checkpoint(0))), cfg)
    vocab = len(tokenizer)
    queries: dict[str, list[torch.Tensor]] = {}
    forward_started = time.perf_counter()
    for step in tqdm(checkpoints, desc="checkpoints", unit="ckpt", disable=not progress):
        for field, x in module_inputs(run.checkpoint(step), modules, layers, heldout).items():
            queries.setdefault(field, []).append(x)
    forward_seconds = time.perf_counter() - forward_started

    n, groups = len(heldout.article), np.repeat(np.arange(len(checkpoints)), len(heldout.article))
    limits = np.repeat(limits_by_step, n)
    history_article, history_next = store.read(LABEL_COLUMN), store.read("target")
    raw = {"article": (history_article, heldout.article), "next_token": (history_next, heldout.next_token),
           "article_next_token": (history_article * vocab + history_next, heldout.article * vocab + heldout.next_token)}
    coded = {name: _codes(*raw[name]) for name in LABELS}
    heads = {m["heads"] for m in modules if m["role"] == "attn" and m["heads"]}
    attention_started = time.perf_counter()
    res = history_attention(store, {f: torch.cat(xs) for f, xs in queries.items()},
                            {name: np.tile(coded[name][1], len(checkpoints)) for name in LABELS}, limits, groups,
                            len(checkpoints), heads=heads.pop() if heads else 1, k=cfg.k, progress=progress,
                            history_labels={name: coded[name][0] for name in LABELS})
    return {
        "run": str(run.path), "model": run.summary["model"], "corpus": run.summary["corpus"],
        "label": run.articles["label"], "config": asdict(cfg), "choices": __doc__.strip(),
        "k": cfg.k, "checkpoints": checkpoints, "limits": limits_by_step, "history_rows": len(store),
        "history_dtype": sorted({dtype for _, dtype in store.fields.values()}),
        "queries_per_checkpoint": n, "heldout_sentences": sum(1 for p in heldout.positions if p),
        "query_articles": len(set(heldout.article.tolist())),
        "modules": [{k: m[k] for k in ("module", "role", "layer", "heads", "head_dim", "input_field")} for m in modules],
        **res,
        "seconds": {"forward": forward_seconds, "attention": time.perf_counter() - attention_started,
                    "total": time.perf_counter() - started},
    }
