"""Clustering, KLD weights and the averaging of client segments and server blocks."""

import numpy as np
import pytest
import torch

from huscf.federation.averaging import apply_aggregation
from huscf.federation.clustering import cluster_clients, common_feature_depth
from huscf.federation.strategies import Aggregation, ClusteredKLD, FedAvg, RoundState
from huscf.federation.weights import kld_scores, kld_weights, spatial_distributions
from huscf.models import build_architecture
from huscf.split.plan import Cuts
from huscf.split.segments import SplitGAN


def _two_blobs(n_per=6, dim=20, gap=5.0, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 1, (n_per, dim))
    b = rng.normal(gap, 1, (n_per, dim))
    return np.vstack([a, b]), np.array([0] * n_per + [1] * n_per)


def test_auto_k_finds_two_separated_groups_and_one_for_noise():
    x, truth = _two_blobs()
    res = cluster_clients(x, "auto", max_clusters=5, min_silhouette=0.25)
    assert res.k == 2
    assert (res.labels == truth).all() or (res.labels == 1 - truth).all()
    noise = np.random.default_rng(1).normal(0, 1, (12, 20))
    assert cluster_clients(noise, "auto", max_clusters=5, min_silhouette=0.25).k == 1


def test_fixed_k_and_tiny_fleets():
    x, _ = _two_blobs(2)
    assert cluster_clients(x, 3).k == 3
    assert cluster_clients(x[:2], "auto").k == 1  # silhouette needs 3+ clients
    assert cluster_clients(x[:2], 5).k == 2  # clipped to the number of clients


def test_common_feature_depth_is_reached_by_every_client():
    assert common_feature_depth([Cuts(0, 0, 0, 2), Cuts(1, 1, 2, 0)]) == 3
    assert common_feature_depth([Cuts(0, 0, 0, 0)]) == 1


def test_kld_zero_for_identical_clients_and_positive_for_an_outlier():
    base = np.random.default_rng(0).normal(size=(4, 3, 5, 5))
    same = np.repeat(base[:1], 4, axis=0)
    p = spatial_distributions(same)
    assert np.allclose(kld_scores(p, np.zeros(4, int)), 0)
    odd = same.copy()
    odd[3] *= 4
    k = kld_scores(spatial_distributions(odd), np.zeros(4, int))
    assert k[3] > 0 and k[3] > k[:3].max()
    # the two directions differ on asymmetric inputs
    k2 = kld_scores(spatial_distributions(odd), np.zeros(4, int), "cluster_to_client")
    assert not np.allclose(k, k2)


def test_weights_sum_to_one_per_group_and_singletons_get_one():
    sizes = np.array([100, 200, 300, 50, 70])
    groups = np.array([0, 0, 0, 1, 2])
    kld = np.array([0.1, 0.0, 2.0, 0.3, 0.0])
    w = kld_weights(sizes, kld, groups, alpha=1.0)
    assert w[:3].sum() == pytest.approx(1) and w[3] == pytest.approx(1) and w[4] == pytest.approx(1)
    expected = sizes[:3] * np.exp(-kld[:3])
    assert np.allclose(w[:3], expected / expected.sum())
    # alpha = 0 is plain FedAvg within the group
    assert np.allclose(kld_weights(sizes, kld, groups, 0.0)[:3], sizes[:3] / sizes[:3].sum())


def test_strategies_warmup_then_cluster():
    x, truth = _two_blobs(5, dim=3 * 4 * 4)
    feats = x.reshape(10, 3, 4, 4)
    sizes = np.full(10, 100)
    s = ClusteredKLD(warmup_rounds=1)
    warm = s.aggregate(RoundState(0, sizes, feats))
    assert warm.info["phase"] == "warmup" and (warm.groups == 0).all()
    agg = s.aggregate(RoundState(1, sizes, feats))
    assert agg.info["k"] == 2 and len(set(agg.groups[truth == 0])) == 1 and len(set(agg.groups[truth == 1])) == 1
    assert agg.global_weights.sum() == pytest.approx(1)
    for g in (0, 1):
        assert agg.cluster_weights[agg.groups == g].sum() == pytest.approx(1)
    assert np.allclose(FedAvg().aggregate(RoundState(5, np.array([1, 3]), feats[:2])).global_weights, [0.25, 0.75])


def _model(cuts, seed=0):
    torch.manual_seed(seed)
    arch = build_architecture("cgan28", width=0.125)
    return SplitGAN(arch.generator(), arch.discriminator(), cuts)


def test_identical_clients_stay_unchanged():
    cuts = [Cuts(0, 0, 0, 0), Cuts(1, 0, 1, 1), Cuts(0, 2, 2, 0)]
    m = _model(cuts)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    n = len(cuts)
    agg = Aggregation(np.array([0, 1, 0]), np.array([0.3, 1.0, 0.7]), np.full(n, 1 / n))
    apply_aggregation(m, agg)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k], msg=k)


def test_averaging_within_clusters_and_server_with_local_copies():
    cuts = [Cuts(0, 0, 1, 0), Cuts(0, 0, 1, 0), Cuts(0, 0, 0, 0)]
    m = _model(cuts)
    # give every copy of D block 1 (clients 0, 1 hold it; the server has its own) a distinct value
    w = lambda mod: mod[0].weight  # noqa: E731 - the conv weight of a conv block
    with torch.no_grad():
        for i, val in ((0, 1.0), (1, 3.0)):
            w(m.clients[i].nets["D"]["1"]).fill_(val)
        w(m.server.nets["D"]["1"]).fill_(10.0)
        for i, val in enumerate((1.0, 2.0, 4.0)):  # the always-local head block 0
            m.clients[i].nets["D"]["0"].conv[0].weight.fill_(val)
    agg = Aggregation(groups=np.array([0, 0, 1]), cluster_weights=np.array([0.25, 0.75, 1.0]),
                      global_weights=np.array([0.2, 0.3, 0.5]))
    apply_aggregation(m, agg)
    # cluster 0 = clients 0 and 1: 0.25 * 1 + 0.75 * 3 = 2.5 for both, for both local blocks
    for i in (0, 1):
        assert torch.allclose(w(m.clients[i].nets["D"]["1"]), torch.tensor(2.5))
        assert torch.allclose(m.clients[i].nets["D"]["0"].conv[0].weight, torch.tensor(0.25 * 1 + 0.75 * 2))
    assert torch.allclose(m.clients[2].nets["D"]["0"].conv[0].weight, torch.tensor(4.0))  # alone: unchanged
    # server copy of block 1: clients 0, 1 contribute their local copies, client 2 the server's
    assert torch.allclose(w(m.server.nets["D"]["1"]), torch.tensor(0.2 * 1 + 0.3 * 3 + 0.5 * 10))


def test_feature_stats_mean_and_noise_match_numpy():
    from huscf.engine.simulation import FeatureStats

    rng = np.random.default_rng(0)
    a, b, c = (torch.tensor(rng.normal(size=(n, 2, 3, 3))) for n in (5, 7, 4))
    stats = FeatureStats(2)
    stats.add(0, a)
    stats.add(0, b)
    stats.add(1, c)
    mean, noise = stats.mean_and_noise()
    ab = torch.cat([a, b]).numpy()
    assert np.allclose(mean[0], ab.mean(0)) and np.allclose(mean[1], c.numpy().mean(0))
    assert np.allclose(noise[0], ab.var(0) / 12) and np.allclose(noise[1], c.numpy().var(0) / 4)
    with pytest.raises(RuntimeError):
        FeatureStats(2).mean_and_noise()
