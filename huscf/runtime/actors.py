"""The two kinds of process of the Ray runtime (plain classes; ``driver.py`` makes them actors).

``ClientHost`` hosts one or more clients. For each it alone loads and holds the partition, the
head and tail segments of G and D and their optimisers, and it computes the losses. ``ServerNode``
holds the server body, its optimisers, the clustering features and the round-end aggregation.

One iteration is the simulation engine's (``engines/simulation.py``), cut at the seams: the
driver calls ``phase_a`` (G forward, D step) on every host, ``ServerNode.step("D")``, then
``phase_b`` (G step) and ``step("G")``. Inside a phase a host sends one batch of messages per
seam crossing for all its clients, and the server keeps each client's graph between the forward
and the backward call. Only activations and their gradients cross; every payload goes through
``messages.Wire``.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from huscf.config import RunConfig
from huscf.engines.execution import Execution, for_loss
from huscf.engines.objective import adam, check_finite, discriminator_loss, generator_loss
from huscf.engines.simulation import keyed_rng
from huscf.federation.bodies import carry_optimizer_state
from huscf.federation.features import FeatureStats
from huscf.federation.rounds import apply_secure, decide, federate
from huscf.federation.secure import MaskingClient, SecurePlan, open_sums, plan_sums
from huscf.methods import Method, build_strategy, method_names, register
from huscf.models.cgan import Architecture
from huscf.runtime.messages import ClientContract, Message, PrivacyGuard, Wire, pack_state, unpack_state
from huscf.runsetup import load_client_data
from huscf.split.plan import Cuts
from huscf.split.segments import NETS, ClientSegments, SplitGAN, server_state


@dataclass(frozen=True)
class RunSpec:
    """What every actor builds its part from: the config, the architecture and the cuts (no data)."""

    config: dict
    arch: Architecture
    cuts: tuple[Cuts, ...]
    sizes: tuple[int, ...]
    feature_depth: int | None
    threads: int
    # the run's method class: an actor registers it when its process does not know it yet (a method
    # defined outside huscf, e.g. a user's or a test's), before the config names it
    method: type[Method] | None = None

    def setup(self) -> tuple[RunConfig, Execution, torch.nn.Module, torch.nn.Module]:
        torch.set_num_threads(self.threads)
        if self.method is not None and self.method.name not in method_names(ablations=True):
            register(self.method)
        cfg = RunConfig.model_validate(self.config)
        ex = Execution.from_config(cfg.compute, len(self.cuts), per_client_loop=True)
        torch.manual_seed(cfg.seed)  # the same initialisation as the driver's and every other process's
        return cfg, ex, self.arch.generator(), self.arch.discriminator()


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


@torch.no_grad()
def _out_shapes(net: torch.nn.Module, inputs: tuple) -> list[tuple[int, ...]]:
    """The per-sample output shape of every block of a block list, from one forward of 2 samples."""
    net = net.to("cpu").train()
    h = net.blocks[0](*inputs)
    shapes = [tuple(h.shape[1:])]
    for block in net.blocks[1:]:
        h = block(h)
        shapes.append(tuple(h.shape[1:]))
    return shapes


def _contracts(segs: dict[int, ClientSegments], g, d, arch: Architecture) -> dict[int, ClientContract]:
    """What each hosted client's messages may carry (``messages.ClientContract``), from its cuts:
    the head's output crosses forward, the gradient of the server's last block's output back."""
    y = torch.zeros(2, dtype=torch.long)
    out = {"G": _out_shapes(copy.deepcopy(g), (torch.randn(2, arch.z_dim), y)),
           "D": _out_shapes(copy.deepcopy(d), (torch.zeros(2, *arch.image_shape), y))}
    contracts = {}
    for i, seg in segs.items():
        cut = {}
        for net in NETS:
            r = seg.ranges[net]
            if r.server:
                cut[("activation", net)] = out[net][r.head[-1]]
                cut[("gradient", net)] = out[net][r.server[-1]]
        contracts[i] = ClientContract(
            cut=cut, segment={f"clients.{i}.{k}": tuple(v.shape) for k, v in seg.state_dict().items()},
            opt_params={net: [tuple(p.shape) for p in seg.nets[net].parameters()] for net in NETS},
            block_sizes={f"{net}/{b}": sum(v.numel() for v in block.state_dict().values() if v.is_floating_point())
                         for net in NETS for b, block in seg.nets[net].items()})
    return contracts


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
        contracts = _contracts(self.segs, g, d, spec.arch)
        self.wire = Wire(f"host:{index}", PrivacyGuard(spec.arch.image_shape, contracts, self.cfg.train.batch_size))
        self.batch_size = self.cfg.train.batch_size
        self.delay = {int(k): v for k, v in self.cfg.runtime.inject_delay_s.items()}
        self.perms: dict[int, torch.Tensor] = {}
        self._g: dict = {}  # per-client generator graph kept from phase A to phase B
        self._masking: dict[int, MaskingClient] = {}  # secure aggregation: this round end's key pairs

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
        self.epoch_data = dict(self.data)
        for m in given:
            x, y = self.data[m.client]
            gx = self.ex.layout(m.tensor("x", self.device).to(self.ex.dtype))
            self.epoch_data[m.client] = (torch.cat([x, gx]), torch.cat([y, m.tensor("y", self.device)]))
        self.perms = {i: torch.from_numpy(keyed_rng(self.cfg.seed, r, e, i).permutation(len(y)))
                      for i, (_, y) in self.epoch_data.items()}

    def _batch(self, i: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.perms[i][t * self.batch_size:(t + 1) * self.batch_size]
        x, y = self.epoch_data[i]
        return x[idx], y[idx]

    def _send(self, method, kind: str, net: str, payload: dict[int, dict[str, torch.Tensor]],
              meta: dict | None = None) -> dict[int, Message]:
        """One batched crossing to the server for the clients in ``payload``; replies by client."""
        if not payload:
            return {}
        msgs = [self.wire.pack(kind, "server", i, tensors, {"net": net, **(meta or {})}, src=f"client:{i}")
                for i, tensors in payload.items()]
        import ray

        return {m.client: m for m in ray.get(method.remote(msgs))}

    # -- phase A: generator forward, discriminator step --------------------------------------------
    def phase_a(self, control: Message, noise: list[Message]) -> Message:
        t0 = time.monotonic()
        meta = control.meta
        where = (meta["round"], meta["epoch"], meta["t"])
        deadline = meta.get("deadline_s")
        z = {m.client: m.tensor("z", self.device).to(self.ex.dtype) for m in noise}  # drawn in fp32
        clients = sorted(z)

        def on_time(ids: list[int]) -> list[int]:
            """The clients still within the deadline; an injected delay counts on its client's clock."""
            if deadline is None:
                return ids
            spent = time.monotonic() - t0
            return [i for i in ids if spent + self.delay.get(i, 0.0) <= deadline]

        ex, s = self.ex, self.segs
        self._g = {}
        batch = {i: self._batch(i, meta["t"]) for i in clients}
        # generator: head -> server body -> tail (graph kept for phase B)
        live = on_time(clients)
        with ex.autocast():
            heads = {i: s[i].run_head("G", (z[i], batch[i][1])) for i in live}
        replies = self._send(self.server.g_forward, "activation", "G",
                             {i: {"h": heads[i]} for i in live if s[i].sends("G")})
        fakes = {}
        for i in live:
            b = _leaf(replies[i].tensor("h", self.device)) if i in replies else heads[i]
            with ex.autocast():
                fakes[i] = s[i].run_tail("G", b)
            self._g[i] = (heads[i], b, fakes[i])

        # discriminator step: D(fake.detach()) -> 0, D(x) -> 1
        for i in live:
            self.opts[i]["D"].zero_grad(set_to_none=True)
        with ex.autocast():
            dh = {i: (s[i].run_head("D", (fakes[i].detach(), batch[i][1])),
                      s[i].run_head("D", batch[i])) for i in live}
        live = on_time(live)
        replies = self._send(self.server.d_forward, "activation", "D",
                             {i: {"fake": dh[i][0], "real": dh[i][1]} for i in live if s[i].sends("D")},
                             {"collect": meta["collect"]})
        losses, grads = {}, {}
        for i in live:
            if i in replies:
                lf, lr = _leaf(replies[i].tensor("fake", self.device)), _leaf(replies[i].tensor("real", self.device))
            else:
                lf, lr = dh[i]
            with ex.autocast():
                out_f, out_r = s[i].run_tail("D", lf), s[i].run_tail("D", lr)
            loss = discriminator_loss(out_f, out_r)
            check_finite(loss, i, "discriminator", where)
            loss.backward()
            losses[i] = loss.item()
            if i in replies:
                grads[i] = {"fake": lf.grad, "real": lr.grad}
        # handing the D gradient to the server is the commitment: a client past the deadline
        # skips the iteration before it has changed anything
        live = on_time(live)
        replies = self._send(self.server.d_backward, "gradient", "D", {i: grads[i] for i in live if i in grads})
        for i in live:
            if i in replies:
                torch.autograd.backward(list(dh[i]), [replies[i].tensor("fake", self.device),
                                                      replies[i].tensor("real", self.device)])
            self.opts[i]["D"].step()
        return self._reply_a(clients, {i: losses[i] for i in live})

    def _reply_a(self, clients: list[int], losses: dict[int, float]) -> Message:
        skipped = [i for i in clients if i not in losses]
        for i in skipped:
            self._g.pop(i, None)
        return self.wire.pack("metric", "driver", None, meta={"loss_d": {str(i): v for i, v in losses.items()},
                                                              "skipped": skipped})

    # -- phase B: generator step -------------------------------------------------------------------
    def phase_b(self, control: Message) -> Message:
        meta = control.meta
        where = (meta["round"], meta["epoch"], meta["t"])
        clients = sorted(self._g)
        ex, s = self.ex, self.segs
        for i in clients:
            self.opts[i]["G"].zero_grad(set_to_none=True)
            s[i].nets["D"].requires_grad_(False)
        with ex.autocast():
            dh = {i: s[i].run_head("D", (self._g[i][2], self._batch(i, meta["t"])[1])) for i in clients}
        replies = self._send(self.server.dg_forward, "activation", "D",
                             {i: {"fake": dh[i]} for i in clients if s[i].sends("D")})
        losses, grads = {}, {}
        for i in clients:
            lf = _leaf(replies[i].tensor("fake", self.device)) if i in replies else dh[i]
            with ex.autocast():
                out = s[i].run_tail("D", lf)
            loss = generator_loss(out)
            check_finite(loss, i, "generator", where)
            loss.backward()
            losses[i] = loss.item()
            if i in replies:
                grads[i] = {"fake": lf.grad}
        replies = self._send(self.server.dg_backward, "gradient", "D", grads)
        g_grads = {}
        for i in clients:
            b = self._g[i][1]
            if i in replies:
                torch.autograd.backward(dh[i], replies[i].tensor("fake", self.device))
            if s[i].sends("G"):
                g_grads[i] = {"h": b.grad}
        replies = self._send(self.server.g_backward, "gradient", "G", g_grads)
        for i in clients:
            if i in replies:
                torch.autograd.backward(self._g[i][0], replies[i].tensor("h", self.device))
            self.opts[i]["G"].step()
            s[i].nets["D"].requires_grad_(True)
        self._g = {}
        return self.wire.pack("metric", "driver", None, meta={"loss_g": {str(i): v for i, v in losses.items()}})

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

    # -- secure aggregation (federation/secure.py): keys, masked sums, reveals, opened averages --------
    def advertise_keys(self) -> list[Message]:
        """A fresh key pair per client for this round end; the public halves."""
        self._masking = {i: MaskingClient(i) for i in self.ids}
        return [self.wire.pack("keys", "server", i, meta={"public_key": p.public_key()}, src=f"client:{i}")
                for i, p in self._masking.items()]

    def push_masked(self, plan_msg: Message, directory: dict[int, str]) -> None:
        """Each client's masked sums straight to the server (the driver never sees them)."""
        import ray

        plan = SecurePlan.from_meta(plan_msg.meta["plan"])
        msgs = []
        for i in self.ids:
            if plan.of(i):
                words = self._masking[i].masked(plan, self.segs[i], directory)
                msgs.append(self.wire.pack("masked", "server", i, {f"masked/{k}": v for k, v in words.items()},
                                           {"round": plan.round}, src=f"client:{i}"))
        ray.get(self.server.receive_masked.remote(msgs))

    def reveal(self, plan_msg: Message, dropped: list[int], directory: dict[int, str]) -> None:
        """Each client's mask seeds with the members that dropped, one message per sum."""
        import ray

        plan = SecurePlan.from_meta(plan_msg.meta["plan"])
        msgs = [self.wire.pack("unmask", "server", i, meta={"sum": k, "seeds": {str(j): h for j, h in seeds.items()}},
                               src=f"client:{i}")
                for i in self.ids for k, seeds in self._masking[i].reveal(plan, set(dropped), directory).items()]
        ray.get(self.server.receive_reveals.remote(msgs))

    def pull_opened(self) -> None:
        """The opened averages of the blocks this host's clients took part in."""
        import ray

        for m in ray.get(self.server.send_opened.remote(self.ids)):
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


class ServerNode:
    """The server: its body (one shared by all clients, or with ``federation.server_body:
    per_cluster`` one per cluster besides it), their optimisers, clustering and aggregation."""

    def __init__(self, spec: RunSpec):
        self.cfg, self.ex, g, d = spec.setup()
        self.device = self.ex.torch_device
        # the body plus every client's segments: the segments are only filled at the round end,
        # when the clients send their weights for aggregation
        self.model = SplitGAN(g, d, list(spec.cuts), cluster_bodies=self.cfg.cluster_bodies).to(self.device,
                                                                                                  self.ex.dtype)
        if self.ex.channels_last:
            self.model.to(memory_format=torch.channels_last)
        fused = self.device.type == "cuda"
        self.opts = {net: adam(self.model.server_parameters(net), self.cfg.train, fused=fused) for net in NETS}
        self.sizes = np.asarray(spec.sizes)
        self.feature_depth = spec.feature_depth
        self.features = FeatureStats(len(spec.cuts))
        self.strategy = build_strategy(self.cfg)
        self.wire = Wire("server")
        self.pending: dict[tuple[str, int], tuple] = {}
        self.seen: dict[int, torch.Tensor] = {}
        self._secure: dict = {}  # secure aggregation: this round end's plan, masked sums, reveals

    def pid(self) -> int:
        return os.getpid()

    def _body(self, net: str, client: int, h: torch.Tensor) -> torch.Tensor:
        with self.ex.autocast():
            return self.model.body(client).run(net, h, self.model.ranges(client, net).server)

    def _reply(self, kind: str, m: Message, tensors: dict[str, torch.Tensor]) -> Message:
        return self.wire.pack(kind, f"client:{m.client}", m.client, tensors, {"net": m.meta["net"]})

    def begin_epoch(self, msg: Message) -> None:
        self.wire.audit.round = msg.meta["round"] + 1
        if msg.meta.get("collect"):
            self.features = FeatureStats(len(self.sizes))

    # forward/backward of the body for each client; the graph waits in ``pending`` in between
    def _forward(self, stage: str, net: str, names: tuple[str, ...], msgs: list[Message]) -> list[Message]:
        """The body of ``net`` on each named activation of each message (one forward per activation,
        so BatchNorm statistics stay per call, as in one process)."""
        out = []
        for m in msgs:
            leaves = {n: _leaf(m.tensor(n, self.device)) for n in names}
            outs = {n: self._body(net, m.client, h) for n, h in leaves.items()}
            self.pending[(stage, m.client)] = (leaves, outs)
            out.append(self._reply("activation", m, {n: y.detach() for n, y in outs.items()}))
        return out

    def _backward(self, stage: str, msgs: list[Message]) -> list[Message]:
        """Backward through the kept graph with the client's gradients; returns the input gradients."""
        out = []
        for m in msgs:
            leaves, outs = self.pending.pop((stage, m.client))
            torch.autograd.backward(list(outs.values()), [m.tensor(n, self.device) for n in outs])
            out.append(self._reply("gradient", m, {n: h.grad for n, h in leaves.items()}))
        return out

    def g_forward(self, msgs: list[Message]) -> list[Message]:
        return self._forward("g", "G", ("h",), msgs)

    def d_forward(self, msgs: list[Message]) -> list[Message]:
        out = self._forward("d", "D", ("fake", "real"), msgs)
        if self.feature_depth is not None:
            for m in msgs:
                if m.meta.get("collect"):
                    self.seen[m.client] = for_loss(self.pending[("d", m.client)][0]["real"].detach())
        return out

    def d_backward(self, msgs: list[Message]) -> list[Message]:
        return self._backward("d", msgs)

    def dg_forward(self, msgs: list[Message]) -> list[Message]:
        self.model.server_requires_grad_("D", False)  # the G step does not train D
        return self._forward("dg", "D", ("fake",), msgs)

    def dg_backward(self, msgs: list[Message]) -> list[Message]:
        return self._backward("dg", msgs)

    def g_backward(self, msgs: list[Message]) -> list[Message]:
        return self._backward("g", msgs)

    def step(self, net: str) -> None:
        """Every client of the iteration is done with ``net``: one optimiser step on the summed
        gradient. Graphs of clients that failed or skipped are dropped here."""
        self.opts[net].step()
        self.opts[net].zero_grad(set_to_none=True)
        if net == "D":
            self.pending = {k: v for k, v in self.pending.items() if k[0] == "g"}
            if self.seen:  # the clustering features, through the stepped weights (as in one process)
                with torch.no_grad():
                    for i, act in self.model.server_features(self.seen, self.feature_depth).items():
                        self.features.add(i, act)
                self.seen = {}
        else:
            self.pending = {}
            self.model.server_requires_grad_("D", True)

    # -- round end ---------------------------------------------------------------------------------
    def receive_weights(self, msgs: list[Message]) -> None:
        for m in msgs:
            prefix = f"clients.{m.client}."
            self.model.clients[m.client].load_state_dict(
                {k.removeprefix(prefix): v for k, v in m.tensors(self.device).items()})

    def _round_clients(self, meta: dict) -> list[int]:
        """The clients to aggregate: those the driver names, with clustering features if used."""
        clients = sorted(meta["clients"])
        if meta["use_features"]:
            clients = [i for i in clients if i in set(self.features.seen())]
        if not clients:
            raise RuntimeError("no client finished an iteration this round: nothing to aggregate")
        return clients

    def _aggregation_message(self, agg) -> Message:
        return self.wire.pack("control", "driver", None, meta={
            "groups": agg.groups.tolist(), "cluster_weights": agg.cluster_weights.tolist(),
            "global_weights": agg.global_weights.tolist(), "info": agg.info})

    def federate(self, control: Message) -> Message:
        meta = control.meta
        clients = self._round_clients(meta)
        agg = federate(self.model, self.strategy, self.sizes, meta["round"], meta["seed"],
                       self.features if meta["use_features"] else None, clients)
        carry_optimizer_state(self.model, self.opts, agg)
        return self._aggregation_message(agg)

    # -- secure round end: plan, masked sums, reveals, open ---------------------------------------------
    def plan_secure(self, control: Message) -> Message:
        """The strategy's aggregation and the sums that secure aggregation will open."""
        meta = control.meta
        clients = self._round_clients(meta)
        agg = decide(self.model, self.strategy, self.sizes, meta["round"], meta["seed"],
                     self.features if meta["use_features"] else None, clients)
        self._secure = {"clients": clients, "agg": agg, "plan": plan_sums(self.model, agg, clients, meta["round"]),
                        "masked": {}, "revealed": {}, "opened": {}}
        return self.wire.pack("control", "driver", None, meta={"plan": self._secure["plan"].to_meta()})

    def receive_masked(self, msgs: list[Message]) -> None:
        if self._secure.get("frozen"):  # after the dropouts were named: a late vector is refused,
            return  # else the survivors' reveals would open it alone (SecAgg's self-mask is not built)
        for m in msgs:
            self._secure["masked"][m.client] = {int(k.removeprefix("masked/")): a for k, a in m.arrays.items()}

    def delivered(self) -> list[int]:
        """Who delivered; from now on the set is frozen (members not in it are the dropouts)."""
        self._secure["frozen"] = True
        return sorted(self._secure["masked"])

    def receive_reveals(self, msgs: list[Message]) -> None:
        for m in msgs:
            self._secure["revealed"].setdefault(m.client, {})[m.meta["sum"]] = {
                int(j): h for j, h in m.meta["seeds"].items()}

    def finish_secure(self) -> Message:
        """Open the sums, write the averages (into the server's copies of the members' blocks, to be
        sent back) and make the server's body or bodies; the aggregation and its record for the driver."""
        st = self._secure
        plan, clients = st["plan"], st["clients"]
        opened = open_sums(plan, st["masked"], st["revealed"])
        agg = apply_secure(self.model, st["agg"], clients, plan, opened)
        carry_optimizer_state(self.model, self.opts, agg)
        for o in opened:
            s = plan.sums[o.index]
            for i in o.members:
                st["opened"].setdefault(i, []).append((s.net, s.block))
        if len(clients) != len(self.sizes):
            agg = agg.expand(clients, len(self.sizes))
        return self._aggregation_message(agg)

    def send_opened(self, clients: list[int]) -> list[Message]:
        out = []
        for i in clients:
            tensors = {f"clients.{i}.nets.{net}.{b}.{k}": v
                       for net, b in self._secure["opened"].get(i, [])
                       for k, v in self.model.clients[i].nets[net][str(b)].state_dict().items()
                       if v.is_floating_point()}
            if tensors:
                out.append(self.wire.pack("weights", f"client:{i}", i, tensors))
        return out

    def send_weights(self, clients: list[int]) -> list[Message]:
        return [self.wire.pack("weights", f"client:{i}", i,
                               {f"clients.{i}.{k}": v for k, v in self.model.clients[i].state_dict().items()})
                for i in clients]

    def get_state(self) -> Message:
        """The server's part of the run's state: its bodies (and ``body_of``) and optimisers."""
        tensors, meta = pack_state(server_state(self.model.state_dict()),
                                   {net: o.state_dict() for net, o in self.opts.items()})
        return self.wire.pack("state", "driver", None, tensors, meta)

    def set_state(self, msg: Message) -> None:
        model, opts = unpack_state(msg.tensors(self.device), msg.meta)
        self.model.load_state_dict(self.model.state_dict() | model)
        for net, st in opts.items():
            self.opts[net].load_state_dict(st)

    def drain_audit(self) -> list[dict]:
        return self.wire.audit.drain()
