"""`metaclm train`: the paper's GPT-2 design model trained on the synthetic language (Section 5, Appendix E).

RUN_DIR layout (every later command takes RUN_DIR; load it with :func:`load_run` / :func:`load_checkpoint`):
  config.json                 the exact config (preset + overrides), parameter count, device, versions
  data/                       the dataset (train.jsonl, validation.jsonl, meta.json; see metaclm_ext.data)
  losses.json                 per epoch: train loss (token mean over the epoch's steps), validation loss,
                              lr, cumulative wall and recording seconds
  summary.json                wall time, steps, recording rows/time/overhead
  checkpoints/epoch_XXXX/     GPT2LMHeadModel.save_pretrained (epoch_0000 = the initialisation W0)
  history/ (or --record-history DIR)  the HistoryStore of metaclm_ext.record
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data as datamod
from .dtypes import HISTORY_DTYPE_NAMES

IGNORE = -100


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
    record_history: Optional[str] = None
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
    _validate(cfg)
    return cfg


def _validate(cfg: TrainConfig) -> None:
    if cfg.optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be sgd or adamw, got {cfg.optimizer!r}")
    if cfg.scheduler not in ("constant", "cosine"):
        raise ValueError(f"scheduler must be constant or cosine, got {cfg.scheduler!r}")
    if cfg.history_dtype not in HISTORY_DTYPE_NAMES:
        raise ValueError(f"history_dtype must be one of {sorted(HISTORY_DTYPE_NAMES)}, got {cfg.history_dtype!r}")
    for name in ("epochs", "batch_size", "n_layer", "n_head", "n_embd", "n_inner", "checkpoint_every"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
    if not cfg.lr > 0 or not 0 <= cfg.dropout < 1 or cfg.momentum < 0 or cfg.weight_decay < 0:
        raise ValueError("lr must be > 0, dropout in [0, 1), momentum and weight_decay >= 0")
    if cfg.max_grad_norm is not None and cfg.max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm must be positive or None, got {cfg.max_grad_norm}")
    if cfg.record_errors and not cfg.record_history:
        raise ValueError("record_errors needs record_history (a store folder)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message lists every device type it knows
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def _quiet_transformers() -> None:
    """No per-call progress bars from save_pretrained / from_pretrained (one bar per run is ours)."""
    from transformers.utils import logging  # transformers takes seconds to import: only where a model is made

    logging.disable_progress_bar()


def build_model(cfg: TrainConfig, n_positions: int):
    """GPT2LMHeadModel of the paper's design (tied LM head, GELU, pre-LayerNorm as in GPT-2)."""
    from transformers import GPT2Config, GPT2LMHeadModel  # only where needed, as in _quiet_transformers

    _quiet_transformers()
    config = GPT2Config(
        vocab_size=len(datamod.VOCAB), n_positions=n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=cfg.n_inner, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout, bos_token_id=datamod.BOS, eos_token_id=datamod.EOS, pad_token_id=datamod.PAD,
    )
    return GPT2LMHeadModel(config)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


class Batch(NamedTuple):
    """A padded batch: ``labels`` is IGNORE where a position has no next token (the last token, padding)."""
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T] next-token ids, IGNORE where untrained
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


def _optimizer(cfg: TrainConfig, model):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _subset(rows: list[dict], limit: Optional[int], gen: torch.Generator) -> list[dict]:
    if limit is None or limit >= len(rows):
        return rows
    keep = sorted(torch.randperm(len(rows), generator=gen)[:limit].tolist())
    return [rows[i] for i in keep]


def checkpoint_dir(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"epoch_{epoch:04d}"


def train(cfg: TrainConfig, run_dir: Path, data_dir: Optional[Path] = None, progress: bool = True) -> dict:
    """Train one run into ``run_dir`` (generating the data there unless ``data_dir`` is given).

    Returns the summary dict (also written to summary.json).
    """
    _validate(cfg)
    run_dir = Path(run_dir)
    if (run_dir / "config.json").exists():
        raise FileExistsError(f"{run_dir} already holds a run (config.json exists); choose a new --out")
    device = resolve_device(cfg.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    if data_dir is None:
        dataset = datamod.generate(cfg.data_setting, cfg.data_seed)
    else:
        dataset = datamod.load(data_dir)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    dataset["train"] = _subset(dataset["train"], cfg.max_train_sequences, gen)
    dataset["validation"] = _subset(dataset["validation"], cfg.max_validation_sequences, gen)
    datamod.write(dataset, run_dir / "data")
    train_rows, val_rows = dataset["train"], dataset["validation"]

    n_positions = max(len(r["text"]) for r in train_rows + val_rows) + 2
    model = build_model(cfg, n_positions).to(device)
    n_params = count_parameters(model)
    opt = _optimizer(cfg, model)
    steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps) if cfg.scheduler == "cosine"
             else None)
    import transformers  # only where needed, as in _quiet_transformers

    (run_dir / "config.json").write_text(json.dumps({
        "config": dataclasses.asdict(cfg), "parameters": n_params, "n_positions": n_positions,
        "device": str(device), "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
        "torch": torch.__version__, "transformers": transformers.__version__,
    }, indent=1) + "\n")
    print(f"model: GPT2LMHeadModel {cfg.n_layer} layers, {cfg.n_head} heads, hidden {cfg.n_embd}, FFN "
          f"{cfg.n_inner}: {n_params:,} parameters; {len(train_rows)} train / {len(val_rows)} validation "
          f"sequences, {steps_per_epoch} steps/epoch, device {device}")
    model.save_pretrained(checkpoint_dir(run_dir, 0))

    recorder = None
    if cfg.record_history:
        from .record import HistoryRecorder

        recorder = HistoryRecorder(model, cfg, Path(cfg.record_history), vocab_size=len(datamod.VOCAB))
    losses = {"epoch": [], "train": [], "validation": [], "lr": [], "wall_seconds": [], "record_seconds": []}
    step = 0
    start = time.perf_counter()
    bar = tqdm(range(1, cfg.epochs + 1), desc="train", unit="epoch", disable=not progress)
    try:
        for epoch in bar:
            model.train()
            order = torch.randperm(len(train_rows), generator=gen).tolist()
            total, count = 0.0, 0
            for i in range(0, len(order), cfg.batch_size):
                batch = make_batch([train_rows[j] for j in order[i : i + cfg.batch_size]], device)
                lr = opt.param_groups[0]["lr"]
                if recorder is not None:
                    recorder.begin_step(batch, step=step, epoch=epoch)
                loss = lm_loss(model, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                coef = 1.0
                if cfg.max_grad_norm is not None:
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    coef = min(1.0, cfg.max_grad_norm / (float(norm) + 1e-6))  # torch's clip coefficient
                if recorder is not None:
                    recorder.end_step(scale=-lr * coef)
                opt.step()
                if sched is not None:
                    sched.step()
                n = int((batch.labels != IGNORE).sum())
                total += float(loss.detach()) * n
                count += n
                step += 1
            val = evaluate(model, val_rows, device)
            timing = (("wall_seconds", time.perf_counter() - start),
                      ("record_seconds", recorder.seconds if recorder is not None else 0.0))
            for key, value in (("epoch", epoch), ("train", total / count), ("validation", val), ("lr", lr), *timing):
                losses[key].append(value)
            (run_dir / "losses.json").write_text(json.dumps(losses, indent=1) + "\n")
            if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
                model.save_pretrained(checkpoint_dir(run_dir, epoch))
            bar.set_postfix(train=f"{total / count:.3f}", val=f"{val:.3f}")
    finally:
        if recorder is not None:
            recorder.close()
    wall = time.perf_counter() - start
    summary = {"wall_seconds": wall, "steps": step, "epochs": cfg.epochs, "parameters": n_params,
               "final_train_loss": losses["train"][-1], "final_validation_loss": losses["validation"][-1]}
    if recorder is not None:
        summary.update(recorder.summary(wall))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"trained {step} steps in {wall:.1f} s; final train loss {summary['final_train_loss']:.4f}, "
          f"validation loss {summary['final_validation_loss']:.4f}")
    if recorder is not None:
        print(f"history: {summary['history_rows']:,} rows, {summary['history_bytes'] / 1e6:.1f} MB at "
              f"{cfg.record_history}; recording took {summary['record_seconds']:.1f} s "
              f"({100 * summary['record_overhead']:.1f}% of training wall time)")
    return summary


# -- loading a run ---------------------------------------------------------------------------------

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
        return Path(self.config.record_history) if self.config.record_history else None


def load_run(run_dir) -> Run:
    """Open RUN_DIR (clear FileNotFoundError naming what is missing)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.json; make one with `metaclm train`)")
    cfg, info = _read_run_config(run_dir / "config.json")
    losses_path = run_dir / "losses.json"
    losses = json.loads(losses_path.read_text()) if losses_path.is_file() else {}
    epochs = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("epoch_*") if p.is_dir())
    return Run(run_dir, cfg, info, datamod.load(run_dir / "data"), losses, epochs)


def _read_run_config(path: Path) -> tuple[TrainConfig, dict]:
    """The validated TrainConfig of a run's config.json and the file's content, or ValueError naming it."""
    try:
        info = json.loads(path.read_text())
        cfg = TrainConfig(**info["config"])
        _validate(cfg)
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
    """The GPT2LMHeadModel saved at ``epoch`` (default: the last), in eval mode."""
    from transformers import GPT2LMHeadModel  # only where needed, as in _quiet_transformers

    _quiet_transformers()
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
