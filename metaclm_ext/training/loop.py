"""`metaclm train`: the paper's GPT-2 design model trained on the synthetic language (Section 5, Appendix E),
its history recorded by the general recorder, resumable from its last checkpoint."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Optional

import torch
import transformers
from tqdm.auto import tqdm

from .. import data as datamod
from ..store import MANIFEST, HistoryStore
from .batches import IGNORE, evaluate, lm_loss, make_batch
from .config import TrainConfig, validate_config
from .history import open_recorder, step_metadata
from .model import build_model, count_parameters, resolve_device
from .runs import (CONFIG, TRAIN_STATE, checkpoint_dir, history_path, load_checkpoint, load_run, load_train_state,
                   save_train_state)

__all__ = ["resume", "train"]

LOSS_KEYS = ("epoch", "train", "validation", "lr", "wall_seconds", "record_seconds")


def _optimizer(cfg: TrainConfig, model):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _subset(rows: list[dict], limit: Optional[int], gen: torch.Generator) -> list[dict]:
    if limit is None or limit >= len(rows):
        return rows
    keep = sorted(torch.randperm(len(rows), generator=gen)[:limit].tolist())
    return [rows[i] for i in keep]


def _check_out(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"--out {run_dir} exists and is not a folder")
    if (run_dir / CONFIG).exists():
        raise FileExistsError(f"{run_dir} already holds a run ({CONFIG} exists); choose a new --out, or continue "
                              f"it with `metaclm train --resume {run_dir}`")


def _check_history_folder(path: Optional[Path]) -> None:
    if path is not None and path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"the history folder {path} exists and is not empty; choose another --record-history")


def train(cfg: TrainConfig, run_dir: Path, data_dir: Optional[Path] = None, progress: bool = True) -> dict:
    """Train one run into ``run_dir`` (generating the data there unless ``data_dir`` is given).

    Everything that can be refused is checked before anything is written. Returns the summary dict
    (also written to summary.json).
    """
    validate_config(cfg)
    run_dir = Path(run_dir)
    _check_out(run_dir)
    device = resolve_device(cfg.device)
    store = history_path(run_dir, cfg.record_history)
    _check_history_folder(store)
    dataset = datamod.generate(cfg.data_setting, cfg.data_seed) if data_dir is None else datamod.load(data_dir)
    gen = torch.Generator().manual_seed(cfg.seed)
    dataset["train"] = _subset(dataset["train"], cfg.max_train_sequences, gen)
    dataset["validation"] = _subset(dataset["validation"], cfg.max_validation_sequences, gen)
    if not dataset["train"] or not dataset["validation"]:
        raise ValueError("the dataset has no training or no validation sequences")
    run_dir.mkdir(parents=True, exist_ok=True)
    datamod.write(dataset, run_dir / "data")
    torch.manual_seed(cfg.seed)
    train_rows, val_rows = dataset["train"], dataset["validation"]
    n_positions = max(len(r["text"]) for r in train_rows + val_rows) + 2
    model = build_model(cfg, n_positions).to(device)
    steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    info = {"config": dataclasses.asdict(cfg), "parameters": count_parameters(model), "n_positions": n_positions,
            "device": str(device), "steps_per_epoch": steps_per_epoch, "total_steps": steps_per_epoch * cfg.epochs,
            "torch": torch.__version__, "transformers": transformers.__version__}
    model.save_pretrained(checkpoint_dir(run_dir, 0))
    opt = _optimizer(cfg, model)
    sched = _scheduler(cfg, opt, info["total_steps"])
    save_train_state(checkpoint_dir(run_dir, 0), _train_state(0, 0, opt, sched, gen, {k: [] for k in LOSS_KEYS}, 0.0))
    # config.json last: a folder without it is no run yet and `metaclm train` may start it again.
    (run_dir / CONFIG).write_text(json.dumps(info, indent=1) + "\n")
    print(f"model: GPT2LMHeadModel {cfg.n_layer} layers, {cfg.n_head} heads, hidden {cfg.n_embd}, FFN "
          f"{cfg.n_inner}: {info['parameters']:,} parameters; {len(train_rows)} train / {len(val_rows)} validation "
          f"sequences, {steps_per_epoch} steps/epoch, device {device}")
    return _run_epochs(load_run(run_dir), model, opt, sched, gen, first_epoch=1, step=0,
                       losses={k: [] for k in LOSS_KEYS}, elapsed=0.0, progress=progress, resuming=False)


def resume(run_dir: Path, progress: bool = True) -> dict:
    """Continue an interrupted run from its last checkpoint: the model, optimizer, schedule and random
    generators as they were there, the history store cut back to the rows recorded up to it. The rest of
    the run is the one an uninterrupted run would have trained."""
    run = load_run(run_dir)
    done = [e for e in run.epochs if (checkpoint_dir(run_dir, e) / TRAIN_STATE).exists()]
    if not done:
        raise FileNotFoundError(f"{run_dir} has no checkpoint with {TRAIN_STATE} to resume from")
    epoch = done[-1]
    if epoch >= run.config.epochs and (run.path / "summary.json").exists():
        raise ValueError(f"{run_dir} finished all {run.config.epochs} epochs: nothing to resume")
    device = resolve_device(run.config.device)
    folder = checkpoint_dir(run_dir, epoch)
    state = load_train_state(folder)
    model = load_checkpoint(run_dir, epoch, device=str(device))
    opt = _optimizer(run.config, model)
    opt.load_state_dict(state["optimizer"])
    sched = _scheduler(run.config, opt, run.info["total_steps"])
    if sched is not None:
        sched.load_state_dict(state["scheduler"])
    gen = torch.Generator()
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    print(f"resuming {run_dir} after epoch {epoch} (step {state['step']}) of {run.config.epochs}")
    return _run_epochs(run, model, opt, sched, gen, first_epoch=epoch + 1, step=state["step"],
                       losses=state["losses"], elapsed=state["wall_seconds"], progress=progress, resuming=True)


def _scheduler(cfg: TrainConfig, opt, total_steps: int):
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps) if cfg.scheduler == "cosine" else None


def _train_state(epoch: int, step: int, opt, sched, gen: torch.Generator, losses: dict, wall: float) -> dict:
    return {"epoch": epoch, "step": step, "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict() if sched is not None else None, "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(), "losses": losses, "wall_seconds": wall}


def _run_epochs(run, model, opt, sched, gen: torch.Generator, first_epoch: int, step: int, losses: dict,
                elapsed: float, progress: bool, resuming: bool) -> dict:
    cfg, run_dir = run.config, run.path
    device = next(model.parameters()).device
    vocab = len(datamod.VOCAB)
    train_rows, val_rows = run.data["train"], run.data["validation"]
    recorder = None
    if run.history is not None:
        continues = resuming and (run.history / MANIFEST).exists()
        recorder = open_recorder(model, cfg, run.history, vocab, resume_at_step=step if continues else None)
    record_seconds = losses["record_seconds"][-1] if losses["record_seconds"] else 0.0
    start = time.perf_counter() - elapsed
    bar = tqdm(range(first_epoch, cfg.epochs + 1), desc="train", unit="epoch", disable=not progress)
    try:
        for epoch in bar:
            model.train()
            order = torch.randperm(len(train_rows), generator=gen).tolist()
            total, count = 0.0, 0
            for i in range(0, len(order), cfg.batch_size):
                batch = make_batch([train_rows[j] for j in order[i : i + cfg.batch_size]], device)
                lr = opt.param_groups[0]["lr"]
                opt.zero_grad(set_to_none=True)
                if recorder is None:
                    loss = lm_loss(model, batch)
                    loss.backward()
                else:
                    with recorder.capture(targets=batch.labels, metadata=step_metadata(batch, epoch, vocab)):
                        loss = lm_loss(model, batch)
                        loss.backward()
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                if recorder is not None:
                    t = time.perf_counter()
                    recorder.step(opt, step=step)
                    record_seconds += time.perf_counter() - t
                opt.step()
                if sched is not None:
                    sched.step()
                n = int((batch.labels != IGNORE).sum())
                total += float(loss.detach()) * n
                count += n
                step += 1
            val = evaluate(model, val_rows, device)
            wall = time.perf_counter() - start
            for key, value in zip(LOSS_KEYS, (epoch, total / count, val, lr, wall, record_seconds)):
                losses[key].append(value)
            (run_dir / "losses.json").write_text(json.dumps(losses, indent=1) + "\n")
            if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
                folder = checkpoint_dir(run_dir, epoch)
                if recorder is not None:
                    recorder.commit()  # the history up to this checkpoint, before the checkpoint exists
                model.save_pretrained(folder)
                save_train_state(folder, _train_state(epoch, step, opt, sched, gen, losses, wall))
            bar.set_postfix(train=f"{total / count:.3f}", val=f"{val:.3f}")
    finally:
        if recorder is not None:
            recorder.close()
    return _summarise(run, losses, step, recorder, record_seconds, time.perf_counter() - start)


def _summarise(run, losses: dict, steps: int, recorder, record_seconds: float, wall: float) -> dict:
    summary = {"wall_seconds": wall, "steps": steps, "epochs": run.config.epochs, "parameters": run.info["parameters"],
               "final_train_loss": losses["train"][-1], "final_validation_loss": losses["validation"][-1]}
    if recorder is not None:
        store = HistoryStore(recorder.path)
        summary.update(history_rows=len(store), history_bytes=store.nbytes, history_path=str(recorder.path),
                       record_seconds=record_seconds, record_overhead=record_seconds / wall)
    (run.path / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"trained {steps} steps in {wall:.1f} s; final train loss {summary['final_train_loss']:.4f}, "
          f"validation loss {summary['final_validation_loss']:.4f}")
    if recorder is not None:
        print(f"history: {summary['history_rows']:,} rows, {summary['history_bytes'] / 1e6:.1f} MB at "
              f"{recorder.path}; recording took {record_seconds:.1f} s "
              f"({100 * summary['record_overhead']:.1f}% of training wall time)")
    return summary
