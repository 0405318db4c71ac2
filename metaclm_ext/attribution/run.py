"""A fine-tuning run folder, opened for attribution: its checkpoints with their history-row limits, the
recorded modules and the article titles. The folder's layout has one home, metaclm_ext.finetune.runfolder
(whose FinetuneRun reads it for `metaclm finetune-analyze`); this view adds what attribution needs and
accepts any folder in that layout (a run of the HistoryRecorder in a user's loop included):

    RUN/finetune.json       model, corpus, settings, tokens, rows, and per checkpoint ("checkpoints") its
                            step, the history rows recorded before it ("history_rows") and optionally its
                            folder ("path", relative to RUN; default checkpoints/step_XXXXXX)
    RUN/history/            the HistoryRecorder store (attn_in.{l}, mlp_in.{l}, attn_err.{l}, mlp_err.{l};
                            int64 columns step, sequence, position, token, target and optionally article)
    RUN/checkpoints/step_XXXXXX/   save_pretrained model + tokenizer; the highest step is the final model
    RUN/articles.json       {"label": what a document is, "articles": {id: {"title": ..., ...}}} (optional)

A checkpoint's weights are the start weights plus the errors of its first ``history_rows`` rows (the rows
are appended step by step), so that is the limit of every query made of that checkpoint; step 0, the
pretrained start, has none.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..finetune.runfolder import ARTICLES, HISTORY, SUMMARY as RUN_FILE, checkpoint_folder
from ..store import HistoryStore
from ..store._format import MANIFEST


@dataclass(frozen=True)
class Checkpoint:
    step: int
    rows: int  # history rows recorded before this checkpoint's weights were saved (0 for the start)
    path: Path


@dataclass(frozen=True)
class RecordedModule:
    """One recorded output projection: where it is in the model and which store fields hold it."""
    module: str  # qualified name in model.named_modules()
    role: str  # "attn" or "mlp"
    layer: int
    input_field: str
    error_field: str
    heads: Optional[int]
    head_dim: Optional[int]

    @property
    def key(self) -> str:
        return f"{self.role}.{self.layer}"


class AttributionRun:
    """RUN's description, checkpoints, history store, recorded modules and article titles.

    Raises FileNotFoundError naming what is missing (the run file, the history store, a checkpoint
    folder) and ValueError for a run file or store that does not say what attribution needs.
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        run_file = self.folder / RUN_FILE
        if not run_file.is_file():
            raise FileNotFoundError(f"{self.folder} is not a fine-tuning run: it has no {RUN_FILE} "
                                    "(make one with `metaclm finetune`)")
        self.info = json.loads(run_file.read_text())
        if not (self.folder / HISTORY / MANIFEST).is_file():
            raise FileNotFoundError(f"run {self.folder} has no history store ({self.folder / HISTORY}/{MANIFEST} is "
                                    "missing): it was not recorded, or the recording did not start")
        self.store = HistoryStore(self.folder / HISTORY)
        self.checkpoints = self._checkpoints()
        self.modules = self._modules()
        titles = self.folder / ARTICLES
        articles = json.loads(titles.read_text()).get("articles", {}) if titles.is_file() else {}
        self.titles = {int(k): v["title"] for k, v in articles.items()}

    def _checkpoints(self) -> list[Checkpoint]:
        entries = self.info.get("checkpoints")
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{self.folder / RUN_FILE} lists no checkpoints")
        out = []
        for entry in entries:
            if not all(key in entry for key in ("step", "history_rows")):
                raise ValueError(f"{self.folder / RUN_FILE}: checkpoint {entry} needs its step and history_rows")
            rows = int(entry["history_rows"])
            if not 0 <= rows <= len(self.store):
                raise ValueError(f"{self.folder / RUN_FILE}: checkpoint step {entry['step']} says {rows} history rows "
                                 f"but the store has {len(self.store)}")
            path = self.folder / entry["path"] if entry.get("path") else checkpoint_folder(self.folder, int(entry["step"]))
            out.append(Checkpoint(int(entry["step"]), rows, path))
        return sorted(out, key=lambda c: c.step)

    def _modules(self) -> list[RecordedModule]:
        described = self.store.attrs.get("recording", {}).get("modules", [])
        modules = [RecordedModule(m["module"], m["role"], int(m["layer"]), m["input_field"], m["error_field"],
                                  m.get("heads"), m.get("head_dim"))
                   for m in described if m.get("role") in ("attn", "mlp") and m.get("layer") is not None]
        if not modules:
            raise ValueError(f"history store {self.store.path} records no attention/FFN output projection "
                             "(store.attrs['recording']['modules'] has no role 'attn' or 'mlp')")
        return modules

    def checkpoint(self, step: Optional[int] = None) -> Checkpoint:
        """The checkpoint saved after ``step`` optimizer steps (default: the final one)."""
        if step is None:
            chosen = self.checkpoints[-1]
        else:
            found = [c for c in self.checkpoints if c.step == step]
            if not found:
                raise ValueError(f"checkpoint {step} does not exist in {self.folder}: the run has steps "
                                 f"{[c.step for c in self.checkpoints]}")
            chosen = found[0]
        if chosen.rows == 0:
            raise ValueError(f"checkpoint {chosen.step} is the pretrained start: no fine-tuning rows precede it "
                             f"(fine-tuned checkpoints: {[c.step for c in self.checkpoints if c.rows]})")
        if not chosen.path.is_dir():
            raise FileNotFoundError(f"checkpoint folder {chosen.path} is missing")
        return chosen

    def select(self, layers: Optional[list[int]]) -> list[RecordedModule]:
        """The recorded modules of ``layers`` (default: all), in layer order, attention before FFN."""
        recorded = sorted({m.layer for m in self.modules})
        if layers is not None:
            unknown = sorted(set(layers) - set(recorded))
            if unknown:
                raise ValueError(f"layers {unknown} are not recorded in {self.store.path} (recorded: {recorded})")
        chosen = [m for m in self.modules if layers is None or m.layer in layers]
        return sorted(chosen, key=lambda m: (m.layer, m.role != "attn"))

    def title(self, article: int) -> Optional[str]:
        return self.titles.get(article)
