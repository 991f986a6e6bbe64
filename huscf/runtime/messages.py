"""The typed message layer: every payload that crosses a process boundary in the Ray runtime.

A sender turns tensors into a ``Message`` with ``Wire.pack(kind, dst, client, tensors, meta)``;
the receiver reads them back with ``Message.tensor(name)``. Tensors travel as numpy arrays (they
cross Ray's object store about twice as fast as torch tensors; bf16 travels as its int16 bits).

``Wire.pack`` is where the privacy rules are enforced and the audit is written:

* every message has one of the ``KINDS`` below; a client may only send ``CLIENT_KINDS``;
* nothing a client sends is integer-typed (labels are), shaped like a batch of its images, or one
  value per sample (a discriminator output); ``weights``/``state`` carry only that client's own
  segment (``clients.{i}.``) keys and optimiser moments; ``meta`` is small JSON (<= 4 KiB);
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
}
CLIENT_KINDS = frozenset({"activation", "gradient", "weights", "state", "metric", "control"})
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
        for name, shape, dtype, nbytes in items:
            key = (self.round, m.kind, m.src, m.dst, m.client, m.meta.get("net"), m.meta.get("block"), name,
                   tuple(int(s) for s in shape), dtype)
            row = self._rows.get(key)
            if row is None:
                row = self._rows[key] = {
                    "round": key[0], "kind": m.kind, "src": m.src, "dst": m.dst, "client": m.client,
                    "net": key[5], "block": key[6], "name": name, "shape": list(key[8]), "dtype": dtype,
                    "count": 0, "bytes": 0}
            row["count"] += 1
            row["bytes"] += int(nbytes)

    def drain(self) -> list[dict]:
        rows, self._rows = list(self._rows.values()), {}
        return rows


class PrivacyGuard:
    """The rules for what a client may send (see the module docstring)."""

    def __init__(self, image_shape: tuple[int, ...]):
        self.image_shape = tuple(image_shape)

    def check(self, m: Message) -> None:
        def refuse(why: str) -> None:
            raise PrivacyViolation(f"client {m.client} may not send {why} ({m.kind} message to {m.dst})")

        if m.kind not in CLIENT_KINDS:
            refuse(f"a '{m.kind}' message")
        if len(json.dumps(m.meta, default=str)) > META_LIMIT:
            refuse(f"more than {META_LIMIT} bytes of metadata")
        for name, a in m.arrays.items():
            if m.dtypes[name] not in FLOAT_DTYPES:
                refuse(f"an integer array '{name}' (labels never leave a client)")
            if m.kind in ("weights", "state"):
                if not name.startswith((f"clients.{m.client}.", "opt/")):
                    refuse(f"'{name}', which is not its own segment")
                continue
            if m.kind not in ("activation", "gradient"):
                refuse(f"array '{name}' in a '{m.kind}' message")
            if tuple(a.shape[1:]) == self.image_shape:
                refuse(f"'{name}' shaped like a batch of its images {tuple(a.shape)}")
            if a.ndim <= 1 or tuple(a.shape[1:]) == (1,):
                refuse(f"'{name}' with one value per sample {tuple(a.shape)} (labels or discriminator outputs)")


class Wire:
    """One process's end of the message layer: packs, checks and counts what it sends."""

    def __init__(self, name: str, guard: PrivacyGuard | None = None):
        self.name, self.guard, self.audit = name, guard, AuditLog()

    def pack(self, kind: str, dst: str, client: int | None = None, tensors: dict[str, torch.Tensor] | None = None,
             meta: dict | None = None, src: str | None = None) -> Message:
        if kind not in KINDS:
            raise ValueError(f"unknown message kind {kind!r}")
        m = Message(kind, src or self.name, dst, client, meta=dict(meta or {}))
        for name, t in (tensors or {}).items():
            m.arrays[name], m.dtypes[name] = _to_numpy(t)
        if self.guard is not None:
            self.guard.check(m)
        self.audit.record(m)
        return m


def pack_state(prefix_state: dict[str, torch.Tensor], opt_states: dict[str, dict]) -> tuple[dict, dict]:
    """Model tensors plus optimiser state dicts (``{net: optimizer.state_dict()}``) as flat
    ``{name: tensor}`` (optimiser moments under ``opt/NET/PARAM/KEY``) and the optimisers' param
    groups as metadata."""
    tensors = dict(prefix_state)
    groups = {}
    for net, sd in opt_states.items():
        groups[net] = sd["param_groups"]
        for pid, st in sd["state"].items():
            for key, v in st.items():
                tensors[f"opt/{net}/{pid}/{key}"] = v if torch.is_tensor(v) else torch.tensor(float(v))
    return tensors, {"param_groups": groups}


def unpack_state(tensors: dict[str, torch.Tensor], meta: dict) -> tuple[dict, dict]:
    """The inverse of ``pack_state``: (model tensors, {net: optimiser state dict})."""
    model = {k: v for k, v in tensors.items() if not k.startswith("opt/")}
    opts = {net: {"state": {}, "param_groups": groups} for net, groups in meta["param_groups"].items()}
    for k, v in tensors.items():
        if k.startswith("opt/"):
            _, net, pid, key = k.split("/")
            opts[net]["state"].setdefault(int(pid), {})[key] = v
    return model, opts
