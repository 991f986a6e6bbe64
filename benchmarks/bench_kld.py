"""Do the KLD weights matter? HuSCF-GAN with the paper's KLD weights (alpha 1) and 10 and 100 times
sharper ones against plain size weights (alpha 0), with the clustering on and with every client
in one cluster, at more clients and more label skew than the claims grid.

Run:  python benchmarks/bench_kld.py                 # 2 settings x 8 variants x 3 seeds, about 45 min on 2 cores
      python benchmarks/bench_kld.py --dry-run       # the plan only

Why this question: in the claims grid (bench_claims.py) HuSCF-GAN without KLD weights ties
HuSCF-GAN, because KLD_i stays below 0.05 and exp(-KLD_i) is within 2% of 1 there. The weights
can matter only where KLD_i is large: more clients per cluster, more label skew, a cluster that
mixes domains (one cluster), or a larger alpha. Each of these is one axis of the grid below.

Everything below was written before any cell ran:

* **Settings** (``SETTINGS``), at the claims grid's CPU scale (``COMMON_CPU``) and with
  HuSCF-GAN's configuration chosen there (``TUNED``, the claims grid's tuning on seed 599):
  - ``two_domain_8cpd``: scenario 5 (MNIST + Fashion-MNIST, highly non-IID), 8 clients per
    domain and 1600 images per domain: twice the claims grid's clients at the same images per client;
  - ``two_domain_pathological``: the same domains, 4 clients per domain, 800 images per domain,
    split into label shards (``data.scenario=pathological``: 3-4 classes per client instead of 7-8).
* **Variants** (``VARIANTS``): alpha in (0, 1, 10, 100) x clustering (``auto``: the rule HuSCF-GAN
  ships; ``one``: ``federation.clusters=1``, every client averaged with every other, so a client's
  KLD_i compares it with the other domain too).
* **Seeds**: ``SEEDS``, never used to choose anything.
* **Evaluation**: as in the claims grid (every client's own generator at the last round; TSTR
  accuracy on 1000 synthetic images per generator; FID on 500 samples against the test split).

Printed: per setting and variant, TSTR accuracy and FID (mean +/- sd over seeds), then KLD_i over
the clustered rounds, exp(-alpha KLD_i), and how far a client's weight in its cluster is from its
size share; then, per setting and clustering, each alpha against alpha 0 paired by seed,
with the claims grid's verdict rule (*adds* / *costs* when the mean is beyond one sd of zero, else
*no measurable effect*).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from bench_claims import (COMMON_CPU, EVAL_CPU, Cell, _stats, candidates, effect, kld_stats,  # noqa: E402
                          run_cells, setting_value)
from provenance import made_line  # noqa: E402

SEEDS = (610, 611, 612)  # fixed before any cell ran; disjoint from the claims grid's 599-602
TUNED = candidates("huscf")[3]  # the claims grid's choice for HuSCF-GAN (docs/results_files/bench_claims.txt)
SETTINGS = {  # name: (config, overrides)
    "two_domain_8cpd": ("5_two_domain_highly_noniid",
                        ("data.clients_per_domain=8", "data.limit_per_domain=1600")),
    "two_domain_pathological": ("5_two_domain_highly_noniid",
                                ("data.clients_per_domain=4", "data.limit_per_domain=800",
                                 "data.scenario=pathological")),
}
ALPHAS = (0.0, 1.0, 10.0, 100.0)
CLUSTERINGS = {"auto": (), "one": ("federation.clusters=1",)}
VARIANTS = [(a, c) for c in CLUSTERINGS for a in ALPHAS]  # a cell's candidate index is its place here


def make_cells(settings: dict, seeds: list[int], ev: dict) -> list[Cell]:
    """One HuSCF-GAN cell per setting, variant and seed; ``candidate`` numbers the variant."""
    return [Cell("kld", name, "huscf", seed, config,
                 (*base, *COMMON_CPU, *TUNED, f"federation.alpha={alpha:g}", *CLUSTERINGS[clustering]),
                 tuple(sorted(ev.items())), k)
            for name, (config, base) in settings.items() for seed in seeds
            for k, (alpha, clustering) in enumerate(VARIANTS)]


def variant_name(k: int) -> str:
    alpha, clustering = VARIANTS[k]
    return f"alpha {alpha:g}, clusters {clustering}"


def table(results: dict[str, dict], stats: dict[str, dict], cells: list[Cell], seeds: list[int]) -> list[str]:
    """The printed report; ``results`` and ``stats`` by cell key (summary and ``kld_stats``)."""
    lines = ["| setting | variant | TSTR accuracy | FID | clustered rounds | KLD_i | exp(-alpha KLD_i) | "
             "weight / size share, furthest |", "| --- | --- | ---: | ---: | ---: | --- | --- | ---: |"]
    by = {(c.setting, c.candidate, c.seed): c.key for c in cells}
    settings = list(dict.fromkeys(c.setting for c in cells))

    def values(setting: str, k: int, metric: str) -> np.ndarray:
        return np.array([setting_value(results[by[setting, k, s]], metric) for s in seeds])

    for name in settings:
        for k, (alpha, _) in enumerate(VARIANTS):
            acc, fid = _stats(values(name, k, "tstr_accuracy")), _stats(values(name, k, "fid"))
            kld = [x for s in seeds for x in stats[by[name, k, s]]["kld"]]
            gap = [x for s in seeds for x in stats[by[name, k, s]]["gap"]]
            rounds = sum(stats[by[name, k, s]]["rounds"] for s in seeds)
            span = (f"{min(kld):.4f}-{max(kld):.4f} | {np.exp(-alpha * max(kld)):.3f}-{np.exp(-alpha * min(kld)):.3f}"
                    if kld else "- | -")
            furthest = f"{100 * max(gap):.1f}%" if gap else "-"
            lines.append(f"| {name} | {variant_name(k)} | {_pm(*acc)} | {_pm(*fid, 1)} | {rounds} | {span} | "
                         f"{furthest} |")
    lines += ["", "KLD weights against size weights (alpha 0), paired by seed: TSTR accuracy difference (pp) and "
                  "FID ratio (alpha 0 / alpha), mean +/- sd over seeds", "",
              "| setting | clusters | alpha | TSTR acc: alpha - alpha 0 (pp) | verdict | FID: alpha 0 / alpha "
              "| verdict |",
              "| --- | --- | ---: | ---: | --- | ---: | --- |"]
    for name in settings:
        for clustering in CLUSTERINGS:
            k0 = VARIANTS.index((0.0, clustering))
            for alpha in ALPHAS[1:]:
                k = VARIANTS.index((alpha, clustering))
                d_acc = 100 * (values(name, k, "tstr_accuracy") - values(name, k0, "tstr_accuracy"))
                d_fid = values(name, k0, "fid") / values(name, k, "fid")
                (am, asd), (fm, fsd) = _stats(d_acc), _stats(d_fid)
                lines.append(f"| {name} | {clustering} | {alpha:g} | {_pm(am, asd)} | {effect(am, asd, 0.0)} | "
                             f"{_pm(fm, fsd)} | {effect(fm, fsd, 1.0)} |")
    return lines


def _pm(mean: float, sd: float | None, digits: int = 3) -> str:
    return f"{mean:.{digits}f}" + (f" +/- {sd:.{digits}f}" if sd is not None else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_kld_out", help="cell directories (resumable; default ./bench_kld_out)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan; run nothing")
    ap.add_argument("--jobs", default="auto", help="cells at once (auto: one per core)")
    ap.add_argument("--data-dir", help="folder with the datasets (default: $HUSCF_DATA)")
    args = ap.parse_args()
    seeds, ev, out = list(SEEDS), dict(EVAL_CPU), Path(args.out)
    cells = make_cells(SETTINGS, seeds, ev)
    say = lambda m: print(m, flush=True)  # noqa: E731
    say(f"bench_kld: settings {', '.join(SETTINGS)}; variants {'; '.join(map(variant_name, range(len(VARIANTS))))}; "
        f"seeds {seeds}; HuSCF-GAN {' '.join(TUNED)} + {' '.join(COMMON_CPU)}; evaluation {ev}")
    say(made_line())
    say(f"cells: {len(cells)}")
    if args.dry_run:
        return
    from huscf.errors import HuscfError
    from huscf.metrics.classifiers import load_or_train

    try:
        for d in ("mnist", "fashion_mnist"):
            load_or_train(d, args.data_dir, progress=False)  # once, before parallel cells would each train it
        results = run_cells(cells, out, jobs=args.jobs, address=None, cpus=1, gpus=0, data_dir=args.data_dir, say=say)
    except HuscfError as exc:
        raise SystemExit(f"bench_kld: {exc}") from None
    stats = {c.key: kld_stats(out / c.key / c.method) for c in cells}
    say("")
    say("\n".join(table(results, stats, cells, seeds)))
    (out / "kld_stats.json").write_text(json.dumps(stats))


if __name__ == "__main__":
    main()
