"""How alike two clients are, judged by what their generators make (PFL-GAN, HFL-GAN).

Weights are a poor witness of a client's data under label skew (docs/baselines.md): two
clients of one domain that miss different classes have weights as far apart as two of different
domains. Their generators' samples are not: PFL-GAN's server learns its client similarity from
synthetic data, and HFL-GAN's edges here compare the generators they receive the same way.

* ``generator_samples``: a client's whole generator on given noise and labels, in eval mode as
  every sampler in huscf (its BatchNorm normalises with the batch's statistics either way).
* ``mmd2``: the squared maximum mean discrepancy between every two clients' samples, unbiased,
  with an RBF kernel whose bandwidth is the median squared distance of all samples pooled
  (Gretton et al. 2012, JMLR 13: the estimator and the heuristic).
* ``peer_weights``: from those distances, client i's weight on peer j, exp(-d_ij / (T med)) over
  its peers, normalised; ``med`` the median distance between two different clients, so that the
  temperature T is scale-free.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics.pairwise import euclidean_distances

from huscf.split.segments import SplitGAN


@torch.no_grad()
def generator_samples(model: SplitGAN, client: int, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Client ``client``'s generator (its blocks and the server's, assembled) on ``(z, y)``, in eval
    mode, on the CPU in float32: (len(z), C, H, W)."""
    if len(z) < 2:  # the generator's first BatchNorm normalises with the batch's statistics: pad to 2
        pad = 2 - len(z)
        return generator_samples(model, client, torch.cat([z, z.new_zeros(pad, z.shape[1])]),
                                 torch.cat([y, y.new_zeros(pad)]))[: len(z)]
    g = model.assemble(client, "G").eval()
    p = next(g.parameters())
    return g(z.to(p.device, p.dtype), y.to(p.device)).float().cpu()


def mmd2(samples: list[np.ndarray]) -> np.ndarray:
    """(n, n) squared MMD between every two clients' samples (each (m_i, F), m_i >= 2); 0 on the
    diagonal, clipped at 0 (the unbiased estimate can dip below it when two samples are alike)."""
    x = np.concatenate([np.asarray(s, dtype=np.float64).reshape(len(s), -1) for s in samples])
    d2 = euclidean_distances(x, squared=True)
    off = d2[~np.eye(len(x), dtype=bool)]
    bandwidth = float(np.median(off)) if off.size and np.median(off) > 0 else 1.0
    k = np.exp(-d2 / bandwidth)
    edges = np.cumsum([0, *(len(s) for s in samples)])
    blocks = [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]
    n = len(samples)
    within = np.array([(k[s, s].sum() - np.trace(k[s, s])) / ((s.stop - s.start) * (s.stop - s.start - 1))
                       for s in blocks])
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = max(within[i] + within[j] - 2 * k[blocks[i], blocks[j]].mean(), 0.0)
    return out


def peer_weights(d2: np.ndarray, temperature: float) -> np.ndarray:
    """(n, n) row-stochastic weights over peers (0 on the diagonal): w_ij ∝ exp(-d_ij / (T med)),
    med the median of the distances between different clients (uniform when all are equal)."""
    n = len(d2)
    off = ~np.eye(n, dtype=bool)
    med = float(np.median(d2[off])) if n > 1 else 0.0
    logits = np.where(off, -np.asarray(d2, dtype=np.float64) / (temperature * med) if med > 0 else 0.0, -np.inf)
    w = np.exp(logits - logits.max(1, keepdims=True))
    return w / w.sum(1, keepdims=True)
