"""``huscf report RUN_DIR``: report.html (self-contained, images inline) and report.md (images in report_files/).

This module reads the run and builds the report as a list of neutral blocks, one function per
section; ``render.py`` renders the blocks to HTML and Markdown (escaping every piece of text)
and writes both to temporary names, then renames them: a failure leaves no half-written report.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml

from huscf.errors import HuscfError
from huscf.report import plots
from huscf.report.plots import Line, Panel
from huscf.report.render import (
    Block,
    Code,
    CodeBlock,
    Heading,
    Image,
    Table,
    Toc,
    commit,
    one_line,
    para,
    render_html,
    render_markdown,
)
from huscf.rundir import EvalRecord, GeneratorScore, RoundRecord, RunDir, read_eval

_SAMPLE = re.compile(r"round_(\d{4,})_cluster_(\d+)\.png$")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DASH = "–"


# -- the run -----------------------------------------------------------------------------------------
@dataclass
class Run:
    path: Path
    config_text: str
    config: dict
    metrics: list[RoundRecord]
    clients: dict | None
    eval: EvalRecord | None

    @property
    def client_domains(self) -> list[str] | None:
        if self.clients and isinstance(self.clients.get("clients"), list):
            return [str(c.get("domain", "?")) for c in self.clients["clients"]]
        return None

    @property
    def domains(self) -> list[str]:
        found: list[str] = []
        sources = [self.client_domains or [], _get(self.config, "data", "domains") or []]
        sources += [list(r.label_accuracy) for r in self.metrics[:1]]
        sources += [[e.domain for e in (self.eval.final if self.eval else [])]]
        for src in sources:
            for d in src:
                if str(d) not in found:
                    found.append(str(d))
        return found

    @property
    def rounds(self) -> list[int]:
        return [r.round for r in self.metrics]

    def evaluate_hint(self) -> str:
        return f"huscf evaluate {shlex.quote(str(self.path))}"


def _or_dash(v, dash=DASH):
    return dash if v is None else v


def _get(d, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d



def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HuscfError(f"cannot read {path}: {one_line(exc)}") from None


def load_run(run_dir: Path) -> Run:
    """Read everything the report needs; HuscfError naming the file when something required is missing or broken."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise HuscfError(f"cannot report on {run_dir}: no such directory")
    missing = [n for n in ("config.yaml", "metrics.jsonl") if not (run_dir / n).is_file()]
    if missing:
        raise HuscfError(f"cannot report on {run_dir}: no {' and no '.join(missing)} there "
                         "(not a huscf run directory, or training has not started)")
    config_text = (run_dir / "config.yaml").read_text(encoding="utf-8")
    try:
        config = yaml.safe_load(config_text) or {}
    except yaml.YAMLError as exc:
        raise HuscfError(f"cannot read {run_dir / 'config.yaml'}: {one_line(exc)}") from None
    if not isinstance(config, dict):
        raise HuscfError(f"cannot read {run_dir / 'config.yaml'}: not a mapping of config keys")
    metrics = RunDir(run_dir).read_rounds()
    if not metrics:
        raise HuscfError(f"cannot report on {run_dir}: metrics.jsonl has no finished round")
    clients = _read_json(run_dir / "clients.json") if (run_dir / "clients.json").is_file() else None
    ev = read_eval(run_dir / "eval.json") if (run_dir / "eval.json").is_file() else None
    return Run(run_dir, config_text, config, metrics, clients if isinstance(clients, dict) else None, ev)


# -- formatting --------------------------------------------------------------------------------------
def _finite(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def num(v, digits: int = 3) -> str:
    f = _finite(v)
    return DASH if f is None else f"{f:.{digits}f}"


def megabytes(b) -> str:
    f = _finite(b)
    return DASH if f is None else f"{f / 1e6:,.2f} MB"


def seconds(s) -> str:
    f = _finite(s)
    if f is None:
        return DASH
    if f >= 3600:
        return f"{f / 3600:.2f} h"
    return f"{f / 60:.1f} min" if f >= 120 else f"{f:.2f} s"


def _series(rows: list[RoundRecord], key: str, domain: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of the round records' ``key`` (a dict by domain) where present and finite."""
    xs, ys = [], []
    for r in rows:
        v = _finite(_get(getattr(r, key), domain))
        if v is not None:
            xs.append(r.round)
            ys.append(v)
    return xs, ys


def _eval_series(entries: list[GeneratorScore], key: str,
                 domain: str) -> tuple[list[int], list[float], list[tuple[int, float]]]:
    """Per round, the mean of ``key`` over the domain's evaluated generators, and every single point."""
    by_round: dict[int, list[float]] = {}
    for e in entries:
        v = _finite(getattr(e, key))
        if e.domain == domain and v is not None:
            by_round.setdefault(e.round, []).append(v)
    rounds = sorted(by_round)
    points = [(r, v) for r in rounds for v in by_round[r]]
    return rounds, [sum(by_round[r]) / len(by_round[r]) for r in rounds], points


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"



# -- sections ----------------------------------------------------------------------------------------
Section = tuple[str, list[Block]]


def section_summary(run: Run) -> Section:
    cfg, last = run.config, run.metrics[-1]
    doms = run.client_domains or []
    per_domain = ", ".join(f"{d} ({doms.count(d)})" for d in dict.fromkeys(doms))
    planned = _get(cfg, "train", "rounds")
    ev = run.eval
    rows = [
        ["run directory", str(run.path)],
        ["name", str(cfg.get("name", DASH))],
        ["clients", f"{len(doms)}: {per_domain}" if doms else DASH],
        ["domains", ", ".join(run.domains) or DASH],
        ["scenario", str(_get(cfg, "data", "scenario", default=DASH))],
        ["model", f"{_get(cfg, 'model', 'arch', default='?')}, width {_get(cfg, 'model', 'width', default='?')}"],
        ["cut method", str(_get(run.clients, "cut_method", default=DASH))],
        ["federation", str(_get(cfg, "federation", "strategy", default=DASH))],
        ["rounds done", f"{last.round} of {planned}" if planned is not None else str(last.round)],
        ["iterations per round", str(_or_dash(last.iterations))],
        ["clusters in the last round", f"k = {_or_dash(last.num_clusters)}, ARI vs domains = {num(last.ari_vs_domains, 2)}"],
        ["training wall time", seconds(sum(_finite(r.train_seconds) or 0.0 for r in run.metrics))],
        ["simulated latency, all rounds", seconds(sum(_finite(r.latency_s_round) or 0.0 for r in run.metrics))
         if any(r.latency_s_round is not None for r in run.metrics) else "n/a (networks not split)"],
        ["evaluation", f"eval.json, created {ev.created or '?'}" if ev else f"none yet (run {run.evaluate_hint()})"],
    ]
    blocks: list[Block] = [Table(["", ""], rows)]  # no header row: a key/value table
    blocks += _clients_table(run)
    probe = _get(run.clients, "probe_real_test_accuracy")
    if isinstance(probe, dict) and probe:
        blocks.append(para("Label probe accuracy on the real test data (the ceiling of the training-time label "
                           "accuracy): " + ", ".join(f"{d} {num(v)}" for d, v in probe.items()) + "."))
    return "Run summary", blocks


def _clients_table(run: Run) -> list[Block]:
    clients = _get(run.clients, "clients")
    if not isinstance(clients, list) or not clients:
        return [para("No clients.json in the run directory: per-client details are not available.", note=True)]
    final = run.metrics[-1].clusters
    rows = []
    for i, c in enumerate(clients):
        rows.append([str(c.get("client", i)), str(c.get("domain", DASH)), str(c.get("size", DASH)),
                     ", ".join(map(str, c.get("excluded_classes") or [])) or DASH,
                     " ".join(map(str, c.get("cuts") or [])) or DASH, str(c.get("device", DASH)),
                     str(final[i]) if i < len(final) else DASH])
    return [Table(["client", "domain", "samples", "excluded classes", "cuts (hG tG hD tD)", "device",
                   "cluster (last round)"], rows)]


def section_evaluation(run: Run) -> Section:
    ev = run.eval
    if ev is None:
        return "Final metrics", [para("This run has no eval.json yet, so the generation score, FID and TSTR metrics "
                                      "are missing. Run ", Code(run.evaluate_hint()), " to compute them, then ",
                                      Code(f"huscf report {shlex.quote(str(run.path))}"), " again.", note=True)]
    s = ev.settings
    blocks: list[Block] = [para(
        f"From eval.json (created {ev.created or '?'}): {s.samples} samples per generator for the "
        f"scores, {s.tstr_samples} synthetic samples and {s.tstr_epochs} epochs for TSTR "
        f"(train on synthetic, test on real), seed {s.seed}"
        + (f", generators of client {s.client} only." if s.client is not None else "."))]
    blocks.append(_final_table(ev))
    if ev.generators:
        blocks.append(para("Evaluated generators (a cluster's generator is sampled through its representative client):"))
        blocks.append(Table(["round", "cluster", "client", "domain", "members"], [
            [str(g.round), str(_or_dash(g.cluster)), str(_or_dash(g.client)), g.domain,
             ", ".join(map(str, g.members)) or DASH] for g in ev.generators]))
    return "Final metrics", blocks


def _final_table(ev: EvalRecord) -> Table:
    header = ["domain", "cluster", "client", "round", "generation score", "FID", "TSTR accuracy", "TSTR precision",
              "TSTR recall", "TSTR F1", "TSTR FPR", "real-ceiling accuracy", "real-ceiling F1", "classifier test accuracy"]
    rows = []
    for f in ev.final:
        t, c = f.tstr or {}, f.real_ceiling or {}
        clf = _get(ev.classifiers, f.domain, "test_accuracy")
        rows.append([f.domain, str(_or_dash(f.cluster)), str(_or_dash(f.client)), str(f.round),
                     num(f.generation_score), num(f.fid, 2), num(t.get("accuracy")),
                     num(t.get("precision")), num(t.get("recall")), num(t.get("f1")), num(t.get("fpr")),
                     num(c.get("accuracy")), num(c.get("f1")), num(clf)])
    return Table(header, rows)


def section_scores(run: Run) -> Section:
    per_round = run.eval.per_round if run.eval else []
    panels = []
    for d in run.domains:
        lines = []
        x, y = _series(run.metrics, "label_accuracy", d)
        if x:
            lines.append(Line("label accuracy (training probe)", x, y, "-", color=plots.PALETTE[7]))
        x, y = _series(run.metrics, "generation_score", d)
        if x:
            lines.append(Line("generation score (training)", x, y, "-s", color=plots.PALETTE[1]))
        x, y, points = _eval_series(per_round, "generation_score", d)
        if x:
            lines.append(Line("generation score (evaluation)", x, y, "-o", color=plots.PALETTE[0]))
            if len(points) > len(x):
                lines.append(Line("single generators (evaluation)", [p[0] for p in points], [p[1] for p in points],
                                  "o", color=plots.PALETTE[0], alpha=0.4, markersize=3))
        if lines:
            panels.append(Panel(d, lines, "score", ylim=_unit_ylim(lines)))
    if not panels:
        return "Scores per round", [para("No per-round scores were recorded.")]
    text = ("Label accuracy: the share of a domain's samples that a logistic-regression probe fitted on the real "
            "domain assigns to the label they were generated for (chance = 1 / classes), averaged over the "
            "domain's clients.")
    if per_round:
        text += " Generation score (evaluation): from eval.json, the mean over the domain's evaluated generators."
    else:
        text += f" Run {run.evaluate_hint()} for the evaluation's generation score per round."
    return "Scores per round", [Image("scores_per_round", plots.curves(panels), "score per round per domain", text)]


def _unit_ylim(lines: list[Line]) -> tuple[float, float] | None:
    ys = [v for ln in lines for v in ln.y]
    return (0.0, 1.02) if ys and min(ys) >= 0 and max(ys) <= 1 else None


def section_fid(run: Run) -> Section | None:
    if run.eval is None:
        return None
    ev = run.eval
    lines = []
    colours = plots.domain_colours(run.domains)
    for d in run.domains:
        x, y, _ = _eval_series(ev.per_round, "fid", d)
        if x:
            lines.append(Line(d, x, y, "-o", color=colours[d]))
    inception = ev.inception_fid
    note = ("Inception FID: " + ("available" if inception.get("available") else
                                 f"not available ({inception.get('reason') or 'no reason given'})") + ".")
    if not lines:
        return "FID per round", [para("No FID was computed per round. " + note)]
    image = Image("fid_per_round", plots.curves([Panel("FID per round (lower is better)", lines, "FID")], ncols=1),
                  "FID per round per domain", "Mean over the domain's evaluated generators, as computed by "
                  "huscf evaluate (in the domain classifier's feature space). " + note)
    return "FID per round", [image]


def section_tstr(run: Run) -> Section | None:
    final = run.eval.final if run.eval else []
    if not final:
        return None
    blocks: list[Block] = [para("TSTR: a classifier trained on the generator's synthetic samples and tested on the "
                                "real test set; the real ceiling trains the same classifier on the real training data.")]
    for f in final:
        title = f"{f.domain}: cluster {_or_dash(f.cluster, '?')}, client {_or_dash(f.client, '?')}, round {f.round}"
        blocks.append(Heading(title, level=3))
        t, c = f.tstr, f.real_ceiling
        per_class = (t or {}).get("per_class_accuracy")
        if not per_class:
            blocks.append(para("No TSTR result for this generator."))
            continue
        png = plots.tstr_detail(per_class, (c or {}).get("per_class_accuracy"), t.get("confusion"), title)
        blocks.append(Image(f"tstr_{f.domain}_cluster{_or_dash(f.cluster, '')}", png, f"TSTR per class: {title}"))
    return "Per-class TSTR accuracy and confusion matrices", blocks


def section_clusters(run: Run) -> Section:
    rows = [r for r in run.metrics if r.clusters]
    if not rows:
        return "Cluster assignment over rounds", [para("No cluster assignments were recorded.")]
    n = len(rows[0].clusters)
    rows = [r for r in rows if len(r.clusters) == n]
    doms = run.client_domains or []
    labels = [f"{i}: {doms[i]}" if i < len(doms) else f"{i}: ?" for i in range(n)]
    rounds = [r.round for r in rows]
    blocks: list[Block] = [Image("clusters", plots.cluster_map([r.clusters for r in rows], rounds, labels),
                                 "cluster id per client and round",
                                 "Rows: clients (id: true domain); columns: rounds; colour and number: cluster id. "
                                 "Cluster ids are renumbered every round, so compare groupings, not ids.")]
    panels = [
        Panel("ARI of the clusters vs the true domains", [Line(None, rounds, [_finite(r.ari_vs_domains) or 0.0
                                                                              for r in rows], "-o")], "ARI", ylim=(-0.05, 1.05)),
        Panel("number of clusters", [Line(None, rounds, [_or_dash(r.num_clusters, len(set(r.clusters))) for r in rows],
                                          "-o", color=plots.PALETTE[1])], "k"),
    ]
    blocks.append(Image("ari_per_round", plots.curves(panels), "ARI and number of clusters per round"))
    blocks.append(Table(["round", "phase", "k", "ARI", "clusters"], [
        [str(r.round), str(_get(r.federation, "phase", default=DASH)), str(_or_dash(r.num_clusters)),
         num(r.ari_vs_domains, 2), " ".join(map(str, r.clusters))] for r in rows]))
    return "Cluster assignment over rounds", blocks


def section_losses(run: Run) -> Section:
    doms = run.client_domains or []
    colours = plots.domain_colours(doms)
    rounds = run.rounds
    panels = []
    for key, title in (("loss_d", "discriminator loss"), ("loss_g", "generator loss")):
        lines = []
        per_client = [getattr(r, f"{key}_per_client") for r in run.metrics]
        n = min((len(p) for p in per_client), default=0)
        for i in range(n):
            d = doms[i] if i < len(doms) else None
            lines.append(Line(f"client ({d})" if d else "client", rounds, [p[i] for p in per_client], "-",
                              color=colours.get(d, plots.PALETTE[7]), width=0.9, alpha=0.55))
        lines.append(Line("mean over clients", rounds, [_finite(getattr(r, key)) for r in run.metrics], "-o",
                          color="black", width=2.0))
        panels.append(Panel(title, lines, "loss"))
    return "Losses per round", [Image("losses", plots.curves(panels), "discriminator and generator losses per round",
                                      "Mean over each round's local epochs; thin lines are single clients, "
                                      "coloured by domain.")]


def section_latency(run: Run) -> Section:
    blocks: list[Block] = []
    lat = _get(run.clients, "latency_per_iteration")
    if isinstance(lat, dict) and lat.get("total_s") is None:
        blocks.append(para("This method keeps whole networks on every client: there is no per-iteration traffic "
                           "to simulate (its models travel once per round).", note=True))
    elif isinstance(lat, dict):
        blocks.append(Table(["per iteration (simulated)", "value"], [
            ["total", seconds(lat.get("total_s"))], ["server stages", seconds(lat.get("server_s"))],
            ["client stages", seconds(lat.get("client_s"))], ["cut-selection objective", num(lat.get("objective"), 4)]]))
        stages = lat.get("stages")
        if isinstance(stages, dict) and stages:
            blocks.append(Image("latency_stages", plots.stage_bars(stages, "simulated latency of one iteration by stage"),
                                "per-iteration latency by stage",
                                "The stages run one after another; each lasts as long as its slowest participant."))
    else:
        blocks.append(para("No clients.json: the per-stage latency breakdown is not available.", note=True))
    rounds = run.rounds
    panels = [Panel("simulated latency per round", [Line("simulated", rounds, [_finite(r.latency_s_round)
                                                                             for r in run.metrics], "-o")], "seconds"),
              Panel("wall time per round (this machine)", [Line("measured", rounds, [_finite(r.train_seconds)
                                                                                      for r in run.metrics], "-o",
                                                                 color=plots.PALETTE[1])], "seconds")]
    blocks.append(Image("latency_per_round", plots.curves(panels), "latency per round"))
    blocks += _bytes_blocks(run)
    return "Latency and communication", blocks


def _bytes_blocks(run: Run) -> list[Block]:
    per_round = [r.bytes_round_per_client or [] for r in run.metrics]
    n = min((len(p) for p in per_round), default=0)
    if not n:
        return []
    doms = run.client_domains or []
    doms = doms + ["?"] * (n - len(doms))
    by_client = n <= 10  # few clients: one colour and legend entry each; many: one colour per domain
    colours = plots.domain_colours(doms)
    lines = [Line(f"{i}: {doms[i]}" if by_client else doms[i], run.rounds, [p[i] / 1e6 for p in per_round], "-o",
                  color=plots.PALETTE[i % len(plots.PALETTE)] if by_client else colours[doms[i]], width=1.2,
                  markersize=3) for i in range(n)]
    total = sum(sum(p[:n]) for p in per_round)
    panel = Panel("traffic per client per round (activations and gradients)", lines, "MB", ylim=(0, None),
                  legend_outside=True)
    image = Image("bytes_per_client", plots.curves([panel], ncols=1, panel_size=(7.0, 3.4)),
                  "bytes per client per round",
                  "One line per client" + (" (id: domain)." if by_client else ", coloured by domain."))
    table = Table(["client", "domain", "last round", "all rounds"], [
        [str(i), doms[i], megabytes(per_round[-1][i]), megabytes(sum(p[i] for p in per_round))]
        for i in range(n)])
    return [image, para(f"All clients, all rounds: {megabytes(total)} across the cuts."), table]


def section_samples(run: Run) -> Section:
    samples = run.eval.samples if run.eval else {}
    blocks: list[Block] = []
    for domain, rel in samples.items():
        png = _read_png(run.path / str(rel))
        if png is None:
            blocks.append(para(f"{domain}: sample grid {rel} is missing or not a PNG.", note=True))
        else:
            blocks.append(Image(f"samples_{domain}", png, f"samples for {domain}",
                                f"{domain}: evaluation samples ({rel}), one row per class."))
        wavs = run.eval.audio.get(domain) if run.eval else None
        if wavs:
            blocks.append(para(f"{domain} is audio: the grid shows log-mel spectrograms (low frequencies at the "
                               "bottom). The first sample of each row, inverted to sound with Griffin-Lim, is in ",
                               Code(", ".join(wavs)), " next to eval.json."))
    if blocks:
        return "Samples", blocks
    return "Samples", _training_samples(run)


def _training_samples(run: Run) -> list[Block]:
    found = sorted((int(m.group(1)), int(m.group(2)), p) for p in (run.path / "samples").glob("round_*_cluster_*.png")
                   if (m := _SAMPLE.search(p.name)))
    if not found:
        return [para("No sample grids in the run directory.")]
    newest = found[-1][0]
    row = next((r for r in run.metrics if r.round == newest), None)
    clusters, doms = row.clusters if row else [], run.client_domains or []
    blocks: list[Block] = [para(f"Training samples of round {newest} (the newest grids), one per cluster, one row per "
                                "class, sampled through the cluster's first client.")]
    for _, k, path in (f for f in found if f[0] == newest):
        png = _read_png(path)
        if png is None:
            continue
        members = [i for i, g in enumerate(clusters) if g == k]
        names = sorted({doms[i] for i in members if i < len(doms)})
        who = f"clients {', '.join(map(str, members))}" + (f" ({', '.join(names)})" if names else "")
        blocks.append(Image(f"samples_round{newest}_cluster{k}", png, f"samples of cluster {k}",
                            f"cluster {k}: {who}" if members else f"cluster {k}"))
    return blocks


def _read_png(path: Path) -> bytes | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data if data.startswith(_PNG_MAGIC) else None


def section_config(run: Run) -> Section:
    return "Configuration", [para("The resolved config.yaml of the run:"), CodeBlock(run.config_text.rstrip(), "yaml")]


SECTIONS: list[Callable[[Run], Section | None]] = [
    section_summary, section_evaluation, section_scores, section_fid, section_tstr, section_clusters,
    section_losses, section_latency, section_samples, section_config,
]


def build_blocks(run: Run) -> tuple[str, list[Block]]:
    """The title and the report's blocks: intro, table of contents, then every section that applies."""
    title = f"HuSCF-GAN run report: {run.config.get('name', run.path.name)}"
    toc = Toc()
    blocks: list[Block] = [para(f"Run directory {run.path}, report written "
                                f"{datetime.now().astimezone().isoformat(timespec='seconds')}."), toc]
    for make in SECTIONS:
        made = make(run)
        if made is None:
            continue
        name, body = made
        anchor = _slug(name)
        toc.entries.append((anchor, name))
        blocks.append(Heading(name, 2, anchor))
        blocks += body
    return title, blocks


# -- writing -----------------------------------------------------------------------------------------
def write_report(run_dir: Path) -> tuple[Path, Path]:
    """Write RUN_DIR/report.html and RUN_DIR/report.md (+ RUN_DIR/report_files/); returns (html, md) paths.

    Raises HuscfError (one line) when config.yaml or metrics.jsonl is missing, a JSON file is broken, or
    the directory cannot be written; in every failure case no report file is left half-written.
    """
    run = load_run(Path(run_dir))
    title, blocks = build_blocks(run)
    html_text = render_html(title, blocks)
    md_text, files = render_markdown(title, blocks)
    return commit(run.path, html_text, md_text, files)


