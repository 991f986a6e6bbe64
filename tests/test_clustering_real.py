"""Clustering on real data: domains are found, cut configurations are not."""

import json


from huscf.config import build_config
from huscf.engine.trainer import Trainer


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
