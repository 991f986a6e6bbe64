"""Apply an ``Aggregation`` to a ``SplitGAN``: weighted averages of block weights.

* Client-side blocks: for each block and each group, the members that hold the block get the
  average of the members' copies, weighted by their cluster weights renormalised over the holders
  (a member holds exactly the blocks it held before; nothing moves between client and server).
  With a personalised ``mixing`` matrix instead, holder i gets sum_j m_ij theta_j over the holders.
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


def _average(states: list[dict[str, torch.Tensor]], weights: np.ndarray) -> dict[str, torch.Tensor]:
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            w = torch.as_tensor(weights, dtype=first.dtype, device=first.device).view(-1, *([1] * first.dim()))
            out[key] = (torch.stack([s[key] for s in states]) * w).sum(0)
        else:
            out[key] = torch.stack([s[key] for s in states]).amax(0)
    return out


@torch.no_grad()
def apply_aggregation(model: SplitGAN, agg: Aggregation, clients: list[int] | None = None) -> None:
    ids = list(range(len(model.clients))) if clients is None else list(clients)
    groups = np.asarray(agg.groups)
    for net in NETS:
        for b in range(model.num_blocks[net]):
            key = str(b)
            # positions (into agg's arrays) of the participating clients that hold block b
            holders = [k for k, i in enumerate(ids) if model.clients[i].holds(net, b)]
            local = {k: model.clients[ids[k]].nets[net][key].state_dict() for k in holders}
            new_local = {}
            if agg.mixing is not None:  # personalised: every holder gets its own mix of the holders
                for k in holders:
                    w = agg.mixing[k, holders]
                    new_local[k] = _average([local[j] for j in holders], w / w.sum())
            else:
                for g in np.unique(groups):
                    members = [k for k in holders if groups[k] == g]
                    if not members:
                        continue
                    w = agg.cluster_weights[members]
                    avg = _average([local[k] for k in members], w / w.sum())
                    new_local.update({k: avg for k in members})
            if key in model.server.nets[net]:
                server_block = model.server.nets[net][key]
                # clients without a local copy all contribute the same server copy: one term
                server_weight = 1.0 - float(agg.global_weights[holders].sum())
                states = [local[k] for k in holders] + [server_block.state_dict()]
                weights = np.append(agg.global_weights[holders], max(server_weight, 0.0))
                server_block.load_state_dict(_average(states, weights))
            for k, state in new_local.items():
                model.clients[ids[k]].nets[net][key].load_state_dict(state)
