"""The queries of an attribution: each recorded module's input x at every position of a text, from one
forward of a checkpoint (the inner products <x_t, x> with the recorded inputs x_t are the module's dual-form
weights: its fine-tuning change applied to x is sum_t e_t <x_t, x>)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..finetune.train import model_context
from ..hf_quiet import quiet_transformers
from .run import RecordedModule


@dataclass
class TextQueries:
    token_ids: list[int]
    tokens: list[str]  # each token decoded on its own
    inputs: dict[str, torch.Tensor]  # input field -> fp32 [T, D], the module's input at each position
    context: int  # the model's maximum number of positions


def load_checkpoint(path: Path):
    """(model in eval mode, fp32, on the CPU; its tokenizer) from a save_pretrained folder."""
    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def recorded_module(model, path: str) -> torch.nn.Module:
    """The module the history recorded as ``path``: its name in ``model``, or, when the recorder was attached
    to a submodule (e.g. the base model inside the causal LM), the one module whose name ends with it."""
    named = dict(model.named_modules())
    if path in named:
        return named[path]
    matches = [name for name in named if name.endswith("." + path)]
    if len(matches) != 1:
        raise ValueError(f"the checkpoint has {'no module' if not matches else 'several modules'} named like {path!r}, "
                         f"which the history records{': ' + ', '.join(matches) if matches else ''}")
    return named[matches[0]]


@torch.no_grad()
def text_queries(model, tokenizer, text: str, modules: list[RecordedModule]) -> TextQueries:
    """Tokenize ``text`` and capture the input of every module in ``modules`` at each of its positions.

    ValueError for an empty text or one longer than the model's context.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text is empty: give the sentence to attribute")
    ids = tokenizer(text)["input_ids"]
    context = model_context(model.config)
    if context is None:
        raise ValueError(f"the model's config ({type(model.config).__name__}) names no maximum number of positions")
    if len(ids) > context:
        raise ValueError(f"text is {len(ids)} tokens long but the model's context is {context} positions: "
                         "shorten it")
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for m in modules:
        def keep(_module, inputs, _output, field=m.input_field):
            captured[field] = inputs[0][0].detach().float().clone()
        handles.append(recorded_module(model, m.module).register_forward_hook(keep))
    try:
        model(input_ids=torch.tensor([ids], device=next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    return TextQueries(ids, [tokenizer.decode([i]) for i in ids], {k: v.cpu() for k, v in captured.items()}, context)
