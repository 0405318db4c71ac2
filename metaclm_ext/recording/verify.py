"""dualcheck_store: rebuild every recorded module's weight change from a recording's store folder alone.

For a module trained by plain SGD, W_end - W_start = sum_t e_t x_t^T (layout "linear"; its transpose for
"conv1d"), so for any input x

    (W_end - W_start) x = sum_t e_t <x_t, x>,

the right side computed by ``dual_form_apply`` streaming the store, the left from the weights the recorder
saved beside it; for a bias, b_end - b_start = sum_t e_t. The relative error is taken against the change
itself (||(W_end - W_start) x||), not the output, so an error in the step sizes shows at its full size.
A store marked not exact (``recording.json``) gets the numbers but no verdict.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from .. import HistoryStore, dual_form_apply
from ..store.scales import true_units
from .files import WEIGHTS_END, WEIGHTS_START, load_weights, read_status

TOLERANCE = 1e-5
DEFAULT_MAX_QUERIES = 256


def dualcheck_store(path: Union[str, Path], queries: Optional[Mapping[str, torch.Tensor]] = None, *,
                    max_queries: int = DEFAULT_MAX_QUERIES, tolerance: float = TOLERANCE) -> dict:
    """Per recorded module, the relative error of the dual form against the saved weight change.

    ``queries`` {module name: [Q, in_features]} (default: up to ``max_queries`` of the module's recorded
    inputs, evenly spaced over the history). Returns a report: ``modules`` (per module: queries,
    ``relative_error``, ``bias_relative_error`` or None, ``change`` = ||dW x|| / ||W_end x||), the worst
    error, ``exact`` and ``reasons`` from the recording, and ``passed``: whether every error is below
    ``tolerance``, or None when no verdict is possible (not exact, or a float16/bfloat16 history, which
    rounds x_t and e_t).
    """
    if isinstance(max_queries, bool) or not isinstance(max_queries, int) or max_queries <= 0:
        raise ValueError(f"max_queries must be a positive int, got {max_queries!r}")
    folder = Path(path)
    store = HistoryStore(folder)
    recording = store.attrs.get("recording")
    if recording is None:
        raise ValueError(f"{folder} was not written by HistoryRecorder (its attrs have no 'recording')")
    if recording["errors"] is None:
        raise ValueError(f"{folder} was recorded with errors=False: the dual form needs the error signals")
    status = read_status(folder)
    start, end = load_weights(folder / WEIGHTS_START), load_weights(folder / WEIGHTS_END)
    names = [m["module"] for m in recording["modules"]]
    unknown = set(queries or {}) - set(names)
    if unknown:
        raise ValueError(f"queries name modules {sorted(unknown)} that were not recorded (recorded: {names})")
    sampler = HistoryStore(folder, verify=False)  # single-row reads; the dual form verifies every shard
    results = []
    for module in recording["modules"]:
        x = _queries(sampler, module, (queries or {}).get(module["module"]), max_queries)
        results.append(_check_module(store, module, x, start, end))
    dtypes = {dtype for _, dtype in store.fields.values()}
    worst = max((r["relative_error"] for r in results), default=0.0)
    worst = max([worst] + [r["bias_relative_error"] for r in results if r["bias_relative_error"] is not None])
    verdict = status["exact"] and dtypes == {"float32"} and len(store) > 0
    return {"path": str(folder), "rows": len(store), "history_dtype": sorted(dtypes), "exact": status["exact"],
            "reasons": status["reasons"], "optimizer": status["optimizer"], "tolerance": tolerance,
            "max_relative_error": worst, "passed": (worst < tolerance) if verdict else None, "modules": results}


def _queries(store: HistoryStore, module: dict, given: Optional[torch.Tensor], max_queries: int) -> torch.Tensor:
    width = module["in_features"]
    if given is not None:
        if not isinstance(given, torch.Tensor) or given.dim() != 2 or given.shape[1] != width:
            raise ValueError(f"queries for {module['module']} must be a [Q, {width}] tensor, got "
                             f"{getattr(given, 'shape', type(given).__name__)}")
        return given.detach().cpu().double()
    n = len(store)
    if n == 0:
        raise ValueError(f"{store.path} has no rows to take queries from: pass queries")
    rows = torch.linspace(0, n - 1, min(max_queries, n)).round().long().unique().tolist()
    return torch.cat([store.read_tensor(module["input_field"], r, r + 1) for r in rows]).double()


@torch.no_grad()
def _check_module(store: HistoryStore, module: dict, x: torch.Tensor, start: dict, end: dict) -> dict:
    name = module["module"]
    delta = end[f"{name}.weight"].double() - start[f"{name}.weight"].double()
    weight = end[f"{name}.weight"].double()
    if module["layout"] == "linear":  # W [out, in]
        change, output = x @ delta.T, x @ weight.T
    else:  # conv1d: W [in, out]
        change, output = x @ delta, x @ weight
    inputs, errors = store[module["input_field"]], store[module["error_field"]]
    dual = true_units(store.attrs, module["error_field"], dual_form_apply(x.float(), inputs, errors).double())
    result = {"module": name, "input_field": module["input_field"], "error_field": module["error_field"],
              "queries": int(x.shape[0]), "relative_error": _relative(dual - change, change),
              "change": float(change.norm() / output.norm()) if output.norm() > 0 else 0.0,
              "bias_relative_error": None}
    if module["bias"]:
        bias_change = end[f"{name}.bias"].double() - start[f"{name}.bias"].double()
        error_sum = torch.zeros(module["out_features"], dtype=torch.float64)
        for _, rows in errors.iter_chunks():
            error_sum += rows.double().sum(0)
        error_sum = true_units(store.attrs, module["error_field"], error_sum)
        result["bias_relative_error"] = _relative(error_sum - bias_change, bias_change)
    return result


def _relative(difference: torch.Tensor, reference: torch.Tensor) -> float:
    ref = float(reference.norm())
    if ref == 0:
        return 0.0 if float(difference.norm()) == 0 else float("inf")
    return float(difference.norm()) / ref


def format_report(report: dict) -> str:
    """The report of :func:`dualcheck_store` as a table and a verdict line."""
    lines = [f"dual form of {len(report['modules'])} module(s) from {report['rows']:,} rows "
             f"({', '.join(report['history_dtype'])}) in {report['path']}",
             f"{'module':<40} {'queries':>7} {'rel. error':>11} {'bias error':>11} {'|dW x|/|W x|':>12}"]
    for r in report["modules"]:
        bias = "-" if r["bias_relative_error"] is None else f"{r['bias_relative_error']:.3e}"
        lines.append(f"{r['module']:<40} {r['queries']:>7} {r['relative_error']:>11.3e} {bias:>11} {r['change']:>12.3e}")
    worst = report["max_relative_error"]
    if report["passed"] is not None:
        lines.append(f"{'PASS' if report['passed'] else 'FAIL'}: max relative error {worst:.3e} "
                     f"(tolerance {report['tolerance']:g})")
    elif not report["exact"]:
        lines.append(f"NOT EXACT (max relative error {worst:.3e}, reported only): " + "; ".join(report["reasons"]))
    else:
        lines.append(f"max relative error {worst:.3e}, reported only: a {', '.join(report['history_dtype'])} "
                     "history rounds x_t and e_t; record with dtype='float32' for a verdict")
    return "\n".join(lines)
