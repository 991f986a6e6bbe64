"""The latency model of one training iteration for given cuts: one vectorised evaluator.

Every optimiser (brute force, GA, MILP) uses the tables built here, so they optimise exactly
the same function; the equations are in docs/latency.md. In short, for each network n (G: one
pass per iteration, D: three passes, m_n = 1 or 3) and each direction, an iteration has three
stages, run one after another, each ending when its slowest participant ends:

    fwd_head   = m_n * max_i [ F_head(i) / c_i + S_up(i) / r_i ]        client compute + upload
    fwd_server = m_n * sum_i F_server(i) / C_s                          one server, all clients
    fwd_tail   = m_n * max_i [ S_down(i) / R_s + F_tail(i) / c_i ]      download + client compute
    bwd_tail   = m_n * max_i [ B_tail(i) / c_i + S_down(i) / r_i ]      gradients go back up
    bwd_server = m_n * sum_i B_server(i) / C_s
    bwd_head   = m_n * max_i [ S_up(i) / R_s + B_head(i) / c_i ]

Objective = alpha * (total - server) + gamma * server, server = the four server stages.
A client's G choice only enters G stages and its D choice only D stages, so the objective is a
sum of a G part and a D part (``net_objective``). Clients on identical devices form a group
(``groups``): for fixed stage maxima the problem splits per client, so identical clients have the
same best cuts and the optimisers may search one cut choice per group without losing the optimum.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from huscf.cuts.devices import DeviceProfile, ServerProfile
from huscf.cuts.profile import ArchProfile, NetProfile, profile_architecture
from huscf.errors import HuscfError
from huscf.models.cgan import Architecture, build_architecture
from huscf.split.plan import Cuts, all_cut_pairs, validate_cuts

NETS = {"g": 1, "d": 3}  # passes per iteration: G forward once; D on fake (D step), real, fake (G step)
CLIENT_STAGES = ("fwd_head", "fwd_tail", "bwd_tail", "bwd_head")
SERVER_STAGES = ("fwd_server", "bwd_server")
STAGE_ORDER = ("fwd_head", "fwd_server", "fwd_tail", "bwd_tail", "bwd_server", "bwd_head")


@dataclass
class NetTables:
    """Seconds per pass of every stage of one network, for every client i and (head, tail) pair k."""

    passes: int
    pairs: list[tuple[int, int]]
    client: dict[str, np.ndarray]  # stage -> (N, K): client i's time if it picks pair k
    server: dict[str, np.ndarray]  # stage -> (K,): server time one client with pair k adds
    bytes: np.ndarray  # (K,): bytes per iteration, all passes, both directions


def net_tables(p: NetProfile, passes: int, devices: Sequence[DeviceProfile], server: ServerProfile) -> NetTables:
    m = p.num_middle
    pairs = all_cut_pairs(m)
    fwd, bwd, size = (np.asarray(a, dtype=float) for a in (p.fwd_flops, p.bwd_flops, p.out_bytes))
    heads = [slice(0, h + 1) for h, _ in pairs]
    tails = [slice(m + 1 - t, m + 2) for _, t in pairs]
    mids = [slice(h + 1, m + 1 - t) for h, t in pairs]
    up = np.array([size[h] for h, _ in pairs])  # activation leaving the head = gradient coming back
    down = np.array([size[m - t] for _, t in pairs])  # activation entering the tail = its gradient
    f_head, f_tail = (np.array([fwd[s].sum() for s in sl]) for sl in (heads, tails))
    b_head, b_tail = (np.array([bwd[s].sum() for s in sl]) for sl in (heads, tails))
    c = np.array([d.flops_per_s for d in devices])[:, None]
    r = np.array([d.rate for d in devices])[:, None]
    rs = server.rate
    return NetTables(passes, pairs, bytes=passes * 2 * (up + down),
                     client={"fwd_head": f_head / c + up / r,
                             "fwd_tail": down / rs + f_tail / c,
                             "bwd_tail": b_tail / c + down / r,
                             "bwd_head": up / rs + b_head / c},
                     server={"fwd_server": np.array([fwd[s].sum() for s in mids]) / server.flops_per_s,
                             "bwd_server": np.array([bwd[s].sum() for s in mids]) / server.flops_per_s})


@dataclass
class LatencyReport:
    """Latency of one iteration for fixed cuts (seconds), by stage, and traffic per client."""

    total_s: float
    server_s: float
    objective: float
    stages: dict[str, float]
    bytes_per_client: list[int]
    alpha: float
    gamma: float
    client_s: float = field(init=False)

    def __post_init__(self):
        self.client_s = self.total_s - self.server_s

    def to_dict(self) -> dict:
        return asdict(self)


class LatencyModel:
    """The evaluator for one architecture profile, one fleet and one server.

    Genes: for each network, an int array (P, N) of indices into ``tables[net].pairs``.
    """

    def __init__(self, profile: ArchProfile, devices: Sequence[DeviceProfile], server: ServerProfile,
                 alpha: float = 1.0, gamma: float = 0.5):
        for name, value in (("alpha", alpha), ("gamma", gamma)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise HuscfError(f"latency: {name} must be a non-negative number, got {value!r}")
        if not devices:
            raise HuscfError("latency: the fleet has no clients")
        self.profile, self.devices, self.server = profile, list(devices), server
        self.alpha, self.gamma = float(alpha), float(gamma)
        self.tables = {net: net_tables(getattr(profile, net), passes, devices, server) for net, passes in NETS.items()}
        speeds = np.array([(d.flops_per_s, d.rate) for d in self.devices])
        _, self.group_first, groups = np.unique(speeds, axis=0, return_index=True, return_inverse=True)
        self.groups = groups.ravel()  # client -> group of identical devices
        self.group_sizes = np.bincount(self.groups)

    @property
    def num_clients(self) -> int:
        return len(self.devices)

    def net_stages(self, net: str, genes: np.ndarray) -> dict[str, np.ndarray]:
        """Stage seconds (all passes) of one network for a population of genes (P, N) -> (P,)."""
        tab = self.tables[net]
        genes = np.atleast_2d(genes)
        rows = np.arange(genes.shape[1])
        out = {s: tab.passes * tab.client[s][rows, genes].max(axis=1) for s in CLIENT_STAGES}
        out |= {s: tab.passes * tab.server[s][genes].sum(axis=1) for s in SERVER_STAGES}
        return {f"{net}_{s}": out[s] for s in STAGE_ORDER}

    def net_objective(self, net: str, genes: np.ndarray) -> np.ndarray:
        st = self.net_stages(net, genes)
        server = sum(v for k, v in st.items() if k.endswith("server"))
        return self.alpha * (sum(st.values()) - server) + self.gamma * server

    def objective(self, g: np.ndarray, d: np.ndarray) -> np.ndarray:
        """The objective of a population: G genes (P, N) and D genes (P, N) -> (P,)."""
        return self.net_objective("g", g) + self.net_objective("d", d)

    def genes(self, cuts: Sequence[Cuts]) -> tuple[np.ndarray, np.ndarray]:
        """Cuts per client -> (G genes, D genes), validating every client's cuts."""
        if len(cuts) != self.num_clients:
            raise HuscfError(f"latency: {len(cuts)} cut configurations for {self.num_clients} clients")
        mg, md = self.profile.g.num_middle, self.profile.d.num_middle
        cuts = [validate_cuts(tuple(c), mg, md, client=f"{i} ({self.devices[i].name})") for i, c in enumerate(cuts)]
        gp, dp = self.tables["g"].pairs, self.tables["d"].pairs
        return np.array([gp.index((c.hg, c.tg)) for c in cuts]), np.array([dp.index((c.hd, c.td)) for c in cuts])

    def cuts(self, g: np.ndarray, d: np.ndarray) -> list[Cuts]:
        gp, dp = self.tables["g"].pairs, self.tables["d"].pairs
        return [Cuts(*gp[a], *dp[b]) for a, b in zip(np.asarray(g).tolist(), np.asarray(d).tolist())]

    def report(self, cuts: Sequence[Cuts]) -> LatencyReport:
        g, d = self.genes(cuts)
        stages = {k: float(v[0]) for k, v in (self.net_stages("g", g) | self.net_stages("d", d)).items()}
        total = sum(stages.values())
        server = sum(v for k, v in stages.items() if k.endswith("server"))
        traffic = self.tables["g"].bytes[g] + self.tables["d"].bytes[d]
        return LatencyReport(total_s=total, server_s=server, objective=float(self.objective(g, d)[0]),
                             stages=stages, bytes_per_client=[int(b) for b in traffic],
                             alpha=self.alpha, gamma=self.gamma)


def resolve_arch(arch: Architecture | str, width: float = 1.0) -> Architecture:
    if isinstance(arch, Architecture):
        return arch
    try:
        return build_architecture(arch, width=width)
    except KeyError:
        raise HuscfError(f"unknown architecture '{arch}'") from None


def build_model(arch: Architecture | str, batch_size: int, devices: Sequence[DeviceProfile],
                server: ServerProfile, alpha: float = 1.0, gamma: float = 0.5,
                dtype: torch.dtype = torch.float32) -> LatencyModel:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise HuscfError(f"latency: batch size must be a positive integer, got {batch_size!r}")
    return LatencyModel(profile_architecture(resolve_arch(arch), batch_size, dtype), devices, server, alpha, gamma)


def evaluate_latency(arch: Architecture | str, batch_size: int, cuts: Sequence[Cuts],
                     devices: Sequence[DeviceProfile], server: ServerProfile, alpha: float = 1.0,
                     gamma: float = 0.5, *, dtype: torch.dtype = torch.float32) -> LatencyReport:
    """Latency of one iteration for fixed cuts (one per client, in the order of ``devices``)."""
    return build_model(arch, batch_size, devices, server, alpha, gamma, dtype).report(cuts)
