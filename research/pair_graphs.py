"""Issue 32 research: variants of the neighbour graph on the rounds saved by
``research/pair_states.py``, each clustered by the shipped k rule (``spectral_clusters``): the
number of neighbours, the principal components kept, and a degree-corrected vote (votes divided
by what the voter's and the voted-for's totals give, with no self votes, instead of by the
voted-for's share of samples). Faster than ``pair_rules.py`` (one distance matrix per round and
number of dimensions), so it runs on every saved round.

Run:  python research/pair_graphs.py DIR [DIR ...] [--settings 5h 7 7h 2hx4 2x4]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from huscf.federation.clustering import spectral_clusters  # noqa: E402
from pair_rules import degree_affinity, found_domains, load, saved_rounds  # noqa: E402
from pair_rules2 import affinity, votes_by_k  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--settings", nargs="*", default=None)
    args = ap.parse_args()
    found = defaultdict(lambda: defaultdict(list))
    for f, setting, seed, rnd in saved_rounds(args.dirs, args.settings):
        r = load(f)
        truth = r["truth"]
        graphs = {}
        for dims in (20, 50):
            by_k, counts = votes_by_k(r["samples"], (5, 10), dims)
            for k, v in by_k.items():
                graphs[f"k{k} d{dims}"] = affinity(v, counts)
                if dims == 20:
                    graphs[f"k{k} d{dims} degree"] = degree_affinity(np.stack([p.sum(0) for p in v]), counts)
        for name, a in graphs.items():
            found[setting][name].append((found_domains(truth, spectral_clusters(a).labels), f"{seed}/{rnd}"))
    print("rounds found (ARI >= 0.9; one domain: one cluster), the shipped k rule on each graph; "
          "'k10 d20' is the shipped graph")
    names = list(next(iter(found.values())))
    print(f"{'setting':<8} {'rounds':>6} | " + " | ".join(f"{n:>14}" for n in names))
    for setting, per in found.items():
        counts = " | ".join(f"{sum(o for o, _ in per[n]):>14}" for n in names)
        print(f"{setting:<8} {len(per[names[0]]):>6} | {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
