"""Batches of the synthetic language for the paper's GPT-2 runs, and the loss whose history is recorded."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import data as datamod
from ..recording.rows import IGNORE

__all__ = ["IGNORE", "Batch", "evaluate", "lm_loss", "make_batch"]


class Batch(NamedTuple):
    """A padded batch: ``labels`` is IGNORE where a position has no next token (the last token, padding)."""
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T] next-token ids (aligned with the positions), IGNORE where untrained
    seq_ids: torch.Tensor  # [B]
    seeds: torch.Tensor  # [B]


def make_batch(rows: list[dict], device: torch.device = torch.device("cpu")) -> Batch:
    """Right-padded token tensors for dataset rows ({"id", "seed", "text"})."""
    ids = [datamod.encode(r["text"]) for r in rows]
    width = max(len(x) for x in ids)
    inp = torch.full((len(ids), width), datamod.PAD, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    labels = torch.full((len(ids), width), IGNORE, dtype=torch.long)
    for i, x in enumerate(ids):
        inp[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
        labels[i, : len(x) - 1] = torch.tensor(x[1:])
    seq_ids = torch.tensor([r["id"] for r in rows])
    seeds = torch.tensor([r["seed"] for r in rows])
    return Batch(*(t.to(device) for t in (inp, mask, labels, seq_ids, seeds)))


def lm_loss(model, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over trained tokens (the loss whose per-token gradients the history records)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE)


@torch.no_grad()
def evaluate(model, rows: list[dict], device: torch.device, batch_size: int = 64) -> float:
    """Token-mean validation loss in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        b = make_batch(rows[i : i + batch_size], device)
        n = int((b.labels != IGNORE).sum())
        total += float(lm_loss(model, b)) * n
        count += n
    model.train(was_training)
    return total / count
