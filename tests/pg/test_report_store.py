"""The report's and the dashboard's store queries on PostgreSQL, against the SQLite store.

The same seeded week goes into both backends; the history queries and the whole report must
agree. The dashboard then reads a PostgreSQL farm (a lease's holder, the queue).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pytest_hilfarm.farm import Farm
from pytest_hilfarm.services.dashboard.state import snapshot
from pytest_hilfarm.services.report import from_store, to_json
from pytest_hilfarm.store import FarmStore
from pytest_hilfarm.store.postgresql import PgFarmStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services"))
from nightly import generate_week  # noqa: E402

pytest.importorskip("psycopg")


def _fields(rows: list[Any], drop: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        data = dataclasses.asdict(row)
        for key in drop:
            data.pop(key)
        out.append(data)
    return out


def test_both_backends_answer_the_history_queries_alike(pg_url: str, tmp_path: Path) -> None:
    now = time.time()
    sqlite = FarmStore(tmp_path / "farm.db")
    pg = PgFarmStore(pg_url)
    week = generate_week(sqlite, seed=5, now=now)
    assert generate_week(pg, seed=5, now=now) == week
    since = week.since
    assert _fields(pg.results_since(since)) == _fields(sqlite.results_since(since))
    assert len(pg.results_since(since)) == week.results
    assert _fields(pg.results_since(since, since + 2 * 86400)) == \
        _fields(sqlite.results_since(since, since + 2 * 86400))
    leases = pg.lease_outcomes_since(since)
    assert _fields(leases) == _fields(sqlite.lease_outcomes_since(since))
    assert {lease.outcome for lease in leases} == {"ok", "failed", "infra_error"}
    assert all(lease.test_id for lease in leases)
    # Health events carry each server's own clock: compare what happened, not when.
    assert _fields(pg.health_events_since(since), ("at",)) == \
        _fields(sqlite.health_events_since(since), ("at",))
    assert pg.results_since(now + 10) == [] and pg.lease_outcomes_since(now + 10) == []
    one, other = (to_json(from_store(s, since=since, until=now + 60)) for s in (sqlite, pg))
    assert one == other and one["flaky"] == [week.flaky] and one["sick_boards"] == [
        week.bad_board]


def test_the_dashboard_reads_a_postgresql_farm(pg_url: str, tmp_path: Path) -> None:
    rack = tmp_path / "rack.yaml"
    rack.write_text(f"version: 1\nname: pgfarm\nstate_dir: {tmp_path / 'state'}\n"
                    f"backend: {pg_url}\nboards:\n"
                    "  - {id: esp32-1, chip: esp32, port: virtual, reset: virtual, "
                    "power: virtual}\n"
                    "  - {id: esp32-2, chip: esp32, port: virtual, reset: virtual, "
                    "power: virtual}\n")
    with Farm.open(rack, start_virtual=False) as farm:
        assert type(farm.store).__name__ == "PgFarmStore"
        farm.store.quarantine("esp32-2", "USB hub port 3 dead")
        with farm.reserve(1, only=["esp32-1"], test_id="t.py::test_pg", timeout=10):
            snap = snapshot(farm)
            rows = {r.board: r for r in snap.boards}
            assert rows["esp32-1"].holder is not None
            assert rows["esp32-1"].holder.test_id == "t.py::test_pg"
            assert rows["esp32-2"].health == "QUARANTINED"
            (quarantined,) = snap.quarantined
            assert quarantined.board == "esp32-2" and "USB hub port 3 dead" in quarantined.reason
            assert snap.backend == "PgFarmStore"
            assert [s[2] for s in snap.timelines["esp32-2"]] == ["UNKNOWN", "QUARANTINED"]
        assert snapshot(farm).boards[0].holder is None
