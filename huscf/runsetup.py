"""What a run is built from, derived from its config before training starts (deterministic in the
seed): the data partition, each client's data, the architecture, the cuts, the device profiles.

The driver (``Trainer``) builds the whole ``Setup``; a client process of the Ray runtime calls
``load_client_data`` for its own clients only, with the same partition rule, from its own copy of
the dataset. Both sit below the engines, so every engine starts from the same setup.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from huscf.config import RunConfig
from huscf.cuts import assign_devices, load_profiles, plan_cuts
from huscf.cuts.fleet import RoundLatency, build_fleet
from huscf.data import ClientPartition, load_domain, partition, to_tensor
from huscf.errors import HuscfError
from huscf.methods import get_method
from huscf.models import build_architecture
from huscf.models.cgan import ARCHITECTURES, Architecture
from huscf.split.plan import Cuts, all_cuts, validate_cuts, whole_network_cuts


@dataclass
class ClientData:
    """One client's private training data (never leaves the client in a real deployment)."""

    x: torch.Tensor  # (n, C, H, W) float in [-1, 1]
    y: torch.Tensor  # (n,) int64
    domain: str

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Setup:
    """Everything derived from the config before training starts."""

    arch: Architecture
    data: list[ClientData]
    partitions: list[ClientPartition]
    domains: list[str]
    cuts: list[Cuts]
    latency: RoundLatency  # the method's simulated seconds and bytes (``Method.latency``)
    devices: list[str]  # per client, the name of its device profile
    cut_method: str  # how the cuts were chosen, for the header and clients.json
    # per domain, its (limited) training images and labels: what the label probe is fit on
    domain_data: dict[str, tuple[torch.Tensor, torch.Tensor]]
    # per client, its natural group ("fsdd:theo") when the scenario splits by group, else None
    client_groups: list[str] | None = None


def _choose_cuts(cfg: RunConfig, arch, g_middle: int, d_middle: int, devices, server) -> tuple[list[Cuts], str]:
    n, c = cfg.num_clients, cfg.cuts
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
                     alpha=cfg.devices.client_time_weight, gamma=cfg.devices.server_time_weight, seed=cfg.seed)
    return list(plan.cuts), f"{c.method} ({plan.solve_seconds:.2f} s)"


def _partition(cfg: RunConfig, train: dict) -> tuple[dict, list[ClientPartition]]:
    """The run's client partition (deterministic in the config): (labels per domain, parts)."""
    labels = {name: d.labels[: cfg.data.limit_per_domain] for name, d in train.items()}
    # the centralised baseline pools each domain's data on one machine (one client per domain)
    pooled = get_method(cfg.method).pooled
    per_domain, scenario = (1, "iid") if pooled else (cfg.data.clients_per_domain, cfg.data.scenario)
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


def _image_kind(shape: tuple[int, ...]) -> str:
    c, h, w = shape
    return f"{c}x{h}x{w} ({'grey' if c == 1 else 'colour' if c == 3 else f'{c} channels'})"


def _architecture(cfg: RunConfig, train: dict) -> Architecture:
    """The config's architecture for these domains (their image shape and class count checked)."""
    shapes = {d.images.shape[1:] for d in train.values()}
    if len(shapes) != 1:
        raise HuscfError("config key 'data.domains': the domains' images differ in shape: "
                         + ", ".join(f"'{d.name}' {_image_kind(d.images.shape[1:])}" for d in train.values()))
    data_classes = {name: d.num_classes for name, d in train.items()}
    num_classes = cfg.model.num_classes or max(data_classes.values())
    if (too_many := next((n for n, k in data_classes.items() if k > num_classes), None)) is not None:
        raise HuscfError(f"config key 'model.num_classes': {num_classes} label embeddings, but domain '{too_many}' "
                         f"has {data_classes[too_many]} classes")
    arch_shape = build_architecture(cfg.model.arch).image_shape
    first = next(iter(train.values()))
    if tuple(first.images.shape[1:]) != arch_shape:
        fits = [n for n in ARCHITECTURES if ARCHITECTURES[n].image_shape == tuple(first.images.shape[1:])]
        raise HuscfError(f"config key 'model.arch': {cfg.model.arch} makes {_image_kind(arch_shape)} images, domain "
                         f"'{first.name}' has {_image_kind(first.images.shape[1:])} "
                         f"{'spectrograms' if first.kind == 'spectrogram' else 'images'}"
                         + (f" (use {' or '.join(fits)})" if fits else ""))
    return build_architecture(cfg.model.arch, cfg.model.width, num_classes, arch_shape, label_at=cfg.model.labels)


def build_setup(cfg: RunConfig) -> Setup:
    """Load the domains, partition them, build the architecture and choose every client's cuts."""
    train = {name: load_domain(name, "train", cfg.data.data_dir) for name in cfg.data.domains}
    arch = _architecture(cfg, train)
    method = get_method(cfg.method)
    labels, parts = _partition(cfg, train)
    method.check(len(parts))
    x_all = {name: to_tensor(d.images[: cfg.data.limit_per_domain]) for name, d in train.items()}
    data = [ClientData(x_all[p.domain][torch.from_numpy(p.indices)],
                       torch.from_numpy(labels[p.domain][p.indices]).long(), p.domain) for p in parts]

    tiny = next((c for c, d in enumerate(data) if len(d) < 2), None)
    if tiny is not None:  # BatchNorm cannot normalise a batch of one
        raise HuscfError(f"client {tiny} ({data[tiny].domain}) has {len(data[tiny])} training sample(s), BatchNorm "
                         f"needs at least 2: lower data.clients_per_domain or raise data.limit_per_domain")

    server, device_list = load_profiles(cfg.devices.profiles)
    devices = assign_devices(device_list, len(parts), cfg.devices.assignment, cfg.seed)
    g_middle, d_middle = len(arch.g_middle), len(arch.d_middle)
    if method.split:
        cuts, cut_method = _choose_cuts(cfg, arch, g_middle, d_middle, devices, server)
    else:  # whole networks on every client: no cut
        cuts = [whole_network_cuts(g_middle, d_middle)] * len(parts)
        cut_method = f"none ({method.name}: whole networks)"
    fleet = build_fleet(arch, cfg.train.batch_size, devices, server, [len(p) for p in parts])
    latency = method.latency(fleet, cuts, cfg)

    client_groups = None
    if cfg.data.scenario == "by_group" and all(train[p.domain].groups is not None for p in parts):
        client_groups = [", ".join(f"{p.domain}:{train[p.domain].group_names[g]}"
                                   for g in np.unique(train[p.domain].groups[: cfg.data.limit_per_domain][p.indices]))
                         for p in parts]
    domain_data = {name: (x_all[name], torch.tensor(labels[name]).long()) for name in cfg.data.domains}
    return Setup(arch, data, parts, list(cfg.data.domains), cuts, latency,
                 [getattr(d, "name", str(d)) for d in devices], cut_method, domain_data, client_groups)
