"""Do PFL-GAN's similarity and HFL-GAN's edges find the domains? Per round, on the issue-16 grid.

Run:  python benchmarks/bench_baseline_similarity.py                           # seeds 3 4 5, ~10 min on 2 cores
      python benchmarks/bench_baseline_similarity.py --set baselines.similarity_equal_steps=false

Both methods compare clients by what their generators make (the squared MMD between samples,
``huscf/federation/synthetic.py``; docs/baselines.md). This prints, for every seed and round:

* HFL-GAN: the adjusted Rand index of its edges against the clients' domains (1: the edges are
  the domains; about 0 or below: unrelated);
* PFL-GAN (from round 2, when it first shares): the mean over clients of the weight a client puts on
  the peers of its own domain (a random choice of peers gives (c - 1) / (N - 1): 3/7 = 0.43 here).

The setting is bench_quality.py's grid (paper scenario 5, MNIST + Fashion-MNIST, highly non-IID,
4 clients per domain of 33-200 images, width 0.25, 10 rounds x 2 epochs); the default seeds, 3, 4
and 5, are not the grid's 0-2. One torch thread per run, the runs one after another.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402

from bench_quality import CONFIG, GRID  # noqa: E402
from provenance import made_line  # noqa: E402


def _rows(method: str, seed: int, extra: list[str]) -> list:
    from huscf.config import load_config
    from huscf.rundir import read_rounds
    from huscf.trainer import Trainer

    cfg = load_config(CONFIG, [*GRID, f"seed={seed}", f"method={method}", "train.threads=1", *extra])
    with tempfile.TemporaryDirectory() as tmp:
        Trainer.new(cfg, Path(tmp) / method, quiet=True).fit()
        return read_rounds(Path(tmp) / method / "metrics.jsonl"), cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    args = ap.parse_args()
    print(f"bench_baseline_similarity: {CONFIG.name} + {' '.join(GRID + args.set)}; seeds {args.seeds}", flush=True)
    print(made_line(), flush=True)
    start = time.perf_counter()
    for seed in args.seeds:
        rows, _ = _rows("hflgan", seed, args.set)
        print(f"seed {seed} hflgan: ARI of the edges against the domains per round "
              f"{[round(r.ari_vs_domains, 2) for r in rows]}", flush=True)
        rows, cfg = _rows("pflgan", seed, args.set)
        weights = []
        for r in rows[1:]:
            w = np.array(r.federation["peer_weights"])
            domains = np.repeat(np.arange(len(cfg.data.domains)), cfg.data.clients_per_domain)
            same = (domains[:, None] == domains[None, :]) & ~np.eye(len(w), dtype=bool)
            weights.append(round(float((w * same).sum(1).mean()), 2))
        print(f"seed {seed} pflgan: weight on same-domain peers per round from round 2 {weights}", flush=True)
    print(f"done in {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
