"""What the server can infer from what crosses the seam, per cut and per defence, next to the
generation quality of the same run (issue 30, item 1).

Run:  python benchmarks/bench_leakage.py                      # the default run at two cuts, about 10 min on 2 cores
      python benchmarks/bench_leakage.py --json leakage.json  # also the rows as JSON
      python benchmarks/bench_leakage.py --set train.rounds=2 --cuts shallow   # a quick look
      python benchmarks/bench_leakage.py --defences noise0.1 noise1   # the seam-noise rows, about 15 min
      python benchmarks/bench_leakage.py --defences hidden_ends       # heads and tails the server never learns
      python benchmarks/bench_leakage.py --defences none labels_tail labels_tail_hidden   # labels out, about 25 min

For each cut (``CUTS``: every client at the same [G head, G tail, D head, D tail]) and defence
(``DEFENCES``: config overrides), one default ``huscf train`` run trains to the end; then the
attacks look at what the server would receive in one more epoch, computed with the weights the
run ended with. Those are the weights the server itself averaged at the last round end, so it
knows every client's head exactly (the threat of issue 30: an honest-but-curious server).

What the server receives, per client and batch: the G head's output on the batch's noise and
labels (the fakes' labels are the real batch's), and the D head's output on the real batch and on
the fakes, each with its labels; and the gradients the client returns for what the server sent
its tails: the D tail's on the real rows and on the fakes (the discriminator step), on the fakes
again and the G tail's (the generator step), computed with the run's losses and weights (through
the seam, so noised as in training when the run noises). The attacks:

* ``label_acc``: a logistic regression (scikit-learn, standardised inputs) trained on a random half
  of the epoch's rows, tested on the other half; the best of seven views (G head; D head on real
  rows; D head on fake rows; and the four returned gradients: ``grad_d_real``, ``grad_d_fake``,
  ``grad_d_gen``, ``grad_g``), each also printed. Chance: 1 / classes.
* ``label_acc_d_real_no_label``, ``label_acc_pixels`` (printed, not in ``label_acc``: not sent): the
  same probe on the D head's rows of the real images with every label set to 0 (never noised), and
  on the real images' pixels: what a head without the label (a label kept out of what crosses)
  would leave.
* ``real_fake_acc``: the same probe telling the D head's real rows from its fake rows (chance 0.5;
  the fake rows are the same batches' fakes, as sent), or the discriminator step's returned
  gradients of the real rows from those of the fakes (``real_fake_acc_grad``), the better of the two.
* ``real_fake_acc_grad_unlabelled`` (printed and in the JSON, not in ``real_fake_acc``): what a
  server with no labelled rows and no row order learns from the discriminator step's returned
  gradients, real and fake pooled (what it would get if the client sent its real and fake rows as
  one shuffled batch): each row's side of the rows' first (uncentred) singular direction, scored
  under the better of the two namings (chance 0.5; ``unlabelled_split_accuracy``).
* ``exact_labels``: the share of one batch's labels per client the server recovers exactly from
  the G head's output, knowing the head's weights and the noise (the noise follows from the run's
  seed, which is in the config the server holds): start from the probe's guesses, then change one
  row's label at a time to the one whose head output is closest, until nothing changes (BatchNorm
  ties a row's output to its batch, so rows are not independent).
* ``psnr_db``: images reconstructed from the D head's output on one real batch per client by
  gradient descent on the input (Adam, ``INVERT_STEPS`` steps from a grey image, the labels given:
  the probe recovers them at ``label_acc``), PSNR against the real images (range [-1, 1]).
* ``tstr_acc``, ``fid``: ``huscf evaluate`` of the run's last round (cluster generators).

Raw outputs without ``real_fake_acc_grad`` come from the first version, which probed the activations
only: their ``label_acc`` and ``real_fake_acc`` are the activation views' best.

A defence that hides weights changes what the attacks know: with ``federation.hide_ends`` the server
never learns a client's first or last block (federation/secagg.py), not even as they started (they
are drawn from a seed derived from the signing key), so the exact-label search and the inversion
use the best it has: those blocks as the config's public seed would have made them, with the
middle blocks it averaged (``known_segments``).

A defence that moves the label changes what is sent: with ``model.labels: tail`` (models/cgan.py)
neither head takes the label, so the G head's rows are a function of the noise alone and the D
head's of the image alone; the label enters the client's last block of each net, and the
gradients the tails return depend on it there. The exact-label search then has nothing to match
(every label gives the same head output): it keeps the probe's guesses.

A defence that changes what is sent changes the server's view with it: with ``privacy.seam_noise``
(split/noise.py) every row above is clipped and noised as the client sends it, and the attacks
know the clipping rule (the exact-label search and the inversion compare clipped head outputs with
the noisy rows); ``epsilon`` is then the run's (epsilon, ``privacy.delta``) after its last round.

Rows are printed as a table and, with ``--json``, written as a list of objects with keys ``cut``,
``defence``, ``label_acc``, ``real_fake_acc``, ``psnr_db``, ``tstr_acc``, ``fid`` (and the views'
probes, ``exact_labels``, ``epsilon``, the run's seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from provenance import made_line  # noqa: E402

from huscf.engines.objective import FAKE, REAL, bce  # noqa: E402
from huscf.split.seam import SeamRecorder  # noqa: E402

CUTS = {"shallow": (0, 0, 0, 0), "deep": (2, 0, 2, 0)}  # [G head, G tail, D head, D tail] for every client
# name: config overrides. The noise levels were fixed before any run with them: a decade apart
DEFENCES: dict[str, tuple[str, ...]] = {"none": (), "noise0.1": ("privacy.seam_noise=0.1",),
                                        "noise1": ("privacy.seam_noise=1.0",),
                                        "hidden_ends": ("federation.secure_aggregation=true",
                                                        "federation.hide_ends=true"),
                                        "labels_tail": ("model.labels=tail",),
                                        "labels_tail_hidden": ("model.labels=tail",
                                                               "federation.secure_aggregation=true",
                                                               "federation.hide_ends=true")}
EVAL = {"samples": 500, "tstr_samples": 1000, "tstr_min_steps": 100}
INVERT_STEPS = 300
ROWS_PER_CLIENT = 256  # the epoch's rows each client contributes to the probes (its whole share when smaller)
# in the order ``returned_gradients`` makes them
GRADIENT_VIEWS = ("grad_d_real", "grad_d_fake", "grad_d_gen", "grad_g")


def returned_gradients(model, i: int, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradients client ``i`` returns the server for one batch, as the objective's steps 2 and 3
    make them (engines/objective.py; the loss of each pass back-propagated alone, which for step 2's
    sum of two losses gives the same gradients), taken from the seam as they cross (noised there
    when the run noises). The weights are not stepped; their gradients are dropped."""
    rec = model.seam.recorder = SeamRecorder(capture=True)
    try:
        with torch.enable_grad():
            bce(model.discriminate(i, x, y), REAL).backward()
            fake = model.generate(i, z, y)
            bce(model.discriminate(i, fake.detach(), y), FAKE).backward()
            bce(model.discriminate(i, fake, y), REAL).backward()  # the D tail's, then the G tail's
    finally:
        model.seam.recorder = None
        model.zero_grad(set_to_none=True)
    sent = [c.tensor for c in rec.crossings if c.kind == "gradient" and c.direction == "client->server"]
    assert len(sent) == len(GRADIENT_VIEWS), f"client {i} returned {len(sent)} gradients"  # a cut without a seam
    return dict(zip(GRADIENT_VIEWS, sent))


def server_view(model, data: list, batch_size: int, z_dim: int, seed: int) -> list[dict]:
    """Per client, what its head sends in one epoch of ``batch_size`` batches (at most
    ``ROWS_PER_CLIENT`` rows): ``g`` (G head on z, y), ``d_real``, ``d_fake`` (D head), each as
    sent (through the model's seam noise, when the run has one), with ``y``, ``z`` and ``x`` (the
    real rows) kept for scoring and one ``batches`` list of (start, end). Not sent, for the
    question whether a head without the label would hide it: ``d_real_no_label``, the D head on
    the real rows with every label set to 0 (its label plane then carries nothing), never noised.
    And the gradients it returns (``returned_gradients``: ``GRADIENT_VIEWS``)."""
    sent = model.seam.noise or (lambda t: t)
    out = []
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, d in enumerate(data):
            seg = model.clients[i]
            order = torch.randperm(len(d), generator=gen)[:ROWS_PER_CLIENT]
            view = {k: [] for k in ("g", "d_real", "d_fake", "d_real_no_label", "y", "z", "x", *GRADIENT_VIEWS)}
            batches, start = [], 0
            for b in range(0, len(order), batch_size):
                idx = order[b:b + batch_size]
                if len(idx) < 2:  # BatchNorm needs two rows, as in training
                    continue
                x, y = d.x[idx], d.y[idx]
                z = torch.randn(len(idx), z_dim, generator=gen)
                fake = model.generate(i, z, y)
                for key, v in (("g", sent(seg.run_head("G", (z, y)))), ("d_real", sent(seg.run_head("D", (x, y)))),
                               ("d_fake", sent(seg.run_head("D", (fake, y)))),
                               # as the head computes it, not noised: a draw here would move the seam
                               # noise of every later row, and the rows above would not rerun as kept
                               ("d_real_no_label", seg.run_head("D", (x, torch.zeros_like(y)))),
                               ("y", y), ("z", z), ("x", x)):
                    view[key].append(v)
                for key, v in returned_gradients(model, i, x, y, z).items():
                    view[key].append(v)
                batches.append((start, start + len(idx)))
                start += len(idx)
            out.append({k: torch.cat(v) for k, v in view.items()} | {"batches": batches})
    return out


def _probe(seed: int):
    """The server's probe: a logistic regression on standardised inputs (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, random_state=seed))


def probe_accuracy(features: np.ndarray, labels: np.ndarray, seed: int) -> float:
    """Test accuracy of the probe trained on a random half of the rows."""
    order = np.random.default_rng(seed).permutation(len(labels))
    train, test = order[: len(order) // 2], order[len(order) // 2:]
    clf = _probe(seed)
    clf.fit(features[train], labels[train])
    return float((clf.predict(features[test]) == labels[test]).mean())


def probe_predictions(features: np.ndarray, labels: np.ndarray, rows: np.ndarray, seed: int) -> np.ndarray:
    """The probe's guesses for ``rows``, trained on the other rows (the server's first guess)."""
    rest = np.setdiff1d(np.arange(len(labels)), rows)
    clf = _probe(seed)
    clf.fit(features[rest], labels[rest])
    return clf.predict(features[rows])


def unlabelled_split_accuracy(rows: np.ndarray, truth: np.ndarray) -> float:
    """Split ``rows`` in two with no labels and no order: the sign of each row's projection on the
    rows' first singular direction (uncentred: rows (sigmoid(logit) - target) w lie on one line
    through 0, real on one side, fake on the other); the share of rows whose side matches ``truth``
    (bool), under the better of the two ways to name the sides."""
    _, _, vt = np.linalg.svd(rows.astype(np.float64), full_matrices=False)
    side = rows @ vt[0] > 0
    agree = float((side == truth.astype(bool)).mean())
    return max(agree, 1.0 - agree)


def exact_labels(seg, z: torch.Tensor, sent: torch.Tensor, guess: np.ndarray, classes: int,
                 sweeps: int = 4, clip=lambda t: t) -> np.ndarray:
    """Labels whose G head output, with the known noise and weights (and ``clip``, the seam's
    clipping rule), matches ``sent``: from ``guess``, each row in turn takes the label that brings
    the batch's output closest, until a sweep changes nothing."""
    y = torch.as_tensor(guess, dtype=torch.long).clone()
    with torch.no_grad():
        for _ in range(sweeps):
            changed = False
            for r in range(len(y)):
                before, best, best_err = int(y[r]), int(y[r]), math.inf
                for c in range(classes):
                    y[r] = c
                    err = float((clip(seg.run_head("G", (z, y))) - sent).square().sum())
                    if err < best_err:
                        best, best_err = c, err
                y[r] = best
                changed |= best != before
            if not changed:
                break
    return y.numpy()


def invert_images(seg, sent: torch.Tensor, y: torch.Tensor, image_shape: tuple, steps: int,
                  clip=lambda t: t) -> torch.Tensor:
    """The images whose D head output (known weights, labels given; ``clip``: the seam's clipping
    rule) is closest to ``sent``."""
    u = torch.zeros(len(y), *image_shape, requires_grad=True)
    opt = torch.optim.Adam([u], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = (clip(seg.run_head("D", (torch.tanh(u), y))) - sent).square().mean()
        loss.backward()
        opt.step()
    return torch.tanh(u).detach()


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR over images, for images in [-1, 1] (peak-to-peak 2)."""
    mse = (a - b).flatten(1).square().mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(4.0 / mse)).mean())


def known_segments(model, initial) -> list:
    """Each client's segment as a server under ``federation.hide_ends`` knows it: ``model``'s, with
    every net's first and last block from ``initial`` (the run's model before training)."""
    import copy

    out = []
    for seg, start in zip(model.clients, initial.clients):
        seg = copy.deepcopy(seg)
        for net, blocks in seg.nets.items():
            for b in {"0", str(model.num_blocks[net] - 1)}:
                blocks[b].load_state_dict(start.nets[net][b].state_dict())
        out.append(seg)
    return out


def attack(model, data: list, arch, batch_size: int, seed: int, say=print, known: list | None = None) -> dict:
    """Every attack on the server's view of one epoch of a trained model (module docstring);
    ``known``: the client segments the server knows (default: ``model``'s, which it averaged)."""
    known = model.clients if known is None else known
    view = server_view(model, data, batch_size, arch.z_dim, seed)
    noise = model.seam.noise  # the attacker knows the clipping rule, not the noise
    clip = (lambda t: t) if noise is None else noise.clipped
    classes = arch.num_classes
    flat = lambda key: torch.cat([v[key].flatten(1) for v in view]).numpy()  # noqa: E731
    y = torch.cat([v["y"] for v in view]).numpy()
    probes = {k: probe_accuracy(flat(k), y, seed) for k in ("g", "d_real", "d_fake", *GRADIENT_VIEWS)}
    real_or_fake = np.r_[np.ones(len(y)), np.zeros(len(y))].astype(int)
    real_fake = probe_accuracy(np.concatenate([flat("d_real"), flat("d_fake")]), real_or_fake, seed)
    d_step_grads = np.concatenate([flat("grad_d_real"), flat("grad_d_fake")])
    real_fake_grad = probe_accuracy(d_step_grads, real_or_fake, seed)
    real_fake_unlabelled = unlabelled_split_accuracy(d_step_grads, real_or_fake)
    exact, psnr = [], []
    g_all, offset = flat("g"), 0
    for i, v in enumerate(view):
        s, e = v["batches"][0]
        rows = np.arange(offset + s, offset + e)
        guess = probe_predictions(g_all, y, rows, seed)
        found = exact_labels(known[i], v["z"][s:e], v["g"][s:e], guess, classes, clip=clip)
        exact.append(float((found == v["y"][s:e].numpy()).mean()))
        x_hat = invert_images(known[i], v["d_real"][s:e], v["y"][s:e], tuple(arch.image_shape), INVERT_STEPS,
                              clip=clip)
        psnr.append(psnr_db(x_hat, v["x"][s:e]))
        offset += len(v["y"])
    # not what the server receives: what a D head without the label would leave, and the images
    blind = {k: probe_accuracy(flat(k), y, seed) for k in ("d_real_no_label", "x")}
    say(f"  probes on {len(y)} rows (chance {1 / classes:.2f}): G head {probes['g']:.3f}, D head real "
        f"{probes['d_real']:.3f}, D head fake {probes['d_fake']:.3f}; returned gradients: D real "
        f"{probes['grad_d_real']:.3f}, D fake {probes['grad_d_fake']:.3f}, D in the G step {probes['grad_d_gen']:.3f}, "
        f"G {probes['grad_g']:.3f}; real vs fake {real_fake:.3f} (gradients {real_fake_grad:.3f}; gradients with "
        f"no labelled rows and no order {real_fake_unlabelled:.3f}); exact labels "
        f"{np.mean(exact):.3f} of a batch per client; PSNR {np.mean(psnr):.1f} dB "
        f"(per client {' '.join(f'{p:.1f}' for p in psnr)})")
    say(f"  not sent: D head real with no label {blind['d_real_no_label']:.3f}; the real images' pixels "
        f"{blind['x']:.3f}")
    return {"label_acc": max(probes.values()), "label_acc_g": probes["g"], "label_acc_d_real": probes["d_real"],
            "label_acc_d_fake": probes["d_fake"], **{f"label_acc_{k}": probes[k] for k in GRADIENT_VIEWS},
            "real_fake_acc": max(real_fake, real_fake_grad), "real_fake_acc_activations": real_fake,
            "real_fake_acc_grad": real_fake_grad, "real_fake_acc_grad_unlabelled": real_fake_unlabelled,
            "exact_labels": float(np.mean(exact)),
            "psnr_db": float(np.mean(psnr)), "rows": int(len(y)),
            "label_acc_d_real_no_label": blind["d_real_no_label"], "label_acc_pixels": blind["x"]}


def run_row(cut: str, defence: str, out: Path, sets: list[str], ev: dict, say=print) -> dict:
    """Train the default run at ``cut`` with ``defence`` (resuming a finished run), evaluate it, attack it."""
    from huscf.config import build_config
    from huscf.metrics.evaluate import evaluate_run
    from huscf.rundir import read_eval, read_rounds
    from huscf.rundir.records import EvalSettings
    from huscf.trainer import Trainer

    overrides = ["cuts.method=fixed", f"cuts.fixed=[{','.join(map(str, CUTS[cut]))}]", "output.samples_every=0",
                 *DEFENCES[defence], *sets]
    cfg = build_config({}, overrides)
    run = out / f"{cut}_{defence}"
    start = time.perf_counter()
    if (run / "eval.json").is_file():
        t = Trainer.resume(run, quiet=True)  # finished before: its last checkpoint, nothing to train
    else:
        if run.exists():
            import shutil

            shutil.rmtree(run)  # an unfinished run of this benchmark: start it again
        t = Trainer.new(cfg, run, quiet=True)
        t.fit()
        evaluate_run(run, EvalSettings(**ev), rounds="last", quiet=True)
    seconds = time.perf_counter() - start
    final = read_eval(run / "eval.json").final
    tstr = float(np.mean([f.tstr["accuracy"] for f in final])) if all(f.tstr for f in final) else float("nan")
    fid = float(np.mean([f.fid for f in final]))
    say(f"{cut} {list(CUTS[cut])}, defence {defence}: trained and evaluated in {seconds:.0f} s; TSTR accuracy "
        f"{tstr:.3f}, FID {fid:.1f} ({len(final)} generators)")
    known = None
    if cfg.federation.hide_ends:
        import tempfile

        # the best the server knows: the ends as the config's public seed makes them (they started
        # from a seed only the signing key gives, which it does not hold)
        public = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"hide_ends": False})})
        with tempfile.TemporaryDirectory() as tmp:
            known = known_segments(t.model, Trainer.new(public, Path(tmp) / "initial", quiet=True).model)
    leaks = attack(t.model, t.setup.data, t.setup.arch, cfg.train.batch_size, cfg.seed, say=say, known=known)
    eps = read_rounds(run / "metrics.jsonl")[-1].seam_epsilon  # None: nothing noised
    return {"cut": ",".join(map(str, CUTS[cut])), "defence": defence, **leaks, "tstr_acc": tstr, "fid": fid,
            "epsilon": eps, "seconds": round(seconds, 1)}


def table(rows: list[dict]) -> str:
    lines = ["| cut | defence | label acc (G / D real / D fake; gradients D real / D fake / D gen / G) | exact labels "
             "| real vs fake (activations / gradients) | PSNR dB | TSTR acc | FID | epsilon |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        views = " / ".join(f"{r[f'label_acc_{k}']:.3f}" for k in ("g", "d_real", "d_fake"))
        grads = " / ".join(f"{r[f'label_acc_{k}']:.3f}" for k in GRADIENT_VIEWS)
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.3g}"
        real_fake = f"{r['real_fake_acc_activations']:.3f} / {r['real_fake_acc_grad']:.3f}"
        lines.append(f"| {r['cut']} | {r['defence']} | {r['label_acc']:.3f} ({views}; {grads}) "
                     f"| {r['exact_labels']:.3f} "
                     f"| {r['real_fake_acc']:.3f} ({real_fake}) | {r['psnr_db']:.1f} | {r['tstr_acc']:.3f} "
                     f"| {r['fid']:.1f} | {eps} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_leakage_out", help="run directories (default ./bench_leakage_out)")
    ap.add_argument("--cuts", nargs="+", choices=list(CUTS), default=list(CUTS))
    ap.add_argument("--defences", nargs="+", choices=list(DEFENCES), default=["none"],
                    help="default: none (the defended rows run with --defences, each about 4-8 min a cut)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as a JSON list")
    args = ap.parse_args()
    say = lambda m: print(m, flush=True)  # noqa: E731
    say(f"bench_leakage: default run + {' '.join(args.set) or 'nothing'}; cuts "
        f"{', '.join(f'{c} {list(CUTS[c])}' for c in args.cuts)}; defences {', '.join(args.defences)}; "
        f"evaluation {EVAL}; inversion {INVERT_STEPS} steps; at most {ROWS_PER_CLIENT} rows per client")
    say(made_line())
    from huscf.errors import HuscfError

    rows = []
    try:
        for cut in args.cuts:
            for defence in args.defences:
                rows.append(run_row(cut, defence, Path(args.out), args.set, EVAL, say=say))
    except HuscfError as exc:
        raise SystemExit(f"bench_leakage: {exc}") from None
    say("")
    say(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
        say(f"wrote {args.json}")


if __name__ == "__main__":
    main()
