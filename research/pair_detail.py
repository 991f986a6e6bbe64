"""Issue 32 research: for saved rounds (``research/pair_states.py``), the current rule's view of each
round: eigenvalues, the k it took and its note, and for the true partition (and the k-fixed one)
the cohesion of every cluster and the separation, and each client's share of votes per client.

Run:  python research/pair_detail.py DIR [DIR ...] [--settings 7 7h] [--only-misses | --pairs]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

from huscf.federation.clustering import cohesion, neighbour_affinity, separation, spectral_clusters  # noqa: E402
from pair_rules import load, saved_rounds, votes  # noqa: E402


def pairs(args) -> int:
    """Per setting and domain, the affinity between the domain's two clients (how many times
    chance's votes they send each other): over all rounds, per clustered round, and split by
    whether the smaller member keeps fewer than 128 samples."""
    from collections import defaultdict
    rows = defaultdict(list)
    for f, setting, _, rnd in saved_rounds(args.dir, args.settings):
        r = load(f)
        a = neighbour_affinity(r["samples"], args.neighbours, args.components)
        for dom in dict.fromkeys(r["domains"].tolist()):
            m = np.flatnonzero(r["domains"] == dom)
            if len(m) == 2:
                kept = min(len(r["samples"][i]) for i in m)
                rows[setting, dom].append((a[m[0], m[1]], rnd, kept))
    print(f"{'setting':<8} {'domain':<14} {'pairs':>5} {'min':>5} {'q10':>5} {'median':>6} | median by round"
          f"{'':<10} | median, smaller member keeps < 128 / >= 128 samples")
    for (setting, dom), v in rows.items():
        c = np.array([x[0] for x in v])
        by_round = " ".join(f"{rnd}:{np.median([x[0] for x in v if x[1] == rnd]):.2f}"
                            for rnd in sorted({x[1] for x in v}))
        few = [x[0] for x in v if x[2] < 128]
        many = [x[0] for x in v if x[2] >= 128]
        print(f"{setting:<8} {dom:<14} {len(c):>5} {c.min():5.2f} {np.quantile(c, .1):5.2f} {np.median(c):6.2f} | "
              f"{by_round:<24} | {np.median(few) if few else float('nan'):.2f} ({len(few)}) / "
              f"{np.median(many) if many else float('nan'):.2f} ({len(many)})")
    return 0


def ranges(args) -> int:
    """Per setting: with several domains, the true partition's separation and its clusters'
    cohesion; with one domain, the most separated of the spectral splits into k = 2..8 clusters
    (every cluster of two or more clients) and that split's lowest cohesion. Counts: rounds."""
    from collections import defaultdict
    seps, cohs = defaultdict(list), defaultdict(list)
    for f, setting, _, _ in saved_rounds(args.dir, args.settings):
        r = load(f)
        truth = r["truth"]
        a = neighbour_affinity(r["samples"], args.neighbours, args.components)
        if truth.max() > 0:
            seps[setting].append(separation(a, truth))
            cohs[setting] += [c for c in cohesion(a, truth) if c is not None]
            continue
        best = None
        for k in range(2, min(8, len(a) - 1) + 1):
            lab = spectral_clusters(a, k).labels
            s = separation(a, lab) if len(set(lab.tolist())) == k else None
            if s is not None and (best is None or s < best[0]):
                best = (s, min(cohesion(a, lab)))
        if best is not None:
            seps[setting].append(best[0])
            cohs[setting].append(best[1])
    print("several domains: the true partition's separation, and its clusters' cohesion; one domain: the most "
          "separated split into 2..8 clusters of two or more clients, and its lowest cohesion")
    for setting in seps:
        s, c = np.array(seps[setting]), np.array(cohs[setting])
        print(f"{setting:<6} rounds {len(s):>3} | separation {s.min():.2f}-{s.max():.2f} (median {np.median(s):.2f}; "
              f"{(s < 0.55).sum()} below 0.55) | cohesion {c.min():.2f}-{c.max():.2f} (median {np.median(c):.2f})")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", nargs="+")
    ap.add_argument("--settings", nargs="*", default=None)
    ap.add_argument("--only-misses", action="store_true")
    # the defaults are the graph of 2026-12-07 before 5 neighbours in 50 components became huscf's
    # default: the kept outputs were made with them
    ap.add_argument("--neighbours", type=int, default=10)
    ap.add_argument("--components", type=int, default=20)
    ap.add_argument("--pairs", action="store_true",
                    help="instead: per domain of two clients, its members' affinity by round and by kept samples")
    ap.add_argument("--ranges", action="store_true",
                    help="instead: per setting, the ranges of the measures the rule's thresholds sit between")
    args = ap.parse_args()
    if args.pairs:
        return pairs(args)
    if args.ranges:
        return ranges(args)
    for f, *_ in saved_rounds(args.dir, args.settings):
        r = load(f)
        truth = r["truth"]
        kd = truth.max() + 1
        a = neighbour_affinity(r["samples"], args.neighbours, args.components)
        res = spectral_clusters(a)
        ari = adjusted_rand_score(truth, res.labels) if kd > 1 else float(res.k == 1)
        if args.only_misses and ari >= 0.9:
            continue
        fx = spectral_clusters(a, kd)
        c_true = cohesion(a, truth)
        print(f"{f.stem:<14} k={res.k} ARI {ari:.2f} eig {' '.join(f'{v:.2f}' for v in res.eigenvalues[:6])}"
              f" | kept {[len(s) for s in r['samples']]}")
        print(f"    truth: cohesion {' '.join('-' if v is None else f'{v:.2f}' for v in c_true)} "
              f"sep {separation(a, truth) or float('nan'):.2f} | fixed-k ARI "
              f"{adjusted_rand_score(truth, fx.labels):.2f} | note: {res.note[:150]}")
        v, _ = votes(r["samples"], args.neighbours, args.components)
        share = v / v.sum(1, keepdims=True)
        for i, row in enumerate(share):
            print(f"    client {i} ({r['domains'][i]}, {r['sizes'][i]} images, missing classes "
                  f"{r['excluded'][i] or 'none'}) votes: "
                  + " ".join(f"{x:.2f}" for x in row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
