"""Cut selection on the paper's device profiles: MILP vs GA vs naive policies, as a table.

Run: python benchmarks/bench_cuts.py [--arch cgan28] [--batch 64] [--sizes 8 20 80 200] [--jitter]
Latencies are the objective alpha * (total - server) + gamma * server of one iteration, in seconds.
``--jitter`` perturbs every client's device by +-20 % so no two clients are identical (the GA then
searches one gene pair per client instead of one per device kind).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from huscf.cuts import assign_devices, load_profiles
from huscf.cuts.latency import build_model
from huscf.cuts.search import solve_ga, solve_milp


def timed(fn, *args, **kw):
    start = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - start


def naive(model, rng):
    """Objectives of all-minimal cuts, all-maximal cuts (M-1 middle blocks kept, head gets the
    extra one) and one uniformly random valid configuration per client."""
    n = model.num_clients
    out = []
    for policy in ("min", "max", "random"):
        genes = []
        for net in ("g", "d"):
            pairs = model.tables[net].pairs
            if policy == "min":
                k = np.zeros(n, int)
            elif policy == "max":
                m = max(h + t for h, t in pairs)
                k = np.full(n, pairs.index(((m + 1) // 2, m // 2)))
            else:
                k = rng.integers(0, len(pairs), n)
            genes.append(k)
        out.append(model.objective(*genes)[0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="cgan28")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 20, 80, 200])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jitter", action="store_true")
    args = ap.parse_args()
    server, devices = load_profiles("paper")
    rng = np.random.default_rng(args.seed)
    build_model(args.arch, args.batch, devices[:1], server)  # profile once (cached) outside the timings
    print(f"{args.arch}, batch {args.batch}, paper profiles (round robin){', jittered +-20%' if args.jitter else ''}; "
          "latency = objective (s/iteration), alpha=1, gamma=0.5\n")
    head = (f"{'N':>4} | {'MILP s/it':>9} {'MILP time':>9} {'per-client':>10} | {'GA s/it':>9} {'GA time':>8} "
            f"{'GA gap':>7} | {'all-min':>8} {'all-max':>8} {'random':>8} | {'best naive / MILP':>17}")
    print(head)
    print("-" * len(head))
    for n in args.sizes:
        fleet = assign_devices(devices, n)
        if args.jitter:
            fleet = [replace(d, name=f"{d.name}.{i}", cpu_mhz=d.cpu_mhz * rng.uniform(0.8, 1.2),
                             data_rate=d.data_rate * rng.uniform(0.8, 1.2)) for i, d in enumerate(fleet)]
        model = build_model(args.arch, args.batch, fleet, server)
        milp, t_milp = timed(solve_milp, model)
        _, t_flat = timed(solve_milp, model, aggregate=False)
        ga, t_ga = timed(solve_ga, model, seed=args.seed)
        best, found = model.objective(*milp)[0], model.objective(*ga)[0]
        lo, hi, rnd = naive(model, rng)
        print(f"{n:>4} | {best:>9.4f} {t_milp:>8.3f}s {t_flat:>9.3f}s | {found:>9.4f} {t_ga:>7.2f}s "
              f"{100 * (found / best - 1):>6.2f}% | {lo:>8.4f} {hi:>8.4f} {rnd:>8.4f} | "
              f"{min(lo, hi, rnd) / best:>16.2f}x")
    print("\nMILP time: one one-hot per group of identical devices; per-client: one one-hot per client.")


if __name__ == "__main__":
    main()
