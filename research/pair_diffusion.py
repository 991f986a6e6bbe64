"""Issue 32 research: do weak pairs prefer each other a few steps away? On the rounds saved by
``research/pair_states.py``: the shipped graph's one-step votes (5 nearest other-client samples in
50 principal components) against a random walk on the sample graph. The walk's graph is the same
5 nearest samples but among *all* samples (a client's own included, so a walk can cross its own
classes to reach its domain's other client where its partner holds other classes), made
symmetric; after t steps from client i's samples, the walk's mass on each other client j, over
j's share of the other clients' samples, is A_ij (1: chance, as in the shipped affinity), made
symmetric; then the shipped k rule (``spectral_clusters``). Prints, per setting, the clustered
rounds found (ARI >= 0.9; one domain: one cluster) by each graph.

Fixed before it ran (2026-12-07): steps t = 1, 2, 3 and 4; a graph is worth a held-out test only
if it finds more rounds than the shipped one over 5h, 7 and 7h together and no fewer in any other
setting (one-domain controls 1x4, 2x4, 2hx4, 2hx6; three clients per domain 5h3; 4).

Held out (fixed on 2026-12-07 after the exploration rounds above, before these seeds ran): new
rounds saved by ``pair_states.py`` for 5h, 7, 7h, 2hx4 and 5h3 at seeds 700-705; the walk of t = 2
steps (the best on the exploration rounds: as many pairs found as t = 1 and the fewest one-domain
splits) passes if it finds more rounds than the shipped graph over 5h, 7 and 7h together and no
fewer in 2hx4 or 5h3.

Run:  python research/pair_diffusion.py DIR [DIR ...] [--settings 5h 7 7h]
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
from scipy import sparse  # noqa: E402

from huscf.federation.clustering import spectral_clusters  # noqa: E402
from pair_rules import found_domains, load, saved_rounds  # noqa: E402
from pair_rules2 import affinity, pooled_components, votes_by_k  # noqa: E402

STEPS = (1, 2, 3, 4)
NEIGHBOURS, DIMS = 5, 50  # the shipped graph's


def walk_affinities(samples: list[np.ndarray], steps=STEPS, seed: int = 0) -> dict[int, np.ndarray]:
    """For each t in ``steps``, the (n, n) affinity of a t-step random walk (module docstring)."""
    n = len(samples)
    z, owner, counts = pooled_components(samples, DIMS, seed)
    d = torch.cdist(z, z)
    d.fill_diagonal_(float("inf"))  # a sample is not its own neighbour; its client's others may be
    nearest = d.topk(NEIGHBOURS, largest=False).indices.numpy()
    m = len(owner)
    w = sparse.csr_matrix((np.ones(m * NEIGHBOURS), (np.repeat(np.arange(m), NEIGHBOURS), nearest.ravel())),
                          shape=(m, m))
    w = ((w + w.T) > 0).astype(float)
    p = sparse.diags(1.0 / np.asarray(w.sum(1)).ravel()) @ w
    mass = np.eye(n)[owner]  # (m, n): where the walk stands, by owner
    bounds = np.cumsum([0, *counts])
    out = {}
    for t in range(1, max(steps) + 1):
        mass = p @ mass
        if t in steps:
            # per client its samples' mass on every client, its own dropped: votes for ``affinity``
            per = [mass[bounds[i]:bounds[i + 1]].copy() for i in range(n)]
            for i, rows in enumerate(per):
                rows[:, i] = 0.0
            out[t] = affinity(per, counts)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--settings", nargs="*", default=None)
    args = ap.parse_args()
    found = defaultdict(lambda: defaultdict(int))
    total = defaultdict(int)
    for f, setting, seed, rnd in saved_rounds(args.dirs, args.settings):
        r = load(f)
        by_k, counts = votes_by_k(r["samples"], (NEIGHBOURS,), DIMS)
        graphs = {"shipped": affinity(by_k[NEIGHBOURS], counts)}
        graphs |= {f"walk t={t}": a for t, a in walk_affinities(r["samples"]).items()}
        total[setting] += 1
        for name, a in graphs.items():
            found[setting][name] += found_domains(r["truth"], spectral_clusters(a).labels)
    names = ["shipped", *(f"walk t={t}" for t in STEPS)]
    print(f"rounds found (ARI >= 0.9; one domain: one cluster), the shipped k rule; graph {NEIGHBOURS} neighbours, "
          f"{DIMS} components")
    print(f"{'setting':<8} {'rounds':>6} | " + " | ".join(f"{n:>10}" for n in names))
    for setting in sorted(found):
        print(f"{setting:<8} {total[setting]:>6} | " + " | ".join(f"{found[setting][n]:>10}" for n in names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
