"""Secure aggregation of the client-side segments (``federation.secure_aggregation``): the server
learns each cluster's average of a block, never one client's copy of it.

This module owns what the sums are and how copies become words: the protocol that masks and
opens them, against a server that lies too, is ``federation.secagg`` (Bonawitz et al., CCS 2017).

1. **Plan (server).** From the strategy's ``Aggregation``: one *sum* per (net, block, cluster) over
   the cluster's members that hold the block, member i with weight c_i (its cluster weight
   renormalised over those holders, and raised where needed so that no weight is below the largest
   over ``Policy.max_weight_ratio``). A sum needs ``Policy.min_members`` members (at least two: a
   lone holder's average is its own copy, so it keeps that copy and sends nothing).
2. **Fixed point (client).** x_i = round(c_i * theta_i * 2^32) as an integer mod 2^64. Before it,
   the client checks that the plan's weights are in [0, 1] and sum to 1 and that every value of
   its copy is below 2^30: the opened sum is then a convex combination of copies, below 2^30 too,
   inside the fixed point's 2^31, so it cannot wrap (a check on each weighted term alone would let
   five terms of 2^29 wrap). Masks are ChaCha20 keystreams (``cryptography``) under per-pair
   (``pair_seed``) and per-client (``self_seed``) keys for one sum of one round.
3. **Opening.** The masks cancel or are removed, leaving sum_i c_i theta_i exactly (in fixed
   point: 2^-33 per term, far below float32 rounding); the survivors' average divides by their
   summed weight.

**The server body.** A middle block that some clients hold locally and the server holds too: plain
averaging mixes every holder's copy in with its global weight. Here the server gets each cluster's
average instead, with the cluster's summed global weight:
``new = sum_g W_g avg_g + (1 - sum_g W_g) theta_server``. With one cluster (FedAvg, the warm-up
rounds, k = 1) this is plain averaging; with several, the holders within a cluster are weighted by
their cluster rather than their global KLD weights (having both would hand the server two equations
in the same unknowns). A holder whose sum stays closed gives its share to the server's copy.
Integer buffers (BatchNorm's batch counter, unused with a momentum) are not averaged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from huscf.errors import HuscfError
from huscf.federation.strategies import Aggregation, RoundState
from huscf.split.segments import NETS, SplitGAN

SCALE = 2.0 ** 32  # fixed point: 32 fractional bits
LIMIT = 2.0 ** 30  # |theta| below this: a convex combination of copies stays inside the fixed point's 2^31


@dataclass(frozen=True)
class Policy:
    """What every client checks in a plan before it masks anything, and the server's plan keeps
    to (``federation.secure_min_members``, ``secure_max_weight_ratio``, ``hide_ends``)."""

    min_members: int = 2  # a sum, and its survivors, must average at least this many clients
    max_weight_ratio: float = 100.0  # a sum's largest weight over its smallest
    # the first and last block of each net (which no server holds) opened by the sum's members only
    hide_ends: bool = False

    def __post_init__(self):
        if self.min_members < 2 or not self.max_weight_ratio >= 1:
            raise HuscfError(f"secure aggregation needs min_members >= 2 and max_weight_ratio >= 1, got "
                             f"{self.min_members} and {self.max_weight_ratio}")


class SecureStrategy:
    """A strategy whose aggregation is applied by secure aggregation (``federation.rounds``)."""

    uses_client_params = False

    def __init__(self, inner, policy: Policy = Policy()):
        if inner.uses_client_params or getattr(inner, "probe", 0):  # reads the weights, or runs the generators
            raise HuscfError(f"federation.secure_aggregation hides each client's weights from the server, but the "
                             f"'{inner.name}' aggregation reads every client's whole model: use it with huscf or "
                             f"fedgan, or set federation.secure_aggregation=false")
        self.inner, self.name, self.policy = inner, inner.name, policy

    def aggregate(self, state: RoundState) -> Aggregation:
        return self.inner.aggregate(state)


def secured(strategy, enabled: bool, policy: Policy = Policy()):
    """``strategy`` wrapped for secure aggregation when ``enabled``."""
    return SecureStrategy(strategy, policy) if enabled else strategy


# -- the plan ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockSum:
    """One sum the server will open: a cluster's holders of one block."""

    net: str
    block: int
    members: tuple[int, ...]  # client ids, ascending
    weights: tuple[float, ...]  # c_i, sum to 1 over the members
    server_weights: tuple[float, ...]  # each member's global weight in the server's copy (0: none)
    hidden: bool = False  # opened by its members only (``Policy.hide_ends``): the server sums words it cannot read


@dataclass(frozen=True)
class SecurePlan:
    round: int
    sums: tuple[BlockSum, ...]

    def of(self, client: int) -> list[int]:
        """Indices of the sums ``client`` is a member of."""
        return [k for k, s in enumerate(self.sums) if client in s.members]

    def to_meta(self) -> dict:
        return {"round": self.round, "sums": [[s.net, s.block, list(s.members), list(s.weights),
                                               list(s.server_weights), s.hidden] for s in self.sums]}

    @classmethod
    def from_meta(cls, meta: dict) -> "SecurePlan":
        return cls(int(meta["round"]), tuple(BlockSum(net, int(b), tuple(m), tuple(w), tuple(sw), bool(h))
                                             for net, b, m, w, sw, h in meta["sums"]))


def plan_sums(model: SplitGAN, agg: Aggregation, clients: list[int], round_idx: int,
              policy: Policy = Policy()) -> SecurePlan:
    """The sums of one round end; ``agg``'s arrays are indexed by position in ``clients``."""
    if agg.mixing is not None:
        raise HuscfError("secure aggregation opens cluster averages; a personalised mixing gives every client "
                         "its own mix of the others, which would reveal each client's weights")
    groups, cw, gw = (np.asarray(a) for a in (agg.groups, agg.cluster_weights, agg.global_weights))
    sums = []
    for net in NETS:
        for b in range(model.num_blocks[net]):
            on_server = str(b) in model.server.nets[net]
            holders = [k for k, i in enumerate(clients) if model.clients[i].holds(net, b)]
            for g in sorted({int(groups[k]) for k in holders}):
                pos = [k for k in holders if groups[k] == g]
                if len(pos) < policy.min_members:
                    continue
                w = cw[pos].astype(np.float64)
                if not (np.isfinite(w).all() and w.sum() > 0):
                    raise HuscfError(f"secure aggregation needs positive finite cluster weights, got {w.tolist()}")
                w = np.maximum(w, w.max() / policy.max_weight_ratio)  # the bound every member checks
                sums.append(BlockSum(net, b, tuple(int(clients[k]) for k in pos), tuple((w / w.sum()).tolist()),
                                     tuple(float(gw[k]) if on_server else 0.0 for k in pos),
                                     policy.hide_ends and b in (0, model.num_blocks[net] - 1)))
    return SecurePlan(round_idx, tuple(sums))


# -- fixed point and masks -----------------------------------------------------------------------
def block_vector(block: torch.nn.Module) -> np.ndarray:
    """A block's floating-point state (parameters and BatchNorm statistics) as one float64 vector."""
    parts = [v.detach().double().flatten().cpu() for v in block.state_dict().values() if v.is_floating_point()]
    return torch.cat(parts).numpy() if parts else np.zeros(0)


@torch.no_grad()
def load_block_vector(block: torch.nn.Module, vec: np.ndarray) -> None:
    """The inverse of ``block_vector``: write ``vec`` into the block's floating-point state in place."""
    floats = [v for v in block.state_dict().values() if v.is_floating_point()]
    for v, part in zip(floats, np.split(vec, np.cumsum([v.numel() for v in floats], dtype=np.int64))):
        v.copy_(torch.from_numpy(part).view_as(v))


def check_range(x: np.ndarray, client: int, what: str) -> None:
    """One line unless every value of ``x`` is finite and below ``LIMIT`` in magnitude."""
    if not np.isfinite(x).all() or (x.size and np.abs(x).max() >= LIMIT):
        raise HuscfError(f"client {client}'s {what} has values that are not finite or above {LIMIT:.0e}: "
                         f"secure aggregation cannot sum them")


def encode(x: np.ndarray, client: int, what: str) -> np.ndarray:
    """float64 -> fixed point in Z_{2^64} (uint64)."""
    check_range(x, client, what)
    return np.rint(x * SCALE).astype(np.int64).view(np.uint64)


def decode(total: np.ndarray) -> np.ndarray:
    return total.view(np.int64).astype(np.float64) / SCALE


_NONCE = bytes(16)  # each seed keys one stream only (one pair or client, one sum, one round): a fixed nonce is safe


def mask_stream(seed: bytes, size: int) -> np.ndarray:
    """``size`` uniform 64-bit words: the ChaCha20 keystream under the 32-byte ``seed``."""
    keystream = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor().update(bytes(8 * size))
    return np.frombuffer(keystream, dtype="<u8").astype(np.uint64)


def check_sum(s: "BlockSum", client: int) -> None:
    """One line unless ``s``'s weights are a convex combination (each in [0, 1], summing to 1 up to
    the float64 rounding of their normalisation), which keeps the opened sum inside the range."""
    w = np.asarray(s.weights, dtype=np.float64)
    if len(w) != len(s.members) or not (np.isfinite(w).all() and (w >= 0).all() and (w <= 1).all()) \
            or abs(w.sum() - 1) > 4 * len(w) * 2.0 ** -53:
        raise HuscfError(f"client {client} refuses the sum of {s.net} block {s.block}: its weights {list(s.weights)} "
                         f"are not a convex combination (each in [0, 1], summing to 1)")


def pair_seed(secret: bytes, round_idx: int, index: int) -> bytes:
    """The mask seed of one pair for one sum: revealing it opens that sum's pair mask only."""
    return hashlib.sha256(secret + round_idx.to_bytes(8, "little") + index.to_bytes(8, "little")).digest()


def self_seed(seed: bytes, round_idx: int, index: int) -> bytes:
    """The key of a client's self mask for one sum, from its 16-byte seed for that sum."""
    return hashlib.sha256(b"huscf self mask" + seed + round_idx.to_bytes(8, "little")
                          + index.to_bytes(8, "little")).digest()


def hiding_seed(key: bytes, round_idx: int, index: int, client: int) -> bytes:
    """The key of ``client``'s hiding mask in hidden sum ``index``, from the sum's members' shared key."""
    return hashlib.sha256(b"huscf hiding mask" + key + round_idx.to_bytes(8, "little") + index.to_bytes(8, "little")
                          + client.to_bytes(8, "little")).digest()


# -- the server ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpenedSum:
    index: int
    members: tuple[int, ...]  # the survivors whose copies it averages
    mean: np.ndarray | None  # their weighted average (weights renormalised over them); None: hidden
    server_weight: float  # their summed global weight in the server's copy
    words: np.ndarray | None = None  # a hidden sum: the average under its members' hiding masks


def apply_opened(model: SplitGAN, plan: SecurePlan, opened: list[OpenedSum], mix_server: bool = True) -> dict:
    """Write each opened average into its survivors' copies (where the model holds them: the server
    of the Ray runtime holds stale copies it sends back) and, with ``mix_server``, mix the server
    body (without: the per-cluster bodies are made by ``bodies.apply_opened_per_cluster``);
    returns the round's record: how many sums were planned, opened (and of those, hidden from the
    server), and which stayed closed. A hidden sum (``mean`` None) is its members' to write."""
    means: dict[tuple[str, int], list[tuple[float, np.ndarray]]] = {}
    for o in opened:
        s = plan.sums[o.index]
        if o.mean is None:
            continue
        for i in o.members:
            load_block_vector(model.clients[i].nets[s.net][str(s.block)], o.mean)
        if o.server_weight > 0 and mix_server:
            means.setdefault((s.net, s.block), []).append((o.server_weight, o.mean))
    for (net, b), terms in means.items():
        body = model.server.nets[net][str(b)]
        mixed = (1.0 - sum(w for w, _ in terms)) * block_vector(body)
        for w, mean in terms:
            mixed = mixed + w * mean
        load_block_vector(body, mixed)
    closed = sorted(set(range(len(plan.sums))) - {o.index for o in opened})
    hidden = sum(plan.sums[o.index].hidden for o in opened)
    return {"sums": len(plan.sums), "opened": len(opened), "closed": closed} | ({"hidden": hidden} if hidden else {})
