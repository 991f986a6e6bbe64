"""Choosing every client's cuts: one interface (``plan_cuts``) over three optimisers.

* ``milp``  - exact: a mixed-integer program solved by HiGHS (``scipy.optimize.milp``).
* ``ga``    - the paper's genetic algorithm (tournament selection, uniform crossover, mutation),
              vectorised over the population, keeping the best individual ever seen.
* ``brute`` - exhaustive enumeration, for tiny fleets and tests.

All three minimise the same ``LatencyModel`` objective. Because a client's G cuts only enter the
G stages and its D cuts only the D stages, the MILP and brute force solve G and D separately;
the GA evolves both at once, as the paper's does.
"""

from __future__ import annotations

import inspect
import itertools
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from huscf.cuts.devices import DeviceProfile, ServerProfile
from huscf.cuts.latency import CLIENT_STAGES, SERVER_STAGES, LatencyModel, LatencyReport, build_model
from huscf.errors import HuscfError
from huscf.models.cgan import Architecture
from huscf.split.plan import Cuts


@dataclass
class CutPlan:
    cuts: list[Cuts]
    report: LatencyReport
    method: str
    solve_seconds: float

    def to_dict(self) -> dict:
        return {"method": self.method, "solve_seconds": self.solve_seconds,
                "cuts": [c._asdict() for c in self.cuts], "latency": self.report.to_dict()}


# ----------------------------------------------------------------------------- MILP

def _milp_net(model: LatencyModel, net: str, aggregate: bool = True, time_limit: float | None = None) -> np.ndarray:
    """Optimal pair index per client for one network.

    One-hot x_gk per client group g (clients on identical devices, n_g of them; with
    ``aggregate=False`` every client is its own group) over the valid (head, tail) pairs k. Each
    client stage s is a max over clients: an epigraph variable t_s >= sum_k a_s[g, k] x_gk for
    every g. Server stages are linear: n_g * sum_k server[k] x_gk. Minimise
    m * (alpha * sum_s t_s + gamma * server).
    """
    tab = model.tables[net]
    first, group = (model.group_first, model.groups) if aggregate else (np.arange(model.num_clients),) * 2
    n_g = np.bincount(group, minlength=len(first)).astype(float)
    G, K, S = len(first), len(tab.pairs), len(CLIENT_STAGES)
    x = np.arange(G * K).reshape(G, K)  # variable indices: x (one-hot per group), then t
    server_k = sum(tab.server[s] for s in SERVER_STAGES)
    c = np.r_[(model.gamma * tab.passes * n_g[:, None] * server_k).ravel(), np.full(S, model.alpha * tab.passes)]

    rows, shape = np.repeat(np.arange(G), K), (G, G * K + S)
    one_hot = sparse.csr_array((np.ones(G * K), (rows, x.ravel())), shape=shape)  # sum_k x_gk = 1
    epigraph = [  # sum_k a_s[g, k] x_gk - t_s <= 0
        sparse.csr_array((np.r_[tab.client[s][first].ravel(), -np.ones(G)],
                          (np.r_[rows, np.arange(G)], np.r_[x.ravel(), np.full(G, G * K + i)])), shape=shape)
        for i, s in enumerate(CLIENT_STAGES)]
    constraints = [LinearConstraint(one_hot, 1, 1), LinearConstraint(sparse.vstack(epigraph), -np.inf, 0)]
    options = {"mip_rel_gap": 0.0} | ({"time_limit": float(time_limit)} if time_limit is not None else {})
    res = milp(c, constraints=constraints, integrality=np.r_[np.ones(G * K), np.zeros(S)],
               bounds=Bounds(0, np.r_[np.ones(G * K), np.full(S, np.inf)]), options=options)
    if res.x is None:
        raise HuscfError(f"cuts: the MILP for the {net.upper()} cuts found no solution ({res.message})")
    return res.x[:G * K].reshape(G, K).argmax(axis=1)[group]


def solve_milp(model: LatencyModel, seed: int = 0, aggregate: bool = True,
               time_limit: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact optimum (``seed`` is unused: one signature for every solver)."""
    return tuple(_milp_net(model, net, aggregate, time_limit) for net in ("g", "d"))


# ----------------------------------------------------------------------------- brute force

def _brute_net(model: LatencyModel, net: str, max_evaluations: int, chunk: int = 65536) -> np.ndarray:
    N, K = model.num_clients, len(model.tables[net].pairs)
    if K ** N > max_evaluations:
        raise HuscfError(f"cuts: brute force over {N} clients needs {K}**{N} evaluations "
                         f"(> max_evaluations={max_evaluations}); use --method milp")
    best, best_val = None, np.inf
    space = itertools.product(range(K), repeat=N)
    while batch := list(itertools.islice(space, chunk)):
        genes = np.array(batch, dtype=int).reshape(-1, N)
        vals = model.net_objective(net, genes)
        i = int(vals.argmin())
        if vals[i] < best_val:
            best, best_val = genes[i], vals[i]
    return best


def solve_brute(model: LatencyModel, seed: int = 0, max_evaluations: int = 2_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Every per-client combination, network by network (``seed`` is unused)."""
    return tuple(_brute_net(model, net, max_evaluations) for net in ("g", "d"))


# ----------------------------------------------------------------------------- genetic algorithm

def solve_ga(model: LatencyModel, seed: int = 0, population: int = 200, generations: int = 1000,
             patience: int = 100, tournament: int = 3, crossover_rate: float = 0.9,
             mutation_rate: float | None = None, elite: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Genome: the G pair index, then the D pair index, of every group of identical devices (the
    paper's GA has one gene tuple per device profile; this loses nothing, see latency.py). Stops
    after ``patience`` generations without a new best; returns the best individual ever seen."""
    if population < 2 or generations < 1 or patience < 1 or tournament < 1 or not 0 <= elite < population:
        raise HuscfError("cuts: the GA needs population >= 2, generations, patience, tournament >= 1, "
                         "0 <= elite < population")
    G, groups = len(model.group_sizes), model.groups
    alleles = np.r_[np.full(G, len(model.tables["g"].pairs)), np.full(G, len(model.tables["d"].pairs))]
    pm = 1.0 / alleles.size if mutation_rate is None else mutation_rate
    rng = np.random.default_rng(seed)

    def fitness(pop):
        return model.objective(pop[:, :G][:, groups], pop[:, G:][:, groups])

    pop = rng.integers(0, alleles, size=(population, alleles.size))
    fit = fitness(pop)
    best, best_fit, stale = pop[fit.argmin()].copy(), fit.min(), 0
    rows = np.arange(population)

    def select():  # tournament: the fittest of `tournament` random individuals, population times
        entrants = rng.integers(0, population, size=(population, tournament))
        return pop[entrants[rows, fit[entrants].argmin(axis=1)]]

    for _ in range(generations):
        a, b = select(), select()
        mix = (rng.random(a.shape) < 0.5) & (rng.random((population, 1)) < crossover_rate)
        children = np.where(mix, b, a)
        mutate = rng.random(children.shape) < pm
        children[mutate] = rng.integers(0, np.broadcast_to(alleles, children.shape)[mutate])
        children[:elite] = pop[np.argsort(fit)[:elite]]
        pop, fit = children, fitness(children)
        if fit.min() < best_fit:
            best, best_fit, stale = pop[fit.argmin()].copy(), fit.min(), 0
        else:
            stale += 1
            if stale >= patience:
                break
    return best[:G][groups], best[G:][groups]


SOLVERS = {"milp": solve_milp, "ga": solve_ga, "brute": solve_brute}


def cut_methods() -> tuple[str, ...]:
    """Every value of ``cuts.method`` (the config takes its allowed names from here): cuts given in
    the config or drawn at random (chosen where the run is set up), or one of the ``SOLVERS``."""
    return ("fixed", "random", *SOLVERS)


def plan_cuts(arch: Architecture | str, batch_size: int, devices: Sequence[DeviceProfile], server: ServerProfile,
              method: str = "milp", alpha: float = 1.0, gamma: float = 0.5, seed: int = 0, *,
              dtype: torch.dtype = torch.float32, **opts) -> CutPlan:
    """Choose cuts for every client (one device profile per client, see ``assign_devices``).

    ``opts`` go to the optimiser: ``ga`` takes population, generations, patience, tournament,
    crossover_rate, mutation_rate, elite; ``milp`` takes aggregate, time_limit; ``brute`` takes
    max_evaluations.
    """
    if method not in SOLVERS:
        raise HuscfError(f"cuts: unknown method '{method}' (choose {', '.join(SOLVERS)})")
    model = build_model(arch, batch_size, devices, server, alpha, gamma, dtype)
    solver = SOLVERS[method]
    unknown = sorted(set(opts) - (set(inspect.signature(solver).parameters) - {"model", "seed"}))
    if unknown:
        raise HuscfError(f"cuts: method '{method}' has no option '{unknown[0]}'")
    start = time.perf_counter()
    g, d = solver(model, seed=seed, **opts)
    seconds = time.perf_counter() - start
    cuts = model.cuts(g, d)
    return CutPlan(cuts=cuts, report=model.report(cuts), method=method, solve_seconds=seconds)
