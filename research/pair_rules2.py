"""Issue 32 research: candidate k rules on the saved rounds of ``research/pair_states.py``, from
per-sample votes (so the votes can be resampled: how sure is a split given how few samples a
small client keeps?).

Run:  python research/pair_rules2.py DIR [DIR ...]
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

import huscf.federation.clustering as cl  # noqa: E402
from pair_rules import found_domains, load, saved_rounds  # noqa: E402


def pooled_components(samples, dims, seed=0):
    """Every client's samples pooled and projected on ``dims`` principal components fitted on at
    most 4096 of them (seeded, as the package does): (z, each row's owner, each client's count)."""
    counts = np.array([len(s) for s in samples])
    x = np.concatenate(samples).astype(np.float32)
    owner = np.repeat(np.arange(len(samples)), counts)
    rows = np.random.default_rng(seed).permutation(len(x))[:4096]
    z = torch.from_numpy(PCA(dims, random_state=seed).fit(x[rows]).transform(x).astype(np.float32))
    return z, owner, counts


def votes_by_k(samples, ks, dims=20, seed=0):
    """For each number of neighbours in ``ks``: per client, (m_i, n), each of its samples' votes
    (its nearest other-client samples' owners), from one distance matrix (``pooled_components``);
    and each client's number of samples."""
    n = len(samples)
    z, owner, counts = pooled_components(samples, dims, seed)
    d = torch.cdist(z, z)
    own = torch.from_numpy(owner)
    d[own[:, None] == own[None, :]] = float("inf")
    order = d.topk(max(ks), largest=False).indices.numpy()
    bounds = np.cumsum([0, *counts])
    out = {}
    for k in ks:
        per = np.zeros((len(z), n))
        np.add.at(per, (np.repeat(np.arange(len(z)), k), owner[order[:, :k]].ravel()), 1)
        out[k] = [per[bounds[i]:bounds[i + 1]] for i in range(n)]
    return out, counts


def sample_votes(samples, neighbours=10, dims=20, seed=0):
    """Per client, (m_i, n): each of its samples' votes; and each client's number of samples."""
    by_k, counts = votes_by_k(samples, (neighbours,), dims, seed)
    return by_k[neighbours], counts


def affinity(votes, counts):
    n = len(votes)
    v = np.stack([p.sum(0) for p in votes])
    chance = np.where(np.eye(n, dtype=bool), 0.0, counts[None, :].astype(float))
    chance /= chance.sum(1, keepdims=True)
    a = np.divide(v / v.sum(1, keepdims=True), chance, out=np.zeros((n, n)), where=chance > 0)
    return (a + a.T) / 2


def boot(votes, counts, rng):
    return affinity([p[rng.integers(0, len(p), len(p))] for p in votes], counts)


def rule_now(a, votes, counts):
    r = cl.spectral_clusters(a)
    return r.labels, r.note


def sep_ok(a, labels):
    s = cl.separation(a, labels)
    return s is not None and s < cl.SEPARATION


def partitions(a, kmax):
    return {k: cl.spectral_clusters(a, k).labels for k in range(1, kmax + 1)}


def rule_sep_any(a, votes, counts, boot_q=None, B=40, pref="largest", share=None):
    """k = 1 unless some k > 1 with drop >= MIN_GAP_SHARE of the largest has separated clusters
    (each >= 2 clients); among those, the largest k (pref='largest') or the largest drop. With
    boot_q: the separation's boot_q quantile over B resamplings of the samples must pass too."""
    n = len(a)
    kmax = min(8, n - 1)
    w = a
    deg = w.sum(1)
    vals = np.linalg.eigvalsh(w / np.sqrt(np.outer(deg, deg)))[::-1]
    gaps = vals[:kmax] - vals[1:kmax + 1]
    parts = partitions(a, kmax)
    ok = []
    for k in range(2, kmax + 1):
        lab = parts[k]
        if len(set(lab.tolist())) < k or gaps[k - 1] < (cl.MIN_GAP_SHARE if share is None else share) * gaps.max():
            continue
        if not sep_ok(a, lab):
            continue
        if boot_q is not None:
            rng = np.random.default_rng(0)
            seps = [cl.separation(boot(votes, counts, rng), lab) for _ in range(B)]
            seps = [np.inf if s is None else s for s in seps]
            if np.quantile(seps, boot_q) >= cl.SEPARATION:
                continue
        ok.append(k)
    if not ok:
        return parts[1], ""
    k = max(ok) if pref == "largest" else max(ok, key=lambda k: gaps[k - 1])
    return parts[k], ""


RULES = {
    "sep_nodrop": lambda a, v, c: rule_sep_any(a, v, c, share=0.0),
    "sep_nodrop_boot90": lambda a, v, c: rule_sep_any(a, v, c, share=0.0, boot_q=0.9),
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--rules", nargs="*", default=list(RULES))
    ap.add_argument("--settings", nargs="*", default=None)
    args = ap.parse_args()
    found = defaultdict(lambda: defaultdict(list))
    for f, setting, seed, rnd in saved_rounds(args.dirs, args.settings):
        r = load(f)
        truth = r["truth"]
        votes, counts = sample_votes(r["samples"])
        a = affinity(votes, counts)
        for name in args.rules:
            lab, _ = RULES[name](a, votes, counts)
            k = len(set(lab.tolist()))
            found[setting][name].append((found_domains(truth, lab), k, f"{seed}/{rnd}"))
    for setting, per in found.items():
        print(f"setting {setting}")
        for name, rows in per.items():
            print(f"  {name:<16} found {sum(r[0] for r in rows):>2}/{len(rows)}  k {''.join(str(r[1]) for r in rows)}"
                  f"  misses {' '.join(r[2] for r in rows if not r[0])[:120]}")
    return 0



def rule_mod(a, votes=None, counts=None, largest=True, sep_fallback=True, finer_when_cohesive=False):
    """The shipped rule with three possible changes: (largest) among larger k with a large enough
    drop and separated clusters, the largest k instead of the one with the largest drop;
    (sep_fallback) when the eigengap's k leaves a cluster below MIN_COHESION, a larger k whose
    clusters are separated (each of two or more clients) is taken before the cohesion search;
    (finer_when_cohesive) a larger separated k is taken even when the eigengap's clusters cohere."""
    w = np.asarray(a, dtype=np.float64)
    n = len(w)
    deg = w.sum(1)
    vals = np.linalg.eigvalsh(w / np.sqrt(np.outer(deg, deg)))[::-1]
    kmax = min(8, n - 1)
    gaps = vals[:kmax] - vals[1:kmax + 1]
    k_eig = int(np.argmax(gaps)) + 1
    part = {k: cl.spectral_clusters(w, k).labels for k in range(1, kmax + 1)}

    def separated(k):
        lab = part[k]
        s = cl.separation(w, lab)
        return len(set(lab.tolist())) == k and s is not None and s < cl.SEPARATION

    def finer(need_drop=True):
        ks = [k for k in range(k_eig + 1, kmax + 1)
              if (not need_drop or gaps[k - 1] >= cl.MIN_GAP_SHARE * gaps[k_eig - 1]) and separated(k)]
        if not ks:
            return None
        return max(ks) if largest else max(ks, key=lambda k: gaps[k - 1])

    if k_eig == 1:
        f = finer()
        return (part[f] if f else part[1]), ""
    if cl._cohesive(cl.cohesion(w, part[k_eig])):
        f = finer() if finer_when_cohesive else None
        return (part[f] if f else part[k_eig]), ""
    if sep_fallback:
        f = finer(need_drop=False)
        if f:
            return part[f], ""
    for k in range(k_eig + 1, kmax + 1):
        if len(set(part[k].tolist())) == k and cl._cohesive(cl.cohesion(w, part[k])):
            return part[k], ""
    return part[k_eig], ""


# "before": the rule as shipped until 2026-12-07 (rule_mod without its changes); "shipped": the
# package's spectral_clusters as it is now; the others: one change at a time, or a rule that takes
# any separated split (no drop needed), with and without a bootstrap check on its separation
RULES = {
    "before": lambda a, v, c: rule_mod(a, largest=False, sep_fallback=False),
    "largest_only": lambda a, v, c: rule_mod(a, largest=True, sep_fallback=False),
    "fallback_only": lambda a, v, c: rule_mod(a, largest=False, sep_fallback=True),
    "both": lambda a, v, c: rule_mod(a),
    "shipped": rule_now,
    "finer_even_if_cohesive": lambda a, v, c: rule_mod(a, finer_when_cohesive=True),
    **RULES,
}


if __name__ == "__main__":
    raise SystemExit(main())
