"""Which decoder layers a fine-tuning run records, under the preset field names ``attn_in.{l}`` / ``mlp_in.{l}``.

The recorder's presets select every layer of a model. To record some layers under the same names, the
recorder is attached to a :class:`LayerView`: a module that holds the chosen decoder layers at the path a
preset matches (``layers.{l}`` for LLaMA / Gemma 3, ``h.{l}`` for GPT-2) and the model's config (for the
attention heads). The view is never called; the recorder's module hooks fire when the model runs, and
``capture()`` delimits each micro-batch. Module names in the store are the view's (``layers.3.mlp.down_proj``).
"""
from __future__ import annotations

import torch

from ..probe.models import LensModel
from ..recording import select_modules

# model_type -> (HistoryRecorder preset, the attribute under which the preset finds the decoder layers)
FAMILIES = {"llama": ("llama", "layers"), "gemma3": ("gemma3", "layers"), "gemma3_text": ("gemma3", "layers"),
            "gpt2": ("gpt2", "h")}


class LayerView(torch.nn.Module):
    """The chosen decoder layers of a model, named as its recorder preset expects (see the module doc)."""

    def __init__(self, lm: LensModel, layers: list[int]):
        super().__init__()
        preset, attribute = family_preset(lm)
        self.preset = preset
        self.config = lm.model.config
        setattr(self, attribute, torch.nn.ModuleDict({str(l): lm.layers[l] for l in layers}))


def projections(view: LayerView) -> list[torch.nn.Module]:
    """The attention output and FFN down projections the view's preset selects."""
    return [spec.module for spec in select_modules(view, view.preset)]


def family_preset(lm: LensModel) -> tuple[str, str]:
    family = lm.model.config.model_type
    if family not in FAMILIES:
        raise ValueError(f"--model: a {family} model has no recording preset (supported: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[family]


def parse_layers(spec, num_layers: int, what: str) -> list[int]:
    """--layers / --fp32-layers: "all", "none", or comma-separated layer numbers (0-based; negative counts
    from the end; "mid" is layer num_layers // 2), e.g. "0,mid,-1"."""
    if not isinstance(spec, str):
        raise TypeError(f"{what} must be a string, got {type(spec).__name__}")
    text = spec.strip().lower()
    if text == "all":
        return list(range(num_layers))
    if text in ("", "none"):
        return []
    chosen = set()
    for part in text.split(","):
        try:
            layer = num_layers // 2 if part.strip() == "mid" else int(part)
        except ValueError:
            raise ValueError(f"{what}: {part.strip()!r} is not a layer number (give e.g. '0,14,-1', 'all' or "
                             "'none')") from None
        if not -num_layers <= layer < num_layers:
            raise ValueError(f"{what}: layer {layer} does not exist (the model has {num_layers} layers: "
                             f"0..{num_layers - 1}, or -1..-{num_layers})")
        chosen.add(layer % num_layers)
    return sorted(chosen)
