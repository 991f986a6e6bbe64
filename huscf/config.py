"""The run configuration: typed, validated sections loaded from YAML, with ``--set`` overrides.

The defaults are the offline default run of ``huscf train`` (two digit domains, 8 clients, a
quarter-width cGAN, a few minutes on 2 CPU cores); the paper's scenarios are the files in
``configs/``, which spell out every paper setting.

Every key is declared here with its type, default and bounds. Unknown keys and impossible values
are rejected with one line naming the dotted key (``HuscfError``). ``RunConfig.dump()`` writes the
fully resolved config that a run directory keeps next to its results.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Literal, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from huscf.cuts.search import cut_methods
from huscf.data.partition import scenario_names
from huscf.data.sources import known_domains
from huscf.errors import HuscfError
from huscf.federation.clustering import COMPONENTS, GRAPH, GRAPHS, NEIGHBOURS, WALK_STEPS
from huscf.federation.strategies import STRATEGIES
from huscf.methods import get_method, method_names
from huscf.models.cgan import ARCHITECTURES


def _takes_bool(annotation) -> bool:
    """Whether a field's type admits a bool (``bool``, ``bool | Literal["auto"]``, ...)."""
    if annotation is bool:
        return True
    return any(_takes_bool(a) for a in get_args(annotation))


def _one_of(names: Callable[[], Iterable[str]]) -> AfterValidator:
    """The check of a key whose values are a registry's names (methods, architectures, cut searches,
    strategies, scenarios, domains: each listed once, where it is implemented). ``names`` is read at
    each check, so an entry added to the registry is a valid value with no edit here."""
    def check(v: str) -> str:
        known = tuple(names())
        if v not in known:
            raise ValueError(f"got {v!r}, must be one of {', '.join(known)}")
        return v
    return AfterValidator(check)


def _auto_or_positive(v, none_ok: bool = False):
    """A count key that also takes "auto" (and null where ``none_ok``): the value, or ValueError."""
    if (none_ok and v is None) or v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return v
    raise ValueError("must be 'auto' or an integer >= 1" + (" or null" if none_ok else ""))


class _Section(BaseModel):
    # no infinities or NaNs anywhere; a bool is never read as a number (YAML's true is not 1)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v, info):
        if isinstance(v, bool) and not _takes_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError("true or false is not a value this key takes")
        return v


class DataConfig(_Section):
    """Which domains, where their files are, and how they are split across clients."""

    domains: list[Annotated[str, _one_of(known_domains)]] = Field(
        default_factory=lambda: ["digits", "digits_inverted"], min_length=1)
    data_dir: str | None = None  # None: $HUSCF_DATA, else ~/.cache/huscf/data
    # by_group: the domain's natural groups (fsdd: one speaker per client group; docs/data.md)
    scenario: Annotated[str, _one_of(scenario_names)] = "iid"
    clients_per_domain: int = Field(4, ge=1, le=10_000)
    limit_per_domain: int | None = Field(None, ge=1)  # use only the first N training images of a domain


class ModelConfig(_Section):
    """The conditional GAN: a shipped block-list architecture and its channel width multiplier."""

    arch: Annotated[str, _one_of(ARCHITECTURES.keys)] = "cgan28"
    width: float = Field(0.25, gt=0, le=8)  # 1.0 = the paper's channel counts
    num_classes: int | None = Field(None, ge=2)  # label embeddings; None: the domains' largest class count
    # where the label enters: head (the paper's: block 0 of G and D, whose outputs cross to the server)
    # or tail (only the client's last block of each: docs/security.md, "Labels kept out of what crosses")
    labels: Literal["head", "tail"] = "head"


class TrainConfig(_Section):
    """The paper's iteration: batch, optimiser, local epochs, rounds."""

    rounds: int = Field(20, ge=1)
    local_epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(2e-4, gt=0)
    betas: tuple[float, float] = (0.5, 0.999)
    max_iters_per_epoch: int | None = Field(None, ge=1)  # cap on iterations per local epoch (smoke runs)
    # torch intra-op threads; auto: the cores other processes leave idle, re-measured every epoch
    # (OMP_NUM_THREADS pins it); N: fixed; None: torch's default (every core) (engines/threads.py)
    threads: int | Literal["auto"] | None = "auto"

    @field_validator("threads")
    @classmethod
    def _threads_auto_or_positive(cls, v: int | str | None) -> int | str | None:
        return _auto_or_positive(v, none_ok=True)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v


class CutsConfig(_Section):
    """How each client's four cut points are chosen.

    ``fixed``: ``fixed`` holds one [hg, tg, hd, td] for every client or one list per client.
    ``random``: a seeded random valid configuration per client (heterogeneous by design).
    ``milp`` / ``ga`` / ``brute``: chosen from the device profiles by the latency optimiser.
    """

    method: Annotated[str, _one_of(cut_methods)] = "milp"
    fixed: list[int] | list[list[int]] | None = None

    @model_validator(mode="after")
    def _fixed_needs_values(self) -> "CutsConfig":
        if self.method == "fixed" and self.fixed is None:
            raise ValueError("cuts.method 'fixed' needs cuts.fixed: [hg, tg, hd, td] or one such list per client")
        return self


class DevicesConfig(_Section):
    """Device profiles (for the latency model and cut selection) and their assignment to clients."""

    profiles: str = "paper"  # "paper" = the paper's seven devices, else a YAML path
    assignment: Literal["round_robin", "shuffle"] | list[int] = "round_robin"
    # the latency objective alpha * client time + gamma * server time (docs/latency.md; the paper's
    # alpha and gamma, unrelated to federation.alpha)
    client_time_weight: float = Field(1.0, ge=0)
    server_time_weight: float = Field(0.5, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _paper_names(cls, data):
        """Run directories written before the rename name the weights alpha and gamma."""
        if isinstance(data, dict):
            for old, new in (("alpha", "client_time_weight"), ("gamma", "server_time_weight")):
                if old in data:
                    if new in data:
                        raise ValueError(f"give devices.{new} or its old name devices.{old}, not both")
                    data = {(new if k == old else k): v for k, v in data.items()}
        return data


class FederationConfig(_Section):
    """Round-end aggregation: clustering, KLD weights, warm-up FedAvg rounds."""

    strategy: Annotated[str, _one_of(STRATEGIES.keys)] = "clustered_kld"
    alpha: float = Field(1.0, ge=0)  # w_i = n_i * exp(-alpha * KLD_i)
    warmup_rounds: int = Field(2, ge=0)  # plain size-weighted FedAvg over everyone before clustering
    clusters: int | str = "auto"  # "auto": chosen from the data (eigengap or silhouette, by cluster_on)
    max_clusters: int = Field(8, ge=2)
    # what clients are clustered on (docs/method.md): "samples" = the graph of nearest neighbours
    # between clients' per-sample activations, k by eigengap (finds domains under label skew);
    # "means" = k-means on the whitened mean activation, k by silhouette (IID data only)
    cluster_on: Literal["samples", "means"] = "samples"
    neighbours: int = Field(NEIGHBOURS, ge=1, le=100)  # samples: each sample's nearest neighbours (votes or links)
    components: int = Field(COMPONENTS, ge=1, le=256)  # samples: principal components the neighbours are found in
    # samples: how the clients' affinity is read off the sample graph (docs/method.md): "walk" = a
    # random walk of walk_steps steps over the graph of all samples, own client's included (the
    # default, issue 32); "votes" = each sample's nearest other-client samples vote for their owners
    graph: Literal[GRAPHS] = GRAPH  # type: ignore[valid-type]  # the names in clustering.GRAPHS
    walk_steps: int = Field(WALK_STEPS, ge=1, le=8)
    min_silhouette: float = Field(0.35, ge=-1, le=1)  # means: below this, "auto" keeps one cluster
    kld_direction: Literal["client_to_cluster", "cluster_to_client"] = "client_to_cluster"
    # mask the client-side segments so that the server opens only each cluster's average, never
    # one client's weights (federation/secure.py, docs/security.md)
    secure_aggregation: bool = False
    # what every client checks in the server's plan before masking (federation/secagg.py): members
    # per sum (and survivors per opened sum), and a sum's largest weight over its smallest (the
    # server raises smaller KLD weights to meet it; clients cannot check the weights themselves)
    secure_min_members: int = Field(2, ge=2)
    secure_max_weight_ratio: float = Field(100.0, ge=1)
    # the first and last block of each net (no server holds them: the label embedding, the blocks
    # next to the images and the loss) are averaged so that only the sum's clients can open the
    # average; the server never learns a client's head or tail (needs secure_aggregation)
    hide_ends: bool = False
    # per_cluster: after the warm-up, one copy of the server's middle blocks per cluster
    # (federation/bodies.py; max_clusters copies); shared: one body for every client; auto:
    # per_cluster for a split method (measured better: docs/results.md), else shared
    server_body: Literal["auto", "shared", "per_cluster"] = "auto"

    @model_validator(mode="after")
    def _hidden_ends_need_secure_aggregation(self) -> "FederationConfig":
        if self.hide_ends and not self.secure_aggregation:
            raise ValueError("federation.hide_ends hides the averages of secure aggregation's sums: set "
                             "federation.secure_aggregation=true too")
        return self

    @field_validator("clusters")
    @classmethod
    def _clusters_auto_or_positive(cls, v: int | str) -> int | str:
        return _auto_or_positive(v)


class PrivacyConfig(_Section):
    """Defences on what a client sends the server (split/noise.py, docs/security.md)."""

    # clip every activation row a client sends to the L2 norm seam_clip * sqrt(elements), and every
    # gradient row it returns (of the batch's summed loss) to seam_grad_clip * sqrt(elements), and add
    # Gaussian noise of std seam_noise * that norm per element; 0: off. Its epsilon: split/noise.py
    seam_noise: float = Field(0.0, ge=0)
    seam_clip: float = Field(1.0, gt=0)
    # gradients are ~100 times smaller than activations: the default run's per-element RMS was
    # 0.004-0.02 (split/noise.py), so 0.01 clips about half of the rows
    seam_grad_clip: float = Field(0.01, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)  # the delta the run's epsilon is reported at


class ComputeConfig(_Section):
    """Where and how the iteration runs (none of it changes the method; see docs/performance.md)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when torch sees one
    # bf16: autocast forward, fp32 weights and optimiser (fast only where the hardware has native
    # bf16); auto: bf16 where native, else fp32; fp64: everything float64, the numerical reference
    precision: Literal["fp32", "bf16", "fp64", "auto"] = "fp32"
    channels_last: bool | Literal["auto"] = "auto"  # NHWC convolutions; auto: on
    # run the generator twice per iteration instead of keeping every client's graph through the
    # D step; auto: on for more than 16 clients (per-client loop) or when clients run in chunks
    recompute_generator: bool | Literal["auto"] = "auto"
    clients: Literal["auto", "loop", "batched"] = "auto"  # auto: loop on CPU, batched on CUDA
    client_chunk: int | None = Field(None, ge=1)  # batched: clients per block call (None: all)
    cudnn_benchmark: bool = False  # CUDA: time cuDNN's algorithms per shape (docs/performance.md)
    # replay each set of clients' iteration as a CUDA graph (CUDA, batched clients); auto: on there
    cuda_graphs: bool | Literal["auto"] = "auto"
    # batched clients: BatchNorm as one call over the clients folded into its channels instead of
    # through vmap (same statistics); auto: on for batched clients on a CPU
    fold_batch_norm: bool | Literal["auto"] = "auto"
    # batched clients: how a convolution with one weight per client runs (vmap: grouped convolutions)
    client_convs: Literal["vmap", "loop", "bmm"] = "vmap"


class RuntimeConfig(_Section):
    """Where the clients and the server run (see docs/runtime.md). ``simulation``: one process,
    the reference numerics. ``ray``: every client in a Ray actor process that alone loads and holds
    its partition and segments, the server body in a server actor, the driver orchestrating."""

    engine: Literal["simulation", "ray"] = "simulation"
    address: str | None = None  # ray: None starts a local Ray; "auto" or host:port joins a cluster
    clients_per_actor: int | Literal["auto"] = "auto"  # auto: clients spread over CPUs - 1 actors (>= 1)
    threads_per_actor: int | Literal["auto"] = "auto"  # torch threads in each actor; auto: CPUs / (actors + server)
    # custom Ray resources each client actor asks for (pins client actors to nodes started with
    # ``ray start --resources '{"edge": 4}'``), and the same for the server actor
    client_resources: dict[str, float] = Field(default_factory=dict)
    server_resources: dict[str, float] = Field(default_factory=dict)
    on_failure: Literal["restart", "drop"] = "restart"  # a dead client actor's clients next round
    call_timeout_s: float = Field(300.0, gt=0)  # an actor call slower than this counts as a failure
    # a client that has not handed its discriminator gradient to the server this many seconds
    # after its iteration began skips the iteration (None: wait for everyone)
    deadline_s: float | None = Field(None, gt=0)
    # fault injection for experiments: seconds added to a client's clock in each iteration, by
    # client id (a device that much slower, as the deadline sees it; no effect without deadline_s)
    inject_delay_s: dict[int, float] = Field(default_factory=dict)

    @field_validator("clients_per_actor", "threads_per_actor")
    @classmethod
    def _counts_auto_or_positive(cls, v: int | str) -> int | str:
        return _auto_or_positive(v)


class BaselinesConfig(_Section):
    """Settings of the baseline methods (``method`` other than huscf; see docs/baselines.md)."""

    # PFL-GAN: client i's weight on peer j ~ exp(-MMD2_ij / (T median MMD2)) (huscf's choice of measure)
    pfl_temperature: float = Field(0.1, gt=0)
    pfl_synthetic_share: float = Field(0.5, gt=0)  # PFL-GAN: peers' synthetic samples per own sample, each round
    hfl_edges: int = Field(2, ge=1)  # HFL-GAN: edge servers the clients are clustered to every round
    # HFL-GAN: the nets the global server averages over the edges; the others stay one per edge
    hfl_global_nets: list[Literal["G", "D"]] = ["D"]
    # PFL-GAN and HFL-GAN: samples of each client's generator the server compares clients by
    similarity_samples: int = Field(64, ge=2)
    # PFL-GAN and HFL-GAN: every client takes the same number of local steps, so that the generators
    # compared have trained equally long (false: each client one pass over its data per epoch)
    similarity_equal_steps: bool = True
    fedgan_sync_every: int = Field(20, ge=1)  # FedGAN: local steps between averagings (K; Rasouli et al.: 20)
    # MD-GAN: the server's fake batches per iteration (k; None: Hardy et al.'s ceil(log2 N), at least 2)
    mdgan_batches: int | None = Field(None, ge=2)
    mdgan_swap_every: int = Field(1, ge=1)  # MD-GAN: local epochs between discriminator swaps (E; the paper: 1)


class OutputConfig(_Section):
    """What a run writes besides metrics and checkpoints."""

    samples_every: int = Field(1, ge=0)  # 0: no sample grids
    samples_per_class: int = Field(8, ge=1, le=32)
    # every N rounds, the generation score of each cluster's generator with the domain classifier
    # (trained once and cached; see docs/evaluation.md); 0: off
    eval_every: int = Field(0, ge=0)
    eval_samples: int = Field(1000, ge=10)
    # every round keeps a checkpoint; only the newest N keep optimiser states (0: all of them)
    keep_full_checkpoints: int = Field(2, ge=0)


def _plain_file_name(v: str) -> str:
    """A run's name becomes part of its folder's name (``runs/NAME-DATE``): one plain path
    component, so that a received config cannot write outside the runs folder."""
    if not re.fullmatch(r"[^/\\\x00-\x1f.][^/\\\x00-\x1f]{0,99}", v):
        raise ValueError(f"must be a plain file name of 1-100 characters, without '/', '\\', control "
                         f"characters or a leading '.', got {v!r}")
    return v


class RunConfig(_Section):
    """The whole run."""

    name: Annotated[str, AfterValidator(_plain_file_name)] = "default"
    seed: int = 0
    # huscf, or a baseline run on the same partition, blocks and evaluation (docs/baselines.md);
    # any method registered in ``huscf.methods``
    method: Annotated[str, _one_of(method_names)] = "huscf"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    cuts: CutsConfig = Field(default_factory=CutsConfig)
    devices: DevicesConfig = Field(default_factory=DevicesConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    baselines: BaselinesConfig = Field(default_factory=BaselinesConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)

    @model_validator(mode="after")
    def _cluster_bodies_need_a_server_body(self) -> "RunConfig":
        if self.federation.server_body == "per_cluster" and not get_method(self.method).split:
            raise ValueError(f"federation.server_body=per_cluster needs a split method; '{self.method}' has no "
                             f"server body")
        return self

    @model_validator(mode="after")
    def _seam_noise_needs_a_seam(self) -> "RunConfig":
        if self.privacy.seam_noise > 0 and not get_method(self.method).split:
            raise ValueError(f"privacy.seam_noise noises what crosses the seam; '{self.method}' keeps whole "
                             f"networks on the clients, so nothing crosses")
        return self

    @property
    def cluster_bodies(self) -> int:
        """How many server bodies the run keeps besides the shared one (``federation.server_body``)."""
        fed = self.federation
        per_cluster = fed.server_body == "per_cluster" or (fed.server_body == "auto" and get_method(self.method).split)
        return fed.max_clusters if per_cluster else 0

    @property
    def num_clients(self) -> int:
        return len(self.data.domains) * self.data.clients_per_domain

    def dump(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(config)"
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{key}'"
    msg = first["msg"].removeprefix("Value error, ")
    said = msg.startswith("got ") or (first["type"] == "value_error" and len(first["loc"]) <= 1)
    got = "" if said else f", got {first.get('input')!r}"
    extra = f" (and {err.error_count() - 1} more problem(s))" if err.error_count() > 1 else ""
    if not first["loc"]:  # a rule across sections: its message names the keys
        return f"config: {msg}{extra}"
    return f"config key '{key}': {msg}{got}{extra}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], YAML-parsed value)."""
    if "=" not in item:
        raise HuscfError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise HuscfError(f"--set expects key=value, got {item!r}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise HuscfError(f"--set {key}: cannot parse value {raw!r} ({exc.__class__.__name__})") from None
    return key.strip().split("."), value


def build_config(raw: dict | None = None, overrides: list[str] = ()) -> RunConfig:
    """Validate a raw mapping plus ``key=value`` overrides into a ``RunConfig``."""
    raw = dict(raw or {})
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise HuscfError(f"--set {'.'.join(path)}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise HuscfError(_one_line(err)) from None


def _read_yaml(p: Path) -> dict:
    if not p.is_file():
        raise HuscfError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise HuscfError(f"config file {p}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise HuscfError(f"config file {p}: not a UTF-8 text file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise HuscfError(f"config file {p}{where}: invalid YAML") from None
    if not isinstance(raw, dict):
        raise HuscfError(f"config file {p}: top level must be a mapping of sections")
    return raw


def load_config(path: str | Path | None, overrides: list[str] = (), data_dir: str | None = None) -> RunConfig:
    """Load a YAML config file (or the defaults when ``path`` is None) and apply overrides; a
    ``data_dir`` given on the command line (``--data-dir``) replaces ``data.data_dir``."""
    return _finish(_read_yaml(Path(path)) if path is not None else {}, overrides, data_dir)


# keys whose default changed after run directories were written without them: (section, key) ->
# the value those runs used (a run directory's config.yaml holds every key that existed then)
_RUN_DIR_DEFAULTS = {("federation", "server_body"): "shared", ("federation", "components"): 20,
                     ("federation", "graph"): "votes"}


def load_run_config(path: str | Path, overrides: list[str] = (), data_dir: str | None = None) -> RunConfig:
    """A run directory's ``config.yaml`` (resume, evaluate): ``load_config``, except that a key the
    run predates takes the value the run was trained with, not today's default."""
    raw = _read_yaml(Path(path))
    for (section, key), value in _RUN_DIR_DEFAULTS.items():
        if isinstance(raw.get(section), dict) and key not in raw[section]:
            raw[section] = {**raw[section], key: value}
    return _finish(raw, overrides, data_dir)


def _finish(raw: dict, overrides: list[str], data_dir: str | None) -> RunConfig:
    cfg = build_config(raw, overrides)
    if data_dir:
        cfg.data.data_dir = data_dir
    return cfg
