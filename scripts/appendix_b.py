#!/usr/bin/env python
"""Appendix B of the paper: Proposition 1's eigenvalue condition for the linearised layers
W_linear = (I + W_FFN)(I + W_MHSA) of the synthetic Table 5 model (GPT-2 design).

Runs the `appendix_b` stage of `metaclm reproduce` (and the data and training it needs) into --out and writes
OUT/REPORT.md; a rerun skips finished stages (docs/reproduce.md). For a run folder of your own, use
scripts/appendix_b_synthetic.py RUN_DIR.

    python scripts/appendix_b.py [--quick | --paper] [--out DIR]
"""
import sys

from metaclm_ext.commands.reproduce import script_main

STAGES = ["appendix_b"]


def main(argv=None) -> int:
    return script_main(__doc__, STAGES, argv)


if __name__ == "__main__":
    sys.exit(main())
