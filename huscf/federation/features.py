"""The server's view of each client for clustering: running statistics of the D activation it
computes at the common depth, over every real batch of a round's last local epoch."""

from __future__ import annotations

import numpy as np
import torch


class FeatureStats:
    """Per-client running mean and variance of the server's D activation at the common depth,
    over every real batch of an epoch: the server's view of each client for clustering."""

    def __init__(self, n: int):
        self.sum: list[torch.Tensor | None] = [None] * n
        self.sumsq: list[torch.Tensor | None] = [None] * n
        self.count = np.zeros(n, dtype=np.int64)

    def add(self, client: int, act: torch.Tensor) -> None:
        # summed where the activation is (float64): no device-to-host copy and sync per batch
        a = act.detach().to(torch.float64)
        s, q = a.sum(0), a.square().sum(0)
        if self.sum[client] is None:
            self.sum[client], self.sumsq[client] = s, q
        else:
            self.sum[client] += s
            self.sumsq[client] += q
        self.count[client] += len(a)

    def seen(self) -> list[int]:
        """The clients that contributed at least one batch."""
        return np.flatnonzero(self.count > 0).tolist()

    def mean_and_noise(self, clients: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(n, C, H, W) means, and the variance of each mean (sample variance / count), for all
        clients or for ``clients`` (in that order)."""
        ids = range(len(self.count)) if clients is None else clients
        if any(self.count[i] == 0 for i in ids):
            raise RuntimeError("a client contributed no features this epoch")
        mean = np.stack([(self.sum[i] / self.count[i]).cpu().numpy() for i in ids])
        sq = np.stack([(self.sumsq[i] / self.count[i]).cpu().numpy() for i in ids])
        count = self.count[list(ids)]
        return mean, np.maximum(sq - mean**2, 0) / count.reshape(-1, *([1] * (mean.ndim - 1)))
