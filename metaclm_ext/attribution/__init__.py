"""Token-level attribution of a text to a fine-tuning run's recorded history (`metaclm attribute`).

:func:`attribute` runs a checkpoint on the text and, per recorded output projection, retrieves the
fine-tuning tokens with the largest and smallest dual-form weights <x_t, x> and the share of the module's
fine-tuning contribution they carry; :func:`write_outputs` writes JSON, Markdown and a self-contained HTML
page. See docs/attribution.md.
"""
from .attribute import DEFINITIONS, attribute
from .report import FILES, write_outputs
from .run import AttributionRun, Checkpoint, RecordedModule

__all__ = ["DEFINITIONS", "FILES", "AttributionRun", "Checkpoint", "RecordedModule", "attribute", "write_outputs"]
