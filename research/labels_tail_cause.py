"""Issue 30 research: why does ``model.labels: tail`` lose the generator? In the leakage benchmark's
split runs with the label only in the clients' last blocks (``bench_leakage.py --defences
labels_tail``) the discriminator wins from round 5 on and the generated images never follow their
label (TSTR at chance). Is that the split (server bodies shared by clients, the seam) or the
architecture (a generator that meets the label only in its last layer, against a projection
discriminator)? The same default config with ``method=centralized`` (one whole network on the
pooled data: no split, no federation), label at the head and at the tail, evaluated as the
benchmark evaluates; per round, the generator's label accuracy and the losses as the trainer
records them.

Run:  python research/labels_tail_cause.py OUT [--labels head tail] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import numpy as np  # noqa: E402

from bench_leakage import EVAL  # noqa: E402
from huscf.config import build_config  # noqa: E402
from huscf.metrics.evaluate import evaluate_run  # noqa: E402
from huscf.rundir import read_eval, read_rounds  # noqa: E402
from huscf.rundir.records import EvalSettings  # noqa: E402
from huscf.trainer import Trainer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--labels", nargs="+", choices=["head", "tail"], default=["head", "tail"])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    print(f"labels_tail_cause: default config + method=centralized {' '.join(args.set)}; evaluation {EVAL}")
    for labels in args.labels:
        run = args.out / f"centralized_{labels}"
        cfg = build_config({}, ["method=centralized", f"model.labels={labels}", "output.samples_every=0", *args.set])
        Trainer.new(cfg, run, quiet=True).fit()
        evaluate_run(run, EvalSettings(**EVAL), rounds="last", quiet=True)
        final = read_eval(run / "eval.json").final
        tstr = float(np.mean([f.tstr["accuracy"] for f in final]))
        fid = float(np.mean([f.fid for f in final]))
        print(f"centralized, labels {labels}: TSTR accuracy {tstr:.3f}, FID {fid:.1f} ({len(final)} generators)")
        for r in read_rounds(run / "metrics.jsonl"):
            acc = " ".join(f"{d} {a:.2f}" for d, a in r.label_accuracy.items())
            print(f"  round {r.round:2d}: label accuracy {acc}; loss D {r.loss_d:.3f}, G {r.loss_g:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
