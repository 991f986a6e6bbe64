"""The secure-aggregation protocol of Bonawitz et al. (CCS 2017), run at every secure round end:
the server opens each planned sum (``federation.secure``) and nothing else, even when it lies.

Every client holds a long-term Ed25519 **identity** key. Its public half is in the **roster**, which
every client is given outside the server (in one process: the trainer; on Ray: the driver, once
per host start): the trusted enrollment SecAgg assumes. One round end, for the plan's members:

0. **Keys.** Client u makes two X25519 pairs, c_u (to encrypt shares to peers) and s_u (for pair
   masks), and signs both public halves with its identity. The server relays them (U1).
1. **Shares.** u checks every peer's signature against the roster and the plan (``check_plan``:
   it is in at most one sum per block, every sum has ``min_members`` members who all advertised
   keys, weights a convex combination whose largest over smallest is at most ``max_weight_ratio``).
   It splits s_u's private key into t-of-|U1| Shamir shares, t = ``key_threshold`` (a strict
   majority), and, for each sum k it is in, a fresh self-mask seed b_uk into shares for the sum's
   other members, ``mask_threshold`` of them needed (pycryptodome's Shamir over GF(2^128)). Each
   peer's shares travel encrypted to it (ChaCha20-Poly1305 under the c_u-c_v key): the server
   relays what it cannot read. U2: who sent shares.
2. **Masked input.** For each sum with ``min_members`` members in U2, u sends its fixed-point
   weighted copy plus the ChaCha20 stream of b_uk (the self mask) plus, for every other member in
   U2, the pair mask from s_u-s_v (+ when u < v, - when u > v). U3: who delivered.
3. **Consistency.** u signs (round, U3) if U3 is part of U2, holds u and a majority of U1.
4. **Unmasking.** u checks that at least ``key_threshold`` members of U3 signed that same U3 (a
   server showing clients different survivor lists cannot gather a majority for each), then, once
   per round end, reveals for every peer v either v's key share (v in U2 but not U3: its pair
   masks come out) or v's self-mask shares (v in U3), never both; a self-mask share only for a sum
   that has ``min_members`` survivors, so a lone survivor's copy stays closed.
5. The server rebuilds the dropped members' s keys and the survivors' self masks and opens the sums.

**Hidden ends** (``federation.hide_ends``): the sums of each net's first and last block (which no
server holds) are marked hidden in the plan. Their lowest member seals a fresh key to the others
with its shares, and every member adds one more mask from it, which stays in the opened sum: the
server sums words it cannot read and sends them back, and the members remove the masks
(``open_hidden``). So the server never learns a head or a tail, not even averaged; a client asked
to send an end in a sum the server would open refuses.

Against the three ways a lying server opened one client's copy before: a delivered client
declared dropped keeps its self mask (its key share alone opens nothing, and no honest client
answers twice); keys the server hands out fail the identity signature; a plan with two sums of
one block, a sum below ``min_members`` or one heavy weight is refused. What it does not protect:
the roster itself (an enrollment the server controls would let it pose as every peer), a server
colluding with ``key_threshold`` clients (or ``mask_threshold`` of a sum's members and a key
threshold), what the opened averages themselves reveal, and correctness (a server that relays
garbage gets garbage; clients cannot check the KLD weights, so the ratio bound is a policy).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from huscf.errors import HuscfError
from huscf.federation.secure import (
    OpenedSum, Policy, SecurePlan, apply_opened, block_vector, check_range, check_sum, decode, encode, hiding_seed,
    mask_stream, pair_seed, plan_sums, self_seed,
)


def key_threshold(n: int) -> int:
    """Shares of a key needed to rebuild it among ``n`` round members: a strict majority, so that
    no two disjoint groups can each sign a different survivor list."""
    return n // 2 + 1


def mask_threshold(holders: int) -> int:
    """Shares of a self-mask seed needed among its ``holders`` (the sum's other members)."""
    return max(1, math.ceil(holders / 2))


def _canonical(*parts) -> bytes:
    return json.dumps(parts, separators=(",", ":")).encode()


class Identity:
    """A client's long-term Ed25519 key, made at enrollment; its public half goes into the roster."""

    def __init__(self, client: int):
        self.client = client
        self._key = Ed25519PrivateKey.generate()

    def public(self) -> str:
        return self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()

    def sign(self, *parts) -> str:
        return self._key.sign(_canonical(*parts)).hex()


def _verify(roster: dict[int, str], signer: int, sig: str, parts: tuple, by: int, what: str) -> None:
    """One line unless ``sig`` is ``signer``'s enrolled identity's signature of ``parts``."""
    if signer not in roster:
        raise HuscfError(f"client {by} refuses {what} from client {signer}: it is not in the enrolled roster")
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(roster[signer])).verify(bytes.fromhex(sig),
                                                                                 _canonical(*parts))
    except (InvalidSignature, ValueError):
        raise HuscfError(f"client {by} refuses {what} from client {signer}: the signature does not verify against "
                         f"its enrolled identity key (keys or lists the server made up)") from None


def _public(key: X25519PrivateKey) -> str:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def _agree(own: X25519PrivateKey, peer_public: str, purpose: str, a: int, b: int) -> bytes:
    """The 32-byte secret clients ``a`` and ``b`` share for ``purpose`` (X25519, then HKDF-SHA256)."""
    lo, hi = sorted((a, b))
    shared = own.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(peer_public)))
    return HKDF(hashes.SHA256(), 32, salt=None, info=f"huscf secure aggregation {purpose} {lo}-{hi}".encode()
                ).derive(shared)


def _split(secret: bytes, t: int, n: int) -> list[bytes]:
    """``secret`` (16-byte multiple) as ``n`` shares, any ``t`` of which rebuild it; share h has index h + 1."""
    parts = [Shamir.split(t, n, secret[o:o + 16]) for o in range(0, len(secret), 16)]
    return [b"".join(p[h][1] for p in parts) for h in range(n)]


def _combine(shares: dict[int, bytes], t: int) -> bytes:
    """The secret of ``shares`` ({index: share}), given at least its threshold ``t`` of them (only
    ``t`` are used: interpolation costs t^2 multiplications in pure Python)."""
    used = sorted(shares.items())[:t]
    size = len(used[0][1])
    return b"".join(Shamir.combine([(i, s[o:o + 16]) for i, s in used]) for o in range(0, size, 16))


class SecAggClient:
    """One client's side of one round end, in the order the server drives it: ``advertise``,
    ``share_keys``, ``masked``, ``sign_survivors``, ``unmask``; each runs once, in that order."""

    def __init__(self, client: int, identity: Identity, roster: dict[int, str], round_idx: int, policy: Policy):
        if roster.get(client) != identity.public():
            raise HuscfError(f"client {client}'s identity key is not the one the roster enrolled")
        self.client, self.identity, self.roster, self.round, self.policy = client, identity, roster, round_idx, policy
        self._c, self._s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        self._step = 0
        self._self_seeds: dict[int, bytes] = {}  # sum -> b_uk
        self._hiding_keys: dict[int, bytes] = {}  # hidden sum -> its members' shared key (made by its lowest id)
        self._pairs: dict[int, bytes] = {}

    def _next(self, step: int, what: str) -> None:
        if self._step != step:
            raise HuscfError(f"client {self.client} refuses to {what} in round {self.round + 1}: each step of secure "
                             f"aggregation runs once and in order (a second answer could reveal both shares of a peer)")
        self._step += 1

    def advertise(self) -> dict[str, str]:
        self._next(0, "advertise keys")
        c, s = _public(self._c), _public(self._s)
        self._own = {"c_pk": c, "s_pk": s, "sig": self.identity.sign("keys", self.round, self.client, c, s)}
        return dict(self._own)

    def share_keys(self, plan: SecurePlan, keys: dict[int, dict[str, str]]) -> dict[int, str]:
        """{peer: its shares, sealed to it}, after checking every peer's keys and the plan."""
        self._next(1, "share keys")
        if plan.round != self.round:
            raise HuscfError(f"client {self.client} refuses a plan for round {plan.round + 1} in round "
                             f"{self.round + 1}")
        if keys.get(self.client) != self._own:
            raise HuscfError(f"client {self.client} refuses the key list: its own keys are not the ones it advertised")
        for j, k in keys.items():
            _verify(self.roster, j, k.get("sig", ""), ("keys", self.round, j, k.get("c_pk"), k.get("s_pk")),
                    self.client, "round keys")
        self.plan, self.keys, self.u1 = plan, keys, sorted(keys)
        check_plan(plan, self.client, self.policy, set(self.u1))
        key_shares = _split(self._s.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
                            key_threshold(len(self.u1)), len(self.u1))
        mask_shares: dict[int, dict[int, bytes]] = {}
        for k in plan.of(self.client):
            holders = [j for j in plan.sums[k].members if j != self.client]
            self._self_seeds[k] = os.urandom(16)
            mask_shares[k] = dict(zip(holders, _split(self._self_seeds[k], mask_threshold(len(holders)),
                                                      len(holders))))
            if plan.sums[k].hidden and self.client == min(plan.sums[k].members):
                self._hiding_keys[k] = os.urandom(32)
        sealed = {}
        for pos, v in enumerate(self.u1):
            if v != self.client:
                payload = {"key": key_shares[pos].hex(),
                           "masks": {str(k): sh[v].hex() for k, sh in mask_shares.items() if v in sh},
                           "hiding": {str(k): h.hex() for k, h in self._hiding_keys.items()
                                      if v in plan.sums[k].members}}
                nonce = os.urandom(12)
                sealed[v] = (nonce + ChaCha20Poly1305(self._seal_key(v)).encrypt(
                    nonce, json.dumps(payload).encode(), _canonical("shares", self.round, self.client, v))).hex()
        return sealed

    def _seal_key(self, peer: int) -> bytes:
        return _agree(self._c, self.keys[peer]["c_pk"], "shares", self.client, peer)

    def _pair(self, peer: int) -> bytes:
        if peer not in self._pairs:
            self._pairs[peer] = _agree(self._s, self.keys[peer]["s_pk"], "masks", self.client, peer)
        return self._pairs[peer]

    def masked(self, segments, inbox: dict[int, str]) -> dict[int, np.ndarray]:
        """{sum: masked words} for every sum with ``min_members`` members that shared keys;
        ``segments``: this client's ``ClientSegments``; ``inbox``: {peer: what it sealed to us}."""
        self._next(2, "mask its segments")
        self.held = {}
        for u, box in inbox.items():
            if u == self.client or u not in self.keys:
                raise HuscfError(f"client {self.client} refuses shares from client {u}, which advertised no keys")
            try:
                raw = bytes.fromhex(box)
                payload = ChaCha20Poly1305(self._seal_key(u)).decrypt(
                    raw[:12], raw[12:], _canonical("shares", self.round, u, self.client))
            except (InvalidTag, ValueError):
                raise HuscfError(f"client {self.client} cannot open the shares of client {u}: they were not "
                                 f"sealed by it for this round (altered on the way)") from None
            self.held[u] = json.loads(payload)
        self.u2 = set(inbox) | {self.client}
        if len(self.u2) < key_threshold(len(self.u1)):
            return {}  # too few shared keys to rebuild any dropout's: nothing can be opened
        out = {}
        for k in self.plan.of(self.client):
            s = self.plan.sums[k]
            what = f"{s.net} block {s.block}"
            if self.policy.hide_ends and not s.hidden and s.block in (0, max(map(int, segments.nets[s.net]))):
                raise HuscfError(f"client {self.client} refuses to send {what} in a sum the server opens: "
                                 f"federation.hide_ends keeps the first and last blocks from the server")
            live = [j for j in s.members if j in self.u2]
            hiding = self._hiding_key(k) if s.hidden else None
            if len(live) < self.policy.min_members or (s.hidden and hiding is None):
                continue
            theta = block_vector(segments.nets[s.net][str(s.block)])
            check_range(theta, self.client, what)  # the copy's own range: see federation.secure, step 3
            x = encode(s.weights[s.members.index(self.client)] * theta, self.client, what)
            x = x + mask_stream(self_seed(self._self_seeds[k], self.round, k), x.size)  # wraps mod 2^64
            if hiding is not None:  # stays in the opened sum: only the sum's members can remove it
                x = x + mask_stream(hiding_seed(hiding, self.round, k, self.client), x.size)
            for j in live:
                if j != self.client:
                    mask = mask_stream(pair_seed(self._pair(j), self.round, k), x.size)
                    x = x + mask if self.client < j else x - mask
            out[k] = x
        return out

    def _hiding_key(self, k: int) -> bytes | None:
        """Hidden sum ``k``'s shared key: made here, or sealed to us by its lowest member (None: it
        shared nothing, so the sum cannot be opened by its members and is not sent)."""
        if k in self._hiding_keys:
            return self._hiding_keys[k]
        box = self.held.get(min(self.plan.sums[k].members), {}).get("hiding", {}).get(str(k))
        return None if box is None else bytes.fromhex(box)

    def open_hidden(self, index: int, members: tuple[int, ...], words: np.ndarray | None) -> np.ndarray:
        """The average of hidden sum ``index`` that the server summed over ``members`` (the
        survivors): its ``words`` less those members' hiding masks."""
        s = self.plan.sums[index]
        key = self._hiding_key(index) if s.hidden and self.client in members else None
        if key is None or words is None:
            raise HuscfError(f"client {self.client} cannot open sum {index}: it is not a hidden sum of its own")
        total = words
        for i in members:
            total = total - mask_stream(hiding_seed(key, self.round, index, i), total.size)
        mean = decode(total) / sum(s.weights[s.members.index(i)] for i in members)
        check_range(mean, self.client, f"the opened {s.net} block {s.block}")  # garbage from the server: refused
        return mean

    def sign_survivors(self, survivors: list[int]) -> str | None:
        """This client's signature on the survivor list U3; None when too few survive to open anything."""
        self._next(3, "sign the survivors")
        u3 = sorted(set(survivors))
        if not set(u3) <= self.u2 or self.client not in u3:
            raise HuscfError(f"client {self.client} refuses the survivor list {u3}: it must hold this client and "
                             f"only clients that shared keys")
        if len(u3) < key_threshold(len(self.u1)):
            return None
        self.u3 = u3
        return self.identity.sign("survivors", self.round, u3)

    def unmask(self, signatures: dict[int, str]) -> dict[str, dict]:
        """{"keys": {v: key share}, "masks": {v: {sum: self-mask share}}}: for each peer one or the other."""
        self._next(4, "unmask")
        t = key_threshold(len(self.u1))
        if not set(signatures) <= set(self.u3) or len(signatures) < t:
            raise HuscfError(f"client {self.client} refuses to unmask: {len(signatures)} survivors signed the "
                             f"survivor list, it needs {t} of the survivors {self.u3}")
        for j, sig in signatures.items():
            _verify(self.roster, j, sig, ("survivors", self.round, self.u3), self.client,
                    "the survivor list (the server showed clients different lists)")
        keys = {v: self.held[v]["key"] for v in sorted(self.u2 - set(self.u3) - {self.client})}
        masks: dict[int, dict[int, str]] = {}
        for v in self.u3:
            for k, share in self.held.get(v, {}).get("masks", {}).items():
                if sum(j in self.u3 for j in self.plan.sums[int(k)].members) >= self.policy.min_members:
                    masks.setdefault(v, {})[int(k)] = share
        return {"keys": keys, "masks": masks}


def check_plan(plan: SecurePlan, client: int, policy: Policy, keyed: set[int]) -> None:
    """One line unless every sum ``client`` is in has ``policy.min_members`` distinct members that
    all advertised keys, weights a convex combination within ``policy.max_weight_ratio``, and no
    two of its sums average the same block (two overlapping sums would differ by one client)."""
    seen = set()
    for k in plan.of(client):
        s = plan.sums[k]
        where = f"client {client} refuses the sum of {s.net} block {s.block}"
        if (s.net, s.block) in seen:
            raise HuscfError(f"{where}: it is in two sums of that block (their difference isolates clients)")
        seen.add((s.net, s.block))
        if len(set(s.members)) != len(s.members) or len(s.members) < policy.min_members:
            raise HuscfError(f"{where}: {len(set(s.members))} members, it needs {policy.min_members}")
        if not set(s.members) <= keyed:
            raise HuscfError(f"{where}: members {sorted(set(s.members) - keyed)} advertised no keys")
        check_sum(s, client)
        w = np.asarray(s.weights)
        if w.min() <= 0 or w.max() / w.min() > policy.max_weight_ratio * (1 + 1e-9):
            raise HuscfError(f"{where}: its weights {list(s.weights)} put more than {policy.max_weight_ratio:g} "
                             f"times one member's weight on another (federation.secure_max_weight_ratio)")


class SecAggServer:
    """The server's side of one round end: it relays, collects and opens; it holds no secret."""

    def __init__(self, plan: SecurePlan, policy: Policy):
        self.plan, self.policy = plan, policy
        self.keys: dict[int, dict[str, str]] = {}
        self.u2: set[int] = set()
        self.words: dict[int, dict[int, np.ndarray]] = {}
        self.u3: list[int] | None = None

    def advertised(self, keys: dict[int, dict[str, str]]) -> dict[int, dict[str, str]]:
        self.keys = dict(keys)
        return self.keys

    def route(self, sealed: dict[int, dict[int, str]]) -> dict[int, dict[int, str]]:
        """Each sender's sealed shares, regrouped by recipient (U2: the senders)."""
        self.u2 = set(sealed)
        return {v: {u: boxes[v] for u, boxes in sealed.items() if v in boxes} for v in self.u2}

    def receive_masked(self, client: int, words: dict[int, np.ndarray]) -> None:
        """Keep ``client``'s words; after the survivors were named a late delivery is dropped."""
        if self.u3 is None and client in self.u2:
            self.words[client] = words

    def survivors(self) -> list[int]:
        self.u3 = sorted(self.words)
        return self.u3

    def signatures(self, signed: dict[int, str | None]) -> dict[int, str]:
        """The survivors' signatures on the survivor list to pass on, or none when fewer than
        ``key_threshold`` signed: then no honest client unmasks, and every sum stays closed."""
        kept = {i: sig for i, sig in signed.items() if sig is not None}
        return kept if len(kept) >= key_threshold(len(self.keys)) else {}

    def open(self, answers: dict[int, dict[str, dict]]) -> list[OpenedSum]:
        """Rebuild the dropouts' keys and the survivors' self masks from ``answers`` and open every
        sum that has ``min_members`` survivors and enough shares; the others stay closed."""
        u1, survivors = sorted(self.keys), set(self.u3 or [])
        answers = {x: a for x, a in answers.items() if x in survivors}
        dropped_keys, t_key = {}, key_threshold(len(u1))
        for v in self.u2 - survivors:
            shares = {u1.index(x) + 1: bytes.fromhex(a["keys"][v]) for x, a in answers.items() if v in a["keys"]}
            if len(shares) >= t_key:
                dropped_keys[v] = X25519PrivateKey.from_private_bytes(_combine(shares, t_key))
        opened = []
        for k, s in enumerate(self.plan.sums):
            live = [j for j in s.members if j in self.u2]
            got = [i for i in live if k in self.words.get(i, {})]
            gone = [j for j in live if j not in got]
            if len(live) < self.policy.min_members or len(got) < self.policy.min_members \
                    or any(j not in dropped_keys for j in gone):
                continue
            total = np.sum([self.words[i][k] for i in got], axis=0, dtype=np.uint64)  # wraps mod 2^64
            for i in got:
                holders = [j for j in s.members if j != i]
                shares = {holders.index(x) + 1: bytes.fromhex(a["masks"][i][k]) for x, a in answers.items()
                          if x in holders and k in a["masks"].get(i, {})}
                t = mask_threshold(len(holders))
                if len(shares) < t:
                    break
                total = total - mask_stream(self_seed(_combine(shares, t), self.plan.round, k), total.size)
                for j in gone:
                    mask = mask_stream(pair_seed(_agree(dropped_keys[j], self.keys[i]["s_pk"], "masks", i, j),
                                                 self.plan.round, k), total.size)
                    total = total - mask if i < j else total + mask  # undo what i added for the pair (i, j)
            else:
                w = np.asarray([s.weights[s.members.index(i)] for i in got])
                server_weight = float(sum(s.server_weights[s.members.index(i)] for i in got))
                opened.append(OpenedSum(k, tuple(got), None, server_weight, words=total) if s.hidden else
                              OpenedSum(k, tuple(got), decode(total) / w.sum(), server_weight))
        return opened


@dataclass
class Enrollment:
    """Identities and their roster for clients in one process (the simulation engines, tests)."""

    identities: dict[int, Identity]

    @classmethod
    def of(cls, clients) -> "Enrollment":
        return cls({i: Identity(i) for i in clients})

    @property
    def roster(self) -> dict[int, str]:
        return {i: p.public() for i, p in self.identities.items()}


def secure_sums(model, plan: SecurePlan, policy: Policy, drop: frozenset[int] = frozenset(),
                enrollment: Enrollment | None = None, sent: dict[int, int] | None = None) -> list[OpenedSum]:
    """The protocol's client and server sides in one process (the simulation engines): the plan's
    members mask their own segments of ``model``, the server opens the sums. ``drop``: members
    that shared keys but never deliver their masked words (tests); ``sent``: if given, each
    member's bytes sent are added to it (JSON for the protocol's steps, 8 per masked word)."""
    members = sorted({i for s in plan.sums for i in s.members})
    enrollment = enrollment or Enrollment.of(members)
    roster = enrollment.roster
    parties = {i: SecAggClient(i, enrollment.identities[i], roster, plan.round, policy) for i in members}
    server = SecAggServer(plan, policy)

    def count(i: int, out, size: int | None = None):
        """``out`` as sent by ``i``; its bytes (``size``, else its JSON's) added to ``sent``."""
        if sent is not None and out is not None:
            sent[i] = sent.get(i, 0) + (len(json.dumps(out)) if size is None else size)
        return out

    keys = server.advertised({i: count(i, p.advertise()) for i, p in parties.items()})
    inbox = server.route({i: count(i, p.share_keys(plan, keys)) for i, p in parties.items()})
    for i, p in parties.items():
        words = p.masked(model.clients[i], inbox.get(i, {}))
        if i not in drop:
            server.receive_masked(i, count(i, words, sum(8 * v.size for v in words.values())))
    survivors = server.survivors()
    signatures = server.signatures({i: count(i, parties[i].sign_survivors(survivors)) for i in survivors})
    if not signatures:
        return []
    opened = server.open({i: count(i, parties[i].unmask(signatures)) for i in signatures})
    # a hidden sum's words go back to its members, who remove their hiding masks (each gets the same)
    return [o if o.mean is not None
            else dataclasses.replace(o, mean=parties[o.members[0]].open_hidden(o.index, o.members, o.words))
            for o in opened]


def secure_average(model, agg, clients: list[int], round_idx: int, policy: Policy = Policy(),
                   drop: frozenset[int] = frozenset()) -> dict:
    """Plan, mask, open and apply with the shared body (``secure_sums`` + ``apply_opened``);
    returns the round's record."""
    plan = plan_sums(model, agg, clients, round_idx, policy)
    return apply_opened(model, plan, secure_sums(model, plan, policy, drop))
