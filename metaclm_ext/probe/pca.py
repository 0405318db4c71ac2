"""Figures 5 and 8: current-token trajectories across layers, projected to 3-D by PCA."""
from __future__ import annotations

import textwrap

import numpy as np
import torch


def project(trajectories: torch.Tensor) -> tuple[np.ndarray, list[float]]:
    """trajectories [N, S, d] -> points [N, S, 3] in the top-3 principal components of all N*S points,
    and the explained-variance ratios."""
    from sklearn.decomposition import PCA

    if trajectories.dim() != 3 or trajectories.shape[0] * trajectories.shape[1] < 3:
        raise ValueError(f"trajectories must be [N, S, d] with at least 3 points, got {tuple(trajectories.shape)}")
    n, s, d = trajectories.shape
    pca = PCA(n_components=min(3, d, n * s)).fit(trajectories.reshape(n * s, d).double().numpy())
    pts = pca.transform(trajectories.reshape(n * s, d).double().numpy()).reshape(n, s, -1)
    if pts.shape[-1] < 3:
        pts = np.concatenate([pts, np.zeros((n, s, 3 - pts.shape[-1]))], -1)
    return pts, [float(v) for v in pca.explained_variance_ratio_]


def plot(points: np.ndarray, title: str, path) -> None:
    """One coloured path per sample, layer to layer; a dot marks the embedding (start) of each path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(8, 7))
    ax = fig.add_subplot(projection="3d")
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(points), 1)))
    for pts, c in zip(points, colors):
        ax.plot(pts[:, 0], pts[:, 1], pts[:, 2], color=c, lw=0.9, alpha=0.8)
        ax.scatter(pts[:1, 0], pts[:1, 1], pts[:1, 2], color=c, s=8)
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    ax.set_zlabel("PC3")
    ax.set_title("\n".join(textwrap.fill(line, 90) for line in title.split("\n")), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
