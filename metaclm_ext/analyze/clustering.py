"""KMeans clustering of query-token representations (Figures 1 and 9), scored against three ground truths.

k is the number of distinct labels of the ground truth among the points. Scores:
  F1  — clusters are matched one-to-one to labels by the Hungarian algorithm on the contingency table
        (maximising the points in matched pairs); F1 is the macro average over labels of the F1 of each
        label against its matched cluster (a label left without a cluster scores 0);
  ARI — adjusted Rand index; AMI — adjusted mutual information (scikit-learn).
All three are 1 for a perfect clustering and about 0 (F1: about 1/k) for a random one.
"""
from __future__ import annotations

import numpy as np

METRICS = ("f1", "ari", "ami")


def matched_f1(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Macro F1 over labels after a one-to-one Hungarian matching of clusters to labels."""
    from scipy.optimize import linear_sum_assignment

    labels, clusters = np.asarray(labels), np.asarray(clusters)
    if labels.shape != clusters.shape or labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels and clusters must be equal-length 1-D arrays, got {labels.shape}, {clusters.shape}")
    _, y = np.unique(labels, return_inverse=True)
    _, c = np.unique(clusters, return_inverse=True)
    table = np.zeros((y.max() + 1, c.max() + 1))
    np.add.at(table, (y, c), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    inter = table[rows, cols]
    f1 = 2 * inter / (table.sum(1)[rows] + table.sum(0)[cols])
    return float(f1.sum() / table.shape[0])


def cluster_scores(points: np.ndarray, labels: np.ndarray, *, n_init: int = 4, seed: int = 0) -> dict:
    """KMeans with k = number of distinct labels; F1, ARI, AMI against ``labels`` (None when k < 2)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score

    points = np.asarray(points, dtype=np.float64)
    k = len(np.unique(labels))
    if k < 2 or k >= len(labels):
        return {"k": k, "f1": None, "ari": None, "ami": None}
    clusters = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(points)
    return {"k": k, "f1": matched_f1(labels, clusters), "ari": float(adjusted_rand_score(labels, clusters)),
            "ami": float(adjusted_mutual_info_score(labels, clusters))}
