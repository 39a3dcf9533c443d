"""Shared fixtures: the real MyoPS 2020 cases and prior embeddings beside the repository."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def myops2020_dir() -> Path:
    path = SHARED / "data" / "myops2020"
    if not path.is_dir():
        pytest.skip(f"real MyoPS 2020 cases not available at {path}")
    return path


@pytest.fixture(scope="session")
def priors_dir() -> Path:
    path = SHARED / "priors"
    if not path.is_dir():
        pytest.skip(f"prior fixtures not available at {path}")
    return path
