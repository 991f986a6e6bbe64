"""The three optimisers agree: brute force == MILP exactly, GA == optimum on small fleets."""

import numpy as np
import pytest

from huscf.cuts import load_profiles, plan_cuts
from huscf.cuts.devices import DeviceProfile
from huscf.cuts.latency import build_model
from huscf.cuts.search import solve_brute, solve_ga, solve_milp


def random_fleet(rng, n):
    kinds = [DeviceProfile(f"dev{k}", cpu_mhz=float(rng.uniform(200, 20000)), flops_per_cycle=float(rng.integers(1, 12)),
                           data_rate=float(rng.uniform(1e7, 1e9))) for k in range(n)]
    return [kinds[i] for i in rng.integers(0, n, n)]  # some clients share a device


@pytest.mark.parametrize("trial", range(6))
def test_brute_equals_milp(trial):
    rng = np.random.default_rng(trial)
    server, _ = load_profiles("paper")
    arch = "dcgan32" if trial % 3 == 2 else "cgan28"
    n = int(rng.integers(1, 5))
    model = build_model(arch, 64, random_fleet(rng, n), server, alpha=float(rng.uniform(0.2, 2)), gamma=float(rng.uniform(0, 2)))
    best = model.objective(*solve_brute(model))[0]
    assert model.objective(*solve_milp(model))[0] == pytest.approx(best, rel=1e-12)
    assert model.objective(*solve_milp(model, aggregate=False))[0] == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ga_finds_optimum(n):
    rng = np.random.default_rng(100 + n)
    server, _ = load_profiles("paper")
    model = build_model("cgan28", 64, random_fleet(rng, n), server)
    best = model.objective(*solve_brute(model))[0]
    assert model.objective(*solve_ga(model, seed=n))[0] == pytest.approx(best, rel=1e-12)


def test_plan_cuts_paper_fleet():
    server, devices = load_profiles("paper")
    fleet = [devices[i % 7] for i in range(20)]
    milp = plan_cuts("cgan28", 64, fleet, server, method="milp")
    ga = plan_cuts("cgan28", 64, fleet, server, method="ga", seed=3, population=60)
    assert len(milp.cuts) == 20 and milp.method == "milp" and milp.solve_seconds >= 0
    assert ga.report.objective == pytest.approx(milp.report.objective, rel=1e-9)
    # the 480 MHz device cannot afford any extra block
    assert milp.cuts[0] == (0, 0, 0, 0)


def test_ga_returns_best_ever_seen():
    rng = np.random.default_rng(7)
    server, _ = load_profiles("paper")
    model = build_model("cgan28", 64, random_fleet(rng, 12), server)
    G, groups = len(model.group_sizes), model.groups
    # without elites and with wild mutation later generations are often worse than the first
    opts = dict(seed=5, population=20, generations=30, patience=30, elite=0, mutation_rate=0.6)
    first = np.random.default_rng(5).integers(0, 6, size=(20, 2 * G))  # the GA's initial population
    first_best = model.objective(first[:, :G][:, groups], first[:, G:][:, groups]).min()
    assert model.objective(*solve_ga(model, **opts))[0] <= first_best
