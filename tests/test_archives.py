"""Downloads of CIFAR-10, PneumoniaMNIST and FSDD: verification and conversion of each official
release, served from local files (file:// URLs) built in the release's own format."""

import dataclasses
import hashlib
import io
import tarfile
import zipfile

import numpy as np
import pytest
from scipy.io import wavfile

from huscf.cli import main
from huscf.data import archives, load_domain
from huscf.data.sources import DOMAINS


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
