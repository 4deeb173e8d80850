"""Fixtures shared by the test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def reference_data_dir() -> Path:
    """Return the folder of reference data: $ONNXEPS_DATA, else ../shared/data."""
    configured = os.environ.get("ONNXEPS_DATA")
    if configured:
        return Path(configured)
    return REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = reference_data_dir()
    if not path.is_dir():
        pytest.fail(f"reference data folder {path} not found; set ONNXEPS_DATA")
    return path


@pytest.fixture(scope="session", autouse=True)
def session_result_cache(tmp_path_factory):
    """Point the result cache at a new folder for the whole session.

    Pytest sets up module and session fixtures before a test's own fixtures. Without
    this, the runs they start would use the user's cache, where a record from an
    earlier run can replace the failure that a test expects.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ONNXEPS_CACHE_DIR", str(tmp_path_factory.mktemp("session-cache")))
        yield


@pytest.fixture(autouse=True)
def isolated_result_cache(tmp_path_factory, monkeypatch):
    """Point the result cache at a new folder for each test, never at the user's cache.

    A folder per test also keeps a record cached by one test from hiding a failure
    that another test expects.
    """
    monkeypatch.setenv("ONNXEPS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
