"""The SQLite farm store: WAL, migrations, health rules, history, results, holds."""

from __future__ import annotations

import multiprocessing
import sqlite3
import time
from pathlib import Path

import pytest

from pytest_hilfarm.errors import UsageError
from pytest_hilfarm.store import (
    SCHEMA_VERSION,
    BoardHealth,
    FarmStore,
    FarmStoreProtocol,
    LeaseOutcome,
    LeaseRecord,
    parse_outcome,
)
from pytest_hilfarm.store.sqlite import _MIGRATIONS


@pytest.fixture
def store(tmp_path: Path) -> FarmStore:
    return FarmStore(tmp_path / "farm.sqlite")


def test_satisfies_the_protocol(store: FarmStore) -> None:
    backend: FarmStoreProtocol = store  # mypy checks the structural match
    assert backend is store


def test_wal_mode_and_busy_timeout(store: FarmStore, tmp_path: Path) -> None:
    assert store.journal_mode() == "wal"
    # WAL is a property of the file: a plain connection sees it too.
    raw = sqlite3.connect(tmp_path / "farm.sqlite")
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()
    assert store._connect().execute("PRAGMA busy_timeout").fetchone()[0] >= 5000


def test_schema_version_and_idempotent_migration(tmp_path: Path) -> None:
    path = tmp_path / "farm.sqlite"
    first = FarmStore(path)
    first.set_health("b1", BoardHealth.GOOD, "seed")
    assert first.schema_version() == SCHEMA_VERSION
    # Opening again (and again) changes nothing and keeps the data.
    for _ in range(2):
        again = FarmStore(path)
        assert again.schema_version() == SCHEMA_VERSION
        assert again.health("b1").health is BoardHealth.GOOD


def test_migrates_an_older_schema(tmp_path: Path) -> None:
    path = tmp_path / "farm.sqlite"
    raw = sqlite3.connect(path, isolation_level=None)
    raw.executescript(_MIGRATIONS[0])
    raw.execute("PRAGMA user_version = 1")
    raw.execute("INSERT INTO holds VALUES ('b1', 'alice', 'scope', 1.0)")
    raw.close()
    store = FarmStore(path)
    assert store.schema_version() == SCHEMA_VERSION
    assert store.holds()["b1"].person == "alice"
    store.record_result("b1", "t::a", "passed", 0.1)  # table from migration 2 exists
    assert store.pass_rate("b1").total == 1


def test_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "farm.sqlite"
    FarmStore(path)
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(UsageError, match="newer than this"):
        FarmStore(path)


def _open_and_write(path: str, index: int) -> None:
    store = FarmStore(path)
    for n in range(20):
        store.record_result(f"b{index}", f"t{n}", "passed", 0.01)


def test_many_processes_open_and_write_at_once(tmp_path: Path) -> None:
    path = str(tmp_path / "farm.sqlite")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_open_and_write, args=(path, i)) for i in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    store = FarmStore(path)
    assert [store.pass_rate(f"b{i}").total for i in range(4)] == [20] * 4


def test_unseen_board_is_unknown(store: FarmStore) -> None:
    state = store.health("new-board")
    assert state.health is BoardHealth.UNKNOWN and state.changed_at is None
    assert store.all_health(["new-board"])["new-board"].health is BoardHealth.UNKNOWN


def test_three_failed_checks_quarantine_and_only_restore_clears(store: FarmStore) -> None:
    assert store.record_check("b1", ok=True, detail="boot ok") is BoardHealth.GOOD
    assert store.record_check("b1", ok=False, detail="no banner") is BoardHealth.BAD
    assert store.health("b1").failures == 1
    assert store.record_check("b1", ok=False, detail="no banner") is BoardHealth.BAD
    assert store.record_check("b1", ok=False, detail="no banner") is BoardHealth.QUARANTINED
    assert store.health("b1").failures == 3
    # Neither a passing check nor an infra report brings it back.
    assert store.record_check("b1", ok=True, detail="boot ok") is BoardHealth.QUARANTINED
    assert store.set_health("b1", BoardHealth.GOOD, "x") is BoardHealth.QUARANTINED
    assert store.set_health("b1", BoardHealth.UNKNOWN, "x") is BoardHealth.QUARANTINED
    # A person restores it; it comes back UNKNOWN (checked before use), failures reset.
    assert store.restore("b1", person="alice") is BoardHealth.UNKNOWN
    state = store.health("b1")
    assert state.failures == 0 and "alice" in state.reason
    assert store.record_check("b1", ok=True, detail="boot ok") is BoardHealth.GOOD


def test_a_pass_resets_the_failure_count(store: FarmStore) -> None:
    store.record_check("b1", ok=False, detail="x")
    store.record_check("b1", ok=False, detail="x")
    store.record_check("b1", ok=True, detail="ok")
    assert store.record_check("b1", ok=False, detail="x") is BoardHealth.BAD
    assert store.health("b1").failures == 1


def test_manual_quarantine_and_health_history(store: FarmStore) -> None:
    store.set_health("b1", BoardHealth.GOOD, "seed")
    store.quarantine("b1", "smells of smoke")
    events = store.health_history("b1")
    assert [(e.old, e.new) for e in events[:2]] == [
        (BoardHealth.GOOD, BoardHealth.QUARANTINED),
        (BoardHealth.UNKNOWN, BoardHealth.GOOD),
    ]
    assert "smoke" in events[0].reason


def test_custom_threshold(tmp_path: Path) -> None:
    store = FarmStore(tmp_path / "f.sqlite", quarantine_after=1)
    assert store.record_check("b1", ok=False, detail="x") is BoardHealth.QUARANTINED
    with pytest.raises(UsageError, match="quarantine_after"):
        FarmStore(tmp_path / "g.sqlite", quarantine_after=0)


def test_flash_digests(store: FarmStore) -> None:
    assert store.flashed_digest("b1", 0x10000) is None
    store.record_flash("b1", 0x10000, "AB" * 32, 1024)
    store.record_flash("b1", 0x1000, "cd" * 16, 512, algorithm="md5")
    record = store.flashed_digest("b1", 0x10000)
    assert record is not None
    assert (record.digest, record.algorithm, record.size) == ("ab" * 32, "sha256", 1024)
    store.record_flash("b1", 0x10000, "ef" * 32, 2048)  # a newer image replaces the record
    assert store.flashed_digest("b1", 0x10000).digest == "ef" * 32  # type: ignore[union-attr]
    store.forget_flash("b1")
    assert store.flashed_digest("b1", 0x1000) is None


def test_reservation_history(store: FarmStore) -> None:
    owner = {"pid": 1, "host": "h", "test_id": "t::a"}
    store.record_reservation("L1", ["b1", "b2"], owner, "2 x esp32", 10.0, 10.5, 0.5)
    store.record_reservation("L2", ["b2"], owner, "1 x esp32", 11.0, 12.0, 1.0)
    assert store.record_release("L1", 11.5, "infra_error", {"b1": "infra_error", "b2": "ok"})
    assert not store.record_release("L1", 99.0, "ok")  # idempotent: first release wins
    everything = store.history()
    assert [r.lease_id for r in everything] == ["L2", "L1"]
    l1 = everything[1]
    assert l1.boards == ("b1", "b2") and l1.owner == owner
    assert (l1.granted_at, l1.released_at, l1.outcome, l1.wait_s) == (10.5, 11.5, "infra_error",
                                                                      0.5)
    assert l1.board_outcomes == {"b1": "infra_error", "b2": "ok"}
    assert [r.lease_id for r in store.history(board="b1")] == ["L1"]
    assert len(store.history(limit=1)) == 1
    assert everything[0].released_at is None


def test_change_token_moves_with_health_and_holds_but_not_with_history(
        store: FarmStore, tmp_path: Path) -> None:
    token = store.change_token()
    assert token is not None
    store.record_lease(LeaseRecord("L1", ("b1",), {"pid": 1}, "1 x esp32", 1.0, 1.5, 0.5, 2.0,
                                   "ok"))
    store.record_result("b1", "t::x", "passed", 1.0, "ab" * 32)
    assert store.change_token() == token  # every lease writes history: no cache drop for it
    changes = [lambda: store.set_health("b1", BoardHealth.GOOD, "ok"),
               lambda: store.record_check("b1", ok=False, detail="no banner"),
               lambda: store.add_hold("b1", "alice", "probing"),
               lambda: store.remove_hold("b1"),
               lambda: store.quarantine("b1", "smoke"),
               lambda: store.restore("b1", "alice")]
    for change in changes:
        change()
        assert store.change_token() != token
        token = store.change_token()
    # Another store on the same file (another process) sees the same token.
    assert FarmStore(tmp_path / "farm.sqlite").change_token() != token  # opening bumps it
    other = FarmStore(tmp_path / "farm.sqlite")
    assert other.change_token() == store.change_token()


def test_results_and_pass_rate(store: FarmStore) -> None:
    now = time.time()
    for outcome, at in [("passed", now - 100), ("failed", now - 50), ("passed", now - 10),
                        ("skipped", now - 5), ("error", now - 1)]:
        store.record_result("b1", "t::x", outcome, 1.5, "ab" * 32, at=at)
    assert store.pass_rate("b1").passed == 2 and store.pass_rate("b1").total == 4
    recent = store.pass_rate("b1", since=now - 20)
    assert (recent.passed, recent.total, recent.rate) == (1, 2, 0.5)
    assert store.pass_rate("other").rate is None
    results = store.results("b1")
    assert results[0].outcome == "error" and results[0].firmware_sha256 == "ab" * 32


def test_holds(store: FarmStore) -> None:
    hold = store.add_hold("b1", "alice", "scope on UART")
    assert store.holds() == {"b1": hold}
    assert store.add_hold("b1", "alice", "still probing").since == hold.since  # same person
    with pytest.raises(UsageError, match="already held by alice"):
        store.add_hold("b1", "bob", "mine")
    assert store.remove_hold("b1") is not None
    assert store.remove_hold("b1") is None
    assert store.holds() == {}


def test_parse_outcome() -> None:
    assert parse_outcome("infra_error", where="x") is LeaseOutcome.INFRA_ERROR
    with pytest.raises(UsageError, match="unknown lease outcome 'broken'"):
        parse_outcome("broken", where="release")


def test_unwritable_directory_is_explained(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UsageError, match="state_dir"):
        FarmStore(blocker / "sub" / "farm.sqlite")
