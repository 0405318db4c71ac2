"""The paper's GPT-2 design model: building it, the device it runs on, and its recorded output projections."""
from __future__ import annotations

import torch

from .. import data as datamod
from ..hf_quiet import quiet_transformers
from ..history_names import module_key
from .config import TrainConfig

__all__ = ["build_model", "count_parameters", "cproj_modules", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; ValueError for anything else."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def build_model(cfg: TrainConfig, n_positions: int):
    """GPT2LMHeadModel of the paper's design (tied LM head, GELU, pre-LayerNorm as in GPT-2)."""
    from transformers import GPT2Config, GPT2LMHeadModel  # only where needed, as in quiet_transformers

    quiet_transformers()
    config = GPT2Config(
        vocab_size=len(datamod.VOCAB), n_positions=n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=cfg.n_inner, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout, bos_token_id=datamod.BOS, eos_token_id=datamod.EOS, pad_token_id=datamod.PAD,
    )
    return GPT2LMHeadModel(config)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def cproj_modules(model) -> dict[str, torch.nn.Module]:
    """{"attn.l" / "mlp.l": block l's attn.c_proj / mlp.c_proj}, in layer order: the modules whose inputs (and
    output errors) the history records as the fields "attn_in.l" / "mlp_in.l" (and "*_err.l")."""
    return {module_key(kind, l): module for l, block in enumerate(model.transformer.h)
            for kind, module in (("attn", block.attn.c_proj), ("mlp", block.mlp.c_proj))}
