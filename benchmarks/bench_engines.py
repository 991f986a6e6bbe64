"""Seconds per iteration of the Ray engine against the simulation engine, on one machine.

Run:  python benchmarks/bench_engines.py [--clients 4 8 16] [--iters 12] [--batch 64]
                                         [--clients-per-actor auto] [--set KEY=VALUE ...]

For each client count it builds the default config (two digit domains, the default quarter-width
cGAN, MILP cuts) with that many clients and batch 64, then times local epochs of the simulation
engine (one process, torch's threads) and of the Ray engine (a local loopback Ray, client hosts
and a server actor, torch threads shared out between them) after one warm-up epoch each. It
prints seconds per iteration, the ratio ray / simulation (target: <= 2 at 8 clients), the Ray
start-up time (actors importing torch and loading their data, excluded from the ratio), and the
cut-layer bytes that crossed per iteration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from huscf.config import build_config  # noqa: E402
from huscf.trainer import Trainer  # noqa: E402


def _seconds_per_iteration(engine, iters: int) -> float:
    """Warm-up epoch, then timed epochs until ``iters`` iterations have run."""
    engine.run_epoch(0, 0)
    done, spent, e = 0, 0.0, 1
    while done < iters:
        n = engine.iterations_per_epoch()
        start = time.perf_counter()
        engine.run_epoch(0, e)
        spent += time.perf_counter() - start
        done += n
        e += 1
    return spent / done


def measure(clients: int, iters: int, batch: int, per_actor: str, extra: list[str], tmp: Path) -> dict:
    overrides = [f"data.clients_per_domain={clients // 2}", f"train.batch_size={batch}",
                 "output.samples_every=0", *extra]
    sim = Trainer(build_config({}, overrides), tmp / f"sim{clients}", quiet=True)
    t_sim = _seconds_per_iteration(sim.engine, iters)

    start = time.perf_counter()
    cfg = build_config({}, [*overrides, "runtime.engine=ray", f"runtime.clients_per_actor={per_actor}"])
    (tmp / f"ray{clients}").mkdir()
    ray_trainer = Trainer(cfg, tmp / f"ray{clients}", quiet=True)
    startup = time.perf_counter() - start
    eng = ray_trainer.engine
    t_ray = _seconds_per_iteration(eng, iters)
    n_iters = sum(eng._done) / clients  # iterations each client ran, warm-up included
    eng.round_events()  # writes this run's audit lines
    rows = [json.loads(line) for line in eng.audit_path.read_text().splitlines()]
    cut = sum(r["bytes"] for r in rows if r["kind"] in ("activation", "gradient") and r["name"] != "meta")
    return {"clients": clients, "actors": len(eng.groups), "threads_per_actor": eng.spec.threads,
            "sim_s_per_iter": t_sim, "ray_s_per_iter": t_ray, "ratio": t_ray / t_sim, "ray_startup_s": startup,
            "cut_MB_per_iter": cut / n_iters / 1e6, "_trainer": ray_trainer}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--clients-per-actor", default="auto")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    import ray
    import torch

    print(f"torch {torch.__version__}, ray {ray.__version__}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}; default config, batch {args.batch}, {args.iters} timed iterations")
    print(f"{'clients':>7} {'actors':>6} {'thr/actor':>9} {'sim s/it':>9} {'ray s/it':>9} {'ray/sim':>8} "
          f"{'startup s':>9} {'cut MB/it, all clients':>22}")
    results = []
    with tempfile.TemporaryDirectory() as d:
        for n in args.clients:
            r = measure(n, args.iters, args.batch, args.clients_per_actor, args.set, Path(d))
            r.pop("_trainer").engine.close()
            results.append(r)
            print(f"{r['clients']:>7} {r['actors']:>6} {r['threads_per_actor']:>9} {r['sim_s_per_iter']:>9.4f} "
                  f"{r['ray_s_per_iter']:>9.4f} {r['ratio']:>8.2f} {r['ray_startup_s']:>9.1f} "
                  f"{r['cut_MB_per_iter']:>22.2f}", flush=True)
    at8 = [r for r in results if r["clients"] == 8]
    if at8:
        verdict = "met" if at8[0]["ratio"] <= 2 else "NOT met"
        print(f"target ray <= 2x simulation at 8 clients: {at8[0]['ratio']:.2f}x ({verdict})")


if __name__ == "__main__":
    main()
