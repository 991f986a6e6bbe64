"""Sharing a machine: the default run alone, beside a busy core, and two default runs at once.

Run:  python benchmarks/bench_contention.py                       # ~5 min on 2 cores
      python benchmarks/bench_contention.py --repeats 3           # interleaved repeats, medians
      python benchmarks/bench_contention.py --set train.threads=1  # a thread policy to compare
      python benchmarks/bench_contention.py --env OMP_WAIT_POLICY=PASSIVE
      python benchmarks/bench_contention.py --engine ray              # client and server actors

Each run is ``huscf train`` with the default config for ``--rounds`` rounds (no sample grids), in
its own process, with ``--set`` and ``--env`` applied to every run. Conditions:

* ``alone``: one run on an otherwise idle machine (the baseline, measured in the same call);
* ``busy``: one run beside one single-threaded busy loop (``python -c "while True: pass"``), as
  an IDE, a notebook or a second job would be;
* ``two``: two runs started together.

Printed per condition: seconds per round (median of the rounds' ``train_seconds`` from
metrics.jsonl, over the repeats and, for ``two``, both runs) and the wall time until every run of
the condition finished, then the ratios against ``alone`` with issue 31's targets on 2 cores: a
round beside a busy core <= 1.6x alone, two runs at once done in <= 2.3x one run's wall time.
The machine's cores, affinity mask and load average before the first run are printed first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import made_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = ("alone", "busy", "two")
TARGETS = {"busy": 1.6, "two": 2.3}  # issue 31, 2 cores: s/round ratio for busy, wall ratio for two


def _train(out: Path, rounds: int, sets: list[str], env: dict, engine: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "huscf.cli", "train", "--out", str(out), "--quiet", "--engine", engine,
           "--set", f"train.rounds={rounds}", "--set", "output.samples_every=0"]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _round_seconds(run_dir: Path) -> list[float]:
    return [float(r["train_seconds"]) for r in _rows(run_dir)]


def _threads(run_dir: Path) -> str:
    """The torch threads of each epoch, as the run recorded them (its driver's, under Ray)."""
    return "/".join(str(n) for r in _rows(run_dir) for n in r.get("threads") or ["?"])


def condition(name: str, work: Path, rounds: int, sets: list[str], env: dict,
              engine: str = "simulation") -> tuple[list[float], float, str]:
    """One condition: (every round's seconds of its runs, wall seconds until all finished, the
    runs' threads per epoch)."""
    busy = None
    if name == "busy":
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)  # the loop is spinning before the run starts
    start = time.perf_counter()
    outs = [work / f"{name}_{k}" for k in range(2 if name == "two" else 1)]
    procs = [_train(out, rounds, sets, env, engine) for out in outs]
    errors = [p.communicate()[1] for p in procs]
    wall = time.perf_counter() - start
    if busy is not None:
        busy.kill()
        busy.wait()
    for p, err in zip(procs, errors):
        if p.returncode != 0:
            raise SystemExit(f"bench_contention: a {name} run failed (exit {p.returncode}): {err.strip()[-500:]}")
    return [s for out in outs for s in _round_seconds(out)], wall, " ".join(_threads(out) for out in outs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats of all conditions")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment of every run")
    p.add_argument("--engine", choices=["simulation", "ray"], default="simulation",
                   help="ray: each run starts its own local Ray with client and server actors")
    args = p.parse_args()
    env = dict(os.environ)
    for item in args.env:
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"bench_contention: --env takes NAME=VALUE, got {item!r}")
        env[key] = value
    print(made_line())
    print(f"cores {os.cpu_count()}, affinity {sorted(os.sched_getaffinity(0))}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; default run ({args.engine}), {args.rounds} rounds; "
          f"set {args.set or 'nothing'}; env {args.env or 'as is'}")
    if args.engine == "ray":
        from huscf.engines.threads import usable_cores
        from huscf.runtime.driver import actor_threads, plan_hosts

        cpus, clients = usable_cores(), 8  # the default config's clients
        given = dict(item.partition("=")[::2] for item in args.set)
        per_actor = given.get("runtime.clients_per_actor", "auto")
        hosts = len(plan_hosts(clients, per_actor if per_actor == "auto" else int(per_actor), cpus))
        threads = actor_threads(given.get("runtime.threads_per_actor", "auto"), cpus, hosts + 1)
        print(f"ray placement: {hosts} client actor(s) + the server, {threads} torch thread(s) each, "
              f"on {cpus} CPUs")
    seconds: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    walls: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    with tempfile.TemporaryDirectory(prefix="huscf-contention-") as tmp:
        for r in range(args.repeats):
            for c in CONDITIONS:
                s, wall, threads = condition(c, Path(tmp) / f"rep{r}", args.rounds, args.set, env, args.engine)
                seconds[c] += s
                walls[c].append(wall)
                print(f"  repeat {r + 1} {c:5s}: rounds {' '.join(f'{x:.1f}' for x in s)} s, wall {wall:.1f} s, "
                      f"threads per epoch {threads}", flush=True)
    med = {c: statistics.median(seconds[c]) for c in CONDITIONS}
    wall = {c: statistics.median(walls[c]) for c in CONDITIONS}
    print(f"\n{'condition':9s} {'s/round':>8s} {'wall s':>8s} {'ratio':>7s}  target")
    print(f"{'alone':9s} {med['alone']:8.2f} {wall['alone']:8.1f} {'1.00x':>7s}")
    busy = med["busy"] / med["alone"]
    print(f"{'busy':9s} {med['busy']:8.2f} {wall['busy']:8.1f} {busy:6.2f}x  s/round <= {TARGETS['busy']}x alone: "
          f"{'met' if busy <= TARGETS['busy'] else 'NOT met'}")
    two = wall["two"] / wall["alone"]
    print(f"{'two':9s} {med['two']:8.2f} {wall['two']:8.1f} {two:6.2f}x  wall <= {TARGETS['two']}x alone: "
          f"{'met' if two <= TARGETS['two'] else 'NOT met'}")


if __name__ == "__main__":
    main()
