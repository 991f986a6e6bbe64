"""The simulation engine's iteration with clients batched: each block runs once per chunk of clients.

Same maths as ``SimulationEngine`` (the reference: a Python loop over clients), organised for the
hardware. The activations of a chunk of K clients are stacked into one tensor (K, B, ...). At
block b:

* the clients that hold their own copy of b run it as **one call vmapped over their stacked
  weights** (``torch.func.vmap`` + ``functional_call``: grouped convolutions, batched matmuls);
* the clients that use the server's copy run it as **one call over their folded batch** with the
  server's weights (one dense convolution for all of them);
* BatchNorm statistics stay per client in both cases (vmap normalises every client's rows on
  their own), exactly as in the loop, so no client's normalisation sees another client's data.

Gradients reach every client's own weights through ``torch.stack`` and sum over clients into the
server's weights, as the loop's per-client backward passes do; each optimiser then steps once.
Results equal the loop's up to floating-point summation order (tested).

Memory: ``client_chunk`` bounds how many clients' activations are alive at once. With
``recompute_generator`` (on by default when there is more than one chunk), the generator forward
of the discriminator step runs without a graph and is recomputed chunk by chunk in the generator
step (same noise, same weights, so the same fakes) instead of keeping every client's generator
graph alive through the discriminator step.

Speed: this is the CUDA default (4.6x the per-client loop at 80 clients on an H100). On a CPU
the per-client loop is faster (large grouped batches fall out of cache); see
docs/performance.md.

Precision: ``precision="bf16"`` runs the forward passes under ``torch.autocast`` (bfloat16
matmuls and convolutions, fp32 weights, optimiser states and losses).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from huscf.engine.execution import Execution
from huscf.engine.simulation import ClientData, SimulationEngine
from huscf.split.segments import SplitGAN


def _take(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Rows of a stacked tensor; a view when they are contiguous."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return t[rows[0]:rows[0] + len(rows)]
    return t[torch.tensor(rows, device=t.device)]


class BatchedEngine(SimulationEngine):
    """``SimulationEngine`` whose iteration batches clients (see the module docstring)."""

    def __init__(self, model: SplitGAN, data: list[ClientData], batch_size: int, lr: float,
                 betas: tuple[float, float], z_dim: int, seed: int, max_iters_per_epoch: int | None = None,
                 execution: Execution | None = None, shared_generator: bool = False):
        super().__init__(model, data, batch_size, lr, betas, z_dim, seed, max_iters_per_epoch, execution,
                         shared_generator)
        self._params: dict[tuple, dict[str, list[torch.nn.Parameter]]] = {}

    # -- one block, one net ----------------------------------------------------------------------
    def _stacked(self, net: str, b: int, ids: tuple[int, ...], args: tuple) -> torch.Tensor:
        """Block b of clients ``ids`` (each with its own copy), one vmapped call over their weights."""
        mods = [self.model.clients[i].nets[net][str(b)] for i in ids]
        key = (net, b, ids)
        if key not in self._params:  # the Parameter objects are stable: averaging copies in place
            names = [n for n, _ in mods[0].named_parameters()]
            per = [dict(m.named_parameters()) for m in mods]
            self._params[key] = {n: [p[n] for p in per] for n in names}
        stacked = {n: torch.stack(ps) for n, ps in self._params[key].items()}
        template = mods[0]

        def call(params, *a):
            return functional_call(template, params, a)

        return vmap(call)(stacked, *args)

    def _shared(self, net: str, b: int, args: tuple) -> torch.Tensor:
        """Block b of the server for every row of ``args``: the server's weights, per-client statistics."""
        return vmap(self.model.server.nets[net][str(b)])(*args)

    def _block(self, net: str, b: int, clients: list[int], h: tuple) -> torch.Tensor:
        own = [k for k, i in enumerate(clients) if self.model.clients[i].holds(net, b)]
        if len(own) == len(clients):
            return self._stacked(net, b, tuple(clients), h)
        if not own:
            return self._shared(net, b, h)
        own_set = set(own)
        srv = [k for k in range(len(clients)) if k not in own_set]
        out_srv = self._shared(net, b, tuple(_take(a, srv) for a in h))
        out_own = self._stacked(net, b, tuple(clients[k] for k in own), tuple(_take(a, own) for a in h))
        order = srv + own
        out = torch.cat([out_srv, out_own])
        if order == sorted(order):
            return out
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return out[inverse.to(out.device)]

    def _net(self, net: str, clients: list[int], inputs: tuple, server_input: dict | None = None) -> torch.Tensor:
        """The U-shaped forward of ``net`` for a chunk of clients; rows of every tensor = clients."""
        m = self.model
        ranges = [m.ranges(i, net) for i in clients]
        h = inputs
        for b in range(m.num_blocks[net]):
            out = self._block(net, b, clients, h)
            to_server = [k for k, r in enumerate(ranges) if r.server and r.head[-1] == b]
            if to_server:
                out = m.seam.cross_rows(out, "client->server", [clients[k] for k in to_server], to_server, net, b)
                if server_input is not None:
                    server_input.update({clients[k]: out[k].detach() for k in to_server})
            back = [k for k, r in enumerate(ranges) if r.server and r.server[-1] == b]
            if back:
                out = m.seam.cross_rows(out, "server->client", [clients[k] for k in back], back, net, b)
            h = (out,)
        return h[0]

    # -- one iteration ---------------------------------------------------------------------------
    def _row_losses(self, out: torch.Tensor, target: float) -> torch.Tensor:
        out = out.float().flatten(1)
        return F.binary_cross_entropy_with_logits(out, torch.full_like(out, target), reduction="none").mean(1)

    def _finite(self, losses: torch.Tensor, clients: list[int], what: str, where: tuple) -> list[float]:
        values = losses.tolist()
        bad = next((i for i, v in zip(clients, values) if not math.isfinite(v)), None)
        if bad is not None:
            self._not_finite(bad, what, where)
        return values

    def iteration(self, batch: dict[int, tuple[torch.Tensor, torch.Tensor]], noise: torch.Generator,
                  where: tuple = (), collect_features: bool = False) -> dict[int, tuple[float, float]]:
        m = self.model
        # the same noise as the loop (drawn in client order), then clients with equal cuts side by side
        z = {i: torch.randn(len(batch[i][1]), self.z_dim, generator=noise) for i in sorted(batch)}
        clients = sorted(batch, key=lambda i: (m.clients[i].cuts, i))
        if len({len(batch[i][1]) for i in clients}) > 1:
            raise ValueError("the batched engine needs equal batch sizes for all clients of an iteration")
        size = self.ex.client_chunk or len(clients)
        chunks = [clients[s:s + size] for s in range(0, len(clients), size)]
        recompute = self.ex.recompute_generator

        def inputs(chunk):
            zs = torch.stack([z[i] for i in chunk]).to(self.device)
            xs = torch.stack([batch[i][0] for i in chunk])
            ys = torch.stack([batch[i][1] for i in chunk])
            return zs, xs, ys

        fakes = []
        with torch.no_grad() if recompute else nullcontext(), self.ex.autocast():
            for chunk in chunks:
                zs, _, ys = inputs(chunk)
                fakes.append(self._net("G", chunk, (zs, ys)))

        # discriminator step: fakes detached, real and fake batches normalised separately (as the loop)
        all_clients = sorted(clients)
        self._zero_grad("D", all_clients)
        collect = collect_features and self.feature_depth is not None
        seen: dict[int, torch.Tensor] = {}
        d_losses = {}
        for chunk, fake in zip(chunks, fakes):
            _, xs, ys = inputs(chunk)
            with self.ex.autocast():
                out_fake = self._net("D", chunk, (fake.detach(), ys))
                out_real = self._net("D", chunk, (xs, ys), server_input=seen if collect else None)
            loss = self._row_losses(out_fake, 0.0) + self._row_losses(out_real, 1.0)
            values = self._finite(loss.detach(), chunk, "discriminator", where)
            loss.sum().backward()
            d_losses.update(zip(chunk, values))
        self._step("D", all_clients)
        if collect:
            with torch.no_grad():
                for i, act in m.server_features({i: seen[i].float() for i in sorted(seen)}, self.feature_depth).items():
                    self.features.add(i, act)

        # generator step through the updated discriminator (its weights frozen here)
        self._zero_grad("G", all_clients)
        self._requires_grad("D", False)
        g_losses = {}
        for k, chunk in enumerate(chunks):
            zs, _, ys = inputs(chunk)
            with self.ex.autocast():
                fake = self._net("G", chunk, (zs, ys)) if recompute else fakes[k]
                out = self._net("D", chunk, (fake, ys))
            fakes[k] = None
            loss = self._row_losses(out, 1.0)
            values = self._finite(loss.detach(), chunk, "generator", where)
            loss.sum().backward()
            g_losses.update(zip(chunk, values))
        self._requires_grad("D", True)
        self._step("G", all_clients)
        return {i: (d_losses[i], g_losses[i]) for i in all_clients}
