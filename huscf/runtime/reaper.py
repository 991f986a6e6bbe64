"""The processes of a private Ray end with the driver that started it, even a killed driver.

Ray's head processes exit when their driver's session ends, but a driver killed with SIGKILL
leaves Ray's dashboard agent and runtime-env agent running (one listening on a loopback port),
and they survive a ``--resume``. So when huscf starts a private Ray (``cluster.connect`` without
an address) it first marks the environment that Ray's processes inherit with
``HUSCF_RAY_OWNER=<random id>`` and starts this module as a watcher in a session of its own. The
watcher follows the driver's marked children (GCS, raylet) and every process below them (agents,
workers) while the driver runs; once the driver has ended, however it ended, it gives them a few
seconds to exit by themselves and then ends the rest (SIGTERM, then SIGKILL). A Ray that huscf
joins (``runtime.address``) is never marked or touched.

Linux only (it reads ``/proc``); elsewhere no watcher is started.
Run by hand: ``python -m huscf.runtime.reaper DRIVER_PID OWNER_ID``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import suppress

MARK = "HUSCF_RAY_OWNER"
_WATCHERS: list[subprocess.Popen] = []  # kept referenced: they outlive the driver by design


def process_table() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, start time)} of every live process (zombies excluded)."""
    out = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            out[int(entry)] = (int(fields[1]), fields[19])
    return out


def descendants(roots: list[int], table: dict[int, tuple[int, str]] | None = None) -> set[tuple[int, str]]:
    """(pid, start time) of ``roots`` and every process below them (``table``: a ``process_table``)."""
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = set(), [p for p in roots if p in table]
    while stack:
        pid = stack.pop()
        out.add((pid, table[pid][1]))
        stack.extend(children.get(pid, []))
    return out


def still_running(procs: set[tuple[int, str]]) -> list[int]:
    """The pids of ``procs`` (pid, start time) that are still the same live processes."""
    table = process_table()
    return [pid for pid, start in procs if pid in table and table[pid][1] == start]


def _carries(pid: int, owner: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{MARK}={owner}".encode() in f.read().split(b"\0")
    except OSError:
        return False


class Tracker:
    """The processes of one owned Ray: the driver's children that carry the mark (GCS, raylet) and
    everything below them (agents, workers), remembered by (pid, start time). Ray's Python agents
    retitle themselves over their environment, so the mark alone does not find them: the tree does.

    A child without the mark is read again at every scan: between its fork and its exec a child
    still shows the driver's environment as it started (the mark is set later, with ``putenv``,
    which ``/proc/PID/environ`` does not show), so one read in that window would lose the raylet
    and every agent below it (a killed-driver test left two agents alive once in five CI runs)."""

    def __init__(self, driver: int, owner: str):
        self.driver, self.owner = driver, owner
        self.seen: set[tuple[int, str]] = set()
        self._marked: set[tuple[int, str]] = set()

    def scan(self) -> set[tuple[int, str]]:
        table = process_table()
        children = [(pid, start) for pid, (ppid, start) in table.items() if ppid == self.driver]
        self._marked |= {proc for proc in children if proc not in self._marked and _carries(proc[0], self.owner)}
        self.seen |= descendants([proc[0] for proc in children if proc in self._marked], table)
        return self.seen

    def alive(self) -> list[int]:
        return still_running(self.seen)


def end_all(tracker: Tracker, grace_s: float = 5.0) -> list[int]:
    """Wait up to ``grace_s`` for the tracked processes to exit by themselves, then SIGTERM and,
    2 s later, SIGKILL the ones left. Returns the pids it had to signal."""
    deadline = time.monotonic() + grace_s
    while (left := tracker.alive()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 0.0)):
        for pid in tracker.alive():
            with suppress(OSError):  # it may have exited meanwhile
                os.kill(pid, sig)
        end = time.monotonic() + wait
        while tracker.alive() and time.monotonic() < end:
            time.sleep(0.1)
    return left


def unmark() -> None:
    """After the owned Ray has shut down: processes this driver starts later are not Ray's."""
    os.environ.pop(MARK, None)


def watch(driver: int, owner: str, poll_s: float = 0.5) -> None:
    """Track the driver's Ray processes until the driver ends, then end the ones still running."""
    tracker = Tracker(driver, owner)
    start = process_table().get(driver, (0, None))[1]
    while start is not None and process_table().get(driver, (0, None))[1] == start:
        tracker.scan()
        time.sleep(poll_s)
    end_all(tracker)


def start_watcher() -> str | None:
    """Mark this process's environment for the Ray it is about to start and start the watcher;
    returns the owner id (None where /proc is missing: nothing marked, nothing started)."""
    if not os.path.isdir("/proc") or not sys.platform.startswith("linux"):
        return None
    owner = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != MARK}  # the watcher itself is not marked
    _WATCHERS.append(subprocess.Popen([sys.executable, "-m", "huscf.runtime.reaper", str(os.getpid()), owner], env=env,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, close_fds=True))
    os.environ[MARK] = owner
    return owner


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
