"""Which linear layers a recording covers: selection by preset or name pattern, and what each one is.

A selector is either the name of a preset (one architecture's attention and FFN output projections,
numbered by layer) or one or more module-name patterns over ``model.named_modules()`` (shell-style
``fnmatch`` patterns, or regular expressions written ``"re:<regex>"`` and matched in full).

Field names in the store (documented in docs/recording.md):

* preset modules keep the names the rest of this project reads: ``attn_in.{l}`` / ``mlp_in.{l}`` for the
  inputs of layer ``l``'s attention / FFN output projection and ``attn_err.{l}`` / ``mlp_err.{l}`` for
  their error signals;
* pattern-selected modules get ``{qualified module name}.in`` and ``{qualified module name}.err``.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from transformers.pytorch_utils import Conv1D

from ..history_names import field_name

# Per preset: (role, regex over the qualified module name with the layer number as group 1). A prefix
# before the layer list is allowed so that wrapped models (e.g. a multimodal Gemma 3's language model)
# match too.
PRESETS: dict[str, tuple[tuple[str, str], ...]] = {
    "gpt2": (("attn", r"(?:.+\.)?h\.(\d+)\.attn\.c_proj"), ("mlp", r"(?:.+\.)?h\.(\d+)\.mlp\.c_proj")),
    "llama": (("attn", r"(?:.+\.)?layers\.(\d+)\.self_attn\.o_proj"), ("mlp", r"(?:.+\.)?layers\.(\d+)\.mlp\.down_proj")),
    "gemma3": (("attn", r"(?:.+\.)?layers\.(\d+)\.self_attn\.o_proj"), ("mlp", r"(?:.+\.)?layers\.(\d+)\.mlp\.down_proj")),
}
REGEX_PREFIX = "re:"

Selector = Union[str, Sequence[str]]


@dataclass(frozen=True)
class ModuleSpec:
    """One recorded linear layer.

    ``layout`` says how its weight multiplies the input: "linear" (``torch.nn.Linear``: y = x W^T + b,
    W [out, in]) or "conv1d" (transformers' ``Conv1D``: y = x W + b, W [in, out]). ``heads`` and
    ``head_dim`` are set for an attention output projection, whose input is the heads' concatenated
    outputs (head h = input dims h*head_dim ..).
    """

    name: str  # qualified module name in model.named_modules()
    module: torch.nn.Module
    layout: str
    in_features: int
    out_features: int
    input_field: str
    error_field: str
    role: Optional[str] = None  # "attn" / "mlp" for preset modules
    layer: Optional[int] = None
    heads: Optional[int] = None
    head_dim: Optional[int] = None

    @property
    def has_bias(self) -> bool:
        return self.module.bias is not None

    def describe(self) -> dict:
        """The JSON description kept in the store's attrs (everything but the module object)."""
        return {"module": self.name, "layout": self.layout, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.has_bias, "role": self.role, "layer": self.layer,
                "heads": self.heads, "head_dim": self.head_dim, "input_field": self.input_field,
                "error_field": self.error_field}


def select_modules(model: torch.nn.Module, modules: Selector) -> list[ModuleSpec]:
    """The specs of the linear layers ``modules`` selects in ``model`` (a preset name or patterns), in
    the order of ``model.named_modules()``.

    Raises ValueError for an unknown preset, a pattern or preset that matches no module, or two preset
    modules on one layer; TypeError for a selected module that is neither ``nn.Linear`` nor ``Conv1D``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(modules, str) and modules in PRESETS:
        return _preset_specs(model, modules)
    patterns = [modules] if isinstance(modules, str) else modules
    if (not isinstance(patterns, Sequence) or not patterns
            or not all(isinstance(p, str) and p for p in patterns)):
        raise TypeError(f"modules must be a preset name ({', '.join(sorted(PRESETS))}) or a non-empty list of "
                        f"module-name patterns, got {modules!r}")
    return _pattern_specs(model, list(patterns))


def _pattern_specs(model: torch.nn.Module, patterns: list[str]) -> list[ModuleSpec]:
    names = [name for name, _ in model.named_modules() if name]
    chosen: set[str] = set()
    for pattern in patterns:
        hits = [n for n in names if _matches(pattern, n)]
        if not hits:
            raise ValueError(
                f"module pattern {pattern!r} matches no module of {type(model).__name__} "
                f"(unknown preset too: presets are {', '.join(sorted(PRESETS))}; module names look like "
                f"{', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
        chosen.update(hits)
    found = dict(model.named_modules())
    return [_spec(name, found[name], f"{name}.in", f"{name}.err", layer=_last_number(name))
            for name in names if name in chosen]


def _preset_specs(model: torch.nn.Module, preset: str) -> list[ModuleSpec]:
    config = _text_config(model)
    heads = _config_int(config, "num_attention_heads", "n_head")
    head_dim = _config_int(config, "head_dim")
    specs, seen = [], {}
    for name, module in model.named_modules():
        for role, pattern in PRESETS[preset]:
            match = re.fullmatch(pattern, name)
            if match is None:
                continue
            layer = int(match.group(1))
            if (role, layer) in seen:
                raise ValueError(f"preset {preset!r} matches both {seen[role, layer]} and {name} as layer {layer}'s "
                                 f"{role} projection; select the modules by pattern instead")
            seen[role, layer] = name
            spec = _spec(name, module, field_name(role, layer), field_name(role, layer, "err"), role=role, layer=layer)
            if role == "attn" and heads:
                dim = head_dim or spec.in_features // heads
                if heads * dim == spec.in_features:
                    spec = ModuleSpec(**{**spec.__dict__, "heads": heads, "head_dim": dim})
            specs.append(spec)
    if not specs:
        raise ValueError(f"preset {preset!r} matches no module of {type(model).__name__} (it selects names like "
                         f"{', '.join(p for _, p in PRESETS[preset])}); select the modules by pattern instead")
    return specs


def _spec(name: str, module: torch.nn.Module, input_field: str, error_field: str, **kw) -> ModuleSpec:
    if isinstance(module, torch.nn.Linear):
        layout, d_in, d_out = "linear", module.in_features, module.out_features
    elif isinstance(module, Conv1D):
        layout, (d_in, d_out) = "conv1d", module.weight.shape
    else:
        raise TypeError(f"module {name!r} is a {type(module).__name__}, not a torch.nn.Linear or transformers "
                        "Conv1D: only linear layers have a dual form; narrow the pattern")
    return ModuleSpec(name, module, layout, int(d_in), int(d_out), input_field, error_field, **kw)


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith(REGEX_PREFIX):
        try:
            return re.fullmatch(pattern[len(REGEX_PREFIX):], name) is not None
        except re.error as exc:
            raise ValueError(f"module pattern {pattern!r} is not a valid regular expression ({exc})") from None
    return fnmatch.fnmatchcase(name, pattern)


def _last_number(name: str) -> Optional[int]:
    numbers = [int(part) for part in name.split(".") if part.isdigit()]
    return numbers[-1] if numbers else None


def _text_config(model: torch.nn.Module):
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def _config_int(config, *names: str) -> Optional[int]:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
