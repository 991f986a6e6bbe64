"""Aggregation policies, each a small class with one hook (in the spirit of Flower strategies).

``aggregate(state) -> Aggregation`` decides, from what the server saw this round, which clients
are averaged together (groups) and with which weights. ``averaging.apply_aggregation`` then does
the averaging. Policies never see raw data or labels; the true domain of a client is not an
input (it is used only for reporting, by the engine).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

import numpy as np

from huscf.federation.clustering import (COMPONENTS, GRAPH, GRAPHS, NEIGHBOURS, WALK_STEPS, cluster_clients,
                                         neighbour_affinity, spectral_clusters, walk_affinity, whiten)
from huscf.federation.weights import kld_scores, kld_weights, size_weights, spatial_distributions


@dataclass(frozen=True)
class RoundState:
    """What the server knows at the end of a round."""

    round: int  # 0-based
    sizes: np.ndarray  # (n,) training set size n_i per client
    features: np.ndarray | None  # (n, C, H, W) mean server-side D activation per client, common depth
    feature_noise: np.ndarray | None = None  # (n, C, H, W) variance of that batch mean (var / batch)
    samples: list[np.ndarray] | None = None  # per client, (m_i, F) per-sample activations at that depth
    seed: int = 0
    # (n, P) each client's flattened discriminator: what a whole-model baseline's server receives
    client_params: np.ndarray | None = None
    # (n, m, F) each client's generator on the same m probe inputs (a strategy with ``probe`` = m:
    # a whole-model baseline's server holds the generators; ``federation.synthetic``)
    client_samples: np.ndarray | None = None


@dataclass(frozen=True)
class Aggregation:
    groups: np.ndarray  # (n,) cluster id per client
    cluster_weights: np.ndarray  # (n,) weights for client-side segments, sum to 1 within each group
    global_weights: np.ndarray  # (n,) weights for the server body, sum to 1
    info: dict = field(default_factory=dict)  # JSON-able details for metrics.jsonl
    # (n, n) row-stochastic personalised mixing of client-side blocks (client i gets sum_j m_ij theta_j),
    # or one such matrix per net ({"G": ..., "D": ...}); when set it replaces the group averages
    mixing: np.ndarray | dict[str, np.ndarray] | None = None

    def expand(self, clients: list[int], n: int) -> "Aggregation":
        """This aggregation over ``clients`` written out for all ``n`` clients: an absent client
        has group -1 and weight 0 (for the metrics; absent clients were not averaged)."""
        groups = np.full(n, -1, dtype=int)
        cw, gw = np.zeros(n), np.zeros(n)
        groups[clients], cw[clients], gw[clients] = self.groups, self.cluster_weights, self.global_weights
        return Aggregation(groups, cw, gw, self.info | {"absent": sorted(set(range(n)) - set(clients))})


class Strategy(Protocol):
    """A round-end policy: every strategy (and every baseline's) has these."""

    name: str
    uses_client_params: bool  # True: it reads RoundState.client_params (whole-model baselines only)

    def aggregate(self, state: RoundState) -> Aggregation: ...


class FedAvg:
    """One group, weights proportional to dataset size (McMahan et al.)."""

    name = "fedavg"
    uses_client_params = False  # reads RoundState.client_params (whole-model baselines only)

    def aggregate(self, state: RoundState) -> Aggregation:
        w = size_weights(state.sizes)
        return Aggregation(np.zeros(len(w), dtype=int), w, w, {"phase": "fedavg", "k": 1})


class ClusteredKLD:
    """HuSCF-GAN: clusters from D activations, KLD-weighted averaging within clusters, a globally
    KLD-weighted server body; plain FedAvg during the first ``warmup_rounds``.

    ``cluster_on="samples"``: spectral clustering of the clients' neighbour graph built from their
    per-sample activations (k by eigengap; robust to label skew). ``"means"``: k-means on the
    whitened mean activation (k by silhouette, ``min_silhouette``; the rule before, which label
    skew defeats). Without per-sample activations in the ``RoundState`` the means are used.
    ``graph``: how the samples' graph gives the clients' affinity, ``"walk"`` (``walk_affinity``,
    ``walk_steps`` steps; the default) or ``"votes"`` (``neighbour_affinity``).
    """

    name = "clustered_kld"
    uses_client_params = False

    def __init__(self, *, alpha: float = 1.0, warmup_rounds: int = 2, clusters: int | str = "auto",
                 max_clusters: int = 8, min_silhouette: float = 0.35,
                 kld_direction: str = "client_to_cluster", cluster_on: str = "samples", neighbours: int = NEIGHBOURS,
                 components: int = COMPONENTS, graph: str = GRAPH, walk_steps: int = WALK_STEPS):
        if graph not in GRAPHS:
            raise ValueError(f"graph must be one of {', '.join(GRAPHS)}, got {graph!r}")
        self.alpha, self.warmup_rounds = alpha, warmup_rounds
        self.clusters, self.max_clusters, self.min_silhouette = clusters, max_clusters, min_silhouette
        self.kld_direction, self.cluster_on, self.neighbours = kld_direction, cluster_on, neighbours
        self.components, self.graph, self.walk_steps = components, graph, walk_steps

    @classmethod
    def from_config(cls, fed) -> "ClusteredKLD":
        """From a ``FederationConfig`` section (its keys of the same names)."""
        return cls(**{key: getattr(fed, key) for key in inspect.signature(cls).parameters})

    def affinity(self, samples: list, seed: int, exact: bool = False) -> np.ndarray:
        """The clients' (n, n) affinity from their per-sample activations, by ``graph``; ``exact``:
        every sample in the graph, no work budgets (the benchmarks' reference)."""
        if self.graph == "walk":
            budget = {"max_nodes": 2**62} if exact else {}
            return walk_affinity(samples, self.neighbours, self.components, self.walk_steps, seed=seed, **budget)
        budget = {"max_queries": 2**62, "max_references": 2**62} if exact else {}
        return neighbour_affinity(samples, self.neighbours, self.components, seed=seed, **budget)

    def cluster(self, state: RoundState):
        """The clusters of this round's clients and what the rule scored, for the metrics."""
        if self.cluster_on == "samples" and state.samples is not None and len(state.samples) > 1:
            result = spectral_clusters(self.affinity(state.samples, state.seed), self.clusters, self.max_clusters,
                                       state.seed)
            scored = {"rule": "samples", "graph": self.graph, "eigenvalues": list(result.eigenvalues)}
            if result.cohesion:
                scored["cohesion"] = [None if v is None else round(v, 3) for v in result.cohesion]
            if result.separation is not None:
                scored["separation"] = round(result.separation, 3)
            if result.note:
                scored["clustering_note"] = result.note
            return result, scored
        n = len(state.sizes)
        feats = np.asarray(state.features, dtype=np.float64)
        x = feats.reshape(n, -1) if state.feature_noise is None else whiten(feats, state.feature_noise)
        result = cluster_clients(x, self.clusters, self.max_clusters, self.min_silhouette, state.seed)
        return result, {"rule": "means", "silhouette": {str(k): round(v, 4) for k, v in result.silhouette.items()}}

    def aggregate(self, state: RoundState) -> Aggregation:
        n = len(state.sizes)
        if state.round < self.warmup_rounds:
            return replace(FedAvg().aggregate(state), info={"phase": "warmup", "k": 1})
        result, scored = self.cluster(state)
        p = spatial_distributions(np.asarray(state.features, dtype=np.float64))
        kld = kld_scores(p, result.labels, self.kld_direction)
        kld_global = kld_scores(p, np.zeros(n, dtype=int), self.kld_direction)
        return Aggregation(
            groups=result.labels, cluster_weights=kld_weights(state.sizes, kld, result.labels, self.alpha),
            global_weights=kld_weights(state.sizes, kld_global, np.zeros(n, dtype=int), self.alpha),
            info={"phase": "clustered", "k": result.k, **scored,
                  "kld": kld.round(6).tolist(), "kld_global": kld_global.round(6).tolist()})


# ``federation.strategy``'s values (the config takes its allowed names from here): each builds its
# strategy from the ``FederationConfig`` section
STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "clustered_kld": ClusteredKLD.from_config,
    "fedavg": lambda fed: FedAvg(),
}


def make_strategy(fed) -> Strategy:
    """Build the strategy named in a ``FederationConfig`` section."""
    return STRATEGIES[fed.strategy](fed)
