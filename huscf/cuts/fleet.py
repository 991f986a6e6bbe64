"""Every method's simulated latency on one fleet: the costs it is built from, and what a round adds.

The split model (``latency.py``) times one HuSCF-GAN iteration for given cuts. A method's round is
more than its iterations: it also synchronises (weights up to the server and back: at the round
end, and for FedGAN every K steps) and may move networks between epochs (MD-GAN's discriminators).
``Fleet`` holds what all of that is computed from: the architecture's per-block FLOPs and weight
bytes at the run's batch size, the clients' devices and the server, the same profiles, link rates
and FLOP counts the cut search uses. Each method composes its ``RoundLatency`` from the fleet's
primitives (``Method.latency``); the formulas are in docs/latency.md ("Every method").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from huscf.cuts.devices import DeviceProfile, ServerProfile
from huscf.cuts.latency import NETS
from huscf.cuts.profile import ArchProfile, profile_architecture
from huscf.models.cgan import Architecture
from huscf.split.plan import Cuts


@dataclass
class RoundLatency:
    """Simulated seconds and bytes of a method's pieces; a round is ``iterations`` iterations,
    ``syncs`` synchronisations (the round end's included) and ``epochs`` epoch ends."""

    total_s: float  # one iteration
    bytes_per_client: list[float]  # one iteration, both directions
    sync_s: float = 0.0
    sync_bytes: list[float] = field(default_factory=list)  # per client, one synchronisation
    epoch_s: float = 0.0  # what an epoch's end moves (MD-GAN: discriminators to peers)
    epoch_bytes: list[float] = field(default_factory=list)
    server_s: float = 0.0  # the server's share of ``total_s``
    stages: dict[str, float] = field(default_factory=dict)  # the iteration's stages
    objective: float | None = None  # the cut search's objective for these cuts (split methods)

    def round_s(self, iterations: int, syncs: int, epochs: int) -> float:
        return self.total_s * iterations + self.sync_s * syncs + self.epoch_s * epochs

    def round_bytes(self, iterations: int, syncs: int, epochs: int) -> list[float]:
        parts = [(self.bytes_per_client, iterations), (self.sync_bytes, syncs), (self.epoch_bytes, epochs)]
        return [sum(b[i] * k for b, k in parts if b) for i in range(len(self.bytes_per_client))]

    def to_dict(self) -> dict:
        return asdict(self) | {"client_s": self.total_s - self.server_s}  # the split report's keys too


@dataclass(frozen=True)
class Fleet:
    """The costs every method's latency is built from (one architecture, batch size and fleet)."""

    profile: ArchProfile
    devices: tuple[DeviceProfile, ...]
    server: ServerProfile
    weight_bytes: dict[str, tuple[int, ...]]  # per net ("G", "D"), the float32 parameter bytes of block b
    sizes: tuple[int, ...] = ()  # per client, its training samples (when known: PFL-GAN's share of synthetic data)

    @property
    def num_clients(self) -> int:
        return len(self.devices)

    def passes(self, net: str) -> int:
        """Passes of ``net`` per iteration, as the split model counts them (``latency.NETS``)."""
        return NETS[net.lower()]

    def net(self, net: str):
        return self.profile.g if net == "G" else self.profile.d

    def flops(self, net: str, blocks: Sequence[int] | None = None) -> float:
        """Forward plus backward FLOPs of one pass of ``net`` through ``blocks`` (default: all)."""
        p = self.net(net)
        blocks = range(len(p.fwd_flops)) if blocks is None else blocks
        return float(sum(p.fwd_flops[b] + p.bwd_flops[b] for b in blocks))

    def client_s(self, flops: float | np.ndarray) -> np.ndarray:
        """Seconds of ``flops`` (one number, or one per client) on each client's device."""
        return np.broadcast_to(np.asarray(flops, dtype=float), (self.num_clients,)) / np.array(
            [d.flops_per_s for d in self.devices])

    def server_compute_s(self, flops: float) -> float:
        return flops / self.server.flops_per_s

    def up_s(self, nbytes: float | np.ndarray) -> np.ndarray:
        """Seconds to send ``nbytes`` (one number, or one per client) from each client (its rate)."""
        return np.broadcast_to(np.asarray(nbytes, dtype=float), (self.num_clients,)) / np.array(
            [d.rate for d in self.devices])

    def down_s(self, nbytes: float | np.ndarray) -> np.ndarray:
        """Seconds for the server to send ``nbytes`` to each client (its rate, to all in parallel)."""
        return np.broadcast_to(np.asarray(nbytes, dtype=float), (self.num_clients,)) / self.server.rate

    def model_bytes(self, nets: Sequence[str] = ("G", "D")) -> float:
        return float(sum(sum(self.weight_bytes[n]) for n in nets))

    def segment_bytes(self, cuts: Sequence[Cuts]) -> np.ndarray:
        """Per client, the bytes of the blocks it holds (its head and tail of G and D)."""
        out = []
        for c in cuts:
            total = 0
            for net, (h, t) in (("G", (c.hg, c.tg)), ("D", (c.hd, c.td))):
                w = self.weight_bytes[net]
                total += sum(w[: h + 1]) + sum(w[len(w) - 1 - t:])
            out.append(float(total))
        return np.array(out)

    def sync(self, nbytes: float | np.ndarray) -> tuple[float, list[float]]:
        """One synchronisation: every client uploads ``nbytes`` at its rate, then the server sends the
        result back to every client; the slowest upload ends the first stage. (seconds, bytes per client)."""
        up, down = self.up_s(nbytes), self.down_s(nbytes)
        return float(up.max() + down.max()), (2 * np.broadcast_to(np.asarray(nbytes, float), up.shape)).tolist()

    def whole_networks(self, *, synchronises: bool = True) -> RoundLatency:
        """A method whose clients hold whole G and D and (with ``synchronises``) send them to the
        server and get an average back at each synchronisation: the iteration is local compute only."""
        compute = self.client_s(sum(self.passes(n) * self.flops(n) for n in ("G", "D")))
        sync_s, sync_bytes = self.sync(self.model_bytes()) if synchronises else (0.0, [])
        return RoundLatency(total_s=float(compute.max()), bytes_per_client=[0.0] * self.num_clients,
                            sync_s=sync_s, sync_bytes=sync_bytes, stages={"client_compute": float(compute.max())})


def build_fleet(arch: Architecture, batch_size: int, devices: Sequence[DeviceProfile], server: ServerProfile,
                sizes: Sequence[int] = ()) -> Fleet:
    """The fleet of a run: ``arch`` profiled at ``batch_size`` (as the cut search profiles it);
    ``sizes``: each client's training samples."""
    def block_bytes(net) -> tuple[int, ...]:
        return tuple(sum(p.numel() * 4 for p in block.parameters()) for block in net.blocks)

    return Fleet(profile_architecture(arch, batch_size), tuple(devices), server,
                 {"G": block_bytes(arch.generator()), "D": block_bytes(arch.discriminator())}, tuple(sizes))
