"""`metaclm dualcheck RUN`: rebuild every c_proj output from the recorded training history alone.

For a c_proj (Conv1D, y = x @ W + b) trained by plain SGD, W_E = W0 + sum_t x_t (x) e_t and
b_E = b0 + sum_t e_t over the rows recorded up to epoch E, so for any input x

    y(x) = x @ W0 + b0 + sum_t e_t <x_t, x> + sum_t e_t,

the third term computed by ``dual_form_apply`` streaming the store. We compare it with the checkpoint's
actual c_proj outputs on the validation tokens. Exact (up to float rounding) for SGD without momentum or
weight decay; for AdamW (or momentum / weight decay) the update is not sum_t x_t (x) e_t and the
reconstruction is only the "as if SGD" approximation, which is reported, not failed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from .history_names import field_name, parse_module_key
from .ops import dual_form_apply
from .store import HistoryStore
from .store.scales import true_units
from .training import Run, cproj_modules, epoch_limits, load_checkpoint, load_run, make_batch

EXACT_TOLERANCE = 1e-4


def is_exact_setting(run: Run) -> bool:
    """Whether the run's optimizer makes the dual form exact (plain SGD, no momentum, no weight decay)."""
    c = run.config
    return c.optimizer == "sgd" and c.momentum == 0 and c.weight_decay == 0


@torch.no_grad()
def cproj_io(model, rows: list[dict], batch_size: int = 64) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"attn.l"/"mlp.l": (inputs [Q, in], outputs [Q, out])} of every c_proj on the real tokens of ``rows``."""
    captured: dict[str, list] = {}
    handles = []
    for key, module in cproj_modules(model).items():
        def hook(module, inputs, output, key=key):
            captured.setdefault(key, []).append((inputs[0], output))
        handles.append(module.register_forward_hook(hook))
    try:
        model.eval()
        for i in range(0, len(rows), batch_size):
            b = make_batch(rows[i : i + batch_size])
            mask = b.attention_mask.bool()
            model(input_ids=b.input_ids, attention_mask=b.attention_mask)
            for key, items in captured.items():
                x, y = items[-1]
                items[-1] = (x[mask], y[mask])
    finally:
        for h in handles:
            h.remove()
    return {k: (torch.cat([x for x, _ in v]), torch.cat([y for _, y in v])) for k, v in captured.items()}


def _error_sum(field, stop: int) -> torch.Tensor:
    """sum_t e_t over rows [0, stop) of an error field, in fp64 (the bias's dual form)."""
    total = torch.zeros(field.shape[1], dtype=torch.float64)
    for _, rows in field.iter_chunks(stop=stop):
        total += rows.double().sum(0)
    return total


@torch.no_grad()
def dualcheck(run_dir, epoch: Optional[int] = None, history: Optional[Path] = None,
              max_sequences: Optional[int] = None, progress: bool = True) -> dict:
    """Relative error ||y_dual - y|| / ||y|| per layer and module at checkpoint ``epoch`` (default: last).

    Also reports the error of W0 x + b0 alone (how far training moved the outputs), so a small dual-form
    error means the history explains the change, not that nothing changed.
    """
    run = load_run(run_dir)
    path = Path(history) if history is not None else run.history
    if path is None:
        raise ValueError(f"{run_dir} was trained without --record-history; pass the store with --history")
    store = HistoryStore(path)
    if field_name("attn", 0, "err") not in store.fields:
        raise ValueError(f"history {path} has no error signals: train with --record-errors")
    epoch = run.epochs[-1] if epoch is None else epoch
    epochs = store.read("epoch")
    if len(epochs) == 0 or epoch > int(epochs.max()):
        raise ValueError(f"history {path} records epochs up to {int(epochs.max()) if len(epochs) else 0}, "
                         f"not {epoch}")
    limit = epoch_limits(epochs, [epoch])[epoch]
    init, trained = load_checkpoint(run_dir, 0), load_checkpoint(run_dir, epoch)
    rows = run.data["validation"][:max_sequences] if max_sequences else run.data["validation"]
    io = cproj_io(trained, rows)
    results = []
    for key, module0 in tqdm(cproj_modules(init).items(), desc="dualcheck", disable=not progress):
        kind, l = parse_module_key(key)
        x, y = io[key]
        base = x.double() @ module0.weight.double() + module0.bias.double()
        inputs, errors = store[field_name(kind, l)], store[field_name(kind, l, "err")]
        dual = true_units(store.attrs, field_name(kind, l, "err"),
                          dual_form_apply(x.float(), inputs, errors, limit=limit).double() + _error_sum(errors, limit))
        y = y.double()
        norm = float(y.norm())
        results.append({"layer": int(l), "module": kind, "queries": int(x.shape[0]),
                        "relative_error": float((base + dual - y).norm()) / norm,
                        "w0_only_relative_error": float((base - y).norm()) / norm})
    exact = is_exact_setting(run)
    dtype = store.fields[field_name("attn", 0)][1]
    worst = max(r["relative_error"] for r in results)
    checked = exact and dtype == "float32"  # a float16/bfloat16 history rounds x_t and e_t
    return {"run": str(run_dir), "epoch": epoch, "history": str(path), "history_rows": limit,
            "history_dtype": dtype, "optimizer": run.config.optimizer, "exact_setting": exact,
            "max_relative_error": worst, "passed": (worst < EXACT_TOLERANCE) if checked else None,
            "layers": results}


def format_report(report: dict) -> str:
    lines = [f"dual form of every c_proj at epoch {report['epoch']} from {report['history_rows']:,} history rows "
             f"({report['history_dtype']}), optimizer {report['optimizer']}",
             f"{'layer':>5} {'module':>6} {'queries':>8} {'rel. error':>12} {'W0 only':>10}"]
    for r in report["layers"]:
        lines.append(f"{r['layer']:>5} {r['module']:>6} {r['queries']:>8} {r['relative_error']:>12.3e} "
                     f"{r['w0_only_relative_error']:>10.3e}")
    worst = report["max_relative_error"]
    if report["passed"] is not None:
        verdict = "PASS" if report["passed"] else "FAIL"
        lines.append(f"{verdict}: max relative error {worst:.3e} (plain SGD, float32 history; tolerance "
                     f"{EXACT_TOLERANCE:g})")
    elif report["exact_setting"]:
        lines.append(f"max relative error {worst:.3e}: plain SGD, but the {report['history_dtype']} history rounds "
                     "x_t and e_t; record with --history-dtype float32 for the exactness check")
    else:
        lines.append(f"max relative error {worst:.3e}: the dual form is NOT exact for {report['optimizer']} "
                     "(momentum / adaptive steps / weight decay are not a sum of x_t (x) e_t); reported only")
    return "\n".join(lines)
