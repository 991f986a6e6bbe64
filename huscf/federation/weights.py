"""KLD scores of clients against their cluster and the weights n_i * exp(-alpha * KLD_i).

P_i is one distribution per channel: the softmax over spatial positions of client i's mean
server-side D activation (C, H, W) -> (C, H*W). Q_i is the mean of P_j over the *other* members
of its group. KLD_i is the KL divergence averaged over channels. huscf uses KL(P_i || Q_i)
("client_to_cluster": how surprising client i is to its cluster); the authors' code, through
torch's ``kl_div`` argument order, computes KL(Q_i || P_i) ("cluster_to_client"). Both are offered.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp, rel_entr, softmax

from huscf.errors import HuscfError


def spatial_distributions(mean_activations: np.ndarray) -> np.ndarray:
    """(n, C, H, W) or (n, C) -> (n, C, positions) with a softmax over positions per channel."""
    a = np.asarray(mean_activations, dtype=np.float64)
    return softmax(a.reshape(a.shape[0], a.shape[1], -1), axis=2)


def kld_scores(p: np.ndarray, groups: np.ndarray, direction: str = "client_to_cluster") -> np.ndarray:
    """KLD_i of each client against the mean of the other members of its group (0 when alone)."""
    out, groups = np.zeros(len(p)), np.asarray(groups)
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        if len(members) < 2:
            continue
        total = p[members].sum(axis=0)
        for i in members:
            q = (total - p[i]) / (len(members) - 1)
            a, b = (p[i], q) if direction == "client_to_cluster" else (q, p[i])
            out[i] = rel_entr(a, b).sum(axis=-1).mean()
    return out


def kld_weights(sizes: np.ndarray, kld: np.ndarray, groups: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """w_i = n_i * exp(-alpha * KLD_i), normalised to sum to 1 within each group.

    Computed in log space (``log n_i - alpha KLD_i``, normalised with logsumexp), so the weights
    stay finite and sum to 1 however large alpha * KLD is (in linear space, exp underflows to 0
    for every member once alpha * KLD passes about 745, and 0 / 0 is NaN). A non-finite KLD or a
    size that is not positive is an error, not a weight."""
    sizes, kld = np.asarray(sizes, dtype=np.float64), np.asarray(kld, dtype=np.float64)
    if not np.isfinite(alpha):
        raise HuscfError(f"KLD weights need a finite alpha, got {alpha}")
    bad = np.flatnonzero(~np.isfinite(kld) | ~(sizes > 0))
    if bad.size:
        raise HuscfError(f"KLD weights need finite KLD scores and positive sizes; client(s) {bad.tolist()} have "
                         f"KLD {kld[bad].tolist()} and size {sizes[bad].tolist()} (non-finite activations?)")
    log_raw = np.log(sizes) - alpha * kld
    w, groups = np.empty_like(log_raw), np.asarray(groups)
    for g in np.unique(groups):
        m = groups == g
        w[m] = np.exp(log_raw[m] - logsumexp(log_raw[m]))
    return w


def size_weights(sizes: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """w_i = n_i / sum_j n_j: FedAvg's weights; with ``groups``, the sum over i's group only."""
    s = np.asarray(sizes, dtype=np.float64)
    if groups is None:
        return s / s.sum()
    w, groups = np.empty_like(s), np.asarray(groups)
    for g in np.unique(groups):
        w[groups == g] = s[groups == g] / s[groups == g].sum()
    return w
