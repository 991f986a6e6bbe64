"""Cluster clients from the server's discriminator activations, choosing k from the data.

Features are taken at one common depth of D that every client's activations reach through the
server's shared weights (``common_feature_depth``), so clients are grouped by their data, not by
where their cuts happen to fall (a pitfall of the authors' code, where clusters followed cuts).

Two rules:

* ``neighbour_affinity`` + ``spectral_clusters`` (the default, ``cluster_on: samples``): from
  each client's set of per-sample activations. The nearest neighbours of a client's samples among
  the *other* clients' samples fall in clients of the same domain, whichever classes each holds,
  so label skew does not move the graph the way it moves a mean; k is the eigengap of the graph,
  checked for clusters the eigengap merges or misses (``SEPARATION``, ``MIN_COHESION``).
  ``walk_affinity`` (``federation.graph: walk``, the default) reads the affinity off a random
  walk on the graph of all samples instead, which reaches a domain's other client through a
  client's own samples where one-step votes between a pair of clients are weak.
* ``cluster_clients`` (``cluster_on: means``, and HFL-GAN's edges): k-means on one vector per
  client, k by silhouette. It separates domains on IID data, not under label skew.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse
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
    # spectral rule, k "auto": each cluster's mean affinity among its members (how many times the
    # votes chance gives them they send each other; None for a lone client), and what the rule did
    # when the eigengap alone would have been wrong or when it is not confident ("" otherwise)
    cohesion: tuple[float | None, ...] = ()
    note: str = ""
    # spectral rule, k "auto": the chosen clusters' separation (``separation``; None for k = 1)
    separation: float | None = None


# A cluster is a group of clients that send each other at least this many times the votes chance
# would give them (its mean affinity among members). From the exploration runs of issue 32 (real
# activations; scenarios 1 and 2 with 6 clients of one domain, 5 with 2 x 3, 7 with 4 x 2 highly
# non-IID; seeds 0-4, rounds 3-5): any split of one label-skewed domain 1.03-1.39, true domains
# 2.25-4.94, two domains the eigengap had merged 1.69-1.96. Held-out seeds: docs/results.md.
MIN_COHESION = 2.0

# Clusters are separated when, for every two of them, the mean affinity between their members is
# below SEPARATION times the geometric mean of the two clusters' cohesions. Read on real activations
# (issue 32, 2026-12-06, exploration seeds 0-5 and 100-105): the true domains 0.09-0.47, splits of
# one domain 0.64 and above. Kept since (2026-12-07, 30 seeds, docs/results_files/issue32_ranges.txt)
# the two overlap: domains of two clients 0.05-1.31, the most separated split of one label-skewed
# domain of four clients 0.31-0.97. A k that the eigengap under-counts (groups of two clients) is
# taken when its drop ``lambda_k - lambda_(k+1)`` is at least MIN_GAP_SHARE of the largest drop and
# its clusters are separated. These thresholds were read on the graph of 10 neighbours in 20
# components and kept with the default graph since (5 in 50, chosen on held-out seeds with them);
# its ranges on the same rounds: docs/results_files/issue32_ranges_k5d50.txt.
SEPARATION = 0.55
MIN_GAP_SHARE = 0.5
# k = 1 is flagged as not confident when some split is separated below this, though not below
# SEPARATION: the two-clients domains the rule misses have separation 0.53-0.74 (5h, seeds 201,
# 403, 405; docs/results_files/issue32_pair_misses.txt); one IID domain's most separated split
# 0.92-0.99, a label-skewed one's 0.31-0.97 (issue32_ranges.txt), so label skew is flagged too.
# On the default graph since (5 in 50): 0.89-0.98 and 0.30-0.96 (issue32_ranges_k5d50.txt).
NEAR_SEPARATION = 0.8


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
    partitions: dict[int, np.ndarray] = {}
    for kk in range(2, min(max_clusters, n - 1) + 1):
        labels = _kmeans(x, kk, seed)
        if len(set(labels.tolist())) > 1:
            scores[kk], partitions[kk] = float(silhouette_score(x, labels)), labels
    best = max(scores, key=scores.get, default=None)  # the smallest k on a tie
    if best is None or scores[best] < min_silhouette:
        return ClusterResult(np.zeros(n, dtype=int), 1, scores)
    return ClusterResult(_relabel(partitions[best]), best, scores)


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Number clusters by first appearance, so ids are stable across identical partitions."""
    order = {lab: k for k, lab in enumerate(dict.fromkeys(labels.tolist()))}
    return np.array([order[lab] for lab in labels.tolist()], dtype=int)


# Work bounds of the neighbour graph: at most this many query samples (whose neighbours vote) and
# reference samples (who can be voted for) over all clients, split evenly. Up to 64 clients of 256
# kept samples each, every sample is both (the exact rule); beyond, each client's votes come from
# QUERY_BUDGET / n of its samples (at least MIN_PER_CLIENT), so the distance computation, which was
# quadratic in the number of clients, stays bounded (docs/method.md "Limits", issue 32).
QUERY_BUDGET = 16384
REFERENCE_BUDGET = 65536
MIN_PER_CLIENT = 16


def _subsample(counts: list[int], budget: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Per client, the indices of its samples to use: all of them, or an even share of ``budget``
    (at least ``MIN_PER_CLIENT``) drawn without replacement, in their original order."""
    per = max(MIN_PER_CLIENT, budget // len(counts))
    return [np.arange(m) if m <= per else np.sort(rng.choice(m, per, replace=False)) for m in counts]


# The graph's defaults: each sample's 5 nearest neighbours among the other clients' samples, in the
# pooled samples' 50 principal components. Chosen over 10 neighbours in 20 components (the default
# until 2026-12-07) on held-out seeds 600-605 by a rule fixed before they ran: domains of two clients
# found in 50 of 54 clustered rounds against 39, one label-skewed domain kept whole in 18 of 18
# (both), domains of three clients found in 42 of 42 (docs/results.md, "Two clients per domain").
NEIGHBOURS = 5
COMPONENTS = 50


def _projected(samples: list[np.ndarray], budget: int, dims: int, seed: int, rng: np.random.Generator):
    """The rows the graph is built on: per client all its samples or an even, seeded share of
    ``budget`` (``_subsample``), pooled and projected on ``dims`` principal components fitted on
    at most 4096 of them (seeded: the same axes, a fraction of the time; each client's rows are
    projected where they lie, no copy of them all in one array). Returns (z, each row's client,
    bounds: client i's rows are ``z[bounds[i]:bounds[i + 1]]``)."""
    if any(len(s) == 0 for s in samples):
        raise ValueError("every client needs at least one sample for the neighbour graph")
    sets = [np.asarray(s, dtype=np.float32).reshape(len(s), -1) for s in samples]
    if len(sets) < 2:
        raise ValueError("the neighbour graph needs samples from at least two clients")
    kept = [s if len(i) == len(s) else s[i] for s, i in zip(sets, _subsample([len(s) for s in sets], budget, rng))]
    owner = np.concatenate([np.full(len(s), i) for i, s in enumerate(kept)])
    bounds = np.cumsum([0] + [len(s) for s in kept])
    rows = np.random.default_rng(seed).permutation(bounds[-1])[:4096]
    dims = max(1, min(dims, len(rows) - 1, sets[0].shape[1]))
    pca = PCA(dims, random_state=seed).fit(np.stack([kept[owner[r]][r - bounds[owner[r]]] for r in rows]))
    z = torch.from_numpy(np.concatenate([pca.transform(s) for s in kept]).astype(np.float32))
    return z, owner, bounds


def _nearest(zq: torch.Tensor, z: torch.Tensor, k: int, hide) -> np.ndarray:
    """(len(zq), k): the rows of ``z`` nearest to each row of ``zq``, computed in blocks of query
    rows (at most ~128 MB of distances at a time). ``hide(d, start, stop)`` sets to inf, in the
    block ``d`` of query rows start:stop, the distances to rows that may not be neighbours."""
    sq = z.square().sum(1)
    out = np.empty((len(zq), k), dtype=np.int64)
    step = max(64, min(2048, 2**25 // len(z)))
    block = torch.empty(min(step, len(zq)), len(z))  # one buffer: no page faults per block
    for start in range(0, len(zq), step):
        stop = min(start + step, len(zq))
        # |z_j|^2 - 2 z_i.z_j ranks the j by distance from z_i (|z_i|^2 is the same along a row)
        d = torch.addmm(sq[None, :], zq[start:stop], z.T, alpha=-2, out=block[:stop - start])
        hide(d, start, stop)
        out[start:stop] = d.topk(k, largest=False).indices.numpy()
    return out


def _vote_affinity(votes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``(A + A.T) / 2`` where ``A[i, j]`` is the share of client i's votes (``votes[i, j]``, none
    for itself) that j received over the share chance gives j (its rows among the others');
    a client with no votes has affinity 0 with everyone."""
    n = len(votes)
    chance = np.where(np.eye(n, dtype=bool), 0.0, np.asarray(counts, dtype=np.float64)[None, :])
    chance /= chance.sum(1, keepdims=True)
    total = votes.sum(1, keepdims=True)
    share = np.divide(votes, total, out=np.zeros_like(votes, dtype=np.float64), where=total > 0)
    a = np.divide(share, chance, out=np.zeros_like(share), where=chance > 0)
    return (a + a.T) / 2


def neighbour_affinity(samples: list[np.ndarray], neighbours: int = NEIGHBOURS, dims: int = COMPONENTS,
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
    rng = np.random.default_rng(seed)
    z, owner, bounds = _projected(samples, max_references, dims, seed, rng)
    n, counts = len(bounds) - 1, np.diff(bounds)
    # a client's queries are among its references: rows of z
    query_rows = [bounds[i] + q for i, q in enumerate(_subsample(counts.tolist(), max_queries, rng))]
    q_owner = np.concatenate([np.full(len(q), i) for i, q in enumerate(query_rows)])
    q_bounds = np.cumsum([0] + [len(q) for q in query_rows])  # client i's are rows q_bounds[i]:q_bounds[i+1] of zq
    k = min(neighbours, bounds[-1] - counts.max())  # >= 1: two clients or more (``_projected``)
    zq = z if len(q_owner) == len(owner) else z[torch.from_numpy(np.concatenate(query_rows))]  # all vote, or some

    def other_clients_only(d: torch.Tensor, start: int, stop: int) -> None:
        for i in range(q_owner[start], q_owner[stop - 1] + 1):
            a, b = max(q_bounds[i], start), min(q_bounds[i + 1], stop)
            d[a - start:b - start, bounds[i]:bounds[i + 1]] = float("inf")

    nearest = owner[_nearest(zq, z, k, other_clients_only)]
    votes = np.bincount(np.repeat(q_owner, k) * n + nearest.ravel(), minlength=n * n).reshape(n, n)
    return _vote_affinity(votes.astype(np.float64), counts)


# How the clients' affinity is read off the sample graph: one step of votes between clients
# (``neighbour_affinity``) or a random walk (``walk_affinity``) of WALK_STEPS steps (the best of 1-4
# on issue 32's exploration rounds: research/pair_diffusion.py). The walk is the default since
# 2026-12-07, chosen over the votes on held-out seeds 800-805 by a rule fixed before they ran:
# domains of two clients found in 54 of 54 clustered rounds against 52, one label-skewed domain
# kept whole in 18 of 18 (both), domains of three clients in 42 of 42, 1,000 clients in 3.6 s
# (docs/results.md, "The random walk in the package").
GRAPHS = ("votes", "walk")
GRAPH = "walk"
WALK_STEPS = 2


def walk_affinity(samples: list[np.ndarray], neighbours: int = NEIGHBOURS, dims: int = COMPONENTS,
                  steps: int = WALK_STEPS, seed: int = 0, max_nodes: int = QUERY_BUDGET) -> np.ndarray:
    """(n, n) symmetric affinity between clients from a random walk on the graph of their samples.

    The nodes are the clients' samples (pooled, ``dims`` principal components, as in
    ``neighbour_affinity``); each links to its ``neighbours`` nearest samples among *all* the
    others, its own client's included, and links are made two-way. A walk of ``steps`` steps
    starts evenly on client i's samples, each step to a linked sample chosen uniformly; the mass
    it ends with on client j's samples (j != i) are i's votes for j, normalised by chance as in
    ``neighbour_affinity``. Through its own samples a walk can cross from the classes a client
    holds to its domain's other clients where they hold other classes: a domain of two clients
    with disjoint classes, whose one-step votes barely prefer each other, is reached in two steps
    (docs/results.md, "A random walk on the sample graph"). ``steps=1`` is one-step votes on the
    graph that includes a client's own samples.

    Computed as ``C^T P^steps C`` with sparse matrices (C: each node's client, P: the walk's
    transition matrix). Many clients: the nodes are an even, seeded share of ``max_nodes`` per
    client (all of them while that share covers them), so time and memory grow linearly with
    the number of clients.
    """
    if steps < 1:
        raise ValueError(f"the random walk needs at least one step, got {steps}")
    z, owner, bounds = _projected(samples, max_nodes, dims, seed, np.random.default_rng(seed))
    n, m = len(bounds) - 1, len(z)
    k = min(neighbours, m - 1)

    def not_itself(d: torch.Tensor, start: int, stop: int) -> None:
        d[torch.arange(stop - start), torch.arange(start, stop)] = float("inf")

    nearest = _nearest(z, z, k, not_itself)
    links = sparse.csr_matrix((np.ones(m * k), (np.repeat(np.arange(m), k), nearest.ravel())), shape=(m, m))
    links = ((links + links.T) > 0).astype(np.float64)
    walk = sparse.diags(1.0 / np.asarray(links.sum(1)).ravel()) @ links  # every node has >= k links
    client = sparse.csr_matrix((np.ones(m), (np.arange(m), owner)), shape=(m, n))
    mass = client.T.tocsr()  # (n, m): where client i's walk stands
    for _ in range(steps):
        mass = mass @ walk
    votes = (mass @ client).toarray()
    np.fill_diagonal(votes, 0.0)
    return _vote_affinity(votes, np.diff(bounds))


def cohesion(affinity: np.ndarray, labels: np.ndarray) -> tuple[float | None, ...]:
    """Per cluster, the mean affinity between its members (None for a cluster of one client)."""
    out = []
    for c in range(int(labels.max()) + 1):
        members = np.flatnonzero(labels == c)
        sub = affinity[np.ix_(members, members)]
        out.append(float(sub[~np.eye(len(members), dtype=bool)].mean()) if len(members) > 1 else None)
    return tuple(out)


def separation(affinity: np.ndarray, labels: np.ndarray) -> float | None:
    """The largest, over pairs of clusters, of their members' mean affinity to each other divided by
    the geometric mean of the two clusters' cohesions: near 0 for clusters that never vote for
    each other, near 1 when they do as much as their own members do. None when a cluster is one
    client (no cohesion) or there is one cluster."""
    c = cohesion(affinity, labels)
    if len(c) < 2 or any(v is None or v <= 0 for v in c):
        return None
    worst = 0.0
    for i, j in itertools.combinations(range(len(c)), 2):
        worst = max(worst, float(affinity[np.ix_(labels == i, labels == j)].mean() / np.sqrt(c[i] * c[j])))
    return worst


def _cohesive(c: tuple[float | None, ...]) -> bool:
    return all(v is not None and v >= MIN_COHESION for v in c)


def spectral_clusters(affinity: np.ndarray, k: int | str = "auto", max_clusters: int = 8,
                      seed: int = 0) -> ClusterResult:
    """Spectral clustering of an (n, n) affinity (Ng, Jordan and Weiss): the eigenvectors of
    ``D^-1/2 W D^-1/2`` for its k largest eigenvalues, rows normalised, then k-means.

    ``k="auto"``: the eigengap, i.e. the k in 1..min(max_clusters, n - 1) with the largest drop
    ``lambda_k - lambda_(k+1)``. k groups that keep their votes inside give k eigenvalues near 1;
    a graph with no group structure has one eigenvalue 1 and the rest below 0, so k = 1. Groups of
    two clients keep lower eigenvalues (a client has no affinity with itself), so the eigengap
    under-counts them (issue 32). Three checks follow:

    * k = 1: the largest k whose drop is at least ``MIN_GAP_SHARE`` of the largest and whose
      clusters are separated (``separation`` < ``SEPARATION``) is taken. One domain is rarely
      split so: in 5 of 252 one-domain rounds on real activations (issue 32's exploration rounds,
      docs/results.md), each label-skewed with a client that keeps only 32 samples.
    * k > 1 and every cluster holds two or more clients who send each other at least
      ``MIN_COHESION`` times chance's votes: k stays, and where such a larger, separated k exists
      too, ``note`` says the clustering is not confident (a pair of two-client domains may be merged).
    * k > 1 and a cluster fails that (a weak pair merged with another): the largest larger k whose
      clusters are separated, whatever its drop; else the smallest larger k whose clusters all
      cohere; where none does, k stays and ``note`` says it is not confident.

    k = 1 with a second eigenvalue above 0, or with a split whose separation is below
    ``NEAR_SEPARATION``, is flagged as not confident.
    """
    w = np.asarray(affinity, dtype=np.float64)
    n = len(w)
    if n < 2:
        return ClusterResult(np.zeros(n, dtype=int), 1, {}, (1.0,) * n)
    deg = np.maximum(w.sum(1), 1e-12)
    values, vectors = eigh(w / np.sqrt(deg[:, None] * deg[None, :]))
    values, vectors = values[::-1], vectors[:, ::-1]
    top = tuple(round(float(v), 4) for v in values[:min(n, max_clusters + 1)])

    @functools.cache
    def partition(kk: int) -> np.ndarray:
        if kk == 1:
            return np.zeros(n, dtype=int)
        u = vectors[:, :kk] / np.maximum(np.linalg.norm(vectors[:, :kk], axis=1, keepdims=True), 1e-12)
        return _relabel(_kmeans(u, kk, seed))

    if k != "auto":
        labels = partition(min(int(k), n))
        return ClusterResult(labels, len(set(labels.tolist())), {}, top)
    kmax = min(max_clusters, n - 1)
    gaps = values[:kmax] - values[1:kmax + 1]
    k_eig = 1 if kmax < 1 else int(np.argmax(gaps)) + 1
    labels = partition(k_eig)

    def split_separation(kk: int) -> float | None:
        """``partition(kk)``'s separation; None when k-means left fewer than kk clusters, or where
        ``separation`` gives none (a cluster of one client)."""
        other = partition(kk)
        return separation(w, other) if len(set(other.tolist())) == kk else None

    def finer_separated(min_share: float = MIN_GAP_SHARE) -> tuple[int, np.ndarray, float] | None:
        """The largest k above the eigengap's whose drop is at least ``min_share`` of the
        eigengap's and whose clusters (all of two or more clients) are separated; None if there
        is none. The largest, not the one with the largest drop: a weak pair keeps a low
        eigenvalue, so the k that separates it has a smaller drop than one that merges it."""
        for kk in range(kmax, k_eig, -1):
            if gaps[kk - 1] < min_share * gaps[k_eig - 1]:
                continue
            sep = split_separation(kk)
            if sep is not None and sep < SEPARATION:
                return kk, partition(kk), sep
        return None

    def nearly_separated() -> tuple[int, float] | None:
        """The k > 1 whose clusters (all of two or more clients) are the most separated, and that
        separation, when it is below NEAR_SEPARATION; whatever the drop."""
        best = None
        for kk in range(2, kmax + 1):
            sep = split_separation(kk)
            if sep is not None and sep < NEAR_SEPARATION and (best is None or sep < best[1]):
                best = (kk, sep)
        return best

    def drop(kk: int) -> str:
        return f"its drop {gaps[kk - 1]:.2f} is {gaps[kk - 1] / gaps[k_eig - 1]:.2f} of the largest"

    if k_eig == 1:  # never split by cohesion: within one label-skewed domain, clients that hold the
        # same classes prefer each other too. Groups of two clients keep a low eigenvalue (no self
        # affinity: a pair's is about the share of votes it keeps less the share it sends to one
        # other pair), so the eigengap under-counts them; a k with a large drop whose clusters are
        # separated is taken instead
        finer = finer_separated()
        if finer is not None:
            kk, other, sep = finer
            return ClusterResult(other, kk, {}, top, cohesion(w, other),
                                 f"k = {kk}: the eigengap says 1, which under-counts groups of two clients; "
                                 f"{drop(kk)} and its clusters are separated ({sep:.2f} < {SEPARATION:g})", sep)
        # a positive second eigenvalue is group structure that was not separated (4 domains of 2
        # clients: 0.42-0.56; one domain on real activations: -0.28 to 0.04, synthetic strong
        # label skew: 0.21-0.40), so it is said
        note = "" if values[1] <= 0 else (
            f"not confident: k = 1 by the eigengap, but the second eigenvalue {values[1]:.2f} is above 0 "
            f"(groups the eigengap does not separate, or label skew within one domain)")
        near = None if note else nearly_separated()
        if near is not None:  # the domains of two clients the rule misses look like this (issue 32)
            note = (f"not confident: k = 1, but a split into {near[0]} clusters is nearly separated "
                    f"({near[1]:.2f}, below {NEAR_SEPARATION:g} though not {SEPARATION:g}): domains of two "
                    f"clients, or label skew within one domain (set federation.clusters if the number of "
                    f"domains is known)")
        return ClusterResult(labels, 1, {}, top, (), note)
    found = cohesion(w, labels)
    if _cohesive(found):
        finer = finer_separated()
        note = "" if finer is None else (
            f"not confident: k = {k_eig} by the eigengap, but {finer[0]} clusters are separated too "
            f"({finer[2]:.2f} < {SEPARATION:g}; {drop(finer[0])}): two domains of two clients each may "
            f"be merged (set federation.clusters if the number of domains is known)")
        return ClusterResult(labels, len(set(labels.tolist())), {}, top, found, note, separation(w, labels))
    # a cluster keeps too little: a weak pair merged into another cluster. A larger k whose clusters
    # are separated is taken first, whatever its drop (the weak pair's eigenvalue sits near 0)
    finer = finer_separated(0.0)
    if finer is not None:
        kk, other, sep = finer
        return ClusterResult(other, kk, {}, top, cohesion(w, other),
                             f"k = {kk}: the eigengap's k = {k_eig} left a cluster below {MIN_COHESION:g}x "
                             f"chance's votes ({_weakest(found)}); the {kk} clusters are separated "
                             f"({sep:.2f} < {SEPARATION:g})", sep)
    for kk in range(k_eig + 1, kmax + 1):
        other = partition(kk)
        c = cohesion(w, other)
        if len(set(other.tolist())) == kk and _cohesive(c):
            return ClusterResult(other, kk, {}, top, c,
                                 f"k = {kk}: the eigengap's k = {k_eig} left a cluster below {MIN_COHESION:g}x "
                                 f"chance's votes ({_weakest(found)}); every cluster of {kk} keeps >= "
                                 f"{MIN_COHESION:g}x among its members", separation(w, other))
    return ClusterResult(labels, len(set(labels.tolist())), {}, top, found,
                         f"not confident: k = {k_eig} by the eigengap, but {_weakest(found)} and no k up to "
                         f"{kmax} gives clusters that all keep >= {MIN_COHESION:g}x chance's votes",
                         separation(w, labels))


def _weakest(c: tuple[float | None, ...]) -> str:
    lone = [i for i, v in enumerate(c) if v is None]
    if lone:
        return f"cluster {lone[0]} is one client"
    i = int(np.argmin(c))
    return f"cluster {i} keeps {c[i]:.2f}x"
