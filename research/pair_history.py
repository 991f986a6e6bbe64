"""Issue 32 research: does a client's history help? On the rounds saved by
``research/pair_states.py``, each clustered round is clustered (shipped k rule; the graph of 10
neighbours in 20 components that was the default when the rounds were saved, and 5 in 50, the
default since) on its own affinity, and on the mean of the affinities of this run's clustered rounds so far (round 3
alone, the mean of rounds 3 and 4, the mean of rounds 3 to 5). If the misses were one round's noise,
the mean would find more; if a pair fails to prefer each other in every round, it would not.

Run:  python research/pair_history.py DIR [DIR ...] [--settings 5h 7 7h 2hx4]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from huscf.federation.clustering import neighbour_affinity, spectral_clusters  # noqa: E402
from pair_rules import found_domains, load, saved_rounds  # noqa: E402


GRAPHS = {"10 nb, 20 comp": (10, 20), "5 nb, 50 comp": (5, 50)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--settings", nargs="*", default=None)
    args = ap.parse_args()
    history: dict[tuple, list[np.ndarray]] = defaultdict(list)
    rounds: dict[str, int] = defaultdict(int)
    found = defaultdict(lambda: [0, 0])  # (setting, graph): found on the round alone, on the mean so far
    for f, setting, seed, _ in saved_rounds(args.dirs, args.settings):  # a run's rounds in order
        r = load(f)
        truth = r["truth"]
        rounds[setting] += 1
        for graph, (neighbours, dims) in GRAPHS.items():
            a = neighbour_affinity(r["samples"], neighbours, dims, seed=0)
            history[setting, seed, graph].append(a)
            counts = found[setting, graph]
            counts[0] += found_domains(truth, spectral_clusters(a).labels)
            counts[1] += found_domains(truth, spectral_clusters(np.mean(history[setting, seed, graph], 0)).labels)
    print("clustered rounds found (ARI >= 0.9; one domain: one cluster) by the shipped k rule, on the round's "
          "own graph ('alone') and on the mean of the run's graphs so far ('mean')")
    print(f"{'setting':<8} {'rounds':>6} | " + " | ".join(f"{g + ': alone':>21} {'mean':>5}" for g in GRAPHS))
    for setting, n in rounds.items():
        print(f"{setting:<8} {n:>6} | " + " | ".join(f"{found[setting, g][0]:>21} {found[setting, g][1]:>5}"
                                                      for g in GRAPHS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
