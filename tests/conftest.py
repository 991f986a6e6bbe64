"""Shared pytest fixtures."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Before torch loads: every test process (and the subprocesses it starts) runs on a fixed share
# of the cores. Parallel workers (pytest-xdist, pyproject's addopts) then never oversubscribe them
# (issue 31), and train.threads: auto, pinned by OMP_NUM_THREADS, keeps every run in a test
# bit-reproducible whatever else the machine does (huscf/engines/threads.py).
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
if "PYTEST_XDIST_WORKER" in os.environ:  # a worker: its share, whatever the controller inherited or set
    os.environ["OMP_NUM_THREADS"] = str(max(1, _CORES // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
else:  # serial (-n 0), or the controller, which runs no test
    os.environ.setdefault("OMP_NUM_THREADS", str(_CORES))


def pytest_configure(config):
    """Keep what the tests cache (trained classifiers, spectrograms) and the key that signs their
    checkpoints out of the user's home: in pytest's own cache folder unless HUSCF_CACHE says where."""
    if not os.environ.get("HUSCF_CACHE"):
        cache = getattr(config, "cache", None)
        if cache is not None:
            path = cache.mkdir("huscf")
        else:  # pytest's cache is off (-p no:cacheprovider): a folder for this session only
            path = Path(tempfile.mkdtemp(prefix="huscf-test-cache-"))
            config.add_cleanup(lambda: shutil.rmtree(path, ignore_errors=True))
        os.environ["HUSCF_CACHE"] = str(path)
    if not os.environ.get("HUSCF_SIGNING_KEY"):  # the tests sign their runs' checkpoints with a key of their own
        os.environ["HUSCF_SIGNING_KEY"] = str(Path(os.environ["HUSCF_CACHE"]) / "signing.key")


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real datasets: $HUSCF_DATA, else ../shared/data next to the repo. Skips (fails if
    HUSCF_REQUIRE_DATA=1) when the folder is missing."""
    path = Path(os.environ.get("HUSCF_DATA") or REPO_ROOT.parent / "shared" / "data")
    if not path.is_dir():
        message = f"real data folder not found: {path} (set HUSCF_DATA)"
        if os.environ.get("HUSCF_REQUIRE_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


def read_metrics(run_dir) -> list[dict]:
    """A run's metrics.jsonl read through the package's one reader, each round as the JSON object
    the file holds (so tests can name any key, the engine's events too)."""
    from huscf.rundir import RunDir

    return [r.to_json() for r in RunDir(Path(run_dir)).read_rounds()]
