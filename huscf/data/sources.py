"""Domains: where each one's images come from, its train/test split, and the official-file download.

IDX domains are read from ``<data_dir>/<name>/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``. A domain
with only the t10k files gets a fixed, stratified 80/20 split of them (8,000 / 2,000 for the 10k files).
The ``digits*`` domains are built from scikit-learn's bundled 8x8 digits and need no files.
``cifar10`` reads ``<data_dir>/cifar10/cifar10.npz`` (the full set, as ``huscf data download``
writes it), else ``cifar10_subset.npz`` (32x32 RGB). ``fsdd`` reads
``<data_dir>/fsdd/fsdd.npz`` (8 kHz speech) and turns every recording into a fixed-size log-mel
spectrogram image (``data/audio.py``); its speakers are the domain's ``groups``.

Every domain is one entry of ``DOMAINS`` (how to read a split, how to download it): ``load_domain``,
``download`` and ``known_domains`` read nothing else.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from zipfile import BadZipFile

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from huscf.cache import cached_array
from huscf.data import archives, checksums
from huscf.data.idx import read_idx
from huscf.errors import HuscfError

CARVE_SEED = 0  # fixed, independent of any run seed: the carved test set never changes
CARVE_TRAIN_FRACTION = 0.8
DIGITS_SEED = 0
DIGITS_TEST_FRACTION = 0.2

_TEN = tuple(str(i) for i in range(10))
_IDX_CLASSES: dict[str, tuple[str, ...]] = {
    "mnist": _TEN,
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    "kmnist": ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    "notmnist": tuple("ABCDEFGHIJ"),
    "pneumoniamnist": ("normal", "pneumonia"),
}
# the npz file(s) of each npz domain, in order of preference: the first that exists is read
_NPZ: dict[str, tuple[str, ...]] = {"cifar10": ("cifar10/cifar10.npz", "cifar10/cifar10_subset.npz"),
                                    "fsdd": ("fsdd/fsdd.npz",)}


@dataclass(frozen=True, eq=False)
class Domain:
    """One split of one domain. ``images`` (N, C, H, W) uint8 and ``labels`` (N,) int64 are read-only.

    ``groups`` (N,) int64, when set, is a natural grouping of the samples (the speaker of a spoken
    digit), used by the ``by_group`` partition; ``kind`` is ``"image"`` or ``"spectrogram"``.
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]
    groups: np.ndarray | None = None
    group_names: tuple[str, ...] = ()
    kind: str = "image"

    def __len__(self) -> int:
        return len(self.labels)


def resolve_data_dir(explicit: str | Path | None = None) -> Path:
    """The data folder: ``explicit``, else ``$HUSCF_DATA``, else ``~/.cache/huscf/data``."""
    value = explicit if explicit not in (None, "") else os.environ.get("HUSCF_DATA") or None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "huscf" / "data"


# ---- IDX domains -------------------------------------------------------------------------------

def _idx_paths(root: Path, name: str, prefix: str) -> tuple[Path, Path]:
    d = root / name
    return d / f"{prefix}-images-idx3-ubyte.gz", d / f"{prefix}-labels-idx1-ubyte.gz"


def _require(name: str, paths: tuple[Path, ...]) -> None:
    for p in paths:
        if not p.is_file():
            raise HuscfError(f"data for '{name}' not found: {p} is missing "
                             f"(set --data-dir or HUSCF_DATA, or run 'huscf data download {name}')")


@functools.lru_cache(maxsize=16)
def _read_pair(images_path: Path, labels_path: Path, _stamp: tuple) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise HuscfError(f"IDX file {images_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise HuscfError(f"IDX file {labels_path}: expected uint8 labels (N,), got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise HuscfError(f"IDX file {labels_path}: {len(labels)} labels for {len(images)} images in {images_path}")
    return images, labels


def _read(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in (images_path, labels_path))
    return _read_pair(images_path, labels_path, stamp)


def carve_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified 80/20 (train, test) index split of a t10k-only domain; same result on every call."""
    return train_test_split(np.arange(len(labels)), train_size=CARVE_TRAIN_FRACTION,
                            stratify=labels, random_state=CARVE_SEED)


def _load_idx(name: str, split: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    train, t10k = _idx_paths(root, name, "train"), _idx_paths(root, name, "t10k")
    if all(p.is_file() for p in train):
        files = train if split == "train" else t10k
        _require(name, files)
        return _read(*files)
    if any(p.is_file() for p in train) or not any(p.is_file() for p in t10k):
        _require(name, train)  # names the first missing train file
    _require(name, t10k)
    images, labels = _read(*t10k)
    idx = carve_split(labels)[0 if split == "train" else 1]
    return images[idx], labels[idx]


# ---- offline domains (scikit-learn digits) -----------------------------------------------------

@functools.lru_cache(maxsize=1)
def _digits_28() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1797 8x8 digits (0..16) -> 0..255, bilinear 8x8->20x20, zero-padded 4 px to 28x28."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) * (255.0 / 16.0)).unsqueeze(1)
    x = F.pad(F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False), (4, 4, 4, 4))
    return x.round().clamp(0, 255).to(torch.uint8).numpy(), bunch.target.astype(np.int64)


@functools.lru_cache(maxsize=2)
def _digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _digits_28()
    train, test = train_test_split(np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION,
                                   stratify=labels, random_state=DIGITS_SEED)
    idx = train if split == "train" else test
    return images[idx], labels[idx]


_OFFLINE: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "digits": lambda x: x,
    "digits_inverted": lambda x: 255 - x,
    "digits_rotated": lambda x: np.ascontiguousarray(np.rot90(x, k=1, axes=(2, 3))),  # 90 deg counter-clockwise
}


# ---- npz domains (CIFAR-10 subset, spoken digits) ----------------------------------------------

def _npz(name: str, root: Path) -> dict[str, np.ndarray]:
    path = next((root / f for f in _NPZ[name] if (root / f).is_file()), root / _NPZ[name][-1])
    _require(name, (path,))
    stamp = (path.stat().st_mtime_ns, path.stat().st_size)
    return _read_npz(path, stamp)


@functools.lru_cache(maxsize=4)
def _read_npz(path: Path, _stamp: tuple) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, BadZipFile, zlib.error) as exc:
        raise HuscfError(f"data file {path}: not a readable npz, damaged or cut short ({exc})") from None


def _field(name: str, z: dict, key: str) -> np.ndarray:
    if key not in z:
        raise HuscfError(f"data file for '{name}' ({' or '.join(_NPZ[name])}): key '{key}' missing "
                         f"(has {', '.join(sorted(z))})")
    return z[key]


def _load_cifar10(split: str, root: Path) -> Domain:
    z = _npz("cifar10", root)
    part = "train" if split == "train" else "test"
    x, y = _field("cifar10", z, f"x_{part}"), _field("cifar10", z, f"y_{part}")
    if x.ndim != 4 or x.shape[1:] != (32, 32, 3) or x.dtype != np.uint8:
        raise HuscfError(f"data for 'cifar10': expected x_{part} uint8 (N, 32, 32, 3), got {x.dtype} {x.shape}")
    names = tuple(str(c) for c in z.get("class_names", [str(i) for i in range(10)]))
    return _frozen("cifar10", np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y, names)


@functools.lru_cache(maxsize=4)
def _load_fsdd(split: str, root: Path) -> Domain:
    from huscf.data.audio import SPEC, settings_id, waves_to_images

    z = _npz("fsdd", root)
    part = "train" if split == "train" else "test"
    waves, lengths = _field("fsdd", z, f"x_{part}"), _field("fsdd", z, f"len_{part}")
    rate = int(_field("fsdd", z, "sample_rate"))
    if rate != SPEC.sample_rate:
        raise HuscfError(f"data for 'fsdd': sample rate {rate} Hz, the spectrogram settings expect {SPEC.sample_rate}")
    # the spectrograms take ~20 s to compute: cached on disk under a hash of the audio and the settings
    key = hashlib.sha256(f"{settings_id()}|".encode() + np.ascontiguousarray(waves).tobytes()
                         + np.ascontiguousarray(lengths).tobytes()).hexdigest()[:24]
    images = cached_array("spectrograms", f"fsdd-{part}-{key}",
                          lambda: waves_to_images([w[:n] for w, n in zip(waves, lengths)]))
    speakers = tuple(str(s) for s in _field("fsdd", z, "speaker_names"))
    d = _frozen("fsdd", images, _field("fsdd", z, f"y_{part}"), _TEN)
    groups = np.asarray(_field("fsdd", z, f"speaker_{part}"), dtype=np.int64)
    groups.flags.writeable = False
    return Domain(d.name, d.images, d.labels, d.num_classes, d.class_names, groups, speakers, "spectrogram")


def _unknown(name: str) -> HuscfError:
    return HuscfError(f"unknown domain {name!r}; known domains: {', '.join(known_domains())}")


@functools.lru_cache(maxsize=32)
def _load_offline(name: str, split: str) -> Domain:
    images, labels = _digits_split(split)
    return _frozen(name, _OFFLINE[name](images), labels, _TEN)


def _frozen(name: str, images: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...]) -> Domain:
    images = np.asarray(images, dtype=np.uint8)
    if images.ndim == 3:
        images = images[:, None]  # (N, H, W) -> (N, 1, H, W), a view
    labels = np.asarray(labels, dtype=np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return Domain(name, images, labels, len(class_names), class_names)


def _idx_domain(name: str) -> Callable[[str, Path], Domain]:
    def read(split: str, root: Path) -> Domain:
        images, labels = _load_idx(name, split, root)
        class_names = _IDX_CLASSES[name]
        if labels.size and labels.max() >= len(class_names):
            raise HuscfError(f"data for '{name}': label {labels.max()} out of range 0..{len(class_names) - 1}")
        return _frozen(name, images, labels, class_names)
    return read


@dataclass(frozen=True)
class DomainSource:
    """One domain, as ``load_domain`` and ``download`` use it: an entry of ``DOMAINS``, which a new
    dataset copies. ``read`` returns one split from the data folder; ``fetch`` downloads and
    verifies its files into the domain's folder (None: it cannot be downloaded, ``no_download`` says
    why). Its class names, files and digests are in the tables ``read`` and ``fetch`` name
    (``_IDX_CLASSES``, ``_NPZ``; ``checksums.MIRRORS``/``SHA256``, ``archives.RELEASES``)."""

    read: Callable[[str, Path], Domain]
    fetch: Callable[[Path, bool], list[Path]] | None = None
    no_download: str = ""


def _idx_fetch(name: str) -> Callable[[Path, bool], list[Path]]:
    return lambda dest, quiet: _download_idx(name, dest, quiet)


def _release_fetch(name: str) -> Callable[[Path, bool], list[Path]]:
    return lambda dest, quiet: _download_release(name, dest, quiet)


def _bundled(name: str) -> Callable[[Path, bool], list[Path]]:
    """The fetch of a domain built from scikit-learn's bundled digits: nothing to download."""
    def fetch(dest: Path, quiet: bool) -> list[Path]:
        if not quiet:
            print(f"{name}: bundled with scikit-learn, nothing to download", file=sys.stderr)
        return []
    return fetch


DOMAINS: dict[str, DomainSource] = {
    "mnist": DomainSource(_idx_domain("mnist"), _idx_fetch("mnist")),
    "fashion_mnist": DomainSource(_idx_domain("fashion_mnist"), _idx_fetch("fashion_mnist")),
    "kmnist": DomainSource(_idx_domain("kmnist"), _idx_fetch("kmnist")),
    "notmnist": DomainSource(_idx_domain("notmnist"), None, (
        "notmnist has no official IDX download: get t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz "
        "from github.com/davidflanagan/notMNIST-to-MNIST and put them in <data_dir>/notmnist/")),
    "pneumoniamnist": DomainSource(_idx_domain("pneumoniamnist"), _release_fetch("pneumoniamnist")),
    "cifar10": DomainSource(_load_cifar10, _release_fetch("cifar10")),
    "fsdd": DomainSource(_load_fsdd, _release_fetch("fsdd")),
    **{name: DomainSource(lambda split, root, name=name: _load_offline(name, split), _bundled(name))
       for name in _OFFLINE},
}


def known_domains() -> tuple[str, ...]:
    return tuple(DOMAINS)


def load_domain(name: str, split: str = "train", data_dir: str | Path | None = None) -> Domain:
    """Load the ``"train"`` or ``"test"`` split of domain ``name`` (see ``known_domains()``)."""
    if split not in ("train", "test"):
        raise HuscfError(f"split must be 'train' or 'test', got {split!r}")
    if name not in DOMAINS:
        raise _unknown(name)
    return DOMAINS[name].read(split, resolve_data_dir(data_dir))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, C, H, W) in 0..255 -> float32 tensor in [-1, 1], same shape."""
    return torch.from_numpy(np.asarray(images, dtype=np.float32)) / 127.5 - 1.0


# ---- download ----------------------------------------------------------------------------------

def _fetch(url: str, dest_dir: Path, algorithm: str = "sha256") -> tuple[Path, str]:
    """Stream ``url`` into a temp file in ``dest_dir``; return (temp path, hex digest by ``algorithm``)."""
    digest = hashlib.new(algorithm)
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".download-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp), digest.hexdigest()


def _fetch_first(name: str, what: str, urls: tuple[str, ...], dest: Path, algorithm: str, quiet: bool
                 ) -> tuple[Path, str, str]:
    """The first of ``urls`` that downloads: (temp path, digest, url). Every failure named if none does."""
    errors = []
    for url in urls:
        if not quiet:
            print(f"downloading {url}", file=sys.stderr)
        try:
            tmp, got = _fetch(url, dest, algorithm)
        except (urllib.error.URLError, OSError) as exc:
            errors.append(f"{url}: {getattr(exc, 'reason', exc)}")
            continue
        return tmp, got, url
    raise HuscfError(f"could not download {name}/{what}: {'; '.join(errors)}")


def download(name: str, data_dir: str | Path | None = None, quiet: bool = False) -> list[Path]:
    """Download and verify the official files of ``name`` into ``<data_dir>/<name>/``: the IDX files
    (SHA-256), or a release archive converted to the layout huscf reads (``archives``)."""
    if name not in DOMAINS:
        raise _unknown(name)
    source = DOMAINS[name]
    if source.fetch is None:
        raise HuscfError(source.no_download)
    return source.fetch(resolve_data_dir(data_dir) / name, quiet)


def _download_idx(name: str, dest: Path, quiet: bool) -> list[Path]:
    """The four IDX files from ``checksums.MIRRORS[name]``, each checked against its SHA-256."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for fname in checksums.IDX_FILES:
        expected, target = checksums.SHA256[name][fname], dest / fname
        if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == expected:
            written.append(target)
            continue
        urls = tuple(base + fname for base in checksums.MIRRORS[name])
        tmp, got, url = _fetch_first(name, fname, urls, dest, "sha256", quiet)
        if got != expected:
            tmp.unlink(missing_ok=True)
            raise HuscfError(f"download of {name}/{fname} from {url} failed verification: "
                             f"sha256 {got}, expected {expected}")
        os.replace(tmp, target)
        written.append(target)
    return written


def _download_release(name: str, dest: Path, quiet: bool) -> list[Path]:
    """Fetch a release archive, check it (``archives.Release.algorithm``), convert it, drop it."""
    release = archives.RELEASES[name]
    dest.mkdir(parents=True, exist_ok=True)
    algorithm = "sha256" if release.algorithm == "content" else release.algorithm
    tmp, got, url = _fetch_first(name, release.archive, release.urls, dest, algorithm, quiet)
    try:
        if release.algorithm != "content" and got != release.digest:
            raise HuscfError(f"download of {name}/{release.archive} from {url} failed verification: "
                             f"{release.algorithm} {got}, expected {release.digest}")
        if not quiet:
            print(f"{name}: verified, converting to {dest}", file=sys.stderr)
        try:
            return release.convert(tmp, dest)
        except (OSError, KeyError, ValueError, tarfile.TarError, BadZipFile) as exc:
            raise HuscfError(f"{name}: the download from {url} could not be read ({exc})") from None
    finally:
        tmp.unlink(missing_ok=True)
