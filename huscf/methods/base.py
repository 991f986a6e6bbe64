"""What a training method is, and the registry every part of huscf reads the methods from.

A method is one small class (in the spirit of Flower's ``Strategy``): it declares where the
networks live and what the engines must do for it, and it builds its round-end strategy. Every
other part (partition, cGAN blocks, iteration, optimiser, evaluation) is shared, so methods differ
only where their papers differ. Adding a method is one subclass decorated with ``@register``:
the config's ``method`` key, ``huscf compare --methods`` and the CLI help read the names from
the registry.

An *ablation* is a registered method with ``ablation_of`` set: it runs as that method with the
config ``overrides`` applied (``huscf compare`` only), so its run directory holds a plain config.
"""

from __future__ import annotations

from typing import ClassVar

from huscf.cuts.fleet import Fleet, RoundLatency
from huscf.errors import HuscfError
from huscf.federation.secure import Policy, secured
from huscf.federation.strategies import Strategy


class Method:
    """One training method. Subclasses set the class attributes and implement ``strategy``."""

    name: ClassVar[str]  # the config's ``method`` value
    title: ClassVar[str]  # for tables and the report
    shares: ClassVar[str]  # what leaves a client, for the docs and the report
    # True: G and D are U-shaped split by each client's cuts (a client head and tail around one
    # server body); False: every client holds whole networks
    split: ClassVar[bool] = False
    # True: one client per domain holding the whole domain (the centralised ceiling)
    pooled: ClassVar[bool] = False
    min_clients: ClassVar[int] = 1
    # an ablation: the method it modifies and the config overrides that make the modification
    ablation_of: ClassVar[str | None] = None
    overrides: ClassVar[tuple[str, ...]] = ()

    def strategy(self, cfg) -> Strategy:
        """The round-end policy for a validated ``RunConfig``."""
        raise NotImplementedError

    def latency(self, fleet: Fleet, cuts: list, cfg) -> RoundLatency:
        """The simulated seconds and bytes of this method's iteration, synchronisation and epoch end on
        ``fleet`` (docs/latency.md, "Every method"). Default: whole networks on every client, sent
        to the server and averaged back at each synchronisation."""
        return fleet.whole_networks()

    def place(self, model) -> None:
        """Where each network lives, set on the ``SplitGAN`` before an engine is built: by default
        every client holds its own copy of its segments (``model.tie(net)``: one copy for all)."""

    def prepare(self, engine, cfg, setup) -> None:
        """Called once the engine is built (a resumed run's too), with the run's config and its
        ``runsetup.Setup``: set what the engine must do for this method (``engine.equal_steps``,
        ``engine.fake_inputs``) and keep what the method needs of the setup."""

    def before_epoch(self, engine, cfg, round_no: int, epoch: int) -> dict | None:
        """Called before every local epoch (``round_no`` from 1, ``epoch`` from 0) with the engine
        (``engine.give``: data a client trains on this epoch besides its own). What it returns is
        added to the round's ``federation`` record in metrics.jsonl."""

    def synchronises(self, cfg, steps: int) -> bool:
        """Whether the clients synchronise now, ``steps`` local iterations after the round's start or
        the last synchronisation, besides the round end: the trainer then runs the round end's
        strategy, without clustering features (FedGAN: every K local steps)."""
        return False

    def after_epoch(self, engine, cfg, round_no: int, epoch: int) -> dict | None:
        """Called after every local epoch with the engine (MD-GAN moves discriminators here)."""

    def check(self, num_clients: int) -> None:
        if num_clients < self.min_clients:
            raise HuscfError(f"method '{self.name}' needs at least {self.min_clients} clients, the config has "
                             f"{num_clients}: raise data.clients_per_domain or add domains")


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` a method ``huscf train`` and ``huscf compare`` can run."""
    for attr in ("name", "title", "shares"):
        if not isinstance(getattr(cls, attr, None), str) or not getattr(cls, attr):
            raise TypeError(f"method class {cls.__name__} needs a non-empty string '{attr}'")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is registered already ({_REGISTRY[cls.name].__name__})")
    if cls.ablation_of is not None and cls.ablation_of not in _REGISTRY:
        raise ValueError(f"ablation {cls.name!r} modifies {cls.ablation_of!r}, which is not registered")
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a method (for tests that register a toy one)."""
    _REGISTRY.pop(name, None)


def method_names(ablations: bool = False) -> list[str]:
    """The registered methods a config can name, in registration order (with ``ablations``, then
    the ablations that ``huscf compare`` runs)."""
    names = [n for n, c in _REGISTRY.items() if c.ablation_of is None]
    return names + ([n for n, c in _REGISTRY.items() if c.ablation_of is not None] if ablations else [])


def get_method(name: str) -> Method:
    """The registered method (or ablation) called ``name``."""
    if name not in _REGISTRY:
        raise HuscfError(f"unknown method '{name}': choose from {', '.join(method_names(ablations=True))}")
    return _REGISTRY[name]()


def build_strategy(cfg) -> Strategy:
    """The round-end strategy of a validated ``RunConfig``: its method's, made secure when
    ``federation.secure_aggregation`` is on (one line of error for a method it cannot serve)."""
    return secured(get_method(cfg.method).strategy(cfg), cfg.federation.secure_aggregation, secure_policy(cfg))


def secure_policy(cfg) -> Policy:
    """What every client checks in a secure round end's plan, from ``federation`` (federation/secagg.py)."""
    fed = cfg.federation
    return Policy(fed.secure_min_members, fed.secure_max_weight_ratio, fed.hide_ends)
