"""Downloads of CIFAR-10, PneumoniaMNIST, BloodMNIST, DermaMNIST, SVHN and FSDD: verification and
conversion of each official release, served from local files (file:// URLs) built in the release's
own format."""

import dataclasses
import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from scipy.io import wavfile

from huscf.cli import main
from huscf.data import archives, load_domain
from huscf.data.sources import DOMAINS
from huscf.errors import HuscfError


def _serve(monkeypatch, name, path, md5=None):
    """Point ``name``'s release at a local file (and at its md5 unless ``md5`` is given or it has none)."""
    source = DOMAINS[name]
    if md5 is None and source.fetch.md5 is not None:
        md5 = hashlib.md5(path.read_bytes()).hexdigest()
    release = dataclasses.replace(source.fetch, urls=(path.as_uri(),), md5=md5)
    monkeypatch.setitem(DOMAINS, name, dataclasses.replace(source, fetch=release))


def _download(name, data_dir, capsys):
    """Exit code and stderr without the progress lines ("downloading URL", "verified, converting")."""
    code = main(["data", "download", name, "--data-dir", str(data_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    return code, "\n".join(line for line in err if not line.startswith(("downloading ", f"{name}: verified")))


def _cifar_archive(path, per_batch=2):
    """The binary release's layout: records of one label byte then the R, G and B planes."""
    def batch(offset):
        records = []
        for k in range(per_batch):
            label = (offset + k) % 10
            planes = [np.full(1024, 10 * c + label, np.uint8) for c in (1, 2, 3)]
            records.append(bytes([label]) + b"".join(p.tobytes() for p in planes))
        return b"".join(records)

    members = {f"data_batch_{k}.bin": batch(k * per_batch) for k in range(1, 6)} | {
        "test_batch.bin": batch(0), "batches.meta.txt": "\n".join(
            ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck", ""]).encode()}
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_cifar10_download_is_verified_and_converted(tmp_path, monkeypatch, capsys):
    _serve(monkeypatch, "cifar10", _cifar_archive(tmp_path / "cifar-10-binary.tar.gz"))
    data = tmp_path / "data"
    (data / "cifar10").mkdir(parents=True)
    np.savez(data / "cifar10" / "cifar10_subset.npz", x_train=np.zeros((1, 32, 32, 3), np.uint8),
             y_train=np.zeros(1, np.uint8), x_test=np.zeros((1, 32, 32, 3), np.uint8), y_test=np.zeros(1, np.uint8))
    code, err = _download("cifar10", data, capsys)
    assert code == 0, err
    assert sorted(p.name for p in (data / "cifar10").iterdir()) == ["cifar10.npz", "cifar10_subset.npz"]
    train = load_domain("cifar10", "train", data)  # the full set is preferred to the subset
    assert train.images.shape == (10, 3, 32, 32) and train.class_names[0] == "airplane"
    for img, label in zip(train.images, train.labels):  # planes became channels, labels kept
        assert [int(img[c].min()) for c in range(3)] == [10 + label, 20 + label, 30 + label]
        assert [int(img[c].max()) for c in range(3)] == [10 + label, 20 + label, 30 + label]
    assert len(load_domain("cifar10", "test", data)) == 2


def test_a_download_that_fails_verification_leaves_nothing(tmp_path, monkeypatch, capsys):
    _serve(monkeypatch, "cifar10", _cifar_archive(tmp_path / "a.tar.gz"), md5="0" * 32)
    code, err = _download("cifar10", tmp_path / "data", capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "failed verification: md5" in err and "expected " + "0" * 32 in err
    assert list((tmp_path / "data" / "cifar10").iterdir()) == []


def test_an_unreachable_download_is_one_line(tmp_path, monkeypatch, capsys):
    _serve(monkeypatch, "pneumoniamnist", tmp_path / "missing.npz", md5="0" * 32)
    code, err = _download("pneumoniamnist", tmp_path / "data", capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "could not download pneumoniamnist" in err


def test_pneumoniamnist_download_becomes_idx(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    splits = {"train": 6, "val": 3, "test": 4}
    release = {f"{s}_images": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in splits.items()}
    # labels as MedMNIST ships them: (N, 1)
    release |= {f"{s}_labels": rng.integers(0, 2, (n, 1), dtype=np.uint8) for s, n in splits.items()}
    np.savez(tmp_path / "pneumoniamnist.npz", **release)
    _serve(monkeypatch, "pneumoniamnist", tmp_path / "pneumoniamnist.npz")
    code, err = _download("pneumoniamnist", tmp_path / "data", capsys)
    assert code == 0, err
    assert (tmp_path / "data" / "pneumoniamnist" / "val-images-idx3-ubyte.gz").is_file()
    for split, key in (("train", "train"), ("test", "test")):
        d = load_domain("pneumoniamnist", split, tmp_path / "data")
        np.testing.assert_array_equal(d.images[:, 0], release[f"{key}_images"])
        np.testing.assert_array_equal(d.labels, release[f"{key}_labels"].reshape(-1))
        assert d.class_names == ("normal", "pneumonia")


def _fsdd_zip(path, shared, tamper=False):
    """The repository zip at the pinned commit, rebuilt from the shared fsdd.npz (bit-exact to its WAVs)."""
    z = np.load(shared / "fsdd" / "fsdd.npz")
    names = z["speaker_names"]
    root = f"free-spoken-digit-dataset-{archives.FSDD_COMMIT}"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        out.writestr(f"{root}/README.md", "spoken digits\n")
        for part in ("train", "test"):
            rows = zip(z[f"x_{part}"], z[f"len_{part}"], z[f"y_{part}"], z[f"speaker_{part}"], z[f"index_{part}"])
            for x, n, y, s, i in rows:
                samples = x[:n].copy()
                if tamper and (y, i) == (3, 7):
                    samples[0] ^= 1  # one bit of one sample of a few recordings
                buf = io.BytesIO()
                wavfile.write(buf, archives.FSDD_SAMPLE_RATE, samples)
                out.writestr(f"{root}/recordings/{y}_{names[s]}_{i}.wav", buf.getvalue())
    return path


def test_fsdd_download_is_verified_by_content(tmp_path, monkeypatch, capsys, shared_data_dir):
    _serve(monkeypatch, "fsdd", _fsdd_zip(tmp_path / "fsdd.zip", shared_data_dir))
    code, err = _download("fsdd", tmp_path / "data", capsys)
    assert code == 0, err
    ours, shared = np.load(tmp_path / "data" / "fsdd" / "fsdd.npz"), np.load(shared_data_dir / "fsdd" / "fsdd.npz")
    assert sorted(ours.files) == sorted(shared.files)
    for key in shared.files:
        assert ours[key].dtype == shared[key].dtype and np.array_equal(ours[key], shared[key]), key

    _serve(monkeypatch, "fsdd", _fsdd_zip(tmp_path / "bad.zip", shared_data_dir, tamper=True))
    code, err = _download("fsdd", tmp_path / "data2", capsys)
    assert code == 2 and "FSDD download failed verification: 3000 recordings" in err
    assert not (tmp_path / "data2" / "fsdd" / "fsdd.npz").exists()


def test_fsdd_rejects_audio_it_cannot_use(tmp_path):
    buf = io.BytesIO()
    wavfile.write(buf, 16000, np.zeros(100, np.int16))
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as out:
        out.writestr("x/recordings/1_theo_3.wav", buf.getvalue())
    with pytest.raises(Exception, match="1_theo_3.wav is 16000 Hz"):
        archives.convert_fsdd(tmp_path / "a.zip", tmp_path, "0" * 64)


def _medmnist_rgb(path, classes, splits=(("train", 40), ("val", 4), ("test", 12)), seed=0):
    """MedMNIST's RGB layout: {split}_images (N, 28, 28, 3) uint8, {split}_labels (N, 1)."""
    rng = np.random.default_rng(seed)
    release = {f"{s}_images": rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8) for s, n in splits}
    release |= {f"{s}_labels": (np.arange(n) % classes).reshape(n, 1).astype(np.uint8) for s, n in splits}
    np.savez(path, **release)
    return release


@pytest.mark.parametrize("name, classes", [("bloodmnist", 8), ("dermamnist", 7)])
def test_medmnist_rgb_download_is_verified_and_converted(tmp_path, monkeypatch, capsys, name, classes):
    release = _medmnist_rgb(tmp_path / f"{name}.npz", classes)
    _serve(monkeypatch, name, tmp_path / f"{name}.npz")
    code, err = _download(name, tmp_path / "data", capsys)
    assert code == 0, err
    for split in ("train", "test"):
        d = load_domain(name, split, tmp_path / "data")
        assert d.images.shape == (len(release[f"{split}_images"]), 3, 28, 28) and d.num_classes == classes
        np.testing.assert_array_equal(d.images, release[f"{split}_images"].transpose(0, 3, 1, 2))
        np.testing.assert_array_equal(d.labels, release[f"{split}_labels"].reshape(-1))
    # a grey MedMNIST file under the colour name is refused in one line, and nothing is left
    np.savez(tmp_path / "grey.npz", **{f"{s}_{k}": np.zeros((2, 28, 28) if k == "images" else (2, 1), np.uint8)
                                       for s in ("train", "val", "test") for k in ("images", "labels")})
    _serve(monkeypatch, name, tmp_path / "grey.npz")
    code, err = _download(name, tmp_path / "other", capsys)
    assert code == 2 and f"{name}.npz: unexpected train arrays uint8 (2, 28, 28)" in err and "\n" not in err
    assert not list((tmp_path / "other" / name).iterdir())


def _svhn_mat(path, n, seed):
    """The official MATLAB v5 layout: X (32, 32, 3, N) uint8, y (N, 1) in 1..10 (10 = the digit 0)."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)
    savemat(path, {"X": x, "y": y})
    return x, y


def _serve_svhn(monkeypatch, files):
    source = DOMAINS["svhn"]
    parts = tuple(dataclasses.replace(p, urls=(files[p.archive].as_uri(),),
                                      md5=hashlib.md5(files[p.archive].read_bytes()).hexdigest())
                  for p in source.fetch.parts)
    monkeypatch.setitem(DOMAINS, "svhn", dataclasses.replace(source, fetch=dataclasses.replace(source.fetch,
                                                                                              parts=parts)))


def test_svhn_download_fetches_both_files_and_maps_label_10_to_0(tmp_path, monkeypatch, capsys):
    arrays = {"train_32x32.mat": _svhn_mat(tmp_path / "train_32x32.mat", 30, 0),
              "test_32x32.mat": _svhn_mat(tmp_path / "test_32x32.mat", 12, 1)}
    _serve_svhn(monkeypatch, {k: tmp_path / k for k in arrays})
    code, err = _download("svhn", tmp_path / "data", capsys)
    assert code == 0, err
    for split in ("train", "test"):
        x, y = arrays[f"{split}_32x32.mat"]
        d = load_domain("svhn", split, tmp_path / "data")
        np.testing.assert_array_equal(d.images, x.transpose(3, 2, 0, 1))
        np.testing.assert_array_equal(d.labels, y.reshape(-1) % 10)
        assert d.labels.min() == 0 and d.labels.max() == 9 and d.class_names == tuple("0123456789")
    # a file that is not the cropped-digits format: one line naming it
    from scipy.io import savemat

    savemat(tmp_path / "bad.mat", {"X": np.zeros((28, 28, 3, 2), np.uint8), "y": np.ones((2, 1), np.uint8)})
    with pytest.raises(HuscfError, match=r"svhn train_32x32.mat: X is uint8 \(28, 28, 3, 2\)"):
        archives.convert_svhn(tmp_path / "bad.mat", tmp_path, "train")
    (tmp_path / "junk.mat").write_bytes(b"not matlab")
    with pytest.raises(HuscfError, match="not a MATLAB file"):
        archives.convert_svhn(tmp_path / "junk.mat", tmp_path, "train")


def test_a_colour_28x28_config_trains_on_the_converted_files(tmp_path, monkeypatch, capsys):
    """The shipped BloodMNIST + DermaMNIST config, scaled down, on fixture files: cgan28_rgb, 8 classes."""
    from huscf.config import load_config
    from huscf.trainer import Trainer

    for name, classes in (("bloodmnist", 8), ("dermamnist", 7)):
        (tmp_path / "data" / name).mkdir(parents=True)
        release = _medmnist_rgb(tmp_path / "r.npz", classes, splits=(("train", 96), ("val", 4), ("test", 16)))
        archives.convert_medmnist_rgb(tmp_path / "r.npz", tmp_path / "data" / name, name)
        assert release["train_images"].shape == (96, 28, 28, 3)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "medmnist_blood_derma.yaml",
                      ["data.clients_per_domain=2", "model.width=0.125", "train.rounds=1", "train.local_epochs=1",
                       "train.batch_size=8", "train.max_iters_per_epoch=1", "output.samples_every=0",
                       "cuts.method=fixed", "cuts.fixed=[1,0,1,0]"], str(tmp_path / "data"))
    Trainer.new(cfg, tmp_path / "run", quiet=True).fit()
    assert (tmp_path / "run" / "checkpoints").is_dir()
