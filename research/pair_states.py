"""Issue 32 research: train the two-clients-per-domain settings (and one-domain controls) as
``benchmarks/bench_clustering.py`` does, and save every clustered round's server state (per-client
kept activations, sizes, the true domains and each client's excluded classes) so that clustering
rules can be compared offline on identical rounds.

Run:  HUSCF_DATA=... python research/pair_states.py OUT_DIR --settings 5h 7 7h --seeds 0 1 2
Each round is one ``.npz`` in OUT_DIR named ``{setting}_{seed}_r{round}.npz``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from huscf.config import load_config  # noqa: E402
from huscf.engines.threads import plan_jobs, run_parallel  # noqa: E402
from huscf.trainer import Trainer  # noqa: E402

# label: (config, clients per domain, overrides). 5h/7/7h are bench_clustering's two-client settings;
# 1x4, 2x4, 2hx4 are one domain of four clients (which could be split into two "pairs"); 5h3 is
# scenario 5 highly non-IID with three clients per domain (the reference a pair should match)
SETTINGS = {
    "5h": ("5", 2, ("data.scenario=highly_noniid",)), "7": ("7", 2, ()),
    "7h": ("7", 2, ("data.scenario=highly_noniid",)), "5h3": ("5", 3, ("data.scenario=highly_noniid",)),
    "1x4": ("1", 4, ()), "2x4": ("2", 4, ()), "2hx4": ("2", 4, ("data.scenario=highly_noniid",)),
    "2hx6": ("2", 6, ("data.scenario=highly_noniid",)), "4": ("4", 2, ()),
}
RUN = ("train.rounds=5", "federation.warmup_rounds=2", "train.max_iters_per_epoch=20", "data.limit_per_domain=1200",
       "model.width=0.25", "train.local_epochs=1", "train.batch_size=32", "cuts.method=random",
       "output.samples_every=0", "compute.device=cpu")


class _Recorder:
    def __init__(self, strategy, out: Path, stem: str, meta: dict):
        self.inner, self.out, self.stem, self.meta = strategy, out, stem, meta
        self.name, self.uses_client_params = strategy.name, strategy.uses_client_params

    def aggregate(self, state):
        agg = self.inner.aggregate(state)
        if agg.info.get("phase") == "clustered":
            np.savez_compressed(self.out / f"{self.stem}_r{state.round + 1}.npz", sizes=state.sizes,
                                **{f"s{i}": s.astype(np.float16) for i, s in enumerate(state.samples)},
                                k=agg.info["k"], shape=np.array(state.features.shape[1:]), **self.meta)
        return agg


def run(cell) -> int:
    label, seed, out = cell
    scenario, cpd, extra = SETTINGS[label]
    path = next((ROOT / "huscf" / "configs").glob(f"{scenario}_*.yaml"))
    cfg = load_config(path, [f"data.clients_per_domain={cpd}", f"seed={seed}", *RUN, *extra])
    with tempfile.TemporaryDirectory() as tmp:
        t = Trainer.new(cfg, Path(tmp) / "run", quiet=True)
        meta = {"domains": np.array([c.domain for c in t.setup.data]),
                "excluded": np.array([",".join(map(str, p.excluded_classes)) for p in t.setup.partitions]),
                "hd": np.array([c.hd for c in t.setup.cuts])}
        t.strategy = _Recorder(t.strategy, Path(out), f"{label}_{seed}", meta)
        t.fit()
    return seed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4, 5])
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    cells = [(s, seed, args.out) for s in args.settings for seed in args.seeds]
    jobs, threads = plan_jobs("auto", len(cells))
    for k, _ in run_parallel(run, cells, jobs, threads):
        print("done", cells[k][:2], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
