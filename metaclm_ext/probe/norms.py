"""Table 1: how often the current token's norm does not decrease from one layer to the next (Section 8.1).

Sequence level: the percentage of trajectories whose norms never decrease; pair level: the percentage of
neighbouring-layer pairs whose norm does not decrease. Under a fair-coin null a trajectory of n pairs is
non-decreasing with probability 2^-n.
"""
from __future__ import annotations

import torch


def nondecreasing(norms: torch.Tensor) -> dict:
    """norms [N, S]: N trajectories over S consecutive states. Returns percentages and counts."""
    if not isinstance(norms, torch.Tensor) or norms.dim() != 2:
        raise ValueError(f"norms must be a 2-D tensor [trajectories, states], got {getattr(norms, 'shape', type(norms))}")
    n, s = norms.shape
    if n == 0 or s < 2:
        raise ValueError(f"norms needs at least one trajectory of at least 2 states, got shape {tuple(norms.shape)}")
    if not bool(torch.isfinite(norms).all()):
        raise ValueError("norms holds non-finite values")
    up = norms[:, 1:] >= norms[:, :-1]
    return {
        "sequence_percent": 100.0 * float(up.all(1).double().mean()),
        "pair_percent": 100.0 * float(up.double().mean()),
        "pair_percent_by_step": (100.0 * up.double().mean(0)).tolist(),   # step i: state i -> i+1
        "trajectories": n,
        "pairs_per_trajectory": s - 1,
        "null_sequence_percent": 100.0 * 2.0 ** -(s - 1),
    }
