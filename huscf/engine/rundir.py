"""The run directory: resolved config, metrics.jsonl, checkpoints, samples, and resuming.

Layout::

    RUN_DIR/config.yaml            the fully resolved config of the run
    RUN_DIR/clients.json           per client: domain, size, excluded classes, cuts, device, latency
    RUN_DIR/metrics.jsonl          one JSON line per finished round
    RUN_DIR/samples/round_NNNN_cluster_K.png
    RUN_DIR/checkpoints/round_NNNN.pt   every round; the newest ``keep_full`` with optimiser states,
                                        older ones slimmed to the (deduplicated) model weights

Every file is written to a temporary name and renamed, so a killed run never leaves a
half-written checkpoint. A round appends its metrics line, then writes its checkpoint; resuming
keeps the metrics of the rounds the newest checkpoint contains and recomputes the rest.

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

import hashlib
import json
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from huscf.errors import HuscfError

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


def _snapshot(obj):
    """A CPU copy of every tensor of a nested state (dicts and lists), in one copy per device and
    dtype: the tensors are flattened into one buffer, moved in one transfer, and handed back as
    views of it. Thousands of small per-client tensors would otherwise cost a transfer and a
    synchronisation each. ``torch.save`` writes each buffer once, so the file holds each tensor's
    own elements and nothing more (a loaded checkpoint's tensors are views of those buffers)."""
    tensors: list[torch.Tensor] = []

    def collect(o):
        if isinstance(o, torch.Tensor):
            tensors.append(o.detach())
            return _Slot(len(tensors) - 1)
        if isinstance(o, dict):
            return {k: collect(v) for k, v in o.items()}
        if isinstance(o, list):
            return [collect(v) for v in o]
        return o

    skeleton = collect(obj)
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    copies: list[torch.Tensor | None] = [None] * len(tensors)
    for idx in groups.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx]).to("cpu")  # a new tensor: never the original
        offset = 0
        for i in idx:
            n = tensors[i].numel()
            copies[i] = flat[offset:offset + n].view(tensors[i].shape)
            offset += n
    return _fill(skeleton, copies)


class _Slot(int):
    """Where tensor number ``int(self)`` goes back into a snapshot's structure."""


def _fill(o, values: list):
    if isinstance(o, _Slot):
        return values[o]
    if isinstance(o, dict):
        return {k: _fill(v, values) for k, v in o.items()}
    if isinstance(o, list):
        return [_fill(v, values) for v in o]
    return o


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self.checkpoints = self.path / "checkpoints"
        self.samples = self.path / "samples"
        self.metrics = self.path / "metrics.jsonl"
        self.config = self.path / "config.yaml"

    def check_new(self) -> None:
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise HuscfError(f"output directory {self.path} is not empty: pick another --out or use --resume {self.path}")

    def create(self) -> None:
        self.check_new()
        for p in (self.path, self.checkpoints, self.samples):
            p.mkdir(parents=True, exist_ok=True)

    def write_json(self, name: str, obj) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(obj, indent=1))
        tmp.replace(self.path / name)

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
                raise HuscfError(f"could not write a checkpoint in {self.checkpoints}: {e}") from e

    def _write_checkpoint(self, round_no: int, state: dict, keep_full: int) -> None:
        path = self.checkpoints / f"round_{round_no:04d}.pt"
        self._atomic_save(state, path)
        older = self.list_checkpoints()[:-keep_full] if keep_full else []
        if older:  # only the one that just left the window can still be full
            saved = torch.load(older[-1][1], map_location="cpu", weights_only=False)
            if not saved.get("slim"):
                tensors, index = _dedupe(saved["engine"]["model"])
                self._atomic_save({"round": saved["round"], "slim": True, "tensors": tensors, "index": index},
                                  older[-1][1])

    def load_model_state(self, round_no: int) -> dict[str, torch.Tensor]:
        """The split model's weights after round ``round_no`` (from a full or a slim checkpoint)."""
        path = self.checkpoints / f"round_{round_no:04d}.pt"
        if not path.exists():
            raise HuscfError(f"run {self.path} has no checkpoint for round {round_no}")
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if saved.get("slim"):
            return {key: saved["tensors"][i] for key, i in saved["index"].items()}
        return saved["engine"]["model"]

    @staticmethod
    def _atomic_save(state: dict, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        found = [(int(m.group(1)), p) for p in self.checkpoints.glob("round_*.pt") if (m := _CKPT.search(p.name))]
        return sorted(found)

    def latest_checkpoint(self) -> tuple[int, dict] | None:
        """The newest full checkpoint that loads (a damaged newest one is skipped)."""
        for round_no, path in reversed(self.list_checkpoints()):
            try:
                state = torch.load(path, map_location="cpu", weights_only=False)
            except Exception:  # noqa: BLE001 - a truncated file from a kill: fall back to the previous one
                continue
            if not state.get("slim"):
                return round_no, state
        return None

    def append_metrics(self, row: dict) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        rows = []
        for line in self.metrics.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a kill: everything after it is dropped
        return rows

    def truncate_metrics(self, last_round: int) -> None:
        """Keep only the metrics of rounds <= last_round (the ones the checkpoint contains)."""
        rows = [r for r in self.read_metrics() if r["round"] <= last_round]
        tmp = self.path / ".metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(self.metrics)
