"""``ClientHost``: the Ray actor that hosts one or more clients.

For each client it alone loads and holds the partition, the head and tail segments of G and D
and their optimisers, and it computes the losses. It runs ``engines.objective``'s steps for its
clients as one group (``Pieces``): ``phase_a`` is steps 1 and 2, ``phase_b`` step 3; the driver
steps the server's optimisers between them. Each pass that crosses to the server is one batch of
messages for all hosted clients (``_cross``), kept on a tape that ``backward`` unwinds, sending
the gradients back the same way. Only activations and their gradients cross; every payload goes
through ``messages.Wire``.
"""

from __future__ import annotations

import os
import time

import torch

from huscf.engines import objective
from huscf.engines.objective import adam, check_finite
from huscf.engines.simulation import keyed_rng
from huscf.federation.secagg import Identity, SecAggClient
from huscf.federation.secure import SecurePlan, load_block_vector
from huscf.methods import secure_policy
from huscf.runtime.messages import Message, PrivacyGuard, Wire, pack_state, run_dtypes, unpack_state
from huscf.runtime.spec import RunSpec, contracts, leaf
from huscf.runsetup import load_client_data
from huscf.split.noise import SeamNoise
from huscf.split.segments import NETS, ClientSegments


def _stacked(rows: list[torch.Tensor]) -> torch.Tensor:
    """Per-client tensors as one, a row per client (no client left: an empty (0, 1))."""
    return torch.stack(rows) if rows else torch.zeros(0, 1)


class _PerClient(dict):
    """A host's fakes, one tensor per client (kept apart: each client's graph is its own), with
    ``detach`` as a tensor has it."""

    def detach(self) -> "_PerClient":
        return _PerClient({i: t.detach() for i, t in self.items()})


def _where(meta: dict) -> tuple[int, int, int]:
    return meta["round"], meta["epoch"], meta["t"]


class ClientHost:
    """Several clients in one process (one process per client does not scale: 350-400 MB each)."""

    def __init__(self, spec: RunSpec, clients: list[int], server, index: int):
        self.cfg, self.ex, g, d = spec.setup()
        self.ids, self.server, self.index = list(clients), server, index
        self.device = self.ex.torch_device
        self.segs = {i: ClientSegments(spec.cuts[i], g, d).to(self.device, self.ex.dtype) for i in self.ids}
        if self.ex.channels_last:
            for seg in self.segs.values():
                seg.to(memory_format=torch.channels_last)
        self.data = {i: (self.ex.layout(c.x.to(self.device, self.ex.dtype)), c.y.to(self.device))
                     for i, c in load_client_data(self.cfg, self.ids).items()}
        self.epoch_data = self.data  # begin_epoch adds what a client was given for that epoch
        fused = self.device.type == "cuda"
        self.opts = {i: {net: adam(self.segs[i].nets[net].parameters(), self.cfg.train, fused=fused) for net in NETS}
                     for i in self.ids}
        allowed = contracts(self.segs, g, d, spec.arch)
        self.wire = Wire(f"host:{index}", PrivacyGuard(spec.arch.image_shape, allowed, self.cfg.train.batch_size,
                                                       dtypes=run_dtypes(self.ex.precision)))
        self.batch_size = self.cfg.train.batch_size
        self.delay = {int(k): v for k, v in self.cfg.runtime.inject_delay_s.items()}
        self.perms: dict[int, torch.Tensor] = {}
        self.live: list[int] = []  # the clients still in this iteration (deadlines drop some)
        self._tape: list[tuple] = []  # the iteration's seam crossings, for ``backward`` (``_cross``)
        self._fakes: dict = {}  # step 1's fakes, with their graph, from phase A to phase B
        self._identities: dict[int, Identity] = {}  # secure aggregation: each client's identity key
        self._secagg: dict[int, SecAggClient] = {}  # and its side of this round end
        # what each client sends, activations and gradients, is clipped and noised here (split/noise.py)
        self.noise = SeamNoise.of(self.cfg.privacy, self.cfg.seed, stream=index + 1)

    # -- bookkeeping -------------------------------------------------------------------------------
    def pid(self) -> int:
        return os.getpid()

    def sizes(self) -> dict[int, int]:
        return {i: len(y) for i, (_, y) in self.data.items()}

    def begin_epoch(self, msg: Message, given: list[Message] = ()) -> None:
        """The epoch's permutations, over each client's partition plus the samples it was given
        for this epoch (``Engine.give``), appended as the one-process engines append them."""
        r, e = msg.meta["round"], msg.meta["epoch"]
        self.wire.audit.round = r + 1
        if self.noise is not None:
            self.noise.at(r, e)
        self.epoch_data = dict(self.data)
        for m in given:
            x, y = self.data[m.client]
            gx = self.ex.layout(m.tensor("x", self.device).to(self.ex.dtype))
            self.epoch_data[m.client] = (torch.cat([x, gx]), torch.cat([y, m.tensor("y", self.device)]))
        self.perms = {i: torch.from_numpy(keyed_rng(self.cfg.seed, r, e, i).permutation(len(y)))
                      for i, (_, y) in self.epoch_data.items()}

    def _batch(self, i: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client i's batch of iteration t; past its last batch (``Engine.equal_steps``) it starts over."""
        x, y = self.epoch_data[i]
        s = t % max(1, len(y) // self.batch_size)
        idx = self.perms[i][s * self.batch_size:(s + 1) * self.batch_size]
        return x[idx], y[idx]

    def _send(self, call, stage: str, kind: str, net: str, payload: dict[int, dict[str, torch.Tensor]],
              meta: dict | None = None) -> dict[int, Message]:
        """One batched crossing (the server's ``call``: forward or backward, of ``stage``) for the
        clients in ``payload``; replies by client."""
        if not payload:
            return {}
        msgs = [self.wire.pack(kind, "server", i, tensors, {"net": net, **(meta or {})}, src=f"client:{i}")
                for i, tensors in payload.items()]
        import ray

        return {m.client: m for m in ray.get(call.remote(stage, msgs))}

    # -- one iteration: ``objective``'s steps for the hosted clients, crossing as messages ----------
    per_row, recompute = True, False  # one group, the host's clients; their logits stacked

    def phase_a(self, control: Message, noise: list[Message]) -> Message:
        """Steps 1 and 2 (``objective``); the driver then steps the server's D."""
        meta = control.meta
        self._t0, self._deadline, self._collect = time.monotonic(), meta.get("deadline_s"), meta["collect"]
        self._z = {m.client: m.tensor("z", self.device).to(self.ex.dtype) for m in noise}  # drawn in fp32
        clients = sorted(self._z)
        self._batches = {i: self._batch(i, meta["t"]) for i in clients}
        self.live, self._tape = clients, []
        self._fakes = objective.generate_fakes(self, ["host"])
        losses = objective.discriminator_step(self, ["host"], self._fakes, _where(meta))["host"]
        return self.wire.pack("metric", "driver", None, meta={"loss_d": {str(i): v for i, v in losses.items()},
                                                              "skipped": [i for i in clients if i not in losses]})

    def phase_b(self, control: Message) -> Message:
        """Step 3 for the clients that finished phase A; the driver then steps the server's G."""
        losses = objective.generator_step(self, ["host"], self._fakes, _where(control.meta))["host"]
        self._tape = []
        return self.wire.pack("metric", "driver", None, meta={"loss_g": {str(i): v for i, v in losses.items()}})

    def _on_time(self) -> None:
        """Drop the clients past the iteration's deadline; an injected delay counts on its client's clock."""
        if self._deadline is not None:
            spent = time.monotonic() - self._t0
            self.live = [i for i in self.live if spent + self.delay.get(i, 0.0) <= self._deadline]

    def _cross(self, net: str, stage: str, heads: dict[str, dict[int, torch.Tensor]],
               meta: dict | None = None) -> dict[int, dict[str, torch.Tensor]]:
        """The live clients' head outputs of ``net`` through the server's body (its ``stage``
        forward, one message per client that has a server part); returns each live client's tail
        inputs: the reply as a leaf, or its head output where nothing crosses. The crossing is kept
        for ``backward``."""
        sent = [i for i in self.live if self.segs[i].sends(net)]
        if self.noise is not None:  # noised before it leaves; the client back-propagates through the clipping
            heads = {n: {i: self.noise(t) if i in sent else t for i, t in h.items()} for n, h in heads.items()}
        replies = self._send(self.server.forward, stage, "activation", net,
                             {i: {n: h[i] for n, h in heads.items()} for i in sent}, meta)
        leaves = {i: {n: leaf(r.tensor(n, self.device)) for n in heads} for i, r in replies.items()}
        self._tape.append((net, stage, heads, leaves))
        return {i: leaves.get(i) or {n: h[i] for n, h in heads.items()} for i in self.live}

    def _resolve(self, net: str, stage: str, heads: dict, leaves: dict) -> None:
        """A crossing backwards: the leaves' gradients to the server (its ``stage`` backward), the
        gradients it returns through the heads."""
        grads = {i: {n: leaf.grad for n, leaf in leaves[i].items()} for i in self.live if i in leaves}
        if self.noise is not None:  # clipped and noised before it leaves, as the activations were
            grads = {i: {n: self.noise.gradient(g) for n, g in gs.items()} for i, gs in grads.items()}
        for i, m in self._send(self.server.backward, stage, "gradient", net, grads).items():
            torch.autograd.backward([heads[n][i] for n in grads[i]], [m.tensor(n, self.device) for n in grads[i]])

    def generate(self, group: str, *, again: bool = False) -> "_PerClient":  # ``again``: never (no recompute)
        self._on_time()
        s = self.segs
        with self.ex.autocast():
            heads = {i: s[i].run_head("G", (self._z[i], self._batches[i][1])) for i in self.live}
        tails = self._cross("G", "g", {"h": heads})
        with self.ex.autocast():
            return _PerClient({i: s[i].run_tail("G", tails[i]["h"], self._batches[i][1]) for i in self.live})

    def discriminate(self, group: str, fake: "_PerClient", *, real: bool):
        s = self.segs
        with self.ex.autocast():
            heads = {"fake": {i: s[i].run_head("D", (fake[i], self._batches[i][1]))
                              for i in self.live}}
            if real:
                heads["real"] = {i: s[i].run_head("D", self._batches[i]) for i in self.live}
        if real:
            self._on_time()
        tails = self._cross("D", "d" if real else "dg", heads, {"collect": self._collect} if real else None)
        self._loss_rows = list(self.live)
        with self.ex.autocast():
            outs = [_stacked([s[i].run_tail("D", tails[i][n], self._batches[i][1]) for i in self.live]) for n in heads]
        return tuple(outs) if real else outs[0]

    def backward(self, group: str, loss: torch.Tensor, what: str, where: tuple) -> dict[int, float]:
        values = dict(zip(self._loss_rows, check_finite(loss.tolist(), self._loss_rows, what, where)))
        if self._loss_rows:
            loss.sum().backward()
        if what == "discriminator":
            # handing the D gradient to the server is the commitment: a client past the deadline
            # skips the iteration before it has changed anything
            self._on_time()
        while self._tape and (what == "generator" or self._tape[-1][0] == "D"):  # the D step stops at fake.detach()
            self._resolve(*self._tape.pop())
        return {i: values[i] for i in self.live}

    def zero_grad(self, net: str) -> None:
        for i in self.live:
            self.opts[i][net].zero_grad(set_to_none=True)

    def step(self, net: str) -> None:  # the clients' optimisers; the server's is the driver's call
        for i in self.live:
            self.opts[i][net].step()

    def requires_grad(self, net: str, flag: bool) -> None:
        for i in self.live:
            self.segs[i].nets[net].requires_grad_(flag)

    # -- round end and state -----------------------------------------------------------------------
    def _segment_state(self, i: int) -> dict[str, torch.Tensor]:
        return {f"clients.{i}.{k}": v for k, v in self.segs[i].state_dict().items()}

    def push_weights(self) -> None:
        import ray

        msgs = [self.wire.pack("weights", "server", i, self._segment_state(i), src=f"client:{i}") for i in self.ids]
        ray.get(self.server.receive_weights.remote(msgs))

    def pull_weights(self) -> None:
        import ray

        for m in ray.get(self.server.send_weights.remote(self.ids)):
            prefix = f"clients.{m.client}."
            self.segs[m.client].load_state_dict({k.removeprefix(prefix): v for k, v in m.tensors(self.device).items()})

    # -- secure aggregation (federation/secagg.py): each step's answers, one message per client --------
    def enroll(self) -> dict[int, str]:
        """The identity keys of this host's clients (made once per host start), for the roster."""
        self._identities = self._identities or {i: Identity(i) for i in self.ids}
        return {i: p.public() for i, p in self._identities.items()}

    def advertise_keys(self, plan_msg: Message, roster: dict[int, str]) -> list[Message]:
        """Fresh signed keys of this host's members of the plan; ``roster``: the enrolled identities."""
        self._plan = SecurePlan.from_meta(plan_msg.meta["plan"])
        policy = secure_policy(self.cfg)
        members = {i for s in self._plan.sums for i in s.members}
        self._secagg = {i: SecAggClient(i, self._identities[i], roster, self._plan.round, policy)
                        for i in self.ids if i in members}
        return [self._pack("keys", i, p.advertise()) for i, p in self._secagg.items()]

    def _pack(self, kind: str, client: int, meta: dict, arrays: dict | None = None) -> Message:
        return self.wire.pack(kind, "server", client, arrays or {}, meta, src=f"client:{client}")

    def share_keys(self, keys: dict[int, dict[str, str]]) -> list[Message]:
        return [self._pack("shares", i, {"to": v, "sealed": box})
                for i, p in self._secagg.items() for v, box in p.share_keys(self._plan, keys).items()]

    def push_masked(self, inbox: dict[int, dict[int, str]]) -> None:
        """Each member's masked sums straight to the server (the driver never sees them)."""
        import ray

        msgs = [self._pack("masked", i, {"round": self._plan.round},
                           {f"masked/{k}": v for k, v in p.masked(self.segs[i], inbox.get(i, {})).items()})
                for i, p in self._secagg.items()]
        ray.get(self.server.receive_masked.remote(msgs))

    def sign_survivors(self, survivors: list[int]) -> list[Message]:
        signed = {i: self._secagg[i].sign_survivors(survivors) for i in survivors if i in self._secagg}
        return [self._pack("signed", i, {"survivors": survivors, "sig": sig}) for i, sig in signed.items() if sig]

    def unmask(self, signatures: dict[int, str]) -> None:
        """Each signer's shares for its peers, one message per peer, straight to the server."""
        import ray

        msgs = []
        for i, p in self._secagg.items():
            if i in signatures:
                answer = p.unmask(signatures)
                msgs += [self._pack("unmask", i, {"peer": v, "key": share}) for v, share in answer["keys"].items()]
                msgs += [self._pack("unmask", i, {"peer": v, "masks": {str(k): h for k, h in shares.items()}})
                         for v, shares in answer["masks"].items()]
        ray.get(self.server.receive_answers.remote(msgs))

    def pull_opened(self) -> None:
        """The opened averages of the blocks this host's clients took part in."""
        import ray

        for m in ray.get(self.server.send_opened.remote(self.ids)):
            if m.kind == "opened":  # a hidden sum (federation.hide_ends): its words, less the hiding masks
                index, members = m.meta["sum"], tuple(m.meta["members"])
                s = self._plan.sums[index]
                mean = self._secagg[m.client].open_hidden(index, members, m.arrays["words"])
                load_block_vector(self.segs[m.client].nets[s.net][str(s.block)], mean)
                continue
            prefix = f"clients.{m.client}."
            with torch.no_grad():
                own = self.segs[m.client].state_dict()
                for k, v in m.tensors(self.device).items():
                    own[k.removeprefix(prefix)].copy_(v)

    def get_state(self) -> list[Message]:
        out = []
        for i in self.ids:
            tensors, meta = pack_state(self._segment_state(i), {net: o.state_dict() for net, o in self.opts[i].items()})
            out.append(self.wire.pack("state", "driver", i, tensors, meta, src=f"client:{i}"))
        return out

    def set_state(self, msgs: list[Message]) -> None:
        for m in msgs:
            model, opts = unpack_state(m.tensors(self.device), m.meta)
            prefix = f"clients.{m.client}."
            self.segs[m.client].load_state_dict({k.removeprefix(prefix): v for k, v in model.items()})
            for net, st in opts.items():
                self.opts[m.client][net].load_state_dict(st)

    def drain_audit(self) -> list[dict]:
        return self.wire.audit.drain()
