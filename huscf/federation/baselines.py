"""Round-end aggregation of the baseline methods (the same hook as ``strategies``).

These strategies see what their methods' servers see: the clients' whole models
(``RoundState.client_samples``: what each client's generator makes on the same probe inputs),
never data.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import AgglomerativeClustering

from huscf.federation.strategies import Aggregation, RoundState
from huscf.federation.synthetic import mmd2
from huscf.federation.weights import size_weights


class NoAggregation:
    """Local-only training (and the centralised baseline): every client keeps its own model."""

    name = "none"
    uses_client_params = False

    def aggregate(self, state: RoundState) -> Aggregation:
        n = len(state.sizes)
        return Aggregation(np.arange(n), np.ones(n), size_weights(state.sizes), {"phase": "local", "k": n})


class EdgeHierarchy:
    """HFL-GAN's round end (Petch et al. 2024, as its abstract states it: clients clustered
    dynamically to edge servers, several generators, aggregation at non-identical stages; the
    details are huscf's, docs/baselines.md).

    1. Every round (the clients having taken equal local steps: ``HFLGAN.prepare``) the server
       groups the clients into ``edges`` edge servers by what their generators make: the squared
       MMD between their samples on the same ``probe`` inputs (``federation.synthetic``), then
       average-linkage agglomerative clustering on it.
    2. Edge stage: each edge averages its clients by data size. The nets not in ``global_nets``
       stop here: one generator per edge.
    3. Global stage: the nets in ``global_nets`` (default D) are averaged over the edges' averages,
       one equal vote per edge, and sent to every client.
    """

    name = "edges"
    uses_client_params = False

    def __init__(self, edges: int = 2, global_nets: tuple[str, ...] = ("D",), probe: int = 64):
        self.edges, self.global_nets, self.probe = edges, tuple(global_nets), probe

    def aggregate(self, state: RoundState) -> Aggregation:
        n = len(state.sizes)
        d2 = mmd2(list(state.client_samples))
        k = min(self.edges, n)
        edges = (np.zeros(n, dtype=int) if k == 1 else
                 AgglomerativeClustering(k, metric="precomputed", linkage="average").fit_predict(d2))
        within = size_weights(state.sizes, edges)  # each edge's average, by data size
        edge_mix = (edges[:, None] == edges[None, :]) * within[None, :]  # row i: i's edge average
        global_row = within / len(np.unique(edges))  # the edges' averages, one vote each
        mixing = {net: np.tile(global_row, (n, 1)) if net in self.global_nets else edge_mix for net in ("G", "D")}
        info = {"phase": "edges", "k": int(len(np.unique(edges))), "edges": edges.tolist(),
                "global_nets": list(self.global_nets), "mmd2": d2.round(6).tolist()}
        return Aggregation(edges, within, global_row, info, mixing=mixing)
