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
import torch  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

from huscf.federation.clustering import spectral_clusters  # noqa: E402
from pair_rules import load  # noqa: E402
from pair_rules2 import affinity  # noqa: E402


def votes_by_k(samples, ks, dims, seed=0):
    """For each number of neighbours in ``ks``: the (n, n) votes of every sample's nearest
    other-client samples (PCA to ``dims`` on at most 4096 samples, seeded, as the package does)."""
    n = len(samples)
    counts = np.array([len(s) for s in samples])
    x = np.concatenate(samples).astype(np.float32)
    owner = np.repeat(np.arange(n), counts)
    rows = np.random.default_rng(seed).permutation(len(x))[:4096]
    z = torch.from_numpy(PCA(dims, random_state=seed).fit(x[rows]).transform(x).astype(np.float32))
    d = torch.cdist(z, z)
    own = torch.from_numpy(owner)
    d[own[:, None] == own[None, :]] = float("inf")
    order = d.topk(max(ks), largest=False).indices.numpy()
    out = {}
    for k in ks:
        per = np.zeros((len(x), n))
        np.add.at(per, (np.repeat(np.arange(len(x)), k), owner[order[:, :k]].ravel()), 1)
        bounds = np.cumsum([0, *counts])
        out[k] = [per[bounds[i]:bounds[i + 1]] for i in range(n)]
    return out, counts


def degree_corrected(votes, iters=200):
    """Votes over x_i y_j (zero diagonal) fitted to the votes' row and column totals."""
    v = np.stack([p.sum(0) for p in votes])
    n = len(v)
    off = 1 - np.eye(n)
    rows, cols = v.sum(1), np.maximum(v.sum(0), 1e-9)
    y = cols.copy()
    for _ in range(iters):
        x = rows / (off @ y)
        y = cols / (off.T @ x)
    e = np.outer(x, y) * off
    a = np.divide(v, e, out=np.zeros_like(v), where=e > 0)
    return (a + a.T) / 2


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--settings", nargs="*", default=None)
    args = ap.parse_args()
    found = defaultdict(lambda: defaultdict(list))
    for d in args.dirs:
        for f in sorted(Path(d).glob("*.npz")):
            setting, seed, rnd = f.stem.split("_")
            if args.settings and setting not in args.settings:
                continue
            r = load(f)
            truth = np.unique(r["domains"], return_inverse=True)[1]
            graphs = {}
            for dims in (20, 50):
                by_k, counts = votes_by_k(r["samples"], (5, 10), dims)
                for k, v in by_k.items():
                    graphs[f"k{k} d{dims}"] = affinity(v, counts)
                    if dims == 20:
                        graphs[f"k{k} d{dims} degree"] = degree_corrected(v)
            for name, a in graphs.items():
                lab = spectral_clusters(a).labels
                ok = lab.max() == 0 if truth.max() == 0 else adjusted_rand_score(truth, lab) >= 0.9
                found[setting][name].append((bool(ok), f"{seed}/{rnd}"))
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
