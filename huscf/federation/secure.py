"""Secure aggregation of the client-side segments (``federation.secure_aggregation``): the server
learns each cluster's average of a block, never one client's copy of it.

The SecAgg idea (Bonawitz et al., CCS 2017; Flower's SecAgg+), run at every round end:

1. **Keys.** Every client makes a fresh X25519 key pair and publishes the public key. Any two
   clients i, j derive the same pair secret s_ij (X25519, then HKDF-SHA256), which no one else can.
2. **Plan (server).** From the strategy's ``Aggregation``: one *sum* per (net, block, cluster) over
   the cluster's members that hold the block, member i with weight c_i (its cluster weight
   renormalised over those holders). A sum needs two members: a lone holder's average is its own
   copy, so it keeps that copy and sends nothing.
3. **Masking (client i).** For each sum it is in: x_i = round(c_i * theta_i * 2^32) as an integer
   mod 2^64 (fixed point), plus, for every other member j, the ChaCha20 keystream (``cryptography``)
   keyed with SHA-256(s_ij, round, sum) when i < j and minus it when i > j. To anyone without the
   pair secrets the vector is uniform noise. Before masking, the client checks that the plan's
   weights are in [0, 1] and sum to 1 and that every value of its copy is below 2^30: the opened
   sum is then a convex combination of copies, below 2^30 too, inside the fixed point's 2^31, so
   it cannot wrap (a check on each weighted term alone would let five terms of 2^29 wrap).
4. **Opening (server).** The masks cancel in the sum over the members, leaving sum_i c_i theta_i
   exactly (in fixed point: 2^-33 per term, far below float32 rounding).
5. **Dropouts.** A member that never delivers leaves its pair masks in the others' vectors. The
   server names who dropped; each survivor reveals its per-sum mask seeds with the dropped members
   only (never a pair secret, never a seed with another survivor), the server removes those masks
   and renormalises over the survivors. A survivor refuses to reveal for a sum it would be the only
   survivor of (that would open its own copy); such a sum stays closed and its survivor keeps its copy.

**The server body.** A middle block that some clients hold locally and the server holds too: plain
averaging mixes every holder's copy in with its global weight. Here the server gets each cluster's
average instead, with the cluster's summed global weight:
``new = sum_g W_g avg_g + (1 - sum_g W_g) theta_server``. With one cluster (FedAvg, the warm-up
rounds, k = 1) this is plain averaging; with several, the holders within a cluster are weighted by
their cluster rather than their global KLD weights (having both would hand the server two equations
in the same unknowns). A holder whose sum stays closed gives its share to the server's copy.
Integer buffers (BatchNorm's batch counter, unused with a momentum) are not averaged.

The threat model (docs/security.md): an honest-but-curious server. Not implemented from SecAgg: the
second (self) mask that keeps a member hidden when the server falsely declares it dropped and then
receives its vector late, the threshold secret sharing of keys (the survivors reveal per-sum seeds
instead), authenticated keys, and plan checks beyond the weights' range. A server that lies opens
one client's copy (tests/test_secure_aggregation.py, ``TestALyingServerOpensOneClientToday``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from huscf.errors import HuscfError
from huscf.federation.strategies import Aggregation, RoundState
from huscf.split.segments import NETS, SplitGAN

SCALE = 2.0 ** 32  # fixed point: 32 fractional bits
LIMIT = 2.0 ** 30  # |theta| below this: a convex combination of copies stays inside the fixed point's 2^31


class SecureStrategy:
    """A strategy whose aggregation is applied by secure aggregation (``federation.rounds``)."""

    uses_client_params = False

    def __init__(self, inner):
        if inner.uses_client_params or getattr(inner, "probe", 0):  # reads the weights, or runs the generators
            raise HuscfError(f"federation.secure_aggregation hides each client's weights from the server, but the "
                             f"'{inner.name}' aggregation reads every client's whole model: use it with huscf or "
                             f"fedgan, or set federation.secure_aggregation=false")
        self.inner, self.name = inner, inner.name

    def aggregate(self, state: RoundState) -> Aggregation:
        return self.inner.aggregate(state)


def secured(strategy, enabled: bool):
    """``strategy`` wrapped for secure aggregation when ``enabled``."""
    return SecureStrategy(strategy) if enabled else strategy


# -- the plan ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockSum:
    """One sum the server will open: a cluster's holders of one block."""

    net: str
    block: int
    members: tuple[int, ...]  # client ids, ascending
    weights: tuple[float, ...]  # c_i, sum to 1 over the members
    server_weights: tuple[float, ...]  # each member's global weight in the server's copy (0: none)


@dataclass(frozen=True)
class SecurePlan:
    round: int
    sums: tuple[BlockSum, ...]

    def of(self, client: int) -> list[int]:
        """Indices of the sums ``client`` is a member of."""
        return [k for k, s in enumerate(self.sums) if client in s.members]

    def to_meta(self) -> dict:
        return {"round": self.round, "sums": [[s.net, s.block, list(s.members), list(s.weights),
                                               list(s.server_weights)] for s in self.sums]}

    @classmethod
    def from_meta(cls, meta: dict) -> "SecurePlan":
        return cls(int(meta["round"]), tuple(BlockSum(net, int(b), tuple(m), tuple(w), tuple(sw))
                                             for net, b, m, w, sw in meta["sums"]))


def plan_sums(model: SplitGAN, agg: Aggregation, clients: list[int], round_idx: int) -> SecurePlan:
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
                if len(pos) < 2:
                    continue
                w = cw[pos].astype(np.float64)
                if not (np.isfinite(w).all() and w.sum() > 0):
                    raise HuscfError(f"secure aggregation needs positive finite cluster weights, got {w.tolist()}")
                sums.append(BlockSum(net, b, tuple(int(clients[k]) for k in pos), tuple((w / w.sum()).tolist()),
                                     tuple(float(gw[k]) if on_server else 0.0 for k in pos)))
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


_NONCE = bytes(16)  # each seed keys one stream only (one pair, one sum, one round): a fixed nonce is safe


def _stream(seed: bytes, size: int) -> np.ndarray:
    """``size`` uniform 64-bit words: the ChaCha20 keystream under the 32-byte ``seed``."""
    keystream = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor().update(bytes(8 * size))
    return np.frombuffer(keystream, dtype="<u8").astype(np.uint64)


def _check_sum(s: "BlockSum", client: int) -> None:
    """One line unless ``s``'s weights are a convex combination (each in [0, 1], summing to 1 up to
    the float64 rounding of their normalisation), which keeps the opened sum inside the range."""
    w = np.asarray(s.weights, dtype=np.float64)
    if len(w) != len(s.members) or not (np.isfinite(w).all() and (w >= 0).all() and (w <= 1).all()) \
            or abs(w.sum() - 1) > 4 * len(w) * 2.0 ** -53:
        raise HuscfError(f"client {client} refuses the sum of {s.net} block {s.block}: its weights {list(s.weights)} "
                         f"are not a convex combination (each in [0, 1], summing to 1)")


def _sum_seed(secret: bytes, round_idx: int, index: int) -> bytes:
    """The mask seed of one pair for one sum: revealing it opens that sum's pair mask only."""
    return hashlib.sha256(secret + round_idx.to_bytes(8, "little") + index.to_bytes(8, "little")).digest()


class MaskingClient:
    """One client's side of one round end: its key pair, its masked sums and its reveals."""

    def __init__(self, client: int):
        self.client = client
        self._key = X25519PrivateKey.generate()
        self._secrets: dict[int, bytes] = {}

    def public_key(self) -> str:
        return self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()

    def _secret(self, peer: int, directory: dict[int, str]) -> bytes:
        if peer not in self._secrets:
            if peer not in directory:
                raise HuscfError(f"client {self.client} has no public key of client {peer} to mask a sum with")
            shared = self._key.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(directory[peer])))
            lo, hi = sorted((self.client, peer))
            self._secrets[peer] = HKDF(hashes.SHA256(), 32, salt=None,
                                       info=f"huscf secure aggregation {lo}-{hi}".encode()).derive(shared)
        return self._secrets[peer]

    def masked(self, plan: SecurePlan, segments, directory: dict[int, str]) -> dict[int, np.ndarray]:
        """{sum index: masked vector} for every sum this client is in; ``segments``: its
        ``ClientSegments``; ``directory``: every member's public key."""
        out = {}
        for k in plan.of(self.client):
            s = plan.sums[k]
            _check_sum(s, self.client)
            theta = block_vector(segments.nets[s.net][str(s.block)])
            check_range(theta, self.client, f"{s.net} block {s.block}")  # the copy's own range: see step 3
            x = encode(s.weights[s.members.index(self.client)] * theta, self.client, f"{s.net} block {s.block}")
            for j in s.members:
                if j != self.client:
                    mask = _stream(_sum_seed(self._secret(j, directory), plan.round, k), x.size)
                    x = x + mask if self.client < j else x - mask  # wraps mod 2^64
            out[k] = x
        return out

    def reveal(self, plan: SecurePlan, dropped: set[int], directory: dict[int, str]) -> dict[int, dict[int, str]]:
        """{sum index: {dropped peer: mask seed}} for the sums this client shares with members that
        dropped, only where at least one other member survives (else the seed would open its copy)."""
        out = {}
        for k in plan.of(self.client):
            s = plan.sums[k]
            gone = [j for j in s.members if j in dropped and j != self.client]
            if gone and len(s.members) - len(gone) >= 2:
                out[k] = {j: _sum_seed(self._secret(j, directory), plan.round, k).hex() for j in gone}
        return out


# -- the server ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpenedSum:
    index: int
    members: tuple[int, ...]  # the survivors whose copies it averages
    mean: np.ndarray  # their weighted average (weights renormalised over them)
    server_weight: float  # their summed global weight in the server's copy


def open_sums(plan: SecurePlan, masked: dict[int, dict[int, np.ndarray]],
              revealed: dict[int, dict[int, dict[int, str]]] | None = None) -> list[OpenedSum]:
    """Sum every sum's masked vectors and remove the masks of members that dropped; a sum with
    fewer than two deliveries, or whose survivors did not reveal every seed, stays closed."""
    revealed = revealed or {}
    opened = []
    for k, s in enumerate(plan.sums):
        got = [i for i in s.members if k in masked.get(i, {})]
        gone = [j for j in s.members if j not in got]
        if len(got) < 2:
            continue
        total = np.sum([masked[i][k] for i in got], axis=0, dtype=np.uint64)  # wraps mod 2^64
        seeds = {i: revealed.get(i, {}).get(k, {}) for i in got}
        if any(j not in seeds[i] for i in got for j in gone):
            continue
        for i in got:
            for j in gone:
                mask = _stream(bytes.fromhex(seeds[i][j]), total.size)
                total = total - mask if i < j else total + mask  # undo what i added for the pair (i, j)
        w = np.asarray([s.weights[s.members.index(i)] for i in got])
        opened.append(OpenedSum(k, tuple(got), decode(total) / w.sum(),
                                float(sum(s.server_weights[s.members.index(i)] for i in got))))
    return opened


def apply_opened(model: SplitGAN, plan: SecurePlan, opened: list[OpenedSum], mix_server: bool = True) -> dict:
    """Write each opened average into its survivors' copies (where the model holds them: the server
    of the Ray runtime holds stale copies it sends back) and, with ``mix_server``, mix the server
    body (without: the per-cluster bodies are made by ``bodies.apply_opened_per_cluster``);
    returns the round's record: how many sums were planned and opened, and which stayed closed."""
    means: dict[tuple[str, int], list[tuple[float, np.ndarray]]] = {}
    for o in opened:
        s = plan.sums[o.index]
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
    return {"sums": len(plan.sums), "opened": len(opened), "closed": closed}


def secure_sums(model: SplitGAN, plan: SecurePlan, clients: list[int],
                drop: frozenset[int] = frozenset()) -> list[OpenedSum]:
    """The protocol's client and server sides in one process (the simulation engines): every client
    of ``clients`` masks its own segments, the server opens the sums. ``drop``: clients that fail
    to deliver their masked vectors (tests)."""
    parties = {i: MaskingClient(i) for i in clients}
    directory = {i: p.public_key() for i, p in parties.items()}
    masked = {i: parties[i].masked(plan, model.clients[i], directory) for i in clients if i not in drop}
    revealed = {i: parties[i].reveal(plan, set(drop), directory) for i in masked} if drop else {}
    return open_sums(plan, masked, revealed)


def secure_average(model: SplitGAN, agg: Aggregation, clients: list[int], round_idx: int,
                   drop: frozenset[int] = frozenset()) -> dict:
    """Plan, mask, open and apply with the shared body (``secure_sums`` + ``apply_opened``);
    returns the round's record."""
    plan = plan_sums(model, agg, clients, round_idx)
    return apply_opened(model, plan, secure_sums(model, plan, clients, drop))
