"""The names of a recorded training history: which c_proj a row block came from and which store field holds it.

Block l's two output projections are keyed ``attn.l`` (the attention's c_proj) and ``mlp.l`` (the
FFN's); the store field of a c_proj's inputs is ``attn_in.l`` / ``mlp_in.l`` and of its error signals
``attn_err.l`` / ``mlp_err.l``. Every module that builds or reads these names goes through here, so
the spelling lives in one place.
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["MODULES", "SIGNALS", "FieldName", "field_name", "module_key", "parse_field_name", "parse_module_key"]

MODULES = ("attn", "mlp")  # the attention's and the FFN's output projection (c_proj) of a block
SIGNALS = ("in", "err")  # what the field records of the c_proj: its inputs x_t, its error signals e_t


class FieldName(NamedTuple):
    module: str  # "attn" or "mlp"
    signal: str  # "in" or "err"
    layer: int


def module_key(module: str, layer: int) -> str:
    """``attn.3``: the key of block `layer`'s c_proj of `module`."""
    return f"{module}.{layer}"


def parse_module_key(key: str) -> tuple[str, int]:
    """(module, layer) of a key made by :func:`module_key`; ValueError for anything else."""
    module, _, layer = key.partition(".")
    if module not in MODULES or not layer.isdigit():
        raise ValueError(f"{key!r} is not a c_proj key (expected 'attn.L' or 'mlp.L')")
    return module, int(layer)


def field_name(module: str, layer: int, signal: str = "in") -> str:
    """``attn_in.3``: the store field of `signal` ("in" or "err") at block `layer`'s c_proj of `module`."""
    return f"{module}_{signal}.{layer}"


def parse_field_name(name: str) -> FieldName:
    """(module, signal, layer) of a field made by :func:`field_name`; ValueError for anything else."""
    prefix, _, layer = name.partition(".")
    module, _, signal = prefix.partition("_")
    if module not in MODULES or signal not in SIGNALS or not layer.isdigit():
        raise ValueError(f"{name!r} is not a history field name (expected e.g. 'attn_in.0' or 'mlp_err.3')")
    return FieldName(module, signal, int(layer))
