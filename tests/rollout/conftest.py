"""Fixtures for the rollout tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "rollouts.sqlite")
