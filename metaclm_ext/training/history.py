"""The training history of a `metaclm train` run, recorded by the general recorder (metaclm_ext.recording).

Every block's attn.c_proj and mlp.c_proj (the "gpt2" preset) is recorded as the fields ``attn_in.l``,
``mlp_in.l`` (and with errors ``attn_err.l``, ``mlp_err.l``). Beside the recorder's own columns (step,
micro_batch, sequence, position, token, target = the next token) a run records:
  epoch            the epoch of the step (1-based)
  example          the dataset id of the sequence
  seed             the seed (task) of the sequence
  seed_next_token  seed * vocab_size + target: the pair the paper's Figure 3 labels by
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..recording import HistoryRecorder
from ..recording.rows import BASE_COLUMNS
from .batches import Batch
from .config import TrainConfig

__all__ = ["COLUMNS", "LABEL_COLUMNS", "STORE_COLUMNS", "open_recorder", "step_metadata"]

COLUMNS = ("epoch", "example", "seed", "seed_next_token")
STORE_COLUMNS = BASE_COLUMNS + COLUMNS  # every column of a run's store
# The ground truths the analysis compares queries with, and the store column that holds each.
COMMIT_AT_CHECKPOINTS = 2**62  # steps per commit: never by count, only by recorder.commit()
LABEL_COLUMNS = {"seed": "seed", "seed_next_token": "seed_next_token", "next_token": "target"}


def open_recorder(model, cfg: TrainConfig, path: Path, vocab_size: int,
                  resume_at_step: Optional[int] = None) -> HistoryRecorder:
    """The recorder of a run's history at ``path``; ``resume_at_step`` continues an existing store from that
    step (rows of later steps, recorded after the checkpoint a resumed run starts from, are dropped)."""
    attrs = {"layers": cfg.n_layer, "heads": cfg.n_head, "head_dim": cfg.n_embd // cfg.n_head,
             "vocab_size": vocab_size, "optimizer": cfg.optimizer, "seed_next_token": "seed * vocab_size + target"}
    # Committed at each checkpoint (loop.py), not each step: a commit fsyncs every field's file, which on the
    # paper's small model costs more than the step itself; a resumed run restarts from a checkpoint anyway.
    return HistoryRecorder(model, path, "gpt2", errors=cfg.record_errors, dtype=cfg.history_dtype,
                           columns={c: "int64" for c in COLUMNS}, attrs=attrs, commit_every=COMMIT_AT_CHECKPOINTS,
                           resume=resume_at_step is not None, resume_at_step=resume_at_step)


def step_metadata(batch: Batch, epoch: int, vocab_size: int) -> dict[str, torch.Tensor]:
    """The run's columns for one batch: per sequence [B], or per position [B, T] for seed_next_token."""
    seeds = batch.seeds.cpu()
    return {"epoch": torch.full_like(seeds, epoch), "example": batch.seq_ids.cpu(), "seed": seeds,
            "seed_next_token": seeds[:, None] * vocab_size + batch.labels.cpu()}
