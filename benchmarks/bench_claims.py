"""The paper's five claims, measured: every method tuned with the same pre-registered budget, then
run on a fixed grid of settings and seeds; one table says, per claim, what the paper states, what
huscf measures, against which baseline, and whether the claim holds.

Run:  python benchmarks/bench_claims.py                  # CPU scale: tuning + 3 settings x 9 methods x 3 seeds
      python benchmarks/bench_claims.py --quick          # one seed of the smallest setting, untuned (<= 20 min)
      python benchmarks/bench_claims.py --paper          # the paper's scale; prints its projected time first
      python benchmarks/bench_claims.py --paper --dry-run --gpus 8   # only the projection, for 8 GPUs
      python benchmarks/bench_claims.py --address auto   # the cells as Ray tasks on a running cluster
      python benchmarks/bench_claims.py --json claims.json   # also the claims rows as JSON

Everything below was written before any cell of it ran (docs/results.md, "The paper's claims"):

* **Settings** (``SETTINGS``): the paper's scenario 5 (two domains, MNIST + Fashion-MNIST, highly
  non-IID), scenario 7 (four MNIST-family domains, non-IID) and CIFAR-10 non-IID, each reduced
  to fit 2 CPU cores (``--paper``: the paper's clients, width, batch, rounds and epochs).
* **Methods**: HuSCF-GAN and the paper's four baselines (FedGAN, MD-GAN, PFL-GAN, HFL-GAN), and
  the ablations of HuSCF-GAN (no clustering, no KLD weights, homogeneous cuts, a shared server body).
* **Seeds**: ``SEEDS`` report; ``VALIDATION_SEED`` only chooses the configurations.
* **Tuning** (``TUNING``): each of the five methods gets the same budget, 4 configurations: two
  learning rates x two values of one knob of its own. Each runs once on the validation seed of
  ``TUNE_SETTING``; the one with the lowest FID against *held-out training images* (never the
  test split) is kept for every setting, its ablations included. Grid, scores and choices are
  printed and kept in ``OUT/tuning.json``. ``--quick`` skips the tuning (each method's first
  configuration: its defaults) and says so.
* **Evaluation**: every client's own generator at the last round; score and FID on ``samples``
  samples, TSTR (accuracy, precision, recall, F1) on ``tstr_samples`` synthetic images, tested on
  the domain's real test split; a domain's value is the mean over its clients, a setting's the
  mean over its domains.

The claims (``CLAIMS``) and how each is measured, per seed, then mean +/- sd over seeds:

1. "10% average gain in classification metrics": HuSCF-GAN minus baseline in percentage points,
   averaged over TSTR accuracy, precision, recall and F1, the MNIST-family settings and the four
   baselines.
2. "up to 60% in multi-domain non-IID settings": the same gain on the four-domain setting, for the
   baseline it beats most.
3. "1.1x-3x higher generation score on the MNIST family": HuSCF-GAN's score / the baseline's, on
   the MNIST-family settings, for the baseline it beats least (the low end must hold against all).
4. "2x-70x lower FID on CIFAR-10": the baseline's FID / HuSCF-GAN's, least over baselines.
5. "lower per-iteration latency, at least 5x": the baseline's simulated seconds per iteration on
   the paper's device profiles / HuSCF-GAN's, least over baselines and settings.

Verdict: *holds* when mean - sd reaches the paper's figure, *does not hold* when mean + sd stays
below it, otherwise (or with one seed) *inconclusive*.

Cells (setting x method x seed, and the tuning runs) are independent. They run two at a time
here (``--jobs``), or with ``--address`` as Ray tasks (``--cpus-per-cell``, ``--gpus-per-cell``),
retried when a node is lost. Re-running the same command resumes: a finished cell (``cell.json``)
is read, an unfinished run continues from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from bench_quality import clients_summary  # noqa: E402
from provenance import made_line  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "huscf" / "configs"
SEEDS = (600, 601, 602)  # the reported seeds: fixed before any cell ran, never used to choose anything
VALIDATION_SEED = 599  # the tuning runs' seed
METHODS = ("huscf", "fedgan", "mdgan", "pflgan", "hflgan")
BASELINES = METHODS[1:]
ABLATIONS = ("huscf-noclust", "huscf-nokld", "huscf-homocuts", "huscf-sharedbody")
TSTR_METRICS = ("accuracy", "precision", "recall", "f1")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One row of the grid: a shipped config, its reduction, and which claims it serves."""

    name: str
    config: str
    cpu: tuple[str, ...]  # overrides at CPU scale
    paper: tuple[str, ...]  # overrides at the paper's scale
    family: str  # "mnist": claims 1-3; "cifar10": claim 4; every setting: claim 5
    multi_domain: bool = False  # claim 2's setting


COMMON_CPU = ("model.width=0.25", "train.batch_size=32", "train.rounds=10", "train.local_epochs=2",
              "output.samples_every=0", "output.keep_full_checkpoints=1")
COMMON_PAPER = ("model.width=1.0", "train.batch_size=64", "train.rounds=50", "train.local_epochs=5",
                "output.samples_every=0", "output.keep_full_checkpoints=1")
SETTINGS = (
    # the held-out images of the tuning FID are those beyond data.limit_per_domain, so even --paper keeps one
    Setting("two_domain_highly_noniid", "5_two_domain_highly_noniid",
            ("data.clients_per_domain=4", "data.limit_per_domain=800", *COMMON_CPU),
            ("data.clients_per_domain=20", "data.limit_per_domain=50000", *COMMON_PAPER), "mnist"),
    Setting("four_domain_noniid", "7_multi_domain_noniid",
            ("data.clients_per_domain=3", "data.limit_per_domain=400", *COMMON_CPU),
            ("data.clients_per_domain=20", "data.limit_per_domain=50000", *COMMON_PAPER), "mnist", multi_domain=True),
    Setting("cifar10_noniid", "cifar10_noniid",
            ("data.clients_per_domain=4", "data.limit_per_domain=800", *COMMON_CPU),
            ("data.clients_per_domain=10", "data.limit_per_domain=40000", *COMMON_PAPER), "cifar10"),
)
TUNE_SETTING = "two_domain_highly_noniid"
LEARNING_RATES = (2e-4, 5e-4)  # the first is every method's default
TUNING = {  # method: (its own knob, two values; the first is its default)
    "huscf": ("federation.warmup_rounds", (2, 1)),
    "fedgan": ("baselines.fedgan_sync_every", (20, 5)),
    "mdgan": ("baselines.mdgan_swap_every", (1, 2)),
    "pflgan": ("baselines.pfl_temperature", (0.1, 1.0)),
    "hflgan": ("baselines.hfl_edges", (2, 4)),
}
EVAL_CPU = {"samples": 500, "tstr_samples": 1000, "tstr_min_steps": 100}
EVAL_PAPER = {"samples": 5000, "tstr_samples": 30000, "tstr_min_steps": 600}
CLAIMS = (  # (number, the paper's words, its figure, what is measured, unit)
    (1, "average gain in TSTR accuracy/precision/recall/F1", 10.0, "mean gain over baselines", "pp"),
    (2, "gain in multi-domain non-IID settings (up to)", 60.0, "largest gain over one baseline", "pp"),
    (3, "higher generation score, MNIST family (1.1x-3x)", 1.1, "least ratio over baselines", "x"),
    (4, "lower FID on CIFAR-10 (2x-70x)", 2.0, "least ratio over baselines", "x"),
    (5, "lower per-iteration latency (5x-58x)", 5.0, "least ratio over baselines", "x"),
)


def candidates(method: str) -> list[tuple[str, ...]]:
    """The method's tuning grid: every learning rate x every value of its own knob (4 in all)."""
    key, values = TUNING[method]
    return [(f"train.lr={lr}", f"{key}={v}") for lr in LEARNING_RATES for v in values]


@dataclasses.dataclass(frozen=True)
class Cell:
    """One independent run: train one method on one setting and seed, then evaluate it."""

    phase: str  # "tune" or "report"
    setting: str
    method: str
    seed: int
    config: str
    overrides: tuple[str, ...]
    eval: tuple[tuple[str, object], ...]  # evaluation settings as sorted (key, value) pairs
    candidate: int  # index into candidates() of the method (an ablation: of HuSCF-GAN)

    @property
    def label(self) -> str:
        """Which run this is in the analysis: phase, setting, seed, method."""
        return f"{self.phase}/{self.setting}/seed_{self.seed}/{self.method}"

    @property
    def key(self) -> str:
        """Its folder under OUT: the label and the configuration, so that a grid with another choice
        (--quick runs the defaults) never resumes a run of a different configuration."""
        return f"{self.label}/config_{self.candidate}"


def cell_summary(eval_json: Path, compare_csv: Path) -> dict:
    """{domain: {metric: mean over the domain's generators}} and the latency, from one cell's files."""
    import csv

    from huscf.rundir import read_eval

    per: dict[str, dict[str, list[float]]] = {}
    for e in read_eval(eval_json).final:
        d = per.setdefault(e.domain, {})
        d.setdefault("generation_score", []).append(e.generation_score)
        d.setdefault("fid", []).append(e.fid)
        for m in TSTR_METRICS:
            if e.tstr is not None:
                d.setdefault(f"tstr_{m}", []).append(e.tstr[m])
    rows = list(csv.DictReader(compare_csv.open()))
    return {"domains": {d: {k: float(np.mean(v)) for k, v in ms.items()} for d, ms in per.items()},
            "latency_s_iteration": float(rows[0]["latency_s_iteration"]),
            "train_seconds": float(rows[0]["train_seconds"])}


def run_cell(cell: Cell, out: str, data_dir: str | None = None) -> dict:
    """Train (or resume) and evaluate one cell under ``out``; returns its summary (``cell_summary``)."""
    from huscf.compare import compare

    folder = Path(out) / cell.key
    ev = dict(cell.eval)
    compare(CONFIGS / f"{cell.config}.yaml", [cell.method], folder, [*cell.overrides, f"seed={cell.seed}"],
            eval_rounds="last", every_client=True, jobs=1, quiet=True, data_dir=data_dir, **ev)
    return cell_summary(folder / cell.method / "eval.json", folder / "compare.csv")


def _run_cell_item(item: tuple[Cell, str, str | None]) -> dict:
    return run_cell(*item)


def make_cells(phase: str, settings: list[Setting], methods: list[str], seeds: list[int], scale: str,
               choice: dict[str, int], ev: dict) -> list[Cell]:
    """The cells of one phase. ``choice``: the chosen candidate per tuned method (ablations take
    HuSCF-GAN's); in the tuning phase every candidate of every method runs."""
    out = []
    for s in settings:
        base = s.paper if scale == "paper" else s.cpu
        for seed in seeds:
            for m in methods:
                tuned = "huscf" if m in ABLATIONS else m
                picks = range(len(candidates(tuned))) if phase == "tune" else [choice.get(tuned, 0)]
                for k in picks:
                    out.append(Cell(phase, s.name, m, seed, s.config, (*base, *candidates(tuned)[k]),
                                    tuple(sorted(ev.items())), k))
    return out


def run_cells(cells: list[Cell], out: Path, *, jobs: str, address: str | None, cpus: int, gpus: float,
              data_dir: str | None, say=print) -> dict[str, dict]:
    """Every cell's summary, by its key: read from ``cell.json`` where the cell finished before, else run
    (here: ``jobs`` processes; with ``address``: as Ray tasks) and saved as each finishes."""
    results, todo = {}, []
    for c in cells:
        path = out / c.key / "cell.json"
        if path.is_file():
            results[c.key] = json.loads(path.read_text())
        else:
            todo.append(c)
    if not todo:
        say(f"all {len(cells)} cells read from {out} (finished before)")
        return results
    say(f"{len(todo)} cells to run ({len(cells) - len(todo)} finished before)")
    start = time.perf_counter()

    def done(c: Cell, summary: dict, k: int) -> None:
        summary = summary | {"overrides": list(c.overrides), "seed": c.seed}  # what made it, kept beside it
        path = out / c.key / "cell.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, path)  # a cell counts as done only once its summary is whole
        results[c.key] = summary
        elapsed = time.perf_counter() - start
        say(f"  [{k}/{len(todo)}] {c.key} ({elapsed / 60:.1f} min; about {elapsed / k * (len(todo) - k) / 60:.0f} "
            f"min left)")

    if address:
        import ray

        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        if __name__ != "__main__":  # imported (tests): send this module's code with the task, as a script's is
            ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=3, retry_exceptions=False)(_ray_cell)
        pending = {task.remote(c, str(out), data_dir, cpus): c for c in todo}
        k = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            c = pending.pop(ready[0])
            k += 1
            done(c, ray.get(ready[0]), k)
        return results
    from huscf.engines.threads import plan_jobs, run_parallel

    processes, threads = plan_jobs(jobs, len(todo))
    items = [(c, str(out), data_dir) for c in todo]
    if processes == 1:
        for k, c in enumerate(todo, 1):
            done(c, run_cell(c, str(out), data_dir), k)
    else:
        for k, (i, summary) in enumerate(run_parallel(_run_cell_item, items, processes, threads), 1):
            done(todo[i], summary, k)
    return results


def _ray_cell(cell: Cell, out: str, data_dir: str | None, cpus: int) -> dict:
    """A cell as a Ray task: pinned to the task's CPUs (train.threads follows OMP_NUM_THREADS)."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(max(1, int(cpus)))
    torch.set_num_threads(max(1, int(cpus)))
    return run_cell(cell, out, data_dir)


# ---- analysis: pure functions of the cells' summaries ----------------------------------------------------

def setting_value(summary: dict, metric: str) -> float:
    """A cell's value of ``metric``: the mean over its domains (the latency is one number)."""
    if metric == "latency_s_iteration":
        return summary[metric]
    return float(np.mean([d[metric] for d in summary["domains"].values()]))


def per_seed(results: dict, settings: list[Setting], method: str, seeds: list[int], metric: str) -> np.ndarray:
    """[seed, setting] values of ``metric`` for ``method`` in the report phase (``results`` by label)."""
    return np.array([[setting_value(results[f"report/{s.name}/seed_{seed}/{method}"], metric) for s in settings]
                     for seed in seeds])


def verdict(mean: float, sd: float | None, figure: float) -> str:
    """holds: mean - sd reaches the paper's figure; does not hold: mean + sd stays below it."""
    if sd is None or math.isnan(sd):
        return "inconclusive (one seed)"
    if mean - sd >= figure:
        return "holds"
    if mean + sd < figure:
        return "does not hold"
    return "inconclusive"


def _stats(values: np.ndarray) -> tuple[float, float | None]:
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def tstr_gain_pp(results: dict, group: list[Setting], base: str, seeds: list[int]) -> np.ndarray:
    """Per seed: HuSCF-GAN's TSTR minus ``base``'s in percentage points, mean over the settings of
    ``group`` and over accuracy, precision, recall and F1."""
    return np.mean([100 * (per_seed(results, group, "huscf", seeds, f"tstr_{m}")
                           - per_seed(results, group, base, seeds, f"tstr_{m}")).mean(axis=1)
                    for m in TSTR_METRICS], axis=0)


def ratio_to(results: dict, group: list[Setting], base: str, seeds: list[int], metric: str,
             ours_over_theirs: bool) -> np.ndarray:
    """Per seed: HuSCF-GAN's ``metric`` over ``base``'s (or the inverse), each the mean over ``group``."""
    ours, theirs = (per_seed(results, group, m, seeds, metric).mean(axis=1) for m in ("huscf", base))
    return ours / theirs if ours_over_theirs else theirs / ours


def claims_table(results: dict, settings: list[Setting], seeds: list[int], baselines: list[str]) -> list[dict]:
    """One row per claim: {claim, paper, measured, sd, seeds, against, verdict, what}. A claim whose
    settings are not in the grid is measured as None, verdict 'not measured'."""
    mnist = [s for s in settings if s.family == "mnist"]
    multi = [s for s in settings if s.multi_domain]
    cifar = [s for s in settings if s.family == "cifar10"]

    def gain_pp(group: list[Setting], base: str) -> np.ndarray:
        return tstr_gain_pp(results, group, base, seeds)

    def ratio(group: list[Setting], base: str, metric: str, ours_over_theirs: bool) -> np.ndarray:
        return ratio_to(results, group, base, seeds, metric, ours_over_theirs)

    rows = []
    for number, words, figure, what, unit in CLAIMS:
        row = {"claim": number, "paper": figure, "unit": unit, "what": f"{words}: {what}", "seeds": len(seeds)}
        group = {1: mnist, 2: multi, 3: mnist, 4: cifar, 5: settings}[number]
        if not group:
            rows.append(row | {"measured": None, "sd": None, "against": ", ".join(baselines),
                               "verdict": "not measured (no such setting in this grid)"})
            continue
        if number == 1:
            values, against = np.mean([gain_pp(group, b) for b in baselines], axis=0), "mean of " + ", ".join(baselines)
        else:
            per_base = {b: (gain_pp(group, b) if number == 2 else
                            ratio(group, b, "generation_score", True) if number == 3 else
                            ratio(group, b, "fid", False) if number == 4 else
                            ratio(group, b, "latency_s_iteration", False)) for b in baselines}
            pick = max if number == 2 else min  # "up to": the best case; a range's low end: the worst case
            against = pick(per_base, key=lambda b: per_base[b].mean())
            values = per_base[against]
        mean, sd = _stats(values)
        rows.append(row | {"measured": round(mean, 4), "sd": None if sd is None else round(sd, 4),
                           "against": against, "verdict": verdict(mean, sd, figure)})
    return rows


def ablation_table(results: dict, settings: list[Setting], seeds: list[int], ablations: list[str]) -> list[dict]:
    """Per ablation: HuSCF-GAN's TSTR accuracy minus the ablation's (pp) and the ablation's FID /
    HuSCF-GAN's, per seed averaged over settings; the component 'adds' when the gain is above one sd."""
    rows = []
    for a in ablations:
        acc = 100 * (per_seed(results, settings, "huscf", seeds, "tstr_accuracy")
                     - per_seed(results, settings, a, seeds, "tstr_accuracy")).mean(axis=1)
        fid = (per_seed(results, settings, a, seeds, "fid")
               / per_seed(results, settings, "huscf", seeds, "fid")).mean(axis=1)
        (am, asd), (fm, fsd) = _stats(acc), _stats(fid)
        rows.append({"ablation": a, "tstr_gain_pp": round(am, 3), "tstr_sd": asd and round(asd, 3),
                     "fid_ratio": round(fm, 3), "fid_sd": fsd and round(fsd, 3),
                     "tstr_verdict": effect(am, asd, 0.0), "fid_verdict": effect(fm, fsd, 1.0)})
    return rows


def effect(mean: float, sd: float | None, none: float) -> str:
    """A component's verdict from its per-seed effect: 'adds' when mean - sd is above ``none`` (the
    value of no effect), 'costs' when mean + sd is below it, else 'no measurable effect'."""
    if sd is None:
        return "inconclusive (one seed)"
    return "adds" if mean - sd > none else "costs" if mean + sd < none else "no measurable effect"


def choose(results: dict, methods: list[str], setting: str, seed: int) -> tuple[dict[str, int], list[str]]:
    """Each method's candidate with the lowest held-out FID (mean over domains) on the validation
    seed, and the lines that show the grid, the scores and the choice."""
    choice, lines = {}, []
    for m in methods:
        scores = [setting_value(results[f"tune/{setting}/seed_{seed}/{m}/config_{k}"], "fid")
                  for k in range(len(candidates(m)))]
        choice[m] = int(np.argmin(scores))
        lines.append(f"{m}: " + "; ".join(f"[{k}] {' '.join(c)} FID {s:.1f}{' <- chosen' if k == choice[m] else ''}"
                                          for k, (c, s) in enumerate(zip(candidates(m), scores))))
    return choice, lines


def run_grid(settings: list[Setting], methods: list[str], seeds: list[int], out: Path, *, scale: str = "cpu",
             ev: dict | None = None, tune: Setting | None = None, say=print,
             **run) -> tuple[list[dict], list[dict], str]:
    """Tune (on ``tune``'s validation seed, when given), run every reported cell, and return the
    claims rows, the ablation rows and the printed table. ``run``: ``run_cells``'s options."""
    ev = ev or EVAL_CPU
    tuned_methods = [m for m in methods if m not in ABLATIONS]
    if tune is not None:
        say(f"== tuning: {len(tuned_methods)} methods x {len(LEARNING_RATES) * 2} configurations on {tune.name}, "
            f"seed {VALIDATION_SEED}, FID against held-out training images")
        tune_ev = {"samples": ev["samples"], "tstr_samples": 0, "fid_reference": "heldout"}
        tuned = run_cells(make_cells("tune", [tune], tuned_methods, [VALIDATION_SEED], scale, {}, tune_ev), out,
                          say=say, **run)
        choice, lines = choose(tuned, tuned_methods, tune.name, VALIDATION_SEED)
        (out / "tuning.json").write_text(json.dumps({"grid": {m: candidates(m) for m in tuned_methods},
                                                     "choice": choice, "lines": lines}, indent=1))
        for line in lines:
            say(line)
    else:
        choice = {m: 0 for m in tuned_methods}
        say("== no tuning: every method runs its first configuration, its defaults")
    say("== reported cells")
    cells = make_cells("report", settings, methods, seeds, scale, choice, ev)
    done = run_cells(cells, out, say=say, **run)
    results = {c.label: done[c.key] for c in cells}  # the analysis knows one configuration per method
    baselines = [m for m in tuned_methods if m != "huscf"]
    ablations = [m for m in methods if m in ABLATIONS]
    claims = claims_table(results, settings, seeds, baselines)
    abl = ablation_table(results, settings, seeds, ablations) if ablations else []
    clients = ["", "HuSCF-GAN's clients per setting and seed: domain, cuts (G head, G tail, D head, D tail), "
                   "classes it lacks, images, cluster and TSTR accuracy of its own generator at the last round", ""]
    clients += [f"{c.setting} seed {c.seed}: {clients_summary(out / c.key / c.method)}" for c in cells
                if c.method == "huscf"]
    detail = (per_baseline_lines(results, settings, seeds, baselines)
              + per_domain_lines(results, settings, methods, seeds) + clients + kld_lines(out, cells))
    return claims, abl, render(claims, abl, detail)


def _fmt(v, sd=None, unit="") -> str:
    if v is None:
        return "-"
    return f"{v:.3f}{unit}" + (f" +/- {sd:.3f}" if sd is not None else "")


def render(claims: list[dict], ablations: list[dict], detail: list[str]) -> str:
    lines = ["| claim | the paper | huscf measured (mean +/- sd) | seeds | against | verdict |",
             "| --- | ---: | ---: | ---: | --- | --- |"]
    for r in claims:
        u = " pp" if r["unit"] == "pp" else "x"
        lines.append(f"| {r['claim']}: {r['what']} | {r['paper']:g}{u} | {_fmt(r['measured'], r['sd'], u)} | "
                     f"{r['seeds']} | {r['against']} | {r['verdict']} |")
    if ablations:
        lines += ["", "What each component adds (HuSCF-GAN against HuSCF-GAN without it, mean over settings):", "",
                  "| ablation | TSTR acc: huscf - ablation (pp) | verdict | FID: ablation / huscf | verdict |",
                  "| --- | ---: | --- | ---: | --- |"]
        lines += [f"| {r['ablation']} | {_fmt(r['tstr_gain_pp'], r['tstr_sd'])} | {r['tstr_verdict']} | "
                  f"{_fmt(r['fid_ratio'], r['fid_sd'])} | {r['fid_verdict']} |" for r in ablations]
    return "\n".join(lines + [""] + detail)


def per_baseline_lines(results: dict, settings: list[Setting], seeds: list[int], baselines: list[str]) -> list[str]:
    """HuSCF-GAN against each baseline in each setting, mean +/- sd over seeds: the claims' inputs."""
    lines = ["HuSCF-GAN against each baseline per setting (mean +/- sd over seeds): TSTR gain in pp (mean of "
             "accuracy, precision, recall, F1), generation score ours / theirs, FID theirs / ours, latency "
             "theirs / ours", "",
             "| setting | baseline | TSTR gain (pp) | score ratio | FID ratio | latency ratio |", "|" + " --- |" * 6]
    for s in settings:
        for b in baselines:
            cols = [tstr_gain_pp(results, [s], b, seeds)] + [
                ratio_to(results, [s], b, seeds, metric, up) for metric, up in
                (("generation_score", True), ("fid", False), ("latency_s_iteration", False))]
            lines.append(f"| {s.name} | {b} | " + " | ".join(_fmt(*_stats(v)) for v in cols) + " |")
    return lines + [""]


def per_domain_lines(results: dict, settings: list[Setting], methods: list[str], seeds: list[int]) -> list[str]:
    """Mean over seeds per setting, method and domain: where a claim fails, which domain it fails on."""
    lines = ["Per setting, method and domain (mean over seeds): TSTR accuracy, F1, score, FID, latency s/iteration", "",
             "| setting | method | domain | TSTR acc | TSTR F1 | score | FID | latency |", "|" + " --- |" * 8]
    for s in settings:
        for m in methods:
            cells = [results[f"report/{s.name}/seed_{seed}/{m}"] for seed in seeds]
            for d in cells[0]["domains"]:
                v = {k: np.mean([c["domains"][d][k] for c in cells])
                     for k in ("tstr_accuracy", "tstr_f1", "generation_score", "fid")}
                lines.append(f"| {s.name} | {m} | {d} | {v['tstr_accuracy']:.3f} | {v['tstr_f1']:.3f} | "
                             f"{v['generation_score']:.3f} | {v['fid']:.1f} | {cells[0]['latency_s_iteration']:.3f} |")
    return lines


def kld_stats(run_dir: Path) -> dict:
    """One run's KLD weights against its size weights over its clustered rounds: ``rounds``,
    every ``kld`` (KLD_i), every ``gap`` (|a client's weight in its cluster / its size share of the
    cluster - 1|) and the run's ``alpha`` (metrics.jsonl, clients.json, config.yaml)."""
    from huscf.config import load_run_config
    from huscf.rundir import RunDir

    run = RunDir(run_dir)
    sizes = [cl["size"] for cl in json.loads((run.path / "clients.json").read_text())["clients"]]
    acc = {"rounds": 0, "kld": [], "gap": [], "alpha": load_run_config(run.config).federation.alpha}
    for r in run.read_rounds():
        fed = r.federation or {}
        if fed.get("phase") != "clustered" or not fed.get("kld"):
            continue
        acc["rounds"] += 1
        acc["kld"] += fed["kld"]
        for i, (k, w) in enumerate(zip(r.clusters, r.cluster_weights)):
            if k < 0:  # absent this round
                continue
            share = sizes[i] / sum(n for n, kk in zip(sizes, r.clusters) if kk == k)
            acc["gap"].append(abs(w / share - 1))
    return acc


def kld_lines(out: Path, cells: list[Cell]) -> list[str]:
    """Why the KLD weights do (or do not) differ from size weights: per setting, over HuSCF-GAN's
    clustered rounds, the range of KLD_i, of exp(-alpha KLD_i), and the largest relative gap between
    a client's weight in its cluster and its size share of that cluster (``kld_stats``)."""
    by_setting: dict[str, dict] = {}
    for c in cells:
        if c.method != "huscf":
            continue
        one = kld_stats(out / c.key / c.method)
        acc = by_setting.setdefault(c.setting, {"kld": [], "gap": [], "rounds": 0, "alpha": one["alpha"]})
        for key in ("kld", "gap", "rounds"):
            acc[key] += one[key]
    lines = ["", "KLD weights against size weights (HuSCF-GAN's clustered rounds, every seed): KLD_i, "
                 "exp(-alpha KLD_i), and how far a client's weight in its cluster is from its size share", ""]
    for name, a in by_setting.items():
        if not a["rounds"]:
            lines.append(f"{name}: no clustered round with KLD scores")
            continue
        lo, hi = min(a["kld"]), max(a["kld"])
        lines.append(f"{name}: {a['rounds']} rounds; KLD_i {lo:.4f}-{hi:.4f}; exp(-{a['alpha']:g} KLD_i) "
                     f"{math.exp(-a['alpha'] * hi):.3f}-{math.exp(-a['alpha'] * lo):.3f}; weight / size share "
                     f"within {100 * max(a['gap']):.1f}% (median {100 * float(np.median(a['gap'])):.2f}%)")
    return lines


def project(settings: list[Setting], scale: str, cells: int, gpus: int) -> None:
    """Print the grid's projected wall time from HuSCF-GAN's timed iterations (bench_scenario.py)."""
    total = 0.0
    for s in settings:
        cmd = [sys.executable, str(Path(__file__).with_name("bench_scenario.py")), str(CONFIGS / f"{s.config}.yaml"),
               "--iters", "5", *[a for o in (s.paper if scale == "paper" else s.cpu) for a in ("--set", o)]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        match = re.search(r"projected: .* = ([\d.]+) s", proc.stdout)
        if proc.returncode != 0 or not match:
            raise SystemExit(f"bench_claims: could not project {s.name}: {proc.stderr.strip()[-300:]}")
        one = float(match.group(1))
        total += one * cells / len(settings)
        print(f"projected: {s.name}: {one / 60:.1f} min of training per cell on this machine", flush=True)
    print(f"projected: {cells} cells, {total / 3600:.1f} h of training on this machine; on {gpus} GPU(s) one cell "
          f"each: {total / 3600 / max(1, gpus):.1f} h if a GPU runs a cell as fast as this machine (training only)",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_claims_out",
                    help="cell directories (resumable; default ./bench_claims_out)")
    ap.add_argument("--quick", action="store_true", help="one seed of the smallest setting, untuned (<= 20 min)")
    ap.add_argument("--paper", action="store_true", help="the paper's scale (projected time printed first)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (with --paper the projection); run nothing")
    ap.add_argument("--no-ablations", action="store_true", help="skip the ablation cells")
    ap.add_argument("--json", metavar="FILE", help="also write the claims rows as a JSON list")
    ap.add_argument("--jobs", default="auto", help="cells at once on this machine (auto: one per core)")
    ap.add_argument("--address", help="run the cells as Ray tasks on this cluster (auto or HOST:PORT)")
    ap.add_argument("--cpus-per-cell", type=int, default=2, help="with --address: CPUs (and torch threads) per cell")
    ap.add_argument("--gpus-per-cell", type=float, default=0, help="with --address: GPUs per cell (e.g. 1)")
    ap.add_argument("--gpus", type=int, default=1, help="with --dry-run: the GPUs the projection divides by")
    ap.add_argument("--data-dir", help="folder with the datasets (default: $HUSCF_DATA)")
    args = ap.parse_args()
    if args.quick and args.paper:
        raise SystemExit("bench_claims: --quick and --paper exclude each other")
    scale = "paper" if args.paper else "cpu"
    settings = [s for s in SETTINGS if s.name == TUNE_SETTING] if args.quick else list(SETTINGS)
    seeds = [SEEDS[0]] if args.quick else list(SEEDS)
    methods = list(METHODS) + ([] if args.no_ablations else list(ABLATIONS))
    ev = dict(EVAL_PAPER if args.paper else EVAL_CPU)
    out = Path(args.out)
    say = lambda m: print(m, flush=True)  # noqa: E731
    say(f"bench_claims: {scale} scale{' (quick)' if args.quick else ''}; "
        f"settings {', '.join(s.name for s in settings)}; "
        f"methods {' '.join(methods)}; seeds {seeds} (validation seed {VALIDATION_SEED}); evaluation {ev}")
    say(made_line())
    tune_settings = [s for s in SETTINGS if s.name == TUNE_SETTING]
    n_tune = 0 if args.quick else len(make_cells("tune", tune_settings, list(METHODS), [VALIDATION_SEED], scale,
                                                 {}, {}))
    n_report = len(make_cells("report", settings, methods, seeds, scale, {}, ev))
    say(f"cells: {n_tune} tuning + {n_report} reported")
    if args.paper:
        project(settings, scale, n_tune + n_report, args.gpus)
    if args.dry_run:
        return
    from huscf.errors import HuscfError
    from huscf.metrics.classifiers import load_or_train

    try:
        for d in dict.fromkeys(d for s in settings for d in _domains(s)):
            load_or_train(d, args.data_dir, progress=False)  # once, before parallel cells would each train it
        claims, _, table = run_grid(settings, methods, seeds, out, scale=scale, ev=ev,
                                    tune=None if args.quick else tune_settings[0], say=say, jobs=args.jobs,
                                    address=args.address, cpus=args.cpus_per_cell, gpus=args.gpus_per_cell,
                                    data_dir=args.data_dir)
    except HuscfError as exc:
        raise SystemExit(f"bench_claims: {exc}") from None
    say("")
    say(table)
    if args.json:
        Path(args.json).write_text(json.dumps([{k: r[k] for k in ("claim", "paper", "measured", "sd", "seeds",
                                                                   "against", "verdict")} for r in claims], indent=1))
        say(f"wrote {args.json}")


def _domains(s: Setting) -> list[str]:
    from huscf.config import load_config

    return list(load_config(CONFIGS / f"{s.config}.yaml", list(s.cpu)).data.domains)


if __name__ == "__main__":
    main()
