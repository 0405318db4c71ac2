"""Float64 weights for the layers whose history is checked for exactness (--fp32-layers).

Plain SGD makes a weight's change the exact sum of its recorded updates, but a float32 weight rounds
every update into it: over a fine-tuning run that rounding is ~1e-7 of the weight per step, and the
changes of a pretrained LM's projections are ~1e-4 of the weight after a few steps, so the check would
measure float32 arithmetic rather than the recording. These modules keep their weights in float64 and
compute in float64 on the float32 activations (cast at their boundary, back to float32 after): the model
sees the same activations up to float32 rounding, and their weight change is exact to float64.
"""
from __future__ import annotations

import torch


def _to_float64(_module, args):
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _to_float32(_module, _args, output):
    return output.float()


def hold_in_float64(modules: list[torch.nn.Module]) -> list:
    """Convert ``modules`` to float64 with boundary casts; returns the hook handles."""
    handles = []
    for module in modules:
        module.double()
        handles.append(module.register_forward_pre_hook(_to_float64))
        handles.append(module.register_forward_hook(_to_float32))
    return handles
