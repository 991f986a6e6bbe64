"""Tests for huscf.data: IDX files, domains, carved splits, offline domains, partitions, download."""

import dataclasses
import gzip
import hashlib
import io

import numpy as np
import pytest
import torch

from huscf.data import (
    ClientPartition,
    describe,
    download,
    known_domains,
    load_domain,
    partition,
    read_idx,
    resolve_data_dir,
    to_tensor,
    write_idx,
)
from huscf.data.sources import DOMAINS, IdxFiles, carve_split
from huscf.errors import HuscfError

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


# ---- IDX --------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("array", [
    np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
    np.array([7, 0, 255], dtype=np.uint8),
    np.array([[-5, 70000], [1, 2]], dtype=np.int32),
    np.array([1.5, -2.25], dtype=np.float32),
])
def test_idx_round_trip(tmp_path, array, gz):
    path = write_idx(tmp_path / "a.idx", array, gz=gz)
    back = read_idx(path)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    assert back.flags.writeable


def test_idx_header_bytes(tmp_path):
    path = write_idx(tmp_path / "l", np.array([3, 1], dtype=np.uint8), gz=False)
    assert path.read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 2, 3, 1])


def test_idx_bad_magic(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(b"\x12\x34\x08\x01" + b"\x00" * 8))
    with pytest.raises(HuscfError, match="bad.gz: bad magic number 0x12340801"):
        read_idx(path)


def test_idx_truncated_payload(tmp_path):
    good = write_idx(tmp_path / "x", np.zeros((3, 4, 4), np.uint8), gz=False).read_bytes()
    (tmp_path / "short").write_bytes(good[:-5])
    with pytest.raises(HuscfError, match=r"short: truncated: shape \(3, 4, 4\) needs 64 bytes, file holds 59"):
        read_idx(tmp_path / "short")
    (tmp_path / "long").write_bytes(good + b"\x00")
    with pytest.raises(HuscfError, match="long: has trailing bytes"):
        read_idx(tmp_path / "long")


def test_idx_truncated_gzip(tmp_path):
    raw = write_idx(tmp_path / "x.gz", np.arange(5000, dtype=np.int32)).read_bytes()
    (tmp_path / "cut.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(HuscfError, match="cut.gz: corrupt or truncated gzip"):
        read_idx(tmp_path / "cut.gz")


def test_idx_missing_file(tmp_path):
    with pytest.raises(HuscfError, match="cannot read IDX file .*nope.gz"):
        read_idx(tmp_path / "nope.gz")


def test_idx_gzip_with_dotted_stored_name(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    payload = write_idx(tmp_path / "plain", array, gz=False).read_bytes()
    buf = io.BytesIO()
    with gzip.GzipFile(filename="train-images.idx3-ubyte.v1.2", mode="wb", fileobj=buf, mtime=123456) as f:
        f.write(payload)
    assert b"train-images.idx3-ubyte.v1.2\x00" in buf.getvalue()[:64]
    (tmp_path / "some.name.gz").write_bytes(buf.getvalue())
    np.testing.assert_array_equal(read_idx(tmp_path / "some.name.gz"), array)


# ---- real data --------------------------------------------------------------------------------

def test_mnist_real(shared_data_dir):
    train = load_domain("mnist", "train", shared_data_dir)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int64
    assert np.bincount(train.labels).tolist() == MNIST_TRAIN_COUNTS
    assert train.num_classes == 10 and train.class_names[3] == "3"
    assert train.images.max() == 255 and train.images.min() == 0
    test = load_domain("mnist", "test", shared_data_dir)
    assert test.images.shape == (10000, 1, 28, 28)
    assert int(test.labels[0]) == 7 and int(train.labels[0]) == 5  # the famous first digits


def test_fashion_real(shared_data_dir):
    train = load_domain("fashion_mnist", "train", shared_data_dir)
    test = load_domain("fashion_mnist", "test", shared_data_dir)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert train.class_names[9] == "Ankle boot"


def test_domain_arrays_are_read_only(shared_data_dir):
    for d in (load_domain("mnist", "test", shared_data_dir), load_domain("digits")):
        with pytest.raises(ValueError):
            d.images[0, 0, 0, 0] = 1
        with pytest.raises(ValueError):
            d.labels[0] = 1


@pytest.mark.parametrize("name,first", [("kmnist", "o"), ("notmnist", "A")])
def test_carved_split(shared_data_dir, name, first):
    t10k_x = read_idx(shared_data_dir / name / "t10k-images-idx3-ubyte.gz")
    t10k_y = read_idx(shared_data_dir / name / "t10k-labels-idx1-ubyte.gz")
    np.random.seed(999)  # the carve must not depend on global random state
    torch.manual_seed(999)
    train, test = load_domain(name, "train", shared_data_dir), load_domain(name, "test", shared_data_dir)
    assert train.images.shape == (8000, 1, 28, 28) and test.images.shape == (2000, 1, 28, 28)
    assert np.bincount(train.labels).tolist() == [800] * 10
    assert np.bincount(test.labels).tolist() == [200] * 10
    assert train.class_names[0] == first
    tr, te = carve_split(t10k_y)
    assert np.array_equal(tr, carve_split(t10k_y)[0]) and np.array_equal(te, carve_split(t10k_y)[1])
    assert len(np.intersect1d(tr, te)) == 0 and len(np.union1d(tr, te)) == 10000
    np.testing.assert_array_equal(train.images[:, 0], t10k_x[tr])
    np.testing.assert_array_equal(test.labels, t10k_y[te])


def test_carved_split_is_pinned(shared_data_dir):
    """The carved test set must never change (fixed seed): pin its first indices."""
    y = read_idx(shared_data_dir / "kmnist" / "t10k-labels-idx1-ubyte.gz")
    tr, te = carve_split(y)
    assert tr[:5].tolist() == [5020, 3363, 795, 3411, 58]
    assert te[:5].tolist() == [5747, 6967, 908, 4826, 3024]


def test_shared_sha256sums_match_download_table(shared_data_dir):
    listed = {}
    for line in (shared_data_dir / "SHA256SUMS").read_text().splitlines():
        digest, path = line.split()
        listed[path.removeprefix("./")] = digest
    compared = 0
    for name, source in DOMAINS.items():
        for fname, digest in (source.fetch.sha256 if isinstance(source.fetch, IdxFiles) else {}).items():
            if f"{name}/{fname}" in listed:
                assert listed[f"{name}/{fname}"] == digest, f"{name}/{fname}"
                compared += 1
    assert compared == 10  # mnist 4 + fashion 4 + kmnist t10k 2


# ---- synthetic data folders ---------------------------------------------------------------------

def _write_split(folder, prefix, images, labels):
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)


def _fake(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.repeat(np.arange(10, dtype=np.uint8), n // 10)


def test_missing_data_message(tmp_path):
    with pytest.raises(HuscfError) as err:
        load_domain("mnist", "train", tmp_path)
    assert str(err.value) == (
        f"data for 'mnist' not found: {tmp_path}/mnist/train-images-idx3-ubyte.gz is missing "
        "(set --data-dir or HUSCF_DATA, or run 'huscf data download mnist')")
    assert "\n" not in str(err.value)


def test_partial_train_names_missing_file(tmp_path):
    images, labels = _fake(50)
    _write_split(tmp_path / "fashion_mnist", "t10k", images, labels)
    write_idx(tmp_path / "fashion_mnist" / "train-images-idx3-ubyte.gz", images)
    with pytest.raises(HuscfError, match="train-labels-idx1-ubyte.gz is missing"):
        load_domain("fashion_mnist", "test", tmp_path)


def test_t10k_only_folder_is_carved(tmp_path):
    images, labels = _fake(100)
    _write_split(tmp_path / "mnist", "t10k", images, labels)
    train, test = load_domain("mnist", "train", tmp_path), load_domain("mnist", "test", tmp_path)
    assert len(train) == 80 and len(test) == 20
    assert np.bincount(test.labels).tolist() == [2] * 10


def test_mismatched_label_count(tmp_path):
    images, labels = _fake(20)
    _write_split(tmp_path / "kmnist", "t10k", images, labels[:10])
    with pytest.raises(HuscfError, match="10 labels for 20 images"):
        load_domain("kmnist", "test", tmp_path)


def test_unknown_domain_and_split():
    with pytest.raises(HuscfError, match="unknown domain 'cifar'; known domains: mnist, fashion_mnist, kmnist"):
        load_domain("cifar")
    with pytest.raises(HuscfError, match="split must be 'train' or 'test', got 'val'"):
        load_domain("digits", "val")
    assert set(known_domains()) == {"mnist", "fashion_mnist", "kmnist", "notmnist", "pneumoniamnist", "cifar10", "fsdd",
                                    "svhn", "bloodmnist", "dermamnist", "digits", "digits_inverted", "digits_rotated"}


def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HUSCF_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "x") == tmp_path / "x"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("HUSCF_DATA")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path / ".cache" / "huscf" / "data"


# ---- offline digits domains -------------------------------------------------------------------

def test_digits_domains():
    base = load_domain("digits", "train")
    test = load_domain("digits", "test")
    assert base.images.shape == (1437, 1, 28, 28) and test.images.shape == (360, 1, 28, 28)
    assert base.images.dtype == np.uint8 and base.labels.dtype == np.int64
    assert base.images.max() == 255 and base.images.min() == 0
    assert base.images[:, :, :4].max() == 0 and base.images[:, :, :, 24:].max() == 0  # 4-pixel border
    assert np.bincount(test.labels).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    inv = load_domain("digits_inverted", "train")
    np.testing.assert_array_equal(inv.images, 255 - base.images.astype(np.int64))
    np.testing.assert_array_equal(inv.labels, base.labels)
    rot = load_domain("digits_rotated", "train")
    np.testing.assert_array_equal(rot.images[:, 0], np.rot90(base.images[:, 0], 1, axes=(1, 2)))
    assert not np.array_equal(rot.images, base.images)
    assert load_domain("digits") is load_domain("digits")  # cached


def test_to_tensor():
    x = to_tensor(np.array([[[[0, 255], [51, 204]]]], dtype=np.uint8))
    assert x.dtype == torch.float32 and x.shape == (1, 1, 2, 2)
    torch.testing.assert_close(x, torch.tensor([[[[-1.0, 1.0], [-0.6, 0.6]]]]))
    t = to_tensor(load_domain("digits").images)
    assert t.shape == (1437, 1, 28, 28) and t.min() == -1 and t.max() == 1


# ---- partitions -------------------------------------------------------------------------------

def _labels(n_per_class=600, classes=10, seed=0):
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), n_per_class))


def _check_disjoint_and_allowed(parts, labels_by_domain):
    for domain, labels in labels_by_domain.items():
        mine = [p for p in parts if p.domain == domain]
        allidx = np.concatenate([p.indices for p in mine])
        assert len(np.unique(allidx)) == len(allidx), "a sample was given to two clients"
        for p in mine:
            assert p.indices.dtype == np.int64 and len(p.indices) >= 1
            assert not np.isin(labels[p.indices], p.excluded_classes).any()


def test_iid_partition():
    lab = {"a": _labels(), "b": _labels(seed=1)[:5999]}
    parts = partition(lab, 4, "iid", seed=3)
    assert [p.client_id for p in parts] == list(range(8))
    assert [p.domain for p in parts] == ["a"] * 4 + ["b"] * 4
    assert [len(p) for p in parts] == [1500] * 4 + [1500, 1500, 1500, 1499]
    assert all(p.excluded_classes == () for p in parts)
    _check_disjoint_and_allowed(parts, lab)
    assert sum(len(p) for p in parts[:4]) == 6000


def test_noniid_partition():
    lab = {"a": _labels(), "b": _labels()}
    parts = partition(lab, 10, "noniid", seed=0)
    _check_disjoint_and_allowed(parts, lab)
    for domain in lab:
        mine = [p for p in parts if p.domain == domain]
        sizes = sorted(len(p) for p in mine)
        assert sizes == [400] * 3 + [600] * 7  # 30% of clients hold 2/3 of the even share 600
        assert {len(p.excluded_classes) for p in mine} <= {0, 2, 3, 4}
    # same labels, separate random streams: the two domains get different exclusions
    assert [p.excluded_classes for p in parts[:10]] != [p.excluded_classes for p in parts[10:]]


def test_highly_noniid_partition():
    lab = {"a": _labels()}
    parts = partition(lab, 10, "highly_noniid", seed=5)
    _check_disjoint_and_allowed(parts, lab)
    assert sorted(len(p) for p in parts) == [100] * 2 + [200] * 3 + [600] * 5
    assert {len(p.excluded_classes) for p in parts} <= {2, 3}
    assert all(len(p.excluded_classes) in (2, 3) for p in parts)


def test_pathological_partition():
    lab = {"a": _labels()}
    parts = partition(lab, 10, "pathological", seed=5)
    _check_disjoint_and_allowed(parts, lab)
    assert [len(p) for p in parts] == [600] * 10  # 20 shards of 300, two each: every sample used once
    for p in parts:  # shards of 300 never span a class of 600: one or two classes, and only those
        held = set(np.unique(lab["a"][p.indices]).tolist())
        assert len(held) in (1, 2) and held == set(range(10)) - set(p.excluded_classes)
    assert len({p.excluded_classes for p in parts}) > 1  # drawn per client, not one pair for all
    assert sum(len(p.excluded_classes) == 8 for p in parts) >= 8  # two classes is the rule
    uneven = partition({"a": _labels()[:5999]}, 7, "pathological", seed=1)
    assert sum(len(p) for p in uneven) == 5999 and max(map(len, uneven)) - min(map(len, uneven)) <= 2


def test_noniid_on_real_mnist_hits_targets(shared_data_dir):
    labels = load_domain("mnist", "train", shared_data_dir).labels
    parts = partition({"mnist": labels}, 10, "noniid", seed=7)
    _check_disjoint_and_allowed(parts, {"mnist": labels})
    assert sorted(len(p) for p in parts) == [4000] * 3 + [6000] * 7
    assert any(p.excluded_classes for p in parts)


def test_partition_reproducible_and_seed_dependent():
    lab = {"a": _labels(), "b": _labels()}
    one, two = partition(lab, 5, "noniid", seed=11), partition(lab, 5, "noniid", seed=11)
    assert all(np.array_equal(p.indices, q.indices) and p.excluded_classes == q.excluded_classes
               for p, q in zip(one, two))
    other = partition(lab, 5, "noniid", seed=12)
    assert any(not np.array_equal(p.indices, q.indices) for p, q in zip(one, other))
    # a domain's split does not depend on which other domains are present
    alone = partition({"b": lab["b"]}, 5, "noniid", seed=11)
    assert all(np.array_equal(p.indices, q.indices) for p, q in zip(alone, one[5:]))


def test_partition_two_classes_never_crashes():
    lab = {"xray": _labels(n_per_class=30, classes=2)}
    for scenario in ("noniid", "pathological", "highly_noniid"):  # highly_noniid last: checked below
        parts = partition(lab, 6, scenario, seed=1, num_classes={"xray": 2})
        _check_disjoint_and_allowed(parts, lab)
        assert all(len(p.excluded_classes) <= 1 for p in parts)
    # highly_noniid: every client excludes one of the two classes
    assert all(len(p.excluded_classes) == 1 for p in parts)


def test_partition_errors():
    with pytest.raises(HuscfError, match="domain 'a' has 3 training samples, fewer than clients_per_domain=4"):
        partition({"a": np.array([0, 1, 2])}, 4, "iid", seed=0)
    with pytest.raises(HuscfError, match="scenario 'pathological' needs two per client"):
        partition({"a": _labels()[:7]}, 4, "pathological", seed=0)
    with pytest.raises(HuscfError, match="unknown scenario 'wild'"):
        partition({"a": _labels()}, 2, "wild", seed=0)
    with pytest.raises(HuscfError, match="labels must lie in 0..1"):
        partition({"a": _labels()}, 2, "iid", seed=0, num_classes=2)
    with pytest.raises(HuscfError, match="num_classes has no entry for domain 'a'"):
        partition({"a": _labels()}, 2, "iid", seed=0, num_classes={"b": 10})


def test_describe():
    lab = {"a": _labels(n_per_class=10)}
    parts = partition(lab, 2, "highly_noniid", seed=0)
    text = describe(parts, lab).splitlines()
    assert text[0].split()[:4] == ["client", "domain", "size", "excluded"]
    assert len(text) == 3
    first = text[1].split()
    assert first[:3] == ["0", "a", str(len(parts[0]))]
    hist = [int(v) for v in first[4:]]
    assert sum(hist) == len(parts[0]) and len(hist) == 10
    assert all(hist[c] == 0 for c in parts[0].excluded_classes)
    assert isinstance(parts[0], ClientPartition)


# ---- download ---------------------------------------------------------------------------------

IDX_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz"]


def _serve_idx(monkeypatch, name, **changes):
    """Give ``name``'s entry other mirrors or digests (``IdxFiles`` fields) for one test."""
    source = DOMAINS[name]
    monkeypatch.setitem(DOMAINS, name, dataclasses.replace(source, fetch=dataclasses.replace(source.fetch, **changes)))


@pytest.fixture
def fake_mirror(tmp_path, monkeypatch):
    """A file:// mirror holding four small IDX files for 'kmnist', with their digests patched in."""
    src = tmp_path / "mirror"
    images, labels = _fake(40)
    _write_split(src, "train", images, labels)
    _write_split(src, "t10k", images[:20], labels[::2])
    digests = {f: hashlib.sha256((src / f).read_bytes()).hexdigest() for f in IDX_FILES}
    mirrors = ((tmp_path / "absent").as_uri() + "/", src.as_uri() + "/")  # the first is not there
    _serve_idx(monkeypatch, "kmnist", mirrors=mirrors, sha256=digests)
    return src, digests


def test_download_from_file_url(tmp_path, fake_mirror):
    out = tmp_path / "data"
    paths = download("kmnist", out, quiet=True)
    assert [p.name for p in paths] == IDX_FILES
    assert all(p.parent == out / "kmnist" for p in paths)
    assert len(load_domain("kmnist", "train", out)) == 40  # real train present: no carving
    assert len(load_domain("kmnist", "test", out)) == 20
    assert sorted(q.name for q in (out / "kmnist").iterdir()) == sorted(IDX_FILES)  # no temp files


def test_download_checksum_mismatch(tmp_path, fake_mirror, monkeypatch):
    _, digests = fake_mirror
    wrong = "0" * 64
    _serve_idx(monkeypatch, "kmnist", sha256={**digests, "train-images-idx3-ubyte.gz": wrong})
    out = tmp_path / "data"
    with pytest.raises(HuscfError) as err:
        download("kmnist", out, quiet=True)
    msg = str(err.value)
    assert "kmnist/train-images-idx3-ubyte.gz" in msg
    assert digests["train-images-idx3-ubyte.gz"] in msg and wrong in msg
    assert list((out / "kmnist").iterdir()) == []  # temp file removed, nothing half-written


def test_download_unreachable_and_unsupported(tmp_path, monkeypatch):
    _serve_idx(monkeypatch, "mnist", mirrors=((tmp_path / "nowhere").as_uri() + "/",))
    with pytest.raises(HuscfError, match="could not download mnist/train-images-idx3-ubyte.gz"):
        download("mnist", tmp_path / "data", quiet=True)
    with pytest.raises(HuscfError, match="notmnist has no official IDX download"):
        download("notmnist", tmp_path, quiet=True)
    with pytest.raises(HuscfError, match="unknown domain 'imagenet'"):
        download("imagenet", tmp_path, quiet=True)
    assert download("digits", tmp_path, quiet=True) == []


def test_a_new_domain_is_one_entry(monkeypatch, tmp_path):
    """Issue 27: adding a dataset is one ``DOMAINS`` entry; loading, listing, the download command
    and a run's set-up read it from there."""
    from huscf.config import build_config
    from huscf.data import sources
    from huscf.runsetup import build_setup

    def read(split, root):
        digits = load_domain("digits", split)
        flipped = np.ascontiguousarray(digits.images[..., ::-1])  # mirrored digits: a new domain
        flipped.flags.writeable = False
        return sources.Domain("digits_mirrored", flipped, digits.labels, 10, digits.class_names)

    with pytest.raises(HuscfError, match="unknown domain 'digits_mirrored'"):
        load_domain("digits_mirrored")
    monkeypatch.setitem(sources.DOMAINS, "digits_mirrored", sources.DomainSource(read, None, "made in a test"))
    assert "digits_mirrored" in known_domains()
    d = load_domain("digits_mirrored", "test", tmp_path)
    plain = load_domain("digits", "test").images
    assert d.images.shape[1:] == (1, 28, 28) and np.array_equal(d.images[0, 0, :, 0], plain[0, 0, :, -1])
    with pytest.raises(HuscfError, match="^made in a test$"):
        download("digits_mirrored", tmp_path, quiet=True)
    setup = build_setup(build_config({}, ["data.domains=[digits, digits_mirrored]", "data.clients_per_domain=2",
                                          "cuts.method=random"]))
    assert [c.domain for c in setup.data] == ["digits", "digits", "digits_mirrored", "digits_mirrored"]
