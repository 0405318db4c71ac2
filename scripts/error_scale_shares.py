"""How much of a recording's error signals float16 loses, stored as they are and with the field's scale.

    python scripts/error_scale_shares.py RUN/history-fp32 [--fields attn_err.0 mlp_err.0 ...]

Reads the true values e_t from a float32 recording (default: every recorded error field) and prints per
field: the median |e_t|, then for the plain float16 cast (how error fields were stored before scales) and
for float16 with the scale the recorder chooses from the field's first step (store/scales.py): the share
of values below float16's smallest normal (subnormal: rounded to a fixed 2^-24), the share flushed to 0,
and the relative error ||fp16(e) - e|| / ||e|| over the whole field; and over the steps the largest and the
smallest step maximum of |e_t| x scale (the recorder refuses a step whose maximum is above 65504, where
float16 overflows; a step below 2^-14 = 6.1e-5 is recorded, all of it subnormal, with the absolute
rounding 2^-24 / scale).
"""
import argparse
import sys

import numpy as np
import torch

from metaclm_ext.store import HistoryStore
from metaclm_ext.store.scales import choose_scale, power_of_two

TINY = float(torch.finfo(torch.float16).tiny)


def shares(e: torch.Tensor, scale: float) -> tuple[float, float, float]:
    """(subnormal share, zero share, relative error) of ``e`` (fp64) stored as float16 times ``scale``."""
    stored = (e * scale).to(torch.float16).double() / scale
    a = e.abs() * scale
    return (float((a < TINY).double().mean()), float((stored == 0).double().mean()),
            float((stored - e).norm() / e.norm()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", help="a float32 recording (HistoryRecorder store)")
    parser.add_argument("--fields", nargs="+", help="error fields to measure (default: all)")
    args = parser.parse_args(argv)
    store = HistoryStore(args.store, verify=False)
    fields = args.fields or [m["error_field"] for m in store.attrs["recording"]["modules"]]
    steps = store.read("step")
    first = int((steps == steps[0]).sum()) if len(steps) else 0
    print(f"{args.store}: {len(store):,} rows, first step {first:,} rows")
    print(f"{'field':<12} {'median|e|':>9} | {'unscaled: subnormal':>19} {'zero':>6} {'rel.err':>8} | "
          f"{'scale':>6} {'subnormal':>9} {'zero':>6} {'rel.err':>8} {'step max|e|*s: max':>18} {'min':>8}")
    starts = np.flatnonzero(np.diff(steps, prepend=steps[:1] - 1))  # the first row of each step
    for field in fields:
        e = store.read_tensor(field).double()
        scale = choose_scale(float(e[:first].abs().max()), "float16")
        plain, scaled = shares(e, 1.0), shares(e, scale)
        step_max = np.maximum.reduceat(e.abs().amax(1).numpy(), starts) * scale
        print(f"{field:<12} {float(e.abs().median()):>9.2g} | {plain[0]:>19.4f} {plain[1]:>6.4f} {plain[2]:>8.2e} | "
              f"{power_of_two(scale):>6} {scaled[0]:>9.4f} {scaled[1]:>6.4f} {scaled[2]:>8.2e} "
              f"{step_max.max():>18.1f} {step_max.min():>8.2g}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
