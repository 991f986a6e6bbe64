"""Beyond the MNIST family: CIFAR-10 (colour), PneumoniaMNIST (2 classes), spoken digits (audio as
log-mel spectrograms): readers, the speaker split, the audio round trip, and the one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import read_metrics

from huscf.cli import main
from huscf.config import build_config
from huscf.data import load_domain, partition
from huscf.data.audio import SPEC, images_to_waves, waves_to_images
from huscf.errors import HuscfError
from huscf.runsetup import build_setup
from huscf.trainer import Trainer


def test_new_domains_load_with_their_shapes_classes_and_groups(shared_data_dir):
    expect = {  # name: (image shape, train size, test size, classes)
        "cifar10": ((3, 32, 32), 10000, 2000, 10),
        "pneumoniamnist": ((1, 28, 28), 4708, 624, 2),
        "fsdd": ((1, 28, 28), 2700, 300, 10),
    }
    for name, (shape, n_train, n_test, k) in expect.items():
        tr, te = load_domain(name, "train", shared_data_dir), load_domain(name, "test", shared_data_dir)
        assert tr.images.shape == (n_train, *shape) and te.images.shape == (n_test, *shape), name
        assert tr.images.dtype == np.uint8 and tr.num_classes == k and set(np.unique(tr.labels)) == set(range(k))
    cifar = load_domain("cifar10", "train", shared_data_dir)
    assert cifar.class_names[0] == "airplane" and cifar.images.std(axis=1).mean() > 5  # real colour, not grey
    fsdd = load_domain("fsdd", "train", shared_data_dir)
    assert fsdd.kind == "spectrogram" and len(fsdd.group_names) == 6
    assert np.bincount(fsdd.groups).tolist() == [450] * 6  # 6 speakers x 10 digits x 45 recordings
    # a spoken digit is louder than the silence around it: the middle frames are brighter than the edges
    img = fsdd.images[:, 0].astype(float)
    assert img[:, :, 10:18].mean() > img[:, :, :2].mean() + 20


def test_spectrogram_round_trip_keeps_the_pitch():
    t = np.arange(SPEC.length) / SPEC.sample_rate
    for hz in (440.0, 1500.0):
        tone = (0.5 * np.sin(2 * np.pi * hz * t) * np.hanning(len(t))).astype(np.float32)
        img = waves_to_images([tone])
        assert img.shape == (1, 1, SPEC.n_mels, SPEC.frames)
        wave = images_to_waves(img)[0]
        spectrum = np.abs(np.fft.rfft(wave))
        peak = np.fft.rfftfreq(len(wave), 1 / SPEC.sample_rate)[spectrum.argmax()]
        # 28 mel bands are wide (~100-300 Hz here): the pitch comes back within a band
        assert abs(peak - hz) < 0.25 * hz, (hz, peak)
        # Griffin-Lim's random start phase is seeded: eval_samples' audio is the same every time
        assert np.array_equal(images_to_waves(img)[0], wave)
    with pytest.raises(HuscfError, match="spectrogram images must be"):
        images_to_waves(np.zeros((2, 1, 32, 32), dtype=np.uint8))


def test_by_group_partition_gives_each_client_group_one_speaker(shared_data_dir):
    fsdd = load_domain("fsdd", "train", shared_data_dir)
    parts = partition({"fsdd": fsdd.labels}, 12, "by_group", seed=3, num_classes=10,
                      groups_by_domain={"fsdd": fsdd.groups})
    assert len(parts) == 12
    seen = np.zeros(len(fsdd.labels), dtype=int)
    for p in parts:
        assert len(np.unique(fsdd.groups[p.indices])) == 1 and len(p.indices) == 225
        assert np.unique(fsdd.groups[p.indices])[0] == p.client_id % 6
        seen[p.indices] += 1
    assert (seen == 1).all()  # every recording used once
    with pytest.raises(HuscfError, match="has 6 groups"):
        partition({"fsdd": fsdd.labels}, 4, "by_group", 0, 10, {"fsdd": fsdd.groups})
    with pytest.raises(HuscfError, match="'mnist' has none"):
        partition({"mnist": fsdd.labels}, 6, "by_group", 0, 10, {})


def test_colour_and_two_class_domains_train(shared_data_dir, tmp_path):
    for domains, arch in ((["cifar10"], "dcgan32"), (["pneumoniamnist"], "cgan28")):
        cfg = build_config({}, [f"data.domains={domains}", f"model.arch={arch}", f"data.data_dir={shared_data_dir}",
                                "data.clients_per_domain=2", "data.limit_per_domain=400", "train.rounds=1",
                                "train.local_epochs=1", "train.max_iters_per_epoch=2", "model.width=0.125",
                                "cuts.method=random"])
        setup = build_setup(cfg)
        if arch == "dcgan32":
            assert setup.arch.image_shape == (3, 32, 32) and len(setup.arch.g_middle) >= 4
        else:
            assert setup.arch.num_classes == 2  # a 2-class label embedding
        run = tmp_path / arch
        Trainer.new(cfg, run, quiet=True).fit()
        assert read_metrics(run)[0]["round"] == 1
        grid = next((run / "samples").glob("*.png"))
        from PIL import Image

        assert Image.open(grid).mode == ("RGB" if arch == "dcgan32" else "L")
        gen = Trainer.resume(run, quiet=True).model.assemble(0, "G")
        z, y = torch.randn(4, 100), torch.arange(4) % setup.arch.num_classes
        assert gen(z, y).shape == (4, *setup.arch.image_shape)


@pytest.mark.parametrize("overrides,message", [
    (["data.domains=[cifar10]"],
     "cgan28 makes 1x28x28 (grey) images, domain 'cifar10' has 3x32x32 (colour) images (use dcgan32)"),
    (["data.domains=[fsdd]", "model.arch=dcgan32"],
     "dcgan32 makes 3x32x32 (colour) images, domain 'fsdd' has 1x28x28 (grey) spectrograms (use cgan28)"),
    (["data.domains=[mnist]", "model.num_classes=2"], "2 label embeddings, but domain 'mnist' has 10 classes"),
    (["data.domains=[mnist, cifar10]", "model.arch=dcgan32"], "'mnist' 1x28x28 (grey), 'cifar10' 3x32x32 (colour)"),
])
def test_mismatched_data_and_model_is_one_line(shared_data_dir, tmp_path, capsys, overrides, message):
    args = ["train", "--data-dir", str(shared_data_dir), "--out", str(tmp_path / "run")]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_spectrograms_are_cached_on_disk(shared_data_dir, tmp_path, monkeypatch):
    from huscf.cache import cached_array
    from huscf.data import audio, sources

    monkeypatch.setenv("HUSCF_CACHE", str(tmp_path))
    sources._load_fsdd.cache_clear()
    first = load_domain("fsdd", "test", shared_data_dir)
    (entry,) = (tmp_path / "spectrograms").iterdir()
    assert entry.name.startswith("fsdd-test-")

    def never(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(audio, "waves_to_images", never)
    sources._load_fsdd.cache_clear()
    np.testing.assert_array_equal(load_domain("fsdd", "test", shared_data_dir).images, first.images)
    sources._load_fsdd.cache_clear()

    entry.write_bytes(b"not an array")  # a damaged entry is recomputed and rewritten
    assert cached_array("spectrograms", entry.stem, lambda: np.arange(3)).tolist() == [0, 1, 2]
    assert np.load(entry).tolist() == [0, 1, 2]


def test_by_group_runs_report_how_clusters_match_the_groups(shared_data_dir, tmp_path, monkeypatch):
    import json

    from huscf.config import build_config
    from huscf.trainer import Trainer

    monkeypatch.setenv("HUSCF_CACHE", str(tmp_path / "cache"))
    cfg = build_config({}, ["data.domains=[fsdd]", "data.scenario=by_group", "data.clients_per_domain=6",
                            f"data.data_dir={shared_data_dir}", "model.width=0.125", "train.rounds=1",
                            "train.local_epochs=1", "train.max_iters_per_epoch=1", "train.batch_size=16",
                            "output.samples_every=0", "cuts.method=random"])
    t = Trainer.new(cfg, tmp_path / "run", quiet=True)
    assert sorted(t.setup.client_groups) == sorted(f"fsdd:{s}" for s in load_domain("fsdd", "train",
                                                                                  shared_data_dir).group_names)
    t.fit()
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    from sklearn.metrics import adjusted_rand_score
    assert row["ari_vs_groups"] == pytest.approx(adjusted_rand_score(t.setup.client_groups, row["clusters"]))
    clients = json.loads((tmp_path / "run" / "clients.json").read_text())["clients"]
    assert [c["group"] for c in clients] == t.setup.client_groups


def test_label_probe_asks_each_domain_for_its_own_labels(shared_data_dir, tmp_path):
    """PneumoniaMNIST (2 classes) beside a 10-class domain: the model embeds 10 labels, but the
    pneumonia probe is only asked about labels 0 and 1 (else 8 of 10 rows could never be right)."""
    from huscf.config import build_config
    from huscf.trainer import Trainer

    cfg = build_config({}, ["data.domains=[digits, pneumoniamnist]", "data.clients_per_domain=1",
                            f"data.data_dir={shared_data_dir}", "data.limit_per_domain=200", "model.width=0.125",
                            "train.rounds=1", "output.samples_every=0", "cuts.method=random"])
    t = Trainer.new(cfg, tmp_path / "run", quiet=True)
    asked = {}
    for name, probe in t.probes.items():
        def record(images, labels, name=name, fn=probe.label_accuracy):
            asked[name] = sorted(set(labels.tolist()))
            return fn(images, labels)
        object.__setattr__(probe, "label_accuracy", record)
    t._label_accuracy(1)
    assert asked == {"digits": list(range(10)), "pneumoniamnist": [0, 1]}
    t._save_samples(1, np.array([0, 1]))  # the sample grids likewise: 10 rows for digits, 2 for pneumonia
    from PIL import Image
    heights = [Image.open(t.run.samples / f"round_0001_cluster_{g}.png").size[1] for g in (0, 1)]
    assert heights[0] > 4 * heights[1]
