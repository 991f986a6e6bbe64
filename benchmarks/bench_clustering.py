"""Does the round-end clustering find the domains? A grid of reduced paper scenarios, and the time
a round end takes at 80 clients.

Run:  python benchmarks/bench_clustering.py                       # the default grid (~15 min, 2 cores)
      python benchmarks/bench_clustering.py --scenarios 4 7 --clients 3 5 --seeds 0 1 2
      python benchmarks/bench_clustering.py --timing-only            # only the 80-client round end

The grid's runs are independent: ``--jobs`` (default ``auto``: one per core) runs that many at once,
each in its own process on its share of the cores (``--jobs 1``: one after the other, every core
each). The rows print in grid order whichever finishes first.

1. For every (scenario, clients per domain, seed): the shipped paper config
   (``configs/N_*.yaml``) reduced to width 0.25, ``--rounds`` rounds of one local epoch of at most
   ``--iters`` iterations, the first ``--limit`` training images of each domain, and seeded
   *random* cuts (heterogeneous, and unrelated to the domains). It trains through ``Trainer.fit``
   and reads every clustered round's k and ARI against the true domains from metrics.jsonl. On the
   very same round states it also runs the previous rule (k-means on whitened means, k by
   silhouette, ``federation.cluster_on: means``) and the default rule with k fixed to the number of
   domains, so the three are compared on identical features.
2. The round end at 80 clients (4 domains x 20, width 0.25, the default 256 samples per client):
   ``federate`` with the samples rule against the means rule, measured in the same run on the same
   synthetic features; the ratio is printed.

The data must be in $HUSCF_DATA (or --data-dir); a missing file is one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

from huscf.config import load_config  # noqa: E402
from huscf.engines.threads import plan_jobs, run_parallel  # noqa: E402
from huscf.errors import HuscfError  # noqa: E402
from huscf.federation.features import FeatureStats  # noqa: E402
from huscf.federation.rounds import federate  # noqa: E402
from huscf.federation.strategies import ClusteredKLD  # noqa: E402
from huscf.models.cgan import build_architecture  # noqa: E402
from huscf.rundir import RunDir  # noqa: E402
from huscf.split.plan import Cuts  # noqa: E402
from huscf.split.segments import SplitGAN  # noqa: E402
from huscf.trainer import Trainer  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "huscf" / "configs"


class _AlsoScore:
    """Wraps the run's strategy: aggregates with it, and on the same round state also clusters with
    the other rules (their labels go to ``seen``, nothing else changes)."""

    def __init__(self, strategy: ClusteredKLD, num_domains: int):
        self.inner, self.seen = strategy, []
        self.name, self.uses_client_params = strategy.name, strategy.uses_client_params
        self.means = ClusteredKLD(clusters="auto", cluster_on="means", max_clusters=strategy.max_clusters,
                                  min_silhouette=strategy.min_silhouette)
        self.fixed = ClusteredKLD(clusters=num_domains, cluster_on="samples", neighbours=strategy.neighbours)

    def aggregate(self, state):
        agg = self.inner.aggregate(state)
        if agg.info.get("phase") == "clustered":
            self.seen.append({"means": self.means.cluster(state)[0], "fixed": self.fixed.cluster(state)[0]})
        return agg


def run_one(scenario: str, clients: int, seed: int, args) -> list[dict]:
    path = next(CONFIGS.glob(f"{scenario}_*.yaml"), None)
    if path is None:
        raise HuscfError(f"no shipped config for scenario {scenario} in {CONFIGS}")
    cfg = load_config(path, [
        f"data.clients_per_domain={clients}", f"data.limit_per_domain={args.limit}", "model.width=0.25",
        f"train.rounds={args.rounds}", "train.local_epochs=1", f"train.max_iters_per_epoch={args.iters}",
        "train.batch_size=32", "cuts.method=random", f"seed={seed}", "output.samples_every=0",
        f"federation.warmup_rounds={args.warmup}", "compute.device=cpu",
    ], args.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        t = Trainer.new(cfg, Path(tmp) / "run", quiet=True)
        domains = np.array([c.domain for c in t.setup.data])
        wrapped = _AlsoScore(t.strategy, len(set(domains)))
        t.strategy = wrapped
        t.fit()
        rows = RunDir(Path(tmp) / "run").read_rounds()
    out = []
    for row, other in zip([r for r in rows if r.federation["phase"] == "clustered"], wrapped.seen):
        out.append({"round": row.round, "k": row.num_clusters, "ari": row.ari_vs_domains,
                    "eig": row.federation.get("eigenvalues", []),
                    "k_means": other["means"].k, "ari_means": adjusted_rand_score(domains, other["means"].labels),
                    "ari_fixed": adjusted_rand_score(domains, other["fixed"].labels)})
    return out


def _timed_run(cell: tuple) -> tuple[list[dict], float]:
    """(run_one's rows, its seconds) for one (scenario, clients, seed, args)."""
    start = time.perf_counter()
    return run_one(*cell), time.perf_counter() - start


def grid(args) -> None:
    print(f"clustering grid: width 0.25, {args.rounds} rounds ({args.warmup} FedAvg warm-up) x 1 epoch x <= "
          f"{args.iters} iterations, batch 32, first {args.limit} images per domain, random cuts; "
          f"true k = number of domains")
    print(f"{'scen':>4} {'cpd':>3} {'seed':>4} {'round':>5} | {'k':>2} {'ARI':>5} {'eigenvalues':<34} | "
          f"{'means k':>7} {'ARI':>5} | {'fixed-k ARI':>11}")
    summary: dict[tuple[str, int], list[dict]] = {}
    cells = [(scenario, clients, seed) for scenario in args.scenarios for clients in args.clients
             for seed in args.seeds]
    jobs, threads = plan_jobs(args.jobs, len(cells))
    if jobs > 1:
        print(f"({len(cells)} runs, {jobs} at a time, {threads} torch thread{'s' if threads > 1 else ''} each)")
        done = {}
        for k, result in run_parallel(_timed_run, [(*cell, args) for cell in cells], jobs, threads):
            done[k] = result
            print(f"  ({len(done)}/{len(cells)} done: scenario {cells[k][0]}, {cells[k][1]} clients per domain, "
                  f"seed {cells[k][2]}, {result[1]:.0f} s)", file=sys.stderr, flush=True)
        results = [done[k] for k in range(len(cells))]
    else:
        results = (_timed_run((*cell, args)) for cell in cells)
    for (scenario, clients, seed), (rows, seconds) in zip(cells, results):
        for r in rows:
            eig = " ".join(f"{v:.2f}" for v in r["eig"][:6])
            print(f"{scenario:>4} {clients:>3} {seed:>4} {r['round']:>5} | {r['k']:>2} {r['ari']:5.2f} "
                  f"{eig:<34} | {r['k_means']:>7} {r['ari_means']:5.2f} | {r['ari_fixed']:11.2f}", flush=True)
        summary.setdefault((scenario, clients), []).extend(rows)
        print(f"     ({seconds:.0f} s)", flush=True)
    print("\nsummary (every clustered round of every seed):")
    print(f"{'scen':>4} {'cpd':>3} {'rounds':>6} | {'k found':<12} {'min ARI':>7} | {'means: k':<12} {'min ARI':>7} "
          f"| {'fixed-k min ARI':>15}")
    for (scenario, clients), rows in summary.items():
        ks = sorted({r["k"] for r in rows})
        kms = sorted({r["k_means"] for r in rows})
        print(f"{scenario:>4} {clients:>3} {len(rows):>6} | {str(ks):<12} {min(r['ari'] for r in rows):7.2f} | "
              f"{str(kms):<12} {min(r['ari_means'] for r in rows):7.2f} | "
              f"{min(r['ari_fixed'] for r in rows):15.2f}")


def round_end_timing(args) -> None:
    """federate() at 80 clients on synthetic activations of the real shape at the common depth."""
    torch.manual_seed(0)
    arch = build_architecture("cgan28", 0.25)
    rng = np.random.default_rng(0)
    cuts = [Cuts(*(int(c) for c in rng.integers(0, 2, 4))) for _ in range(80)]
    g, d = arch.generator(), arch.discriminator()
    depth = max(c.hd for c in cuts) + 1
    with torch.no_grad():
        shape = d.run(0, depth + 1, arch.discriminator_inputs(2)).shape[1:]  # D's activation after block `depth`
    model = SplitGAN(g, d, cuts)
    feats = FeatureStats(80)
    for i in range(80):
        centre = torch.randn(1, *shape) * (1 + i % 4)
        for _ in range(8):  # 8 batches of 32: the default 256 samples kept per client
            feats.add(i, centre + torch.randn(32, *shape))
    sizes = np.full(80, 750)
    times = {}
    for rule in ("means", "samples"):
        strategy = ClusteredKLD(warmup_rounds=0, cluster_on=rule)
        federate(model, strategy, sizes, 5, 0, feats)  # warm-up (imports, allocations)
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            federate(model, strategy, sizes, 5, 0, feats)
            runs.append(time.perf_counter() - start)
        times[rule] = float(np.median(runs))
    print(f"\nround end at 80 clients (federate: clustering + KLD weights + averaging; width 0.25, features "
          f"{tuple(shape)}, 256 samples per client, median of {args.repeats}, {torch.get_num_threads()} threads):")
    print(f"  means rule (baseline) {times['means']:.3f} s | samples rule {times['samples']:.3f} s | "
          f"ratio {times['samples'] / times['means']:.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", nargs="+", default=["1", "2", "3", "4", "5", "6", "7"])
    ap.add_argument("--clients", nargs="+", type=int, default=[3], help="clients per domain")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--limit", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--timing-only", action="store_true")
    ap.add_argument("--jobs", default="auto", help="grid runs at once (auto: one per core; 1: one after another)")
    args = ap.parse_args()
    try:
        if not args.timing_only:
            grid(args)
        round_end_timing(args)
    except HuscfError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
