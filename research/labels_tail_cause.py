"""Issue 30 research: why does ``model.labels: tail`` lose the generator? In the leakage benchmark's
split runs with the label only in the clients' last blocks (``bench_leakage.py --defences
labels_tail``) the discriminator wins from round 5 on and the generated images never follow their
label (TSTR at chance). Is that the split (server bodies shared by clients, the seam) or the
architecture (a generator that meets the label only in its last layer, against a projection
discriminator)? The same default config with ``method=centralized`` (one whole network on the
pooled data: no split, no federation), label at the head and at the tail, evaluated as the
benchmark evaluates; per round, the generator's label accuracy and the losses as the trainer
records them.

Which half fails, and does more conditioning in the tail help? ``--labels`` also takes variants
whose networks the script registers as architectures of its own: ``g_tail`` (the label in the G
tail only, the D head as the paper's), ``d_tail`` (the G head as the paper's, the projection D tail),
and ``deep_tail`` (both in the tails, the G tail one layer deeper: per-class scale and shift, a
3x3 transposed convolution, BatchNorm, ReLU, per-class scale and shift again, then the image layer).

Run:  python research/labels_tail_cause.py OUT [--labels head tail g_tail d_tail deep_tail] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from dataclasses import dataclass, fields  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench_leakage import EVAL  # noqa: E402
from huscf.config import build_config  # noqa: E402
from huscf.metrics.evaluate import evaluate_run  # noqa: E402
from huscf.models import ARCHITECTURES, Architecture, BlockNet  # noqa: E402
from huscf.models.cgan import batch_norm, dcgan_init  # noqa: E402
from huscf.rundir import read_eval, read_rounds  # noqa: E402
from huscf.rundir.records import EvalSettings  # noqa: E402
from huscf.trainer import Trainer  # noqa: E402


class DeepLabelledTail(nn.Module):
    """G's last block with the label entering one layer earlier (module docstring, ``deep_tail``)."""

    takes_label = True

    def __init__(self, channels: int, num_classes: int, image_channels: int, kernel: int, padding: int):
        super().__init__()
        self.film = nn.ModuleList([nn.Embedding(num_classes, 2 * channels) for _ in range(2)])
        for e in self.film:
            nn.init.zeros_(e.weight)
        self.mid = nn.Sequential(nn.ConvTranspose2d(channels, channels, 3, 1, 1), batch_norm(channels), nn.ReLU())
        self.out = nn.ConvTranspose2d(channels, image_channels, kernel, 1, padding)

    @staticmethod
    def _modulate(h: torch.Tensor, film: nn.Embedding, y: torch.Tensor) -> torch.Tensor:
        scale, shift = film(y).chunk(2, dim=1)
        return h * (1 + scale)[:, :, None, None] + shift[:, :, None, None]

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.mid(self._modulate(h, self.film[0], y))
        return torch.tanh(self.out(self._modulate(h, self.film[1], y)))


@dataclass(frozen=True)
class MixedLabels(Architecture):
    """cgan28 with the label placed per net (``g_label``, ``d_label``), the G tail optionally deeper."""

    g_label: str = "head"
    d_label: str = "head"
    deep_g_tail: bool = False

    def generator(self) -> BlockNet:
        g = Architecture.generator(_plain(self, self.g_label))
        if self.deep_g_tail:
            last = g.blocks[-1]
            g.blocks[-1] = DeepLabelledTail(last.out.in_channels, self.num_classes, self.image_shape[0],
                                            last.out.kernel_size[0], last.out.padding[0]).apply(dcgan_init)
        return g

    def discriminator(self) -> BlockNet:
        return Architecture.discriminator(_plain(self, self.d_label))


def _plain(arch: MixedLabels, label_at: str) -> Architecture:
    """``arch`` as a plain ``Architecture`` with the label at ``label_at``."""
    return Architecture(**{f.name: getattr(arch, f.name) for f in fields(Architecture)} | {"label_at": label_at})


VARIANTS = {"g_tail": {"g_label": "tail"}, "d_tail": {"d_label": "tail"},
            "deep_tail": {"g_label": "tail", "d_label": "tail", "deep_g_tail": True}}


def overrides(labels: str) -> list[str]:
    """The config keys of a variant: ``head`` and ``tail`` are ``model.labels``; the others an
    architecture registered here (``cgan28`` otherwise)."""
    if labels in ("head", "tail"):
        return [f"model.labels={labels}"]
    base = ARCHITECTURES["cgan28"]
    name = f"cgan28_{labels}"
    ARCHITECTURES[name] = MixedLabels(**{f.name: getattr(base, f.name) for f in fields(Architecture)}
                                      | {"name": name}, **VARIANTS[labels])
    return [f"model.arch={name}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--labels", nargs="+", choices=["head", "tail", *VARIANTS], default=["head", "tail"])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    print(f"labels_tail_cause: default config + method=centralized {' '.join(args.set)}; evaluation {EVAL}")
    for labels in args.labels:
        run = args.out / f"centralized_{labels}"
        cfg = build_config({}, ["method=centralized", *overrides(labels), "output.samples_every=0", *args.set])
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
