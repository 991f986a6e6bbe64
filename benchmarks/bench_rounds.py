"""Does a round train as fast after the round ends have started clustering as before? Seconds per
iteration of every round of the default run, for several methods and engines.

Run:  python benchmarks/bench_rounds.py                       # the default set (~8 min, 2 cores)
      python benchmarks/bench_rounds.py --runs huscf fedgan --rounds 8
      python benchmarks/bench_rounds.py --set train.local_epochs=1
      python benchmarks/bench_rounds.py --runs huscf-batched huscf-batched-shared --repeats 3

Each run is the default config of ``huscf train`` (two digit domains, 4 clients each, width 0.25,
MILP cuts, the checkpoint writer as shipped) for ``--rounds`` rounds, trained through
``Trainer.fit`` in its own subprocess (so that no run inherits another's threads). From its
metrics.jsonl it reads each round's ``train_seconds / iterations`` (the round end is not in it).

The default config's round ends cluster from round ``warmup_rounds + 1`` = 3 on, so rounds 4.. are
the ones trained after a clustered round end. Printed per run: seconds per iteration of every
round, and **ratio = slowest round after clustering / mean of the rounds before it** (rounds 2..3:
round 1 is left out of the mean, since its first iterations also build oneDNN's kernels).
Target: ratio <= 1.1 for every run. Methods that never cluster (FedGAN) are split at the same round.
With ``--repeats N`` the whole set runs N times, interleaved (one slow spell of the machine then
hits every run alike), and a run with a ``-shared`` twin gets the paired ratio of their mean s/iter
after clustering per repeat: what a body per cluster costs.

Runs (``--runs``):
  before         huscf on the loop engine with the checkpoint writer at torch's default threads,
                 as before issue 19: the baseline, measured in the same session
  huscf          huscf, the per-client loop (the CPU default; a server body per cluster)
  huscf-shared   huscf with one shared server body (``federation.server_body=shared``): the
                 baseline for the per-cluster bodies' cost, printed as their ratio after clustering
  huscf-batched  huscf, batched clients (``compute.clients=batched``)
  huscf-batched-shared  the same with one shared server body
  fedgan         the FedGAN baseline (FedAvg round ends)
  huscf-ray      huscf on the Ray engine (client and server actors on this machine)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RUNS = {
    "before": [],
    "huscf": [],
    "huscf-shared": ["federation.server_body=shared"],
    "huscf-batched": ["compute.clients=batched"],
    "huscf-batched-shared": ["compute.clients=batched", "federation.server_body=shared"],
    "fedgan": ["method=fedgan"],
    "huscf-ray": ["runtime.engine=ray"],
}
DEFAULT_RUNS = ["before", "huscf", "huscf-shared", "huscf-batched", "fedgan", "huscf-ray"]


def _one(name: str, rounds: int, overrides: list[str], out: Path) -> None:
    """Train one run in this process and print its rows as one JSON line."""
    import huscf.rundir.files as rundir
    from huscf.config import build_config
    from huscf.rundir import RunDir
    from huscf.trainer import Trainer

    if name == "before":
        rundir.WRITER_THREADS = None  # the writer thread at torch's default threads (before issue 19)
    cfg = build_config(None, [f"train.rounds={rounds}", *RUNS[name], *overrides])
    Trainer.new(cfg, out, quiet=True).fit()
    rows = RunDir(out).read_rounds()
    print(json.dumps({"name": name, "warmup": cfg.federation.warmup_rounds,
                      "per_iter": [r.train_seconds / r.iterations for r in rows],
                      "clusters": [r.num_clusters for r in rows]}))


def ratio(per_iter: list[float], first_clustered: int) -> tuple[float, float, float]:
    """(mean s/iter of rounds 2..first_clustered, slowest s/iter after it, their ratio)."""
    before = per_iter[1:first_clustered]
    after = per_iter[first_clustered:]
    if not before or not after:
        raise SystemExit(f"need rounds before and after round {first_clustered}: raise --rounds")
    mean = sum(before) / len(before)
    return mean, max(after), max(after) / mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", choices=list(RUNS), default=DEFAULT_RUNS)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=1, help="run the set this many times, interleaved")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every run (as huscf train --set)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one in this process
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        _one(args.one, args.rounds, args.set, Path(args.out))
        return
    if args.rounds < 5:
        raise SystemExit("bench_rounds: --rounds must be at least 5 (rounds 2-3 before clustering, 4.. after)")
    if args.repeats < 1:
        raise SystemExit("bench_rounds: --repeats must be at least 1")

    import torch
    print(f"default config, {args.rounds} rounds, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}; s/iter = train_seconds / iterations of each round")
    results: dict[str, list[dict]] = {}  # name -> one result per repeat
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.repeats):  # repeats interleave the runs, so a slow spell hits them alike
            for name in args.runs:
                cmd = [sys.executable, __file__, "--one", name, "--out", str(Path(tmp) / f"{name}_{k}"),
                       "--rounds", str(args.rounds), *[a for s in args.set for a in ("--set", s)]]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                if proc.returncode != 0 or not lines:
                    print(f"{name}: failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
                    continue
                res = json.loads(lines[-1])
                results.setdefault(name, []).append(res)
                mean, worst, r = ratio(res["per_iter"], res["warmup"] + 1)
                rounds = " ".join(f"{s:.3f}" for s in res["per_iter"])
                label = name if args.repeats == 1 else f"{name} #{k + 1}"
                print(f"{label:14s} s/iter by round: {rounds}   clusters: {res['clusters']}", flush=True)
                print(f"{'':14s} before clustering (rounds 2-{res['warmup'] + 1}) {mean:.3f}, slowest after "
                      f"{worst:.3f}: ratio {r:.2f}x "
                      f"{'(target <= 1.1x: met)' if r <= 1.1 else '(target <= 1.1x: MISSED)'}", flush=True)

    def after(name: str) -> list[float]:
        """Mean s/iter of the rounds after clustering, one value per repeat."""
        return [sum(r["per_iter"][r["warmup"] + 1:]) / len(r["per_iter"][r["warmup"] + 1:]) for r in results[name]]

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    if "before" in results and "huscf" in results:
        print(f"rounds after clustering, mean s/iter: before the fix {mean(after('before')):.3f}, "
              f"now {mean(after('huscf')):.3f}")
    for name in [n for n in results if f"{n}-shared" in results]:  # a body per cluster against one
        pairs = [a / b for a, b in zip(after(name), after(f"{name}-shared"))]
        print(f"{name}: rounds after clustering, mean s/iter: a body per cluster {mean(after(name)):.3f}, one shared "
              f"body {mean(after(f'{name}-shared')):.3f}: ratio {mean(pairs):.2f}x"
              + (f" (repeats {' '.join(f'{p:.2f}' for p in pairs)})" if len(pairs) > 1 else ""))

if __name__ == "__main__":
    main()
