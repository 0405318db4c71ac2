"""`metaclm finetune`: fine-tune a pretrained causal LM with plain SGD and record its training history.

Every optimizer step trains ``batch_size`` sequences of ``seq_len`` positions of the packed corpus
(packing.py) on the next-token loss; the recorder keeps, per trained token, the inputs and error signals
of the chosen layers' attention output projection and FFN down projection, with the token's document id
in the ``article`` column. Plain SGD (no momentum, no weight decay) makes the recorded errors sum exactly
to each recorded weight's change, which `metaclm dualcheck RUN` verifies on the float32 store.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..probe.models import load_model
from ..recording import HistoryRecorder
from .documents import load_documents
from .layers import LayerView, family_preset, parse_layers, projections
from .precision import hold_in_float64
from .packing import batches, epochs_read, token_stream
from .runfolder import (ARTICLES, CHECKPOINTS, HISTORY, HISTORY_FP32, SUMMARY, checkpoint_folder, checkpoint_name,
                        folder_bytes)

LABEL_COLUMN = "article"


@dataclass
class FinetuneConfig:
    """What `metaclm finetune` trains and records (the CLI's flags; defaults sized for a 2-core CPU)."""

    out: str
    model: str = "smollm2"
    corpus: str = "wikipedia"
    tokens: int = 50_000
    seq_len: int = 128
    batch_size: int = 4
    lr: float = 0.01
    clip: Optional[float] = None
    layers: str = "all"
    fp32_layers: str = "0,mid,-1"
    dtype: str = "float16"
    checkpoints: int = 4
    heldout_sentences: int = 2
    document_tokens: int = 1024
    seed: int = 0

    def check(self) -> None:
        for name in ("tokens", "seq_len", "batch_size", "document_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an int >= 1, got {value!r}")
        if isinstance(self.checkpoints, bool) or not isinstance(self.checkpoints, int) or self.checkpoints < 2:
            raise ValueError(f"--checkpoints must be an int >= 2 (the start and the end), got {self.checkpoints!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a positive number, got {self.lr!r}")
        if self.clip is not None and not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"--clip must be a positive number, got {self.clip!r}")
        if self.dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"--dtype must be float16, bfloat16 or float32, got {self.dtype!r}")

    @property
    def steps(self) -> int:
        return -(-self.tokens // (self.batch_size * self.seq_len))


def checkpoint_steps(steps: int, count: int) -> list[int]:
    """``count`` evenly spaced step counts from 0 (the pretrained start) to ``steps`` (the end)."""
    return sorted({round(i * steps / (count - 1)) for i in range(count)})


def model_context(config) -> Optional[int]:
    """The longest sequence the model's positions cover (None when the config does not say)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _save_checkpoint(lm, out: Path, step: int) -> Path:
    folder = checkpoint_folder(out, step)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def _recorder(lm, path: Path, layers: list[int], dtype: str, corpus) -> HistoryRecorder:
    view = LayerView(lm, layers)
    return HistoryRecorder(view, path, modules=view.preset, dtype=dtype, columns={LABEL_COLUMN: "int64"},
                           attrs={"finetune": {"model": lm.description, "corpus": corpus.description,
                                               "label": corpus.label, "layers": layers}})


def _train(lm, plan: list, recorders: dict, optimizer, cfg: FinetuneConfig, saves: list[int], out: Path,
           row_bytes: int, progress: bool) -> tuple[list[float], set[int], dict]:
    """The training loop: one recorded forward/backward per step, checkpoints at ``saves`` (step 0 first).
    Returns the losses, the trained document ids and the seconds spent training and saving checkpoints."""
    model = lm.model
    losses, trained = [], set()
    started = t = time.perf_counter()
    _save_checkpoint(lm, out, 0)
    checkpoint_seconds = time.perf_counter() - t
    bar = tqdm(total=len(plan) * cfg.batch_size * cfg.seq_len, unit="tok", unit_scale=True, desc="fine-tuning",
               disable=not progress)
    for step, batch in enumerate(plan):
        with contextlib.ExitStack() as stack:
            for recorder in recorders.values():
                stack.enter_context(recorder.capture(targets=batch.targets, tokens=batch.inputs,
                                                     metadata={LABEL_COLUMN: batch.labels}))
            logits = model(input_ids=batch.inputs, use_cache=False).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch.targets.reshape(-1))
            if not torch.isfinite(loss):
                raise ValueError(f"the loss is not finite at step {step}: lower --lr (now {cfg.lr:g})")
            loss.backward()
        if cfg.clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        for recorder in recorders.values():
            if recorder.step(optimizer, step) is None:
                raise ValueError(f"a gradient is not finite at step {step}: lower --lr (now {cfg.lr:g})")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        trained.update(batch.labels.unique().tolist())
        bar.update(batch.inputs.numel())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", history=f"{bar.n * row_bytes / 1e9:.2f}GB")
        if step + 1 in saves:
            t = time.perf_counter()
            _save_checkpoint(lm, out, step + 1)
            checkpoint_seconds += time.perf_counter() - t
    bar.close()
    return losses, trained, {"training": time.perf_counter() - started - checkpoint_seconds,
                             "checkpoints": checkpoint_seconds}


def finetune(cfg: FinetuneConfig, progress: bool = True) -> dict:
    """Fine-tune, record, save checkpoints and write finetune.json / articles.json; returns finetune.json."""
    cfg.check()
    started = time.perf_counter()
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty: fine-tune into a new folder (a run is never overwritten)")
    corpus = load_documents(cfg.corpus, cfg.heldout_sentences, cfg.seed)
    lm = load_model(cfg.model)
    context = model_context(lm.model.config)
    if context is not None and cfg.seq_len > context:
        raise ValueError(f"--seq-len {cfg.seq_len} is longer than the model's context of {context} tokens")
    num_layers = len(lm.layers)
    layers = parse_layers(cfg.layers, num_layers, "--layers")
    fp32_layers = parse_layers(cfg.fp32_layers, num_layers, "--fp32-layers")
    if not layers and not fp32_layers:
        raise ValueError("--layers and --fp32-layers select no layer: nothing would be recorded")
    stream = token_stream(corpus, lm.tokenizer, cfg.document_tokens, cfg.seed)
    steps = cfg.steps
    plan = batches(stream, steps, cfg.batch_size, cfg.seq_len)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    model = lm.model.train()
    # Before the recorders attach, so that they record the float64 modules' float64 inputs and outputs.
    if fp32_layers:
        hold_in_float64(projections(LayerView(lm, fp32_layers)))
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)  # plain SGD: the errors sum to the change
    stores = {name: (chosen, dtype) for name, chosen, dtype in ((HISTORY, layers, cfg.dtype),
                                                               (HISTORY_FP32, fp32_layers, "float32")) if chosen}
    recorders = {name: _recorder(lm, out / name, chosen, dtype, corpus) for name, (chosen, dtype) in stores.items()}
    row_bytes = sum(sum(s.in_features + s.out_features for s in r.specs) * (4 if stores[n][1] == "float32" else 2)
                    for n, r in recorders.items())
    saves = checkpoint_steps(steps, cfg.checkpoints)
    losses, trained, seconds = _train(lm, plan, recorders, optimizer, cfg, saves, out, row_bytes, progress)
    for recorder in recorders.values():
        recorder.close()

    rows_per_step = cfg.batch_size * cfg.seq_len
    articles = {"label": corpus.label, "corpus": corpus.description,
                "articles": {str(d.id): {"title": d.title, "train_tokens": stream.tokens_per_document[d.id],
                                         "heldout": list(d.heldout)}
                             for d in corpus.documents if d.id in trained}}
    (out / ARTICLES).write_text(json.dumps(articles, indent=1) + "\n")
    summary = {
        "model": {"spec": cfg.model, "description": lm.description, "family": lm.family,
                  "preset": family_preset(lm)[0], "layers": num_layers, "context": context,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "corpus": {"spec": cfg.corpus, "description": corpus.description, "label": corpus.label,
                   "documents": len(corpus.documents), "documents_trained": len(trained),
                   "heldout_sentences": sum(len(d.heldout) for d in corpus.documents if d.id in trained),
                   "stream_tokens": len(stream.tokens),
                   "epochs": epochs_read(stream, steps, cfg.batch_size, cfg.seq_len)},
        "settings": dataclasses.asdict(cfg),
        "optimizer": "torch.optim.SGD (momentum 0, weight decay 0)" + (f", gradient norm clipped to {cfg.clip:g}"
                                                                        if cfg.clip is not None else ""),
        "steps": steps, "tokens": steps * rows_per_step,
        "rows": {name: steps * rows_per_step for name in recorders},
        "bytes": {name: folder_bytes(out / name) for name in recorders},
        "stores": {name: {"dtype": dtype, "layers": chosen} for name, (chosen, dtype) in stores.items()},
        "float64_weights": {"layers": fp32_layers, "why": "precision.py: the exactness-checked projections keep "
                            "float64 weights so that float32 rounding of each SGD update does not blur their change"},
        "wall_seconds": {"total": time.perf_counter() - started, **seconds},
        "tokens_per_second": steps * rows_per_step / seconds["training"],
        "losses": losses,
        "checkpoints": [{"step": s, "path": f"{CHECKPOINTS}/{checkpoint_name(s)}", "history_rows": s * rows_per_step}
                        for s in saves],
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    return summary
