"""Replays what a careless or hostile user does to huscf and counts how it ends.

Run:  python benchmarks/reliability.py [--data-dir ../shared/data] [--kills 4] [--out DIR] [--quick]

Probes, each a real ``huscf`` process:

* **bad configs**: unknown keys, wrong types (``true`` for a number), infinities, NaNs, impossible
  values, unknown methods, unreadable or non-UTF-8 config and profile files;
* **bad data files**: truncated, garbage or wrongly shaped IDX and ``.npz`` files in a data folder
  (needs the MNIST files of ``--data-dir`` to copy and damage);
* **damaged checkpoints**: a crafted pickle that would run a shell command, flipped bytes, both full
  checkpoints truncated; then ``--resume`` and ``evaluate``;
* **full disk**: a file-size limit that a checkpoint exceeds;
* **NaN injection**: a learning rate that makes the losses explode;
* **kills**: ``kill -9`` at seeded random moments of a run (after a random number of finished
  rounds, 0-3 of 4, then a random part of a round's duration, so that they land mid-run), then
  ``--resume``, compared with the uninterrupted run (every round's losses);
* **Ray driver killed**: ``kill -9`` of a ``--engine ray`` driver after its first round: every
  process its private Ray started must end (runtime/reaper.py), and ``--resume`` must finish the run.

``--quick`` (what the test suite runs, about 2 minutes): a few probes of each kind but the Ray one.

For every probe it checks that the process ended with exit code 2 and one line on stderr (or,
where the input is legitimate, with exit 0), that no code ran, and that no finished round was lost
(every round written before the probe is still in metrics.jsonl or in set_aside/). It prints how
many of each it tried and how many ended well; the exit code is 1 when any did not.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = ["data.clients_per_domain=1", "model.width=0.125", "train.local_epochs=1", "train.max_iters_per_epoch=2",
        "output.samples_every=0", "federation.warmup_rounds=1"]


def huscf(*args: str, env: dict | None = None, timeout: int = 600, preexec: str | None = None):
    """One ``huscf`` process; returns (exit code, stderr)."""
    if preexec is None:
        cmd = [sys.executable, "-m", "huscf.cli", *args]
    else:  # run a snippet first in the same process (a file-size limit)
        code = preexec + f"\nfrom huscf.cli import main\nimport sys\nsys.exit(main({list(args)!r}))\n"
        cmd = [sys.executable, "-c", code]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    return out.returncode, out.stderr


def one_line(rc: int, err: str) -> bool:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return rc == 2 and len(lines) == 1 and lines[0].startswith("huscf: error: ")


def sets(*items: str) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def rounds_of(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line)["round"])
        except (ValueError, KeyError, TypeError):
            break
    return out


def kept(run: Path, before: list[int]) -> bool:
    """Every round in ``before`` is still in metrics.jsonl or was set aside."""
    now = set(rounds_of(run))
    for aside in (run / "set_aside").glob("*/metrics.jsonl") if (run / "set_aside").is_dir() else []:
        now |= {json.loads(line)["round"] for line in aside.read_text().splitlines()}
    return set(before) <= now


class Tally:
    def __init__(self):
        self.rows: dict[str, list[bool]] = {}
        self.failed: list[str] = []
        self.notes: list[str] = []

    def add(self, category: str, ok: bool, what: str, detail: str = "") -> None:
        self.rows.setdefault(category, []).append(ok)
        if not ok:
            self.failed.append(f"{category}: {what}: {detail.strip()[-300:]}")


def bad_configs(tmp: Path, t: Tally, quick: bool = False) -> None:
    out = ["--out", str(tmp / "never")]
    cases = [sets("trian.rounds=1"), sets("train.roudns=1"), sets("train.lr=-1"), sets("train.lr=.inf"),
             sets("train.rounds=true"), sets("seed=false"), sets("federation.clusters=zero"), sets("model.width=0"),
             sets("model.width=.nan"), sets("method=fedgann"), sets("cuts.method=fixed"),
             sets("cuts.method=fixed", "cuts.fixed=[9,9,9,9]"), sets("devices.profiles=/nonexistent.yaml"),
             sets("data.domains=[nope]"), sets("data.clients_per_domain=0"), sets("runtime.clients_per_actor=0"),
             sets("train.batch_size=1"), sets("devices.alpha=1", "devices.client_time_weight=1"), ["--set", "rounds"],
             sets("method=pflgan", "federation.secure_aggregation=true")]
    files = {"latin1.yaml": "name: caf\xe9\n".encode("latin-1"), "broken.yaml": b"train: [\n",
             "list.yaml": b"- 1\n- 2\n", "typo.yaml": b"train:\n  epochs: 3\n"}
    for name, data in files.items():
        (tmp / name).write_bytes(data)
        cases.append([str(tmp / name)])
    cases.append([str(tmp / "missing.yaml")])
    (tmp / "profiles.yaml").write_bytes(b"server: \xff\xfe\n")
    cases.append(sets(f"devices.profiles={tmp / 'profiles.yaml'}"))
    (tmp / "a_file").write_text("x")
    cases.append(["--out", str(tmp / "a_file" / "run")])
    if quick:  # one of each shape: a typo, a bool for a number, a NaN, a non-UTF-8 file, --out under a file
        cases = [cases[0], cases[4], cases[8], [str(tmp / "latin1.yaml")], cases[-1]]
    for case in cases:
        rc, err = huscf("train", *case, *([] if "--out" in case else out))
        t.add("bad configs", one_line(rc, err), " ".join(case), err)
    for width in ("nan",) if quick else ("nan", "-1", "0"):
        rc, err = huscf("cuts", "--clients", "4", f"--width={width}")
        t.add("bad configs", one_line(rc, err), f"cuts --width {width}", err)


def bad_data(tmp: Path, data_dir: Path | None, t: Tally, quick: bool = False) -> None:
    if data_dir is None or not (data_dir / "mnist").is_dir():
        print("bad data files: skipped (no --data-dir with mnist/)", file=sys.stderr)
        return
    src = sorted((data_dir / "mnist").glob("train-images*"))[0]
    damages = {
        "truncated": lambda b: b[: len(b) // 3],
        "garbage": lambda b: os.urandom(4096),
        "empty": lambda b: b"",
        "wrong magic": lambda b: gzip.compress(b"\x00\x00\x08\x01" + gzip.decompress(b)[4:4000]),
    }
    if quick:
        damages = {"truncated": damages["truncated"]}
    for what, damage in damages.items():
        root = tmp / f"data_{what.replace(' ', '_')}"
        shutil.copytree(data_dir / "mnist", root / "mnist")
        (root / "mnist" / src.name).write_bytes(damage(src.read_bytes()))
        rc, err = huscf("train", "--data-dir", str(root), "--out", str(tmp / "never"),
                        *sets("data.domains=[mnist]", "data.limit_per_domain=200", *TINY))
        t.add("bad data files", one_line(rc, err), f"mnist {what}", err)
    for name in ("fsdd",) if quick else ("cifar10", "fsdd"):
        root = tmp / f"data_{name}"
        (root / name).mkdir(parents=True)
        (root / name / f"{name}.npz").write_bytes(b"PK\x03\x04" + os.urandom(2000))
        rc, err = huscf("train", "--data-dir", str(root), "--out", str(tmp / "never"),
                        *sets(f"data.domains=[{name}]", *TINY))
        t.add("bad data files", one_line(rc, err), f"{name}.npz garbage", err)


def tiny_run(tmp: Path, name: str, rounds: int = 3, *extra: str) -> Path:
    run = tmp / name
    rc, err = huscf("train", "--quiet", "--out", str(run), *sets(*TINY, f"train.rounds={rounds}", *extra))
    if rc != 0:
        raise SystemExit(f"reliability: the tiny run failed: {err.strip()[-500:]}")
    return run


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def damaged_checkpoints(tmp: Path, t: Tally, quick: bool = False) -> None:
    # a crafted pickle newer than every real checkpoint: refused, never run; the run resumes
    run = tiny_run(tmp, "crafted")
    before = rounds_of(run)
    marker = tmp / "pwned"
    with open(run / "checkpoints" / "round_0004.pt", "wb") as f:
        pickle.dump({"round": 4, "engine": _Payload(str(marker))}, f)
    rc, err = huscf("evaluate", str(run), "--rounds", "4", "--quiet")
    t.add("damaged checkpoints", one_line(rc, err) and not marker.exists(), "evaluate a crafted checkpoint", err)
    if quick:
        return
    rc, err = huscf("train", "--resume", str(run), "--quiet")
    t.add("damaged checkpoints", rc == 0 and not marker.exists() and kept(run, before),
          "resume past a crafted checkpoint", err)
    # flipped bytes in the newest: resumes from the one before, the damaged round kept aside
    run = tiny_run(tmp, "flipped")
    before = rounds_of(run)
    newest = sorted((run / "checkpoints").glob("*.pt"))[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    newest.write_bytes(bytes(data))
    rc, err = huscf("evaluate", str(run), "--rounds", "last", "--quiet")
    t.add("damaged checkpoints", one_line(rc, err), "evaluate flipped bytes", err)
    rc, err = huscf("train", "--resume", str(run), "--quiet")
    t.add("damaged checkpoints", rc == 0 and kept(run, before) and rounds_of(run) == before,
          "resume past flipped bytes", err)
    # both full checkpoints truncated: one line, nothing changed
    run = tiny_run(tmp, "truncated")
    before = rounds_of(run)
    fulls = sorted((run / "checkpoints").glob("*.pt"))[-2:]
    for p in fulls:
        p.write_bytes(p.read_bytes()[:1000])
    snapshot = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    rc, err = huscf("train", "--resume", str(run), "--quiet")
    same = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == snapshot
    t.add("damaged checkpoints", one_line(rc, err) and same and rounds_of(run) == before,
          "resume with both full checkpoints truncated", err)


def full_disk(tmp: Path, t: Tally) -> None:
    run = tmp / "full_disk"
    limit = ("import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
             "resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))")
    rc, err = huscf("train", "--quiet", "--out", str(run), *sets(*TINY, "train.rounds=2"), preexec=limit)
    before = rounds_of(run)
    leftovers = [p for p in run.rglob("*") if p.name.endswith((".tmp", ".tmp.png"))]
    t.add("full disk", one_line(rc, err) and not leftovers, "checkpoint over a file-size limit", err)
    rc, err = huscf("train", "--resume", str(run), "--quiet")
    t.add("full disk", rc == 0 and kept(run, before) and rounds_of(run) == [1, 2], "resume after space is freed", err)


def nan_injection(tmp: Path, t: Tally, quick: bool = False) -> None:
    for lr in ("1e30",) if quick else ("1e6", "1e30"):
        run = tmp / f"nan_{lr}"
        rc, err = huscf("train", "--quiet", "--out", str(run), *sets(*TINY, "train.rounds=4", f"train.lr={lr}"))
        rounds = rounds_of(run)
        ckpt_ok = all((run / "checkpoints" / f"round_{r:04d}.pt").exists() for r in rounds[:-1])
        t.add("NaN injection", (rc == 0 or one_line(rc, err)) and ckpt_ok and "round 0" not in err,
              f"train.lr={lr}", err)


def kills(tmp: Path, n: int, seed: int, t: Tally) -> None:
    ref = tmp / "uninterrupted"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "huscf.cli", "train", "--quiet", "--out", str(ref),
                             *sets(*TINY, "train.rounds=4")], stderr=subprocess.DEVNULL)
    seen = {}  # when each round's row appeared: how long a round takes
    while proc.poll() is None:
        seen.setdefault(len(rounds_of(ref)), time.perf_counter() - t0)
        time.sleep(0.05)
    if proc.returncode != 0 or rounds_of(ref) != [1, 2, 3, 4]:
        raise SystemExit("reliability: the uninterrupted run failed")
    per_round = (seen.get(4, 0.0) - seen.get(1, 0.0)) / 3
    want = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    rng = random.Random(seed)
    for k in range(n):
        run = tmp / f"killed_{k}"
        proc = subprocess.Popen([sys.executable, "-m", "huscf.cli", "train", "--quiet", "--out", str(run),
                                 *sets(*TINY, "train.rounds=4")], stderr=subprocess.DEVNULL)
        target, delay = rng.randint(0, 3), rng.uniform(0.0, 1.0) * per_round
        while proc.poll() is None and len(rounds_of(run)) < target:  # mid-run: after `target` rounds,
            time.sleep(0.02)
        time.sleep(delay)  # then somewhere inside the next one
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = rounds_of(run)
        t.notes.append(f"kill {k}: after {len(before)} finished round(s)")
        if not (run / "config.yaml").is_file():  # killed before the run directory existed: nothing to lose
            t.add("kills + resume", True, f"kill {k} before the run started")
            continue
        rc, err = huscf("train", "--resume", str(run), "--quiet")
        got = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] if rc == 0 else []
        same = [(r["round"], r["loss_d_per_client"], r["loss_g_per_client"]) for r in got] == [
            (r["round"], r["loss_d_per_client"], r["loss_g_per_client"]) for r in want]
        t.add("kills + resume", rc == 0 and same and kept(run, before),
              f"kill {k} after rounds {before}", err)


def ray_driver_killed(tmp: Path, t: Tally) -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        print("Ray driver killed: skipped (Ray is not installed)", file=sys.stderr)
        return
    from huscf.runtime.reaper import descendants, still_running

    run = tmp / "ray_killed"
    ray_tmp = tempfile.mkdtemp(prefix="hr", dir="/tmp")  # Ray's socket paths must stay short
    proc = subprocess.Popen([sys.executable, "-m", "huscf.cli", "train", "--quiet", "--engine", "ray",
                             "--out", str(run), *sets(*TINY, "train.rounds=3")], stderr=subprocess.DEVNULL,
                            env={**os.environ, "HUSCF_RAY_TMPDIR": ray_tmp})
    deadline = time.time() + 300
    while time.time() < deadline and not rounds_of(run) and proc.poll() is None:
        time.sleep(0.5)
    # every process below the driver: its Ray (and the reaper, which leaves by itself)
    below = {p for p in descendants([proc.pid]) if p[0] != proc.pid}
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = rounds_of(run)
    deadline = time.time() + 30
    while time.time() < deadline and (left := still_running(below)):
        time.sleep(0.5)
    t.add("Ray driver killed", bool(below) and not left, f"kill -9 after rounds {before}",
          f"{len(left)} of its {len(below)} processes still running")
    rc, err = huscf("train", "--resume", str(run), "--quiet", env={"HUSCF_RAY_TMPDIR": ray_tmp})
    t.add("Ray driver killed", rc == 0 and kept(run, before) and rounds_of(run) == [1, 2, 3], "then --resume", err)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("HUSCF_DATA"))
    ap.add_argument("--kills", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="keep the probes' run directories here (default: a temporary folder)")
    ap.add_argument("--quick", action="store_true", help="a few probes of each kind, no Ray (the test suite's)")
    args = ap.parse_args()
    q = args.quick
    t = Tally()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.out) if args.out else Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        data_dir = Path(args.data_dir) if args.data_dir else None
        probes = [lambda p, tt: bad_configs(p, tt, q), lambda p, tt: bad_data(p, data_dir, tt, q),
                  lambda p, tt: damaged_checkpoints(p, tt, q), full_disk, lambda p, tt: nan_injection(p, tt, q),
                  lambda p, tt: kills(p, 1 if q else args.kills, args.seed, tt)]
        for probe in probes + ([] if q else [ray_driver_killed]):
            probe(tmp, t)
    print(f"reliability probes ({time.perf_counter() - start:.0f} s): ended well = exit 2 with one line (or exit 0 "
          f"for legitimate input), no code run, no finished round lost")
    print(f"{'probe':<22} {'tried':>5} {'ended well':>10}")
    for category, oks in t.rows.items():
        print(f"{category:<22} {len(oks):>5} {sum(oks):>10}")
    for line in t.notes:
        print(line)
    for line in t.failed:
        print(f"NOT WELL  {line}")
    return 1 if t.failed else 0


if __name__ == "__main__":
    sys.exit(main())
