"""The simulation engine's iteration with clients batched: each block runs once per chunk of clients.

Same maths as ``SimulationEngine`` (the reference: a Python loop over clients), organised for the
hardware. The activations of a chunk of K clients are stacked into one tensor (K, B, ...). At
block b:

* the clients that hold their own copy of b run it as **one call vmapped over their stacked
  weights** (``torch.func.vmap`` + ``functional_call``: grouped convolutions, batched matmuls);
* the clients that use the server's copy run it as **one call over their folded batch** with the
  server's weights (one dense convolution for all of them); with a server body per cluster
  (``federation.server_body: per_cluster``), one such call per body its clients use;
* BatchNorm statistics stay per client in both cases (vmap normalises every client's rows on
  their own), exactly as in the loop, so no client's normalisation sees another client's data.
  With ``fold_batch_norm`` a block's BatchNorm2d instead runs as one ``batch_norm`` over the
  clients folded into its channels (same statistics, one call; faster than vmap's rule on a CPU).

The clients' own copies of a block live in weight banks (``banks.py``): the vmapped call reads
a bank directly, and all clients of a net step in one optimiser call. Gradients sum over clients
into the server's weights, as the loop's per-client backward passes do. Results equal the loop's
up to floating-point summation order (tested).

Memory: ``client_chunk`` bounds how many clients' activations are alive at once. With
``recompute_generator`` (on by default when there is more than one chunk), the generator forward
of the discriminator step runs without a graph and is recomputed chunk by chunk in the generator
step (same noise, same weights, so the same fakes) instead of keeping every client's generator
graph alive through the discriminator step.

CUDA graphs (``compute.cuda_graphs``, on by default on CUDA): a set of clients' iteration is
captured once, after two eager warm-ups, and replayed; the losses are read once per iteration.

Speed: this is the CUDA default; on a CPU the per-client loop is the default. The measurements
behind both choices are in docs/performance.md.

Precision: ``precision="bf16"`` runs the forward passes under ``torch.autocast`` (bfloat16
matmuls and convolutions, fp32 weights, optimiser states and losses); ``fp64`` runs everything in
float64 (the reference the tests compare this engine with the loop in).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call, vmap

from huscf.config import TrainConfig
from huscf.engines.banks import Bank, ClientAdam
from huscf.engines.client_ops import batch_norm_foldable, client_conv, conv_supported, folded_batch_norm
from huscf.engines.execution import Execution, for_loss
from huscf.engines import objective
from huscf.engines.objective import adam, check_finite
from huscf.engines.simulation import SimulationEngine, draw_fake_inputs
from huscf.models import takes_label
from huscf.runsetup import ClientData
from huscf.split.segments import NETS, SplitGAN


def _selector(rows: list[int], device: torch.device) -> slice | torch.Tensor:
    """What picks ``rows`` of a stacked tensor: a slice (a view) when they are contiguous."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows, device=device)


_GRAPH_WARMUP = 2  # eager iterations of a client set before its CUDA graph is captured


class _BlockPlan(NamedTuple):
    """How one block runs for one chunk of clients (rows): precomputed once per chunk."""

    own: tuple[int, ...]                # clients running their own copy (a bank)
    own_rows: slice | torch.Tensor | None  # their rows (None: every row)
    bodies: tuple[tuple[int, slice | torch.Tensor | None], ...]  # (server body slot, its rows; None: every row)
    inverse: torch.Tensor | None        # puts [each body's rows..., own rows] back in row order
    to_server: list[int]                # rows whose activation crosses to the server after the block
    back: list[int]                     # rows whose activation comes back to its client after it


class BatchedEngine(SimulationEngine):
    """``SimulationEngine`` whose iteration batches clients (see the module docstring)."""

    def __init__(self, model: SplitGAN, data: list[ClientData], *, train: TrainConfig, z_dim: int, seed: int,
                 execution: Execution | None = None, feature_depth: int | None = None):
        super().__init__(model, data, train=train, z_dim=z_dim, seed=seed, execution=execution,
                         feature_depth=feature_depth)
        self._plans: dict[tuple[str, tuple[int, ...]], list[_BlockPlan]] = {}
        self._slots = self._body_slots()  # each client's server body (host copy of SplitGAN.body_of)
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict]] = {}
        self._graph_warmups: dict[tuple, int] = {}
        self._graph_pool = None
        # weight banks and one Adam per net for all clients (a tied net keeps the loop's one)
        order = sorted(range(len(model.clients)), key=lambda i: (model.clients[i].cuts, i))
        self._banks: dict[tuple[str, int], Bank] = {}
        self._shared_opts: dict[str, torch.optim.Adam] = {}
        for net in NETS:
            if net in model.tied:
                continue
            for b in range(model.num_blocks[net]):
                holders = [i for i in order if model.clients[i].holds(net, b)]
                if holders:
                    self._banks[net, b] = Bank(holders, [model.clients[i].nets[net][str(b)] for i in holders])
            per_client = [list(model.client_parameters(i, net)) for i in range(len(data))]
            self._shared_opts[net] = adam([p for ps in per_client for p in ps], train, **self._opt_flags)
            for i, ps in enumerate(per_client):
                self.client_opts[i][net] = ClientAdam(self._shared_opts[net], ps)
        self._banks_by_net = {net: [bank for (n, _), bank in self._banks.items() if n == net] for net in NETS}

    # -- one block, one net ----------------------------------------------------------------------
    def _stacked(self, net: str, b: int, ids: tuple[int, ...], args: tuple) -> torch.Tensor:
        """Block b of clients ``ids`` (each with its own copy), one vmapped call over their weights."""
        bank = self._banks.get((net, b))
        if bank is None:  # a tied net: every client's slot is one module
            return self._rows(self.model.clients[ids[0]].nets[net][str(b)], None, args)
        return self._rows(bank.template, bank.weights(ids), args)

    def _shared(self, net: str, b: int, args: tuple, slot: int = -1) -> torch.Tensor:
        """Block b of a server body (``slot``: -1 the shared one, else a cluster body) for every row
        of ``args``: the body's weights, per-client statistics."""
        return self._rows(self.model.server_bodies()[slot + 1].nets[net][str(b)], None, args)

    def _rows(self, module: nn.Module, weights: dict[str, torch.Tensor] | None, args: tuple) -> torch.Tensor:
        """``module`` applied to every row (client) of ``args``: with ``weights`` (stacked, one row per
        client, named as the module's parameters) or with the module's own weights for all rows.

        By default one vmapped call. With ``fold_batch_norm`` or a ``client_convs`` other than
        vmap, a Sequential block runs child by child instead, so that its BatchNorm2d layers run as
        one folded call and its per-client convolutions the configured way (``client_ops``)."""
        ex = self.ex
        if isinstance(module, nn.Sequential) and len(args) == 1 and (ex.fold_batch_norm or ex.client_convs != "vmap"):
            (h,) = args
            for name, child in module.named_children():
                sub = None if weights is None else {k[len(name) + 1:]: v for k, v in weights.items()
                                                     if k.startswith(name + ".")}
                if ex.fold_batch_norm and batch_norm_foldable(child):
                    h = folded_batch_norm(h, child, sub)
                elif sub and ex.client_convs != "vmap" and conv_supported(child):
                    h = client_conv(child, sub["weight"], sub.get("bias"), h, ex.client_convs)
                else:
                    h = self._rows(child, sub or None, (h,))
            return h
        if weights is None:
            return vmap(module)(*args)

        def banked(params, *a):
            return functional_call(module, params, a)

        return vmap(banked)(weights, *args)

    def _plan(self, net: str, clients: list[int]) -> list[_BlockPlan]:
        """Each block's plan for this chunk; cached, as the same chunks recur every iteration (until
        a round end moves clients between server bodies: ``federate`` clears the cache)."""
        key = (net, tuple(clients))
        if key not in self._plans:
            if len(self._plans) > 256:  # many distinct client subsets: keep the cache bounded
                self._plans.clear()
            m, dev = self.model, self.device
            ranges = [m.ranges(i, net) for i in clients]
            slot_of = [self._slots[i] for i in clients]
            every = list(range(len(clients)))

            def rows(ks: list[int]):
                return None if ks == every else _selector(ks, dev)

            plans = []
            for b in range(m.num_blocks[net]):
                own = [k for k, i in enumerate(clients) if m.clients[i].holds(net, b)]
                srv = [k for k in every if not m.clients[clients[k]].holds(net, b)]
                groups = [[k for k in srv if slot_of[k] == s] for s in sorted({slot_of[k] for k in srv})]
                order = [k for g in groups for k in g] + own
                inverse = None
                if order != every:
                    inverse = torch.empty(len(clients), dtype=torch.long)
                    inverse[torch.tensor(order)] = torch.arange(len(clients))
                    inverse = inverse.to(dev)
                plans.append(_BlockPlan(
                    tuple(clients[k] for k in own), rows(own) if own else None,
                    tuple((slot_of[g[0]], rows(g)) for g in groups), inverse,
                    [k for k, r in enumerate(ranges) if r.server and r.head[-1] == b],
                    [k for k, r in enumerate(ranges) if r.server and r.server[-1] == b]))
            self._plans[key] = plans
        return self._plans[key]

    def _block(self, net: str, b: int, plan: _BlockPlan, h: tuple) -> torch.Tensor:
        """Block b for the chunk: one call per server body its rows use, one vmapped call over the
        own copies, put back in row order."""
        outs = [self._shared(net, b, h if rows is None else tuple(a[rows] for a in h), slot)
                for slot, rows in plan.bodies]
        if plan.own:
            outs.append(self._stacked(net, b, plan.own, h if plan.own_rows is None
                                      else tuple(a[plan.own_rows] for a in h)))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out if plan.inverse is None else out[plan.inverse]

    def _net(self, net: str, clients: list[int], inputs: tuple, server_input: dict | None = None) -> torch.Tensor:
        """The U-shaped forward of ``net`` for a chunk of clients; rows of every tensor = clients."""
        m = self.model
        h, last = inputs, m.num_blocks[net] - 1
        # the label rides beside the activation into a tail block that takes it (``model.labels: tail``)
        label = inputs[1] if takes_label(m.clients[clients[0]].nets[net][str(last)]) else None
        for b, plan in enumerate(self._plan(net, clients)):
            out = self._block(net, b, plan, h)
            if plan.to_server:
                out = m.seam.cross_rows(out, "client->server", [clients[k] for k in plan.to_server], plan.to_server,
                                        net, b)
                if server_input is not None:
                    server_input.update({clients[k]: out[k].detach() for k in plan.to_server})
            if plan.back:
                out = m.seam.cross_rows(out, "server->client", [clients[k] for k in plan.back], plan.back, net, b)
            h = (out,) if label is None or b + 1 < last else (out, label)
        return h[0]

    # -- optimisers: the banks' gradients, one step per net -------------------------------------
    def zero_grad(self, net: str) -> None:
        if net not in self._shared_opts:
            return super().zero_grad(net)
        for bank in self._banks_by_net[net]:
            bank.zero_grad()
        self._shared_opts[net].zero_grad(set_to_none=True)  # every client: only this iteration's step
        self.server_opts[net].zero_grad(set_to_none=True)

    def step(self, net: str) -> None:
        if net not in self._shared_opts:
            return super().step(net)
        active = set(self._clients)
        for bank in self._banks_by_net[net]:
            bank.hand_out_grads(active)
        self._shared_opts[net].step()  # Adam skips the parameters without a gradient
        self.server_opts[net].step()

    def requires_grad(self, net: str, flag: bool) -> None:
        if net not in self._shared_opts:
            return super().requires_grad(net, flag)
        # the clients' own Parameters are views that the forward never reads: only banks and server
        for bank in self._banks_by_net[net]:
            bank.requires_grad_(flag)
        self.model.server_requires_grad_(net, flag)

    # -- one iteration: ``objective``'s steps, chunk by chunk --------------------------------------
    per_row = True  # a group is a chunk of clients, stacked

    def iteration(self, batch: dict[int, tuple[torch.Tensor, torch.Tensor]], noise: torch.Generator,
                  where: tuple = (), collect_features: bool = False) -> dict[int, tuple[float, float]]:
        m = self.model
        # the same noise as the loop (drawn in client order), then clients with equal cuts side by side
        fakes_in = draw_fake_inputs(batch, noise, self.z_dim, self.fake_inputs)
        clients = sorted(batch, key=lambda i: (m.clients[i].cuts, i))
        if len({len(batch[i][1]) for i in clients}) > 1:
            raise ValueError("the batched engine needs equal batch sizes for all clients of an iteration")

        def stack(get) -> torch.Tensor:
            return torch.stack([get(i) for i in clients]).to(self.device)

        xs, ys = stack(lambda i: batch[i][0]), stack(lambda i: batch[i][1])
        z_d = stack(lambda i: fakes_in[i][0][0]).to(dtype=self.ex.dtype)
        if self.fake_inputs is None:  # the real batch's labels, one fake batch for steps 2 and 3
            inputs = (xs, ys, z_d, ys, z_d, ys)
        else:
            inputs = (xs, ys, z_d, stack(lambda i: fakes_in[i][0][1]),
                      stack(lambda i: fakes_in[i][1][0]).to(dtype=self.ex.dtype), stack(lambda i: fakes_in[i][1][1]))
        collect = collect_features and self.feature_depth is not None
        # a seam recorder counts crossings in Python; seam noise draws from its own generator
        if self.ex.cuda_graphs and m.seam.recorder is None and m.seam.noise is None:
            losses, seen = self._graphed(clients, inputs, collect)
        else:
            seen = {} if collect else None
            losses = self._compute(clients, inputs, seen)
        if collect:
            self._add_features(seen)
        # the losses are read once, at the end: a sync per step would stall the device queue. A
        # non-finite loss still stops the run here, before the next iteration (the loop engine
        # checks before each step; both name the first client and net that failed)
        d, g = (check_finite(v, clients, what, where)
                for v, what in zip(torch.stack(losses).tolist(), ("discriminator", "generator")))
        return {i: (ld, lg) for i, ld, lg in sorted(zip(clients, d, g))}

    @torch.no_grad()
    def _add_features(self, seen: dict[int, torch.Tensor]) -> None:
        """``SplitGAN.server_features`` for all clients at once: the clients that enter the server
        at the same block go through its blocks up to the common depth as one vmapped call."""
        m = self.model
        start: dict[int, list[int]] = {}
        for i in sorted(seen):
            start.setdefault(m.ranges(i, "D").head[-1] + 1, []).append(i)
        for first, ids in start.items():
            h = torch.stack([for_loss(seen[i]) for i in ids])
            for b in range(first, self.feature_depth + 1):
                h = self._shared("D", b, (h,))
            for i, act in zip(ids, h):
                self.features.add(i, act)

    def _compute(self, clients: list[int], inputs: tuple[torch.Tensor, ...],
                 seen: dict[int, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``objective.iteration`` for ``clients`` (rows of the stacked ``inputs``: real images and
        labels, step 2's fakes' noise and labels, step 3's), a group per chunk of ``client_chunk``
        rows; returns the per-row (L_D, L_G) on the device, and fills ``seen`` with the server's D
        inputs when given."""
        size = self.ex.client_chunk or len(clients)
        spans = [(s, min(s + size, len(clients))) for s in range(0, len(clients), size)]
        self._stacks, self._seen, self._clients = (clients, inputs), seen, sorted(clients)
        d, g = objective.iteration(self, spans, where=())
        return torch.cat(list(d.values())), torch.cat(list(g.values()))

    def generate(self, span: tuple[int, int], *, again: bool = False) -> torch.Tensor:
        (a, b), (clients, inputs) = span, self._stacks
        z, y = inputs[4:6] if again else inputs[2:4]
        with self.ex.autocast():
            return self._net("G", clients[a:b], (z[a:b], y[a:b]))

    def discriminate(self, span: tuple[int, int], fake: torch.Tensor, *, real: bool):
        (a, b), (clients, (xs, ys, _, y_d, _, y_g)) = span, self._stacks
        with self.ex.autocast():  # real and fake batches normalised separately, as in the loop
            out = self._net("D", clients[a:b], (fake, (y_d if real else y_g)[a:b]))
            return (out, self._net("D", clients[a:b], (xs[a:b], ys[a:b]), server_input=self._seen)) if real else out

    def backward(self, span: tuple[int, int], loss: torch.Tensor, what: str, where: tuple) -> torch.Tensor:
        loss.sum().backward()  # checked once the iteration is done (``iteration``)
        return loss.detach()

    # -- CUDA graphs -------------------------------------------------------------------------------
    def _graphed(self, clients: list[int], inputs: tuple[torch.Tensor, ...],
                 collect: bool) -> tuple[tuple[torch.Tensor, torch.Tensor], dict[int, torch.Tensor] | None]:
        """``_compute`` replayed from a CUDA graph, one graph per set of clients and feature
        collection (``compute.cuda_graphs``); returns the losses and the server's D inputs.

        A key's first ``_GRAPH_WARMUP`` iterations run eagerly on a side stream (cuDNN's workspaces,
        the plans and the Adam states exist before capture, as capture needs), the next is captured
        and replayed, and later ones only copy their inputs into the graph's and replay it: one
        launch instead of thousands. Every iteration still runs exactly once. All graphs share one
        memory pool: each is self-contained (its inputs and outputs are its own tensors, weights and
        Adam states live outside the pool) and they never run at the same time."""
        key = (tuple(clients), collect)
        if key not in self._graphs:
            self._graph_warmups[key] = self._graph_warmups.get(key, 0) + 1
            if self._graph_warmups[key] <= _GRAPH_WARMUP:
                seen = {} if collect else None
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    out = self._compute(clients, inputs, seen)
                torch.cuda.current_stream().wait_stream(side)
                return out, seen
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            static = {"inputs": tuple(t.clone() for t in inputs), "seen": {} if collect else None}
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):  # records the kernels without running them
                static["out"] = self._compute(clients, static["inputs"], static["seen"])
            self._graphs[key] = (graph, static)
        graph, static = self._graphs[key]
        for held, new in zip(static["inputs"], inputs):
            held.copy_(new)
        graph.replay()
        return static["out"], static["seen"]  # overwritten by the next replay: read before it

    # -- round end and state -----------------------------------------------------------------------
    def _body_slots(self) -> list[int]:
        m = self.model
        return m.body_of.tolist() if len(m.cluster_bodies) else [-1] * len(m.clients)

    def _follow_bodies(self) -> None:
        """After a round end or a load: if clients moved between server bodies, forget the plans
        and graphs made for the old assignment."""
        slots = self._body_slots()
        if slots != self._slots:
            self._slots = slots
            self._plans.clear()
            self._drop_graphs()

    def federate(self, strategy, sizes, round_idx: int, seed: int, use_features: bool):
        agg = super().federate(strategy, sizes, round_idx, seed, use_features)
        self._follow_bodies()
        return agg

    def _drop_graphs(self) -> None:
        """Forget the captured graphs (they point at optimiser states that a load replaces)."""
        self._graphs.clear()
        self._graph_warmups.clear()

    def load_state_dict(self, state: dict) -> None:
        self._drop_graphs()
        super().load_state_dict(state)
        self._follow_bodies()

    def exchange(self, net: str, perm: list[int], *, optimiser_state: bool = True) -> None:
        self._drop_graphs()
        super().exchange(net, perm, optimiser_state=optimiser_state)
