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


# Work bounds of the neighbour graph: at most this many query samples (whose neighbours vote) and
# reference samples (who can be voted for) over all clients, split evenly. Up to 64 clients of 256
# kept samples each, every sample is both (the exact rule); beyond, each client's votes come from
# QUERY_BUDGET / n of its samples (at least MIN_PER_CLIENT), so the distance computation, which was
# quadratic in the number of clients, stays bounded (docs/performance.md, issue 32).
QUERY_BUDGET = 16384
REFERENCE_BUDGET = 65536
MIN_PER_CLIENT = 16


def _subsample(counts: list[int], budget: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Per client, the indices of its samples to use: all of them, or an even share of ``budget``
    (at least ``MIN_PER_CLIENT``) drawn without replacement, in their original order."""
    per = max(MIN_PER_CLIENT, budget // len(counts))
    return [np.arange(m) if m <= per else np.sort(rng.choice(m, per, replace=False)) for m in counts]


def neighbour_affinity(samples: list[np.ndarray], neighbours: int = 10, dims: int = 20,
                       seed: int = 0, max_queries: int = QUERY_BUDGET,
                       max_references: int = REFERENCE_BUDGET) -> np.ndarray:
    """(n, n) symmetric affinity between clients from their per-sample activations.

    The samples of all clients are pooled and reduced to their ``dims`` principal components;
    for every sample of client i its ``neighbours`` nearest samples among the *other* clients'
    samples vote for their owners. ``A[i, j]`` is the share of i's votes that j received divided
    by the share chance gives j (its number of samples among the others'): 1 when i's samples do
    not prefer j, 0 when they never land there, ``(n - 1) / (m - 1)`` when they all land in i's
    m-member group. The affinity is ``(A + A.T) / 2``. A client's class mix decides which of its
    group's clients its samples vote for, hardly whether they stay in the group.

    Many clients: the voting samples (queries) and the samples voted for (references) are each an
    even, seeded share of ``max_queries`` and ``max_references`` per client (all of them while
    that share covers them), so time and memory grow linearly with the number of clients.
    """
    n = len(samples)
    sets = [np.asarray(s, dtype=np.float32).reshape(len(s), -1) for s in samples]
    if any(len(s) == 0 for s in sets):
        raise ValueError("every client needs at least one sample for the neighbour affinity")
    rng = np.random.default_rng(seed)
    refs = [s if len(i) == len(s) else s[i] for s, i in zip(sets, _subsample([len(s) for s in sets],
                                                                              max_references, rng))]
    owner = np.concatenate([np.full(len(s), i) for i, s in enumerate(refs)])
    bounds = np.cumsum([0] + [len(s) for s in refs])  # client i's references are rows bounds[i]:bounds[i+1]
    # a client's queries are among its references: rows of z
    query_rows = [bounds[i] + q for i, q in enumerate(_subsample([len(s) for s in refs], max_queries, rng))]
    q_owner = np.concatenate([np.full(len(q), i) for i, q in enumerate(query_rows)])
    k = min(neighbours, bounds[-1] - max(len(s) for s in refs))
    if k < 1:
        raise ValueError("the neighbour affinity needs samples from at least two clients")
    # principal axes from at most 4096 of the samples (seeded): the same axes, a fraction of the
    # time; each client's samples are projected where they lie (no copy of them all in one array)
    rows = np.random.default_rng(seed).permutation(bounds[-1])[:4096]
    dims = max(1, min(dims, len(rows) - 1, sets[0].shape[1]))
    pca = PCA(dims, random_state=seed).fit(np.stack([refs[owner[r]][r - bounds[owner[r]]] for r in rows]))
    z = torch.from_numpy(np.concatenate([pca.transform(s) for s in refs]).astype(np.float32))
    all_vote = len(q_owner) == len(owner)  # every reference also votes
    zq = z if all_vote else z[torch.from_numpy(np.concatenate(query_rows))]
    sq = z.square().sum(1)
    votes = np.zeros((n, n))
    step = max(64, min(2048, 2**25 // len(z)))  # query rows per block: at most ~128 MB of distances
    block = torch.empty(min(step, len(zq)), len(z))  # one buffer: no page faults per block
    for start in range(0, len(zq), step):
        stop = min(start + step, len(zq))
        # |z_j|^2 - 2 z_i.z_j ranks the j by distance from z_i (|z_i|^2 is the same along a row)
        d = torch.addmm(sq[None, :], zq[start:stop], z.T, alpha=-2, out=block[:stop - start])
        q0 = np.searchsorted(q_owner, q_owner[start])  # first query row of the block's first client
        for i in range(q_owner[start], q_owner[stop - 1] + 1):  # only other clients' samples vote
            a = max(q0, start)
            b = min(q0 + len(query_rows[i]), stop)
            d[a - start:b - start, bounds[i]:bounds[i + 1]] = float("inf")
            q0 += len(query_rows[i])
        nearest = owner[d.topk(k, largest=False).indices.numpy()]
        votes += np.bincount(np.repeat(q_owner[start:stop], k) * n + nearest.ravel(), minlength=n * n).reshape(n, n)
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
