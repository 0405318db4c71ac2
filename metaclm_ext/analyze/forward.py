"""One forward pass per checkpoint and split: what the four analyses need from the model, nothing more.

The model is wrapped as a :class:`metaclm_ext.probe.models.LensModel`, so the states and the logit lens
are the same code that `metaclm probe` uses: state 0 is the embedding output, state l (1..L) block l's
raw output (before the final LayerNorm). Forward hooks on every block's ``attn.c_proj`` and ``mlp.c_proj``
take the inputs whose inner products with the recorded history are the weighting factors of Eq. 6
(attention, per head) and Eq. 8 (FFN).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..history_names import field_name, parse_module_key
from ..probe.models import LensModel, wrap
from ..training import IGNORE, cproj_modules, make_batch

QUERY_POSITION = (
    "Every sequence is <bos> letters <eos>, so the last token (<eos>) has no next token and the last letter's "
    "next token is always <eos>. The query of a sequence is therefore its second-to-last letter, the last "
    "position whose next token is a letter: its next-token label varies, and it has seen all but one letter."
)
LENS = (
    "Inner loss (Eq. 9) = cross-entropy of the LM head applied to the model's final LayerNorm of each state "
    "(the logit lens). GPT-2 is pre-LayerNorm: its residual stream is never normalised inside the blocks, and "
    "the LM head was trained only on ln_f's output, so ln_f is applied to every state; for the last state this "
    "is exactly the model's own loss. Token mean over every position with a next token."
)


def query_positions(rows: list[dict]) -> torch.Tensor:
    """Token index of each sequence's query: its second-to-last letter (see QUERY_POSITION)."""
    return torch.tensor([len(r["text"]) - 1 for r in rows], dtype=torch.long)


@dataclass
class SplitStats:
    """One split at one checkpoint. L = number of blocks; S = L + 1 states."""

    inner_loss: torch.Tensor      # [S] token-mean cross-entropy of the logit lens at each state
    norms: torch.Tensor           # [T, S] norm of every trained token's state (T tokens with a next token)
    query_states: torch.Tensor    # [n, S, d] the query token's state, per sequence
    cproj_inputs: dict            # {"attn_in.l": [n, n_embd], "mlp_in.l": [n, n_inner]} at the query token
    seed: torch.Tensor            # [n] int64
    next_token: torch.Tensor      # [n] int64, the query token's next token


def lens_model(model) -> LensModel:
    return wrap(model, None, "synthetic GPT-2 design model")


@torch.no_grad()
def forward_split(lm: LensModel, rows: list[dict], batch_size: int = 64) -> SplitStats:
    """Run ``rows`` through the model in eval mode and keep only the per-split statistics."""
    model = lm.model.eval()
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for key, module in cproj_modules(model).items():
        def take(_module, inputs, _output, field=field_name(*parse_module_key(key))):
            captured[field] = inputs[0]
        handles.append(module.register_forward_hook(take))
    loss_sum = torch.zeros(len(lm.layers) + 1, dtype=torch.float64)
    tokens = 0
    norms, query_states, seeds, next_tokens = [], [], [], []
    cproj: dict[str, list] = {}
    try:
        for lo in range(0, len(rows), batch_size):
            part = rows[lo : lo + batch_size]
            b = make_batch(part, lm.device)
            states = lm.states(b.input_ids, b.attention_mask)            # [S, B, T, d]
            keep = b.labels != IGNORE
            picked = states[:, keep]                                      # [S, tokens, d]
            targets = b.labels[keep]
            for s in range(picked.shape[0]):
                logits = lm.logits(picked[s]).float()
                loss_sum[s] += float(F.cross_entropy(logits, targets, reduction="sum"))
            tokens += int(targets.numel())
            norms.append(picked.norm(dim=-1).T.cpu())
            pos = query_positions(part).to(lm.device)
            at = torch.arange(len(part), device=lm.device)
            query_states.append(states[:, at, pos].transpose(0, 1).cpu())
            for key, x in captured.items():
                cproj.setdefault(key, []).append(x[at, pos].float().cpu())
            seeds.append(b.seeds.cpu())
            next_tokens.append(b.labels[at, pos].cpu())
    finally:
        for h in handles:
            h.remove()
    return SplitStats(
        inner_loss=(loss_sum / max(tokens, 1)).float(),
        norms=torch.cat(norms),
        query_states=torch.cat(query_states),
        cproj_inputs={k: torch.cat(v) for k, v in cproj.items()},
        seed=torch.cat(seeds),
        next_token=torch.cat(next_tokens),
    )
