#!/usr/bin/env python
"""Figure 6 of the paper: pair- and sequence-level non-decreasing norms along training of the Section 8.1
model (Table 6: AdamW, cosine schedule, the large synthetic data).

Runs the `analyze_table6` stage of `metaclm reproduce` (and the data and training it needs) into --out and
writes OUT/REPORT.md; a rerun skips finished stages (docs/reproduce.md).

    python scripts/figure_6.py [--quick | --paper] [--out DIR]
"""
import sys

from metaclm_ext.commands.reproduce import script_main

STAGES = ["analyze_table6"]


def main(argv=None) -> int:
    return script_main(__doc__, STAGES, argv)


if __name__ == "__main__":
    sys.exit(main())
