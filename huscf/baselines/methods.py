"""Every method ``huscf train`` and ``huscf compare`` can run, as a small declarative record.

A method says where the networks live (split by the cuts, or whole on each client), how the
clients' data is arranged (as partitioned, or pooled per domain), how a round ends (the strategy)
and what crosses the network. Everything else (partition, cGAN blocks, iteration, optimiser,
evaluation) is shared, so the methods differ only where their papers differ. The ablations of
HuSCF-GAN are HuSCF-GAN with config overrides.
"""

from __future__ import annotations

from dataclasses import dataclass

from huscf.baselines.strategies import HierarchicalFedAvg, NoAggregation, PersonalizedSimilarity
from huscf.errors import HuscfError
from huscf.federation.strategies import FedAvg, make_strategy


@dataclass(frozen=True)
class Method:
    name: str
    title: str
    split: bool  # True: U-shaped split by the cuts (HuSCF-GAN); False: each client holds all of G and D
    pooled: bool  # True: one client per domain holding the whole domain (centralised)
    shares: str  # what leaves a client, for the docs and the report
    min_clients: int = 1
    shared_generator: bool = False  # one G for all clients, on the server (MD-GAN)
    swap_discriminators: bool = False  # discriminators move between clients after every epoch (MD-GAN)

    def strategy(self, cfg):
        """The round-end policy for a validated ``RunConfig``."""
        if self.name == "huscf":
            return make_strategy(cfg.federation)
        if self.name == "fedgan":
            return FedAvg()
        if self.name == "hflgan":
            return HierarchicalFedAvg(cfg.federation.max_clusters, cfg.federation.min_silhouette)
        if self.name == "pflgan":
            return PersonalizedSimilarity(cfg.baselines.pfl_temperature)
        return NoAggregation()

    def check(self, num_clients: int) -> None:
        if num_clients < self.min_clients:
            raise HuscfError(f"method '{self.name}' needs at least {self.min_clients} clients, the config has "
                             f"{num_clients}: raise data.clients_per_domain or add domains")


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("huscf", "HuSCF-GAN", True, False,
           "cut-layer activations and their gradients; client-side segment weights for averaging"),
    Method("fedgan", "FedGAN (Rasouli et al. 2020)", False, False,
           "whole G and D weights, averaged by data size after every round"),
    Method("hflgan", "HFL-GAN (Petch et al. 2024)", False, False,
           "whole G and D weights to an edge server, edge models to the global server", min_clients=3),
    Method("pflgan", "PFL-GAN (Wijesinghe et al. 2023)", False, False,
           "whole G and D weights; the server mixes a personalised model for every client", min_clients=2),
    Method("mdgan", "MD-GAN (Hardy et al. 2019)", False, False,
           "each batch's labels to the server, which sends back synthetic images and receives the "
           "discriminators' error feedback; discriminator weights to another client every epoch",
           min_clients=2, shared_generator=True, swap_discriminators=True),
    Method("local", "local only (the floor)", False, False, "nothing"),
    Method("centralized", "centralised (the ceiling; ignores privacy)", False, True,
           "all raw data, pooled per domain on one machine"),
)}

# name -> (method, config overrides, what is removed)
ABLATIONS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "huscf-noclust": ("huscf", ("federation.strategy=fedavg",), "no clustering: one global size-weighted average"),
    "huscf-nokld": ("huscf", ("federation.alpha=0",), "clusters, but size weights instead of KLD weights"),
    "huscf-homocuts": ("huscf", ("cuts.method=fixed", "cuts.fixed=[1,0,1,0]"),
                       "the same cuts [1, 0, 1, 0] for every client instead of the latency optimiser's"),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise HuscfError(f"unknown method '{name}': choose from {', '.join(METHODS)}")
    return METHODS[name]
