"""Does HuSCF-GAN beat the alternatives where federation matters? Every method, several training
seeds, one evaluation, every client's own generator.

Run:  python benchmarks/bench_quality.py                         # the default grid (27 min on 2 cores)
      python benchmarks/bench_quality.py --seeds 0 1 2 3 4 --methods huscf local pflgan
      python benchmarks/bench_quality.py --rounds 30 --out OUT30    # the same grid, 3x the training
      python benchmarks/bench_quality.py --paper                     # the paper's scale (a GPU: device auto)
      python benchmarks/bench_quality.py --paper --dry-run           # only its projected wall time
      python benchmarks/bench_quality.py --summarise --out OUT       # only print the table of OUT

The grid (fixed before any outcome was compared; see docs/results.md): paper scenario 5 (``configs/5_two_domain_highly_noniid``:
MNIST + Fashion-MNIST, the paper's highly non-IID recipe: each client misses 2 or 3 classes and
holds a share of 1/6, 1/3 or 1 of its domain's part), reduced to fit 2 CPU cores:

* 4 clients per domain over the first 800 training images of each domain (33-200 images per
  client, skewed labels: the regime in which a client's own data is not enough);
* the paper's cGAN at width 0.25, batch 32, 10 rounds x 2 local epochs, cuts by the MILP for the
  paper's device profiles (heterogeneous cuts), seeds 0, 1, 2 (``seed``: partition, initialisation,
  noise).

Every method and ablation runs through ``huscf compare`` on that config, one seed after another
into ``OUT/seed_S/METHOD`` (re-running the command resumes). The evaluation scores **every client's
own generator** at the last round, asked for all 10 classes of its domain, also the ones its client
never saw: 1000 samples for the generation score and the classifier FID, and 2000 synthetic images
to train the TSTR classifier (at least 200 steps) tested on the domain's 10000 real test images.
A domain's value is the mean over its clients; the table gives mean +/- standard deviation over
seeds. Then it prints how many seeds HuSCF-GAN beats each method on the mean TSTR accuracy and FID
over domains, whether it beats it by more than one standard deviation, and every HuSCF-GAN
client's cuts, missing classes, data size and TSTR accuracy (which generators fall short).

``--paper``: the same at the paper's scale (20 clients per domain, all training images, width 1,
batch 64, 50 rounds x 5 local epochs, 5000 / 30000 evaluation images). It prints a projected wall
time (``bench_scenario.py`` on HuSCF-GAN's iteration, times methods x seeds) before it starts.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from provenance import made_line  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "huscf" / "configs" / "5_two_domain_highly_noniid.yaml"
METHODS = ["huscf", "fedgan", "mdgan", "hflgan", "pflgan", "local", "centralized",
           "huscf-noclust", "huscf-nokld", "huscf-homocuts"]
BASELINES = ["fedgan", "mdgan", "hflgan", "pflgan", "local"]  # the target: beat each of these
GRID = ["data.clients_per_domain=4", "data.limit_per_domain=800", "model.width=0.25", "train.batch_size=32",
        "train.rounds=10", "train.local_epochs=2", "output.samples_every=0", "output.keep_full_checkpoints=1"]
EVAL = {"samples": 1000, "tstr_samples": 2000, "tstr_min_steps": 200}
PAPER = ["data.clients_per_domain=20", "model.width=1.0", "train.batch_size=64", "train.rounds=50",
         "train.local_epochs=5", "output.samples_every=0", "output.keep_full_checkpoints=1"]
PAPER_EVAL = {"samples": 5000, "tstr_samples": 30000, "tstr_min_steps": 600}
METRICS = [("tstr_accuracy", "TSTR acc", True), ("tstr_f1", "TSTR F1", True), ("fid", "FID", False),
           ("generation_score", "score", True),
           # the method's simulated latency on the paper's device profiles (docs/latency.md, "Every method")
           ("latency_s_iteration", "latency / iteration (s)", False),
           ("latency_s_rounds", "latency, all rounds (s)", False)]
# the paper's published TSTR accuracies (%, Tawfilis et al. 2025, HuSCF-GAN, full scale)
PAPER_TSTR = {"mnist": [97.87, 97.17, 96.83, 96.21, 96.15, 95.94], "fashion_mnist": [None, None, 82.93, 81.90,
                                                                                     81.46, 81.94]}


def _read(out: Path, seeds: list[int], methods: list[str]) -> dict:
    """{(method, domain): {metric: [value per seed]}} from every seed's compare.csv."""
    table: dict[tuple[str, str], dict[str, list[float]]] = {}
    for s in seeds:
        path = out / f"seed_{s}" / "compare.csv"
        if not path.is_file():
            raise SystemExit(f"bench_quality: {path} is missing: run the grid first (same --out)")
        for row in csv.DictReader(path.open()):
            if row["method"] not in methods:
                continue
            cell = table.setdefault((row["method"], row["domain"]), {})
            for key, _, _ in METRICS:
                cell.setdefault(key, []).append(float(row[key]) if row[key] not in ("", "None") else np.nan)
    return table


def _per_seed_mean(table: dict, method: str, key: str, domains: list[str]) -> np.ndarray:
    """The mean over domains of ``key`` for ``method``, one value per seed."""
    return np.nanmean(np.array([table[(method, d)][key] for d in domains]), axis=0)


def summarise(out: Path, seeds: list[int], methods: list[str]) -> str:
    table = _read(out, seeds, methods)
    domains = list(dict.fromkeys(d for _, d in table))
    lines = [f"{len(seeds)} seeds ({', '.join(map(str, seeds))}); mean +/- sd over seeds of the per-domain mean over "
             f"clients' own generators", ""]
    head = "| method | domain | " + " | ".join(label for _, label, _ in METRICS) + " |"
    lines += [head, "|" + " --- |" * (2 + len(METRICS))]
    for m in methods:
        for d in domains:
            cell = table[(m, d)]
            lines.append(f"| {m} | {d} | " + " | ".join(
                f"{np.nanmean(cell[k]):.3f} +/- {np.nanstd(cell[k], ddof=1) if len(seeds) > 1 else 0:.3f}"
                for k, _, _ in METRICS) + " |")
    if "huscf" in methods:
        lines += ["", "HuSCF-GAN against each method, mean over domains per seed (higher TSTR, lower FID wins):", "",
                  "| method | TSTR acc: huscf / method | seeds huscf wins | > 1 sd | FID: huscf / method | "
                  "seeds huscf wins | > 1 sd |", "|" + " --- |" * 7]
        ours = {k: _per_seed_mean(table, "huscf", k, domains) for k in ("tstr_accuracy", "fid")}
        verdict = []
        for m in methods:
            if m == "huscf":
                continue
            cells = []
            for key, higher in (("tstr_accuracy", True), ("fid", False)):
                theirs = _per_seed_mean(table, m, key, domains)
                wins = int(np.sum(ours[key] > theirs) if higher else np.sum(ours[key] < theirs))
                diff = (ours[key].mean() - theirs.mean()) * (1 if higher else -1)
                # one seed has no spread: "more than one sd" cannot be judged
                clear = diff > max(np.std(ours[key], ddof=1), np.std(theirs, ddof=1)) if len(seeds) > 1 else None
                cells += [f"{ours[key].mean():.3f} / {theirs.mean():.3f}", f"{wins} of {len(seeds)}",
                          {True: "yes", False: "no", None: "n/a (1 seed)"}[clear]]
                if m in BASELINES:
                    verdict.append(clear)
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        met = ("cannot be judged with one seed" if None in verdict
               else "met" if verdict and all(verdict) else "NOT met")
        lines += ["", f"target (beat {', '.join(b for b in BASELINES if b in methods)} on mean TSTR accuracy and "
                      f"mean FID by more than one sd): {met}"]
        lines += ["", "HuSCF-GAN's clients: cuts (G head, G tail, D head, D tail), missing classes, images, cluster, "
                      "TSTR accuracy of its own generator", ""]
        for s in seeds:
            lines.append(f"seed {s}: " + clients_summary(out / f"seed_{s}" / "huscf"))
    return "\n".join(lines)


def clients_summary(run: Path) -> str:
    """One run's clients: domain, cuts, missing classes, images, cluster and TSTR accuracy of its
    own generator at the last evaluated round."""
    from huscf.rundir import read_eval

    clients = json.loads((run / "clients.json").read_text())["clients"]
    final = {e.client: e for e in read_eval(run / "eval.json").final}
    parts = []
    for i, c in enumerate(clients):
        e = final.get(i)
        acc = "-" if e is None or e.tstr is None else f"{e.tstr['accuracy']:.2f}"
        parts.append(f"c{i} {c['domain'][:5]} {tuple(c['cuts'])} -{c.get('excluded_classes', [])} "
                     f"n={c.get('size', '?')} k{e.cluster if e else '-'} {acc}")
    return "; ".join(parts)


def _project(overrides: list[str], methods: list[str], seeds: list[int]) -> None:
    """Project the wall time from HuSCF-GAN's iteration (bench_scenario.py) and print it."""
    cmd = [sys.executable, str(Path(__file__).with_name("bench_scenario.py")), str(CONFIG), "--iters", "5",
           *[a for o in overrides for a in ("--set", o)]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    match = re.search(r"projected: .* = ([\d.]+) s", proc.stdout)
    if proc.returncode != 0 or not match:
        raise SystemExit(f"bench_quality: could not project the run: {proc.stderr.strip()[-300:]}")
    one = float(match.group(1))
    total = one * len(methods) * len(seeds)
    print(f"projected: {one / 60:.1f} min of training per method and seed (HuSCF-GAN's iteration); "
          f"{len(methods)} methods x {len(seeds)} seeds = {total / 3600:.1f} h of training, plus evaluation",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--out", default="bench_quality_out", help="run directories (resumable; default ./bench_quality_out)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    ap.add_argument("--paper", action="store_true", help="the paper's scale (for a GPU): see above")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (and with --paper the projection), train nothing")
    ap.add_argument("--summarise", action="store_true", help="only print the table of --out's finished grid")
    ap.add_argument("--rounds", type=int, help="training rounds (grid: 10; --paper: 50)")
    ap.add_argument("--samples", type=int, help="samples per generator for score and FID (grid: 1000)")
    ap.add_argument("--tstr-samples", type=int, help="synthetic images per generator for TSTR (grid: 2000)")
    ap.add_argument("--tstr-min-steps", type=int, help="least steps of each TSTR classifier (grid: 200)")
    ap.add_argument("--quiet", action="store_true", help="no training progress output")
    ap.add_argument("--jobs", default="auto", help="methods of a seed trained at once (huscf compare --jobs; "
                                                   "1 reproduces the one-at-a-time runs of docs/results.md)")
    args = ap.parse_args()
    out = Path(args.out)
    from huscf.compare import compare, resolve
    from huscf.errors import HuscfError

    try:
        for m in args.methods:
            resolve(m)
        if not args.summarise:
            overrides = (PAPER if args.paper else GRID) + ([f"train.rounds={args.rounds}"] if args.rounds else [])
            overrides += args.set
            ev = dict(PAPER_EVAL if args.paper else EVAL)
            ev.update({k: v for k, v in (("samples", args.samples), ("tstr_samples", args.tstr_samples),
                                         ("tstr_min_steps", args.tstr_min_steps)) if v})
            print(f"bench_quality: {CONFIG.name} + {' '.join(overrides)}; methods {' '.join(args.methods)}; "
                  f"seeds {args.seeds}; evaluation {ev}; every client's own generator", flush=True)
            print(made_line(), flush=True)
            if args.paper:
                _project(overrides, args.methods, args.seeds)
            if args.dry_run:
                return
            start = time.perf_counter()
            for s in args.seeds:
                print(f"== seed {s} ({time.perf_counter() - start:.0f} s so far)", flush=True)
                compare(CONFIG, args.methods, out / f"seed_{s}", [*overrides, f"seed={s}"], eval_rounds="last",
                        samples=ev["samples"], tstr_samples=ev["tstr_samples"], tstr_min_steps=ev["tstr_min_steps"],
                        every_client=True, quiet=args.quiet, jobs=args.jobs)
            print(f"grid done in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    except HuscfError as e:
        raise SystemExit(f"bench_quality: {e}") from None
    print(summarise(out, args.seeds, args.methods))
    print("\npublished (HuSCF-GAN, 20 clients per domain, width 1, 50 rounds; scenarios 1-6): TSTR accuracy % "
          + "; ".join(f"{d} {v}" for d, v in PAPER_TSTR.items()))


if __name__ == "__main__":
    main()
