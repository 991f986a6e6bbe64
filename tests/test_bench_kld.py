"""benchmarks/bench_kld.py's plan and report: which cells it runs (every variant a config of its
own, so they never resume each other's runs) and how its table pairs alpha against alpha 0 by seed."""

import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = importlib.import_module("bench_kld")


def _summary(acc: float, fid: float) -> dict:
    domain = {"tstr_accuracy": acc, "fid": fid}
    return {"domains": {"a": domain, "b": domain}, "latency_s_iteration": 1.0, "train_seconds": 1.0}


def test_the_plan_gives_every_variant_its_own_overrides_and_folder():
    cells = bench.make_cells(bench.SETTINGS, list(bench.SEEDS), {"samples": 10})
    assert len(cells) == len(bench.SETTINGS) * len(bench.SEEDS) * 8
    assert len({c.key for c in cells}) == len(cells)  # no two variants share a folder
    one = [c for c in cells if c.setting == "two_domain_pathological" and c.seed == 610]
    alphas = [next(o for o in c.overrides if o.startswith("federation.alpha=")) for c in one]
    assert alphas == ["federation.alpha=0", "federation.alpha=1", "federation.alpha=10", "federation.alpha=100"] * 2
    assert [("federation.clusters=1" in c.overrides) for c in one] == [False] * 4 + [True] * 4
    assert all("data.scenario=pathological" in c.overrides and "train.lr=0.0005" in c.overrides for c in one)
    assert not set(bench.SEEDS) & {599, 600, 601, 602}  # fresh seeds, not the claims grid's


def test_the_table_pairs_each_alpha_with_alpha_zero_by_seed():
    seeds = [1, 2, 3]
    settings = {"s": bench.SETTINGS["two_domain_8cpd"]}
    cells = bench.make_cells(settings, seeds, {})
    # auto clustering: alpha 10 gains 5 pp on every seed (adds); alpha 1 differs by +1, -1, 0 (no effect)
    # one cluster: alpha 10 loses 4 pp every seed and doubles FID (costs)
    base = {1: 0.50, 2: 0.40, 3: 0.60}
    shift = {(0.0, "auto"): [0, 0, 0], (1.0, "auto"): [1, -1, 0], (10.0, "auto"): [5, 5, 5], (100.0, "auto"): [0] * 3,
             (0.0, "one"): [0, 0, 0], (1.0, "one"): [0, 0, 0], (10.0, "one"): [-4, -4, -4], (100.0, "one"): [0] * 3}
    results, stats = {}, {}
    for c in cells:
        variant = bench.VARIANTS[c.candidate]
        d = shift[variant][seeds.index(c.seed)]
        fid = 100.0 * (2 if variant == (10.0, "one") else 1)
        results[c.key] = _summary(base[c.seed] + d / 100, fid)
        stats[c.key] = {"rounds": 8, "kld": [0.01, 0.2], "gap": [0.001, 0.05], "alpha": variant[0]}
    lines = bench.table(results, stats, cells, seeds)
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|")[1:3]): line for line in lines
            if line.startswith("| s |") and line.count("|") == 8}
    assert "adds" in rows[("auto", "10")] and "+/-" in rows[("auto", "10")]
    assert "no measurable effect" in rows[("auto", "1")]
    assert rows[("one", "10")].split("|")[5].strip() == "costs"  # TSTR
    assert rows[("one", "10")].split("|")[7].strip() == "costs"  # FID ratio 0.5
    first = next(line for line in lines if line.startswith("| s | alpha 10, clusters auto |"))
    assert f"{np.exp(-10 * 0.2):.3f}-{np.exp(-10 * 0.01):.3f}" in first and "5.0%" in first


def test_dry_run_prints_the_plan():
    out = subprocess.run([sys.executable, str(Path(bench.__file__)), "--dry-run"], capture_output=True, text=True,
                         check=True).stdout
    assert "cells: 48" in out and "git commit" in out and "alpha 10, clusters one" in out
