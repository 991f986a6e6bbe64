"""Wall time of a shipped scenario at full scale: seconds per iteration and the projected full run.

Run:  python benchmarks/bench_scenario.py configs/6_multi_domain_iid.yaml [--set compute.precision=bf16 ...]
                                          [--iters N] [--out DIR]

Builds the scenario exactly as ``huscf train`` does (real data, its clients, cuts and model), then

1. runs one round of one local epoch capped at ``--warmup`` iterations through ``Trainer.fit``:
   warm-up, plus the cost of a round's end (clustering, averaging, probes, samples, the checkpoint's
   copy; its file is written in the background while the next round trains), timed around the
   trainer's round-end step;
2. times one real local epoch (the first ``--iters`` iterations of it when given; clients whose
   data runs out sit out, as in training) for the seconds per iteration, and one epoch that also
   collects the clustering features (a round's last epoch does); each after an untimed epoch of
   the same kind (with ``compute.cuda_graphs``: its warm-ups and captures, paid once per run);
3. projects the configured run: rounds x ((local_epochs - 1) plain epochs + 1 collecting epoch +
   round end). A capped epoch keeps every client busy, so ``--iters`` projects pessimistically.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from huscf.config import load_config  # noqa: E402
from huscf.rundir import RunDir  # noqa: E402
from huscf.trainer import Trainer  # noqa: E402


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time_round_end(trainer) -> dict[str, float]:
    """Wrap the pieces of a round's end with timers (results filled in as they run)."""
    parts: dict[str, float] = {}

    def timed(obj, name, label):
        fn = getattr(obj, name)

        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                _sync()
                parts[label] = parts.get(label, 0.0) + time.perf_counter() - start
        setattr(obj, name, wrapper)

    timed(trainer, "_end_round", "round end")  # everything between a round's last epoch and the next
    timed(trainer.engine, "federate", "federation")
    timed(trainer.strategy, "aggregate", "clustering")
    timed(trainer, "_label_accuracy", "label probes")
    timed(trainer, "_save_samples", "sample grids")
    timed(trainer.run, "save_checkpoint", "checkpoint")
    return parts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--iters", type=int, default=None, help="time only this many iterations of the epoch")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    full = load_config(args.config, args.set)
    short = load_config(args.config, args.set + ["train.rounds=1", "train.local_epochs=1",
                                                 f"train.max_iters_per_epoch={args.warmup}"])
    out = Path(args.out or tempfile.mkdtemp(prefix="huscf-bench-")) / "run"
    start = time.perf_counter()
    trainer = Trainer.new(short, out, quiet=True)
    setup_s = time.perf_counter() - start
    parts = _time_round_end(trainer)
    start = time.perf_counter()
    trainer.fit()
    round_s = time.perf_counter() - start
    round_end_s = parts.pop("round end")
    # the rest of the first round's wall time: fit's start and its final wait for the checkpoint
    # writer (in a run, each round's write overlaps the next round's training)
    other_s = round_s - RunDir(out).read_rounds()[-1].train_seconds - round_end_s

    engine = trainer.engine
    engine.max_iters = None
    per_epoch = engine.iterations_per_epoch() if full.train.max_iters_per_epoch is None else min(
        engine.iterations_per_epoch(), full.train.max_iters_per_epoch)
    engine.max_iters = args.iters or per_epoch
    timed = engine.iterations_per_epoch()

    def epoch_seconds(collect: bool) -> float:
        """One epoch untimed (CUDA graphs: its client sets' warm-ups and captures), then one timed."""
        engine.run_epoch(round_idx=1, epoch=0, collect_features=collect)
        _sync()
        start = time.perf_counter()
        engine.run_epoch(round_idx=1, epoch=1, collect_features=collect)
        _sync()
        return time.perf_counter() - start

    plain_s = epoch_seconds(False)
    # a round's last epoch also collects the clustering features (trainer: collect_features on it)
    collect_s = epoch_seconds(True) if trainer.feature_depth is not None else plain_s
    sec_per_iter = plain_s / timed

    c = full.train
    round_train_s = ((c.local_epochs - 1) * plain_s + collect_s) * per_epoch / timed
    projected = c.rounds * (round_train_s + round_end_s)
    print(f"scenario {full.name}: {full.num_clients} clients, {full.model.arch} width {full.model.width}, batch "
          f"{c.batch_size}; {trainer._compute_line()}")
    print(f"device: {torch.cuda.get_device_name() if engine.device.type == 'cuda' else 'cpu'}")
    print(f"setup {setup_s:.1f} s; first round ({args.warmup} iterations + round end) {round_s:.1f} s; "
          f"round end {round_end_s:.2f} s ({', '.join(f'{k} {v:.2f} s' for k, v in parts.items())}); "
          f"start and last checkpoint write {other_s:.2f} s")
    print(f"{sec_per_iter:.4f} s per iteration over {timed} iterations of a local epoch, "
          f"{collect_s / timed:.4f} s in the epoch that collects clustering features ({per_epoch} iterations "
          f"per epoch)")
    print(f"projected: {c.rounds} rounds x ({c.local_epochs} epochs x {per_epoch} iterations + round end) = "
          f"{projected:.0f} s ({projected / 60:.1f} min)")


if __name__ == "__main__":
    from huscf.errors import HuscfError

    try:
        main()
    except HuscfError as exc:  # bad config or missing data: one line, as huscf itself prints it
        raise SystemExit(f"bench_scenario: {exc}") from None
