"""IDX files (the MNIST container format): read and write, gzip'd or plain.

Layout: two zero bytes, a dtype code, the number of dimensions, one big-endian uint32 per dimension,
then the values in C order, big-endian. Images are 0x0803 (uint8, 3-d), labels 0x0801 (uint8, 1-d).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from huscf.errors import HuscfError

_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


def _decode(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise HuscfError(f"cannot read IDX file {path}: {exc.strerror or exc}") from None
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:  # the gzip header (stored name, mtime) is ignored; only the deflate stream matters
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise HuscfError(f"IDX file {path}: corrupt or truncated gzip data ({exc})") from None


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip'd or plain, detected from the content) into a native-endian array."""
    path = Path(path)
    raw = _decode(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise HuscfError(f"IDX file {path}: bad magic number 0x{raw[:4].hex() or 'empty'} (not an IDX file)")
    dtype, ndim = np.dtype(_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise HuscfError(f"IDX file {path}: truncated header ({len(raw)} bytes, need {header} for {ndim} dims)")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise HuscfError(f"IDX file {path}: {what}: shape {shape} needs {expected} bytes, file holds {len(raw)}")
    data = np.frombuffer(raw, dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))  # copy: writable, native byte order


def write_idx(path: str | Path, array: np.ndarray, gz: bool = True) -> Path:
    """Write ``array`` as an IDX file (gzip'd when ``gz``); returns the path."""
    array = np.asarray(array)
    code = _CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    payload = header + array.astype(_DTYPES[code]).tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(payload, mtime=0) if gz else payload)
    return path
