"""``huscf compare``: train and evaluate several methods on one config, then tabulate them.

Every method runs on the same config (same partition seed, cGAN blocks, rounds, batch) in its own
run directory ``OUT/METHOD``. ``jobs`` (``--jobs``, default ``auto``) runs that many methods at once,
each in its own process on its share of the cores (2 cores: two methods, one thread each); a
method's results then equal a one-at-a-time run with the same thread count (``--jobs 1 --set
train.threads=1`` on 2 cores) bit for bit. The domain classifiers are trained (or read from the
cache) once, before any method starts. Re-running the same command resumes: a
finished method is skipped, a killed one continues from its last checkpoint, and a method whose
``eval.json`` covers its last round is not evaluated again. Outputs in ``OUT``:

* ``compare.md`` / ``compare.csv``: per method and domain, the final round's generation score,
  classifier FID, TSTR accuracy / F1 (means over that domain's generators; a local-only run has
  one generator per client), with the number of generators and the training wall time;
* ``compare_scores.png``: generation score per round, one panel per domain, one line per method.
"""

from __future__ import annotations

import csv
import dataclasses
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from huscf.config import load_config
from huscf.engines.threads import plan_jobs, run_parallel
from huscf.errors import HuscfError
from huscf.methods import get_method
from huscf.metrics.classifiers import load_or_train
from huscf.metrics.evaluate import evaluate_run
from huscf.rundir import EvalSettings, RunDir, read_eval
from huscf.trainer import Trainer

FIELDS = ["method", "domain", "generators", "generation_score", "fid", "tstr_accuracy", "tstr_f1", "rounds",
          "latency_s_iteration", "latency_s_rounds", "train_seconds"]


def resolve(name: str) -> tuple[str, tuple[str, ...]]:
    """A method or ablation name -> (config method, extra overrides)."""
    method = get_method(name)
    return method.ablation_of or method.name, method.overrides


def _evaluated(run_dir: Path, settings: EvalSettings) -> bool:
    """Whether eval.json covers the run's last round with these evaluation settings."""
    path = run_dir / "eval.json"
    if not path.is_file():
        return False
    last = RunDir(run_dir).list_checkpoints()[-1][0]
    saved: EvalSettings = read_eval(path).settings
    return saved.rounds[-1] == last and dataclasses.replace(saved, rounds=settings.rounds) == settings


def summarise(out: Path, names: list[str]) -> list[dict]:
    """One row per method and domain from the methods' eval.json and metrics."""
    rows = []
    for name in names:
        run_dir = out / name
        ev = read_eval(run_dir / "eval.json")
        metrics = RunDir(run_dir).read_rounds()
        by_domain: dict[str, list] = {}
        for entry in ev.final:
            by_domain.setdefault(entry.domain, []).append(entry)
        for domain, entries in by_domain.items():
            def mean(get):
                vals = [get(e) for e in entries if get(e) is not None]
                return round(float(np.mean(vals)), 4) if vals else None

            rows.append({
                "method": name, "domain": domain, "generators": len(entries),
                "generation_score": mean(lambda e: e.generation_score), "fid": mean(lambda e: e.fid),
                "tstr_accuracy": mean(lambda e: e.tstr["accuracy"] if e.tstr else None),
                "tstr_f1": mean(lambda e: e.tstr["f1"] if e.tstr else None),
                "rounds": metrics[-1].round, "latency_s_iteration": metrics[-1].latency_s_per_iteration,
                "latency_s_rounds": round(sum(r.latency_s_round or 0.0 for r in metrics), 3),
                "train_seconds": round(sum(r.train_seconds or 0.0 for r in metrics), 1),
            })
    return rows


def _markdown(rows: list[dict], title: str) -> str:
    def fmt(v):
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    lines = [f"# {title}", "", "| " + " | ".join(FIELDS) + " |", "|" + " --- |" * len(FIELDS)]
    lines += ["| " + " | ".join(fmt(r[f]) for f in FIELDS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _plot(out: Path, names: list[str]) -> None:
    from huscf.report import plots

    panels: dict[str, plots.Panel] = {}
    for name in names:
        per: dict[str, dict[int, list[float]]] = {}
        for p in read_eval(out / name / "eval.json").per_round:
            per.setdefault(p.domain, {}).setdefault(p.round, []).append(p.generation_score)
        for domain, series in per.items():
            rounds = sorted(series)
            panel = panels.setdefault(domain, plots.Panel(f"generation score: {domain}", ylabel="score",
                                                                  legend_outside=True))
            panel.lines.append(plots.Line(name, rounds, [float(np.mean(series[r])) for r in rounds]))
    (out / "compare_scores.png").write_bytes(plots.curves(list(panels.values())))


class _MethodTask(NamedTuple):
    """One method's training and evaluation (picklable: it may run in another process)."""

    config: Path | None
    name: str
    run_dir: Path
    overrides: tuple[str, ...]
    data_dir: str | None
    eval_rounds: str
    settings: EvalSettings
    quiet: bool


def _run_method(task: _MethodTask) -> str:
    """Train (or resume) one method, then evaluate it unless its eval.json is up to date."""
    try:
        if (task.run_dir / "config.yaml").is_file():
            trainer = Trainer.resume(task.run_dir, quiet=task.quiet, data_dir=task.data_dir)
        else:
            method, extra = resolve(task.name)
            cfg = load_config(task.config, [*task.overrides, f"method={method}", *extra], task.data_dir)
            trainer = Trainer.new(cfg, task.run_dir, quiet=task.quiet)
        trainer.fit()
        if _evaluated(task.run_dir, task.settings):
            return "trained; eval.json was up to date"
        evaluate_run(task.run_dir, task.settings, rounds=task.eval_rounds, data_dir=task.data_dir, quiet=task.quiet)
    except HuscfError as exc:
        raise HuscfError(f"{task.name}: {exc}") from None
    return "trained and evaluated"


def compare(config: Path | None, names: list[str], out: Path, overrides: list[str] = (), eval_rounds: str = "all",
            samples: int = 2000, tstr_samples: int = 10000, data_dir: str | None = None, quiet: bool = False,
            every_client: bool = False, tstr_min_steps: int = 600, jobs: int | str = "auto",
            fid_reference: str = "test") -> Path:
    """Train (or resume) and evaluate every method in ``names`` on one config into ``out``, then
    write the comparison. ``every_client`` scores each client's own generator (see
    ``evaluate_run``); the table's values are then means over the domain's clients."""
    if not names:
        raise HuscfError("--methods: name at least one method")
    for name in names:
        resolve(name)  # every name checked before anything trains
    if len(set(names)) != len(names):
        raise HuscfError("--methods: a method is named twice")
    cfg = load_config(config, list(overrides), data_dir)  # a bad config or override fails before the first run
    try:
        processes, threads = plan_jobs(jobs, len(names))
    except ValueError as exc:
        raise HuscfError(f"--jobs: {exc}") from None
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    settings = EvalSettings(samples=samples, tstr_samples=tstr_samples, every_client=every_client,
                            tstr_min_steps=tstr_min_steps, fid_reference=fid_reference)
    tasks = [_MethodTask(config, name, out / name, tuple(overrides), data_dir, eval_rounds, settings, quiet)
             for name in names]
    if not all(_evaluated(task.run_dir, settings) for task in tasks):
        for d in cfg.data.domains:  # once, here: parallel methods would each train the same classifier
            load_or_train(d, cfg.data.data_dir, progress=not quiet)
    if processes == 1:
        for k, task in enumerate(tasks, 1):
            say(f"== {task.name} ({k}/{len(names)}): {task.run_dir}")
            say(f"{task.name}: {_run_method(task)}")
    else:
        say(f"== {len(names)} methods, {processes} at a time, {threads} torch thread{'s' if threads > 1 else ''} "
            f"each (--jobs 1: one after the other): {', '.join(names)}")
        start = time.perf_counter()
        quiet_tasks = [task._replace(quiet=True) for task in tasks]
        for k, (i, message) in enumerate(run_parallel(_run_method, quiet_tasks, processes, threads), 1):
            say(f"== {names[i]} done ({k}/{len(names)}, {time.perf_counter() - start:.0f} s): {message}")
    rows = summarise(out, names)
    title = f"Comparison on {config or 'the default config'} ({', '.join(overrides) or 'no overrides'})"
    (out / "compare.md").write_text(_markdown(rows, title))
    with (out / "compare.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    _plot(out, names)
    say(f"wrote {out / 'compare.md'}, compare.csv and compare_scores.png")
    return out / "compare.md"
