"""The round end with a server body per cluster (``federation.server_body: per_cluster``).

The server keeps ``max_clusters`` body slots (``SplitGAN.cluster_bodies``) besides the shared body
(``SplitGAN.server``). Until the first clustered round end (the warm-up rounds) every client runs
through the shared body, which trains as it does with ``server_body: shared``. From then on:

* **Slots follow clusters.** Each round's clusters are matched to the slots their members used
  last round (the assignment with the most members kept, ``scipy.optimize.linear_sum_assignment``),
  so a cluster that persists keeps its slot and its Adam state; ``body_of[i]`` is client i's slot.
* **Slot weights.** Block b of the slot of cluster g becomes the cluster-weighted average, over g's
  members, of the copy of b each member *used* this round: its own copy if it holds b, else the
  body it ran through. With one cluster this is exactly the shared body's rule.
* **The shared body** is set to the globally weighted average of the same used copies and is no
  longer trained: it is the common reference through which the server computes every client's
  clustering features (``SplitGAN.server_features``), so that clients of different clusters are
  still seen through the same weights.
* Client-side blocks are averaged as before (``averaging.apply_aggregation``).

Memory: ``max_clusters`` extra copies of the middle blocks on the server.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from huscf.errors import HuscfError
from huscf.federation.averaging import _mix, apply_aggregation
from huscf.federation.strategies import Aggregation
from huscf.split.segments import NETS, SplitGAN


def assign_slots(previous: np.ndarray, groups: np.ndarray, slots: int) -> np.ndarray:
    """A slot per client: each cluster label in ``groups`` mapped to one of ``slots`` slots so that
    as many clients as possible keep the slot in ``previous`` (-1: none yet)."""
    labels = np.unique(groups)
    if len(labels) > slots:
        raise HuscfError(f"{len(labels)} clusters but federation.max_clusters = {slots} server bodies")
    overlap = np.array([[np.sum((groups == g) & (previous == s)) for s in range(slots)] for g in labels])
    rows, cols = linear_sum_assignment(-overlap)
    slot_of = dict(zip(labels[rows].tolist(), cols.tolist()))
    return np.array([slot_of[g] for g in groups.tolist()], dtype=int)


@torch.no_grad()
def apply_per_cluster(model: SplitGAN, agg: Aggregation, clients: list[int]) -> dict:
    """Average in place with one server body per cluster (see the module docstring); ``agg``'s
    arrays are indexed by position in ``clients``. Returns {"body_of": [...], "new_slots": {...}}:
    every client's slot after this round end, and for each slot that had no member before it the
    body most of its members ran through (-1: the shared one), whose optimiser state it takes."""
    groups = np.asarray(agg.groups)
    cw, gw = np.asarray(agg.cluster_weights, dtype=np.float64), np.asarray(agg.global_weights, dtype=np.float64)
    previous = model.body_of.cpu().numpy()
    slot = assign_slots(previous[clients], groups, len(model.cluster_bodies))
    used_slots = sorted(set(slot.tolist()))
    before = np.asarray(previous[clients])
    new_slots = {}
    for s in used_slots:
        if s not in set(previous.tolist()):
            came_from, counts = np.unique(before[slot == s], return_counts=True)
            new_slots[str(s)] = int(came_from[np.argmax(counts)])
    # the new body weights, from the copies every client used this round (before any is written)
    new: dict[tuple[str, str, int], list[torch.Tensor]] = {}
    for net in NETS:
        for key in model.server.nets[net]:
            used = [(model.clients[i].nets[net][key] if model.clients[i].holds(net, int(key))
                     else model.body(i).nets[net][key]).state_dict() for i in clients]
            rows = np.vstack([np.where(slot == s, cw, 0.0) for s in used_slots] + [gw[None, :]])
            rows = rows / rows.sum(1, keepdims=True)
            for name in used[0]:
                new[(net, key, name)] = _mix([u[name] for u in used], rows)
    apply_aggregation(model, agg, clients)  # client-side blocks (and the shared body, replaced below)
    for (net, key, name), values in new.items():
        for s, v in zip(used_slots, values[:-1]):
            model.cluster_bodies[s].nets[net][key].state_dict()[name].copy_(v)
        model.server.nets[net][key].state_dict()[name].copy_(values[-1])
    model.body_of[torch.as_tensor(clients)] = torch.as_tensor(slot, device=model.body_of.device)
    return {"body_of": model.body_of.tolist(), "new_slots": new_slots}
