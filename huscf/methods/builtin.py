"""The methods huscf ships: HuSCF-GAN, the baselines it is compared with, and its ablations
(docs/baselines.md). Each is one registered class."""

from __future__ import annotations

import numpy as np

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


@register
class FedGAN(Method):
    name = "fedgan"
    title = "FedGAN (Rasouli et al. 2020)"
    shares = "whole G and D weights, averaged by data size after every round"

    def strategy(self, cfg):
        return FedAvg()


@register
class HFLGAN(Method):
    name = "hflgan"
    title = "HFL-GAN (Petch et al. 2024)"
    shares = "whole G and D weights to an edge server, edge models to the global server"
    min_clients = 3

    def strategy(self, cfg):
        return HierarchicalFedAvg(cfg.federation.max_clusters, cfg.federation.min_silhouette)


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
    shared_generator = True

    def strategy(self, cfg):
        return NoAggregation()

    def after_epoch(self, engine, seed: int, round_no: int, epoch: int) -> None:
        """The peer-to-peer swap: a seeded derangement of the discriminators after every epoch."""
        engine.exchange("D", derangement(len(engine.model.clients), seed, round_no, epoch))


@register
class LocalOnly(Method):
    name = "local"
    title = "local only (the floor)"
    shares = "nothing"

    def strategy(self, cfg):
        return NoAggregation()


@register
class Centralised(Method):
    name = "centralized"
    title = "centralised (the ceiling; ignores privacy)"
    shares = "all raw data, pooled per domain on one machine"
    pooled = True

    def strategy(self, cfg):
        return NoAggregation()


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
