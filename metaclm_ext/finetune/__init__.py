"""Fine-tune a pretrained causal LM with plain SGD, record its training history, and study it (docs/finetune.md).

:func:`finetune` writes a run folder (runfolder.py describes it); :func:`same_article_analysis` asks, of
held-out sentences, which fine-tuning tokens each recorded layer retrieves.
"""
from .runfolder import FinetuneRun, is_finetune_run, load_run
from .train import FinetuneConfig, finetune

__all__ = ["FinetuneConfig", "FinetuneRun", "finetune", "is_finetune_run", "load_run"]
