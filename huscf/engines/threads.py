"""Sharing the machine's cores: a run's torch threads (``train.threads``, in training and in its
evaluation), and independent runs in parallel processes (``plan_jobs``, ``run_parallel``:
``huscf compare --jobs``, the benchmarks).

torch's default takes every core, and OpenMP's threads spin while they wait. Beside one busy
core that costs a 2-core run 3.96x per round, and two runs at once 4.54x (issue 31;
``benchmarks/bench_contention.py``, docs/performance.md). One thread avoids it (1.13x, 1.12x) but
is 1.39x slower on an idle machine; OpenMP's passive waiting (1.76x, 1.65x) is 1.70x slower alone,
and a short spin (``GOMP_SPINCOUNT=10000``) made the busy case worse (6.75x). So the default,
``auto``, follows the load instead: at every epoch start it measures how many cores *other*
processes kept busy since the last look (the system's busy time from ``/proc/stat`` minus this
process's CPU time, over the wall time) and runs on the cores left, at least one, within the CPU
affinity mask and a cgroup CPU quota. Two such runs each see the other's core busy and settle at
one thread each. Measured on 2 cores (docs/performance.md): 1.50x beside a busy core, two runs
done in 1.37x one run's wall time, and alone 1.02x torch's default (0.98-1.07 over 4 interleaved
pairs).

The price is bit-for-bit reproducibility *across loads*: the thread count changes the summation
order of some kernels (MKL's matmuls, oneDNN's convolutions), and Adam amplifies it: one round of
the default run with 1 and with 2 threads gave losses 1.2e-4 and weights 2.9e-3 apart. On an idle
machine ``auto`` stays at every core and reruns agree bit for bit; where the load changed the
count, they agree to that rounding only. Every round's metrics record the counts it ran with
(``threads``, one per epoch), and a fixed count restores bit-for-bit reruns:

* ``train.threads: N`` - N threads, always;
* ``OMP_NUM_THREADS=N`` in the environment - the same, for ``auto`` (as torch itself reads it);
* ``train.threads: null`` - torch's default (every core), fixed.

Where ``/proc/stat`` cannot be read (not Linux), ``auto`` keeps torch's default thread count.

Independent runs (methods of a comparison, seeds of a grid) use idle cores better side by side
than one after another with every core each: ``plan_jobs`` sizes the processes to the cores
(2 cores: two processes of one thread each) and ``run_parallel`` pins each process's threads, so
a run's result equals a one-at-a-time run with the same thread count bit for bit.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import suppress
from pathlib import Path

import torch

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"
_PROC_STAT = Path("/proc/stat")


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with suppress(OSError, ValueError):  # no cgroup v2 quota file, or not one we can read
        quota, period = _CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
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


def omp_num_threads() -> int | None:
    """``OMP_NUM_THREADS`` when it holds a positive count (a pinned thread count), else None."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


class ThreadPolicy:
    """``train.threads``: a fixed count, torch's default (None), or ``"auto"`` (follow the load,
    unless ``OMP_NUM_THREADS`` pins a count)."""

    def __init__(self, threads: int | str | None):
        self.mode = threads
        self.cores = usable_cores()
        self.pinned = omp_num_threads() if threads == "auto" else None
        if isinstance(threads, int) or self.pinned:
            torch.set_num_threads(threads if isinstance(threads, int) else self.pinned)
        self._last = self._sample()

    @property
    def follows_load(self) -> bool:
        return self.mode == "auto" and not self.pinned and self._last[0] is not None

    def _sample(self) -> tuple[float | None, float, float]:
        return _system_busy_seconds(), _own_cpu_seconds(), _wall_seconds()

    def others_busy(self) -> float | None:
        """Cores other processes kept busy since the last call (None: not measurable here)."""
        (busy0, own0, t0), self._last = self._last, self._sample()
        busy1, own1, t1 = self._last
        if busy0 is None or busy1 is None or t1 - t0 < 0.05:
            return None
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))

    def adjust(self) -> int:
        """With ``auto``: set torch's threads to the cores the others leave (at least one); returns
        the count in force."""
        if self.follows_load and (others := self.others_busy()) is not None:
            threads = max(1, min(self.cores, round(self.cores - others)))
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        return torch.get_num_threads()

    def describe(self) -> str:
        """For the run's first line: the policy and the count in force."""
        n = torch.get_num_threads()
        if self.follows_load:
            return (f"threads auto ({n} now, 1-{self.cores} as the load leaves cores; "
                    "train.threads=N for bit-for-bit reruns)")
        if self.pinned:
            return f"threads {n} (auto pinned by OMP_NUM_THREADS={self.pinned})"
        if self.mode == "auto":
            return f"threads {n} (auto: no /proc/stat here, torch's default)"
        return f"threads {n} ({'train.threads' if self.mode else 'torch default'}, fixed)"


def plan_jobs(jobs: int | str, tasks: int) -> tuple[int, int]:
    """(processes, torch threads each) for ``tasks`` independent runs: ``auto`` runs as many at once
    as there are usable cores (at most one per task), each on its share of them, so that processes
    x threads <= cores; a count is taken as given (threads: the cores // count, at least one).
    ``OMP_NUM_THREADS``, where set, is the caller's budget of cores instead."""
    cores = omp_num_threads() or usable_cores()
    if jobs == "auto":
        n = min(max(1, tasks), cores)
    elif str(jobs).isdigit() and int(jobs) >= 1:
        n = int(jobs)
    else:
        raise ValueError(f"takes a positive count or 'auto', got {jobs!r}")
    return n, max(1, cores // n)


def _pinned_call(fn, threads: int, item):
    os.environ["OMP_NUM_THREADS"] = str(threads)  # pins train.threads: auto in this process
    torch.set_num_threads(threads)
    return fn(item)


def run_parallel(fn, items: list, jobs: int, threads: int):
    """``fn(item)`` for every item in ``jobs`` fresh processes, each pinned to ``threads`` torch
    threads; yields (the item's index, result) as each finishes. An exception in one call is raised
    here when its result is reached, after the calls already running have finished; the ones not
    started are cancelled. ``fn`` must be importable (a module-level function), items picklable."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn, not fork: a forked child would inherit torch's thread pool and locks mid-state
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_pinned_call, fn, threads, item): k for k, item in enumerate(items)}
        try:
            for fut in as_completed(futures):
                yield futures[fut], fut.result()
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
