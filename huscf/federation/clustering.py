"""Cluster clients from the server's discriminator activations, choosing k from the data.

Features are taken at one common depth of D that every client's activations reach through the
server's shared weights (``common_feature_depth``), so clients are grouped by their data, not by
where their cuts happen to fall (a pitfall of the authors' code, where clusters followed cuts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score

from huscf.split.plan import Cuts


def common_feature_depth(cuts: list[Cuts]) -> int:
    """The shallowest D block whose output the server sees (or can compute) for every client."""
    return max(c.hd for c in cuts) + 1


@dataclass(frozen=True)
class ClusterResult:
    labels: np.ndarray  # (n,) cluster id per client, ids 0..k-1
    k: int
    silhouette: dict[int, float]  # silhouette score per candidate k (empty when k was fixed or n < 3)


def _kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)


def whiten(features: np.ndarray, noise_var: np.ndarray) -> np.ndarray:
    """Divide every feature dimension by its sampling noise: the standard error of a client's
    batch mean, pooled over clients (``noise_var[i]`` = per-dimension variance of client i's
    batch mean). Clients that differ only by sampling noise then look like isotropic noise,
    whose k-means silhouettes stay low; real differences between data stand out."""
    se = np.sqrt(np.asarray(noise_var, dtype=np.float64).reshape(len(features), -1).mean(0)) + 1e-8
    return np.asarray(features, dtype=np.float64).reshape(len(features), -1) / se


def cluster_clients(features: np.ndarray, k: int | str = "auto", max_clusters: int = 8,
                    min_silhouette: float = 0.35, seed: int = 0) -> ClusterResult:
    """k-means on per-client feature vectors.

    ``k="auto"``: try k = 2..min(max_clusters, n-1), keep the k with the best silhouette, and fall
    back to one cluster when even the best silhouette is below ``min_silhouette`` (no real
    structure: e.g. one IID domain). A fixed k larger than the number of clients is clipped.
    """
    n = len(features)
    x = np.asarray(features, dtype=np.float64).reshape(n, -1)
    if k != "auto":
        k = min(int(k), n)
        labels = np.zeros(n, dtype=int) if k == 1 else _kmeans(x, k, seed)
        return ClusterResult(_relabel(labels), len(set(labels.tolist())), {})
    scores: dict[int, float] = {}
    best: tuple[float, int, np.ndarray] | None = None
    for kk in range(2, min(max_clusters, n - 1) + 1):
        labels = _kmeans(x, kk, seed)
        if len(set(labels.tolist())) < 2:
            continue
        s = float(silhouette_score(x, labels))
        scores[kk] = s
        if best is None or s > best[0]:
            best = (s, kk, labels)
    if best is None or best[0] < min_silhouette:
        return ClusterResult(np.zeros(n, dtype=int), 1, scores)
    return ClusterResult(_relabel(best[2]), best[1], scores)


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Number clusters by first appearance, so ids are stable across identical partitions."""
    order = {}
    for lab in labels.tolist():
        order.setdefault(lab, len(order))
    return np.array([order[lab] for lab in labels.tolist()], dtype=int)
