"""``huscf evaluate``: score a run's generators per round and in full at its last round.

Which generator is a domain's? After clustered averaging the members of a cluster share their
client-side blocks, so by default one generator per cluster and domain is evaluated: that of its
first member of the domain, assembled from the member's own blocks and the server's. Any single
client's generator can be evaluated instead (``client=``), or every client's (``every_client``:
members with other cuts hold other blocks, so their generators differ). Every generator is asked
for all of its domain's classes, also those its client never saw. Generators with identical
weights (FedGAN's clients, a cluster's members with equal cuts) are scored once and the scores
shared; the real-data ceiling is trained once per domain.

Per evaluated round and generator: the generation score (exp E KL(p(y|x) || p(y)) with the real
domain's classifier) and the classifier-feature FID against the real test split (or, with
``fid_reference="heldout"``, against training images the run never used: a choice made on that
FID never sees the test split). At the final
evaluated round additionally: train-on-synthetic-test-on-real (TSTR) metrics and the same CNN
trained on as many real images (the ceiling). Everything is computed before anything is written;
``eval.json``, ``eval.csv`` and ``eval_samples/`` then appear together.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from huscf.config import load_run_config
from huscf.data import load_domain, to_tensor
from huscf.data.audio import images_to_waves, write_wav
from huscf.engines.threads import ThreadPolicy
from huscf.errors import HuscfError
from huscf.metrics.classifiers import load_or_train
from huscf.metrics.grids import class_grid_inputs, save_grid
from huscf.metrics.scores import classifier_fid, classifier_probs, generation_score, inception_fid_available
from huscf.metrics.tstr import real_ceiling, tstr
from huscf.models import build_architecture
from huscf.models.blocks import BlockNet
from huscf.rundir import (EvalRecord, EvalSettings, FinalScore, GeneratorRef, GeneratorScore, RunDir,
                          check_model_state)
from huscf.split.plan import Cuts
from huscf.split.segments import SplitGAN


def sample_generator(g: BlockNet, num_classes: int, z_dim: int, n: int, seed: int, chunk: int = 500,
                     what: str = "generator") -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples with labels drawn uniformly (seeded), in chunks with batch-statistics BatchNorm
    as in training; raises ``HuscfError`` if the generator emits NaN or inf."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    z = torch.randn(n, z_dim, generator=gen)
    g = g.train()
    with torch.no_grad():
        x = torch.cat([g(z[i:i + chunk], y[i:i + chunk]) for i in range(0, n, chunk)])
    if not torch.isfinite(x).all():
        raise HuscfError(f"{what} emitted non-finite values (NaN/inf): it cannot be evaluated")
    return x, y


def cluster_generators(groups: list[int], domains: list[str], r: int, client: int | None = None,
                       every_client: bool = False) -> list[GeneratorRef]:
    """The generators to evaluate at round ``r``: for each cluster and each domain among its
    members, the first member of that domain (so every domain is scored, also when one model is
    shared by all domains, as in FedGAN); or only ``client``'s own generator; or, with
    ``every_client``, every client's that took part in round ``r``."""
    members = {g: [i for i, gi in enumerate(groups) if gi == g] for g in set(groups)}
    if client is not None:
        if not 0 <= client < len(domains):
            raise HuscfError(f"--client {client}: the run has clients 0..{len(domains) - 1}")
        chosen = [client]
    elif every_client:
        chosen = [i for i, g in enumerate(groups) if g != -1]
    else:  # -1: a client absent from that round's aggregation
        chosen = [next(i for i in members[g] if domains[i] == domain) for g in sorted(set(groups) - {-1})
                  for domain in dict.fromkeys(domains[i] for i in members[g])]
    return [GeneratorRef(round=r, cluster=groups[i], client=i, domain=domains[i], members=members[groups[i]])
            for i in chosen]


def _parse_rounds(spec: str, available: list[int]) -> list[int]:
    if spec in ("all", "last"):
        return available if spec == "all" else available[-1:]
    if spec.startswith("every:"):
        step = spec.removeprefix("every:")
        if not step.isdigit() or int(step) < 1:
            raise HuscfError(f"--rounds every:N needs a whole number N >= 1, got {spec!r}")
        return sorted({r for r in available if r % int(step) == 0} | {available[-1]})
    try:
        wanted = sorted({int(x) for x in spec.split(",")})
    except ValueError:
        raise HuscfError(f"--rounds: expected all, last, every:N or a comma list of rounds, got {spec!r}") from None
    if missing := [r for r in wanted if r not in available]:
        raise HuscfError(f"--rounds: no checkpoint for round(s) {missing}; available: {available[0]}..{available[-1]}")
    return wanted


class RunEvaluator:
    """Loads a run's split model at any checkpointed round and picks its generators."""

    def __init__(self, run_dir: Path, data_dir: str | None = None, allow_unsigned: bool = False):
        self.run = RunDir(run_dir, allow_unsigned=allow_unsigned)
        self.run.check_no_links()
        if not self.run.config.is_file() or not (self.run.path / "clients.json").is_file():
            raise HuscfError(f"{run_dir} is not a huscf run directory (config.yaml or clients.json missing)")
        self.cfg = load_run_config(self.run.config, [f"data.data_dir={data_dir}"] if data_dir else [])
        clients_json = self.run.path / "clients.json"
        try:
            self.clients = json.loads(clients_json.read_text(encoding="utf-8"))["clients"]
            cuts = [Cuts(*c["cuts"]) for c in self.clients]
            self.domains = [c["domain"] for c in self.clients]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
            raise HuscfError(f"cannot read {clients_json}: damaged or not written by huscf train") from None
        self.rows = {r.round: r for r in self.run.read_rounds()}
        self.rounds = [r for r, _ in self.run.list_checkpoints() if r in self.rows]
        if not self.rounds:
            raise HuscfError(f"run {run_dir} has no finished round with a checkpoint: nothing to evaluate")
        self.test = {d: load_domain(d, "test", self.cfg.data.data_dir) for d in self.cfg.data.domains}
        num_classes = self.cfg.model.num_classes or max(t.num_classes for t in self.test.values())
        self.arch = build_architecture(self.cfg.model.arch, self.cfg.model.width, num_classes,
                                       tuple(next(iter(self.test.values())).images.shape[1:]),
                                       label_at=self.cfg.model.labels)
        # a per-cluster run's checkpoints hold its cluster bodies
        self.model = SplitGAN(self.arch.generator(), self.arch.discriminator(), cuts,
                              cluster_bodies=self.cfg.cluster_bodies)

    def load_round(self, r: int) -> None:
        state = self.run.load_model_state(r)
        # names and shapes checked first: another architecture, width or cuts than config.yaml's is one line
        check_model_state(self.model.state_dict(), state, f"round {r}'s checkpoint in {self.run.path}")
        self.model.load_state_dict(state)

    def generators(self, r: int, client: int | None = None, every_client: bool = False) -> list[GeneratorRef]:
        """The generators to evaluate at round r (one per cluster, one client's, or every client's)."""
        return cluster_generators(self.rows[r].clusters, self.domains, r, client, every_client)

    def fingerprint(self, gen: GeneratorRef) -> tuple[str, str]:
        """(domain, digest of the generator's weights): equal for generators that sample the same."""
        h = hashlib.blake2b(digest_size=16)
        for t in self.model.assemble(gen.client, "G").state_dict().values():
            h.update(t.detach().contiguous().cpu().numpy().tobytes())
        return gen.domain, h.hexdigest()

    def sample(self, gen: GeneratorRef, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        what = f"the generator of cluster {gen.cluster} (client {gen.client}) at round {gen.round}"
        return sample_generator(self.model.assemble(gen.client, "G"), self.test[gen.domain].num_classes,
                                self.arch.z_dim, n, seed, what=what)


FID_REFERENCES = ("test", "heldout")
HELDOUT_MAX = 10000  # held-out training images the FID compares with, at most (a test split's size)
HELDOUT_MIN = 500  # fewer make the FID's covariance too noisy to choose by


def heldout_images(cfg) -> dict[str, torch.Tensor]:
    """Per domain, the training images a run with ``cfg`` never saw: those after the first
    ``data.limit_per_domain`` (at most ``HELDOUT_MAX``), as [-1, 1] tensors."""
    limit = cfg.data.limit_per_domain
    if limit is None:
        raise HuscfError("--fid-reference heldout needs a run with data.limit_per_domain set: without it the run "
                         "trained on every training image and none is held out")
    out = {}
    for d in cfg.data.domains:
        images = load_domain(d, "train", cfg.data.data_dir).images[limit: limit + HELDOUT_MAX]
        if len(images) < HELDOUT_MIN:
            raise HuscfError(f"--fid-reference heldout: {d} has {len(images)} training images beyond "
                             f"data.limit_per_domain={limit}, fewer than {HELDOUT_MIN}: lower the limit")
        out[d] = to_tensor(images)
    return out


def evaluate_run(run_dir: Path, settings: EvalSettings, *, rounds: str = "all", data_dir: str | None = None,
                 quiet: bool = False, allow_unsigned: bool = False) -> Path:
    """Evaluate ``rounds`` ("all", "last" or a list such as "1,5-7") of a run as ``settings`` say
    (``allow_unsigned``: load checkpoints without a signature, ``rundir/signing.py``); writes
    ``eval.json`` (with the settings and the rounds), ``eval.csv`` and ``eval_samples/``."""
    samples, tstr_samples, seed, client, every_client = (settings.samples, settings.tstr_samples, settings.seed,
                                                         settings.client, settings.every_client)
    if samples < 10 or tstr_samples < 0:
        raise HuscfError("--samples must be >= 10 and --tstr-samples >= 0")
    if settings.fid_reference not in FID_REFERENCES:
        raise HuscfError(f"--fid-reference must be one of {', '.join(FID_REFERENCES)}, got {settings.fid_reference!r}")
    ev = RunEvaluator(run_dir, data_dir, allow_unsigned)
    # the run's thread policy (train.threads), as in training: on a busy machine ``auto`` takes
    # the cores the others leave, and a fixed count stays fixed (engines/threads.py)
    threads = ThreadPolicy(ev.cfg.train.threads)
    todo = _parse_rounds(rounds, ev.rounds)
    say = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    classifiers, clf_info = {}, {}
    for d in ev.cfg.data.domains:
        say(f"classifier for {d} ...")
        classifiers[d], info = load_or_train(d, ev.cfg.data.data_dir, progress=not quiet)
        clf_info[d] = {"test_accuracy": info["test_accuracy"], "data_hash": info["data_hash"]}
    real_test = {d: (to_tensor(t.images), torch.as_tensor(np.array(t.labels))) for d, t in ev.test.items()}
    fid_real = ({d: x for d, (x, _) in real_test.items()} if settings.fid_reference == "test"
                else heldout_images(ev.cfg))

    per_round: list[GeneratorScore] = []
    final: list[FinalScore] = []
    grids = {}
    fingerprints: dict[int, tuple] = {}  # the last evaluated round's, by client: reused for TSTR
    t0 = time.perf_counter()
    for k, r in enumerate(todo):
        threads.adjust()
        ev.load_round(r)
        scored: dict[tuple, dict] = {}  # identical generators (same domain and weights) scored once
        fingerprints.clear()
        for gen in ev.generators(r, client, every_client):
            key = fingerprints[gen.client] = ev.fingerprint(gen)
            if key not in scored:
                x, _ = ev.sample(gen, samples, seed)
                clf = classifiers[gen.domain]
                scored[key] = {"generation_score": round(generation_score(classifier_probs(clf, x)), 4),
                               "fid": round(classifier_fid(clf, fid_real[gen.domain], x), 4)}
            per_round.append(GeneratorScore(round=gen.round, cluster=gen.cluster, client=gen.client,
                                            domain=gen.domain, **scored[key]))
        say(f"round {r}: " + ", ".join(f"{p.domain}/c{p.cluster} score {p.generation_score:.2f} "
                                       f"FID {p.fid:.1f}" for p in per_round if p.round == r)
            + f"  ({k + 1}/{len(todo)}, {time.perf_counter() - t0:.0f} s)")

    last = todo[-1]  # still loaded: the loop above ended on it (sampling copies, never changes, the model)
    generators = ev.generators(last, client, every_client)
    tstr_done: dict[tuple, dict] = {}
    ceilings: dict[str, dict] = {}
    for gen in generators:
        threads.adjust()
        d = gen.domain
        entry = FinalScore(**next(p for p in per_round if p.round == last and p.client == gen.client).to_json())
        nc = ev.test[d].num_classes
        if tstr_samples:
            key = fingerprints[gen.client]
            if key not in tstr_done:
                say(f"TSTR for {d} (cluster {gen.cluster}, client {gen.client}): "
                    f"{tstr_samples} synthetic images ...")
                xs, ys = ev.sample(gen, tstr_samples, seed + 1)
                tstr_done[key] = tstr(xs, ys, *real_test[d], nc, epochs=settings.tstr_epochs, seed=seed,
                                      min_steps=settings.tstr_min_steps)
            entry.tstr = tstr_done[key]
            if d not in ceilings:
                n_real = min(tstr_samples, len(load_domain(d, "train", ev.cfg.data.data_dir)))
                ceilings[d] = real_ceiling(d, n_real, data_dir=ev.cfg.data.data_dir, epochs=settings.tstr_epochs,
                                           seed=seed, min_steps=settings.tstr_min_steps) | {"train_images": n_real}
            entry.real_ceiling = ceilings[d]
        final.append(entry)
        if d not in grids:
            g = ev.model.assemble(gen.client, "G").train()
            z, y = class_grid_inputs(nc, 8, ev.arch.z_dim, seed)  # 8 samples per class
            with torch.no_grad():
                grids[d] = (g(z, y), nc)

    available, reason = inception_fid_available()
    result = EvalRecord(
        run_dir=str(ev.run.path), created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        settings=dataclasses.replace(settings, rounds=todo), classifiers=clf_info,
        inception_fid={"available": available, "reason": reason}, generators=generators,
        per_round=per_round, final=final, samples={d: f"eval_samples/{d}.png" for d in grids},
        # spoken digits: the first sample of every class's grid row inverted to audio (Griffin-Lim)
        audio={d: [f"eval_samples/{d}_class{c}.wav" for c in range(nc)] for d, (_, nc) in grids.items()
               if ev.test[d].kind == "spectrogram"},
    )
    _write_outputs(ev.run.path, result, grids)
    say(f"wrote {ev.run.path / 'eval.json'} and eval.csv")
    return ev.run.path / "eval.json"


CSV_FIELDS = ["round", "domain", "cluster", "client", "generation_score", "fid", "tstr_accuracy", "tstr_precision",
              "tstr_recall", "tstr_f1", "tstr_fpr", "real_accuracy", "real_precision", "real_recall", "real_f1",
              "real_fpr"]


def _csv_text(final: list[FinalScore]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    for e in final:
        row = {k: getattr(e, k) for k in ("round", "domain", "cluster", "client", "generation_score", "fid")}
        for prefix, scores in (("tstr", e.tstr), ("real", e.real_ceiling)):
            for m in ("accuracy", "precision", "recall", "f1", "fpr"):
                row[f"{prefix}_{m}"] = scores[m] if scores else ""
        w.writerow(row)
    return buf.getvalue()


def _write_outputs(run: Path, result: EvalRecord, grids: dict) -> None:
    stage = run / ".eval.tmp"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "eval_samples").mkdir(parents=True)
    for d, (images, rows) in grids.items():
        save_grid(images, rows, stage / "eval_samples" / f"{d}.png")
    for d, paths in result.audio.items():
        images, rows = grids[d]
        waves = images_to_waves(images[::len(images) // rows].float().clamp(-1, 1).numpy())  # each class's first
        for rel, wave in zip(paths, waves):
            write_wav(stage / rel, wave)
    (stage / "eval.json").write_text(json.dumps(result.to_json(), indent=1))
    (stage / "eval.csv").write_text(_csv_text(result.final))
    shutil.rmtree(run / "eval_samples", ignore_errors=True)
    for name in ("eval_samples", "eval.csv", "eval.json"):
        (stage / name).replace(run / name)
    stage.rmdir()
