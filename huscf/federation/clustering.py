"""Cluster clients from the server's discriminator activations, choosing k from the data.

Features are taken at one common depth of D that every client's activations reach through the
server's shared weights (``common_feature_depth``), so clients are grouped by their data, not by
where their cuts happen to fall (a pitfall of the authors' code, where clusters followed cuts).

Two rules:

* ``neighbour_affinity`` + ``spectral_clusters`` (the default, ``cluster_on: samples``): from
  each client's set of per-sample activations. The nearest neighbours of a client's samples among
  the *other* clients' samples fall in clients of the same domain, whichever classes each holds,
  so label skew does not move the graph the way it moves a mean; k is the eigengap of the graph.
* ``cluster_clients`` (``cluster_on: means``, and HFL-GAN's edges): k-means on one vector per
  client, k by silhouette. It separates domains on IID data, not under label skew.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import eigh
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
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
    eigenvalues: tuple[float, ...] = ()  # spectral rule: the affinity graph's largest eigenvalues


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


def neighbour_affinity(samples: list[np.ndarray], neighbours: int = 10, dims: int = 20,
                       seed: int = 0) -> np.ndarray:
    """(n, n) symmetric affinity between clients from their per-sample activations.

    The samples of all clients are pooled and reduced to their ``dims`` principal components;
    for every sample of client i its ``neighbours`` nearest samples among the *other* clients'
    samples vote for their owners. ``A[i, j]`` is the share of i's votes that j received divided
    by the share chance gives j (its number of samples among the others'): 1 when i's samples do
    not prefer j, 0 when they never land there, ``(n - 1) / (m - 1)`` when they all land in i's
    m-member group. The affinity is ``(A + A.T) / 2``. A client's class mix decides which of its
    group's clients its samples vote for, hardly whether they stay in the group.
    """
    n = len(samples)
    sets = [np.asarray(s, dtype=np.float32).reshape(len(s), -1) for s in samples]
    if any(len(s) == 0 for s in sets):
        raise ValueError("every client needs at least one sample for the neighbour affinity")
    owner = np.concatenate([np.full(len(s), i) for i, s in enumerate(sets)])
    bounds = np.cumsum([0] + [len(s) for s in sets])  # client i's samples are rows bounds[i]:bounds[i+1]
    x = np.concatenate(sets)
    k = min(neighbours, len(x) - max(len(s) for s in sets))
    if k < 1:
        raise ValueError("the neighbour affinity needs samples from at least two clients")
    # principal axes from at most 4096 of the samples (seeded): the same axes, a fraction of the time
    rows = np.random.default_rng(seed).permutation(len(x))[:4096]
    dims = max(1, min(dims, len(rows) - 1, x.shape[1]))
    z = torch.from_numpy(PCA(dims, random_state=seed).fit(x[rows]).transform(x).astype(np.float32))
    sq = z.square().sum(1)
    votes = np.zeros((n, n))
    for start in range(0, len(z), 2048):  # bounded memory: 2048 rows of distances at a time
        stop = min(start + 2048, len(z))
        # |z_j|^2 - 2 z_i.z_j ranks the j by distance from z_i (|z_i|^2 is the same along a row)
        d = torch.addmm(sq[None, :], z[start:stop], z.T, alpha=-2)
        for i in range(owner[start], owner[stop - 1] + 1):  # only other clients' samples vote
            a, b = max(bounds[i], start), min(bounds[i + 1], stop)
            d[a - start:b - start, bounds[i]:bounds[i + 1]] = float("inf")
        nearest = owner[d.topk(k, largest=False).indices.numpy()]
        np.add.at(votes, (np.repeat(owner[start:stop], k), nearest.ravel()), 1)
    counts = np.bincount(owner, minlength=n).astype(np.float64)
    chance = np.where(np.eye(n, dtype=bool), 0.0, counts[None, :])
    chance /= chance.sum(1, keepdims=True)
    share = votes / votes.sum(1, keepdims=True)
    a = np.divide(share, chance, out=np.zeros_like(share), where=chance > 0)
    return (a + a.T) / 2


def spectral_clusters(affinity: np.ndarray, k: int | str = "auto", max_clusters: int = 8,
                      seed: int = 0) -> ClusterResult:
    """Spectral clustering of an (n, n) affinity (Ng, Jordan and Weiss): the eigenvectors of
    ``D^-1/2 W D^-1/2`` for its k largest eigenvalues, rows normalised, then k-means.

    ``k="auto"``: the eigengap, i.e. the k in 1..min(max_clusters, n - 1) with the largest drop
    ``lambda_k - lambda_(k+1)``. k groups that keep their votes inside give k eigenvalues near 1;
    a graph with no group structure has one eigenvalue 1 and the rest below 0, so k = 1.
    """
    w = np.asarray(affinity, dtype=np.float64)
    n = len(w)
    if n < 2:
        return ClusterResult(np.zeros(n, dtype=int), 1, {}, (1.0,) * n)
    deg = np.maximum(w.sum(1), 1e-12)
    values, vectors = eigh(w / np.sqrt(deg[:, None] * deg[None, :]))
    values, vectors = values[::-1], vectors[:, ::-1]
    top = tuple(round(float(v), 4) for v in values[:min(n, max_clusters + 1)])
    if k == "auto":
        kmax = min(max_clusters, n - 1)
        k = 1 if kmax < 1 else int(np.argmax(values[:kmax] - values[1:kmax + 1])) + 1
    k = min(int(k), n)
    if k == 1:
        return ClusterResult(np.zeros(n, dtype=int), 1, {}, top)
    u = vectors[:, :k] / np.maximum(np.linalg.norm(vectors[:, :k], axis=1, keepdims=True), 1e-12)
    labels = _relabel(_kmeans(u, k, seed))
    return ClusterResult(labels, len(set(labels.tolist())), {}, top)
