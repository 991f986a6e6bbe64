"""Shared pytest fixtures."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Keep what the tests cache (trained classifiers, spectrograms) out of the user's home: in
    pytest's own cache folder unless HUSCF_CACHE says where."""
    if not os.environ.get("HUSCF_CACHE"):
        cache = getattr(config, "cache", None)
        if cache is not None:
            path = cache.mkdir("huscf")
        else:  # pytest's cache is off (-p no:cacheprovider): a folder for this session only
            path = Path(tempfile.mkdtemp(prefix="huscf-test-cache-"))
            config.add_cleanup(lambda: shutil.rmtree(path, ignore_errors=True))
        os.environ["HUSCF_CACHE"] = str(path)


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
