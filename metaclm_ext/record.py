"""`--record-history`: the training history of every attention and FFN output projection, as a HistoryStore.

One row = one trained token (a position with a next-token label) at one optimizer step. Per layer l:
  attn_in.l   [n_embd]  input of attn.c_proj (the H heads' concatenated context vectors, head h = dims h*Dh..)
  mlp_in.l    [n_inner] input of mlp.c_proj (the FFN's activations)
  attn_err.l  [n_embd]  (--record-errors) e_t = -(lr * clip coefficient) * dL/dy_t at attn.c_proj's output
  mlp_err.l   [n_embd]  (--record-errors) the same for mlp.c_proj
and int64 columns step, epoch, sequence, position, token, seed, next_token, seed_next_token
(= seed * vocab_size + next_token). L is the batch's mean loss, so with plain SGD the update of a c_proj
(transformers' Conv1D, y = x @ W + b, W [in, out]) is exactly W += sum_t x_t (x) e_t and b += sum_t e_t
over the step's rows: positions without a label (the final <eos>, padding) get a zero gradient.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .history_names import MODULES, field_name, module_key, parse_field_name, parse_module_key
from .train import IGNORE, Batch, TrainConfig

COLUMNS = ("step", "epoch", "sequence", "position", "token", "seed", "next_token", "seed_next_token")


def cproj_modules(model) -> dict[str, torch.nn.Module]:
    """{"attn.l" / "mlp.l": block l's attn.c_proj / mlp.c_proj}, in layer order: the modules whose inputs (and
    output errors) the history records as the fields "attn_in.l" / "mlp_in.l" (and "*_err.l")."""
    return {module_key(kind, l): module for l, block in enumerate(model.transformer.h)
            for kind, module in (("attn", block.attn.c_proj), ("mlp", block.mlp.c_proj))}


def epoch_limits(epoch_column: np.ndarray, epochs: list[int]) -> dict[int, int]:
    """Rows recorded up to the end of each epoch (the history a checkpoint has seen)."""
    if epoch_column.size and np.any(np.diff(epoch_column) < 0):
        raise ValueError("the store's epoch column is not ascending: it was not written by `metaclm train`")
    return {e: int(np.searchsorted(epoch_column, e, side="right")) for e in epochs}


def field_names(n_layer: int, errors: bool) -> list[str]:
    signals = ("in", "err") if errors else ("in",)
    return [field_name(module, l, signal) for l in range(n_layer) for signal in signals for module in MODULES]


class HistoryRecorder:
    """Forward hooks capture each c_proj's input, tensor hooks its output gradient; :meth:`end_step`
    keeps the trained positions, scales gradients into error signals and appends one batch to the store."""

    def __init__(self, model, cfg: TrainConfig, path: Path, vocab_size: int):
        from .store import HistoryWriter

        self.errors, self.vocab_size = cfg.record_errors, vocab_size
        widths = {("attn", "in"): cfg.n_embd, ("mlp", "in"): cfg.n_inner, ("attn", "err"): cfg.n_embd,
                  ("mlp", "err"): cfg.n_embd}
        fields = {name: (widths[parse_field_name(name)[:2]], cfg.history_dtype)
                  for name in field_names(cfg.n_layer, cfg.record_errors)}
        attrs = {"row": "one trained token at one optimizer step", "layers": cfg.n_layer, "heads": cfg.n_head,
                 "head_dim": cfg.n_embd // cfg.n_head, "vocab_size": vocab_size, "optimizer": cfg.optimizer,
                 "errors": "e_t = -(lr * clip_coef) * dL/dy_t of c_proj's output y" if cfg.record_errors else None,
                 "seed_next_token": "seed * vocab_size + next_token"}
        self.writer = HistoryWriter.create(path, fields, {c: "int64" for c in COLUMNS}, attrs=attrs)
        self._x: dict[str, torch.Tensor] = {}
        self._g: dict[str, torch.Tensor] = {}
        self._active = False
        self.seconds = 0.0
        self._handles = []
        for key, module in cproj_modules(model).items():
            self._handles.append(module.register_forward_hook(self._hook(key)))

    def _hook(self, key: str):
        def capture(module, inputs, output):
            if not self._active:
                return
            self._x[key] = inputs[0].detach()
            if self.errors:
                output.register_hook(lambda grad: self._g.__setitem__(key, grad.detach()))
        return capture

    def begin_step(self, batch: Batch, step: int, epoch: int) -> None:
        """Arm the hooks for the next forward/backward and compute the step's metadata columns."""
        t = time.perf_counter()
        self._x.clear()
        self._g.clear()
        self._mask = batch.labels != IGNORE
        b, p = self._mask.nonzero(as_tuple=True)
        nxt = batch.labels[b, p]
        seed = batch.seeds[b]
        n = len(b)
        self._meta = {
            "step": torch.full((n,), step, dtype=torch.long), "epoch": torch.full((n,), epoch, dtype=torch.long),
            "sequence": batch.seq_ids[b].cpu(), "position": p.cpu(), "token": batch.input_ids[b, p].cpu(),
            "seed": seed.cpu(), "next_token": nxt.cpu(), "seed_next_token": (seed * self.vocab_size + nxt).cpu(),
        }
        self._active = True
        self.seconds += time.perf_counter() - t

    def end_step(self, scale: float) -> None:
        """Append the step's rows; ``scale`` = -(lr * clip coefficient) turns dL/dy into e_t."""
        t = time.perf_counter()
        self._active = False
        rows = dict(self._meta)
        for key, x in self._x.items():
            kind, layer = parse_module_key(key)
            rows[field_name(kind, layer)] = x[self._mask].float().cpu()
            if self.errors:
                if key not in self._g:
                    raise RuntimeError(f"no gradient was captured at {key}.c_proj (was backward called?)")
                rows[field_name(kind, layer, "err")] = (self._g[key][self._mask].double() * scale).float().cpu()
        self.writer.append(rows)
        self._x.clear()
        self._g.clear()
        self.seconds += time.perf_counter() - t

    def close(self) -> None:
        t = time.perf_counter()
        for h in self._handles:
            h.remove()
        self.writer.close()
        self.seconds += time.perf_counter() - t

    def summary(self, wall_seconds: float) -> dict:
        from .store import HistoryStore

        store = HistoryStore(self.writer.path)
        return {"history_rows": len(store), "history_bytes": store.nbytes, "history_path": str(self.writer.path),
                "record_seconds": self.seconds, "record_overhead": self.seconds / wall_seconds}
