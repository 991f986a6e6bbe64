"""How many torch threads a run uses when it shares the machine (``train.threads``).

torch's default takes every core, and OpenMP's threads spin while they wait. Beside one busy
core that costs a 2-core run 3.96x per round, and two runs at once 4.54x (issue 31;
``benchmarks/bench_contention.py``, docs/performance.md). One thread avoids it (1.13x, 1.12x) but
is 1.39x slower on an idle machine. ``train.threads: auto`` follows the load instead: at every
epoch start it measures how many cores *other* processes kept busy since the last look (the
system's busy time from ``/proc/stat`` minus this process's CPU time, over the wall time) and
runs on the cores left, at least one, within the CPU affinity mask and a cgroup CPU quota. Two
such runs each see the other's core busy and settle at one thread each. Measured on 2 cores:
1.39x beside a busy core, two runs done in 1.39x one run's wall time, and alone 1.02x torch's
default (0.98-1.07 over 4 interleaved pairs).

The price is bit-for-bit reproducibility: the thread count changes the summation order of some
kernels (MKL's matmuls, oneDNN's convolutions), and Adam amplifies it: one round of the default
run with 1 and with 2 threads gave losses 1.2e-4 and weights 2.9e-3 apart. A run whose thread
count followed the load is therefore not bit-identical to a rerun, nor a resumed run to an
uninterrupted one. That is why ``auto`` is not the default: torch's default stays (None), and a
fixed count keeps runs reproducible as before.

Where ``/proc/stat`` cannot be read (not Linux), ``auto`` keeps torch's default thread count.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"
_PROC_STAT = Path("/proc/stat")


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = _CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _own_cpu_seconds() -> float:
    return time.process_time()  # every thread of this process


def _wall_seconds() -> float:
    return time.perf_counter()


def _system_busy_seconds() -> float | None:
    """CPU seconds every process of the machine has spent busy since boot (None: no /proc/stat)."""
    try:
        fields = [int(v) for v in _PROC_STAT.read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / _HZ  # user nice system idle iowait irq softirq steal


class ThreadPolicy:
    """``train.threads``: a fixed count, torch's default (None), or ``"auto"`` (follow the load)."""

    def __init__(self, threads: int | str | None):
        self.mode = threads
        self.cores = usable_cores()
        if isinstance(threads, int):
            torch.set_num_threads(threads)
        self._last = self._sample()

    @property
    def follows_load(self) -> bool:
        return self.mode == "auto" and self._last[0] is not None

    def _sample(self) -> tuple[float | None, float, float]:
        return _system_busy_seconds(), _own_cpu_seconds(), _wall_seconds()

    def others_busy(self) -> float | None:
        """Cores other processes kept busy since the last call (None: not measurable here)."""
        now = self._sample()
        (busy0, own0, t0), (busy1, own1, t1) = self._last, now
        self._last = now
        if busy0 is None or busy1 is None or t1 - t0 < 0.05:
            return None
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))

    def adjust(self) -> int:
        """With ``auto``: set torch's threads to the cores the others leave (at least one); returns
        the count in force."""
        if self.follows_load:
            others = self.others_busy()
            if others is not None:
                threads = max(1, min(self.cores, round(self.cores - others)))
                if threads != torch.get_num_threads():
                    torch.set_num_threads(threads)
        return torch.get_num_threads()

    def describe(self) -> str:
        """For the run's compute line."""
        if self.follows_load:
            return (f"{torch.get_num_threads()} threads (auto: follows the load, at most {self.cores}; "
                    "not bit-reproducible)")
        if self.mode == "auto":
            return f"{torch.get_num_threads()} threads (auto: no /proc/stat here, torch's default)"
        return f"{torch.get_num_threads()} threads"
