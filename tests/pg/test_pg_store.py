"""PgFarmStore: the SQLite store's behaviour on PostgreSQL (run side by side), plus migrations."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pytest_hilfarm.errors import InfrastructureError, UsageError
from pytest_hilfarm.farm.backends import is_database_url, open_backend
from pytest_hilfarm.store import BoardHealth, FarmStore, FarmStoreProtocol, LeaseRecord
from pytest_hilfarm.store.postgresql import PgFarmStore, redact
from pytest_hilfarm.store.postgresql_schema import SCHEMA_VERSION, migrate

psycopg = pytest.importorskip("psycopg")


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Both backends: every test here must pass on each (behavioural parity)."""
    if request.param == "sqlite":
        return FarmStore(tmp_path / "farm.sqlite")
    pg_url = request.getfixturevalue("pg_url")
    return PgFarmStore(pg_url)


def test_satisfies_the_protocol(pg_url: str) -> None:
    backend: FarmStoreProtocol = PgFarmStore(pg_url)
    assert backend is not None


def test_health_transitions_quarantine_and_restore(store: Any) -> None:
    assert store.health("b1").health is BoardHealth.UNKNOWN
    assert store.health("b1").changed_at is None
    assert store.record_check("b1", ok=True, detail="boot ok") is BoardHealth.GOOD
    assert store.record_check("b1", ok=False, detail="no banner") is BoardHealth.BAD
    assert store.record_check("b1", ok=False, detail="no banner") is BoardHealth.BAD
    assert store.record_check("b1", ok=False, detail="no banner") is BoardHealth.QUARANTINED
    assert store.health("b1").failures == 3
    assert store.record_check("b1", ok=True, detail="boot ok") is BoardHealth.QUARANTINED
    assert store.set_health("b1", BoardHealth.GOOD, "x") is BoardHealth.QUARANTINED
    assert store.restore("b1", person="alice") is BoardHealth.UNKNOWN
    assert store.health("b1").failures == 0 and "alice" in store.health("b1").reason
    assert store.record_check("b1", ok=True, detail="ok") is BoardHealth.GOOD
    store.quarantine("b1", "smells of smoke")
    events = store.health_history("b1")
    assert (events[0].old, events[0].new) == (BoardHealth.GOOD, BoardHealth.QUARANTINED)
    assert "smoke" in events[0].reason
    assert any("while quarantined" in e.reason for e in store.health_history("b1"))
    assert set(store.all_health(["b1", "zz"])) == {"b1", "zz"}


def test_flash_digests(store: Any) -> None:
    assert store.flashed_digest("b1", 0x10000) is None
    store.record_flash("b1", 0x10000, "AB" * 32, 1024)
    store.record_flash("b1", 0x10000, "ef" * 32, 2048)
    record = store.flashed_digest("b1", 0x10000)
    assert (record.digest, record.algorithm, record.size) == ("ef" * 32, "sha256", 2048)
    store.forget_flash("b1")
    assert store.flashed_digest("b1", 0x10000) is None


def test_reservation_history(store: Any) -> None:
    owner = {"pid": 1, "host": "h", "test_id": "t::a"}
    store.record_reservation("L1", ["b1", "b2"], owner, "2 x esp32", 10.0, 10.5, 0.5)
    store.record_reservation("L2", ["b2"], owner, "1 x esp32", 11.0, 12.0, 1.0)
    assert store.record_release("L1", 11.5, "infra_error", {"b1": "infra_error", "b2": "ok"})
    assert not store.record_release("L1", 99.0, "ok")
    everything = store.history()
    assert [r.lease_id for r in everything] == ["L2", "L1"]
    l1 = everything[1]
    assert l1.boards == ("b1", "b2") and l1.owner == owner
    assert (l1.granted_at, l1.released_at, l1.outcome, l1.wait_s) == (10.5, 11.5, "infra_error",
                                                                      0.5)
    assert l1.board_outcomes == {"b1": "infra_error", "b2": "ok"}
    assert [r.lease_id for r in store.history(board="b1")] == ["L1"]
    assert len(store.history(limit=1)) == 1


def test_a_whole_lease_is_recorded_once_and_closes_only_an_open_record(store: Any) -> None:
    owner = {"pid": 2, "host": "h", "test_id": "t::b"}
    lease = LeaseRecord("L3", ("b1", "b2"), owner, "2 x esp32", 20.0, 20.25, 0.25, 21.0,
                        "infra_error", {"b1": "infra_error"})
    assert store.record_lease(lease)
    assert not store.record_lease(lease)  # recorded already: the first record stands
    (record,) = store.history()
    assert (record.lease_id, record.boards, record.owner, record.request) == (
        "L3", ("b1", "b2"), owner, "2 x esp32")
    assert (record.requested_at, record.granted_at, record.wait_s, record.released_at,
            record.outcome) == (20.0, 20.25, 0.25, 21.0, "infra_error")
    assert record.board_outcomes == {"b1": "infra_error", "b2": "infra_error"}
    # A lease recorded at its grant (an older writer) is closed by the whole record.
    store.record_reservation("L4", ["b1"], owner, "1 x esp32", 30.0, 30.5, 0.5)
    assert store.record_lease(LeaseRecord("L4", ("b1",), owner, "1 x esp32", 30.0, 30.5, 0.5,
                                          31.0, "holder_died"))
    l4 = store.history(limit=1)[0]
    assert (l4.lease_id, l4.released_at, l4.outcome) == ("L4", 31.0, "holder_died")


def test_results_and_pass_rate(store: Any) -> None:
    now = time.time()
    for outcome, at in [("passed", now - 100), ("failed", now - 50), ("passed", now - 10),
                        ("skipped", now - 5), ("error", now - 1)]:
        store.record_result("b1", "t::x", outcome, 1.5, "ab" * 32, at=at)
    assert (store.pass_rate("b1").passed, store.pass_rate("b1").total) == (2, 4)
    recent = store.pass_rate("b1", since=now - 20)
    assert (recent.passed, recent.total, recent.rate) == (1, 2, 0.5)
    assert store.results("b1")[0].outcome == "error"


def test_holds(store: Any) -> None:
    hold = store.add_hold("b1", "alice", "scope on UART")
    assert store.holds() == {"b1": hold}
    assert store.add_hold("b1", "alice", "still probing").since == hold.since
    with pytest.raises(UsageError, match="already held by alice"):
        store.add_hold("b1", "bob", "mine")
    assert store.remove_hold("b1") is not None
    assert store.remove_hold("b1") is None


def test_migrations_are_idempotent_and_safe_concurrently(pg_url: str) -> None:
    errors: list[BaseException] = []

    def open_store() -> None:
        try:
            PgFarmStore(pg_url)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    store = PgFarmStore(pg_url)
    assert store.schema_version() == SCHEMA_VERSION
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert migrate(conn) == SCHEMA_VERSION
        conn.execute("UPDATE hilfarm_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(UsageError, match="newer than this"):
        PgFarmStore(pg_url)


def test_store_survives_a_server_restart(pg_server: Any, pg_url: str) -> None:
    store = PgFarmStore(pg_url)
    store.set_health("b1", BoardHealth.GOOD, "seed")
    pg_server.restart()
    # The dropped connection is replaced transparently for the next operation.
    assert store.health("b1").health is BoardHealth.GOOD


def test_unreachable_database_is_explained() -> None:
    with pytest.raises(InfrastructureError, match="cannot connect") as info:
        PgFarmStore("postgresql://nobody:secret@127.0.0.1:1/none")
    assert "secret" not in str(info.value) and "psql" in str(info.value)


def test_open_backend_and_url_helpers(pg_url: str) -> None:
    assert is_database_url(pg_url) and not is_database_url("sqlite:///x")
    assert redact("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"
    store, reserver = open_backend(pg_url)
    assert reserver.store is store
    with pytest.raises(Exception, match="not a PostgreSQL URL"):
        open_backend("mysql://x")
