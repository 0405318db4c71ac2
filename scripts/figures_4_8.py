#!/usr/bin/env python
"""Figures 4, 5, 7 and 8 of the paper on a pretrained LM: the inner loss across layers (4/7) and the PCA
trajectories of the current token with their norms (5/8), on the Wikitext-103 and 1BW stand-ins (Figure 6,
on the synthetic Table 6 run, has its own script: figure_6.py).

Runs the probe stages of `metaclm reproduce` (`probe_wikipedia`, `probe_news` with SmolLM2-135M-Instruct,
`probe_wikipedia_gemma3`, `probe_news_gemma3` with Gemma-3-270M) into --out and writes OUT/REPORT.md; a rerun skips finished stages (docs/reproduce.md).

    python scripts/figures_4_8.py [--quick | --paper] [--out DIR]
"""
import sys

from metaclm_ext.commands.reproduce import script_main

STAGES = ["probe_wikipedia", "probe_news", "probe_wikipedia_gemma3", "probe_news_gemma3"]


def main(argv=None) -> int:
    return script_main(__doc__, STAGES, argv)


if __name__ == "__main__":
    sys.exit(main())
