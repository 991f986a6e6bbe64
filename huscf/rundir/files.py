"""The run directory's files: resolved config, metrics.jsonl, checkpoints, samples, and resuming.

Layout::

    RUN_DIR/config.yaml            the fully resolved config of the run
    RUN_DIR/clients.json           per client: domain, size, excluded classes, cuts, device, latency
    RUN_DIR/metrics.jsonl          one JSON line per finished round
    RUN_DIR/samples/round_NNNN_cluster_K.png
    RUN_DIR/checkpoints/round_NNNN.pt   every round; the newest ``keep_full`` with optimiser states,
                                        older ones slimmed to the (deduplicated) model weights
    RUN_DIR/checkpoints/round_NNNN.pt.json   its SHA-256, that digest signed (HMAC-SHA256), and
                                             whether it is slim
    RUN_DIR/set_aside/STAMP/       what a resume moved out of the way (damaged checkpoints, their rounds)

Checkpoints are data, not code: they are read with ``torch.load(weights_only=True)`` (tensors and
plain containers; a crafted pickle is refused, never run) after their bytes are checked against
their SHA-256 and the digest's signature verified with the user's signing key, kept outside the
run directory (``signing.py``; ``DamagedCheckpoint`` otherwise). A checkpoint without a signature
(a run from before signatures, a removed checksum file) loads only with ``allow_unsigned`` (the
command line's ``--allow-unsigned``), and is never signed on load. Every file is written to a
temporary name, synced and renamed, and a checkpoint's checksum file lists the old and the new
digest while a checkpoint is rewritten (slimmed), so a kill at any moment leaves files that
verify; a killed writer's temporary files are removed when the run resumes.

A round appends its metrics line, then writes its checkpoint. Resuming continues after the newest
full checkpoint that verifies and recomputes the rounds after it; newer checkpoints that do not
verify are moved to ``set_aside/`` with their rounds' metrics lines, never deleted or overwritten.
When no full checkpoint verifies but rounds were finished, resuming stops with one line and
changes nothing.

Checkpoints are written in the background: ``save_checkpoint`` takes a CPU copy of the state
(training goes on changing the live tensors) and a writer thread saves it while the next round
trains. At most one write is in flight; the next save, and ``flush``, wait for it and raise its
error if it failed.

The writer thread runs torch with one intra-op thread (``WRITER_THREADS``). Loading and saving
run a few parallel ATen copies, and a thread that runs one gets its own OpenMP team, which lives
as long as the thread does. With a second team alive beside the training thread's, every small
parallel op of training got slower: on 2 cores each round after the first slimmed checkpoint
(round 4 of the default run) trained 1.6-1.8x slower, same ops and counts, batch norm 5x
(issue 19; docs/performance.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from huscf.errors import HuscfError
from huscf.rundir.records import RoundRecord, read_rounds, write_rounds
from huscf.rundir.signing import SigningKey, default_key_path

_CKPT = re.compile(r"round_(\d{4,})\.pt$")

WRITER_THREADS: int | None = 1
"""Torch intra-op threads of the checkpoint writer thread (None: torch's default, as before
issue 19; ``benchmarks/bench_rounds.py``'s ``before`` run uses it to measure the difference)."""


def _writer_init() -> None:
    if WRITER_THREADS is not None:
        torch.set_num_threads(WRITER_THREADS)  # threads that already ran torch keep their own count


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], dict[str, int]]:
    """Store each distinct tensor once. After clustered averaging every member of a cluster holds
    identical copies of its blocks, so a round's weights shrink to about one copy per cluster."""
    tensors: list[torch.Tensor] = []
    seen: dict[tuple, int] = {}
    index = {}
    for key, t in state.items():
        sig = (t.dtype, tuple(t.shape), hashlib.blake2b(t.contiguous().numpy().tobytes(), digest_size=16).digest())
        if sig not in seen:
            seen[sig] = len(tensors)
            tensors.append(t.clone())  # its own storage: a loaded checkpoint's tensors share one buffer
        index[key] = seen[sig]
    return tensors, index


def _map_tensors(o, fn):
    """``o`` (nested dicts and lists) with every tensor ``t`` replaced by ``fn(t)``, in a fixed order."""
    if isinstance(o, torch.Tensor):
        return fn(o)
    if isinstance(o, dict):
        return {k: _map_tensors(v, fn) for k, v in o.items()}
    if isinstance(o, list):
        return [_map_tensors(v, fn) for v in o]
    return o


def _snapshot(obj):
    """A CPU copy of every tensor of a nested state (dicts and lists), in one copy per device and
    dtype: the tensors are flattened into one buffer, moved in one transfer, and handed back as
    views of it. Thousands of small per-client tensors would otherwise cost a transfer and a
    synchronisation each. ``torch.save`` writes each buffer once, so the file holds each tensor's
    own elements and nothing more (a loaded checkpoint's tensors are views of those buffers)."""
    tensors: list[torch.Tensor] = []
    _map_tensors(obj, lambda t: tensors.append(t.detach()))  # a first walk only collects them
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    copies: list[torch.Tensor | None] = [None] * len(tensors)
    for idx in groups.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx]).to("cpu")  # a new tensor: never the original
        for i, part in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            copies[i] = part.view(tensors[i].shape)
    ordered = iter(copies)  # the second walk meets the tensors in the order the first one collected them
    return _map_tensors(obj, lambda _: next(ordered))


def check_model_state(expected: dict[str, torch.Tensor], got, where: str) -> None:
    """One line (``HuscfError``) unless ``got`` holds exactly the tensors of ``expected`` (a model's
    ``state_dict``): the same keys, each a tensor of the same shape and kind (float or integer), every
    float finite. A checkpoint that verifies its checksum can still hold a model of other cuts or
    width, or NaNs (a diverged or tampered run); torch would load the first with a wall of text and
    the second silently."""
    if not isinstance(got, dict):
        raise HuscfError(f"{where}: holds no model state (not a mapping of tensors)")
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        first = f"'{missing[0]}' missing" if missing else f"'{extra[0]}' unexpected"
        raise HuscfError(f"{where}: does not fit the model of this run's config ({len(missing)} tensors missing, "
                         f"{len(extra)} unexpected; {first})")
    for key, want in expected.items():
        v = got[key]
        fits = isinstance(v, torch.Tensor) and v.shape == want.shape
        if not fits or v.is_floating_point() != want.is_floating_point():
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise HuscfError(f"{where}: does not fit the model of this run's config ('{key}' is {shape}, the "
                             f"model's is {tuple(want.shape)}, {'float' if want.is_floating_point() else 'integer'})")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise HuscfError(f"{where}: '{key}' holds values that are not finite (NaN or infinity)")


class DamagedCheckpoint(Exception):
    """A checkpoint that cannot be read as data, or whose bytes do not match its checksum."""


def _write_atomic(path: Path, data: bytes) -> None:
    """``data`` to ``path`` through a temporary name in the same folder (synced, then renamed); the
    temporary file is removed when the write fails (a kill leaves it: ``remove_stale_temporaries``)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


class RunDir:
    """One run directory. ``allow_unsigned``: load checkpoints that carry no signature (their
    SHA-256 is still checked when they have one)."""

    def __init__(self, path: Path, allow_unsigned: bool = False):
        self.path = Path(path)
        self.allow_unsigned = allow_unsigned
        self._key: SigningKey | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self.checkpoints = self.path / "checkpoints"
        self.samples = self.path / "samples"
        self.metrics = self.path / "metrics.jsonl"
        self.config = self.path / "config.yaml"

    def check_new(self) -> None:
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise HuscfError(f"output directory {self.path} is not empty: pick another --out or use --resume "
                             f"{self.path}")

    def check_no_links(self) -> None:
        """One line when anything inside an existing run directory is a symbolic link: a run
        directory received from someone else could point its config, metrics or checkpoints at any
        file on this machine, and resume, evaluate and audit would read (and resume write) through it."""
        for root, dirs, files in os.walk(self.path, followlinks=False):
            for name in (*dirs, *files):
                part = Path(root) / name
                if part.is_symlink():
                    raise HuscfError(f"{part} is a symbolic link; huscf does not follow links inside a run "
                                     f"directory (copy the file in, or remove the link)")

    def signing_key(self, create: bool = False) -> SigningKey | None:
        """The key that signs and verifies this run's checkpoints (``signing.py``); made when
        ``create`` and there is none. A trainer asks for it before anything is written, so a key
        that cannot be made or read is one line before training, not a failed checkpoint write."""
        if self._key is None:
            self._key = SigningKey.load(create=create, run_dir=self.path)
        return self._key

    def check_writable(self) -> None:
        """One line, before any data loads, when the run directory cannot be made or written (a
        read-only mount, a path under a regular file); leaves nothing behind."""
        made = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".huscf-write-probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise HuscfError(f"cannot write the run directory {self.path}: {err.strerror or err}") from None
        finally:
            if made:
                with contextlib.suppress(OSError):
                    self.path.rmdir()

    def create(self) -> None:
        self.check_new()
        try:
            for p in (self.path, self.checkpoints, self.samples):
                p.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise HuscfError(f"cannot create the run directory {self.path}: {err.strerror or err}") from None

    def write_json(self, name: str, obj) -> None:
        _write_atomic(self.path / name, json.dumps(obj, indent=1).encode())

    def save_checkpoint(self, round_no: int, state: dict, keep_full: int = 0) -> None:
        """Write round ``round_no``'s checkpoint. With ``keep_full > 0``, checkpoints older than the
        newest ``keep_full`` are slimmed to the model weights (optimiser states dropped): every
        round's weights stay available for evaluation, the disk holds few optimiser states.

        Returns once the state is copied; the file is written in the background (``flush``)."""
        self.flush()
        state = _snapshot(state)
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="huscf-checkpoint", initializer=_writer_init)
        self._pending = self._writer.submit(self._write_checkpoint, round_no, state, keep_full)

    def flush(self) -> None:
        """Wait for the checkpoint being written; a failed write is an error here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result()
            except OSError as e:
                raise HuscfError(f"could not write a checkpoint in {self.checkpoints} ({e.strerror or e}): the "
                                 f"rounds of the checkpoints already there are kept; free space, then resume") from None

    def _write_checkpoint(self, round_no: int, state: dict, keep_full: int) -> None:
        self._atomic_save(state, self.checkpoint_path(round_no), slim=False)
        older = self.list_checkpoints()[:-keep_full] if keep_full else []
        # every older one that is still full: usually only the one that just left the window, but a
        # run killed while slimming left its checkpoint full, and it is slimmed now
        for _, old in older:
            try:
                if self._is_slim(old):
                    continue
                saved = self._load_verified(old)
            except DamagedCheckpoint:  # left as it is: resume and evaluate say so when they need it
                continue
            tensors, index = _dedupe(saved["engine"]["model"])
            self._atomic_save({"round": saved["round"], "slim": True, "tensors": tensors, "index": index}, old,
                              slim=True)

    def checkpoint_path(self, round_no: int) -> Path:
        return self.checkpoints / f"round_{round_no:04d}.pt"

    @staticmethod
    def _sidecar(path: Path) -> Path:
        return path.with_name(path.name + ".json")

    def _read_sidecar(self, path: Path) -> dict | None:
        """``path``'s checksum file ({"sha256": [...], "slim": bool, "hmac_sha256": [...] or None,
        "key_id": str or None}, a signature per digest); None when it has none (a checkpoint from
        before checksums); ``DamagedCheckpoint`` when it is not one."""
        side = self._sidecar(path)
        if not side.exists():
            return None
        try:
            meta = json.loads(side.read_text())
            digests, signatures = [str(d) for d in meta["sha256"]], meta.get("hmac_sha256")
            if signatures is not None and (not isinstance(signatures, list) or len(signatures) != len(digests)):
                raise ValueError
            return {"sha256": digests, "slim": bool(meta["slim"]), "hmac_sha256": signatures,
                    "key_id": meta.get("key_id")}
        except (OSError, ValueError, KeyError, TypeError):
            raise DamagedCheckpoint(f"{side}: not a huscf checksum file") from None

    def _sidecar_bytes(self, digests: list[str], signatures: list[str], slim: bool) -> bytes:
        return json.dumps({"sha256": digests, "slim": slim, "hmac_sha256": signatures,
                           "key_id": self.signing_key(create=True).key_id}).encode()

    def _is_slim(self, path: Path) -> bool:
        """From the checksum file. A checkpoint written before checksums existed is loaded (as data,
        when unsigned checkpoints are allowed) to see; it gets no checksum file: huscf signs only
        what it wrote."""
        meta = self._read_sidecar(path)
        if meta is not None:
            return meta["slim"]
        return bool(self._load_verified(path).get("slim"))

    def load_model_state(self, round_no: int) -> dict[str, torch.Tensor]:
        """The split model's weights after round ``round_no`` (from a full or a slim checkpoint)."""
        path = self.checkpoint_path(round_no)
        if not path.exists():
            raise HuscfError(f"run {self.path} has no checkpoint for round {round_no}")
        try:
            saved = self._load_verified(path)
        except DamagedCheckpoint as err:
            raise HuscfError(str(err)) from None
        if saved.get("slim"):
            return {key: saved["tensors"][i] for key, i in saved["index"].items()}
        return saved["engine"]["model"]

    def _atomic_save(self, state: dict, path: Path, slim: bool) -> None:
        """Write ``state`` to ``path`` and its signed SHA-256 to ``path``.json so that a kill at any
        moment leaves a file that verifies (the old one or the new one): the checksum file first
        lists the new digest (beside the old one, when a signed file is replaced), then the data
        file is written, then the old digest is dropped. A new file never exists without its
        signed digest (a kill between the two used to leave a finished round that resume refused
        as unsigned). Only an unsigned file that huscf did not write is replaced data first: its
        checksum file must not claim a digest that the data still on disk does not have."""
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        signature = self.signing_key(create=True).sign(path.name, digest)
        side = self._sidecar(path)
        try:
            meta = self._read_sidecar(path) if path.exists() else None
        except DamagedCheckpoint:  # a broken checksum file is replaced below
            meta = None
        if meta and meta["hmac_sha256"]:  # only signed digests are carried over
            _write_atomic(side, self._sidecar_bytes([*meta["sha256"], digest], [*meta["hmac_sha256"], signature], slim))
        elif not path.exists():
            _write_atomic(side, self._sidecar_bytes([digest], [signature], slim))
        _write_atomic(path, data)
        _write_atomic(side, self._sidecar_bytes([digest], [signature], slim))

    def _load_verified(self, path: Path) -> dict:
        """A checkpoint as data: its bytes checked against its checksum file (when it has one: runs
        written before checksums have none), the digest's signature verified (``_check_signature``),
        and unpickled with ``weights_only=True``, which builds tensors and plain containers and
        never runs code. ``DamagedCheckpoint`` otherwise."""
        try:
            data = path.read_bytes()
        except OSError as err:
            raise DamagedCheckpoint(f"{path}: cannot be read ({err.strerror or err})") from None
        meta = self._read_sidecar(path)
        digest = hashlib.sha256(data).hexdigest()
        if meta is not None and digest not in meta["sha256"]:
            raise DamagedCheckpoint(f"{path}: its SHA-256 does not match {self._sidecar(path).name} (the file "
                                    f"was changed or damaged)")
        self._check_signature(path, digest, meta)
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - truncated, garbage or code: never executed, refused
            reason = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
            raise DamagedCheckpoint(f"{path}: not a checkpoint huscf can load as data ({reason})") from None
        if not isinstance(state, dict) or not isinstance(state.get("round"), int):
            raise DamagedCheckpoint(f"{path}: not a huscf checkpoint")
        return state

    def _check_signature(self, path: Path, digest: str, meta: dict | None) -> None:
        """``DamagedCheckpoint`` unless ``digest`` carries a signature this machine's key verifies,
        or it carries none and unsigned checkpoints are allowed."""
        if meta is None or not meta["hmac_sha256"]:
            if self.allow_unsigned:
                return
            raise DamagedCheckpoint(f"{path}: not signed (a run from before signed checkpoints, or its "
                                    f"{self._sidecar(path).name} was removed or replaced); pass --allow-unsigned "
                                    f"to load it anyway")
        key = self.signing_key()
        if key is None:
            raise DamagedCheckpoint(f"{path}: signed with key {meta['key_id']}, but there is no signing key at "
                                    f"{default_key_path()} (copy the key that signed it there, or set "
                                    f"HUSCF_SIGNING_KEY to it)")
        signature = meta["hmac_sha256"][meta["sha256"].index(digest)]
        if not key.verify(path.name, digest, signature):
            raise DamagedCheckpoint(f"{path}: its signature does not verify with the key {key.path} (id "
                                    f"{key.key_id}; the file names {meta['key_id']}): changed since huscf wrote it, "
                                    f"or signed with another key")

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        return sorted((int(m.group(1)), p) for p in self.checkpoints.glob("round_*.pt") if (m := _CKPT.search(p.name)))

    def latest_checkpoint(self) -> tuple[tuple[int, dict] | None, list[str]]:
        """(round, state) of the newest full checkpoint that verifies, or None; and why each newer
        one was skipped (damaged, or changed since it was written)."""
        skipped = []
        for round_no, path in reversed(self.list_checkpoints()):
            try:
                if self._is_slim(path):
                    continue
                return (round_no, self._load_verified(path)), skipped
            except DamagedCheckpoint as err:
                skipped.append(str(err))
        return None, skipped

    def set_aside(self, after_round: int, rows: list[RoundRecord]) -> Path:
        """Move the checkpoints of rounds after ``after_round`` (and their checksum files) and those
        rounds' metrics into ``set_aside/`` before a resume trains the rounds again: nothing that
        was written is deleted or overwritten."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        folder = self.path / "set_aside" / stamp
        k = 1
        while folder.exists():  # two resumes in one second: never write into an earlier folder
            k += 1
            folder = self.path / "set_aside" / f"{stamp}-{k}"
        folder.mkdir(parents=True)
        later_files = [p for r, path in self.list_checkpoints() if r > after_round for p in (path, self._sidecar(path))]
        for p in filter(Path.exists, later_files):
            os.replace(p, folder / p.name)
        later = [r for r in rows if r.round > after_round]
        if later:
            write_rounds(folder / "metrics.jsonl", later)
        return folder

    def remove_stale_temporaries(self) -> None:
        """Temporary files a killed writer left behind (never a finished file)."""
        for tmp in [*self.checkpoints.glob(".*.tmp"), *self.checkpoints.glob("*.tmp"), *self.path.glob(".*.tmp")]:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def append_round(self, row: RoundRecord) -> None:
        """Append one finished round to metrics.jsonl (flushed and synced before returning)."""
        with self.metrics.open("a") as f:
            f.write(json.dumps(row.to_json()) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_rounds(self) -> list[RoundRecord]:
        """The finished rounds in metrics.jsonl (``records.read_rounds``)."""
        return read_rounds(self.metrics)

    def truncate_rounds(self, last_round: int) -> None:
        """Keep only the rounds <= last_round in metrics.jsonl (the ones the checkpoint contains)."""
        write_rounds(self.metrics, [r for r in self.read_rounds() if r.round <= last_round])
