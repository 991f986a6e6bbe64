"""The report's sections: one function per section, each turning a ``Run`` into its title and
blocks, or None when the section does not apply to the run; ``SECTIONS`` is their order."""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path

from huscf.errors import HuscfError
from huscf.methods import get_method
from huscf.report import plots
from huscf.report.plots import Line, Panel
from huscf.report.render import Block, Code, CodeBlock, Heading, Image, Table, para
from huscf.report.run import DASH, Run, eval_series, finite, get, megabytes, num, or_dash, seconds, series
from huscf.rundir import EvalRecord

_SAMPLE = re.compile(r"round_(\d{4,})_cluster_(\d+)\.png$")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

Section = tuple[str, list[Block]]


def section_summary(run: Run) -> Section:
    cfg, last = run.config, run.metrics[-1]
    doms = run.client_domains
    per_domain = ", ".join(f"{d} ({doms.count(d)})" for d in dict.fromkeys(doms))
    planned = get(cfg, "train", "rounds")
    ev = run.eval
    rows = [
        ["run directory", str(run.path)],
        ["name", str(cfg.get("name", DASH))],
        ["clients", f"{len(doms)}: {per_domain}" if doms else DASH],
        ["domains", ", ".join(run.domains) or DASH],
        ["scenario", str(get(cfg, "data", "scenario", default=DASH))],
        ["model", f"{get(cfg, 'model', 'arch', default='?')}, width {get(cfg, 'model', 'width', default='?')}"],
        ["cut method", str(get(run.clients, "cut_method", default=DASH))],
        ["method", _method_line(str(cfg.get("method", "huscf")))],
        ["federation", str(get(cfg, "federation", "strategy", default=DASH))],
        ["rounds done", f"{last.round} of {planned}" if planned is not None else str(last.round)],
        ["iterations per round", str(or_dash(last.iterations))],
        ["clusters in the last round",
         f"k = {or_dash(last.num_clusters)}, ARI vs domains = {num(last.ari_vs_domains, 2)}"],
        ["training wall time", seconds(sum(finite(r.train_seconds) or 0.0 for r in run.metrics))],
        ["simulated latency, all rounds", seconds(sum(finite(r.latency_s_round) or 0.0 for r in run.metrics))
         if any(r.latency_s_round is not None for r in run.metrics) else "n/a (networks not split)"],
        ["evaluation", f"eval.json, created {ev.created or '?'}" if ev else f"none yet (run {run.evaluate_hint()})"],
    ]
    blocks: list[Block] = [Table(["", ""], rows), _clients_table(run)]  # the first without a header: key/value
    probe = get(run.clients, "probe_real_test_accuracy")
    if isinstance(probe, dict) and probe:
        blocks.append(para("Label probe accuracy on the real test data (the ceiling of the training-time label "
                           "accuracy): " + ", ".join(f"{d} {num(v)}" for d, v in probe.items()) + "."))
    return "Run summary", blocks


def _method_line(name: str) -> str:
    """The method's title and what leaves its clients (its ``shares``), or its name when this
    process does not know it (a method registered by another program)."""
    try:
        m = get_method(name)
    except HuscfError:
        return name
    return f"{m.title}; what leaves a client: {m.shares}"


def _clients_table(run: Run) -> Block:
    clients = get(run.clients, "clients")
    if not isinstance(clients, list) or not clients:
        return para("No clients.json in the run directory: per-client details are not available.", note=True)
    final = run.metrics[-1].clusters
    rows = [[str(c.get("client", i)), str(c.get("domain", DASH)), str(c.get("size", DASH)),
             ", ".join(map(str, c.get("excluded_classes") or [])) or DASH,
             " ".join(map(str, c.get("cuts") or [])) or DASH, str(c.get("device", DASH)),
             str(final[i]) if i < len(final) else DASH] for i, c in enumerate(clients)]
    return Table(["client", "domain", "samples", "excluded classes", "cuts (hG tG hD tD)", "device",
                  "cluster (last round)"], rows)


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
        + (f", generators of client {s.client} only." if s.client is not None else ".")), _final_table(ev)]
    if ev.generators:
        blocks += [para("Evaluated generators (a cluster's generator is sampled through its representative client):"),
                   Table(["round", "cluster", "client", "domain", "members"], [
                       [str(g.round), str(or_dash(g.cluster)), str(or_dash(g.client)), g.domain,
                        ", ".join(map(str, g.members)) or DASH] for g in ev.generators])]
    return "Final metrics", blocks


def _final_table(ev: EvalRecord) -> Table:
    header = ["domain", "cluster", "client", "round", "generation score", "FID", "TSTR accuracy", "TSTR precision",
              "TSTR recall", "TSTR F1", "TSTR FPR", "real-ceiling accuracy", "real-ceiling F1",
              "classifier test accuracy"]
    return Table(header, [[f.domain, str(or_dash(f.cluster)), str(or_dash(f.client)), str(f.round),
                           num(f.generation_score), num(f.fid, 2),
                           *(num((f.tstr or {}).get(k)) for k in ("accuracy", "precision", "recall", "f1", "fpr")),
                           *(num((f.real_ceiling or {}).get(k)) for k in ("accuracy", "f1")),
                           num(get(ev.classifiers, f.domain, "test_accuracy"))] for f in ev.final])


def section_scores(run: Run) -> Section:
    per_round = run.eval.per_round if run.eval else []
    panels = []
    for d in run.domains:
        lines = []
        for key, label, fmt, colour in (("label_accuracy", "label accuracy (training probe)", "-", 7),
                                        ("generation_score", "generation score (training)", "-s", 1)):
            x, y = series(run.metrics, key, d)
            if x:
                lines.append(Line(label, x, y, fmt, color=plots.PALETTE[colour]))
        x, y, points = eval_series(per_round, "generation_score", d)
        if x:
            lines.append(Line("generation score (evaluation)", x, y, "-o", color=plots.PALETTE[0]))
            if len(points) > len(x):
                lines.append(Line("single generators (evaluation)", [p[0] for p in points], [p[1] for p in points],
                                  "o", color=plots.PALETTE[0], alpha=0.4, markersize=3))
        if lines:  # a panel whose scores all lie in [0, 1] shows the whole unit range
            ys = [v for ln in lines for v in ln.y]
            panels.append(Panel(d, lines, "score", ylim=(0.0, 1.02) if min(ys) >= 0 and max(ys) <= 1 else None))
    if not panels:
        return "Scores per round", [para("No per-round scores were recorded.")]
    text = ("Label accuracy: the share of a domain's samples that a logistic-regression probe fitted on the real "
            "domain assigns to the label they were generated for (chance = 1 / classes), averaged over the "
            "domain's clients.")
    text += (" Generation score (evaluation): from eval.json, the mean over the domain's evaluated generators."
             if per_round else f" Run {run.evaluate_hint()} for the evaluation's generation score per round.")
    return "Scores per round", [Image("scores_per_round", plots.curves(panels), "score per round per domain", text)]


def section_fid(run: Run) -> Section | None:
    ev = run.eval
    if ev is None:
        return None
    colours = plots.domain_colours(run.domains)
    fids = {d: eval_series(ev.per_round, "fid", d) for d in run.domains}
    lines = [Line(d, x, y, "-o", color=colours[d]) for d, (x, y, _) in fids.items() if x]
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
                                "real test set; the real ceiling trains the same classifier on the real training "
                                "data.")]
    for f in final:
        title = f"{f.domain}: cluster {or_dash(f.cluster, '?')}, client {or_dash(f.client, '?')}, round {f.round}"
        blocks.append(Heading(title, level=3))
        t, c = f.tstr, f.real_ceiling
        per_class = (t or {}).get("per_class_accuracy")
        if not per_class:
            blocks.append(para("No TSTR result for this generator."))
            continue
        png = plots.tstr_detail(per_class, (c or {}).get("per_class_accuracy"), t.get("confusion"), title)
        blocks.append(Image(f"tstr_{f.domain}_cluster{or_dash(f.cluster, '')}", png, f"TSTR per class: {title}"))
    return "Per-class TSTR accuracy and confusion matrices", blocks


def section_clusters(run: Run) -> Section:
    rows = [r for r in run.metrics if r.clusters]
    if not rows:
        return "Cluster assignment over rounds", [para("No cluster assignments were recorded.")]
    n = len(rows[0].clusters)
    rows = [r for r in rows if len(r.clusters) == n]
    doms = run.client_domains
    labels = [f"{i}: {doms[i]}" if i < len(doms) else f"{i}: ?" for i in range(n)]
    rounds = [r.round for r in rows]
    blocks: list[Block] = [Image("clusters", plots.cluster_map([r.clusters for r in rows], rounds, labels),
                                 "cluster id per client and round",
                                 "Rows: clients (id: true domain); columns: rounds; colour and number: cluster id. "
                                 "Cluster ids are renumbered every round, so compare groupings, not ids.")]
    ari = Line(None, rounds, [finite(r.ari_vs_domains) or 0.0 for r in rows], "-o")
    k = Line(None, rounds, [or_dash(r.num_clusters, len(set(r.clusters))) for r in rows], "-o", color=plots.PALETTE[1])
    panels = [Panel("ARI of the clusters vs the true domains", [ari], "ARI", ylim=(-0.05, 1.05)),
              Panel("number of clusters", [k], "k")]
    blocks += [Image("ari_per_round", plots.curves(panels), "ARI and number of clusters per round"),
               Table(["round", "phase", "k", "ARI", "clusters"], [
                   [str(r.round), str(get(r.federation, "phase", default=DASH)), str(or_dash(r.num_clusters)),
                    num(r.ari_vs_domains, 2), " ".join(map(str, r.clusters))] for r in rows])]
    return "Cluster assignment over rounds", blocks


def section_losses(run: Run) -> Section:
    doms = run.client_domains
    colours = plots.domain_colours(doms)
    panels = []
    for key, title in (("loss_d", "discriminator loss"), ("loss_g", "generator loss")):
        lines = []
        per_client = [getattr(r, f"{key}_per_client") for r in run.metrics]
        n = min((len(p) for p in per_client), default=0)
        for i in range(n):
            d = doms[i] if i < len(doms) else None
            lines.append(Line(f"client ({d})" if d else "client", run.rounds, [p[i] for p in per_client], "-",
                              color=colours.get(d, plots.PALETTE[7]), width=0.9, alpha=0.55))
        lines.append(Line("mean over clients", run.rounds, [finite(getattr(r, key)) for r in run.metrics], "-o",
                          color="black", width=2.0))
        panels.append(Panel(title, lines, "loss"))
    return "Losses per round", [Image("losses", plots.curves(panels), "discriminator and generator losses per round",
                                      "Mean over each round's local epochs; thin lines are single clients, "
                                      "coloured by domain.")]


def section_latency(run: Run) -> Section:
    blocks: list[Block] = []
    lat = get(run.clients, "latency_per_iteration")
    if isinstance(lat, dict) and lat.get("total_s") is None:
        blocks.append(para("This method keeps whole networks on every client: there is no per-iteration traffic "
                           "to simulate (its models travel once per round).", note=True))
    elif isinstance(lat, dict):
        blocks.append(Table(["per iteration (simulated)", "value"], [
            ["total", seconds(lat.get("total_s"))], ["server stages", seconds(lat.get("server_s"))],
            ["client stages", seconds(lat.get("client_s"))],
            ["cut-selection objective", num(lat.get("objective"), 4)],
            ["each synchronisation (weights up and back)", seconds(lat.get("sync_s"))],
            ["each epoch end (networks moved)", seconds(lat.get("epoch_s"))]]))
        stages = lat.get("stages")
        if isinstance(stages, dict) and stages:
            png = plots.stage_bars(stages, "simulated latency of one iteration by stage")
            blocks.append(Image("latency_stages", png, "per-iteration latency by stage",
                                "The stages run one after another; each lasts as long as its slowest participant."))
    else:
        blocks.append(para("No clients.json: the per-stage latency breakdown is not available.", note=True))
    simulated = Line("simulated", run.rounds, [finite(r.latency_s_round) for r in run.metrics], "-o")
    measured = Line("measured", run.rounds, [finite(r.train_seconds) for r in run.metrics], "-o",
                    color=plots.PALETTE[1])
    panels = [Panel("simulated latency per round", [simulated], "seconds"),
              Panel("wall time per round (this machine)", [measured], "seconds")]
    blocks.append(Image("latency_per_round", plots.curves(panels), "latency per round"))
    blocks += _bytes_blocks(run)
    return "Latency and communication", blocks


def _bytes_blocks(run: Run) -> list[Block]:
    per_round = [r.bytes_round_per_client or [] for r in run.metrics]
    n = min((len(p) for p in per_round), default=0)
    if not n:
        return []
    doms = run.client_domains + ["?"] * (n - len(run.client_domains))
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
    blocks: list[Block] = []
    for domain, rel in (run.eval.samples if run.eval else {}).items():
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
    return "Samples", blocks or _training_samples(run)


def _training_samples(run: Run) -> list[Block]:
    found = sorted((int(m.group(1)), int(m.group(2)), p) for p in (run.path / "samples").glob("round_*_cluster_*.png")
                   if (m := _SAMPLE.search(p.name)))
    if not found:
        return [para("No sample grids in the run directory.")]
    newest = found[-1][0]
    row = next((r for r in run.metrics if r.round == newest), None)
    clusters, doms = row.clusters if row else [], run.client_domains
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
    section_losses, section_latency, section_samples, section_config]
