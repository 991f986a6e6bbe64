"""What does secure aggregation cost per round end? Seconds and bytes of one round end with
``federation.secure_aggregation`` against plain averaging, measured in the same run.

Run:  python benchmarks/bench_secagg.py                 # the default model and fleet (~1 min, 2 cores)
      python benchmarks/bench_secagg.py --width 1 --clients 40 --repeats 3   # the paper's scale

The model is the paper's cGAN (``--width``) split for ``--clients`` clients with heterogeneous
cuts (seeded random valid cuts, as ``cuts.method=random``), every copy perturbed so that each
client's weights differ. Each repeat times, on fresh copies of the same model:

* **plain**: ``apply_aggregation`` (the server reads every client's segment and averages);
* **secure**: ``secure_average``, the protocol of ``federation/secagg.py`` in one process (every
  client signs two fresh key pairs, checks its peers' signatures and the plan, Shamir-shares its
  key and a self-mask seed per sum, seals the shares to its peers, masks its weighted blocks with
  its self and pair masks, signs the survivor list and answers the unmasking; the server relays,
  rebuilds the self masks and opens the sums), with no dropout;
* **secure, hidden ends**: the same with ``federation.hide_ends`` (the first and last blocks'
  sums under one more mask that only their members remove);
* **secure, 1 dropped**: the same with one client that shares its keys but never delivers its
  words (the survivors reveal their shares of its key, the server removes its pair masks).

Aggregations: one cluster (FedAvg weights) and two clusters (``--clusters``), the shape HuSCF-GAN's
round ends take. Printed: the median seconds of each, **ratio = secure / plain**, and the bytes a
client sends for aggregation in each mode (plain: its segment as float32; secure: 8-byte words per
value of every block it shares a sum on, plus the protocol's keys, shares, signature and answers,
counted as the JSON they travel in). The result also agrees with
plain averaging (the largest difference over the client blocks, with and without hidden ends, is
printed; 1e-7 is float rounding).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from provenance import made_line  # noqa: E402

from huscf.federation.averaging import apply_aggregation  # noqa: E402
from huscf.federation.secagg import secure_average, secure_sums  # noqa: E402
from huscf.federation.secure import Policy, plan_sums  # noqa: E402
from huscf.federation.strategies import Aggregation  # noqa: E402
from huscf.models import build_architecture  # noqa: E402
from huscf.split.plan import all_cuts  # noqa: E402
from huscf.split.segments import SplitGAN  # noqa: E402


def _model(width: float, clients: int, seed: int) -> SplitGAN:
    torch.manual_seed(seed)
    arch = build_architecture("cgan28", width=width)
    g, d = arch.generator(), arch.discriminator()
    options = all_cuts(g.num_middle, d.num_middle)
    rng = np.random.default_rng(seed)
    cuts = [options[k] for k in rng.integers(0, len(options), clients)]
    m = SplitGAN(g, d, cuts)
    with torch.no_grad():
        for v in m.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.randn_like(v) * 0.01)
    return m


def _timed(fn, *args, **kwargs) -> float:
    t = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=float, default=0.25, help="cGAN width (default 0.25, the default config's)")
    ap.add_argument("--clients", type=int, default=8, help="clients (default 8, the default config's)")
    ap.add_argument("--clusters", type=int, default=2, help="clusters of the clustered aggregation (default 2)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = args.clients
    base = _model(args.width, n, args.seed)
    sizes = np.random.default_rng(args.seed).integers(50, 200, n).astype(float)
    w = sizes / sizes.sum()
    groups = np.arange(n) % args.clusters
    cw = np.array([sizes[i] / sizes[groups == groups[i]].sum() for i in range(n)])
    aggs = {"1 cluster": Aggregation(np.zeros(n, dtype=int), w, w),
            f"{args.clusters} clusters": Aggregation(groups, cw, w)}
    ids = list(range(n))
    params = sum(v.numel() for v in base.state_dict().values() if v.is_floating_point())
    print(f"bench_secagg: cGAN width {args.width}, {n} clients with random heterogeneous cuts, "
          f"{params / 1e6:.2f} M values in all copies, {args.repeats} repeats (median); torch threads "
          f"{torch.get_num_threads()}")
    print(made_line())
    print(f"{'aggregation':<12} {'plain s':>9} {'secure s':>9} {'ratio':>6} {'hidden ends s':>14} {'ratio':>6} "
          f"{'1 dropped s':>12} {'ratio':>6} {'sums':>5} {'max |secure - plain|':>21}")
    for name, agg in aggs.items():
        plain_t, secure_t, hidden_t, drop_t = [], [], [], []
        diff = 0.0
        for _ in range(args.repeats):
            a, b, c, h = (copy.deepcopy(base) for _ in range(4))
            plain_t.append(_timed(apply_aggregation, a, agg))
            secure_t.append(_timed(secure_average, b, agg, ids, 0))
            hidden_t.append(_timed(secure_average, h, agg, ids, 0, Policy(hide_ends=True)))
            drop_t.append(_timed(secure_average, c, agg, ids, 0, drop=frozenset({n - 1})))
            sa = a.state_dict()
            for other in (b.state_dict(), h.state_dict()):
                diff = max(diff, max((sa[k] - other[k]).abs().max().item() for k in sa
                                     if k.startswith("clients.") and sa[k].is_floating_point()))
        p, s, hid, d = (statistics.median(t) for t in (plain_t, secure_t, hidden_t, drop_t))
        sums = len(plan_sums(base, agg, ids, 0).sums)
        print(f"{name:<12} {p:>9.4f} {s:>9.4f} {s / p:>6.1f} {hid:>14.4f} {hid / p:>6.1f} {d:>12.4f} {d / p:>6.1f} "
              f"{sums:>5} {diff:>21.2e}")
    plan = plan_sums(base, aggs["1 cluster"], ids, 0)
    sent: dict[int, int] = {}
    secure_sums(copy.deepcopy(base), plan, Policy(), sent=sent)
    print("bytes one client sends for aggregation (1 cluster):")
    for i in ids:
        plain_b = 4 * sum(v.numel() for v in base.clients[i].state_dict().values() if v.is_floating_point())
        words = sum(8 * sum(v.numel() for v in base.clients[i].nets[s.net][str(s.block)].state_dict().values()
                            if v.is_floating_point()) for s in (plan.sums[k] for k in plan.of(i)))
        print(f"  client {i} cuts {tuple(base.cuts[i])}: plain {plain_b / 1e3:.1f} kB, secure {sent[i] / 1e3:.1f} kB "
              f"(x{sent[i] / plain_b:.2f}; the protocol's steps besides the words: {(sent[i] - words) / 1e3:.1f} kB)")


if __name__ == "__main__":
    main()
