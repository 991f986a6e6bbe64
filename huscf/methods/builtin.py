"""The methods huscf ships: HuSCF-GAN, the baselines it is compared with, and its ablations
(docs/baselines.md). Each is one registered class."""

from __future__ import annotations

import numpy as np

from huscf.cuts.fleet import RoundLatency
from huscf.cuts.latency import LatencyModel
from huscf.federation.baselines import HierarchicalFedAvg, NoAggregation, PersonalizedSimilarity
from huscf.federation.strategies import FedAvg, make_strategy
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

    def before_epoch(self, engine, seed: int, round_no: int, epoch: int) -> None:
        engine.equal_steps = True  # every agent takes the same number of local steps

    def synchronises(self, cfg, steps: int) -> bool:
        return steps == cfg.baselines.fedgan_sync_every


@register
class HFLGAN(Method):
    name = "hflgan"
    title = "HFL-GAN (Petch et al. 2024)"
    shares = "whole G and D weights to an edge server, edge models to the global server"
    min_clients = 3

    def strategy(self, cfg):
        return HierarchicalFedAvg(cfg.federation.max_clusters, cfg.federation.min_silhouette)

    def latency(self, fleet, cuts, cfg):
        """Whole networks; a sync is clients -> edge -> global and back: the edge hop runs at the
        server's rate (edge servers are profiled as the server)."""
        lat = fleet.whole_networks()
        lat.sync_s += 2 * fleet.model_bytes() / fleet.server.rate
        return lat


@register
class PFLGAN(Method):
    name = "pflgan"
    title = "PFL-GAN (Wijesinghe et al. 2023)"
    shares = "whole G and D weights; the server mixes a personalised model for every client"
    min_clients = 2

    def strategy(self, cfg):
        return PersonalizedSimilarity(cfg.baselines.pfl_temperature)


def derangement(n: int, *key: int) -> list[int]:
    """A seeded permutation with no fixed point: every client gets another client's discriminator."""
    rng = np.random.default_rng([*key, 7])
    while True:
        perm = rng.permutation(n)
        if n < 2 or not (perm == np.arange(n)).any():
            return perm.tolist()


@register
class MDGAN(Method):
    name = "mdgan"
    title = "MD-GAN (Hardy et al. 2019)"
    shares = ("each batch's labels to the server, which sends back synthetic images and receives the "
              "discriminators' error feedback; discriminator weights to another client every epoch")
    min_clients = 2

    def strategy(self, cfg):
        return NoAggregation()

    def place(self, model) -> None:
        model.tie("G")  # one generator, the server's, that every client's generator pass runs through

    def latency(self, fleet, cuts, cfg):
        """Per iteration the server's G runs for every client; each client receives its fake batch
        (and sends its labels), runs its D and sends the error feedback (a gradient of the fake's
        size) back; after an epoch each D moves to a peer (through the server's link)."""
        n, batch = fleet.num_clients, fleet.profile.batch_size
        fake, labels = fleet.profile.g.out_bytes[-1], 8 * batch
        server = fleet.server_compute_s(n * fleet.flops("G"))
        client = (fleet.up_s(labels) + fleet.down_s(fake) + fleet.client_s(fleet.passes("D") * fleet.flops("D"))
                  + fleet.up_s(fake))
        epoch_s, epoch_bytes = fleet.sync(fleet.model_bytes(["D"]))
        return RoundLatency(server + float(client.max()), [2.0 * fake + labels] * n, epoch_s=epoch_s,
                            epoch_bytes=epoch_bytes, server_s=server,
                            stages={"server_generator": server, "clients": float(client.max())})

    def after_epoch(self, engine, seed: int, round_no: int, epoch: int) -> None:
        """The peer-to-peer swap: a seeded derangement of the discriminators after every epoch."""
        engine.exchange("D", derangement(len(engine.model.clients), seed, round_no, epoch), optimiser_state=False)


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
