"""The paper's GPT-2 design model on the synthetic language: configuration, batches, the model, run folders,
the recorded history, and the training loop (`metaclm train`), each in its own module."""
from .batches import IGNORE, Batch, evaluate, lm_loss, make_batch
from .config import PRESETS, TrainConfig, make_config, validate_config
from .model import build_model, count_parameters, cproj_modules, resolve_device
from .runs import Run, checkpoint_dir, epoch_limits, load_checkpoint, load_run

__all__ = ["IGNORE", "PRESETS", "Batch", "Run", "TrainConfig", "build_model", "checkpoint_dir", "count_parameters",
           "cproj_modules", "epoch_limits", "evaluate", "lm_loss", "load_checkpoint", "load_run", "make_batch",
           "make_config", "resolve_device", "validate_config"]
