"""benchmarks/bench_claims.py's grid logic: which cells run, how the tuning chooses, how each claim
is measured and judged, and that a finished grid resumes without running anything again. The
numbers of a tiny run are not checked (they mean nothing at this size); the table's rows are."""

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = importlib.import_module("bench_claims")

MNIST = bench.Setting("two", "5_two_domain_highly_noniid", (), (), "mnist")
MULTI = bench.Setting("four", "7_multi_domain_noniid", (), (), "mnist", multi_domain=True)


def _summary(acc: float, score: float = 2.0, fid: float = 100.0, latency: float = 1.0) -> dict:
    domain = {"generation_score": score, "fid": fid} | {f"tstr_{m}": acc for m in bench.TSTR_METRICS}
    return {"domains": {"a": domain, "b": domain}, "latency_s_iteration": latency, "train_seconds": 1.0}


def _results(values: dict[tuple[str, str], list[dict]], seeds: list[int]) -> dict:
    return {f"report/{s}/seed_{seed}/{m}": v[k] for (s, m), v in values.items() for k, seed in enumerate(seeds)}


def test_each_claim_is_measured_against_the_right_baseline_and_judged():
    seeds = [1, 2, 3]
    # huscf: TSTR 0.50 / 0.52 / 0.54; fedgan 0.20 below it every seed, mdgan 0.02 below (+/- 0.03)
    values = {}
    for s in ("two", "four"):
        values[(s, "huscf")] = [_summary(a, score=3.0, fid=50.0, latency=0.5) for a in (0.50, 0.52, 0.54)]
        values[(s, "fedgan")] = [_summary(a - 0.20, score=1.5, fid=150.0, latency=5.0) for a in (0.50, 0.52, 0.54)]
        values[(s, "mdgan")] = [_summary(a, score=2.9, fid=60.0, latency=1.5) for a in (0.45, 0.53, 0.50)]
    rows = {r["claim"]: r for r in bench.claims_table(_results(values, seeds), [MNIST, MULTI], seeds,
                                                      ["fedgan", "mdgan"])}
    assert set(rows) == {1, 2, 3, 4, 5}
    # claim 1: mean over both baselines of the pp gain: fedgan 20 every seed; mdgan 5, -1, 4 -> (25, 19, 24) / 2
    assert rows[1]["measured"] == pytest.approx(np.mean([12.5, 9.5, 12.0]), abs=1e-3)
    assert rows[1]["sd"] == pytest.approx(np.std([12.5, 9.5, 12.0], ddof=1), abs=1e-3)
    assert rows[1]["verdict"] == "inconclusive"  # 11.3 +/- 1.6 straddles 10
    # claim 2: the baseline beaten most on the multi-domain setting; 20 pp < 60 every seed
    assert rows[2]["against"] == "fedgan" and rows[2]["measured"] == pytest.approx(20.0, abs=1e-3)
    assert rows[2]["verdict"] == "does not hold"
    # claims 3 and 5: the baseline beaten least (the range's low end must hold against all)
    assert rows[3]["against"] == "mdgan" and rows[3]["measured"] == pytest.approx(3.0 / 2.9, abs=1e-3)
    assert rows[3]["verdict"] == "does not hold"
    assert rows[5]["against"] == "mdgan" and rows[5]["measured"] == pytest.approx(3.0, abs=1e-3)
    assert rows[5]["sd"] == 0.0 and rows[5]["verdict"] == "does not hold"
    # claim 4 needs a CIFAR-10 setting: not in this grid, so not measured (never a made-up number)
    assert rows[4]["measured"] is None and rows[4]["verdict"].startswith("not measured")


def test_verdict_needs_the_figure_beyond_one_sd_and_more_than_one_seed():
    assert bench.verdict(12.0, 1.0, 10.0) == "holds"
    assert bench.verdict(10.5, 1.0, 10.0) == "inconclusive"
    assert bench.verdict(8.0, 1.0, 10.0) == "does not hold"
    assert bench.verdict(50.0, None, 10.0).startswith("inconclusive")


def test_ablation_rows_say_whether_a_component_adds():
    seeds = [1, 2]
    values = {("two", "huscf"): [_summary(0.6, fid=50.0), _summary(0.62, fid=52.0)],
              ("two", "huscf-nokld"): [_summary(0.6, fid=50.0), _summary(0.62, fid=52.0)],
              ("two", "huscf-noclust"): [_summary(0.4, fid=100.0), _summary(0.41, fid=110.0)]}
    rows = {r["ablation"]: r for r in bench.ablation_table(_results(values, seeds), [MNIST], seeds,
                                                           ["huscf-nokld", "huscf-noclust"])}
    assert rows["huscf-nokld"]["tstr_verdict"] == "no measurable effect"
    assert rows["huscf-noclust"]["tstr_verdict"] == "adds" and rows["huscf-noclust"]["fid_verdict"] == "adds"
    assert rows["huscf-noclust"]["tstr_gain_pp"] == pytest.approx(20.5, abs=1e-3)


def test_every_method_gets_the_same_tuning_budget_and_ablations_follow_huscf():
    assert {len(bench.candidates(m)) for m in bench.METHODS} == {4}
    cells = bench.make_cells("report", [MNIST], ["huscf", "huscf-nokld", "fedgan"], [7], "cpu",
                             {"huscf": 3, "fedgan": 1}, {"samples": 10})
    by = {c.method: c for c in cells}
    assert by["huscf-nokld"].overrides == by["huscf"].overrides == bench.candidates("huscf")[3]
    assert by["fedgan"].overrides == bench.candidates("fedgan")[1]
    assert len({c.key for c in bench.make_cells("tune", [MNIST], ["huscf", "fedgan"], [7], "cpu", {}, {})}) == 8
    # the reported seeds are not the validation seed
    assert bench.VALIDATION_SEED not in bench.SEEDS and len(bench.SEEDS) >= 3


def test_a_tiny_grid_tunes_reports_and_resumes(tmp_path):
    """The whole loop on the offline digits: tuning on held-out FID, reported cells, the table;
    the same call again reads every cell instead of running it."""
    tiny = bench.Setting("tiny", "default", ("data.clients_per_domain=2", "data.limit_per_domain=400",
                                             "train.rounds=2", "train.local_epochs=1", "train.max_iters_per_epoch=2",
                                             "model.width=0.125", "output.samples_every=0", "train.threads=1"),
                         (), "mnist", multi_domain=True)
    ev = {"samples": 50, "tstr_samples": 100, "tstr_min_steps": 5}
    lines: list[str] = []
    claims, ablations, table = bench.run_grid([tiny], ["huscf", "fedgan", "huscf-nokld"], [600], tmp_path, ev=ev,
                                              tune=tiny, say=lines.append, jobs="1", address=None, cpus=1, gpus=0,
                                              data_dir=None)
    tuning = json.loads((tmp_path / "tuning.json").read_text())
    assert set(tuning["choice"]) == {"huscf", "fedgan"} and all(0 <= k < 4 for k in tuning["choice"].values())
    assert sum("<- chosen" in line for line in tuning["lines"]) == 2
    assert [r["claim"] for r in claims] == [1, 2, 3, 4, 5]
    assert all(r["seeds"] == 1 and r["against"].endswith("fedgan") for r in claims if r["claim"] != 4)
    assert all(r["verdict"] == "inconclusive (one seed)" for r in claims if r["claim"] != 4)
    assert [r["ablation"] for r in ablations] == ["huscf-nokld"]
    assert "| tiny | fedgan | digits |" in table and "| 5: lower per-iteration latency" in table
    assert "| tiny | fedgan | " in table.split("HuSCF-GAN against each baseline per setting")[1]
    # the reported cell's evaluation used the test split; the tuning cell's the held-out images
    chosen = tuning["choice"]["huscf"]
    tune_eval = json.loads((tmp_path / f"tune/tiny/seed_599/huscf/config_{chosen}/huscf/eval.json").read_text())
    assert tune_eval["settings"]["fid_reference"] == "heldout" and tune_eval["settings"]["tstr_samples"] == 0
    again: list[str] = []
    claims2, _, _ = bench.run_grid([tiny], ["huscf", "fedgan", "huscf-nokld"], [600], tmp_path, ev=ev, tune=tiny,
                                   say=again.append, jobs="1", address=None, cpus=1, gpus=0, data_dir=None)
    assert not any("cells to run" in line for line in again) and claims2 == claims
    assert "all 3 cells read from" in again[-1] and "tiny seed 600: c0 digit" in table
    # the KLD weights' spread, read from the runs: the tuning's warm-up-1 candidates cluster round 2
    tune = bench.make_cells("tune", [tiny], ["huscf"], [bench.VALIDATION_SEED], "cpu", {}, {"samples": 50,
                            "tstr_samples": 0, "fid_reference": "heldout"})
    kld = [line for line in bench.kld_lines(tmp_path, tune) if line.startswith("tiny:")]
    assert len(kld) == 1 and kld[0].startswith("tiny: 2 rounds; KLD_i "), kld


def test_the_command_plans_the_grid_and_refuses_contradictory_flags():
    import subprocess

    script = str(Path(__file__).resolve().parents[1] / "benchmarks" / "bench_claims.py")
    plan = subprocess.run([sys.executable, script, "--dry-run"], capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr
    assert "cells: 20 tuning + 81 reported" in plan.stdout and "git commit" in plan.stdout
    quick = subprocess.run([sys.executable, script, "--quick", "--dry-run"], capture_output=True, text=True,
                           timeout=120)
    assert quick.returncode == 0 and "cells: 0 tuning + 9 reported" in quick.stdout
    both = subprocess.run([sys.executable, script, "--quick", "--paper"], capture_output=True, text=True, timeout=120)
    assert both.returncode != 0 and both.stderr.strip() == "bench_claims: --quick and --paper exclude each other"
