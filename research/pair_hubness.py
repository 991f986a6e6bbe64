"""Issue 32 research: is the weak pair a hubness effect? "KMNIST sits close to everything": if some
samples are the nearest neighbours of many (hubs), they draw votes away from a weak pair. CSLS
(cross-domain similarity local scaling, Conneau et al. 2018) ranks the neighbours of x by
``2 cos(x, y) - r(x) - r(y)``, r the mean cosine of a sample to its K nearest other-client samples,
which takes hubs down. On the rounds saved by ``research/pair_states.py``, the shipped k rule on
the graph of 5 neighbours in 50 components, by Euclidean distance (the default), by cosine, and by
CSLS (K = 10), and on the graph of 10 in 20 by CSLS.

Run:  python research/pair_hubness.py DIR [DIR ...] [--settings 5h 7 7h 2hx4]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from huscf.federation.clustering import spectral_clusters  # noqa: E402
from pair_rules import found_domains, load, saved_rounds  # noqa: E402
from pair_rules2 import affinity, pooled_components  # noqa: E402


def graphs(samples, dims: int, neighbours: int, hub_k: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """The affinity (``pair_rules2.affinity``, the package's normalisation) of three rankings of
    each sample's other-client neighbours, in the pooled samples' ``dims`` principal components."""
    n = len(samples)
    z, owner, counts = pooled_components(samples, dims, seed)
    own = torch.from_numpy(owner)
    same = own[:, None] == own[None, :]
    zn = torch.nn.functional.normalize(z, dim=1)
    cos = zn @ zn.T
    cos[same] = -float("inf")
    r = cos.topk(hub_k).values.mean(1)  # each sample's mean cosine to its hub_k nearest other-client samples
    scores = {"euclid": -torch.cdist(z, z).masked_fill(same, float("inf")), "cosine": cos,
              "csls": 2 * cos - r[:, None] - r[None, :]}
    bounds = np.cumsum([0, *counts])
    out = {}
    for name, s in scores.items():
        top = owner[s.topk(neighbours).indices.numpy()]
        per = np.zeros((len(z), n))
        np.add.at(per, (np.repeat(np.arange(len(z)), neighbours), top.ravel()), 1)
        out[name] = affinity([per[bounds[i]:bounds[i + 1]] for i in range(n)], counts)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--settings", nargs="*", default=None)
    args = ap.parse_args()
    found: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    rounds: dict[str, int] = defaultdict(int)
    for f, setting, _, _ in saved_rounds(args.dirs, args.settings):
        r = load(f)
        truth = r["truth"]
        rounds[setting] += 1
        for (neighbours, dims) in ((5, 50), (10, 20)):
            for name, a in graphs(r["samples"], dims, neighbours).items():
                if (neighbours, dims) == (10, 20) and name != "csls":
                    continue
                found[setting][f"{neighbours}/{dims} {name}"] += found_domains(truth, spectral_clusters(a).labels)
    names = list(next(iter(found.values())))
    print("clustered rounds found (ARI >= 0.9; one domain: one cluster), shipped k rule; '5/50 euclid' is the "
          "default graph (exact: every kept sample votes)")
    print(f"{'setting':<8} {'rounds':>6} | " + " | ".join(f"{n:>14}" for n in names))
    for setting, n in rounds.items():
        print(f"{setting:<8} {n:>6} | " + " | ".join(f"{found[setting][m]:>14}" for m in names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
