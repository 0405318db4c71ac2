"""`metaclm analyze RUN`: the synthetic-data analyses of Section 5 and 8.1 over every checkpoint of a run.

One forward pass per checkpoint and split feeds the inner loss, the norm trajectories and the clustering;
the validation queries of all checkpoints then stream the recorded history once per field (attention).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ..probe.norms import nondecreasing
from ..training import epoch_limits, load_checkpoint, load_run, resolve_device
from . import attention, clustering
from .claims import judge
from .forward import LENS, QUERY_POSITION, forward_split, lens_model

PARTS = ("attention", "clustering", "inner_loss", "norms")
SPLITS = ("train", "validation")
NORMS = (
    "Norm trajectories (Figure 6): every validation token with a next token, its raw state norms from the "
    "embedding output (state 0) to the last block's output before the final LayerNorm (state L). Sequence level: "
    "share of trajectories whose norm never decreases; pair level: share of neighbouring-state pairs that do not "
    "decrease. Null: a fair coin per pair, 2^-n for n pairs. Reported with the last layer (as Figure 6) and "
    "without it (as Table 1)."
)


@dataclass
class AnalyzeConfig:
    """What to analyse: the checkpoints ``epochs`` (None = all), thinned to every ``every``-th (and the last)."""

    epochs: Optional[list] = None
    every: int = 1
    parts: tuple = PARTS
    k: int = 10
    kmeans_init: int = 4
    seed: int = 0
    batch_size: int = 64
    device: str = "cpu"

    def check(self) -> None:
        unknown = set(self.parts) - set(PARTS)
        if unknown or not self.parts:
            raise ValueError(f"parts must be a non-empty subset of {PARTS}, got {list(self.parts)}")
        for name in ("every", "k", "kmeans_init", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _select_epochs(available: list[int], wanted: Optional[list], every: int) -> list[int]:
    if not available:
        raise ValueError("the run has no checkpoints to analyse")
    if wanted is not None:
        missing = sorted(set(wanted) - set(available))
        if missing:
            raise ValueError(f"the run has no checkpoint for epochs {missing} (it has {available[0]}..{available[-1]}: "
                             f"{len(available)} checkpoints)")
        if not wanted:
            raise ValueError("no checkpoint to analyse: --epochs names none")
    chosen = sorted(set(available if wanted is None else wanted))
    return sorted(set(chosen[::every]) | {chosen[-1]})


def _norm_summary(norms) -> dict:
    """Figure 6 numbers from [T, S] norms: with the last state (S-1 pairs) and without it."""
    out = {}
    for key, part in (("with_last_layer", norms), ("without_last_layer", norms[:, :-1])):
        r = nondecreasing(part)
        out[key] = {"sequence_percent": r["sequence_percent"], "pair_percent": r["pair_percent"],
                    "pair_percent_by_step": r["pair_percent_by_step"], "pairs": r["pairs_per_trajectory"],
                    "null_sequence_percent": r["null_sequence_percent"]}
    out["tokens"] = int(norms.shape[0])
    return out


def analyze_run(run_dir, cfg: AnalyzeConfig = AnalyzeConfig(), progress: bool = True) -> dict:
    """Every number of the four analyses, as plain data (report.write_outputs writes the files)."""
    cfg.check()
    started = time.perf_counter()
    run = load_run(run_dir)
    epochs = _select_epochs(run.epochs, cfg.epochs, cfg.every)
    device = resolve_device(cfg.device)
    vocab = len(run.data["meta"]["vocab"])
    n_layer = run.config.n_layer
    store = None
    if "attention" in cfg.parts:
        store = _open_history(run)
    seconds = {"forward": 0.0, "clustering": 0.0, "attention": 0.0}
    splits = SPLITS if {"clustering", "inner_loss"} & set(cfg.parts) else ("validation",)
    inner = {s: [] for s in splits}
    norm_rows: list[dict] = []
    cluster = {s: {name: {m: [] for m in clustering.METRICS} for name in attention.LABELS} for s in SPLITS}
    cluster_k: dict[str, int] = {}
    chance = {s: {} for s in SPLITS}  # the last checkpoint's chance F1, per split, label and state
    queries: dict[str, list] = {}
    query_epochs: list[int] = []
    for epoch in tqdm(epochs, desc="checkpoints", unit="ckpt", disable=not progress):
        t = time.perf_counter()
        lm = lens_model(load_checkpoint(run.path, epoch, str(device)))
        stats = {s: forward_split(lm, run.data[s], cfg.batch_size) for s in splits}
        seconds["forward"] += time.perf_counter() - t
        for s in splits:
            inner[s].append(stats[s].inner_loss.tolist())
        if "norms" in cfg.parts:
            norm_rows.append(_norm_summary(stats["validation"].norms))
        if "clustering" in cfg.parts:
            t = time.perf_counter()
            last = epoch == epochs[-1]
            for s in SPLITS:
                for name, per_state in _cluster_states(stats[s], vocab, cfg, chance=last).items():
                    cluster_k[f"{s}/{name}"] = per_state[0]["k"]
                    for m in clustering.METRICS:
                        cluster[s][name][m].append([r[m] for r in per_state])
                    if last:
                        chance[s][name] = {q: [r["f1_chance"][q] if "f1_chance" in r else None for r in per_state]
                                           for q in ("mean", "quantile")}
            seconds["clustering"] += time.perf_counter() - t
        if store is not None and epoch > 0:  # epoch 0 (the initialisation) has no history yet
            query_epochs.append(epoch)
            for field, x in stats["validation"].cproj_inputs.items():
                queries.setdefault(field, []).append(x)
    val = stats["validation"]
    val_labels = attention.query_labels(val.seed, val.next_token, vocab)  # the same rows at every checkpoint

    result = {
        "run": str(run.path), "preset_config": dataclasses.asdict(run.config),
        "config": {**dataclasses.asdict(cfg), "parts": list(cfg.parts), "device": str(device)},
        "choices": {"query_position": QUERY_POSITION, "inner_loss": LENS, "clustering": clustering.__doc__.strip(),
                    "norms": NORMS, "attention": attention.__doc__.strip()},
        "epochs": epochs, "layers": n_layer,
        "counts": {s: len(run.data[s]) for s in SPLITS},
        "outer_loss": {k: run.losses.get(k, []) for k in ("epoch", "train", "validation")},
    }
    if "inner_loss" in cfg.parts:
        result["inner_loss"] = inner
    if "norms" in cfg.parts:
        result["norms"] = norm_rows
    if "clustering" in cfg.parts:
        result["clustering"] = {"scores": cluster, "k": cluster_k,
                                "f1_chance": {"epoch": epochs[-1], "permutations": clustering.CHANCE_PERMUTATIONS,
                                              "quantile": clustering.CHANCE_QUANTILE, "scores": chance}}
    if "attention" in cfg.parts:
        t = time.perf_counter()
        result["attention"] = _attention(run, store, queries, query_epochs, val_labels, cfg, device, progress)
        seconds["attention"] = time.perf_counter() - t
    result["seconds"] = {**seconds, "total": time.perf_counter() - started}
    result["claims"] = judge(result)
    return result


def _cluster_states(stats, vocab: int, cfg: AnalyzeConfig, chance: bool) -> dict[str, list[dict]]:
    """{label: [scores of state 0..L]}: one KMeans per ground truth and state of the query token (with
    ``chance``, the chance F1 of each clustering too)."""
    points = stats.query_states.numpy()
    return {name: [clustering.cluster_scores(points[:, state], y, n_init=cfg.kmeans_init, seed=cfg.seed,
                                             chance=chance)
                   for state in range(points.shape[1])]
            for name, y in attention.query_labels(stats.seed, stats.next_token, vocab).items()}


def _open_history(run):
    from ..store import HistoryStore

    if run.history is None:
        raise ValueError(f"{run.path} has no recorded history, which the attention analysis needs: train with "
                         "`metaclm train --record-history`, or leave it out with --parts clustering,inner_loss,norms")
    store = HistoryStore(run.history)
    attrs = store.attrs
    if attrs.get("layers") != run.config.n_layer or attrs.get("heads") != run.config.n_head:
        raise ValueError(f"the history at {run.history} was recorded for {attrs.get('layers')} layers / "
                         f"{attrs.get('heads')} heads, but the run has {run.config.n_layer} / {run.config.n_head}")
    return store


def _attention(run, store, queries: dict, query_epochs: list[int], labels: dict, cfg: AnalyzeConfig,
               device, progress: bool) -> dict:
    if not query_epochs:
        return {"skipped": "no checkpoint after epoch 0 was analysed (the initialisation has no history)"}
    limits_by_epoch = epoch_limits(store.read("epoch"), query_epochs)
    n = len(next(iter(labels.values())))
    groups = np.repeat(np.arange(len(query_epochs)), n)
    limits = np.repeat([limits_by_epoch[e] for e in query_epochs], n)
    if int(limits.min()) < cfg.k:
        raise ValueError(f"epoch {query_epochs[int(np.argmin(limits)) // n]} has only {int(limits.min())} history "
                         f"rows, fewer than k = {cfg.k}")
    tiled = {name: np.tile(y, len(query_epochs)) for name, y in labels.items()}
    # On a CUDA device the kernels run there and stream the store through pinned buffers.
    stacked = {field: torch.cat(xs).to(device) for field, xs in queries.items()}
    res = attention.history_attention(store, stacked, tiled, limits, groups, len(query_epochs),
                                      heads=run.config.n_head, k=cfg.k, progress=progress)
    return {"k": cfg.k, "epochs": query_epochs, "limits": [limits_by_epoch[e] for e in query_epochs],
            "history_rows": len(store), "queries_per_epoch": n, **res}
