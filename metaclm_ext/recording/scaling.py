"""The factor c by which a gradient was scaled in place between the last backward and the optimizer step.

Gradient clipping (``clip_grad_norm_``) and a grad scaler's ``unscale_`` multiply ``.grad`` by one factor,
which the user does not tell the recorder. It is measured instead: a fixed sample of the gradient's
entries, noted after each backward, against the same entries at the step. A least-squares fit gives c,
and its residual shows whether the change was one factor at all (``clip_grad_value_``, for one, is not).
A sample of a few thousand entries costs next to nothing, where a full fp64 norm per backward took a few
percent of a small LM's step; uniform scaling shows in any sample.
"""
from __future__ import annotations

import torch

SAMPLE = 4096  # gradient entries compared
# A uniformly scaled gradient differs from c * noted only by rounding each entry once.
ROUNDINGS = 16


def grad_sample(grad: torch.Tensor) -> torch.Tensor:
    """An fp64 copy of up to SAMPLE evenly spaced entries of ``grad``."""
    flat = grad.detach().reshape(-1)
    stride = max(1, flat.numel() // SAMPLE)
    return flat[::stride].to(torch.float64, copy=True)


def scale_fit(noted: torch.Tensor, now: torch.Tensor) -> torch.Tensor:
    """[c, relative residual] (on the samples' device) with ``now ~= c * noted``; c = 1 for a zero sample."""
    norm2 = noted @ noted
    c = torch.where(norm2 > 0, (now @ noted) / norm2.clamp_min(torch.finfo(torch.float64).tiny), 1.0)
    residual = (now - c * noted).norm() / now.norm().clamp_min(torch.finfo(torch.float64).tiny)
    return torch.stack([c, residual])


def is_one_factor(residual: float, dtype: torch.dtype) -> bool:
    """Whether the fit's residual is the rounding of a uniform scaling of a ``dtype`` gradient."""
    return residual <= ROUNDINGS * torch.finfo(dtype).eps
