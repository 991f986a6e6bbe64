"""The ``huscf`` command: train, evaluate, compare, report, cuts, data.

Every user-facing problem is a ``HuscfError``: printed as one line, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from huscf.cuts import cli as cuts_cli
from huscf.errors import HuscfError
from huscf.methods import method_names


def _cmd_train(args: argparse.Namespace) -> int:
    from huscf.config import load_config
    from huscf.trainer import Trainer

    if args.address and args.engine != "ray":
        raise HuscfError("--address joins a Ray cluster: use it with --engine ray")
    runtime = {"engine": args.engine, "address": args.address}  # the flags are shorthands for these overrides
    args.set = [*args.set, *(f"runtime.{key}={value}" for key, value in runtime.items() if value)]
    if args.resume:
        if args.config is not None:
            raise HuscfError("give either CONFIG or --resume RUN_DIR, not both (a resumed run keeps its config)")
        trainer = Trainer.resume(Path(args.resume), args.set, quiet=args.quiet, data_dir=args.data_dir,
                                 allow_unsigned=args.allow_unsigned)
    else:
        if args.allow_unsigned:
            raise HuscfError("--allow-unsigned loads a resumed run's unsigned checkpoints: use it with --resume")
        cfg = load_config(_config_path(args.config), args.set, args.data_dir)
        out = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        trainer = Trainer.new(cfg, out, quiet=args.quiet)
    trainer.fit()
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from huscf.runtime.audit import format_summary, summarise

    summary = summarise(Path(args.run_dir))
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return 0 if not summary["violations"] else 1


def _config_path(name: str | None) -> Path | None:
    """A config argument is a path, or the name of a shipped config (``huscf/configs/NAME.yaml``,
    installed with the package; ``configs/`` in a checkout links there)."""
    if name is None:
        return None
    p = Path(name)
    if p.exists() or p.suffix in (".yaml", ".yml"):
        return p
    shipped = Path(__file__).resolve().parent / "configs" / f"{name}.yaml"
    return shipped if shipped.exists() else p


def _cmd_data(args: argparse.Namespace) -> int:
    from huscf.data import download, known_domains, resolve_data_dir

    if args.data_cmd == "download":
        for name in args.names:
            paths = download(name, args.data_dir)
            print(f"{name}: {len(paths)} files verified in {resolve_data_dir(args.data_dir) / name}")
    else:
        for name in known_domains():
            print(name)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from huscf.metrics.evaluate import evaluate_run
    from huscf.rundir import EvalSettings

    settings = EvalSettings(samples=args.samples, tstr_samples=args.tstr_samples, tstr_epochs=args.tstr_epochs,
                            client=args.client, seed=args.seed, every_client=args.every_client,
                            fid_reference=args.fid_reference)
    evaluate_run(Path(args.run_dir), settings, rounds=args.rounds, data_dir=args.data_dir, quiet=args.quiet,
                 allow_unsigned=args.allow_unsigned)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from huscf.compare import compare

    compare(_config_path(args.config), args.methods, Path(args.out), args.set, eval_rounds=args.rounds,
            samples=args.samples, tstr_samples=args.tstr_samples, data_dir=args.data_dir, quiet=args.quiet,
            every_client=args.every_client, jobs=args.jobs, fid_reference=args.fid_reference)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from huscf.report.build import write_report

    html, md = write_report(Path(args.run_dir))
    print(f"wrote {html} and {md}")
    return 0


FID_REFERENCE_HELP = ("FID against the test split (default) or against training images the run did not use (those "
                      "beyond data.limit_per_domain: for choosing settings without looking at the test split)")


ALLOW_UNSIGNED_HELP = ("load checkpoints that carry no signature (runs from before signed checkpoints); signed ones "
                       "are still verified with the key at $HUSCF_SIGNING_KEY or ~/.config/huscf/signing.key")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="huscf", description="HuSCF-GAN: split, clustered federated cGAN training")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train HuSCF-GAN (default: the offline digits config)")
    train.add_argument("config", nargs="?", help="YAML config file or a shipped config name (see configs/)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.rounds=3 (repeatable)")
    train.add_argument("--out", help="run directory (default: runs/NAME-TIMESTAMP)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    train.add_argument("--data-dir", help="folder with the datasets (default: $HUSCF_DATA or ~/.cache/huscf/data)")
    train.add_argument("--quiet", action="store_true", help="no progress bar or round summaries")
    train.add_argument("--engine", choices=["simulation", "ray"],
                       help="simulation: one process (default); ray: client and server actors (docs/runtime.md)")
    train.add_argument("--address", help="with --engine ray: join this Ray cluster (auto or HOST:PORT) "
                                         "instead of starting a local one")
    train.add_argument("--allow-unsigned", action="store_true", help=f"with --resume: {ALLOW_UNSIGNED_HELP}")
    train.set_defaults(func=_cmd_train)

    aud = sub.add_parser("audit", help="what crossed between processes in a --engine ray run (audit.jsonl)")
    aud.add_argument("run_dir")
    aud.add_argument("--json", action="store_true", help="the summary as JSON")
    aud.set_defaults(func=_cmd_audit)

    ev = sub.add_parser("evaluate", help="score a run's generators: generation score, FID, TSTR -> eval.json/.csv")
    ev.add_argument("run_dir")
    ev.add_argument("--rounds", default="all", help="all (default), last, every:N, or a list like 5,10,20")
    ev.add_argument("--samples", type=int, default=5000, help="samples per generator for score and FID (5000)")
    ev.add_argument("--tstr-samples", type=int, default=30000,
                    help="synthetic training images per domain for TSTR (30000, as in the paper; 0 skips TSTR)")
    ev.add_argument("--tstr-epochs", type=int, default=3)
    ev.add_argument("--client", type=int, help="evaluate this client's generator instead of one per cluster")
    ev.add_argument("--every-client", action="store_true",
                    help="evaluate every client's own generator (identical ones scored once)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--fid-reference", choices=["test", "heldout"], default="test", help=FID_REFERENCE_HELP)
    ev.add_argument("--data-dir", help="folder with the datasets (default: the run's, $HUSCF_DATA)")
    ev.add_argument("--quiet", action="store_true")
    ev.add_argument("--allow-unsigned", action="store_true", help=ALLOW_UNSIGNED_HELP)
    ev.set_defaults(func=_cmd_evaluate)

    cmp_ = sub.add_parser("compare", help="train + evaluate several methods on one config, tabulate them")
    cmp_.add_argument("config", nargs="?", help="YAML config file or a shipped config name (default: default)")
    ablations = [m for m in method_names(ablations=True) if m not in method_names()]
    cmp_.add_argument("--methods", nargs="+", required=True,
                      help=f"{' '.join(method_names())}, or the ablations {' '.join(ablations)}")
    cmp_.add_argument("--out", required=True, help="folder for one run directory per method and the comparison")
    cmp_.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every method")
    cmp_.add_argument("--rounds", default="all", help="rounds to evaluate: all (default), last, every:N, a list")
    cmp_.add_argument("--samples", type=int, default=2000, help="samples per generator for score and FID (2000)")
    cmp_.add_argument("--tstr-samples", type=int, default=10000, help="synthetic images for TSTR (10000; 0 skips)")
    cmp_.add_argument("--every-client", action="store_true",
                      help="score every client's own generator, not one per cluster and domain")
    cmp_.add_argument("--jobs", default="auto",
                      help="methods trained at once, each in its own process on its share of the cores "
                           "(auto: one per core; 1: one after the other with the config's threads)")
    cmp_.add_argument("--fid-reference", choices=["test", "heldout"], default="test", help=FID_REFERENCE_HELP)
    cmp_.add_argument("--data-dir")
    cmp_.add_argument("--quiet", action="store_true")
    cmp_.set_defaults(func=_cmd_compare)

    rep = sub.add_parser("report", help="write report.html and report.md for a run")
    rep.add_argument("run_dir")
    rep.set_defaults(func=_cmd_report)

    data = sub.add_parser("data", help="list or download datasets")
    data_sub = data.add_subparsers(dest="data_cmd", required=True)
    dl = data_sub.add_parser("download", help="download and verify datasets (needs internet; see docs/data.md)")
    dl.add_argument("names", nargs="+")
    dl.add_argument("--data-dir")
    data_sub.add_parser("list", help="list known domains")
    data.set_defaults(func=_cmd_data)

    cuts_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HuscfError as err:
        print(f"huscf: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("huscf: interrupted; finished rounds are saved (resume with --resume RUN_DIR)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
