"""Official releases of the sets that do not ship as MNIST-style IDX files: how each download is
verified, and how it becomes the layout ``sources`` reads (their URLs and digests are in their
entries in ``sources.DOMAINS``).

* ``cifar10``: the authors' binary release (``cifar-10-binary.tar.gz``, fixed-size records, no
  pickle), MD5 as published on the CIFAR page. Becomes ``cifar10/cifar10.npz``: the full 50k/10k
  set, which the reader prefers to the 10k/2k ``cifar10_subset.npz`` of the shared data folder.
* ``pneumoniamnist``: MedMNIST v2's ``pneumoniamnist.npz`` (Zenodo), MD5 as listed in MedMNIST's
  own ``INFO`` table. Becomes IDX files (train, val, t10k = MedMNIST's test).
* ``bloodmnist``, ``dermamnist``: MedMNIST v2's ``bloodmnist.npz`` / ``dermamnist.npz`` (Zenodo;
  28x28 RGB), MD5 as listed in MedMNIST's ``INFO`` table. Each becomes ``<name>/<name>.npz``
  with ``x_train``/``y_train``, ``x_val``/``y_val`` and ``x_test``/``y_test`` (N, 28, 28, 3).
* ``svhn``: the Street View House Numbers' cropped-digit files ``train_32x32.mat`` and
  ``test_32x32.mat`` (MATLAB v5: ``X`` (32, 32, 3, N) uint8, ``y`` (N, 1) in 1..10, 10 for the
  digit 0), MD5s as torchvision and Keras list them. Each becomes ``svhn/svhn_<split>.npz``
  (``x_<split>`` (N, 32, 32, 3), ``y_<split>`` 0..9).
* ``fsdd``: the Free Spoken Digit Dataset's GitHub repository at a fixed commit, as a zip. GitHub
  builds archives on the fly and does not promise the same bytes twice, so the *content* is
  verified instead: the recordings, decoded and arranged as ``fsdd.npz`` (official split:
  recording 0-4 test), must hash to the digest of the shared folder's ``fsdd.npz``, which was
  built from the same commit.

Members are read from the archives by name; nothing is extracted to disk.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from scipy.io import wavfile

from huscf.data.idx import write_idx
from huscf.errors import HuscfError

FSDD_COMMIT = "26eb9aaf76e81b692f806f9140c2d2777410d7a1"
FSDD_SAMPLE_RATE = 8000
_FSDD_NAME = re.compile(r"(?:^|/)recordings/(\d)_([a-z]+)_(\d+)\.wav$")
_CIFAR_DIR = "cifar-10-batches-bin"
_CIFAR_RECORD = 1 + 32 * 32 * 3  # label byte, then the red, green and blue 32x32 planes


def _save_npz(path: Path, **arrays: np.ndarray) -> Path:
    """``np.savez_compressed`` under a temporary name, then renamed: never a half-written file."""
    tmp = path.with_name(f".{path.stem}.part.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return path


def _save_idx(path: Path, array: np.ndarray) -> Path:
    tmp = write_idx(path.with_name(f".{path.name}.part"), array)
    os.replace(tmp, path)
    return path


def content_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the arrays in key order: each key, dtype, shape and bytes."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ---- CIFAR-10 --------------------------------------------------------------------------------------

def _cifar_member(tar: tarfile.TarFile, name: str) -> bytes:
    try:
        f = tar.extractfile(f"{_CIFAR_DIR}/{name}")
    except KeyError:
        f = None
    if f is None:
        raise HuscfError(f"the CIFAR-10 archive has no {_CIFAR_DIR}/{name}: not the binary release")
    return f.read()


def _cifar_batches(raw: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    if len(raw) % _CIFAR_RECORD:
        raise HuscfError(f"CIFAR-10 {name}: {len(raw)} bytes is not a whole number of {_CIFAR_RECORD}-byte records")
    records = np.frombuffer(raw, np.uint8).reshape(-1, _CIFAR_RECORD)
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # planes -> (N, 32, 32, 3)
    return np.ascontiguousarray(images), records[:, 0].copy()


def convert_cifar10(archive: Path, dest: Path) -> list[Path]:
    """``cifar-10-binary.tar.gz`` -> ``dest/cifar10.npz`` (x/y train and test, class_names)."""
    with tarfile.open(archive, "r:gz") as tar:
        train = [_cifar_batches(_cifar_member(tar, f"data_batch_{k}.bin"), f"data_batch_{k}.bin") for k in range(1, 6)]
        x_test, y_test = _cifar_batches(_cifar_member(tar, "test_batch.bin"), "test_batch.bin")
        names = [n for n in _cifar_member(tar, "batches.meta.txt").decode().split() if n]
    return [_save_npz(dest / "cifar10.npz", x_train=np.concatenate([x for x, _ in train]),
                      y_train=np.concatenate([y for _, y in train]), x_test=x_test, y_test=y_test,
                      class_names=np.array(names))]


# ---- PneumoniaMNIST ---------------------------------------------------------------------------------

def convert_pneumoniamnist(archive: Path, dest: Path) -> list[Path]:
    """MedMNIST's ``pneumoniamnist.npz`` -> IDX files ``{train,val,t10k}-{images-idx3,labels-idx1}-ubyte.gz``."""
    written = []
    with np.load(archive, allow_pickle=False) as z:
        for split, prefix in (("train", "train"), ("val", "val"), ("test", "t10k")):
            images, labels = z[f"{split}_images"], z[f"{split}_labels"].reshape(-1)
            if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(labels):
                raise HuscfError(f"pneumoniamnist.npz: unexpected {split} arrays {images.dtype} {images.shape}, "
                                 f"{len(labels)} labels")
            written.append(_save_idx(dest / f"{prefix}-images-idx3-ubyte.gz", images))
            written.append(_save_idx(dest / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8)))
    return written


def convert_medmnist_rgb(archive: Path, dest: Path, name: str) -> list[Path]:
    """MedMNIST's RGB ``<name>.npz`` (``{train,val,test}_images`` (N, 28, 28, 3) uint8, labels (N, 1))
    -> ``dest/<name>.npz`` with ``x_<split>``, ``y_<split>`` (labels flattened)."""
    arrays = {}
    with np.load(archive, allow_pickle=False) as z:
        for split in ("train", "val", "test"):
            images, labels = z[f"{split}_images"], z[f"{split}_labels"].reshape(-1)
            if images.ndim != 4 or images.shape[1:] != (28, 28, 3) or images.dtype != np.uint8 \
                    or len(images) != len(labels):
                raise HuscfError(f"{name}.npz: unexpected {split} arrays {images.dtype} {images.shape}, "
                                 f"{len(labels)} labels (expected uint8 (N, 28, 28, 3))")
            arrays[f"x_{split}"], arrays[f"y_{split}"] = images, labels.astype(np.uint8)
    return [_save_npz(dest / f"{name}.npz", **arrays)]


# ---- SVHN ------------------------------------------------------------------------------------------

def convert_svhn(archive: Path, dest: Path, split: str) -> list[Path]:
    """The official ``<split>_32x32.mat`` -> ``dest/svhn_<split>.npz``: images (N, 32, 32, 3), labels
    0..9 (the file's label 10 is the digit 0)."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        mat = loadmat(archive)
    except (MatReadError, ValueError) as exc:
        raise HuscfError(f"svhn {split}_32x32.mat: not a MATLAB file ({exc})") from None
    if "X" not in mat or "y" not in mat:
        raise HuscfError(f"svhn {split}_32x32.mat: no 'X' and 'y' (has {', '.join(k for k in mat if k[0] != '_')})")
    x, y = mat["X"], mat["y"].reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8 or x.shape[3] != len(y):
        raise HuscfError(f"svhn {split}_32x32.mat: X is {x.dtype} {x.shape} for {len(y)} labels "
                         f"(expected uint8 (32, 32, 3, N))")
    if len(y) and (y.min() < 1 or y.max() > 10):
        raise HuscfError(f"svhn {split}_32x32.mat: labels {y.min()}..{y.max()}, expected 1..10")
    images = np.ascontiguousarray(x.transpose(3, 0, 1, 2))
    return [_save_npz(dest / f"svhn_{split}.npz", **{f"x_{split}": images, f"y_{split}": (y % 10).astype(np.uint8)})]


# ---- Free Spoken Digit Dataset ----------------------------------------------------------------------

def fsdd_arrays(recordings: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ``fsdd.npz`` arrays from ``{file name: int16 samples}`` (``<digit>_<speaker>_<index>.wav``).

    Recordings are taken in file-name order; index 0-4 is the official test split. Each split's
    audio is zero-padded on the right to its longest recording, with the true lengths beside it."""
    parsed = []
    for name in sorted(recordings):
        m = _FSDD_NAME.search("recordings/" + name)
        if m is None:
            raise HuscfError(f"FSDD: unexpected recording name {name!r} (want <digit>_<speaker>_<index>.wav)")
        parsed.append((name, int(m.group(1)), m.group(2), int(m.group(3))))
    speakers = sorted({p[2] for p in parsed})
    out: dict[str, np.ndarray] = {"sample_rate": np.array(FSDD_SAMPLE_RATE, np.int32),
                                  "speaker_names": np.array(speakers)}
    for part, keep in (("train", lambda i: i >= 5), ("test", lambda i: i < 5)):
        rows = [p for p in parsed if keep(p[3])]
        lengths = np.array([len(recordings[p[0]]) for p in rows], np.int32)
        x = np.zeros((len(rows), int(lengths.max(initial=0))), np.int16)
        for k, p in enumerate(rows):
            x[k, :lengths[k]] = recordings[p[0]]
        out |= {f"x_{part}": x, f"len_{part}": lengths,
                f"y_{part}": np.array([p[1] for p in rows], np.uint8),
                f"speaker_{part}": np.array([speakers.index(p[2]) for p in rows], np.uint8),
                f"index_{part}": np.array([p[3] for p in rows], np.uint8)}
    return out


def _read_wav(raw: bytes, name: str) -> np.ndarray:
    try:
        rate, samples = wavfile.read(io.BytesIO(raw))
    except ValueError as exc:
        raise HuscfError(f"FSDD: {name} is not a readable WAV file ({exc})") from None
    if rate != FSDD_SAMPLE_RATE or samples.dtype != np.int16 or samples.ndim != 1:
        raise HuscfError(f"FSDD: {name} is {rate} Hz {samples.dtype} with shape {samples.shape}; "
                         f"expected {FSDD_SAMPLE_RATE} Hz mono int16")
    return samples


def convert_fsdd(archive: Path, dest: Path, sha256: str) -> list[Path]:
    """The repository zip -> ``dest/fsdd.npz``, once its content digest (``content_digest``) is ``sha256``."""
    recordings = {}
    with zipfile.ZipFile(archive) as z:
        for info in z.infolist():
            if _FSDD_NAME.search(info.filename):
                name = info.filename.rsplit("/", 1)[-1]
                recordings[name] = _read_wav(z.read(info), name)
    if not recordings:
        raise HuscfError("the FSDD archive holds no recordings/<digit>_<speaker>_<index>.wav files")
    arrays = fsdd_arrays(recordings)
    got = content_digest(arrays)
    if got != sha256:
        raise HuscfError(f"FSDD download failed verification: {len(recordings)} recordings with content sha256 "
                         f"{got}, expected {sha256} (the recordings at commit {FSDD_COMMIT[:10]})")
    return [_save_npz(dest / "fsdd.npz", **arrays)]

