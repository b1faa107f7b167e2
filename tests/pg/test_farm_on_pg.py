"""The farm runs unchanged on the PostgreSQL backend (open_backend), virtual rack too."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_hilfarm.description.rack import builtin_virtual_rack_path, load_rack
from pytest_hilfarm.farm import Farm
from pytest_hilfarm.farm.backends import open_backend
from pytest_hilfarm.sim import manager
from pytest_hilfarm.store import BoardHealth

pytest.importorskip("psycopg")


def test_farm_session_on_postgresql(pg_url: str, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    sim_dir = tmp_path / "sim"
    monkeypatch.setenv("HILFARM_SIM_DIR", str(sim_dir))
    rack = load_rack(builtin_virtual_rack_path())
    store, reserver = open_backend(pg_url, rack)
    farm = Farm(rack, store=store, reserver=reserver,  # type: ignore[arg-type]
                log_root=tmp_path / "logs")
    try:
        with farm.session(1, chip="esp32c3") as session:
            (device,) = session.devices
            assert device.id == "esp32c3-1"
            # A never-seen board was health-checked before use, on the shared store.
            assert store.health("esp32c3-1").health is BoardHealth.GOOD
        record = store.history(board="esp32c3-1")[0]
        assert record.outcome == "ok" and record.released_at is not None
        assert {row["board"] for row in farm.status()} >= {"esp32-1", "esp32c3-1"}
    finally:
        farm.close()
        manager.down(sim_dir)
