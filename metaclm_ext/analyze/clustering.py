"""KMeans clustering of query-token representations (Figures 1 and 9), scored against three ground truths.

k is the number of distinct labels of the ground truth among the points. Scores:
  F1  — clusters are matched one-to-one to labels by the Hungarian algorithm on the contingency table
        (maximising the points in matched pairs); F1 is the macro average over labels of the F1 of each
        label against its matched cluster (a label left without a cluster scores 0);
  ARI — adjusted Rand index; AMI — adjusted mutual information (scikit-learn).
ARI and AMI are 1 for a perfect clustering and about 0 for a random one. F1 is 1 for a perfect clustering
but well above 1/k for a random one (the matching picks the best pairs), so its chance level is measured:
the same clusters scored against randomly permuted labels (see chance_f1).
"""
from __future__ import annotations

import numpy as np

METRICS = ("f1", "ari", "ami")
CHANCE_PERMUTATIONS = 100
CHANCE_QUANTILE = 0.95  # "above chance" = above this quantile of the permutation null (a one-sided 5% test)


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


def chance_f1(labels: np.ndarray, clusters: np.ndarray, *, permutations: int = CHANCE_PERMUTATIONS,
              seed: int = 0) -> dict:
    """The F1 a clustering with these cluster sizes gets by chance: ``clusters`` scored by matched_f1 against
    ``permutations`` random permutations of ``labels`` (label counts kept). {"mean", "quantile": the
    CHANCE_QUANTILE quantile, "permutations"}."""
    if permutations < 1:
        raise ValueError(f"permutations must be >= 1, got {permutations}")
    labels = np.asarray(labels)
    gen = np.random.default_rng(seed)
    null = np.array([matched_f1(gen.permutation(labels), clusters) for _ in range(permutations)])
    return {"mean": float(null.mean()), "quantile": float(np.quantile(null, CHANCE_QUANTILE)),
            "permutations": permutations}


def cluster_scores(points: np.ndarray, labels: np.ndarray, *, n_init: int = 4, seed: int = 0,
                   chance: bool = False) -> dict:
    """KMeans with k = number of distinct labels; F1, ARI, AMI against ``labels`` (None when k < 2), and with
    ``chance`` the F1 of the same clusters against permuted labels under "f1_chance" (see chance_f1)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score

    points = np.asarray(points, dtype=np.float64)
    k = len(np.unique(labels))
    if k < 2 or k >= len(labels):
        return {"k": k, "f1": None, "ari": None, "ami": None}
    clusters = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(points)
    scores = {"k": k, "f1": matched_f1(labels, clusters), "ari": float(adjusted_rand_score(labels, clusters)),
              "ami": float(adjusted_mutual_info_score(labels, clusters))}
    if chance:
        scores["f1_chance"] = chance_f1(labels, clusters, seed=seed)
    return scores
