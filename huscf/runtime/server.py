"""``ServerNode``: the Ray actor that holds the server body (one shared by all clients, or one per
cluster besides it), its optimisers, the clustering features and the round-end aggregation.

It answers the hosts' crossings: a forward of the body for each activation it receives, the
graph kept until the client's gradient comes back (``pending``), then ``step`` once every client
of the iteration is done.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from huscf.engines.execution import for_loss
from huscf.engines.objective import adam
from huscf.federation.bodies import carry_optimizer_state
from huscf.federation.features import FeatureStats
from huscf.federation.rounds import apply_secure, decide, federate
from huscf.federation.secagg import SecAggServer
from huscf.federation.secure import plan_sums
from huscf.methods import build_strategy
from huscf.runtime.messages import Message, Wire, pack_state, unpack_state
from huscf.runtime.spec import RunSpec, leaf
from huscf.split.segments import NETS, SplitGAN, server_state

# the server's passes of an iteration: stage -> (net, the activations a message carries)
STAGES = {"g": ("G", ("h",)), "d": ("D", ("fake", "real")), "dg": ("D", ("fake",))}


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

    def forward(self, stage: str, msgs: list[Message]) -> list[Message]:
        """The body on each activation of each message (one forward per activation, so BatchNorm
        statistics stay per call, as in one process); each graph waits in ``pending`` for
        ``backward``. ``stage`` (``STAGES``): "g", G in step 1; "d", D in step 2 (the real pass's
        input kept as clustering features when the message asks); "dg", D in step 3 (not trained)."""
        net, names = STAGES[stage]
        if stage == "dg":
            self.model.server_requires_grad_("D", False)
        out = []
        for m in msgs:
            leaves = {n: leaf(m.tensor(n, self.device)) for n in names}
            outs = {n: self._body(net, m.client, h) for n, h in leaves.items()}
            self.pending[(stage, m.client)] = (leaves, outs)
            if stage == "d" and m.meta.get("collect") and self.feature_depth is not None:
                self.seen[m.client] = for_loss(leaves["real"].detach())
            out.append(self._reply("activation", m, {n: y.detach() for n, y in outs.items()}))
        return out

    def backward(self, stage: str, msgs: list[Message]) -> list[Message]:
        """Backward through the kept graph with the client's gradients; returns the input gradients."""
        out = []
        for m in msgs:
            leaves, outs = self.pending.pop((stage, m.client))
            torch.autograd.backward(list(outs.values()), [m.tensor(n, self.device) for n in outs])
            out.append(self._reply("gradient", m, {n: h.grad for n, h in leaves.items()}))
        return out

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

    # -- secure round end (federation/secagg.py): plan, keys, shares, masked sums, survivors, answers -----
    def plan_secure(self, control: Message) -> Message:
        """The strategy's aggregation and the sums that secure aggregation will open."""
        meta = control.meta
        clients = self._round_clients(meta)
        agg = decide(self.model, self.strategy, self.sizes, meta["round"], meta["seed"],
                     self.features if meta["use_features"] else None, clients)
        plan = plan_sums(self.model, agg, clients, meta["round"], self.strategy.policy)
        self._secure = {"clients": clients, "agg": agg, "plan": plan, "answers": {}, "opened": {}, "hidden": {},
                        "protocol": SecAggServer(plan, self.strategy.policy)}
        return self.wire.pack("control", "driver", None, meta={"plan": plan.to_meta()})

    def relay_keys(self, msgs: list[Message]) -> dict[int, dict[str, str]]:
        return self._secure["protocol"].advertised({m.client: dict(m.meta) for m in msgs})

    def relay_shares(self, msgs: list[Message]) -> dict[int, dict[int, str]]:
        sealed: dict[int, dict[int, str]] = {}
        for m in msgs:
            sealed.setdefault(m.client, {})[m.meta["to"]] = m.meta["sealed"]
        return self._secure["protocol"].route(sealed)

    def receive_masked(self, msgs: list[Message]) -> None:
        """Masked words; once the survivors were named, a late delivery is dropped."""
        for m in msgs:
            self._secure["protocol"].receive_masked(m.client, {int(k.removeprefix("masked/")): a
                                                               for k, a in m.arrays.items()})

    def delivered(self) -> list[int]:
        """The survivors: who delivered; from now on the set is frozen."""
        return self._secure["protocol"].survivors()

    def relay_signatures(self, msgs: list[Message]) -> dict[int, str]:
        protocol = self._secure["protocol"]
        return protocol.signatures({m.client: m.meta["sig"] for m in msgs if m.meta["survivors"] == protocol.u3})

    def receive_answers(self, msgs: list[Message]) -> None:
        for m in msgs:
            answer = self._secure["answers"].setdefault(m.client, {"keys": {}, "masks": {}})
            if "key" in m.meta:
                answer["keys"][m.meta["peer"]] = m.meta["key"]
            else:
                answer["masks"][m.meta["peer"]] = {int(k): h for k, h in m.meta["masks"].items()}

    def finish_secure(self) -> Message:
        """Open the sums, write the averages (into the server's copies of the members' blocks, to be
        sent back) and make the server's body or bodies; the aggregation and its record for the driver."""
        st = self._secure
        plan, clients = st["plan"], st["clients"]
        opened = st["protocol"].open(st["answers"])
        agg = apply_secure(self.model, st["agg"], clients, plan, opened)
        carry_optimizer_state(self.model, self.opts, agg)
        for o in opened:
            s = plan.sums[o.index]
            for i in o.members:  # a hidden sum goes back as its words: only its members can read them
                st["hidden" if o.mean is None else "opened"].setdefault(i, []).append(o if o.mean is None else
                                                                                      (s.net, s.block))
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
            out += [self.wire.pack("opened", f"client:{i}", i, {"words": o.words},
                                   {"sum": o.index, "members": list(o.members)})
                    for o in self._secure.get("hidden", {}).get(i, [])]
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
