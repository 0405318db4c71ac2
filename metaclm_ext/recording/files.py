"""The files a recording keeps in the store folder beside the store's own data.

* ``weights_start.safetensors``: every recorded module's weight and bias when recording began (keys
  ``{module}.weight`` / ``{module}.bias``), written once: a resumed recording keeps the first one;
* ``weights_end.safetensors``: the same when the recorder was closed (after the last optimizer step);
* ``recording.json``: what is known only while training runs: whether the recorded errors sum exactly to
  the weight change (``exact``) and, if not, why (``reasons``), the optimizer and the steps recorded.

With the store's attrs (which module each field belongs to), a check needs nothing but the folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .modules import ModuleSpec

WEIGHTS_START = "weights_start.safetensors"
WEIGHTS_END = "weights_end.safetensors"
STATUS = "recording.json"


def save_weights(path: Path, specs: list[ModuleSpec]) -> None:
    """The specs' current weights and biases (CPU copies), written atomically."""
    tensors = {}
    for spec in specs:
        tensors[f"{spec.name}.weight"] = spec.module.weight.detach().cpu().contiguous().clone()
        if spec.has_bias:
            tensors[f"{spec.name}.bias"] = spec.module.bias.detach().cpu().contiguous().clone()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the recording was not closed (HistoryRecorder.close writes it)")
    return load_file(str(path))


def write_status(folder: Path, status: dict) -> None:
    path = folder / STATUS
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(status, indent=1))
    os.replace(tmp, path)


def read_status(folder: Path) -> dict:
    path = folder / STATUS
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {folder} was not written by HistoryRecorder")
    return json.loads(path.read_text())
