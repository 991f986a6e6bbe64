"""Issue 32 research: on the rounds saved by ``research/pair_states.py``, why do domains of two
clients go unfound, and which change of the neighbour graph finds them without splitting one
domain? Prints, per setting, the clustered rounds found (ARI >= 0.9) by each variant, and per
pair its members' kept samples and how many times more its members vote for each other than for
the other clients.

Run:  python research/pair_rules.py DIR [--seeds ...]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

from huscf.federation.clustering import neighbour_affinity, spectral_clusters  # noqa: E402


def saved_rounds(dirs, settings=None):
    """(path, setting, seed, round) of every saved round in ``dirs`` (each folder's files in name
    order), only those of ``settings`` when given. Load one with ``load``."""
    for d in dirs:
        for f in sorted(Path(d).glob("*.npz")):
            setting, seed, rnd = f.stem.split("_")
            if not settings or setting in settings:
                yield f, setting, seed, rnd


def found_domains(truth: np.ndarray, labels: np.ndarray) -> bool:
    """Did a round's clusters find the domains: ARI >= 0.9, or one cluster for one domain."""
    if truth.max() == 0:
        return bool(labels.max() == 0)
    return bool(adjusted_rand_score(truth, labels) >= 0.9)


def load(path: Path) -> dict:
    z = np.load(path, allow_pickle=False)
    n = len(z["sizes"])
    return {"samples": [z[f"s{i}"].astype(np.float32) for i in range(n)], "domains": z["domains"],
            "truth": np.unique(z["domains"], return_inverse=True)[1],  # the domains as 0..k-1
            "shape": tuple(z["shape"]), "sizes": z["sizes"], "excluded": z["excluded"], "k_run": int(z["k"])}


def style(samples: list[np.ndarray], shape: tuple) -> list[np.ndarray]:
    """Per sample, each channel's mean and standard deviation over its spatial positions."""
    c = shape[0]
    out = []
    for s in samples:
        x = s.reshape(len(s), c, -1)
        out.append(np.concatenate([x.mean(2), x.std(2)], 1))
    return out


def pair_ratio(a: np.ndarray, domains: np.ndarray) -> list[float]:
    """Per domain of two clients: the members' affinity to each other over their mean affinity to
    the other clients."""
    out = []
    for d in dict.fromkeys(domains.tolist()):
        m = np.flatnonzero(domains == d)
        if len(m) != 2:
            continue
        others = np.flatnonzero(domains != d)
        out.append(a[m[0], m[1]] / a[np.ix_(m, others)].mean())
    return out


def votes(samples: list[np.ndarray], neighbours: int = 10, dims: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(n, n) votes (row: voter) of every kept sample's nearest other-client samples, and per
    client its number of samples: the exact graph of ``neighbour_affinity``, written out."""
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors
    n = len(samples)
    counts = np.array([len(s) for s in samples])
    x = np.concatenate(samples)
    owner = np.repeat(np.arange(n), counts)
    z = PCA(dims, random_state=0).fit(x[np.random.default_rng(0).permutation(len(x))[:4096]]).transform(x)
    nn = NearestNeighbors(n_neighbors=neighbours + counts.max()).fit(z)
    idx = nn.kneighbors(z, return_distance=False)
    v = np.zeros((n, n))
    for row, i in zip(idx, owner):
        other = owner[row][owner[row] != i][:neighbours]
        np.add.at(v[i], other, 1)
    return v, counts


def chance_affinity(v, counts):
    n = len(v)
    chance = np.where(np.eye(n, dtype=bool), 0.0, counts[None, :].astype(float))
    chance /= chance.sum(1, keepdims=True)
    a = (v / v.sum(1, keepdims=True)) / np.where(chance > 0, chance, 1)
    return (a + a.T) / 2


def degree_affinity(v, counts, iters=200):
    """votes over what independence of voter and voted-for gives, with no self votes: E = x_i y_j
    off the diagonal with E's row and column sums those of the votes (iterative proportional fitting)."""
    n = len(v)
    off = 1 - np.eye(n)
    rows, cols = v.sum(1), np.maximum(v.sum(0), 1e-9)
    y = cols
    for _ in range(iters):
        x = rows / (off @ y)
        y = cols / (off.T @ x)
    e = np.outer(x, y) * off
    a = np.divide(v, e, out=np.zeros_like(v), where=e > 0)
    return (a + a.T) / 2


def per_client(samples: list[np.ndarray], how: str) -> list[np.ndarray]:
    """Each client's samples with its own offset removed ("center": minus its mean sample), or its
    scale ("scale": divided by its root mean square), or both ("zscore", per feature)."""
    out = []
    for s in samples:
        if how == "center":
            out.append(s - s.mean(0))
        elif how == "scale":
            out.append(s / np.sqrt((s ** 2).mean()))
        else:
            out.append((s - s.mean(0)) / (s.std(0) + 1e-6))
    return out


# The graph these variants were compared against: 10 neighbours in 20 principal components, the
# default of huscf until 2026-12-07 (``neighbour_affinity``'s defaults changed after; kept fixed here
# so that docs/results_files/issue32_graph_variants.txt reruns as it was made).
OLD = {"neighbours": 10, "dims": 20}


def _old(samples, **change):
    return neighbour_affinity(samples, **{**OLD, **change})


VARIANTS = {
    "center": lambda r: _old(per_client(r["samples"], "center")),
    "scale": lambda r: _old(per_client(r["samples"], "scale")),
    "exact": lambda r: chance_affinity(*votes(r["samples"])),
    "degree": lambda r: degree_affinity(*votes(r["samples"])),
    "style_deg": lambda r: degree_affinity(*votes(style(r["samples"], r["shape"]))),
    "now": lambda r: _old(r["samples"]),
    "nb20": lambda r: _old(r["samples"], neighbours=20),
    "nb5": lambda r: _old(r["samples"], neighbours=5),
    "dims10": lambda r: _old(r["samples"], dims=10),
    "dims50": lambda r: _old(r["samples"], dims=50),
    "style": lambda r: _old(style(r["samples"], r["shape"])),
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--settings", nargs="*", default=None)
    ap.add_argument("--seeds", nargs="*", type=int, default=None)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = ap.parse_args()

    found = defaultdict(lambda: defaultdict(list))
    ratios = defaultdict(lambda: defaultdict(list))
    for f, setting, seed, rnd in saved_rounds(args.dirs, args.settings):
        if args.seeds is not None and int(seed) not in args.seeds:
            continue
        r = load(f)
        truth = r["domains"]
        kd = len(set(truth.tolist()))
        for name in args.variants:
            a = VARIANTS[name](r)
            res = spectral_clusters(a)
            fixed = spectral_clusters(a, kd)
            ari = adjusted_rand_score(truth, res.labels) if kd > 1 else float(res.k == 1)
            fixed_ok = adjusted_rand_score(truth, fixed.labels) >= 0.9 if kd > 1 else True
            found[setting][name].append((ari >= 0.9, fixed_ok, res.k, f"{seed}/{rnd}"))
            ratios[setting][name] += pair_ratio(a, truth)
    for setting, per in found.items():
        print(f"setting {setting}")
        for name, rows in per.items():
            ok = sum(r[0] for r in rows)
            okf = sum(r[1] for r in rows)
            ks = "".join(str(r[2]) for r in rows)
            rr = ratios[setting][name]
            q = (f" pair ratio min {min(rr):.2f} q25 {np.quantile(rr, .25):.2f} median {np.median(rr):.2f}"
                 if rr else "")
            print(f"  {name:<8} found {ok:>2}/{len(rows)}  fixed-k {okf:>2}/{len(rows)}  k per round {ks}{q}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
