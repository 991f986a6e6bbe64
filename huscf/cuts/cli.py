"""The ``huscf cuts`` subcommand: choose every client's cuts and print the latency model's verdict.

The main CLI calls ``add_parser(subparsers)`` to register the subcommand and ``run(args)`` to
execute it; input problems raise ``HuscfError``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter, defaultdict

from huscf.cuts.devices import DeviceProfile, assign_devices, load_profiles
from huscf.cuts.latency import resolve_arch
from huscf.cuts.search import SOLVERS, plan_cuts
from huscf.errors import HuscfError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("cuts", help="choose the cut points of every client (latency model)",
                              description="Choose each client's cuts (hg, tg, hd, td) minimising "
                                          "alpha * (total - server) + gamma * server latency per iteration.")
    p.add_argument("--profiles", default="paper", help="'paper' (shipped profiles) or a YAML file")
    p.add_argument("--clients", type=int, required=True, help="number of clients")
    p.add_argument("--method", choices=sorted(SOLVERS), default="milp")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--arch", default="cgan28")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--gamma", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--assignment", default="round_robin",
                   help="round_robin, shuffle, or a comma-separated device name/index per client")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    # widths, batches and weights that make a plan: finite, and positive where a size is meant
    for flag, value, low in (("--width", args.width, "positive"), ("--batch", args.batch, "positive"),
                             ("--clients", args.clients, "positive"), ("--alpha", args.alpha, "non-negative"),
                             ("--gamma", args.gamma, "non-negative")):
        if not math.isfinite(value) or (value <= 0 if low == "positive" else value < 0):
            raise HuscfError(f"huscf cuts {flag} must be a finite {low} number, got {value}")
    server, profiles = load_profiles(args.profiles)
    how = args.assignment  # a policy, or a device name or index per client
    if how not in ("round_robin", "shuffle"):
        how = [int(k) if k.strip().isdigit() else k.strip() for k in how.split(",")]
    devices = assign_devices(profiles, args.clients, how, seed=args.seed)
    arch = resolve_arch(args.arch, args.width)
    plan = plan_cuts(arch, args.batch, devices, server, method=args.method,
                     alpha=args.alpha, gamma=args.gamma, seed=args.seed)
    rep = plan.report
    if args.json:
        out = {"method": plan.method, "arch": arch.name, "width": arch.width, "batch": args.batch,
               "num_clients": len(devices), "seed": args.seed, "solve_seconds": plan.solve_seconds,
               "clients": [{"client": i, "device": d.name, "cuts": c._asdict(), "bytes_per_iteration": b}
                           for i, (d, c, b) in enumerate(zip(devices, plan.cuts, rep.bytes_per_client))],
               "latency": rep.to_dict()}
        print(json.dumps(out, indent=2))
        return 0
    print(f"huscf cuts: {arch.name} (width {arch.width:g}), batch {args.batch}, {len(devices)} clients, "
          f"method {plan.method} ({plan.solve_seconds:.3f} s)")
    print("\ncuts per device (hg tg hd td: middle blocks of G and D kept on the client head / tail)")
    print(f"  {'device':<12} {'MFLOP/s':>10} {'rate B/s':>10} {'clients':>7}  {'cuts':<22} {'MB/client/iter':>14}")
    rows: dict[DeviceProfile, Counter] = defaultdict(Counter)  # device kinds in order of first client
    traffic: dict[tuple, int] = {}
    for d, c, b in zip(devices, plan.cuts, rep.bytes_per_client):
        rows[d][tuple(c)] += 1
        traffic[d, tuple(c)] = b
    for d, counts in rows.items():
        for k, (cut, n) in enumerate(sorted(counts.items())):
            head = (f"  {d.name:<12} {d.cpu_mhz * d.flops_per_cycle:>10.0f} {d.data_rate:>10.3g} "
                    f"{sum(counts.values()):>7}" if k == 0 else " " * 43)
            print(f"{head}  {' '.join(map(str, cut)) + f'  x{n}':<22} {traffic[d, cut] / 1e6:>14.2f}")
    print("\nlatency per iteration (seconds; each stage waits for its slowest participant)")
    for stage, seconds in rep.stages.items():
        print(f"  {stage:<14} {seconds:>10.4f}")
    print(f"  {'total':<14} {rep.total_s:>10.4f}   (server {rep.server_s:.4f}, rest {rep.client_s:.4f})")
    print(f"  {'objective':<14} {rep.objective:>10.4f}   = {rep.alpha:g} * rest + {rep.gamma:g} * server")
    return 0
