"""The round loop of ``huscf train``: build everything from a config, train, federate, record.

``Trainer(cfg, run_dir).fit()`` builds the data partition, the template G/D (one initialisation
broadcast to every client), the cuts, the split model, the engine and the strategy; then runs
rounds of ``local_epochs`` epochs, ends each round with clustering + weighted averaging, and
writes the round's checkpoint, sample grids and metrics line. ``Trainer.resume(run_dir)``
continues from the newest checkpoint and replays exactly what an uninterrupted run would do.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score
from tqdm import tqdm

from huscf.config import RunConfig, load_run_config
from huscf.data import load_domain, to_tensor
from huscf.engines.batched import BatchedEngine
from huscf.engines.execution import Execution
from huscf.engines.protocol import Engine
from huscf.engines.simulation import SimulationEngine
from huscf.engines.threads import ThreadPolicy
from huscf.errors import HuscfError
from huscf.federation.clustering import common_feature_depth
from huscf.methods import build_strategy, get_method
from huscf.metrics.classifiers import load_or_train
from huscf.metrics.evaluate import cluster_generators, sample_generator
from huscf.metrics.grids import class_grid_inputs, save_grid
from huscf.metrics.label_probe import LabelProbe
from huscf.metrics.scores import classifier_probs, generation_score
from huscf.rundir import RoundRecord, RunDir, check_model_state
from huscf.runsetup import ClientData, build_setup
from huscf.split.noise import SeamNoise, batches_per_epoch, epsilon, releases_per_record
from huscf.split.segments import SplitGAN


def _losses(per_epoch: list[dict]) -> dict:
    """Mean losses of the round, overall and per client (None for a client with no finished
    iteration, which only the Ray engine's faults and deadlines produce)."""
    out = {}
    for k in ("d", "g"):
        a = np.array([ep[k] for ep in per_epoch], dtype=float)
        seen = ~np.isnan(a)
        per = np.where(seen.any(0), np.nansum(a, 0) / np.maximum(seen.sum(0), 1), np.nan)
        out[f"loss_{k}"] = float(a[seen].mean())
        out[f"loss_{k}_per_client"] = [None if np.isnan(v) else round(float(v), 5) for v in per]
    return out


def merge_info(into: dict, info: dict | None) -> None:
    """A method hook's record (``Method.before_epoch``/``after_epoch``) merged into the round's:
    one level deep, so that each epoch's entries of a key add up."""
    for k, v in (info or {}).items():
        into[k] = into[k] | v if isinstance(v, dict) and isinstance(into.get(k), dict) else v


class Trainer:
    """Runs (or resumes) one training run into a run directory."""

    def __init__(self, cfg: RunConfig, run_dir: Path | RunDir, quiet: bool = False):
        """``run_dir``: a path, or the ``RunDir`` that ``new``/``resume`` already checked (one
        object per run directory, so what they set on it is what the run uses)."""
        self.cfg, self.quiet = cfg, quiet
        self.run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        key = self.run.signing_key(create=True)  # a key that cannot be made or read is one line before any work
        if key.made:
            self._say(f"huscf: made the key that signs your checkpoints, {key.path} (keep it private; resume and "
                      f"evaluate elsewhere need a copy: docs/security.md)")
        self.threads = ThreadPolicy(cfg.train.threads)
        # resolved first: a device that is not there fails before any data loads
        self.execution = Execution.from_config(cfg.compute, cfg.num_clients)
        self.setup = build_setup(cfg)
        s = self.setup
        self.probes = self._label_probes()
        torch.manual_seed(cfg.seed)  # one initialisation, broadcast to every client and the server
        g, d = s.arch.generator(), s.arch.discriminator()
        self.method = get_method(cfg.method)
        self.model = SplitGAN(g, d, s.cuts, cluster_bodies=cfg.cluster_bodies)
        if cfg.federation.hide_ends:  # the ends start where the server cannot know them (docs/security.md)
            with torch.random.fork_rng(devices=[]):  # the public stream goes on as without it
                torch.manual_seed(key.derive_seed(f"hidden ends, seed {cfg.seed}"))
                self.model.load_ends({"G": s.arch.generator(), "D": s.arch.discriminator()})
        self.model.seam.noise = SeamNoise.of(cfg.privacy, cfg.seed)  # what a client sends is noised (split/noise.py)
        self.method.place(self.model)
        self.strategy = build_strategy(cfg)
        self.sizes = np.array([len(c) for c in s.data])
        self.true_domains = [c.domain for c in s.data]
        # the server's view for clustering exists only when it computes part of D
        self.feature_depth = common_feature_depth(s.cuts) if self.method.split else None
        self.engine = self._engine()
        self.method.prepare(self.engine, cfg, s)
        self.start_round = 1
        self.classifiers = {}
        if cfg.output.eval_every:
            self.classifiers = {d: load_or_train(d, cfg.data.data_dir)[0] for d in s.domains}

    def _label_probes(self) -> dict[str, LabelProbe]:
        """Per domain, the label probe of the round records, fit on the run's training images of
        the domain and scored on its real test split."""
        probes = {}
        for name, (x, y) in self.setup.domain_data.items():
            test = load_domain(name, "test", self.cfg.data.data_dir)
            probes[name] = LabelProbe.fit(x, y, to_tensor(test.images), torch.tensor(test.labels).long(),
                                          seed=self.cfg.seed)
        return probes

    def _engine(self) -> Engine:
        """The configured engine around ``self.model`` (``runtime.engine`` and ``compute.clients``)."""
        cfg, s = self.cfg, self.setup
        if cfg.runtime.engine == "ray":
            from huscf.runtime.driver import RayEngine  # Ray is imported only when it is used

            # the client actors load their own partitions: the driver keeps none of the tensors
            s.data = [ClientData(torch.empty(0), torch.empty(0, dtype=torch.long), c.domain) for c in s.data]
            return RayEngine(cfg, self.model, arch=s.arch, sizes=self.sizes.tolist(), feature_depth=self.feature_depth,
                             run_dir=self.run.path)
        engine = BatchedEngine if self.execution.batch_clients else SimulationEngine
        return engine(self.model, s.data, train=cfg.train, z_dim=s.arch.z_dim, seed=cfg.seed, execution=self.execution,
                      feature_depth=self.feature_depth)

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def new(cls, cfg: RunConfig, run_dir: Path, quiet: bool = False) -> "Trainer":
        rd = RunDir(run_dir)
        rd.check_new()
        rd.check_writable()
        t = cls(cfg, rd, quiet)  # everything that can fail on bad input fails before we write
        rd.create()
        cfg.dump(rd.config)
        t._write_clients()
        return t

    @classmethod
    def resume(cls, run_dir: Path, overrides: list[str] = (), quiet: bool = False,
               data_dir: str | None = None, allow_unsigned: bool = False) -> "Trainer":
        """Continue ``run_dir`` from its newest full checkpoint that verifies (checksum, loadable as
        data). What rounds after it had written (damaged checkpoints, metrics lines) is moved to
        ``set_aside/`` before those rounds are trained again; with checkpoints but none that
        verifies it stops with one line and changes nothing. Only ``train.rounds`` (to extend a
        run), ``runtime.*`` and the data location may change: anything else would not be the same run.
        A checkpoint must carry a signature this machine's key verifies, or none with
        ``allow_unsigned`` (``rundir/signing.py``); one that does not counts as not verifying."""
        rd = RunDir(run_dir, allow_unsigned=allow_unsigned)
        rd.check_no_links()
        if not rd.config.is_file():
            raise HuscfError(f"cannot resume {run_dir}: no config.yaml there (not a huscf run directory)")
        bad = [o for o in overrides if not o.startswith(("train.rounds=", "runtime."))]
        if bad:
            raise HuscfError(f"--resume only accepts --set train.rounds=N (to extend a run) and runtime.* "
                             f"(where it runs), got {bad[0]!r}")
        if data_dir:
            overrides = [*overrides, f"data.data_dir={data_dir}"]
        cfg = load_run_config(rd.config, overrides)
        dropped = None
        if cfg.runtime.address is not None and not any(o.startswith("runtime.address=") for o in overrides):
            # where the run joins a Ray cluster comes from this command line, never from a config
            # that came with the run directory (it could send the clients' data anywhere)
            dropped, cfg.runtime.address = cfg.runtime.address, None
            overrides = [*overrides, "runtime.address=null"]  # so the config.yaml written back says so too
        rows = rd.read_rounds()  # a damaged metrics file stops here, before anything changes
        ckpt, skipped = rd.latest_checkpoint()
        if ckpt is None and rd.list_checkpoints():  # resuming from scratch would overwrite them
            why = f" ({skipped[0]}{f', and {len(skipped) - 1} more' if len(skipped) > 1 else ''})" if skipped else ""
            raise HuscfError(f"cannot resume {run_dir}: {len(rows)} finished round(s) but no full checkpoint that "
                             f"verifies{why}; nothing was changed")
        t = cls(cfg, rd, quiet)  # rd's allow_unsigned also rules the older checkpoints it slims
        if dropped is not None:
            t._say(f"huscf: the run's config.yaml names the Ray address {dropped!r}; a resumed run takes the address "
                   f"only from --address (or --set runtime.address=...), so it ignores that one")
        rd.remove_stale_temporaries()
        round_no = 0
        if ckpt is not None:
            round_no, state = ckpt
            engine_state = state.get("engine") if isinstance(state, dict) else None
            check_model_state(t.model.state_dict(), (engine_state or {}).get("model"),
                              f"cannot resume {run_dir}: round {round_no}'s checkpoint")
            t.engine.load_state_dict(engine_state)
            t.start_round = round_no + 1
        if skipped:  # damaged newer checkpoints: their rounds are trained again
            t._say(f"huscf: {len(skipped)} newer checkpoint(s) did not verify, resuming after round {round_no}: "
                   + "; ".join(skipped))
        if skipped or any(r.round > round_no for r in rows):  # kept aside, never deleted
            folder = rd.set_aside(round_no, rows)
            t._say(f"huscf: what rounds after {round_no} had written is kept in {folder}")
        rd.truncate_rounds(round_no)
        if overrides:
            cfg.dump(rd.config)
        return t

    def _write_clients(self) -> None:
        s = self.setup
        lat = s.latency
        self.run.write_json("clients.json", {
            "cut_method": s.cut_method,
            "feature_depth": self.feature_depth,
            "probe_real_test_accuracy": {n: round(p.real_test_accuracy, 4) for n, p in self.probes.items()},
            "latency_per_iteration": lat.to_dict(),
            "clients": [
                {"client": p.client_id, "domain": p.domain, "size": len(p.indices),
                 "excluded_classes": list(p.excluded_classes), "cuts": list(c), "device": dev}
                | ({} if s.client_groups is None else {"group": s.client_groups[p.client_id]})
                for p, c, dev in zip(s.partitions, s.cuts, s.devices)
            ],
        })

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self) -> Path:
        cfg = self.cfg
        rounds, epochs = cfg.train.rounds, cfg.train.local_epochs
        iters = self.engine.iterations_per_epoch()
        if self.start_round > rounds:
            self._say(f"run {self.run.path} already has all {rounds} rounds")
            return self.run.path
        self._say(self._header())
        bar = tqdm(total=rounds * epochs * iters, initial=(self.start_round - 1) * epochs * iters, unit="it",
                   disable=self.quiet, dynamic_ncols=True, file=sys.stderr, desc="huscf")
        last = {}
        try:
            for r in range(self.start_round, rounds + 1):
                t0 = time.perf_counter()
                per_epoch, threads, iterations, hooks = [], [], 0, {}
                steps, syncs = [0], [0]  # the round's local steps so far; the steps the clients synced after
                for e in range(epochs):
                    threads.append(self.threads.adjust())
                    bar.set_description(f"round {r}/{rounds} epoch {e + 1}/{epochs}")

                    def tick(losses, bar=bar):
                        ld = np.mean([v[0] for v in losses.values()])
                        lg = np.mean([v[1] for v in losses.values()])
                        last.update(D=f"{ld:.3f}", G=f"{lg:.3f}")
                        bar.set_postfix(last, refresh=False)
                        bar.update()
                        steps[0] += 1
                        if self.method.synchronises(cfg, steps[0] - syncs[-1]):
                            syncs.append(steps[0])
                            self.engine.federate(self.strategy, self.sizes, r - 1, cfg.seed + r, use_features=False)

                    merge_info(hooks, self.method.before_epoch(self.engine, cfg, r, e))
                    planned = self.engine.iterations_per_epoch()  # with what the method gave
                    bar.total += planned - iters
                    iterations += planned
                    if self.model.seam.noise is not None:  # its draws follow from (seed, round, epoch)
                        self.model.seam.noise.at(r - 1, e)
                    per_epoch.append(self.engine.run_epoch(r - 1, e, tick, collect_features=e == epochs - 1))
                    merge_info(hooks, self.method.after_epoch(self.engine, cfg, r, e))
                row = self._end_round(r, per_epoch, time.perf_counter() - t0, threads, iterations, len(syncs) - 1,
                                      hooks)
                if not self.quiet:
                    bar.write(self._summary(row), file=sys.stderr)
        finally:
            bar.close()
            self.engine.close()
            self.run.flush()  # the last checkpoint is on disk when fit returns or raises
        self._say(f"done: {self.run.path}\nnext: huscf evaluate {self.run.path} && huscf report {self.run.path}")
        return self.run.path

    def _end_round(self, r: int, per_epoch: list[dict], train_seconds: float, threads: list[int],
                   iters: int, syncs: int, hooks: dict) -> RoundRecord:
        s, cfg = self.setup, self.cfg
        agg = self.engine.federate(self.strategy, self.sizes, r - 1, cfg.seed + r, self.feature_depth is not None)
        self._check_finite_weights(r)
        present = agg.groups >= 0  # a client whose actor failed this round took no part (Ray engine)

        lat = s.latency
        row = RoundRecord(
            round=r,
            **_losses(per_epoch),
            clusters=agg.groups.tolist(),
            num_clusters=int(agg.info.get("k", len(set(agg.groups.tolist())))),
            ari_vs_domains=float(adjusted_rand_score(np.array(self.true_domains)[present], agg.groups[present])),
            # by_group scenarios: how well the clusters recover the natural groups (speakers)
            ari_vs_groups=None if s.client_groups is None else float(adjusted_rand_score(
                np.array(s.client_groups)[present], agg.groups[present])),
            cluster_weights=agg.cluster_weights.round(6).tolist(),
            global_weights=agg.global_weights.round(6).tolist(),
            federation=agg.info | ({"syncs_before_round_end": syncs} if syncs else {}) | hooks,
            label_accuracy=self._label_accuracy(r),
            iterations=iters,
            method=cfg.method,
            latency_s_per_iteration=lat.total_s,
            # every synchronisation: the method's own during the round, then the round end's
            latency_s_round=lat.round_s(iters, syncs + 1, cfg.train.local_epochs),
            bytes_round_per_client=lat.round_bytes(iters, syncs + 1, cfg.train.local_epochs),
            train_seconds=round(train_seconds, 3),
            threads=threads,
            seam_epsilon=self._seam_epsilon(r),
            events=self.engine.round_events(),
        )
        if cfg.output.eval_every and r % cfg.output.eval_every == 0:
            row.generation_score = self._generation_score(r, agg.groups)
        try:
            if cfg.output.samples_every and r % cfg.output.samples_every == 0:
                self._save_samples(r, agg.groups)
            # metrics first: a kill between the two leaves a metrics row without a checkpoint, which
            # resume drops and recomputes (the reverse order would lose the row for good)
            self.run.append_round(row)
        except OSError as err:  # a full disk, a lost mount: the rounds before this one are on disk
            raise HuscfError(f"round {r}: cannot write to {self.run.path} ({err.strerror or err}); rounds 1-{r - 1} "
                             f"are kept: free space, then huscf train --resume {self.run.path}") from None
        self.run.save_checkpoint(r, {"round": r, "engine": self.engine.state_dict()}, cfg.output.keep_full_checkpoints)
        return row

    def _seam_epsilon(self, r: int) -> float | None:
        """With ``privacy.seam_noise``: the epsilon of everything sent in rounds 1..r (split/noise.py):
        every release a batch, in as many batches per epoch as a record can be."""
        p, e = self.cfg.privacy, self.engine
        if p.seam_noise <= 0:
            return None
        batches = batches_per_epoch(e.iterations_per_epoch(), e.batches_per_client(), e.equal_steps)
        releases = releases_per_record(r, self.cfg.train.local_epochs, batches)
        return round(epsilon(p.seam_noise, releases, p.delta, self.cfg.train.batch_size), 4)

    def _check_finite_weights(self, r: int) -> None:
        """After the round end every weight must be finite: otherwise one line naming the round,
        the holder and the net, before this round's checkpoint replaces the last good one."""
        for name, p in self.model.named_parameters():
            if not torch.isfinite(p).all():
                parts = name.split(".")  # clients.I.nets.NET.B... or server.nets.NET.B...
                who = f"client {parts[1]}'s" if parts[0] == "clients" else "the server's"
                net = parts[3] if parts[0] == "clients" else parts[2]
                raise HuscfError(f"round {r}: {who} {'generator' if net == 'G' else 'discriminator'} weights are not "
                                 f"finite (NaN/inf) after the round end ({name}); the checkpoint of round {r - 1} "
                                 f"is kept: lower train.lr")

    # -- measurements ------------------------------------------------------------------------------
    def _fixed_inputs(self, per_class: int):
        return class_grid_inputs(self.setup.arch.num_classes, per_class, self.setup.arch.z_dim, self.cfg.seed + 7)

    @torch.no_grad()
    def _sample(self, client: int, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples from a client's generator for the rows of ``(z, y)`` whose label its domain has (a
        2-class domain beside 10-class ones gets its own labels only), on the training device (batch
        statistics, as in training); returns (images, their labels)."""
        own = y < self.probes[self.setup.data[client].domain].num_classes
        dev = self.engine.device
        z_own = z[own].to(dev, self.execution.dtype)
        return self.model.generate(client, z_own, y[own].to(dev)).float().cpu(), y[own]

    def _label_accuracy(self, r: int) -> dict[str, float]:
        z, y = self._fixed_inputs(10)
        acc: dict[str, list[float]] = {}
        for i, c in enumerate(self.setup.data):
            acc.setdefault(c.domain, []).append(self.probes[c.domain].label_accuracy(*self._sample(i, z, y)))
        return {d: round(float(np.mean(v)), 4) for d, v in acc.items()}

    def _generation_score(self, r: int, groups: np.ndarray) -> dict[str, float]:
        """The paper's score of each cluster's generator (mean per majority domain)."""
        scores: dict[str, list[float]] = {}
        for gen in cluster_generators(groups.tolist(), self.true_domains, r):
            num_classes = self.probes[gen.domain].num_classes
            x, _ = sample_generator(self.model.assemble(gen.client, "G").cpu(), num_classes,
                                    self.setup.arch.z_dim, self.cfg.output.eval_samples, self.cfg.seed,
                                    what=f"the generator of cluster {gen.cluster} at round {r}")
            probs = classifier_probs(self.classifiers[gen.domain], x)
            scores.setdefault(gen.domain, []).append(generation_score(probs))
        return {d: round(float(np.mean(v)), 4) for d, v in scores.items()}

    def _save_samples(self, r: int, groups: np.ndarray) -> None:
        z, y = self._fixed_inputs(self.cfg.output.samples_per_class)
        for g in sorted(set(groups.tolist()) - {-1}):
            first = int(np.flatnonzero(groups == g)[0])
            images, labels = self._sample(first, z, y)
            save_grid(images, int(labels.max()) + 1, self.run.samples / f"round_{r:04d}_cluster_{g}.png")

    # -- output ------------------------------------------------------------------------------------
    def _header(self) -> str:
        s, cfg = self.setup, self.cfg
        per_domain = ", ".join(f"{d} x{sum(c.domain == d for c in s.data)}" for d in s.domains)
        distinct = sorted({tuple(c) for c in s.cuts})
        start = f"resuming at round {self.start_round}" if self.start_round > 1 else "starting"
        return (f"huscf: {start} {self.run.path}: {len(s.data)} clients ({per_domain}, {cfg.data.scenario}), "
                f"{cfg.model.arch} width {cfg.model.width}, {cfg.train.rounds} rounds x {cfg.train.local_epochs} "
                f"epochs x {self.engine.iterations_per_epoch()} iterations, {self._precision()}, "
                f"{self.threads.describe()}\n"
                f"huscf: method {self.method.title}; {self._split_line(distinct)}\n"
                f"huscf: compute {self._compute_line()}")

    def _split_line(self, distinct: list) -> str:
        s = self.setup
        if not self.method.split:
            return (f"no split: every client holds all of G and D; shares {self.method.shares}; simulated "
                    f"latency {s.latency.total_s:.3f} s per iteration")
        p = self.cfg.privacy
        noise = (f"; seam noise {p.seam_noise} x clip {p.seam_clip} (epsilon at delta {p.delta:g} in each round's "
                 f"line; docs/security.md)" if p.seam_noise > 0 else "")
        return (f"cuts by {s.cut_method}: {len(distinct)} distinct (hg tg hd td) {distinct}; simulated latency "
                f"{s.latency.total_s:.3f} s per iteration; clustering at D block {self.feature_depth}{noise}")

    def _precision(self) -> str:
        """The precision and, when it needs one, why (auto's choice; bf16 emulated on this CPU)."""
        ex = self.execution
        return f"precision {ex.precision}" + (f" ({ex.precision_note})" if ex.precision_note else "")

    def _compute_line(self) -> str:
        ex = self.execution
        how = f"batched clients (chunk {ex.client_chunk or 'all'})" if ex.batch_clients else "per-client loop"
        how += ", BatchNorm folded" if ex.fold_batch_norm else ""
        how += f", client convolutions by {ex.client_convs}" if ex.client_convs != "vmap" else ""
        how += ", CUDA graphs" if ex.cuda_graphs else ""
        return (f"{ex.device}, {how}, channels_last {'on' if ex.channels_last else 'off'}, "
                f"generator recompute {'on' if ex.recompute_generator else 'off'}"
                + (f"; {self.engine.placement}" if self.engine.placement else ""))

    def _summary(self, row: RoundRecord) -> str:
        acc = " ".join(f"{d}={v:.2f}" for d, v in row.label_accuracy.items())
        return (f"round {row.round:>3}: D {row.loss_d:.3f}  G {row.loss_g:.3f}  "
                f"clusters k={row.num_clusters} ARI={row.ari_vs_domains:.2f}  "
                + (f"ARI(groups)={row.ari_vs_groups:.2f}  " if row.ari_vs_groups is not None else "")
                + f"label-acc {acc}  "
                + (f"sim-latency {row.latency_s_round:.1f} s  " if row.latency_s_round is not None else "")
                + (f"seam epsilon {row.seam_epsilon:.4g}  " if row.seam_epsilon is not None else "")
                + f"({row.train_seconds:.1f} s)"
                + (f"\n  clustering: {row.federation['clustering_note']}" if row.federation.get("clustering_note")
                   else ""))

    def _say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr)

