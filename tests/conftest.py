"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


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
