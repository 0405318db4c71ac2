"""`metaclm reproduce`: data -> training with history -> analyses -> kNN -> probing -> REPORT.md.

One resumable pipeline over the library's commands that writes every table and figure of the paper next
to the paper's numbers (see docs/reproduce.md). ``reproduce(out_dir, scale, only, settings)`` in Python.
"""
from .run import reproduce, selected_stages, stage_settings
from .stages import SCALES, SETTINGS, STAGES

__all__ = ["SCALES", "SETTINGS", "STAGES", "reproduce", "selected_stages", "stage_settings"]
