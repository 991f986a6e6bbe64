"""Issue 32 research: does a client's history help? On the rounds saved by
``research/pair_states.py``, each clustered round is clustered (shipped graph, shipped k rule) on
its own affinity, and on the mean of the affinities of this run's clustered rounds so far (round 3
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--settings", nargs="*", default=None)
    args = ap.parse_args()
    history: dict[tuple[str, str], list[np.ndarray]] = defaultdict(list)
    found = defaultdict(lambda: [0, 0, 0])  # rounds, found on the round alone, found on the mean so far
    for f, setting, seed, _ in saved_rounds(args.dirs, args.settings):  # a run's rounds in order
        r = load(f)
        truth = np.unique(r["domains"], return_inverse=True)[1]
        a = neighbour_affinity(r["samples"], seed=0)
        history[setting, seed].append(a)
        counts = found[setting]
        counts[0] += 1
        counts[1] += found_domains(truth, spectral_clusters(a).labels)
        counts[2] += found_domains(truth, spectral_clusters(np.mean(history[setting, seed], 0)).labels)
    print("clustered rounds found (ARI >= 0.9; one domain: one cluster), shipped graph and k rule")
    print(f"{'setting':<8} {'rounds':>6} | {'this round':>10} | {'mean of the rounds so far':>25}")
    for setting, (n, alone, mean) in found.items():
        print(f"{setting:<8} {n:>6} | {alone:>10} | {mean:>25}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
