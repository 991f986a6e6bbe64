"""The end of a round on the server: build what it knows into a ``RoundState``, ask the strategy
for an ``Aggregation`` and apply it to the model. Shared by the single-process engines and the
Ray server actor, so both federate with exactly the same code. With a ``SecureStrategy`` the
averages are made by secure aggregation (``federation.secure``) instead of read off the copies."""

from __future__ import annotations

import numpy as np
import torch

from huscf.federation.averaging import apply_aggregation
from huscf.federation.bodies import apply_opened_per_cluster, apply_per_cluster
from huscf.federation.features import FeatureStats
from huscf.federation.secagg import secure_sums
from huscf.federation.secure import OpenedSum, SecurePlan, SecureStrategy, apply_opened, plan_sums
from huscf.federation.strategies import Aggregation, RoundState
from huscf.federation.synthetic import generator_samples
from huscf.split.segments import SplitGAN


def decide(model: SplitGAN, strategy, sizes: np.ndarray, round_idx: int, seed: int,
           features: FeatureStats | None, ids: list[int]) -> Aggregation:
    """The strategy's aggregation of clients ``ids`` (its arrays indexed by position in ``ids``)."""
    feats, noise = features.mean_and_noise(ids) if features is not None else (None, None)
    samples = features.samples(ids) if features is not None else None
    params = None if not strategy.uses_client_params else np.stack([
        torch.cat([p.detach().float().flatten() for p in model.client_parameters(i, "D")]).cpu().numpy()
        for i in ids])
    state = RoundState(round=round_idx, sizes=np.asarray(sizes)[ids], features=feats, feature_noise=noise,
                       samples=samples, seed=seed, client_params=params,
                       client_samples=probe_samples(model, ids, getattr(strategy, "probe", 0), seed))
    return strategy.aggregate(state)


def probe_samples(model: SplitGAN, ids: list[int], m: int, seed: int) -> np.ndarray | None:
    """(len(ids), m, F) every client's generator on the same m inputs (seeded noise, the classes in
    turn), or None when ``m`` is 0: what a server that holds the generators can compare."""
    if not m:
        return None
    z_dim, num_classes = model.latent
    z = torch.randn(m, z_dim, generator=torch.Generator().manual_seed(seed))
    y = torch.arange(m) % num_classes
    return np.stack([generator_samples(model, i, z, y).flatten(1).numpy() for i in ids])


def with_info(agg: Aggregation, **extra) -> Aggregation:
    """``agg`` with ``extra`` added to its info (what the round end did, for the metrics)."""
    return Aggregation(agg.groups, agg.cluster_weights, agg.global_weights, agg.info | extra, agg.mixing)


def per_cluster_round(model: SplitGAN, agg: Aggregation) -> bool:
    """Whether this round end makes a body per cluster (``federation.server_body: per_cluster``,
    once the strategy has clustered)."""
    return len(model.cluster_bodies) > 0 and agg.info.get("phase") == "clustered"


def apply_secure(model: SplitGAN, agg: Aggregation, ids: list[int], plan: SecurePlan,
                 opened: list[OpenedSum]) -> Aggregation:
    """Apply the opened sums of a secure round end (one process or the Ray server actor)."""
    if per_cluster_round(model, agg):
        record = apply_opened(model, plan, opened, mix_server=False)
        return with_info(agg, secure_aggregation=record, bodies=apply_opened_per_cluster(model, agg, ids, plan, opened))
    return with_info(agg, secure_aggregation=apply_opened(model, plan, opened))


def federate(model: SplitGAN, strategy, sizes: np.ndarray, round_idx: int, seed: int,
             features: FeatureStats | None, clients: list[int] | None = None) -> Aggregation:
    """Aggregate ``clients`` (default: all) of ``model`` in place; returns the aggregation written
    out for every client (group -1 for a client that took no part)."""
    n = len(sizes)
    ids = list(range(n)) if clients is None else sorted(clients)
    agg = decide(model, strategy, sizes, round_idx, seed, features, ids)
    if isinstance(strategy, SecureStrategy):
        plan = plan_sums(model, agg, ids, round_idx, strategy.policy)
        agg = apply_secure(model, agg, ids, plan, secure_sums(model, plan, strategy.policy))
    elif per_cluster_round(model, agg):
        agg = with_info(agg, bodies=apply_per_cluster(model, agg, ids))
    else:
        apply_aggregation(model, agg, ids)
    return agg if len(ids) == n else agg.expand(ids, n)
