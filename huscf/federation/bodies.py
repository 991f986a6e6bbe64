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

Every engine runs it with this module's code: the loop and batched engines on their model, the Ray
runtime on the server actor's (``RunConfig.cluster_bodies`` sizes the model, ``carry_optimizer_state``
gives a new slot its Adam state).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from huscf.errors import HuscfError
from huscf.federation.averaging import _mix, apply_aggregation
from huscf.federation.secure import OpenedSum, SecurePlan, block_vector, load_block_vector
from huscf.federation.strategies import Aggregation
from huscf.split.segments import NETS, SplitGAN


def carry_optimizer_state(model: SplitGAN, optimizers: dict[str, torch.optim.Optimizer], agg: Aggregation) -> None:
    """After a round end ``agg``: each slot used for the first time (its info's ``new_slots``: slot
    -> the body its members came from, -1 the shared one) takes that body's optimiser state, so the
    cluster's training continues where it was instead of restarting Adam's moments."""
    bodies = model.server_bodies()
    for slot, source in agg.info.get("bodies", {}).get("new_slots", {}).items():
        for net, opt in optimizers.items():
            pairs = zip(bodies[int(slot) + 1].nets[net].parameters(), bodies[source + 1].nets[net].parameters())
            for new, old in pairs:
                if old in opt.state:
                    opt.state[new] = {k: v.clone() for k, v in opt.state[old].items()}


def assign_slots(previous: np.ndarray, groups: np.ndarray, slots: int) -> np.ndarray:
    """A slot per client: each cluster label in ``groups`` mapped to one of ``slots`` slots so that
    as many clients as possible keep the slot in ``previous`` (-1: none yet)."""
    labels, cluster = np.unique(groups, return_inverse=True)
    if len(labels) > slots:
        raise HuscfError(f"{len(labels)} clusters but federation.max_clusters = {slots} server bodies")
    overlap = np.array([[np.sum((groups == g) & (previous == s)) for s in range(slots)] for g in labels])
    _, slot_of = linear_sum_assignment(-overlap)  # slot_of[c]: the slot of cluster labels[c] (every one gets one)
    return slot_of[cluster]


def _reslot(model: SplitGAN, agg: Aggregation, clients: list[int]) -> tuple[np.ndarray, dict[str, int]]:
    """Every client's slot after this round end, and for each slot that had no member before the
    body most of its members ran through (-1: the shared one), whose optimiser state it takes."""
    previous = model.body_of.cpu().numpy()
    before = previous[clients]
    slot = assign_slots(before, np.asarray(agg.groups), len(model.cluster_bodies))
    new_slots = {}
    for s in sorted(set(slot.tolist()) - set(previous.tolist())):
        came_from, counts = np.unique(before[slot == s], return_counts=True)
        new_slots[str(s)] = int(came_from[np.argmax(counts)])
    return slot, new_slots


def _rows(slot: np.ndarray, cw: np.ndarray, gw: np.ndarray) -> tuple[list[int], np.ndarray]:
    """The used slots and the mixing rows over the copies: one row per used slot (its members'
    cluster weights), then the shared body's (the global weights); each row sums to 1."""
    used = sorted(set(slot.tolist()))
    rows = np.vstack([np.where(slot == s, cw, 0.0) for s in used] + [gw[None, :]])
    return used, rows / rows.sum(1, keepdims=True)


def _moved(model: SplitGAN, clients: list[int], slot: np.ndarray, new_slots: dict[str, int]) -> dict:
    model.body_of[torch.as_tensor(clients)] = torch.as_tensor(slot, device=model.body_of.device)
    return {"body_of": model.body_of.tolist(), "new_slots": new_slots}


@torch.no_grad()
def apply_per_cluster(model: SplitGAN, agg: Aggregation, clients: list[int]) -> dict:
    """Average in place with one server body per cluster (see the module docstring); ``agg``'s
    arrays are indexed by position in ``clients``. Returns {"body_of": [...], "new_slots": {...}}:
    every client's slot after this round end, and for each slot that had no member before it the
    body most of its members ran through (-1: the shared one), whose optimiser state it takes."""
    cw, gw = np.asarray(agg.cluster_weights, dtype=np.float64), np.asarray(agg.global_weights, dtype=np.float64)
    slot, new_slots = _reslot(model, agg, clients)
    used_slots, rows = _rows(slot, cw, gw)
    # the new body weights, from the copies every client used this round (before any is written)
    new: dict[tuple[str, str, str], torch.Tensor] = {}
    for net in NETS:
        for key in model.server.nets[net]:
            used = [(model.clients[i].nets[net][key] if model.clients[i].holds(net, int(key))
                     else model.body(i).nets[net][key]).state_dict() for i in clients]
            for name in used[0]:
                new[(net, key, name)] = _mix([u[name] for u in used], rows)
    apply_aggregation(model, agg, clients)  # client-side blocks (and the shared body, replaced below)
    for (net, key, name), values in new.items():
        for s, v in zip(used_slots, values[:-1]):
            model.cluster_bodies[s].nets[net][key].state_dict()[name].copy_(v)
        model.server.nets[net][key].state_dict()[name].copy_(values[-1])
    return _moved(model, clients, slot, new_slots)


@torch.no_grad()
def apply_opened_per_cluster(model: SplitGAN, agg: Aggregation, clients: list[int], plan: SecurePlan,
                             opened: list[OpenedSum]) -> dict:
    """``apply_per_cluster``'s bodies under secure aggregation, from what the server can know: an
    opened sum stands for its survivors (their cluster's average of the block, with their summed
    cluster and global weights; all of them share a cluster, hence a slot), a client that ran
    through a body contributes that body, and a holder whose copy stayed hidden (a lone holder, a
    closed sum, a dropout) has its body stand in for it. With every sum opened, the slots equal
    ``apply_per_cluster``'s exactly; the shared body weights holders by cluster within a sum (as
    ``secure.apply_opened`` does). The client-side copies are written by ``secure.apply_opened``."""
    cw, gw = np.asarray(agg.cluster_weights, dtype=np.float64), np.asarray(agg.global_weights, dtype=np.float64)
    slot, new_slots = _reslot(model, agg, clients)
    pos = {i: k for k, i in enumerate(clients)}
    sums: dict[tuple[str, int], list[OpenedSum]] = {}
    for o in opened:
        sums.setdefault((plan.sums[o.index].net, plan.sums[o.index].block), []).append(o)
    new = {}
    for net in NETS:
        for key in model.server.nets[net]:
            terms = []  # (copy, slot, cluster weight, global weight): an opened sum, then each uncovered client
            for o in sums.get((net, int(key)), []):
                ks = [pos[i] for i in o.members]
                terms.append((o.mean, slot[ks[0]], cw[ks].sum(), gw[ks].sum()))
            covered = {i for o in sums.get((net, int(key)), []) for i in o.members}
            terms += [(block_vector(model.body(i).nets[net][key]), slot[pos[i]], cw[pos[i]], gw[pos[i]])
                      for i in clients if i not in covered]
            values, slots, cws, gws = zip(*terms)
            used_slots, rows = _rows(np.asarray(slots), np.asarray(cws), np.asarray(gws))
            new[(net, key)] = (used_slots, rows @ np.stack(values))
    for (net, key), (used_slots, values) in new.items():
        for s, v in zip(used_slots, values[:-1]):
            load_block_vector(model.cluster_bodies[s].nets[net][key], v)
        load_block_vector(model.server.nets[net][key], values[-1])
    return _moved(model, clients, slot, new_slots)
