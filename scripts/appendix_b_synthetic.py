#!/usr/bin/env python
"""Appendix B on the synthetic GPT-2 design model: Proposition 1's condition for W_linear per layer.

For each validation sequence of a run from `metaclm train` (its last token as the current token) and each
layer, builds W_linear = (I + W_FFN)(I + W_MHSA) from the checkpoint's weights and the layer's raw inputs,
and checks sum λ_i a_i b_i >= sum a_i b_i (metaclm_ext.probe.linear, the same code `metaclm probe` runs on
GPT-2). Prints the percentage of (sample, layer) pairs that satisfy it and writes a JSON beside the run.

    python scripts/appendix_b_synthetic.py RUN_DIR [--epoch E] [--max-samples 200]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from metaclm_ext.probe.linear import synthetic_run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--epoch", type=int, default=None, help="checkpoint epoch (default: the last)")
    ap.add_argument("--max-samples", type=int, default=200)
    args = ap.parse_args(argv)
    summary = synthetic_run(args.run, args.epoch, args.max_samples)
    out = Path(args.run) / "appendix_b.json"
    out.write_text(json.dumps(summary, indent=1))
    print(f"Appendix B, synthetic GPT-2 design model {args.run} (epoch {summary['epoch']}): "
          f"{summary['satisfied_percent']:.1f}% of {summary['pairs']} (sample, layer) pairs satisfy Proposition 1; "
          f"per layer {', '.join(f'{p:.0f}%' for p in summary['per_layer_satisfied_percent'])}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
