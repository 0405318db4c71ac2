"""A `metaclm train` run folder: its layout, loading it, and the state a resumed run continues from.

RUN_DIR layout (every later command takes RUN_DIR):
  config.json                 the exact config (preset + overrides), parameter count, device, versions
  data/                       the dataset (train.jsonl, validation.jsonl, meta.json; see metaclm_ext.data)
  losses.json                 per epoch: train loss (token mean over the epoch's steps), validation loss,
                              lr, cumulative wall and recording seconds
  summary.json                wall time, steps, recording rows/time/overhead (written when training ends)
  checkpoints/epoch_XXXX/     GPT2LMHeadModel.save_pretrained (epoch_0000 = the initialisation W0) and
                              train_state.pt (optimizer, schedule, random generators, step, losses): the
                              point `metaclm train --resume` continues from
  history/ (or --record-history DIR)  the HistoryStore written by metaclm_ext.recording (training/history.py)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch

from .. import data as datamod
from ..hf_quiet import quiet_transformers
from .config import TrainConfig, validate_config

__all__ = ["CONFIG", "TRAIN_STATE", "Run", "checkpoint_dir", "epoch_limits", "history_path", "load_checkpoint",
           "load_run", "load_train_state", "save_train_state"]

CONFIG = "config.json"
TRAIN_STATE = "train_state.pt"


def checkpoint_dir(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"epoch_{epoch:04d}"


def history_path(run_dir: Path, record_history: Optional[str]) -> Optional[Path]:
    """The store folder of a run: ``record_history`` as configured, a relative path taken relative to the
    run folder (so a run folder can be moved or opened from anywhere)."""
    if not record_history:
        return None
    path = Path(record_history)
    return path if path.is_absolute() else Path(run_dir) / path


class Run(NamedTuple):
    """A trained run folder: its config, dataset, losses and the epochs that have checkpoints."""
    path: Path
    config: TrainConfig
    info: dict  # config.json as written (parameters, device, steps, versions)
    data: dict  # {"train", "validation", "meta"} as metaclm_ext.data.load returns
    losses: dict
    epochs: list[int]  # checkpointed epochs, ascending (0 = initialisation)

    @property
    def history(self) -> Optional[Path]:
        return history_path(self.path, self.config.record_history)


def load_run(run_dir) -> Run:
    """Open RUN_DIR (clear FileNotFoundError / ValueError naming what is missing or wrong)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no {CONFIG}; make one with `metaclm train`)")
    cfg, info = _read_run_config(run_dir / CONFIG)
    losses_path = run_dir / "losses.json"
    losses = json.loads(losses_path.read_text()) if losses_path.is_file() else {}
    epochs = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("epoch_*")
                    if p.is_dir() and p.name.split("_")[1].isdigit())
    return Run(run_dir, cfg, info, datamod.load(run_dir / "data"), losses, epochs)


def _read_run_config(path: Path) -> tuple[TrainConfig, dict]:
    """The validated TrainConfig of a run's config.json and the file's content, or ValueError naming it."""
    try:
        info = json.loads(path.read_text())
        cfg = TrainConfig(**info["config"])
        validate_config(cfg)
        if isinstance(info["n_positions"], bool) or not isinstance(info["n_positions"], int) or info["n_positions"] <= 0:
            raise ValueError(f"n_positions must be a positive int, got {info['n_positions']!r}")
    except KeyError as exc:
        raise ValueError(f"{path} is not a run config: it has no key {exc}") from None
    except (ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise ValueError(f"{path} is not a valid run config ({type(exc).__name__}: {exc})") from None
    return cfg, info


def _check_checkpoint_config(run: Run, folder: Path) -> None:
    """ValueError unless the checkpoint's model config is the run's: a config that disagrees (n_layer =
    100000) would otherwise build whatever model it describes before the weights fail to fit it."""
    path = folder / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{path} is not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} must hold a JSON object")
    cfg = run.config
    want = {"model_type": "gpt2", "vocab_size": len(datamod.VOCAB), "n_positions": run.info["n_positions"],
            "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.n_inner}
    wrong = {key: saved.get(key) for key, value in want.items() if saved.get(key) != value}
    if wrong:
        raise ValueError(f"checkpoint {folder} does not belong to run {run.path}: its config has "
                         + ", ".join(f"{k} = {v!r} (the run's: {want[k]!r})" for k, v in wrong.items()))


def load_checkpoint(run_dir, epoch: Optional[int] = None, device: str = "cpu"):
    """The GPT2LMHeadModel saved at ``epoch`` (default: the last), in eval mode; ValueError if the saved
    model is not the run's (its architecture disagrees with config.json)."""
    from transformers import GPT2LMHeadModel  # only where needed, as in quiet_transformers

    quiet_transformers()
    run = load_run(run_dir)
    if not run.epochs:
        raise FileNotFoundError(f"{run_dir} has no checkpoints")
    epoch = run.epochs[-1] if epoch is None else epoch
    if epoch not in run.epochs:
        raise FileNotFoundError(f"{run_dir} has no checkpoint for epoch {epoch} (has {run.epochs})")
    folder = checkpoint_dir(run.path, epoch)
    _check_checkpoint_config(run, folder)
    # safetensors only: a pickled pytorch_model.bin someone put in the run folder is never loaded
    return GPT2LMHeadModel.from_pretrained(folder, use_safetensors=True).to(device).eval()


def epoch_limits(epoch_column: np.ndarray, epochs: list[int]) -> dict[int, int]:
    """Rows recorded up to the end of each epoch (the history a checkpoint has seen)."""
    if epoch_column.size and np.any(np.diff(epoch_column) < 0):
        raise ValueError("the store's epoch column is not ascending: it was not written by `metaclm train`")
    return {e: int(np.searchsorted(epoch_column, e, side="right")) for e in epochs}


def save_train_state(folder: Path, state: dict) -> None:
    """Everything beyond the weights that training needs to continue exactly, written atomically."""
    tmp = folder / (TRAIN_STATE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(folder / TRAIN_STATE)


def load_train_state(folder: Path) -> dict:
    # weights_only: the state holds tensors, numbers and lists only, and nothing in a run folder is unpickled.
    return torch.load(folder / TRAIN_STATE, weights_only=True)
