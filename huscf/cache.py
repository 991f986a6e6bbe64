"""The on-disk cache: ``$HUSCF_CACHE``, else ``~/.cache/huscf``.

It holds what is derived from data and costly to recompute: the domain classifiers
(``classifiers/``) and the spoken digits' spectrograms (``spectrograms/``). Every entry is keyed by a
hash of its inputs, so a stale one is never read; any file there can be deleted.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np


def cache_dir(explicit: str | Path | None = None) -> Path:
    """``explicit``, else ``$HUSCF_CACHE``, else ``~/.cache/huscf``."""
    base = explicit if explicit not in (None, "") else os.environ.get("HUSCF_CACHE") or None
    return Path(base).expanduser() if base else Path.home() / ".cache" / "huscf"


def cached_array(kind: str, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """``compute()``, stored as ``<cache>/<kind>/<key>.npy`` and read back on later calls. An
    unreadable entry is recomputed, and a cache that cannot be written is skipped: it only saves time."""
    path = cache_dir() / kind / f"{key}.npy"
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        pass
    array = compute()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
    return array
