#!/usr/bin/env python
"""Figures 1-3 and 9-11 of the paper on the Table 5 run: clustering across layers and epochs (1/9), inner and
outer loss (2/11), attention over the recorded training history (3/10); with the same run's dual-form check
(Eq. 1) and kNN over the history (Section 3).

Runs the `analyze_table5`, `dualcheck_table5` and `knn_table5` stages of `metaclm reproduce` (and the data and
training they need) into --out and writes OUT/REPORT.md; a rerun skips finished stages (docs/reproduce.md).

    python scripts/figures_1_3.py [--quick | --paper] [--out DIR]
"""
import sys

from metaclm_ext.commands.reproduce import script_main

STAGES = ["analyze_table5", "dualcheck_table5", "knn_table5"]


def main(argv=None) -> int:
    return script_main(__doc__, STAGES, argv)


if __name__ == "__main__":
    sys.exit(main())
