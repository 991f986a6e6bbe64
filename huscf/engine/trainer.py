"""The round loop of ``huscf train``: build everything from a config, train, federate, record.

``Trainer(cfg, run_dir).fit()`` builds the data partition, the template G/D (one initialisation
broadcast to every client), the cuts, the split model, the engine and the strategy; then runs
rounds of ``local_epochs`` epochs, ends each round with clustering + weighted averaging, and
writes the round's checkpoint, sample grids and metrics line. ``Trainer.resume(run_dir)``
continues from the newest checkpoint and replays exactly what an uninterrupted run would do.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score
from tqdm import tqdm

from huscf.baselines import get_method
from huscf.config import RunConfig, load_config
from huscf.cuts import assign_devices, evaluate_latency, load_profiles, plan_cuts
from huscf.data import load_domain, partition, to_tensor
from huscf.engine.batched import BatchedEngine
from huscf.engine.execution import Execution
from huscf.engine.rundir import RunDir
from huscf.engine.simulation import ClientData, SimulationEngine
from huscf.errors import HuscfError
from huscf.federation.clustering import common_feature_depth
from huscf.metrics.classifiers import load_or_train
from huscf.metrics.evaluate import cluster_generators, sample_generator
from huscf.metrics.quick import LabelProbe
from huscf.metrics.scores import classifier_probs, generation_score
from huscf.models import build_architecture
from huscf.report.grids import class_grid_inputs, save_grid
from huscf.split.plan import Cuts, all_cuts, validate_cuts, whole_network_cuts
from huscf.split.segments import SplitGAN


@dataclass
class Setup:
    """Everything derived from the config before training starts (deterministic in the seed)."""

    arch: object
    data: list[ClientData]
    partitions: list
    domains: list[str]
    cuts: list[Cuts]
    latency: dict
    cut_method: str
    probes: dict[str, LabelProbe]
    # per client, its natural group ("fsdd:theo") when the scenario splits by group, else None
    client_groups: list[str] | None = None


def _choose_cuts(cfg: RunConfig, arch, g_middle: int, d_middle: int, devices, server) -> tuple[list[Cuts], str]:
    n = cfg.num_clients
    c = cfg.cuts
    if c.method == "fixed":
        rows = c.fixed if c.fixed and isinstance(c.fixed[0], list) else [c.fixed] * n
        if len(rows) != n:
            raise HuscfError(f"config key 'cuts.fixed': {len(rows)} cut lists for {n} clients")
        return [validate_cuts(r, g_middle, d_middle, client=i) for i, r in enumerate(rows)], "fixed"
    if c.method == "random":
        options = all_cuts(g_middle, d_middle)
        rng = random.Random(cfg.seed)
        return [rng.choice(options) for _ in range(n)], "random"
    plan = plan_cuts(arch, cfg.train.batch_size, devices, server, method=c.method,
                     alpha=cfg.devices.alpha, gamma=cfg.devices.gamma, seed=cfg.seed)
    return list(plan.cuts), f"{c.method} ({plan.solve_seconds:.2f} s)"


def _partition(cfg: RunConfig, train: dict) -> tuple[dict, list]:
    """The run's client partition (deterministic in the config): (labels per domain, parts)."""
    labels = {name: d.labels[: cfg.data.limit_per_domain] for name, d in train.items()}
    # the centralised baseline pools each domain's data on one machine (one client per domain)
    per_domain, scenario = (1, "iid") if get_method(cfg.method).pooled else (cfg.data.clients_per_domain,
                                                                              cfg.data.scenario)
    groups = {name: None if d.groups is None else d.groups[: cfg.data.limit_per_domain] for name, d in train.items()}
    return labels, partition(labels, per_domain, scenario, cfg.seed,
                             {name: d.num_classes for name, d in train.items()}, groups)


def load_client_data(cfg: RunConfig, clients: list[int]) -> dict[int, ClientData]:
    """What a client process loads for itself: its own partition of its domain's training split,
    read from its own copy of the dataset (the same partition rule as ``build_setup``)."""
    train = {name: load_domain(name, "train", cfg.data.data_dir) for name in cfg.data.domains}
    labels, parts = _partition(cfg, train)
    out = {}
    for i in clients:
        p = parts[i]
        images = train[p.domain].images[: cfg.data.limit_per_domain][p.indices]
        out[i] = ClientData(to_tensor(images), torch.from_numpy(labels[p.domain][p.indices]).long(), p.domain)
    return out


def build_setup(cfg: RunConfig) -> Setup:
    train, test = {}, {}
    for name in cfg.data.domains:
        train[name] = load_domain(name, "train", cfg.data.data_dir)
        test[name] = load_domain(name, "test", cfg.data.data_dir)

    def shape(d) -> str:
        c, h, w = d.images.shape[1:]
        return f"{c}x{h}x{w} ({'grey' if c == 1 else 'colour' if c == 3 else f'{c} channels'})"

    shapes = {d.images.shape[1:] for d in train.values()}
    if len(shapes) != 1:
        raise HuscfError("config key 'data.domains': the domains' images differ in shape: "
                         + ", ".join(f"'{d.name}' {shape(d)}" for d in train.values()))
    data_classes = {name: d.num_classes for name, d in train.items()}
    num_classes = cfg.model.num_classes or max(data_classes.values())
    too_many = next((n for n, k in data_classes.items() if k > num_classes), None)
    if too_many is not None:
        raise HuscfError(f"config key 'model.num_classes': {num_classes} label embeddings, but domain '{too_many}' "
                         f"has {data_classes[too_many]} classes")
    arch_shape = build_architecture(cfg.model.arch).image_shape
    first = next(iter(train.values()))
    if tuple(first.images.shape[1:]) != arch_shape:
        c, h, w = arch_shape
        kind = "grey" if c == 1 else "colour" if c == 3 else f"{c}-channel"
        raise HuscfError(f"config key 'model.arch': {cfg.model.arch} makes {c}x{h}x{w} ({kind}) images, domain "
                         f"'{first.name}' has {shape(first)} {'spectrograms' if first.kind == 'spectrogram' else 'images'}")
    arch = build_architecture(cfg.model.arch, cfg.model.width, num_classes, arch_shape)

    method = get_method(cfg.method)
    labels, parts = _partition(cfg, train)
    method.check(len(parts))
    x_all = {name: to_tensor(d.images[: cfg.data.limit_per_domain]) for name, d in train.items()}
    data = [ClientData(x_all[p.domain][torch.from_numpy(p.indices)],
                       torch.from_numpy(labels[p.domain][p.indices]).long(), p.domain) for p in parts]

    tiny = next((c for c, d in enumerate(data) if len(d) < 2), None)
    if tiny is not None:  # BatchNorm cannot normalise a batch of one
        raise HuscfError(f"client {tiny} ({data[tiny].domain}) has {len(data[tiny])} training sample(s), BatchNorm needs "
                         f"at least 2: lower data.clients_per_domain or raise data.limit_per_domain")

    server, device_list = load_profiles(cfg.devices.profiles)
    devices = assign_devices(device_list, len(parts), cfg.devices.assignment, cfg.seed)
    g_middle = len(arch.g_middle)
    d_middle = len(arch.d_middle)
    if method.split:
        cuts, cut_method = _choose_cuts(cfg, arch, g_middle, d_middle, devices, server)
        latency = evaluate_latency(arch, cfg.train.batch_size, cuts, devices, server, cfg.devices.alpha,
                                   cfg.devices.gamma).to_dict()
    else:  # whole networks on every client: no cut, no per-iteration traffic to simulate
        cuts = [whole_network_cuts(g_middle, d_middle)] * len(parts)
        cut_method = f"none ({method.name}: whole networks)"
        latency = {"total_s": None, "server_s": None, "bytes_per_client": None, "stages": {}}

    probes = {name: LabelProbe.fit(x_all[name], torch.tensor(labels[name]).long(),
                                   to_tensor(test[name].images), torch.tensor(test[name].labels).long(),
                                   seed=cfg.seed) for name in cfg.data.domains}
    client_groups = None
    if cfg.data.scenario == "by_group" and all(train[p.domain].groups is not None for p in parts):
        client_groups = [", ".join(f"{p.domain}:{train[p.domain].group_names[g]}"
                                   for g in np.unique(train[p.domain].groups[: cfg.data.limit_per_domain][p.indices]))
                         for p in parts]
    return Setup(arch, data, parts, list(cfg.data.domains), cuts, latency | {"devices": [
        getattr(d, "name", str(d)) for d in devices]}, cut_method, probes, client_groups)


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


def _derangement(n: int, *key: int) -> list[int]:
    """A seeded permutation with no fixed point: every client gets another client's discriminator."""
    rng = np.random.default_rng([*key, 7])
    while True:
        perm = rng.permutation(n)
        if n < 2 or not (perm == np.arange(n)).any():
            return perm.tolist()


class Trainer:
    """Runs (or resumes) one training run into a run directory."""

    def __init__(self, cfg: RunConfig, run_dir: Path, quiet: bool = False):
        self.cfg, self.run, self.quiet = cfg, RunDir(run_dir), quiet
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        c = cfg.compute  # resolved first: a device that is not there fails before any data loads
        self.execution = Execution.resolve(c.device, c.precision, c.channels_last, c.recompute_generator, c.clients,
                                           c.client_chunk, cfg.num_clients, c.cudnn_benchmark, c.cuda_graphs,
                                           c.fold_batch_norm, c.client_convs)
        self.setup = build_setup(cfg)
        s = self.setup
        torch.manual_seed(cfg.seed)  # one initialisation, broadcast to every client and the server
        g, d = s.arch.generator(), s.arch.discriminator()
        self.method = get_method(cfg.method)
        self.model = SplitGAN(g, d, s.cuts)
        if self.method.shared_generator:
            self.model.tie_generators()
        self.strategy = self.method.strategy(cfg)
        self.sizes = np.array([len(c) for c in s.data])
        self.true_domains = [c.domain for c in s.data]
        # the server's view for clustering exists only when it computes part of D
        self.feature_depth = common_feature_depth(s.cuts) if self.method.split else None
        if cfg.runtime.engine == "ray":
            from huscf.runtime.engine import RayEngine

            # the client actors load their own partitions: the driver keeps none of the tensors
            s.data = [ClientData(torch.empty(0), torch.empty(0, dtype=torch.long), c.domain) for c in s.data]
            self.engine = RayEngine(cfg, s.arch, self.model, self.sizes.tolist(), self.feature_depth, run_dir,
                                    self.method.shared_generator)
        else:
            engine = BatchedEngine if self.execution.batch_clients else SimulationEngine
            self.engine = engine(self.model, s.data, cfg.train.batch_size, cfg.train.lr, cfg.train.betas,
                                 s.arch.z_dim, cfg.seed, cfg.train.max_iters_per_epoch, self.execution,
                                 self.method.shared_generator)
            self.engine.feature_depth = self.feature_depth
        self.start_round = 1
        self.classifiers = {}
        if cfg.output.eval_every:
            self.classifiers = {d: load_or_train(d, cfg.data.data_dir)[0] for d in s.domains}

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def new(cls, cfg: RunConfig, run_dir: Path, quiet: bool = False) -> "Trainer":
        rd = RunDir(run_dir)
        rd.check_new()
        t = cls(cfg, run_dir, quiet)  # everything that can fail on bad input fails before we write
        rd.create()
        cfg.dump(rd.config)
        t._write_clients()
        return t

    @classmethod
    def resume(cls, run_dir: Path, overrides: list[str] = (), quiet: bool = False,
               data_dir: str | None = None) -> "Trainer":
        """Continue ``run_dir`` from its newest full checkpoint. Only ``train.rounds`` (to extend a
        run) and the data location may change: anything else would not be the same run."""
        rd = RunDir(run_dir)
        if not rd.config.is_file():
            raise HuscfError(f"cannot resume {run_dir}: no config.yaml there (not a huscf run directory)")
        bad = [o for o in overrides if not o.startswith(("train.rounds=", "runtime."))]
        if bad:
            raise HuscfError(f"--resume only accepts --set train.rounds=N (to extend a run) and runtime.* "
                             f"(where it runs), got {bad[0]!r}")
        if data_dir:
            overrides = [*overrides, f"data.data_dir={data_dir}"]
        cfg = load_config(rd.config, overrides)
        t = cls(cfg, run_dir, quiet)
        ckpt = rd.latest_checkpoint()
        if ckpt is not None:
            round_no, state = ckpt
            t.engine.load_state_dict(state["engine"])
            t.start_round = round_no + 1
            rd.truncate_metrics(round_no)
        else:
            rd.truncate_metrics(0)
        if overrides:
            cfg.dump(rd.config)
        return t

    def _write_clients(self) -> None:
        s = self.setup
        lat = s.latency
        self.run.write_json("clients.json", {
            "cut_method": s.cut_method,
            "feature_depth": self.feature_depth,
            "probe_real_test_accuracy": {n: round(p.real_test_accuracy, 4) for n, p in s.probes.items()},
            "latency_per_iteration": {k: v for k, v in lat.items() if k != "devices"},
            "clients": [
                {"client": p.client_id, "domain": p.domain, "size": len(p.indices),
                 "excluded_classes": list(p.excluded_classes), "cuts": list(c), "device": dev}
                | ({} if s.client_groups is None else {"group": s.client_groups[p.client_id]})
                for p, c, dev in zip(s.partitions, s.cuts, lat["devices"])
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
                per_epoch = []
                for e in range(epochs):
                    bar.set_description(f"round {r}/{rounds} epoch {e + 1}/{epochs}")

                    def tick(losses, bar=bar):
                        ld = np.mean([v[0] for v in losses.values()])
                        lg = np.mean([v[1] for v in losses.values()])
                        last.update(D=f"{ld:.3f}", G=f"{lg:.3f}")
                        bar.set_postfix(last, refresh=False)
                        bar.update()

                    per_epoch.append(self.engine.run_epoch(r - 1, e, tick, collect_features=e == epochs - 1))
                    if self.method.swap_discriminators:  # MD-GAN: a seeded derangement after every epoch
                        self.engine.swap_discriminators(_derangement(len(self.sizes), cfg.seed, r, e))
                row = self._end_round(r, per_epoch, time.perf_counter() - t0)
                if not self.quiet:
                    bar.write(self._summary(row), file=sys.stderr)
        finally:
            bar.close()
            self.engine.close()
            self.run.flush()  # the last checkpoint is on disk when fit returns or raises
        self._say(f"done: {self.run.path}\nnext: huscf evaluate {self.run.path} && huscf report {self.run.path}")
        return self.run.path

    def _end_round(self, r: int, per_epoch: list[dict], train_seconds: float) -> dict:
        s, cfg = self.setup, self.cfg
        agg = self.engine.federate(self.strategy, self.sizes, r - 1, cfg.seed + r, self.feature_depth is not None)
        present = agg.groups >= 0  # a client whose actor failed this round took no part (Ray engine)

        iters = self.engine.iterations_per_epoch() * cfg.train.local_epochs
        lat = s.latency
        row = {
            "round": r,
            **_losses(per_epoch),
            "clusters": agg.groups.tolist(),
            "num_clusters": int(agg.info.get("k", len(set(agg.groups.tolist())))),
            "ari_vs_domains": float(adjusted_rand_score(np.array(self.true_domains)[present], agg.groups[present])),
            # by_group scenarios: how well the clusters recover the natural groups (speakers)
            **({} if s.client_groups is None else {"ari_vs_groups": float(adjusted_rand_score(
                np.array(s.client_groups)[present], agg.groups[present]))}),
            "cluster_weights": agg.cluster_weights.round(6).tolist(),
            "global_weights": agg.global_weights.round(6).tolist(),
            "federation": agg.info,
            "label_accuracy": self._label_accuracy(r),
            "iterations": iters,
            "method": cfg.method,
            "latency_s_per_iteration": lat["total_s"],
            "latency_s_round": None if lat["total_s"] is None else lat["total_s"] * iters,
            "bytes_round_per_client": None if lat["bytes_per_client"] is None else [
                b * iters for b in lat["bytes_per_client"]],
            "train_seconds": round(train_seconds, 3),
        } | self.engine.round_events()
        if cfg.output.eval_every and r % cfg.output.eval_every == 0:
            row["generation_score"] = self._generation_score(r, agg.groups)
        if cfg.output.samples_every and r % cfg.output.samples_every == 0:
            self._save_samples(r, agg.groups)
        # metrics first: a kill between the two leaves a metrics row without a checkpoint, which
        # resume drops and recomputes (the reverse order would lose the row for good)
        self.run.append_metrics(row)
        self.run.save_checkpoint(r, {"round": r, "engine": self.engine.state_dict()}, cfg.output.keep_full_checkpoints)
        return row

    # -- measurements ------------------------------------------------------------------------------
    def _fixed_inputs(self, per_class: int):
        return class_grid_inputs(self.setup.arch.num_classes, per_class, self.setup.arch.z_dim, self.cfg.seed + 7)

    @torch.no_grad()
    def _sample(self, client: int, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples from a client's generator for the rows of ``(z, y)`` whose label its domain has (a
        2-class domain beside 10-class ones gets its own labels only), on the training device (batch
        statistics, as in training); returns (images, their labels)."""
        own = y < self.setup.probes[self.setup.data[client].domain].num_classes
        dev = self.engine.device
        return self.model.generate(client, z[own].to(dev), y[own].to(dev)).float().cpu(), y[own]

    def _label_accuracy(self, r: int) -> dict[str, float]:
        z, y = self._fixed_inputs(10)
        acc: dict[str, list[float]] = {}
        for i, c in enumerate(self.setup.data):
            acc.setdefault(c.domain, []).append(self.setup.probes[c.domain].label_accuracy(*self._sample(i, z, y)))
        return {d: round(float(np.mean(v)), 4) for d, v in acc.items()}

    def _generation_score(self, r: int, groups: np.ndarray) -> dict[str, float]:
        """The paper's score of each cluster's generator (mean per majority domain)."""
        scores: dict[str, list[float]] = {}
        for gen in cluster_generators(groups.tolist(), self.true_domains, r):
            num_classes = self.setup.probes[gen["domain"]].num_classes
            x, _ = sample_generator(self.model.assemble(gen["client"], "G").cpu(), num_classes,
                                    self.setup.arch.z_dim, self.cfg.output.eval_samples, self.cfg.seed,
                                    what=f"the generator of cluster {gen['cluster']} at round {r}")
            probs = classifier_probs(self.classifiers[gen["domain"]], x)
            scores.setdefault(gen["domain"], []).append(generation_score(probs))
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
                f"epochs x {self.engine.iterations_per_epoch()} iterations\n"
                f"huscf: method {self.method.title}; {self._split_line(distinct)}\n"
                f"huscf: compute {self._compute_line()}")

    def _split_line(self, distinct: list) -> str:
        s = self.setup
        if not self.method.split:
            return f"no split: every client holds all of G and D; shares {self.method.shares}"
        return (f"cuts by {s.cut_method}: {len(distinct)} distinct (hg tg hd td) {distinct}; simulated latency "
                f"{s.latency['total_s']:.3f} s per iteration; clustering at D block {self.feature_depth}")

    def _compute_line(self) -> str:
        ex = self.execution
        how = f"batched clients (chunk {ex.client_chunk or 'all'})" if ex.batch_clients else "per-client loop"
        how += ", BatchNorm folded" if ex.fold_batch_norm else ""
        how += f", client convolutions by {ex.client_convs}" if ex.client_convs != "vmap" else ""
        how += ", CUDA graphs" if ex.cuda_graphs else ""
        return (f"{ex.device}, {ex.precision}, {how}, channels_last {'on' if ex.channels_last else 'off'}, "
                f"generator recompute {'on' if ex.recompute_generator else 'off'}, {torch.get_num_threads()} threads")

    def _summary(self, row: dict) -> str:
        acc = " ".join(f"{d}={v:.2f}" for d, v in row["label_accuracy"].items())
        return (f"round {row['round']:>3}: D {row['loss_d']:.3f}  G {row['loss_g']:.3f}  "
                f"clusters k={row['num_clusters']} ARI={row['ari_vs_domains']:.2f}  "
                + (f"ARI(groups)={row['ari_vs_groups']:.2f}  " if "ari_vs_groups" in row else "")
                + f"label-acc {acc}  "
                + (f"sim-latency {row['latency_s_round']:.1f} s  " if row["latency_s_round"] is not None else "")
                + f"({row['train_seconds']:.1f} s)")

    def _say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr)


def read_metrics(run_dir: Path) -> list[dict]:
    return RunDir(run_dir).read_metrics()


