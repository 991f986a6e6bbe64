"""Domains: where each one's images come from, its train/test split, and the official-file download.

IDX domains are read from ``<data_dir>/<name>/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``. A domain
with only the t10k files gets a fixed, stratified 80/20 split of them (8,000 / 2,000 for the 10k files).
The ``digits*`` domains are built from scikit-learn's bundled 8x8 digits and need no files.
``cifar10`` reads ``<data_dir>/cifar10/cifar10.npz`` (the full set, as ``huscf data download``
writes it), else ``cifar10_subset.npz`` (32x32 RGB); ``svhn`` ``svhn/svhn_{train,test}.npz`` (32x32
RGB), ``bloodmnist`` and ``dermamnist`` ``<name>/<name>.npz`` (28x28 RGB), as the download writes them. ``fsdd`` reads
``<data_dir>/fsdd/fsdd.npz`` (8 kHz speech) and turns every recording into a fixed-size log-mel
spectrogram image (``data/audio.py``); its speakers are the domain's ``groups``.

Every domain is one entry of ``DOMAINS``: how to read a split, and where its official files come
from with their digests (``IdxFiles``, ``Release``). ``load_domain``, ``download`` and
``known_domains`` read nothing else; a new dataset copies an entry.
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
from huscf.data import archives
from huscf.data.idx import read_idx
from huscf.errors import HuscfError

CARVE_SEED = 0  # fixed, independent of any run seed: the carved test set never changes
CARVE_TRAIN_FRACTION = 0.8
DIGITS_SEED = 0
DIGITS_TEST_FRACTION = 0.2

_TEN = tuple(str(i) for i in range(10))


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

class _Arrays(dict):
    """The arrays of an npz file by key; a missing key is a one-line error that names the file."""

    def __init__(self, path: Path, arrays: dict[str, np.ndarray]):
        super().__init__(arrays)
        self.path = path

    def __missing__(self, key: str) -> np.ndarray:
        raise HuscfError(f"data file {self.path}: key '{key}' missing (has {', '.join(sorted(self))})")


def _npz(name: str, files: tuple[str, ...], root: Path) -> _Arrays:
    """The first of a domain's npz ``files`` (under the data folder, in order of preference) that exists."""
    path = next((root / f for f in files if (root / f).is_file()), root / files[-1])
    _require(name, (path,))
    stamp = (path.stat().st_mtime_ns, path.stat().st_size)
    return _read_npz(path, stamp)


@functools.lru_cache(maxsize=4)
def _read_npz(path: Path, _stamp: tuple) -> _Arrays:
    try:
        with np.load(path, allow_pickle=False) as z:
            return _Arrays(path, {k: z[k] for k in z.files})
    except (OSError, ValueError, EOFError, BadZipFile, zlib.error) as exc:
        raise HuscfError(f"data file {path}: not a readable npz, damaged or cut short ({exc})") from None


def _load_rgb(split: str, root: Path, name: str, files: tuple[str, ...], size: int,
              class_names: tuple[str, ...]) -> Domain:
    """An RGB npz domain: ``x_<part>`` uint8 (N, size, size, 3) and ``y_<part>`` from the first of
    ``files`` that exists (``{part}`` in a file name: one file per split); the file's
    ``class_names`` where it has them."""
    part = "train" if split == "train" else "test"
    z = _npz(name, tuple(f.format(part=part) for f in files), root)
    x, y = z[f"x_{part}"], z[f"y_{part}"]
    if x.ndim != 4 or x.shape[1:] != (size, size, 3) or x.dtype != np.uint8:
        raise HuscfError(f"data for '{name}': expected x_{part} uint8 (N, {size}, {size}, 3), got {x.dtype} {x.shape}")
    names = tuple(str(c) for c in z.get("class_names", class_names))
    if len(y) and int(np.max(y)) >= len(names):
        raise HuscfError(f"data for '{name}': label {int(np.max(y))} out of range 0..{len(names) - 1}")
    return _frozen(name, np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y, names)


@functools.lru_cache(maxsize=4)
def _load_fsdd(split: str, root: Path, files: tuple[str, ...]) -> Domain:
    from huscf.data.audio import SPEC, settings_id, waves_to_images

    z = _npz("fsdd", files, root)
    part = "train" if split == "train" else "test"
    waves, lengths, rate = z[f"x_{part}"], z[f"len_{part}"], int(z["sample_rate"])
    if rate != SPEC.sample_rate:
        raise HuscfError(f"data for 'fsdd': sample rate {rate} Hz, the spectrogram settings expect {SPEC.sample_rate}")
    # the spectrograms take ~20 s to compute: cached on disk under a hash of the audio and the settings
    key = hashlib.sha256(f"{settings_id()}|".encode() + np.ascontiguousarray(waves).tobytes()
                         + np.ascontiguousarray(lengths).tobytes()).hexdigest()[:24]
    images = cached_array("spectrograms", f"fsdd-{part}-{key}",
                          lambda: waves_to_images([w[:n] for w, n in zip(waves, lengths)]))
    speakers = tuple(str(s) for s in z["speaker_names"])
    d = _frozen("fsdd", images, z[f"y_{part}"], _TEN)
    groups = np.asarray(z[f"speaker_{part}"], dtype=np.int64)
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


def _idx_domain(name: str, class_names: tuple[str, ...]) -> Callable[[str, Path], Domain]:
    """The ``read`` of an IDX domain: its ``train``/``t10k`` files, labelled ``class_names``."""
    def read(split: str, root: Path) -> Domain:
        images, labels = _load_idx(name, split, root)
        if labels.size and labels.max() >= len(class_names):
            raise HuscfError(f"data for '{name}': label {labels.max()} out of range 0..{len(class_names) - 1}")
        return _frozen(name, images, labels, class_names)
    return read


# ---- the entries -------------------------------------------------------------------------------

@dataclass(frozen=True)
class DomainSource:
    """One domain, as ``load_domain`` and ``download`` use it: an entry of ``DOMAINS``, which a new
    dataset copies. ``read(split, data_root)`` returns one split; ``fetch(name, domain_folder, quiet)``
    downloads and verifies its files into the domain's folder and returns their paths (``IdxFiles``,
    ``Release``: the URLs and digests; None: it cannot be downloaded, ``no_download`` says why)."""

    read: Callable[[str, Path], Domain]
    fetch: Callable[[str, Path, bool], list[Path]] | None = None
    no_download: str = ""


@dataclass(frozen=True)
class IdxFiles:
    """A ``fetch``: the official IDX files, each from the first of ``mirrors`` (base URLs, the file name
    appended) that answers, checked against its SHA-256 before it is renamed into place. A file already
    there with the right digest is not downloaded again."""

    mirrors: tuple[str, ...]
    sha256: dict[str, str]  # file name -> digest

    def __call__(self, name: str, dest: Path, quiet: bool) -> list[Path]:
        dest.mkdir(parents=True, exist_ok=True)
        for fname, expected in self.sha256.items():
            target = dest / fname
            if not target.is_file() or hashlib.sha256(target.read_bytes()).hexdigest() != expected:
                urls = tuple(base + fname for base in self.mirrors)
                os.replace(_fetch_first(name, fname, urls, dest, "sha256", expected, quiet)[0], target)
        return [dest / fname for fname in self.sha256]


@dataclass(frozen=True)
class Release:
    """A ``fetch``: an official release archive from the first of ``urls`` that answers, checked by its
    ``md5``, converted into the layout ``read`` expects (``archives``), then deleted. ``md5`` None: the
    archive's bytes are not stable, and ``convert`` checks the content it decodes instead."""

    urls: tuple[str, ...]  # tried in order
    archive: str  # the release's file name, as messages name it
    md5: str | None
    convert: Callable[[Path, Path], list[Path]]  # (archive, domain folder) -> files written

    def __call__(self, name: str, dest: Path, quiet: bool) -> list[Path]:
        dest.mkdir(parents=True, exist_ok=True)
        tmp, url = _fetch_first(name, self.archive, self.urls, dest, "md5", self.md5, quiet)
        try:
            if not quiet:
                print(f"{name}: verified, converting to {dest}", file=sys.stderr)
            return self.convert(tmp, dest)
        except (OSError, KeyError, ValueError, tarfile.TarError, BadZipFile) as exc:
            raise HuscfError(f"{name}: the download from {url} could not be read ({exc})") from None
        finally:
            tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class Releases:
    """A ``fetch`` of a set published as several files, each a ``Release`` (its own URLs, MD5 and
    conversion), fetched one after another."""

    parts: tuple[Release, ...]

    def __call__(self, name: str, dest: Path, quiet: bool) -> list[Path]:
        return [path for part in self.parts for path in part(name, dest, quiet)]


def _bundled(name: str, dest: Path, quiet: bool) -> list[Path]:
    """The ``fetch`` of a domain built from scikit-learn's bundled digits: nothing to download."""
    if not quiet:
        print(f"{name}: bundled with scikit-learn, nothing to download", file=sys.stderr)
    return []


DOMAINS: dict[str, DomainSource] = {
    # MNIST and Fashion-MNIST digests were computed from files byte-identical to the original releases (their
    # md5 match the published values); KMNIST's are those listed by TensorFlow Datasets
    # (tensorflow_datasets/url_checksums/kmnist.txt), and its two t10k digests match our own copies.
    "mnist": DomainSource(
        read=_idx_domain("mnist", _TEN),
        fetch=IdxFiles(
            mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
            sha256={"train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"})),
    "fashion_mnist": DomainSource(
        read=_idx_domain("fashion_mnist", ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")),
        fetch=IdxFiles(
            mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
            sha256={"train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                    "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                    "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                    "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"})),
    "kmnist": DomainSource(
        read=_idx_domain("kmnist", ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")),
        fetch=IdxFiles(
            mirrors=("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
            sha256={"train-images-idx3-ubyte.gz": "51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4",
                    "train-labels-idx1-ubyte.gz": "e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17",
                    "t10k-images-idx3-ubyte.gz": "edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5",
                    "t10k-labels-idx1-ubyte.gz": "20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c"})),
    "notmnist": DomainSource(
        read=_idx_domain("notmnist", tuple("ABCDEFGHIJ")),
        no_download="notmnist has no official IDX download: get t10k-images-idx3-ubyte.gz and "
                    "t10k-labels-idx1-ubyte.gz from github.com/davidflanagan/notMNIST-to-MNIST and put them in "
                    "<data_dir>/notmnist/"),
    # the release archives: where each digest comes from, and how each becomes these files, is in archives
    "pneumoniamnist": DomainSource(
        read=_idx_domain("pneumoniamnist", ("normal", "pneumonia")),
        fetch=Release(
            urls=("https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1",
                  "https://zenodo.org/record/6496656/files/pneumoniamnist.npz?download=1"),
            archive="pneumoniamnist.npz", md5="28209eda62fecd6e6a2d98b1501bb15f",
            convert=archives.convert_pneumoniamnist)),
    "cifar10": DomainSource(  # the full set as the download writes it, else the shared folder's 10k/2k subset
        read=functools.partial(_load_rgb, name="cifar10", files=("cifar10/cifar10.npz", "cifar10/cifar10_subset.npz"),
                               size=32, class_names=_TEN),
        fetch=Release(
            urls=("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",),
            archive="cifar-10-binary.tar.gz", md5="c32a1d4ab5d03f1284b67883e8d87530",
            convert=archives.convert_cifar10)),
    "svhn": DomainSource(
        read=functools.partial(_load_rgb, name="svhn", files=("svhn/svhn_{part}.npz",), size=32, class_names=_TEN),
        fetch=Releases(tuple(
            Release(urls=(f"http://ufldl.stanford.edu/housenumbers/{split}_32x32.mat",),
                    archive=f"{split}_32x32.mat", md5=md5,
                    convert=functools.partial(archives.convert_svhn, split=split))
            for split, md5 in (("train", "e26dedcc434d2e4c54c9b2d4a06d8373"),
                               ("test", "eb5a983be6a315427106f1b164d9cef3"))))),
    **{name: DomainSource(
        read=functools.partial(_load_rgb, name=name, files=(f"{name}/{name}.npz",), size=28, class_names=classes),
        fetch=Release(
            urls=(f"https://zenodo.org/records/10519652/files/{name}.npz?download=1",
                  f"https://zenodo.org/record/6496656/files/{name}.npz?download=1"),
            archive=f"{name}.npz", md5=md5, convert=functools.partial(archives.convert_medmnist_rgb, name=name)))
       for name, md5, classes in (
           ("bloodmnist", "7053d0359d879ad8a5505303e11de1dc",
            ("basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte", "monocyte",
             "neutrophil", "platelet")),
           ("dermamnist", "0744692d530f8e62ec473284d019b0c7",
            ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
             "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
             "vascular lesions")))},
    "fsdd": DomainSource(
        read=functools.partial(_load_fsdd, files=("fsdd/fsdd.npz",)),
        fetch=Release(
            urls=(f"https://codeload.github.com/Jakobovski/free-spoken-digit-dataset/zip/{archives.FSDD_COMMIT}",
                  f"https://github.com/Jakobovski/free-spoken-digit-dataset/archive/{archives.FSDD_COMMIT}.zip"),
            archive="free-spoken-digit-dataset.zip", md5=None,  # GitHub's zips vary: the content is checked
            convert=functools.partial(archives.convert_fsdd,
                                      sha256="98813b66519406457d065fdda8c381330d64e8ef9910929e83ed54628deffc35"))),
    **{name: DomainSource(read=lambda split, root, name=name: _load_offline(name, split), fetch=_bundled)
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

def download(name: str, data_dir: str | Path | None = None, quiet: bool = False) -> list[Path]:
    """Download and verify the official files of ``name`` into ``<data_dir>/<name>/``, as its entry's
    ``fetch`` says: the IDX files (SHA-256), or a release archive converted to the layout huscf reads."""
    if name not in DOMAINS:
        raise _unknown(name)
    source = DOMAINS[name]
    if source.fetch is None:
        raise HuscfError(source.no_download)
    return source.fetch(name, resolve_data_dir(data_dir) / name, quiet)


def _fetch(url: str, dest_dir: Path, algorithm: str) -> tuple[Path, str]:
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


def _fetch_first(name: str, what: str, urls: tuple[str, ...], dest: Path, algorithm: str, expected: str | None,
                 quiet: bool) -> tuple[Path, str]:
    """The first of ``urls`` that downloads, as (temp path, url), its digest by ``algorithm`` checked against
    ``expected`` (None: not checked; a mismatch deletes it). Every failure named if none downloads."""
    errors = []
    for url in urls:
        if not quiet:
            print(f"downloading {url}", file=sys.stderr)
        try:
            tmp, got = _fetch(url, dest, algorithm)
        except (urllib.error.URLError, OSError) as exc:
            errors.append(f"{url}: {getattr(exc, 'reason', exc)}")
            continue
        if expected is not None and got != expected:
            tmp.unlink(missing_ok=True)
            raise HuscfError(f"download of {name}/{what} from {url} failed verification: "
                             f"{algorithm} {got}, expected {expected}")
        return tmp, url
    raise HuscfError(f"could not download {name}/{what}: {'; '.join(errors)}")
