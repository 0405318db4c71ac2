"""The folder a fine-tuning run writes, and reading it back (docs/finetune.md describes every file).

    RUN/finetune.json                 model, corpus, settings, tokens, rows, bytes, wall time, checkpoints
    RUN/articles.json                 document id -> title, trained tokens and held-out sentences
    RUN/history/                      the recorder's store (--layers, --dtype)
    RUN/history-fp32/                 the --fp32-layers again, in float32 (for the exactness check)
    RUN/checkpoints/step_XXXXXX/      model + tokenizer after XXXXXX optimizer steps (step_000000: the start)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..store import HistoryStore
from ..store._format import MANIFEST  # the file that makes a folder a history store

SUMMARY = "finetune.json"
ARTICLES = "articles.json"
HISTORY = "history"
HISTORY_FP32 = "history-fp32"
CHECKPOINTS = "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoint_folder(run: Path, step: int) -> Path:
    """RUN/checkpoints/step_XXXXXX: the model and tokenizer after ``step`` optimizer steps."""
    return Path(run) / CHECKPOINTS / checkpoint_name(step)


def is_finetune_run(path) -> bool:
    return (Path(path) / SUMMARY).exists()


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


@dataclass(frozen=True)
class FinetuneRun:
    path: Path
    summary: dict
    articles: dict  # {"label": ..., "articles": {id (str): {"title", "train_tokens", "heldout"}}}

    def store_path(self, name: str = HISTORY) -> Path:
        """A history store of the run; ValueError when the run has none (e.g. deleted or never written)."""
        folder = self.path / name
        if not (folder / MANIFEST).exists():
            raise ValueError(f"{self.path} has no recorded history in {folder} (the store was removed, or the run "
                             "recorded no layers there): run `metaclm finetune` again")
        return folder

    def history(self) -> HistoryStore:
        return HistoryStore(self.store_path(HISTORY))

    def checkpoint(self, step: int) -> Path:
        return checkpoint_folder(self.path, step)


def load_run(path) -> FinetuneRun:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such run folder {folder}")
    if not is_finetune_run(folder):
        raise ValueError(f"{folder} is not a `metaclm finetune` run (no {SUMMARY})")
    articles = folder / ARTICLES
    if not articles.exists():
        raise ValueError(f"{folder} has no {ARTICLES}: the run did not finish")
    return FinetuneRun(folder, json.loads((folder / SUMMARY).read_text()), json.loads(articles.read_text()))
