"""The one rule for "the inner loss decreases across layers", shared by the synthetic runs' claims (Figures
2a/11a) and the pretrained LMs' (Figures 4/7): a Spearman rank correlation between the layer index and the
loss of at most FALLING_RHO.
"""
from __future__ import annotations

import numpy as np

# Fixed before any run was judged with it: -0.5 is a clear majority of layer pairs in falling order (rho = -1:
# every pair), loose enough that a curve that falls overall with one or two layers out of order still counts,
# while a flat or noisy one does not.
FALLING_RHO = -0.5


def spearman_with_order(values: list[float]) -> float:
    """Spearman's rank correlation between ``values`` and their positions 0..n-1 (ties get their mean
    rank); nan when there are fewer than two values or all are equal."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2 or np.all(v == v[0]):
        return float("nan")
    ranks = np.empty(v.size)
    ranks[v.argsort(kind="stable")] = np.arange(v.size)
    for value in np.unique(v):
        tied = v == value
        ranks[tied] = ranks[tied].mean()
    return float(np.corrcoef(ranks, np.arange(v.size))[0, 1])
