"""``Engine``: what the trainer asks of an engine, whichever runs the iteration.

Three engines implement it: ``SimulationEngine`` (every client in one process, a loop over
clients: the reference numerics), ``BatchedEngine`` (the same, each block run once for a chunk of
clients) and ``runtime.RayEngine`` (client and server actors). The trainer builds one from the
config (``Trainer._engine``) and only ever calls what is declared here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from huscf.engines.objective import FakeInputs
from huscf.federation.strategies import Aggregation, Strategy
from huscf.split.segments import SplitGAN


@runtime_checkable
class Engine(Protocol):
    model: SplitGAN  # the split model (the Ray driver's is a mirror, refreshed at every round end)
    device: torch.device  # where ``model`` lives (monitoring samples are drawn there)
    placement: str  # where the work runs, for the run's compute line ("" when it is this process)
    z_dim: int  # the generator's latent size (a method that samples ``model`` draws noise of it)
    # False: an epoch is one pass over each client's data (a client whose batches are used up sits
    # out the rest); True (a method sets it): every client takes every iteration of the epoch, starting
    # its shuffled batches over, so that all clients take the same number of steps (FedGAN)
    equal_steps: bool
    # None: client i's fakes come from its own noise and its real batch's labels, one fake batch for
    # the discriminator and the generator step; a method's ``FakeInputs`` (set by the method) draws
    # them itself, possibly different for each step (MD-GAN: the server's batches and labels)
    fake_inputs: FakeInputs | None

    def batches_per_client(self) -> list[int]:
        """Each client's batches in one local epoch (at least 1: a client with fewer samples than a
        batch trains on all of them)."""

    def iterations_per_epoch(self) -> int:
        """Iterations of one local epoch (the longest client's batches, capped by the config)."""

    def run_epoch(self, round_idx: int, epoch: int, on_iteration: Callable[[dict], None] | None = None,
                  collect_features: bool = False) -> dict[str, list[float]]:
        """One local epoch of every client; returns per-client mean losses {"d": [...], "g": [...]}.
        ``collect_features``: gather the server's clustering features during this epoch."""

    def federate(self, strategy: Strategy, sizes: np.ndarray, round_idx: int, seed: int,
                 use_features: bool) -> Aggregation:
        """The round end: the strategy's aggregation applied to the model; returns it."""

    def give(self, data: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """For the next epoch only, client i trains on its own partition plus ``data[i]`` (images,
        integer labels): what a method hands a client besides its data (a peer's synthetic data)."""

    def exchange(self, net: str, perm: list[int], *, optimiser_state: bool = True) -> None:
        """Client i continues with client perm[i]'s copy of ``net`` (and, with ``optimiser_state``,
        its optimiser state)."""

    def round_events(self) -> dict:
        """Faults and skipped iterations of the round, for the round record (then reset)."""

    def state_dict(self) -> dict:
        """Everything a checkpoint needs to resume (one format for every engine)."""

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's state."""

    def close(self) -> None:
        """Release processes and threads (the Ray engine's actors)."""
