"""The configuration of a `metaclm train` run: every hyperparameter, the paper's presets, and their checks."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from ..dtypes import HISTORY_DTYPE_NAMES

__all__ = ["PRESETS", "TrainConfig", "make_config", "validate_config"]


@dataclasses.dataclass
class TrainConfig:
    """Every hyperparameter of a run; presets fill it and flags override any field."""
    data_setting: str = "small"
    data_seed: int = 0
    max_train_sequences: Optional[int] = None  # a prefix of the shuffled training set (tests)
    max_validation_sequences: Optional[int] = None
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 1.0
    momentum: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    scheduler: str = "constant"  # constant | cosine (annealed to 0 over all steps)
    epochs: int = 174
    batch_size: int = 16  # not given in the paper
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 64
    n_inner: int = 128
    dropout: float = 0.2
    seed: int = 0
    checkpoint_every: int = 1
    device: str = "auto"  # auto = cuda when available, else cpu
    record_history: Optional[str] = None  # the store folder; relative paths are relative to the run folder
    record_errors: bool = False
    history_dtype: str = "float16"


PRESETS = {  # Table 5 (Section 5) and Table 6 (Section 8.1); `tiny` is the CI run
    "table5": dict(data_setting="small", optimizer="sgd", lr=1.0, momentum=0.0, weight_decay=0.0,
                   max_grad_norm=1.0, scheduler="constant", epochs=174),
    "table6": dict(data_setting="large", optimizer="adamw", lr=1e-3, weight_decay=0.1, max_grad_norm=1.0,
                   scheduler="cosine", epochs=300, checkpoint_every=10),
    "tiny": dict(data_setting="small", optimizer="sgd", lr=1.0, max_grad_norm=1.0, epochs=3, batch_size=8,
                 max_train_sequences=24, max_validation_sequences=16, checkpoint_every=1),
}


def make_config(preset: str, **overrides) -> TrainConfig:
    """The preset's config with ``overrides`` (None values are ignored); validates every field."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}")
    cfg = TrainConfig(**{**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}})
    validate_config(cfg)
    return cfg


def validate_config(cfg: TrainConfig) -> None:
    """ValueError naming the first field that no run could train with."""
    if cfg.optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be sgd or adamw, got {cfg.optimizer!r}")
    if cfg.scheduler not in ("constant", "cosine"):
        raise ValueError(f"scheduler must be constant or cosine, got {cfg.scheduler!r}")
    if cfg.history_dtype not in HISTORY_DTYPE_NAMES:
        raise ValueError(f"history_dtype must be one of {sorted(HISTORY_DTYPE_NAMES)}, got {cfg.history_dtype!r}")
    for name in ("epochs", "batch_size", "n_layer", "n_head", "n_embd", "n_inner", "checkpoint_every"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}")
    for name in ("max_train_sequences", "max_validation_sequences"):
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            raise ValueError(f"{name} must be positive (or unset for all sequences), got {getattr(cfg, name)}")
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
    for name in ("lr", "momentum", "weight_decay", "dropout", "max_grad_norm"):
        value = getattr(cfg, name)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
    if not cfg.lr > 0 or not 0 <= cfg.dropout < 1 or cfg.momentum < 0 or cfg.weight_decay < 0:
        raise ValueError("lr must be > 0, dropout in [0, 1), momentum and weight_decay >= 0")
    if cfg.max_grad_norm is not None and cfg.max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm must be positive or None, got {cfg.max_grad_norm}")
    if cfg.record_errors and not cfg.record_history:
        raise ValueError("record_errors needs record_history (a store folder)")
