"""Record the training history of any PyTorch model's linear layers into a HistoryStore, and check it.

See docs/recording.md. :class:`HistoryRecorder` attaches to a model (modules chosen by preset or name
pattern), :class:`HistoryCallback` drives it under ``transformers.Trainer``, and :func:`dualcheck_store`
rebuilds every recorded module's weight change from the store alone.
"""
from .modules import PRESETS, ModuleSpec, select_modules
from .recorder import HistoryRecorder
from .rows import IGNORE, targets_from_labels
from .trainer import HistoryCallback
from .verify import dualcheck_store, format_report

__all__ = ["IGNORE", "PRESETS", "HistoryCallback", "HistoryRecorder", "ModuleSpec", "dualcheck_store",
           "format_report", "select_modules", "targets_from_labels"]
