"""All clients in one process: the reference schedule of one HuSCF-GAN iteration.

What an iteration computes (its losses, step order and optimisers) is ``engines.objective``; this
engine runs it client by client in one process: every participating client at once per step, the
server's blocks accumulating the sum of all clients' gradients before each optimiser steps once.

An epoch is a real pass over each client's own partition (shuffled, without replacement,
remainder dropped): client i has n_i // B batches, the epoch runs max_i of that, and a client
whose batches are used up sits out the rest of the epoch. All randomness of a round is drawn from
generators keyed by (seed, round, ...), so a resumed run replays exactly what an uninterrupted
one does.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from huscf.config import TrainConfig
from huscf.engines.execution import Execution, for_loss
from huscf.engines import objective
from huscf.engines.objective import FakeInputs, adam, check_finite
from huscf.errors import HuscfError
from huscf.federation.bodies import carry_optimizer_state
from huscf.federation.features import FeatureStats
from huscf.federation.rounds import federate
from huscf.federation.strategies import Aggregation, Strategy
from huscf.runsetup import ClientData
from huscf.split.segments import NETS, SplitGAN


def check_given(data: dict, num_clients: int, sample_shape: tuple[int, ...]) -> dict:
    """``Engine.give``'s input checked: client ids in the run, samples of the data's shape, one
    integer label each. The same dict, or one line of error."""
    for i, (x, y) in data.items():
        if not 0 <= i < num_clients:
            raise HuscfError(f"give: no client {i} (the run has {num_clients})")
        if tuple(x.shape[1:]) != tuple(sample_shape) or y.shape != (len(x),) or y.is_floating_point():
            raise HuscfError(f"give: client {i} takes samples of shape {tuple(sample_shape)} with one integer "
                             f"label each; got {tuple(x.shape)} and labels {tuple(y.shape)} {y.dtype}")
    return data


def keyed_rng(*key: int) -> np.random.Generator:
    """The generator of one piece of a round's randomness, keyed by (seed, round, epoch, ...): every
    engine and process draws the same numbers for the same key."""
    return np.random.default_rng(list(key))


def epoch_noise(seed: int, round_idx: int, epoch: int) -> torch.Generator:
    """The stream of an epoch's latent noise, drawn in client order by every engine."""
    return torch.Generator().manual_seed(int(keyed_rng(seed, round_idx, epoch, 1 << 20).integers(2**62)))


def draw_fake_inputs(batch: dict, noise: torch.Generator, z_dim: int, plan: FakeInputs | None) -> dict[int, tuple]:
    """Per client of ``batch``, the (z, y) of its step-2 fakes and of its step-3 fakes, or None for
    the latter when it is the former's. By default: noise drawn in client order (in float32 in every
    precision: an fp64 run sees the fp32 run's noise, cast exactly) and the real batch's labels, one
    draw for both steps; else ``plan``'s."""
    if plan is not None:
        return plan.draw(noise, {i: len(batch[i][1]) for i in sorted(batch)}, z_dim)
    return {i: ((torch.randn(len(batch[i][1]), z_dim, generator=noise), batch[i][1]), None) for i in sorted(batch)}


def epoch_iterations(batches_per_client: list[int], cap: int | None) -> int:
    """Iterations of an epoch: the longest client's batches, capped by ``train.max_iters_per_epoch``."""
    return min(max(batches_per_client), cap or max(batches_per_client))


class EpochLosses:
    """Each client's mean D and G loss over the iterations of an epoch it finished (NaN: none)."""

    def __init__(self, num_clients: int):
        self.sums, self.counts = np.zeros((2, num_clients)), np.zeros(num_clients)

    def add(self, losses: dict[int, tuple[float, float]]) -> None:
        for i, pair in losses.items():
            self.sums[:, i] += pair
            self.counts[i] += 1

    def means(self) -> dict[str, list[float]]:
        with np.errstate(invalid="ignore", divide="ignore"):
            d, g = self.sums / self.counts
        return {"d": d.tolist(), "g": g.tolist()}


class _NoOptimizer:
    """The optimiser slot of a client that holds no trainable copy of a net (a tied one)."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _keep_own_flags(opt) -> None:
    """After loading a checkpoint from another device: keep this optimiser's own ``fused`` and
    ``capturable`` (a loaded state brings the saving run's), with each step counter where they
    need it (on the parameter's device for either, else on the CPU as torch keeps it)."""
    own = getattr(opt, "huscf_flags", None)
    if own is None:  # not one of ours (an optimiser slot that keeps its own flags)
        return
    for group in opt.param_groups:
        group.update(own)
        for p in group["params"]:
            st = opt.state.get(p)
            if st and "step" in st:
                st["step"] = place_step(st["step"], p, on_device=any(own.values()))


def place_step(step: torch.Tensor, param: torch.Tensor, on_device: bool) -> torch.Tensor:
    """An Adam step counter where a fresh optimiser keeps it: float32 on the parameter's device for
    a fused or capturable step, else on the CPU (the one rule for every engine's checkpoint load)."""
    return step.to(device=param.device if on_device else "cpu", dtype=torch.float32)


class SimulationEngine:
    """Owns the split model's optimisers and runs epochs of the iteration above."""

    placement = ""  # every client and the server in this process

    def __init__(self, model: SplitGAN, data: list[ClientData], *, train: TrainConfig, z_dim: int, seed: int,
                 execution: Execution | None = None, feature_depth: int | None = None):
        """``train``: batch size, learning rate, betas and the iteration cap of the run;
        ``feature_depth``: the D block whose server-side activations the round end clusters on
        (None: no clustering features). Where the networks live is ``model``'s (``SplitGAN.tie``)."""
        if len(data) != len(model.clients):
            raise ValueError("one ClientData per client is required")
        batch_size = train.batch_size
        self.ex = execution or Execution()
        self.device = self.ex.torch_device
        if self.device.type == "cuda":  # let cuDNN time its algorithms once per shape (off by default)
            torch.backends.cudnn.benchmark = self.ex.cudnn_benchmark
        model.to(device=self.device, dtype=self.ex.dtype)  # fp64: the fp32 initial weights, cast exactly
        if self.ex.channels_last:
            model.to(memory_format=torch.channels_last)
        data = [ClientData(self.ex.layout(d.x.to(self.device, self.ex.dtype)), d.y.to(self.device), d.domain)
                for d in data]
        self.model, self.data, self.batch_size, self.z_dim, self.seed = model, data, batch_size, z_dim, seed
        self.max_iters = train.max_iters_per_epoch

        # on CUDA, one fused kernel per optimiser step: with one optimiser per client segment the
        # default multi-kernel step was a third of the GPU time of an 80-client iteration
        self._opt_flags = {"fused": self.device.type == "cuda", "capturable": self.ex.cuda_graphs}

        def opt(params):
            return adam(params, train, **self._opt_flags)

        # a net all clients share one copy of (``SplitGAN.tie``) is the server's: it steps once
        self.client_opts = [{net: _NoOptimizer() if net in model.tied else opt(model.client_parameters(i, net))
                             for net in NETS} for i in range(len(data))]
        self.server_opts = {net: opt(model.client_parameters(0, net) if net in model.tied
                                     else model.server_parameters(net)) for net in NETS}
        # when set (to a depth), the server collects clustering features from the real D passes
        self.feature_depth = feature_depth
        self.features = FeatureStats(len(data))
        self._given: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # ``give``: for the next epoch
        self.equal_steps = False  # ``Engine.equal_steps``
        self.fake_inputs: FakeInputs | None = None  # ``Engine.fake_inputs``

    # -- epochs --------------------------------------------------------------------------------
    def give(self, data: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """For the next epoch only, client i trains on its partition plus ``data[i]`` (images, int
        labels): samples a method hands a client, e.g. a peer's synthetic data."""
        for i, (x, y) in check_given(data, len(self.data), self.data[0].x.shape[1:]).items():
            self._given[i] = (self.ex.layout(x.to(self.device, self.ex.dtype)), y.to(self.device))

    def _epoch_data(self) -> list[ClientData]:
        """Each client's samples for this epoch: its partition, then what it was given."""
        return [d if i not in self._given else
                ClientData(torch.cat([d.x, self._given[i][0]]), torch.cat([d.y, self._given[i][1]]), d.domain)
                for i, d in enumerate(self.data)]

    def batches_per_client(self) -> list[int]:
        return [max(1, len(d) // self.batch_size) for d in self._epoch_data()]

    def iterations_per_epoch(self) -> int:
        return epoch_iterations(self.batches_per_client(), self.max_iters)

    def run_epoch(self, round_idx: int, epoch: int, on_iteration=None,
                  collect_features: bool = False) -> dict[str, list[float]]:
        """One local epoch; returns the per-client mean D and G losses over the epoch. With
        ``collect_features``, ``self.features`` holds the epoch's clustering features afterwards."""
        if collect_features:
            self.features = FeatureStats(len(self.data))
        nb, iterations = self.batches_per_client(), self.iterations_per_epoch()
        data, self._given = self._epoch_data(), {}  # what was given counts for this epoch only
        # the permutations live beside the data: a batch is then one gather, with no host copy
        perms = [torch.from_numpy(keyed_rng(self.seed, round_idx, epoch, i).permutation(len(d))).to(d.y.device)
                 for i, d in enumerate(data)]
        noise, losses = epoch_noise(self.seed, round_idx, epoch), EpochLosses(len(self.data))
        for t in range(iterations):
            batch = {}
            for i, d in enumerate(data):
                if t < nb[i] or self.equal_steps:  # equal steps: a client past its last batch starts over
                    s = t % nb[i]
                    idx = perms[i][s * self.batch_size:(s + 1) * self.batch_size]
                    batch[i] = (d.x[idx], d.y[idx])
            done = self.iteration(batch, noise, where=(round_idx, epoch, t), collect_features=collect_features)
            losses.add(done)
            if on_iteration is not None:
                on_iteration(done)
        return losses.means()

    # -- one iteration: ``objective``'s steps, client by client ------------------------------------
    per_row = False  # one client per group

    @property
    def recompute(self) -> bool:  # distinct inputs for step 3 (``fake_inputs``) need its fakes made anew
        return self.ex.recompute_generator or self.fake_inputs is not None

    def iteration(self, batch: dict[int, tuple[torch.Tensor, torch.Tensor]], noise: torch.Generator,
                  where: tuple = (), collect_features: bool = False) -> dict[int, tuple[float, float]]:
        """``objective.iteration`` for the clients in ``batch``; returns {client: (L_D, L_G)}."""
        self._batch, self._clients = batch, sorted(batch)
        def placed(zy: tuple) -> tuple:  # noise is drawn in fp32
            return zy[0].to(self.device, self.ex.dtype), zy[1].to(self.device)

        self._fakes_in = {}
        for i, (first, second) in draw_fake_inputs(batch, noise, self.z_dim, self.fake_inputs).items():
            first = placed(first)  # placed once: a default second step reuses it
            self._fakes_in[i] = (first, first if second is None else placed(second))
        self._seen = {} if collect_features and self.feature_depth is not None else None
        d, g = objective.iteration(self, self._clients, where)
        if self._seen is not None:  # D does not change in the G step: these are the stepped weights
            self._add_features(self._seen)
        return {i: (d[i], g[i]) for i in self._clients}

    @torch.no_grad()
    def _add_features(self, seen: dict[int, torch.Tensor]) -> None:
        """The clustering features: the server's D activations of the real batches it received."""
        for i, act in self.model.server_features(seen, self.feature_depth).items():
            self.features.add(i, act)

    def generate(self, i: int, *, again: bool = False) -> torch.Tensor:
        with self.ex.autocast():
            return self.model.generate(i, *self._fakes_in[i][again])

    def discriminate(self, i: int, fake: torch.Tensor, *, real: bool):
        x, y = self._batch[i]
        received: list[torch.Tensor] | None = [] if real and self._seen is not None else None
        with self.ex.autocast():
            out = self.model.discriminate(i, fake, self._fakes_in[i][not real][1])  # the fakes' labels
            if not real:
                return out
            out_real = self.model.discriminate(i, x, y, server_input=received)
        if received is not None:  # kept only when needed: it pins the server's input activation
            self._seen[i] = for_loss(received[0])
        return out, out_real

    def backward(self, i: int, loss: torch.Tensor, what: str, where: tuple) -> float:
        (value,) = check_finite([loss.item()], [i], what, where)
        loss.backward()
        return value

    def _opts(self, net: str):
        return [self.client_opts[i][net] for i in self._clients] + [self.server_opts[net]]

    def zero_grad(self, net: str) -> None:
        for opt in self._opts(net):
            opt.zero_grad(set_to_none=True)

    def step(self, net: str) -> None:
        if net in self.model.tied:  # one copy for all clients: the mean of their gradients (MD-GAN's feedback)
            for p in self.model.client_parameters(0, net):
                if p.grad is not None:
                    p.grad /= len(self._clients)
        for opt in self._opts(net):
            opt.step()

    def requires_grad(self, net: str, flag: bool) -> None:
        for c in self.model.clients:
            c.nets[net].requires_grad_(flag)
        self.model.server_requires_grad_(net, flag)

    def federate(self, strategy: Strategy, sizes: np.ndarray, round_idx: int, seed: int,
                 use_features: bool) -> Aggregation:
        """The round-end aggregation, applied to ``self.model`` (see ``federation.rounds``). A
        cluster body used for the first time takes the Adam state of the body its members used."""
        agg = federate(self.model, strategy, sizes, round_idx, seed, self.features if use_features else None)
        carry_optimizer_state(self.model, self.server_opts, agg)
        return agg

    def round_events(self) -> dict:
        """Faults and skipped iterations of the round (none in one process)."""
        return {}

    def close(self) -> None:
        pass

    def exchange(self, net: str, perm: list[int], *, optimiser_state: bool = True) -> None:
        """Client i continues with client perm[i]'s copy of ``net`` ("G" or "D"): its segment's
        weights and, with ``optimiser_state``, its Adam state (a peer-to-peer move; MD-GAN sends the
        discriminators' parameters only, each keeping its client's Adam state)."""
        # clones, not deep copies: a deep copy of a view (the batched engine's weight banks) copies
        # the whole bank
        states = [{k: v.clone() for k, v in c.nets[net].state_dict().items()} for c in self.model.clients]
        opt_states = [copy.deepcopy(o[net].state_dict()) for o in self.client_opts]
        for i, j in enumerate(perm):
            self.model.clients[i].nets[net].load_state_dict(states[j])
            if optimiser_state:
                self.client_opts[i][net].load_state_dict(opt_states[j])

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "client_opts": [{net: o.state_dict() for net, o in opts.items()} for opts in self.client_opts],
            "server_opts": {net: o.state_dict() for net, o in self.server_opts.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        for opts, saved in zip(self.client_opts, state["client_opts"]):
            for net, o in opts.items():
                o.load_state_dict(saved[net])
                _keep_own_flags(o)
        for net, o in self.server_opts.items():
            o.load_state_dict(state["server_opts"][net])
            _keep_own_flags(o)
