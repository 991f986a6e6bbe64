"""The server's view of each client for clustering, from the D activation it computes at the
common depth over every real batch of a round's last local epoch: running mean and variance (the
KLD scores and the ``means`` clustering rule) and the newest per-sample activations (the
``samples`` rule, which label skew does not fool; see ``clustering.neighbour_affinity``): 256 per
client up to 256 clients, fewer beyond (``samples_to_keep``), so memory grows linearly."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from huscf.federation.clustering import MIN_PER_CLIENT, REFERENCE_BUDGET

# per-sample activations kept per client for the neighbour graph, and the most values kept per
# sample (wider activations are average-pooled spatially down to this: 2048 = 128 channels x 4 x 4)
SAMPLES_PER_CLIENT = 256
MAX_SAMPLE_DIM = 2048


def samples_to_keep(n: int) -> int:
    """Per-sample activations kept per client in a fleet of ``n``: ``SAMPLES_PER_CLIENT`` up to
    256 clients, then an even share of the neighbour graph's reference budget (at least its
    minimum per client), so that the kept samples, and the graph built from them, grow linearly
    with the number of clients (``clustering.REFERENCE_BUDGET``; issue 32)."""
    return min(SAMPLES_PER_CLIENT, max(MIN_PER_CLIENT, REFERENCE_BUDGET // max(1, n)))


def sample_vectors(act: torch.Tensor, max_dim: int = MAX_SAMPLE_DIM) -> torch.Tensor:
    """(B, C, H, W) or (B, F) activations -> (B, <= max_dim) float32 rows: a (B, C, H, W)
    activation wider than ``max_dim`` is average-pooled to the largest square grid that fits
    (at least one value per channel)."""
    a = act.detach().float()
    if a.dim() == 4 and a[0].numel() > max_dim:
        side = max(1, min(a.shape[-1], int((max_dim // a.shape[1]) ** 0.5)))
        a = F.adaptive_avg_pool2d(a, side)
    # a copy: ``act`` may be a row of every client's stacked activations or a CUDA graph's
    # output buffer, which the next replay overwrites
    return a.reshape(len(a), -1).clone()


class FeatureStats:
    """Per-client running mean and variance of the server's D activation at the common depth,
    over every real batch of an epoch, and the client's newest ``keep`` per-sample activations
    (from its last batches: batches are shuffled, so a random subset of its data; default
    ``samples_to_keep(n)``)."""

    def __init__(self, n: int, keep: int | None = None):
        self.sum: list[torch.Tensor | None] = [None] * n
        self.sumsq: list[torch.Tensor | None] = [None] * n
        self.count = np.zeros(n, dtype=np.int64)
        self.keep = samples_to_keep(n) if keep is None else keep
        self.kept: list[list[torch.Tensor]] = [[] for _ in range(n)]

    def add(self, client: int, act: torch.Tensor) -> None:
        # summed where the activation is (float64): no device-to-host copy and sync per batch
        a = act.detach().to(torch.float64)
        s, q = a.sum(0), a.square().sum(0)
        first = self.sum[client] is None
        self.sum[client] = s if first else self.sum[client].add_(s)
        self.sumsq[client] = q if first else self.sumsq[client].add_(q)
        self.count[client] += len(a)
        if self.keep:
            kept = self.kept[client]
            kept.append(sample_vectors(act))
            while sum(len(t) for t in kept) - len(kept[0]) >= self.keep:
                kept.pop(0)  # the oldest batch is no longer needed to hold ``keep`` samples

    def seen(self) -> list[int]:
        """The clients that contributed at least one batch."""
        return np.flatnonzero(self.count > 0).tolist()

    def _ids(self, clients: list[int] | None) -> list[int]:
        ids = list(range(len(self.count))) if clients is None else list(clients)
        if any(self.count[i] == 0 for i in ids):
            raise RuntimeError("a client contributed no features this epoch")
        return ids

    def mean_and_noise(self, clients: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(n, C, H, W) means, and the variance of each mean (sample variance / count), for all
        clients or for ``clients`` (in that order)."""
        ids = self._ids(clients)
        mean = np.stack([(self.sum[i] / self.count[i]).cpu().numpy() for i in ids])
        sq = np.stack([(self.sumsq[i] / self.count[i]).cpu().numpy() for i in ids])
        return mean, np.maximum(sq - mean**2, 0) / self.count[ids].reshape(-1, *([1] * (mean.ndim - 1)))

    def samples(self, clients: list[int] | None = None) -> list[np.ndarray] | None:
        """Each client's newest (up to ``keep``) per-sample activations, (m_i, F) float32; None
        when none are kept."""
        return [torch.cat(self.kept[i])[-self.keep:].cpu().numpy() for i in self._ids(clients)] if self.keep else None
