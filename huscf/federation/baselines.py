"""Round-end aggregation of the baseline methods (the same hook as ``strategies``).

These strategies see what their methods' servers see: the clients' whole models
(``RoundState.client_params``: one flattened discriminator per client), never data.
"""

from __future__ import annotations

import numpy as np

from huscf.federation.clustering import cluster_clients
from huscf.federation.strategies import Aggregation, RoundState
from huscf.federation.weights import size_weights


def _centered(params: np.ndarray) -> np.ndarray:
    """Client parameter vectors minus their mean: what differs between clients."""
    x = np.asarray(params, dtype=np.float64)
    return x - x.mean(0, keepdims=True)


class NoAggregation:
    """Local-only training (and the centralised baseline): every client keeps its own model."""

    name = "none"
    uses_client_params = False

    def aggregate(self, state: RoundState) -> Aggregation:
        n = len(state.sizes)
        return Aggregation(np.arange(n), np.ones(n), size_weights(state.sizes), {"phase": "local", "k": n})


class HierarchicalFedAvg:
    """HFL-GAN-style two-level averaging: clients are clustered to edge servers each round (k-means
    on their centred discriminator weights, k by silhouette as in HuSCF-GAN); each edge averages its
    clients by data size; the global server averages the edge models with one equal vote per edge
    and sends the result to everyone."""

    name = "hierarchical"
    uses_client_params = True

    def __init__(self, max_edges: int = 8, min_silhouette: float = 0.35):
        self.max_edges, self.min_silhouette = max_edges, min_silhouette

    def aggregate(self, state: RoundState) -> Aggregation:
        n = len(state.sizes)
        edges = cluster_clients(_centered(state.client_params), "auto", self.max_edges, self.min_silhouette, state.seed)
        sizes = np.asarray(state.sizes, dtype=np.float64)
        weights = np.zeros(n)
        for e in range(edges.k):
            members = edges.labels == e
            weights[members] = sizes[members] / sizes[members].sum() / edges.k
        info = {"phase": "hierarchical", "k": edges.k, "edges": edges.labels.tolist(),
                "silhouette": {str(k): round(v, 4) for k, v in edges.silhouette.items()}}
        # one global model for everyone: a single group whose weights are edge-then-global
        return Aggregation(np.zeros(n, dtype=int), weights, weights, info)


class PersonalizedSimilarity:
    """PFL-GAN-style personalised aggregation: client i receives sum_j W_ij theta_j with
    W_ij proportional to n_j exp(s_ij / temperature), s_ij the cosine similarity of the clients'
    centred discriminator weights (the similarity is learned from the models, not from data)."""

    name = "personalized"
    uses_client_params = True

    def __init__(self, temperature: float = 0.1):
        self.temperature = temperature

    def aggregate(self, state: RoundState) -> Aggregation:
        n = len(state.sizes)
        x = _centered(state.client_params)
        unit = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)
        sim = unit @ unit.T
        logits = sim / self.temperature
        w = np.exp(logits - logits.max(1, keepdims=True)) * np.asarray(state.sizes, dtype=np.float64)[None, :]
        mixing = w / w.sum(1, keepdims=True)
        info = {"phase": "personalized", "k": n, "similarity": sim.round(4).tolist(),
                "self_weight": np.diag(mixing).round(4).tolist()}
        return Aggregation(np.arange(n), np.ones(n), size_weights(state.sizes), info, mixing=mixing)
