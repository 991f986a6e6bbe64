"""Clustering on real data: domains are found, cut configurations are not."""

import json
from pathlib import Path

import pytest

from huscf.config import build_config, load_config
from huscf.trainer import Trainer


def _last_row(run_dir):
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def test_mnist_and_kmnist_clients_are_clustered_by_domain(shared_data_dir, tmp_path):
    cfg = build_config({}, [
        f"data.data_dir={shared_data_dir}", "data.domains=[mnist, kmnist]", "data.clients_per_domain=4",
        "data.limit_per_domain=2000", "model.width=0.125", "train.rounds=2", "train.local_epochs=1",
        "train.batch_size=32", "train.max_iters_per_epoch=6", "federation.warmup_rounds=1",
        "output.samples_every=0", "cuts.method=random", "seed=3",
    ])
    t = Trainer.new(cfg, tmp_path / "run", quiet=True)
    assert len({c.hd for c in t.setup.cuts}) >= 2, "the test needs heterogeneous discriminator cuts"
    t.fit()
    row = _last_row(tmp_path / "run")
    assert row["federation"]["phase"] == "clustered"
    assert row["num_clusters"] == 2
    assert row["ari_vs_domains"] >= 0.9


def test_identical_data_is_not_split_by_cut_configuration(tmp_path):
    cfg = build_config({}, [
        "data.domains=[digits]", "data.clients_per_domain=8", "model.width=0.125", "train.rounds=2",
        "train.local_epochs=1", "train.batch_size=32", "train.max_iters_per_epoch=4",
        "federation.warmup_rounds=1", "output.samples_every=0", "cuts.method=random", "seed=1",
    ])
    t = Trainer.new(cfg, tmp_path / "run", quiet=True)
    assert len({c.hd for c in t.setup.cuts}) >= 2
    t.fit()
    row = _last_row(tmp_path / "run")
    # one IID domain: no structure to find, in particular not the cut configurations
    assert row["num_clusters"] == 1, row


# -- the paper's scenarios at reduced scale: domains under label skew, one cluster inside a domain --
CONFIGS = Path(__file__).resolve().parents[1] / "huscf" / "configs"


def _scenario_rows(shared_data_dir, tmp_path, scenario: str, clients: int, seed: int, *extra: str) -> list[dict]:
    """Train a shipped scenario reduced to width 0.25, 3 rounds (1 FedAvg warm-up) of 10 iterations,
    with seeded random cuts (heterogeneous and unrelated to the domains); its metrics rows."""
    cfg = load_config(next(CONFIGS.glob(f"{scenario}_*.yaml")), [
        f"data.clients_per_domain={clients}", "data.limit_per_domain=1500", "model.width=0.25",
        "train.rounds=3", "train.local_epochs=1", "train.max_iters_per_epoch=10", "train.batch_size=32",
        "federation.warmup_rounds=1", "cuts.method=random", f"seed={seed}", "output.samples_every=0",
        "compute.device=cpu", *extra,
    ], str(shared_data_dir))
    t = Trainer.new(cfg, tmp_path / "run", quiet=True)
    assert len(set(t.setup.cuts)) >= 3, "the test needs heterogeneous cuts"
    t.fit()
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scenario,domains", [("4", 2), ("5", 2), ("7", 4)])
def test_label_skewed_domains_are_found_in_every_clustered_round(shared_data_dir, tmp_path, scenario, domains, seed):
    rows = _scenario_rows(shared_data_dir, tmp_path, scenario, 3, seed)
    clustered = [r for r in rows if r["federation"]["phase"] == "clustered"]
    assert len(clustered) == 2
    for r in clustered:
        assert r["federation"]["rule"] == "samples" and len(r["federation"]["eigenvalues"]) > domains
        assert r["num_clusters"] == domains and r["ari_vs_domains"] >= 0.9, (r["round"], r["federation"])


@pytest.mark.slow
@pytest.mark.parametrize("scenario,seed", [("2", 0), ("2", 1), ("2", 2), ("1", 0)])
def test_one_domain_stays_one_cluster_with_or_without_label_skew(shared_data_dir, tmp_path, scenario, seed):
    rows = _scenario_rows(shared_data_dir, tmp_path, scenario, 6, seed)
    assert all(r["num_clusters"] == 1 for r in rows), [r["federation"] for r in rows]


@pytest.mark.slow
def test_fixed_cluster_count_recovers_label_skewed_domains(shared_data_dir, tmp_path):
    rows = _scenario_rows(shared_data_dir, tmp_path, "7", 3, 1, "federation.clusters=4")
    for r in rows[1:]:
        assert r["num_clusters"] == 4 and r["ari_vs_domains"] >= 0.9, r["federation"]


@pytest.mark.slow
def test_iid_domains_are_still_found(shared_data_dir, tmp_path):
    rows = _scenario_rows(shared_data_dir, tmp_path, "6", 3, 0)
    for r in rows[1:]:
        assert r["num_clusters"] == 4 and r["ari_vs_domains"] == 1.0, r["federation"]
