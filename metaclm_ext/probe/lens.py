"""The inner loss of Section 5/6 (eq. 9): each layer's current-token representation through the LM head.

We hook each decoder layer's raw output (before the final norm) and score it two ways: through the model's
own final norm and LM head (the "logit lens"; for the last layer exactly the model's logits), and through
the LM head alone, as Eq. 9 writes it (LH(z), no norm). transformers' ``hidden_states[-1]`` is already
normed, so it is not used (the lens would norm it twice).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layer_trend import spearman_with_order
from .models import LensModel

FIRST_POSITION = 5       # the paper studies the 5th token of a text and later ones
LOGIT_ROWS = 256         # rows per LM-head call: bounds memory for 256k-token vocabularies


@dataclass
class Batch:
    """Right-padded token ids; `first` is the index of each sample's 5th text token (after any BOS)."""
    input_ids: torch.Tensor       # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    lengths: torch.Tensor         # [B]
    first: torch.Tensor           # [B]

    def studied(self) -> torch.Tensor:
        """[B, T] mask of current tokens studied: from the 5th text token to the one before the last."""
        t = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return (t[None] >= self.first[:, None]) & (t[None] < self.lengths[:, None] - 1)

    def last_studied(self) -> torch.Tensor:
        """[B] position of each sample's last studied token (its next token is the sample's last one)."""
        return self.lengths - 2


def make_batch(tokenizer, texts: list[str], max_tokens: int, device) -> Batch:
    """Tokenise, truncate to max_tokens and right-pad by hand (GPT-2's tokenizer has no pad token)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = [tokenizer(t, add_special_tokens=True)["input_ids"][:max_tokens] for t in texts]
    offsets = [1 if bos is not None and len(x) and x[0] == bos else 0 for x in ids]
    width = max(len(x) for x in ids)
    input_ids = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    lengths = mask.sum(1)
    first = torch.tensor(offsets) + FIRST_POSITION - 1
    return Batch(input_ids.to(device), mask.to(device), lengths.to(device), first.to(device))


@torch.no_grad()
def token_stats(lm: LensModel, states: torch.Tensor, batch: Batch,
                final_norm: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per studied token: inner loss [S, K] and norm [S, K] at every state, and its sample index [K].

    states [S, B, T, d] as returned by LensModel.states; token (b, t) is scored against input_ids[b, t+1],
    through the final norm and LM head (final_norm=True, the logit lens) or the LM head alone (Eq. 9).
    """
    select = batch.studied()
    targets = batch.input_ids[:, 1:]
    targets = torch.cat([targets, targets[:, :1]], 1)[select]          # next token of each studied position
    sample = torch.nonzero(select)[:, 0]
    picked = states[:, select]                                          # [S, K, d]
    losses = torch.empty(picked.shape[:2], device=picked.device)
    for s in range(picked.shape[0]):
        for lo in range(0, picked.shape[1], LOGIT_ROWS):
            logits = lm.logits(picked[s, lo : lo + LOGIT_ROWS], final_norm).float()
            losses[s, lo : lo + LOGIT_ROWS] = F.cross_entropy(logits, targets[lo : lo + LOGIT_ROWS], reduction="none")
    return losses, picked.norm(dim=-1), sample


def layer_trend(mean: list[float]) -> float:
    """Spearman's rank correlation of a per-state loss curve with the layer number over layers 1..L (the
    embeddings, state 0, left out): -1 = falling at every step, 0 = no monotone trend. NaN for < 3 layers."""
    layers = mean[1:]
    if len(layers) < 3:
        return float("nan")
    return spearman_with_order(layers)
