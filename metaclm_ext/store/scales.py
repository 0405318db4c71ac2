"""Power-of-two scales of stored field values: a field with scale s stores s * v for each true value v.

float16 has the exponent range of values around 1 (normal from 2^-14 = 6.1e-5 up to 65504), but a
recorded error signal e_t = -(lr * c) * dL/dy is typically 10^-8 .. 10^-3: stored as it is, most of it is
subnormal (rounded to a fixed 2^-24, i.e. to a large relative error) or flushed to zero. A per-field scale,
a power of two so that scaling and unscaling are exact, moves the values into float16's normal range,
where rounding is relative (2^-11). bfloat16 and float32 have float32's exponent range: their scale is 1.

The store keeps the scales in its attrs under ``SCALES`` ({field: scale}); a field without one (every
field of a store written before scales existed) has scale 1. Readers turn results that are linear in a
field's values (dual-form sums, selected rows) back into true units with :func:`true_units`.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from ..dtypes import HISTORY_DTYPE_NAMES
from ._format import StoreError

__all__ = ["SCALES", "check_scaled_range", "choose_scale", "field_scale", "power_of_two", "true_units"]

SCALES = "value_scales"  # the attrs key
# The largest |value| of the step a scale is chosen from lands in [2^(TOP - 1), 2^TOP): 2^11 of headroom
# below float16's largest finite value (2^16) and 2^17 above its smallest normal one (2^-14).
TOP = 4


def choose_scale(max_abs: float, dtype: str) -> float:
    """The scale of a ``dtype`` field whose first recorded values have largest magnitude ``max_abs`` > 0:
    1 for a dtype with float32's exponent range, else the power of two that puts ``max_abs`` in
    [2^(TOP - 1), 2^TOP)."""
    if not (math.isfinite(max_abs) and max_abs > 0):
        raise ValueError(f"max_abs must be a positive finite number, got {max_abs!r}")
    if torch.finfo(HISTORY_DTYPE_NAMES[dtype]).tiny <= torch.finfo(torch.float32).tiny:
        return 1.0
    _, exponent = math.frexp(max_abs)  # max_abs in [2^(exponent - 1), 2^exponent)
    return math.ldexp(1.0, TOP - exponent)


def check_scaled_range(field: str, step: int, max_abs: float, scale: float, dtype: str) -> None:
    """ValueError unless a step whose largest |value| of ``field`` is ``max_abs`` fits ``dtype`` with
    ``scale``: not above its largest finite value (it would be stored as inf).

    A step far below the scale (the tail of a learning-rate decay to 0) is recorded: its values fall under
    the smallest normal value and are rounded to the fixed step 2^-24 / scale, an absolute error at most
    2^-28 of the first step's largest value, so its share of a dual-form sum stays as exact as the rest."""
    scaled = max_abs * scale
    if scaled <= torch.finfo(HISTORY_DTYPE_NAMES[dtype]).max:
        return
    raise ValueError(
        f"step {step}: field {field!r} has |value| up to {max_abs:.3e}, {scaled:.3e} times its store scale "
        f"{power_of_two(scale)}: above the largest finite {dtype} value, so the step is not recorded. A field's "
        f"scale is fixed at its first step with a nonzero value (1 in a store recorded before scales existed), "
        f"and float16 holds steps up to ~2^11 times larger than that one (a learning-rate warmup beyond that, or "
        f"diverging gradients, do not fit): record the history with dtype float32 or bfloat16, which need no "
        f"scale")


def field_scale(attrs: Mapping, field: str) -> float:
    """The scale of ``field`` in a store's ``attrs`` (1 when none is recorded); StoreError if it is not a
    positive power of two."""
    scales = attrs.get(SCALES, {})
    if not isinstance(scales, Mapping):
        raise StoreError(f"the store's attrs {SCALES!r} must map field names to scales, got {scales!r}")
    scale = scales.get(field, 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (
            math.isfinite(scale) and scale > 0 and math.frexp(scale)[0] == 0.5):
        raise StoreError(f"the store's attrs give field {field!r} the scale {scale!r}: not a positive power of two")
    return float(scale)


def power_of_two(scale: float) -> str:
    """``2^-20`` for a power-of-two scale (how store-info and errors show one)."""
    return f"2^{math.frexp(scale)[1] - 1}"


def true_units(attrs: Mapping, field: str, values: torch.Tensor) -> torch.Tensor:
    """``values`` computed linearly from ``field``'s stored rows (a sum, a dual form, selected rows), in
    the field's true units: divided by its scale, which is exact (a power of two)."""
    scale = field_scale(attrs, field)
    return values if scale == 1.0 else values / scale
