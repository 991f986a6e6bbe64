"""Apply an ``Aggregation`` to a ``SplitGAN``: weighted averages of block weights.

* Client-side blocks: for each block and each group, the members that hold the block get the
  average of the members' copies, weighted by their cluster weights renormalised over the holders
  (a member holds exactly the blocks it held before; nothing moves between client and server).
  With a personalised ``mixing`` matrix instead (one for all nets, or one per net), holder i gets
  sum_j m_ij theta_j over the holders.
* Server blocks (middle blocks): the average over *all* clients with the global weights, where a
  client that holds a copy of the block locally contributes its copy and every other client
  contributes the server's copy (the one it used).
With ``clients`` given, only those clients take part (the others, e.g. a client whose actor died
during the round, keep their weights and contribute nothing), and ``agg``'s arrays are indexed by
position in ``clients``.
Floating-point parameters and buffers (BatchNorm running statistics) are averaged; integer
buffers (BatchNorm's batch counter) take the maximum.
"""

from __future__ import annotations

import numpy as np
import torch

from huscf.federation.strategies import Aggregation
from huscf.split.segments import NETS, SplitGAN


def _mixing(agg: Aggregation, holders: list[int], groups: np.ndarray, net: str) -> tuple[np.ndarray, np.ndarray]:
    """(weights, pick): the distinct new copies of ``net``'s block as weight rows over the holders'
    old copies, and which row each holder gets. Clustered: one row per group (G x H);
    personalised: one per holder."""
    h = np.asarray(holders, dtype=int)
    mixing = agg.mixing.get(net) if isinstance(agg.mixing, dict) else agg.mixing
    if mixing is not None:  # personalised: every holder gets its own mix of the holders
        m = np.asarray(mixing, dtype=np.float64)[np.ix_(h, h)]
        return m / m.sum(1, keepdims=True), np.arange(len(h))
    labels, pick = np.unique(groups[h], return_inverse=True)
    m = (pick[None, :] == np.arange(len(labels))[:, None]) * np.asarray(agg.cluster_weights, dtype=np.float64)[h]
    return m / m.sum(1, keepdims=True), pick


# values stacked at a time: a fleet of more clients is mixed in chunks of this many, so the
# round end never holds a second copy of every client's weights (1,000 clients: 1.2 GB at width
# 0.25, whose page faults alone took 1-3 s; issue 32)
MIX_CHUNK = 256


def _mix(values: list[torch.Tensor], weights: np.ndarray) -> torch.Tensor:
    """``weights @ stack(values)``: (rows, ...) new tensors from one matmul over the stacked values
    (one per ``MIX_CHUNK`` values, accumulated, beyond that). Integer buffers (BatchNorm's batch
    counter) take the maximum over the values a row mixes."""
    if not values[0].is_floating_point():
        stacked = torch.stack(values)
        mask = torch.as_tensor(weights > 0, device=stacked.device).view(*weights.shape, *([1] * (stacked.dim() - 1)))
        return torch.where(mask, stacked.unsqueeze(0), torch.iinfo(stacked.dtype).min).amax(1)
    w = torch.as_tensor(weights, dtype=values[0].dtype, device=values[0].device)
    out = None
    for c in range(0, len(values), MIX_CHUNK):
        part = w[:, c:c + MIX_CHUNK] @ torch.stack(values[c:c + MIX_CHUNK]).flatten(1)
        out = part if out is None else out.add_(part)
    return out.view(len(weights), *values[0].shape)


@torch.no_grad()
def apply_aggregation(model: SplitGAN, agg: Aggregation, clients: list[int] | None = None) -> None:
    """Average in place. Per block and state entry: one stack of the holders' copies and one matmul
    that makes every group's average (or every personalised mix) and the server's, then a copy into
    each holder's own tensor (parameters keep their storage, layout and optimiser identity)."""
    ids = list(range(len(model.clients))) if clients is None else list(clients)
    groups = np.asarray(agg.groups)
    for net in NETS:
        for b in range(model.num_blocks[net]):
            key = str(b)
            # positions (into agg's arrays) of the participating clients that hold block b
            holders = [k for k, i in enumerate(ids) if model.clients[i].holds(net, b)]
            has_server = key in model.server.nets[net]
            if not holders and not has_server:
                continue
            copies = [model.clients[ids[k]].nets[net][key].state_dict() for k in holders]  # then the server's
            rows, pick = _mixing(agg, holders, groups, net)
            if has_server:
                copies.append(model.server.nets[net][key].state_dict())
                # clients without a local copy all contribute the same server copy: one term
                gw = np.asarray(agg.global_weights, dtype=np.float64)[holders]
                server_row = np.append(gw, max(1.0 - float(gw.sum()), 0.0))
                rows = np.vstack([np.hstack([rows, np.zeros((len(rows), 1))]), server_row])
                pick = np.append(pick, len(rows) - 1)
            for name in copies[0]:
                values = [s[name] for s in copies]
                new = _mix(values, rows)  # every distinct new copy is computed before any is written
                for target, row in zip(values, pick):  # pick[t]: the row of new copies value t gets
                    target.copy_(new[row])
