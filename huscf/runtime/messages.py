"""The typed message layer: every payload that crosses a process boundary in the Ray runtime.

A sender turns tensors into a ``Message`` with ``Wire.pack(kind, dst, client, tensors, meta)``;
the receiver reads them back with ``Message.tensor(name)``. Tensors travel as numpy arrays (they
cross Ray's object store about twice as fast as torch tensors; bf16 travels as its int16 bits).

``Wire.pack`` is where the privacy rules are enforced and the audit is written:

* every message has one of the ``KINDS`` below; a client may only send ``CLIENT_KINDS``;
* nothing a client sends is integer-typed (labels are), shaped like a batch of its images, or one
  value per sample (a discriminator output); ``weights``/``state`` carry only that client's own
  segment (``clients.{i}.``) keys and optimiser moments; ``meta`` is small JSON (<= 4 KiB);
* the one exception to "no integers": a ``masked`` message's uint64 words, each array exactly as
  long as one of the client's own blocks (secure aggregation);
* every message is counted in the sender's ``AuditLog`` by (round, kind, src, dst, client, net,
  block, name, shape, dtype) with its bytes. The driver drains every log into ``audit.jsonl``.

A violation raises ``PrivacyViolation`` in the sender before anything leaves the process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch

from huscf.errors import HuscfError

KINDS = {
    "activation": "a cut-layer activation, client <-> server (forward pass)",
    "gradient": "the gradient of a cut-layer activation, client <-> server (backward pass)",
    "noise": "latent vectors z for one iteration, driver -> client (random numbers, no data)",
    "weights": "client-side segment weights for aggregation, client <-> server",
    "state": "weights and optimiser moments, to the driver's checkpoint or back on a restart",
    "metric": "scalar losses and counts, client -> driver",
    "control": "orchestration: round, epoch, iteration, client ids, cluster assignment (no tensors)",
    "given": "samples and labels a method hands a client for one epoch (Engine.give), driver -> client",
    # secure aggregation (federation/secagg.py)
    "keys": "a client's two public keys for one round end, signed with its identity key, client -> server",
    "shares": "a client's key and self-mask shares for one peer, sealed to that peer, client -> server -> peer",
    "masked": "a client's weighted segment blocks under its self and pair masks, client -> server (uint64 words)",
    "signed": "a client's signature on the round end's survivor list, client -> server -> every survivor",
    "unmask": "a survivor's share of one peer's key (the peer dropped) or self masks (it survived), client -> server",
    "opened": "a hidden sum's words under its members' hiding masks, server -> each member (federation.hide_ends)",
}
# what a client may send; "control" is the driver's and the server's alone
CLIENT_KINDS = frozenset({"activation", "gradient", "weights", "state", "metric", "keys", "shares", "masked", "signed",
                          "unmask"})
META_LIMIT = 4096  # bytes of JSON a client may attach to one message
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


class PrivacyViolation(HuscfError):
    """A client tried to send something that must never leave it."""


@dataclass
class Message:
    """One payload crossing a process boundary."""

    kind: str
    src: str  # "client:3", "server", "driver"
    dst: str
    client: int | None  # the client it concerns (None: the server's own or a broadcast)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)  # torch dtype per array
    meta: dict = field(default_factory=dict)

    def tensor(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        a = self.arrays[name]
        t = torch.from_numpy(a if a.flags.writeable else a.copy())
        if self.dtypes[name] == "bfloat16":
            t = t.view(torch.bfloat16)
        return t.to(device)

    def tensors(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return {name: self.tensor(name, device) for name in self.arrays}


def _to_numpy(t: torch.Tensor) -> tuple[np.ndarray, str]:
    t = t.detach().to("cpu")
    dtype = str(t.dtype).removeprefix("torch.")
    if t.dtype == torch.bfloat16:
        t = t.contiguous().view(torch.int16)
    return t.contiguous().numpy(), dtype


class AuditLog:
    """Bytes and counts of every message a process sent, grouped per round."""

    def __init__(self) -> None:
        self.round = 0
        self._rows: dict[tuple, dict] = {}

    def record(self, m: Message) -> None:
        items = [(name, a.shape, m.dtypes[name], a.nbytes) for name, a in m.arrays.items()]
        if m.meta:
            items.append(("meta", (), "json", len(json.dumps(m.meta, default=str))))
        if not items:
            items.append(("", (), "", 0))
        net, block = m.meta.get("net"), m.meta.get("block")
        for name, shape, dtype, nbytes in items:
            shape = tuple(int(s) for s in shape)
            key = (self.round, m.kind, m.src, m.dst, m.client, net, block, name, shape, dtype)
            row = self._rows.setdefault(key, {
                "round": self.round, "kind": m.kind, "src": m.src, "dst": m.dst, "client": m.client, "net": net,
                "block": block, "name": name, "shape": list(shape), "dtype": dtype, "count": 0, "bytes": 0})
            row["count"] += 1
            row["bytes"] += int(nbytes)

    def drain(self) -> list[dict]:
        rows, self._rows = list(self._rows.values()), {}
        return rows


@dataclass(frozen=True)
class ClientContract:
    """What one client's messages may carry, derived from its cuts and segments: the per-sample
    shape of every cut-layer array ((kind, net) -> shape; absent: that net does not cross), the
    shape of every tensor of its own segment, and its optimisers' parameter shapes in order."""

    cut: dict[tuple[str, str], tuple[int, ...]]
    segment: dict[str, tuple[int, ...]]
    opt_params: dict[str, list[tuple[int, ...]]]
    # the floating-point values of each of its blocks ("G/1" -> count): a masked sum's length
    block_sizes: dict[str, int] = field(default_factory=dict)


CUT_NAMES = {"G": {"h"}, "D": {"fake", "real"}}  # the arrays of a cut-layer message, by net
OPT_KEYS = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"}
_SCALARS = (int, float, bool, str, type(None))


class PrivacyGuard:
    """The rules for what a client may send (see the module docstring). With ``contracts`` (one per
    client of the sending process) every array must have exactly the shape the client's cuts and
    segments produce, so a reshaped image or a one-hot label has no shape to hide in; metadata is
    checked against each kind's schema (no arrays in it)."""

    def __init__(self, image_shape: tuple[int, ...], contracts: dict[int, ClientContract] | None = None,
                 batch_size: int | None = None, dtypes: tuple[str, ...] = FLOAT_DTYPES):
        """``dtypes``: the float dtypes the run computes in (``run_dtypes``); any other is refused."""
        self.image_shape = tuple(image_shape)
        self.contracts, self.batch_size, self.dtypes = contracts, batch_size, tuple(dtypes)

    def check(self, m: Message) -> None:
        def refuse(why: str) -> None:
            raise PrivacyViolation(f"client {m.client} may not send {why} ({m.kind} message to {m.dst})")

        if m.kind not in CLIENT_KINDS:
            refuse(f"a '{m.kind}' message")
        if len(json.dumps(m.meta, default=str)) > META_LIMIT:
            refuse(f"more than {META_LIMIT} bytes of metadata")
        if self.contracts is not None and m.arrays and m.client not in self.contracts:
            refuse(f"arrays for client {m.client}, which this process does not host")
        contract = (self.contracts or {}).get(m.client)
        for name, a in m.arrays.items():
            if m.kind == "masked":
                if m.dtypes[name] != "uint64" or a.ndim != 1 or not name.startswith("masked/"):
                    refuse(f"'{name}' ({m.dtypes[name]}, {a.ndim}-d): a masked sum is one uint64 vector 'masked/K'")
                if contract is not None and a.size not in contract.block_sizes.values():
                    refuse(f"a masked '{name}' of {a.size} words: none of its blocks has that many values")
                continue
            if m.dtypes[name] not in FLOAT_DTYPES:
                refuse(f"an integer array '{name}' (labels never leave a client)")
            # Adam's step counter is a float32 scalar whatever the weights' dtype (torch's choice)
            allowed = self.dtypes + (("float32",) if name.startswith("opt/") and name.endswith("/step") else ())
            if m.dtypes[name] not in allowed:
                refuse(f"'{name}' in {m.dtypes[name]}: the run computes in {' or '.join(self.dtypes)}")
            if not bool(torch.isfinite(m.tensor(name)).all()):  # through torch: bf16 travels as int16
                refuse(f"'{name}' with values that are not finite (NaN or infinity)")
            if m.kind in ("weights", "state"):
                if not name.startswith((f"clients.{m.client}.", "opt/")):
                    refuse(f"'{name}', which is not its own segment")
                if contract is not None:
                    self._check_segment(name, tuple(a.shape), contract, refuse)
                continue
            if m.kind not in ("activation", "gradient"):
                refuse(f"array '{name}' in a '{m.kind}' message")
            if tuple(a.shape[1:]) == self.image_shape:
                refuse(f"'{name}' shaped like a batch of its images {tuple(a.shape)}")
            if a.ndim <= 1 or tuple(a.shape[1:]) == (1,):
                refuse(f"'{name}' with one value per sample {tuple(a.shape)} (labels or discriminator outputs)")
            if contract is not None:
                net = m.meta.get("net")
                want = contract.cut.get((m.kind, net))
                if want is None or name not in CUT_NAMES.get(net, ()):
                    refuse(f"'{name}': no {m.kind} of net {net} crosses its cuts under that name")
                if tuple(a.shape[1:]) != want or not 1 <= a.shape[0] <= (self.batch_size or a.shape[0]):
                    refuse(f"'{name}' of shape {tuple(a.shape)}: its cut produces (batch <= {self.batch_size}, "
                           f"{', '.join(map(str, want))})")
        self._check_meta(m, contract, refuse)

    @staticmethod
    def _check_segment(name: str, shape: tuple[int, ...], contract: ClientContract, refuse) -> None:
        if name.startswith("opt/"):
            parts = name.split("/")
            ok = (len(parts) == 4 and parts[1] in contract.opt_params and parts[2].isdigit()
                  and int(parts[2]) < len(contract.opt_params[parts[1]]) and parts[3] in OPT_KEYS)
            if not ok:
                refuse(f"'{name}', which is not one of its optimiser states")
            want = () if parts[3] == "step" else contract.opt_params[parts[1]][int(parts[2])]
        else:
            if name not in contract.segment:
                refuse(f"'{name}', which is not a tensor of its segment")
            want = contract.segment[name]
        if shape != tuple(want):
            refuse(f"'{name}' of shape {shape}: its segment's is {tuple(want)}")

    def _check_meta(self, m: Message, contract: ClientContract | None, refuse) -> None:
        """Each kind's metadata schema: named keys with scalar values, no arrays."""
        meta = m.meta
        hosted = None if self.contracts is None else {str(i) for i in self.contracts}

        def only(keys: set[str]) -> None:
            if extra := sorted(set(meta) - keys):
                refuse(f"metadata key '{extra[0]}' in a '{m.kind}' message")

        if m.kind in ("activation", "gradient"):
            only({"net", "collect"})
            if meta.get("net") not in ("G", "D") or not isinstance(meta.get("collect", False), bool):
                refuse("cut-layer metadata other than its net (G or D) and whether features are collected")
        elif m.kind == "metric":
            only({"loss_d", "loss_g", "skipped"})
            for key in ("loss_d", "loss_g"):
                losses = meta.get(key, {})
                if not isinstance(losses, dict) or not all(
                        isinstance(v, (int, float)) and not isinstance(v, bool) for v in losses.values()):
                    refuse(f"'{key}' other than one loss per client")
                if hosted is not None and not set(losses) <= hosted:
                    refuse(f"'{key}' for clients it does not host")
            skipped = meta.get("skipped", [])
            if not isinstance(skipped, list) or any(not isinstance(i, int) or isinstance(i, bool) for i in skipped):
                refuse("'skipped' other than a list of client ids")
            if hosted is not None and not {str(i) for i in skipped} <= hosted:
                refuse("'skipped' with clients it does not host")
        elif m.kind == "weights":
            only(set())  # the arrays say everything: no metadata, so no free text
        elif m.kind == "keys":
            only({"c_pk", "s_pk", "sig"})
            if not (_is_hex(meta.get("c_pk"), 64) and _is_hex(meta.get("s_pk"), 64) and _is_hex(meta.get("sig"), 128)):
                refuse("keys other than two 32-byte public keys and a 64-byte signature, in hex")
        elif m.kind == "shares":
            only({"to", "sealed"})
            sealed = meta.get("sealed")
            if not (_is_id(meta.get("to")) and isinstance(sealed, str) and len(sealed) % 2 == 0
                    and _is_hex(sealed, len(sealed)) and len(sealed) >= 2 * (12 + 16)):
                refuse("shares other than one peer's id and a sealed box (nonce, ciphertext, tag) in hex")
        elif m.kind == "masked":
            only({"round"})
            if not _is_id(meta.get("round")):
                refuse("masked-sum metadata other than the round")
        elif m.kind == "signed":
            only({"survivors", "sig"})
            survivors = meta.get("survivors")
            if not (isinstance(survivors, list) and all(_is_id(i) for i in survivors)
                    and _is_hex(meta.get("sig"), 128)):
                refuse("a signed survivor list other than client ids and a 64-byte signature in hex")
        elif m.kind == "unmask":
            masks = meta.get("masks")
            ok = _is_id(meta.get("peer")) and (
                set(meta) == {"peer", "key"} and _is_hex(meta["key"], 64)
                or set(meta) == {"peer", "masks"} and isinstance(masks, dict) and bool(masks)
                and all(k.isdigit() and _is_hex(v, 32) for k, v in masks.items()))
            if not ok:
                refuse("an unmask other than one peer's key share (32 bytes) or self-mask shares (sum -> 16 bytes), "
                       "in hex")
        elif m.kind == "state":
            only({"param_groups"})
            for net, groups in meta.get("param_groups", {}).items():
                limit = None if contract is None else len(contract.opt_params.get(net, []))
                for group in groups if isinstance(groups, list) else [None]:
                    if not isinstance(group, dict):
                        refuse("optimiser parameter groups that are not objects")
                    for key, v in group.items():
                        if key == "params":
                            ok = isinstance(v, list) and all(isinstance(i, int) and (limit is None or 0 <= i < limit)
                                                             for i in v)
                        elif key == "betas":
                            ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(
                                isinstance(b, (int, float)) for b in v)
                        else:
                            ok = isinstance(v, _SCALARS)
                        if not ok:
                            refuse(f"optimiser setting '{key}' = {str(v)[:40]}")
        elif meta and any(not isinstance(v, _SCALARS) for v in meta.values()):
            refuse(f"array-valued metadata in a '{m.kind}' message")


def run_dtypes(precision: str) -> tuple[str, ...]:
    """The float dtypes a run with ``compute.precision`` (resolved: fp32, bf16 or fp64) sends:
    its weights' dtype, and bf16 activations under bf16 autocast."""
    return {"fp64": ("float64",), "bf16": ("float32", "bfloat16")}.get(precision, ("float32",))


def _is_id(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_hex(v, length: int) -> bool:
    return isinstance(v, str) and len(v) == length and all(c in "0123456789abcdef" for c in v)


class Wire:
    """One process's end of the message layer: packs, checks and counts what it sends."""

    def __init__(self, name: str, guard: PrivacyGuard | None = None):
        self.name, self.guard, self.audit = name, guard, AuditLog()

    def pack(self, kind: str, dst: str, client: int | None = None,
             tensors: dict[str, torch.Tensor | np.ndarray] | None = None,
             meta: dict | None = None, src: str | None = None) -> Message:
        if kind not in KINDS:
            raise ValueError(f"unknown message kind {kind!r}")
        m = Message(kind, src or self.name, dst, client, meta=dict(meta or {}))
        for name, t in (tensors or {}).items():
            m.arrays[name], m.dtypes[name] = (t, str(t.dtype)) if isinstance(t, np.ndarray) else _to_numpy(t)
        if self.guard is not None:
            self.guard.check(m)
        self.audit.record(m)
        return m


def pack_state(prefix_state: dict[str, torch.Tensor], opt_states: dict[str, dict]) -> tuple[dict, dict]:
    """Model tensors plus optimiser state dicts (``{net: optimizer.state_dict()}``) as flat
    ``{name: tensor}`` (optimiser moments under ``opt/NET/PARAM/KEY``) and the optimisers' param
    groups as metadata."""
    tensors = dict(prefix_state)
    for net, sd in opt_states.items():
        for pid, st in sd["state"].items():
            for key, v in st.items():
                tensors[f"opt/{net}/{pid}/{key}"] = v if torch.is_tensor(v) else torch.tensor(float(v))
    return tensors, {"param_groups": {net: sd["param_groups"] for net, sd in opt_states.items()}}


def unpack_state(tensors: dict[str, torch.Tensor], meta: dict) -> tuple[dict, dict]:
    """The inverse of ``pack_state``: (model tensors, {net: optimiser state dict})."""
    model = {k: v for k, v in tensors.items() if not k.startswith("opt/")}
    opts = {net: {"state": {}, "param_groups": groups} for net, groups in meta["param_groups"].items()}
    for k, v in tensors.items():
        if k.startswith("opt/"):
            _, net, pid, key = k.split("/")
            opts[net]["state"].setdefault(int(pid), {})[key] = v
    return model, opts
