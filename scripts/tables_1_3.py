#!/usr/bin/env python
"""Tables 1-3 of the paper: non-decreasing norms of a pretrained LM (Table 1), data sizes (Table 2) and the samples
kept after the loss filter (Table 3), beside the paper's numbers.

Runs the `data` and probe stages of `metaclm reproduce` (`probe_wikipedia`, `probe_news` with
SmolLM2-135M-Instruct, `probe_wikipedia_gemma3`, `probe_news_gemma3` with Gemma-3-270M) and `table1_cause` (why
Table 1's norms drop) into --out and writes OUT/REPORT.md; a rerun skips the stages already done with the same
settings (docs/reproduce.md).

    python scripts/tables_1_3.py [--quick | --paper] [--out DIR]
"""
import sys

from metaclm_ext.commands.reproduce import script_main

STAGES = ["data", "probe_wikipedia", "probe_news", "probe_wikipedia_gemma3", "probe_news_gemma3", "table1_cause"]


def main(argv=None) -> int:
    return script_main(__doc__, STAGES, argv)


if __name__ == "__main__":
    sys.exit(main())
