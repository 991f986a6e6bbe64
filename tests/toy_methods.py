"""A toy method that uses a hook no shipped method uses, for the tests that run it on every
engine (issue 27): the engines and the runtime know nothing of it."""

from __future__ import annotations

import torch

from huscf.federation.strategies import FedAvg
from huscf.methods import Method

GIVEN = 32  # samples given to each client before each epoch


class GivesPeerFakes(Method):
    """Before every epoch each client is given GIVEN synthetic samples from the next client's
    generator (a stand-in for a peer's synthetic data), and trains on them besides its own."""

    name = "toy-given"
    title = "a toy method: each client also trains on its peer's synthetic samples"
    shares = "cut-layer activations and gradients; client weights for averaging; a peer's synthetic samples"
    split = True
    gives = True

    def strategy(self, cfg):
        return FedAvg()

    def before_epoch(self, engine, cfg, round_no: int, epoch: int) -> None:
        if not self.gives:
            return
        model = engine.model
        n = len(model.clients)
        dtype = next(model.parameters()).dtype
        noise = torch.Generator().manual_seed(cfg.seed * 1_000 + round_no * 10 + epoch)
        y = torch.arange(GIVEN) % 10
        given, training = {}, model.training
        model.eval()  # sampling: BatchNorm's running statistics, which it leaves as they are
        with torch.no_grad():
            for i in range(n):
                z = torch.randn(GIVEN, engine.z_dim, generator=noise).to(engine.device, dtype)
                given[i] = (model.generate((i + 1) % n, z, y.to(engine.device)).cpu(), y)
        model.train(training)
        engine.give(given)


class GivesNothing(GivesPeerFakes):
    """The same method without the hook's effect: what the toy's runs are compared with."""

    name = "toy-plain"
    gives = False


class SyncsEveryTwo(Method):
    """Whole networks per client, averaged after every second iteration of an epoch (a FedGAN-like
    schedule, ``Method.synchronises``); records after each epoch whether the clients were equal."""

    name = "toy-sync"
    title = "a toy method: FedAvg after every second iteration"
    shares = "whole G and D weights, averaged every second iteration"
    every = 2
    equal_after_epoch: list[bool] = []

    def strategy(self, cfg):
        return FedAvg()

    def synchronises(self, cfg, steps: int) -> bool:
        return steps == self.every

    def after_epoch(self, engine, cfg, round_no: int, epoch: int) -> None:
        first = engine.model.clients[0].state_dict()
        self.equal_after_epoch.append(all(torch.equal(v, c.state_dict()[k]) for c in engine.model.clients[1:]
                                          for k, v in first.items()))


class SyncsNever(SyncsEveryTwo):
    name = "toy-nosync"
    every = 10**9
