"""The norm-drop analysis (norm_drops.py) of a pretrained LM: the probe's corpus, model, batches, studied tokens
and loss filter, so its tokens are exactly those of the probe's Table 1; besides every state it reads the residual
stream after each block's attention sublayer, i.e. the input of the block's pre-MLP norm."""
from __future__ import annotations

import time
from dataclasses import asdict

import torch
from tqdm import tqdm

from . import norm_drops
from .lens import make_batch, token_stats
from .models import LensModel
from .run import LOSS_FILTER, ProbeConfig, kept_by_loss, length_sorted_batches, nothing_kept, open_probe

# The norm a block applies to its residual stream before the MLP, by the names of GPT-2, LLaMA and Gemma. Gemma's
# post_attention_layernorm normalises the attention output instead, so its pre_feedforward_layernorm comes first.
PRE_MLP_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2")


def pre_mlp_norm(layer: torch.nn.Module) -> torch.nn.Module:
    """The module of ``layer`` whose input is the residual stream after attention."""
    for name in PRE_MLP_NORMS:
        if isinstance(getattr(layer, name, None), torch.nn.Module):
            return getattr(layer, name)
    raise TypeError(f"--model: a {type(layer).__name__} block has none of {', '.join(PRE_MLP_NORMS)}, so its "
                    "residual stream after attention cannot be read")


@torch.no_grad()
def block_states(lm: LensModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([L+1, B, T, d] states as LensModel.states, [L, B, T, d] residual stream after each block's attention)."""
    captured: list[torch.Tensor] = []

    def take(_module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])

    handles = [pre_mlp_norm(layer).register_forward_pre_hook(take, with_kwargs=True) for layer in lm.layers]
    try:
        states = lm.states(input_ids, attention_mask)
    finally:
        for h in handles:
            h.remove()
    if len(captured) != len(lm.layers):
        raise RuntimeError(f"captured {len(captured)} pre-MLP inputs for {len(lm.layers)} layers")
    return states, torch.stack([c.float() for c in captured])


def read_studied(cfg: ProbeConfig, progress: bool = True) -> dict:
    """The probe's studied tokens of its kept samples: {"states": [N, L+1, d], "after_attention": [N, L] norms,
    "lm", "corpus", "counts", "device"}."""
    device, corpus, lm = open_probe(cfg)
    states_out, attention_out = [], []
    scored = kept = 0
    for idx in tqdm(length_sorted_batches(corpus.samples, cfg.batch_size), desc=f"norm drops {cfg.model}",
                    disable=not progress):
        batch = make_batch(lm.tokenizer, [corpus.samples[i] for i in idx], cfg.max_tokens, device)
        states, after_attention = block_states(lm, batch.input_ids, batch.attention_mask)
        losses, _, which = token_stats(lm, states[-1:], batch)           # the last layer's loss: the filter only
        keep = torch.zeros_like(which, dtype=torch.bool)
        for b in range(len(idx)):
            sel = which == b
            if sel.any():
                scored += 1
                if kept_by_loss(float(losses[0, sel].mean())):
                    kept += 1
                    keep |= sel
        select = batch.studied()
        states_out.append(states[:, select][:, keep].transpose(0, 1).cpu())
        attention_out.append(after_attention[:, select][:, keep].norm(dim=-1).T.cpu())
    if not kept:
        raise nothing_kept(cfg)
    return {"states": torch.cat(states_out), "after_attention": torch.cat(attention_out), "lm": lm, "corpus": corpus,
            "device": device, "counts": {"sampled": len(corpus.samples), "scored": scored,
                                         "kept_after_loss_filter": kept}}


def run_norm_drops(cfg: ProbeConfig, progress: bool = True) -> dict:
    """norm_drops.explain over Table 1's states (0 .. L-1: the last layer excluded) of the probe's tokens."""
    started = time.perf_counter()
    read = read_studied(cfg, progress)
    lm, corpus = read["lm"], read["corpus"]
    n_layers = len(lm.layers)
    analysis = norm_drops.explain(read["states"][:, :n_layers], read["after_attention"][:, : n_layers - 1])
    return {"model": {"spec": cfg.model, "description": lm.description, "family": lm.family, "layers": n_layers,
                      "hidden_size": analysis["hidden_size"]},
            "corpus": {"spec": cfg.corpus, "description": corpus.description, "source": corpus.source},
            "config": {**asdict(cfg), "device": read["device"], "loss_filter": LOSS_FILTER},
            "counts": {**read["counts"], "studied_tokens_kept": analysis["tokens"]},
            **analysis, "seconds": time.perf_counter() - started}
