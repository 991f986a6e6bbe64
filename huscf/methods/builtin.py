"""The methods huscf ships: HuSCF-GAN, the baselines it is compared with, and its ablations
(docs/baselines.md). Each is one registered class."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from huscf.cuts.fleet import RoundLatency
from huscf.cuts.latency import LatencyModel
from huscf.federation.baselines import EdgeHierarchy, NoAggregation
from huscf.federation.strategies import FedAvg, make_strategy
from huscf.federation.synthetic import generator_samples, mmd2, peer_weights
from huscf.methods.base import Method, register


@register
class HuSCFGAN(Method):
    name = "huscf"
    title = "HuSCF-GAN"
    shares = "cut-layer activations and their gradients; client-side segment weights for averaging"
    split = True

    def strategy(self, cfg):
        return make_strategy(cfg.federation)

    def latency(self, fleet, cuts, cfg):
        """The split model's iteration (docs/latency.md); the round end sends each client's head and
        tail segments up and their averages back."""
        rep = LatencyModel(fleet.profile, fleet.devices, fleet.server, cfg.devices.client_time_weight,
                           cfg.devices.server_time_weight).report(cuts)
        sync_s, sync_bytes = fleet.sync(fleet.segment_bytes(cuts))
        return RoundLatency(rep.total_s, [float(b) for b in rep.bytes_per_client], sync_s, sync_bytes,
                            server_s=rep.server_s, stages=rep.stages, objective=rep.objective)


@register
class FedGAN(Method):
    name = "fedgan"
    title = "FedGAN (Rasouli et al. 2020)"
    shares = "whole G and D weights, averaged by data size every K local steps and at the round end"

    def strategy(self, cfg):
        return FedAvg()

    def prepare(self, engine, cfg, setup) -> None:
        engine.equal_steps = True  # every agent takes the same number of local steps

    def synchronises(self, cfg, steps: int) -> bool:
        return steps == cfg.baselines.fedgan_sync_every


@register
class HFLGAN(Method):
    name = "hflgan"
    title = "HFL-GAN (Petch et al. 2024)"
    shares = ("whole G and D weights to an edge server (which samples the generators to form the edges), "
              "the edges' discriminators to the global server; one generator per edge")
    min_clients = 2

    def strategy(self, cfg):
        b = cfg.baselines
        return EdgeHierarchy(b.hfl_edges, tuple(b.hfl_global_nets), b.similarity_samples)

    def prepare(self, engine, cfg, setup) -> None:
        engine.equal_steps = cfg.baselines.similarity_equal_steps  # as PFL-GAN's step 0

    def latency(self, fleet, cuts, cfg):
        """Whole networks; a sync is clients -> edge and back, plus the edge's hop to the global
        server and back with the globally averaged nets (edge servers are profiled as the server)."""
        lat = fleet.whole_networks()
        lat.sync_s += 2 * fleet.model_bytes(cfg.baselines.hfl_global_nets if cfg else ["D"]) / fleet.server.rate
        return lat


def label_draws(counts: np.ndarray, m: int, rng: np.random.Generator) -> torch.Tensor:
    """``m`` labels drawn from a client's own label counts (on the client: its generator makes the
    classes it holds)."""
    return torch.from_numpy(rng.choice(len(counts), size=m, p=counts / counts.sum())).long()


@register
class PFLGAN(Method):
    """PFL-GAN (Wijesinghe, Zhang, Ding 2023, as its abstract states it: learn the clients'
    similarity, then a similarity-weighted aggregation of synthetic data; the details are huscf's,
    docs/baselines.md). From round 2 on, at the round's start:

    0. every client takes the same number of local steps (``Engine.equal_steps``;
       ``baselines.similarity_equal_steps``): the server
       compares generators, and one that took 1 step where another took 6 differs by how far it
       moved, not by its data (measured: docs/results.md);
    1. every client sends ``similarity_samples`` samples of its generator (labels drawn from its
       own label counts) to the server;
    2. the server's similarity: w_ij ∝ exp(-MMD2_ij / (T med)) over the peers (``synthetic``);
    3. client i receives ``round(share n_i)`` synthetic samples with their labels, split over its
       peers by w_i (a seeded multinomial), each made by that peer's generator;
    4. every epoch of the round, client i trains on its data plus those samples (``Engine.give``).

    No weights are averaged: each client keeps its own G and D."""

    name = "pflgan"
    title = "PFL-GAN (Wijesinghe et al. 2023)"
    shares = ("synthetic images with their labels: samples of each client's generator to the server, which learns "
              "the clients' similarity, and similarity-weighted samples from peers' generators to each client")
    min_clients = 2

    def strategy(self, cfg):
        return NoAggregation()

    def prepare(self, engine, cfg, setup) -> None:
        labels = {name: y.numpy() for name, (_, y) in setup.domain_data.items()}
        self.counts = [np.bincount(labels[p.domain][p.indices], minlength=setup.arch.num_classes)
                       for p in setup.partitions]
        self.given: dict = {}
        engine.equal_steps = cfg.baselines.similarity_equal_steps  # step 0 above

    def _samples(self, engine, client: int, m: int, rng: np.random.Generator, noise: torch.Generator):
        y = label_draws(self.counts[client], m, rng)
        return generator_samples(engine.model, client, torch.randn(m, engine.z_dim, generator=noise), y), y

    def before_epoch(self, engine, cfg, round_no: int, epoch: int) -> dict | None:
        if round_no == 1:  # no generator has learnt anything yet
            return None
        if epoch > 0:
            engine.give(self.given)
            return None
        b, n = cfg.baselines, len(self.counts)
        rng, noise = np.random.default_rng([cfg.seed, round_no, 17]), torch.Generator().manual_seed(cfg.seed + round_no)
        probes = [self._samples(engine, j, b.similarity_samples, rng, noise)[0].flatten(1).numpy() for j in range(n)]
        d2 = mmd2(probes)
        w = peer_weights(d2, b.pfl_temperature)
        counts = np.stack([rng.multinomial(round(b.pfl_synthetic_share * self.counts[i].sum()), w[i])
                           for i in range(n)])
        made = [self._samples(engine, j, int(c), rng, noise) for j, c in enumerate(counts.sum(0))]  # one call a peer
        self.given, start = {}, np.zeros(n, dtype=int)
        for i in range(n):  # recipient i takes the next counts[i, j] of peer j's samples
            rows = [slice(a, a + c) for a, c in zip(start, counts[i])]
            start += counts[i]
            if counts[i].sum():
                self.given[i] = tuple(torch.cat([m[k][r] for m, r in zip(made, rows)]) for k in (0, 1))
        engine.give(self.given)
        return {"phase": "synthetic", "mmd2": d2.round(6).tolist(), "peer_weights": w.round(4).tolist(),
                "given": counts.tolist()}

    def latency(self, fleet, cuts, cfg):
        """Whole networks, nothing averaged; a round's start sends each client's probe samples up and
        its share of peers' samples (images and int64 labels) through the server to it."""
        lat = fleet.whole_networks(synchronises=False)
        b = cfg.baselines if cfg is not None else None
        sample = fleet.profile.g.out_bytes[-1] / fleet.profile.batch_size + 8  # one image and its label
        probe, share = (b.similarity_samples, b.pfl_synthetic_share) if b else (64, 0.5)
        given = share * np.asarray(fleet.sizes if fleet.sizes else [0] * fleet.num_clients, dtype=float)
        lat.sync_s, lat.sync_bytes = fleet.sync((probe + given) * sample)
        return lat


def derangement(n: int, *key: int) -> list[int]:
    """A seeded permutation with no fixed point: every client gets another client's discriminator."""
    rng = np.random.default_rng([*key, 7])
    while True:
        perm = rng.permutation(n)
        if n < 2 or not (perm == np.arange(n)).any():
            return perm.tolist()


@dataclass(frozen=True)
class ServerBatches:
    """MD-GAN's fakes (Hardy et al. 2019, Algorithm 1 and its section IV-B1): every iteration the
    server draws ``k`` batches of noise and of labels (uniform over the classes: the paper's
    experiments condition the generator, ACGAN), generates them, and sends worker i (counted from 0)
    two distinct ones: X(d) = batch (i + 1) mod k for its discriminator step and X(g) = batch i mod k
    for the error feedback of its generator step. A ``FakeInputs``."""

    k: int
    num_classes: int

    def draw(self, noise: torch.Generator, rows: dict[int, int], z_dim: int) -> dict[int, tuple]:
        b = max(rows.values())
        z = [torch.randn(b, z_dim, generator=noise) for _ in range(self.k)]
        y = [torch.randint(self.num_classes, (b,), generator=noise) for _ in range(self.k)]
        return {i: tuple((z[j][:n], y[j][:n]) for j in ((i + 1) % self.k, i % self.k)) for i, n in rows.items()}


def mdgan_batches(cfg, num_clients: int) -> int:
    """MD-GAN's k: ``baselines.mdgan_batches``, or by default the paper's ceil(log2 N), at least 2 so
    that every worker's two batches differ."""
    k = cfg.baselines.mdgan_batches if cfg is not None else None
    return k or max(2, math.ceil(math.log2(num_clients)))


@register
class MDGAN(Method):
    name = "mdgan"
    title = "MD-GAN (Hardy et al. 2019)"
    shares = ("synthetic images with their (server-drawn) labels from the server, the discriminators' error feedback "
              "to it; discriminator weights to another client every E epochs")
    min_clients = 2

    def strategy(self, cfg):
        return NoAggregation()

    def place(self, model) -> None:
        model.tie("G")  # one generator, the server's, that every client's generator pass runs through

    def prepare(self, engine, cfg, setup) -> None:
        engine.fake_inputs = ServerBatches(mdgan_batches(cfg, len(engine.model.clients)), setup.arch.num_classes)

    def latency(self, fleet, cuts, cfg):
        """Per iteration the server's G runs forward and backward on its k batches; each client
        receives two of them with their labels, runs its D and sends the error feedback (a gradient
        of a fake batch's size) back; every E epochs each D moves to a peer (through the server's link)."""
        n, batch = fleet.num_clients, fleet.profile.batch_size
        fake, labels = fleet.profile.g.out_bytes[-1], 8 * batch
        server = fleet.server_compute_s(mdgan_batches(cfg, n) * fleet.flops("G"))
        client = (fleet.down_s(2 * (fake + labels)) + fleet.client_s(fleet.passes("D") * fleet.flops("D"))
                  + fleet.up_s(fake))
        epoch_s, epoch_bytes = fleet.sync(fleet.model_bytes(["D"]))
        if cfg is not None:  # a swap every E epochs: its cost spread over the epochs
            epoch_s, epoch_bytes = epoch_s / cfg.baselines.mdgan_swap_every, [
                b / cfg.baselines.mdgan_swap_every for b in epoch_bytes]
        return RoundLatency(server + float(client.max()), [3.0 * fake + 2 * labels] * n, epoch_s=epoch_s,
                            epoch_bytes=epoch_bytes, server_s=server,
                            stages={"server_generator": server, "clients": float(client.max())})

    def after_epoch(self, engine, cfg, round_no: int, epoch: int) -> dict | None:
        """The peer-to-peer swap: a seeded derangement of the discriminators every E local epochs
        (``baselines.mdgan_swap_every``; the paper's E = 1), counted over the run."""
        if ((round_no - 1) * cfg.train.local_epochs + epoch + 1) % cfg.baselines.mdgan_swap_every:
            return None
        perm = derangement(len(engine.model.clients), cfg.seed, round_no, epoch)
        engine.exchange("D", perm, optimiser_state=False)
        return {"swaps": {str(epoch): perm}}


@register
class LocalOnly(Method):
    name = "local"
    title = "local only (the floor)"
    shares = "nothing"

    def strategy(self, cfg):
        return NoAggregation()

    def latency(self, fleet, cuts, cfg):
        return fleet.whole_networks(synchronises=False)


@register
class Centralised(LocalOnly):
    """Local-only training on each domain's pooled data."""

    name = "centralized"
    title = "centralised (the ceiling; ignores privacy)"
    shares = "all raw data, pooled per domain on one machine"
    pooled = True


@register
class NoClustering(HuSCFGAN):
    name = "huscf-noclust"
    title = "HuSCF-GAN without clustering: one global size-weighted average"
    ablation_of = "huscf"
    overrides = ("federation.strategy=fedavg",)


@register
class NoKLDWeights(HuSCFGAN):
    name = "huscf-nokld"
    title = "HuSCF-GAN with size weights instead of KLD weights"
    ablation_of = "huscf"
    overrides = ("federation.alpha=0",)


@register
class HomogeneousCuts(HuSCFGAN):
    name = "huscf-homocuts"
    title = "HuSCF-GAN with the cuts [1, 0, 1, 0] for every client instead of the latency optimiser's"
    ablation_of = "huscf"
    overrides = ("cuts.method=fixed", "cuts.fixed=[1,0,1,0]")


@register
class SharedBody(HuSCFGAN):
    name = "huscf-sharedbody"
    title = "HuSCF-GAN with one server body for every client instead of one per cluster"
    ablation_of = "huscf"
    overrides = ("federation.server_body=shared",)
