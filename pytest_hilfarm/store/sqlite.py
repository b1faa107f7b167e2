"""The farm store: board health, flash digests, reservation history, test results, manual holds.

The default backend is one SQLite file in the rack's state directory, opened in WAL mode so many
processes (xdist workers, CI jobs, a person's CLI) read and write it at once. Every write is one
short ``BEGIN IMMEDIATE`` transaction; the schema is versioned with ``PRAGMA user_version`` and
migrated idempotently on open.

This module only records facts and applies the health rules (three failed checks in a row ->
QUARANTINED; only :meth:`FarmStore.restore` clears a quarantine). It must not lock boards (that is
the reservation package), talk to hardware, or import pytest. It implements
:class:`~pytest_hilfarm.store.records.FarmStoreProtocol`, as :mod:`.postgresql` does.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pytest_hilfarm.errors import UsageError
from pytest_hilfarm.store.records import (
    BUSY_TIMEOUT_MS,
    PASSING_OUTCOMES,
    QUARANTINE_AFTER,
    BoardHealth,
    BoardLease,
    BoardState,
    FlashRecord,
    HealthEvent,
    HoldRecord,
    LeaseOutcome,
    LeaseRecord,
    PassRate,
    ReservationRecord,
    TestResult,
)

# Each entry moves the schema from version i to i+1. Append only: never edit a shipped entry,
# because databases in the field have already run it.
_MIGRATIONS: tuple[str, ...] = (
    # 1: health, flash digests, reservations, holds
    """
    CREATE TABLE IF NOT EXISTS board_health (
        board TEXT PRIMARY KEY,
        health TEXT NOT NULL,
        failures INTEGER NOT NULL DEFAULT 0,
        reason TEXT NOT NULL DEFAULT '',
        changed_at REAL NOT NULL
    );
    CREATE TABLE IF NOT EXISTS health_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        board TEXT NOT NULL,
        old TEXT NOT NULL,
        new TEXT NOT NULL,
        reason TEXT NOT NULL,
        at REAL NOT NULL
    );
    CREATE INDEX IF NOT EXISTS health_events_board ON health_events (board, id);
    CREATE TABLE IF NOT EXISTS flashes (
        board TEXT NOT NULL,
        offset INTEGER NOT NULL,
        digest TEXT NOT NULL,
        algorithm TEXT NOT NULL,
        size INTEGER NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (board, offset)
    );
    CREATE TABLE IF NOT EXISTS reservations (
        lease_id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        request TEXT NOT NULL,
        requested_at REAL NOT NULL,
        granted_at REAL,
        released_at REAL,
        outcome TEXT,
        wait_s REAL NOT NULL
    );
    CREATE INDEX IF NOT EXISTS reservations_requested ON reservations (requested_at);
    CREATE TABLE IF NOT EXISTS reservation_boards (
        lease_id TEXT NOT NULL REFERENCES reservations (lease_id),
        board TEXT NOT NULL,
        outcome TEXT,
        PRIMARY KEY (lease_id, board)
    );
    CREATE INDEX IF NOT EXISTS reservation_boards_board ON reservation_boards (board);
    CREATE TABLE IF NOT EXISTS holds (
        board TEXT PRIMARY KEY,
        person TEXT NOT NULL,
        reason TEXT NOT NULL,
        since REAL NOT NULL
    );
    """,
    # 2: per-test results per board, for pass-rate trends
    """
    CREATE TABLE IF NOT EXISTS results (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        board TEXT NOT NULL,
        test_id TEXT NOT NULL,
        outcome TEXT NOT NULL,
        duration REAL NOT NULL,
        firmware_sha256 TEXT,
        at REAL NOT NULL
    );
    CREATE INDEX IF NOT EXISTS results_board_at ON results (board, at);
    """,
    # 3: a test's past holds, looked up on every reservation (expected hold for backfill)
    """
    CREATE INDEX IF NOT EXISTS reservations_test
        ON reservations (json_extract(owner, '$.test_id'), requested_at);
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)



class FarmStore:
    """SQLite farm store (WAL), safe for many processes and threads.

    One connection per thread (sqlite3 connections must not cross threads) and per process (a
    connection inherited over ``fork`` must not be reused), kept on this instance only.

    Health and manual holds change rarely but are read by every reservation decision, so every
    write that changes them also grows a side file (``<store>-changes``) by one byte, before
    the transaction and again after it commits: :meth:`change_token` (one ``stat``) then tells
    a reader whether what it read before may be out of date. History writes, which happen on
    every lease, do not touch it.
    """

    def __init__(self, path: str | os.PathLike[str], *, quarantine_after: int = QUARANTINE_AFTER):
        if quarantine_after < 1:
            raise UsageError(
                f"quarantine_after must be >= 1, not {quarantine_after}",
                where="FarmStore",
                hint="use the default (3) unless the rig documents a reason",
            )
        self.path = Path(path)
        self.quarantine_after = quarantine_after
        self._local = threading.local()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(
                f"cannot create the farm store directory: {exc}",
                where=str(self.path.parent),
                hint="set the rack's state_dir to a writable directory",
            ) from exc
        self._changes = self.path.with_name(self.path.name + "-changes")
        self._migrate()
        self._bump()  # the side file exists from here on: no token means "cannot tell"

    # -- connection handling -------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            return conn
        try:
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise UsageError(
                f"cannot open the farm store: {exc}",
                where=str(self.path),
                hint="check the path and its permissions",
            ) from exc
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # WAL makes readers never block the single writer; NORMAL sync is durable enough for
        # history (a power cut may lose the last transactions, never corrupt the file).
        self._enable_wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        self._local.conn = conn
        self._local.pid = os.getpid()
        return conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        # Switching to WAL needs a moment of exclusive access; a burst of processes opening a
        # fresh store at once can see SQLITE_BUSY here despite busy_timeout, so retry briefly.
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        if str(mode).lower() != "wal":
            raise UsageError(
                f"the farm store could not switch to WAL mode (got {mode!r})",
                where=str(self.path),
                hint="put the state directory on a local filesystem (not NFS)",
            )

    def close(self) -> None:
        """Close this thread's connection (others close when their thread's local dies)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextmanager
    def _write(self, *, changes: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction; ``changes``: it may change health or holds (see the class)."""
        # IMMEDIATE takes the write lock up front, so two writers never deadlock upgrading a
        # read transaction (SQLite would fail one of them at once, ignoring busy_timeout).
        conn = self._connect()
        if changes:
            # Before: a reader that loads during the transaction sees the token move again
            # after it, and one that loaded before it sees it move now, even if this process
            # dies right after the commit.
            self._bump()
        self._begin_immediate(conn)
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        if changes:
            self._bump()

    def _bump(self) -> None:
        """Grow the change file by one byte (``O_APPEND``: concurrent bumps never collide)."""
        try:
            fd = os.open(self._changes, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         0o666)
        except OSError as exc:
            raise UsageError(
                f"cannot write the farm store's change file: {exc.strerror}",
                where=str(self._changes),
                hint="everyone sharing a rack needs write access to its state_dir",
            ) from exc
        try:
            os.write(fd, b".")
        finally:
            os.close(fd)

    def change_token(self) -> object | None:
        """A value that differs after any change of health or holds (None: cannot tell).

        Equal tokens before and after reading health or holds mean nothing was changed in
        between; a cache may keep what it read until the token moves.
        """
        try:
            st = os.stat(self._changes)
        except OSError:
            return None
        return st.st_ino, st.st_size

    @staticmethod
    def _begin_immediate(conn: sqlite3.Connection) -> None:
        """Take the write lock, retrying at a fine pace instead of SQLite's busy handler.

        The handler sleeps 1, 2, 5, 10, ... 100 ms between tries, so with many concurrent
        writers (every reservation and release writes) a write of a tenth of a millisecond
        often waited tens of milliseconds for a lock that was free long before.
        """
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
            pause = 0.0001
            while True:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as exc:
                    if conn.in_transaction or time.monotonic() > deadline or not (
                            "locked" in str(exc) or "busy" in str(exc)):
                        raise
                time.sleep(pause)
                pause = min(pause * 2, 0.002)
        finally:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")

    def _migrate(self) -> None:
        with self._write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise UsageError(
                    f"the farm store has schema version {version}, newer than this "
                    f"pytest-hilfarm understands ({SCHEMA_VERSION})",
                    where=str(self.path),
                    hint="upgrade pytest-hilfarm, or point state_dir elsewhere",
                )
            for index in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[index].split(";"):
                    if statement.strip():
                        conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def schema_version(self) -> int:
        return int(self._connect().execute("PRAGMA user_version").fetchone()[0])

    def journal_mode(self) -> str:
        return str(self._connect().execute("PRAGMA journal_mode").fetchone()[0])

    # -- health ----------------------------------------------------------------------------

    @staticmethod
    def _state_from_row(board: str, row: tuple[Any, ...] | None) -> BoardState:
        if row is None:
            return BoardState(board, BoardHealth.UNKNOWN, 0, "never checked", None)
        return BoardState(board, BoardHealth(row[0]), int(row[1]), str(row[2]), float(row[3]))

    def health(self, board: str) -> BoardState:
        row = (
            self._connect()
            .execute(
                "SELECT health, failures, reason, changed_at FROM board_health WHERE board = ?",
                (board,),
            )
            .fetchone()
        )
        return self._state_from_row(board, row)

    def all_health(self, boards: Sequence[str] | None = None) -> dict[str, BoardState]:
        """Every recorded board's state; with ``boards``, exactly those (unseen -> UNKNOWN)."""
        rows = (
            self._connect()
            .execute("SELECT board, health, failures, reason, changed_at FROM board_health")
            .fetchall()
        )
        found = {r[0]: self._state_from_row(r[0], r[1:]) for r in rows}
        if boards is None:
            return found
        return {b: found.get(b) or self._state_from_row(b, None) for b in boards}

    def _change(
        self,
        conn: sqlite3.Connection,
        board: str,
        new: BoardHealth,
        failures: int,
        reason: str,
    ) -> BoardHealth:
        row = conn.execute(
            "SELECT health FROM board_health WHERE board = ?", (board,)
        ).fetchone()
        old = BoardHealth(row[0]) if row else BoardHealth.UNKNOWN
        now = time.time()
        conn.execute(
            "INSERT INTO board_health (board, health, failures, reason, changed_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (board) DO UPDATE SET health = excluded.health,"
            " failures = excluded.failures, reason = excluded.reason,"
            " changed_at = excluded.changed_at",
            (board, new.value, failures, reason, now),
        )
        conn.execute(
            "INSERT INTO health_events (board, old, new, reason, at) VALUES (?, ?, ?, ?, ?)",
            (board, old.value, new.value, reason, now),
        )
        return new

    def _current(self, conn: sqlite3.Connection, board: str) -> BoardState:
        row = conn.execute(
            "SELECT health, failures, reason, changed_at FROM board_health WHERE board = ?",
            (board,),
        ).fetchone()
        return self._state_from_row(board, row)

    def set_health(self, board: str, health: BoardHealth, reason: str) -> BoardHealth:
        """Set a board's health; returns the health it now has.

        A QUARANTINED board stays quarantined (only :meth:`restore` clears it): an infra fault
        reported on it must not quietly make it allocatable again.
        """
        health = BoardHealth(health)
        with self._write(changes=True) as conn:
            current = self._current(conn, board)
            if current.health is BoardHealth.QUARANTINED and health is not current.health:
                return current.health
            failures = 0 if health is BoardHealth.GOOD else current.failures
            return self._change(conn, board, health, failures, reason)

    def record_check(self, board: str, ok: bool, detail: str) -> BoardHealth:
        """Record a health check: pass -> GOOD; fail -> BAD, or QUARANTINED at the threshold."""
        with self._write(changes=True) as conn:
            current = self._current(conn, board)
            if current.health is BoardHealth.QUARANTINED:
                # Keep the evidence, not the verdict: a person decides when it comes back.
                now = time.time()
                conn.execute(
                    "INSERT INTO health_events (board, old, new, reason, at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (board, current.health.value, current.health.value,
                     f"check {'passed' if ok else 'failed'} while quarantined: {detail}", now),
                )
                return current.health
            if ok:
                return self._change(conn, board, BoardHealth.GOOD, 0, f"check passed: {detail}")
            failures = current.failures + 1
            if failures >= self.quarantine_after:
                return self._change(
                    conn, board, BoardHealth.QUARANTINED, failures,
                    f"{failures} failed health checks in a row; last: {detail}",
                )
            return self._change(
                conn, board, BoardHealth.BAD, failures,
                f"check failed ({failures}/{self.quarantine_after}): {detail}",
            )

    def restore(self, board: str, person: str) -> BoardHealth:
        """A person clears a quarantine. The board comes back UNKNOWN: checked before use."""
        with self._write(changes=True) as conn:
            return self._change(conn, board, BoardHealth.UNKNOWN, 0, f"restored by {person}")

    def quarantine(self, board: str, reason: str) -> BoardHealth:
        with self._write(changes=True) as conn:
            current = self._current(conn, board)
            return self._change(
                conn, board, BoardHealth.QUARANTINED, current.failures, f"quarantined: {reason}"
            )

    def health_history(self, board: str, limit: int = 50) -> list[HealthEvent]:
        rows = (
            self._connect()
            .execute(
                "SELECT board, old, new, reason, at FROM health_events WHERE board = ?"
                " ORDER BY id DESC LIMIT ?",
                (board, limit),
            )
            .fetchall()
        )
        return [
            HealthEvent(r[0], BoardHealth(r[1]), BoardHealth(r[2]), r[3], float(r[4]))
            for r in rows
        ]

    # -- flash digests ---------------------------------------------------------------------

    def record_flash(
        self, board: str, offset: int, digest: str, size: int, *, algorithm: str = "sha256"
    ) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO flashes (board, offset, digest, algorithm, size, at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (board, offset, digest.lower(), algorithm, size, time.time()),
            )

    def flashed_digest(self, board: str, offset: int) -> FlashRecord | None:
        row = (
            self._connect()
            .execute(
                "SELECT digest, algorithm, size, at FROM flashes WHERE board = ? AND offset = ?",
                (board, offset),
            )
            .fetchone()
        )
        if row is None:
            return None
        return FlashRecord(board, offset, row[0], row[1], int(row[2]), float(row[3]))

    def forget_flash(self, board: str) -> None:
        """Drop a board's flash records (after an erase or an infra fault mid-flash)."""
        with self._write() as conn:
            conn.execute("DELETE FROM flashes WHERE board = ?", (board,))

    # -- reservations ----------------------------------------------------------------------

    def record_reservation(
        self,
        lease_id: str,
        boards: Sequence[str],
        owner: Mapping[str, Any],
        request: str,
        requested_at: float,
        granted_at: float | None,
        wait_s: float,
    ) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO reservations (lease_id, owner, request, requested_at, granted_at,"
                " wait_s) VALUES (?, ?, ?, ?, ?, ?)",
                (lease_id, json.dumps(dict(owner), sort_keys=True), request, requested_at,
                 granted_at, wait_s),
            )
            conn.executemany(
                "INSERT INTO reservation_boards (lease_id, board) VALUES (?, ?)",
                [(lease_id, b) for b in boards],
            )

    def record_release(
        self,
        lease_id: str,
        released_at: float,
        outcome: str,
        board_outcomes: Mapping[str, str] | None = None,
    ) -> bool:
        """Close a reservation record. Returns False if it was already closed (idempotent)."""
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE reservations SET released_at = ?, outcome = ?"
                " WHERE lease_id = ? AND released_at IS NULL",
                (released_at, outcome, lease_id),
            )
            if cur.rowcount == 0:
                return False
            conn.executemany(
                "UPDATE reservation_boards SET outcome = ? WHERE lease_id = ? AND board = ?",
                [(o, lease_id, b) for b, o in (board_outcomes or {}).items()],
            )
            conn.execute(
                "UPDATE reservation_boards SET outcome = ? WHERE lease_id = ? AND outcome IS NULL",
                (outcome, lease_id),
            )
            return True

    def record_lease(self, lease: LeaseRecord) -> bool:
        """Record a whole lease in one transaction (the file backend writes it at release).

        If the lease is already recorded (a successor found its holder dead first), only a
        record that is still open is closed. Returns whether this call closed it.
        """
        with self._write() as conn:
            cur = conn.execute(
                "INSERT OR IGNORE INTO reservations (lease_id, owner, request, requested_at,"
                " granted_at, released_at, outcome, wait_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (lease.lease_id, json.dumps(dict(lease.owner), sort_keys=True), lease.request,
                 lease.requested_at, lease.granted_at, lease.released_at, lease.outcome,
                 lease.wait_s),
            )
            if cur.rowcount:
                conn.executemany(
                    "INSERT INTO reservation_boards (lease_id, board, outcome) VALUES (?, ?, ?)",
                    [(lease.lease_id, b, lease.board_outcomes.get(b, lease.outcome))
                     for b in lease.boards],
                )
                return True
        return self.record_release(lease.lease_id, lease.released_at, lease.outcome,
                                   lease.board_outcomes)

    def history(self, board: str | None = None, limit: int = 100) -> list[ReservationRecord]:
        """Reservations, newest first; with ``board``, only those that included it."""
        conn = self._connect()
        if board is None:
            rows = conn.execute(
                "SELECT lease_id, owner, request, requested_at, granted_at, released_at, outcome,"
                " wait_s FROM reservations ORDER BY requested_at DESC LIMIT ?",
                (limit,),
            ).fetchall()
        else:
            rows = conn.execute(
                "SELECT r.lease_id, r.owner, r.request, r.requested_at, r.granted_at,"
                " r.released_at, r.outcome, r.wait_s FROM reservations r"
                " JOIN reservation_boards b ON b.lease_id = r.lease_id WHERE b.board = ?"
                " ORDER BY r.requested_at DESC LIMIT ?",
                (board, limit),
            ).fetchall()
        per_lease: dict[str, dict[str, str]] = {}
        ids = [r[0] for r in rows]
        # Chunked: SQLite caps the number of bound parameters per statement.
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for lease_id, b, o in conn.execute(
                f"SELECT lease_id, board, outcome FROM reservation_boards"
                f" WHERE lease_id IN ({marks}) ORDER BY board",
                chunk,
            ):
                per_lease.setdefault(lease_id, {})[b] = o or ""
        return [
            ReservationRecord(
                lease_id=r[0],
                boards=tuple(per_lease.get(r[0], {})),
                owner=json.loads(r[1]),
                request=r[2],
                requested_at=float(r[3]),
                granted_at=None if r[4] is None else float(r[4]),
                released_at=None if r[5] is None else float(r[5]),
                outcome=r[6],
                wait_s=float(r[7]),
                board_outcomes=per_lease.get(r[0], {}),
            )
            for r in rows
        ]

    def hold_times(self, test_id: str, limit: int = 50) -> list[float]:
        """How long ``test_id``'s last ``limit`` leases held their boards, newest first.

        Only leases that ended with the holder giving them back count: a holder that died, and
        requests that timed out, say nothing about how long the test takes.
        """
        rows = self._connect().execute(
            "SELECT released_at - granted_at FROM reservations"
            " WHERE json_extract(owner, '$.test_id') = ? AND granted_at IS NOT NULL"
            " AND released_at IS NOT NULL AND outcome NOT IN (?, ?)"
            " ORDER BY requested_at DESC LIMIT ?",
            (test_id, LeaseOutcome.HOLDER_DIED.value, LeaseOutcome.TIMEOUT.value, limit),
        ).fetchall()
        return [max(0.0, float(r[0])) for r in rows]

    # -- test results ----------------------------------------------------------------------

    def record_result(
        self,
        board: str,
        test_id: str,
        outcome: str,
        duration: float,
        firmware_sha256: str | None = None,
        at: float | None = None,
    ) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO results (board, test_id, outcome, duration, firmware_sha256, at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (board, test_id, outcome, duration, firmware_sha256,
                 time.time() if at is None else at),
            )

    def results(self, board: str, since: float = 0.0, limit: int = 1000) -> list[TestResult]:
        rows = (
            self._connect()
            .execute(
                "SELECT board, test_id, outcome, duration, firmware_sha256, at FROM results"
                " WHERE board = ? AND at >= ? ORDER BY at DESC LIMIT ?",
                (board, since, limit),
            )
            .fetchall()
        )
        return [TestResult(r[0], r[1], r[2], float(r[3]), r[4], float(r[5])) for r in rows]

    def pass_rate(self, board: str, since: float = 0.0) -> PassRate:
        """Passed / (passed + failed + errors) since ``since``; skips do not count."""
        marks = ",".join("?" * len(PASSING_OUTCOMES))
        row = (
            self._connect()
            .execute(
                f"SELECT COALESCE(SUM(outcome IN ({marks})), 0), COUNT(*) FROM results"
                " WHERE board = ? AND at >= ? AND outcome NOT IN ('skipped', 'skip')",
                (*PASSING_OUTCOMES, board, since),
            )
            .fetchone()
        )
        return PassRate(passed=int(row[0]), total=int(row[1]))

    # -- manual holds ----------------------------------------------------------------------

    def add_hold(self, board: str, person: str, reason: str) -> HoldRecord:
        """Record that a person holds ``board``; an existing hold by someone else is an error."""
        with self._write(changes=True) as conn:
            row = conn.execute(
                "SELECT person, reason, since FROM holds WHERE board = ?", (board,)
            ).fetchone()
            if row is not None and row[0] != person:
                raise UsageError(
                    f"board {board} is already held by {row[0]} since "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(row[2]))}"
                    f" (reason: {row[1]})",
                    where=f"hold {board}",
                    hint=f"ask {row[0]}, or run `hilfarm unlock {board}` if the hold is stale",
                )
            since = time.time() if row is None else float(row[2])
            conn.execute(
                "INSERT OR REPLACE INTO holds (board, person, reason, since) VALUES (?, ?, ?, ?)",
                (board, person, reason, since),
            )
            return HoldRecord(board, person, reason, since)

    def remove_hold(self, board: str) -> HoldRecord | None:
        with self._write(changes=True) as conn:
            row = conn.execute(
                "SELECT person, reason, since FROM holds WHERE board = ?", (board,)
            ).fetchone()
            conn.execute("DELETE FROM holds WHERE board = ?", (board,))
        return None if row is None else HoldRecord(board, row[0], row[1], float(row[2]))

    def holds(self) -> dict[str, HoldRecord]:
        rows = self._connect().execute("SELECT board, person, reason, since FROM holds").fetchall()
        return {r[0]: HoldRecord(r[0], r[1], r[2], float(r[3])) for r in rows}

    # -- history for reports and the dashboard (services/report, services/dashboard) ---------

    def results_since(self, since: float, until: float | None = None) -> list[TestResult]:
        """Every board's test results recorded in ``[since, until)``, oldest first."""
        rows = self._connect().execute(
            "SELECT board, test_id, outcome, duration, firmware_sha256, at FROM results"
            " WHERE at >= ? AND at < ? ORDER BY at, id",
            (since, float("inf") if until is None else until),
        ).fetchall()
        return [TestResult(r[0], r[1], r[2], float(r[3]), r[4], float(r[5])) for r in rows]

    def lease_outcomes_since(self, since: float) -> list[BoardLease]:
        """Each board of every lease requested since ``since``, oldest first.

        Requests that timed out held no board and so have no row here.
        """
        rows = self._connect().execute(
            "SELECT b.board, r.lease_id, json_extract(r.owner, '$.test_id'), b.outcome,"
            " r.requested_at, r.granted_at, r.released_at FROM reservations r"
            " JOIN reservation_boards b ON b.lease_id = r.lease_id"
            " WHERE r.requested_at >= ? ORDER BY r.requested_at, b.board",
            (since,),
        ).fetchall()
        return [BoardLease(r[0], r[1], r[2] or "", r[3], float(r[4]),
                           None if r[5] is None else float(r[5]),
                           None if r[6] is None else float(r[6])) for r in rows]

    def health_events_since(self, since: float) -> list[HealthEvent]:
        """Every board's health events since ``since``, oldest first."""
        rows = self._connect().execute(
            "SELECT board, old, new, reason, at FROM health_events WHERE at >= ?"
            " ORDER BY at, id", (since,),
        ).fetchall()
        return [HealthEvent(r[0], BoardHealth(r[1]), BoardHealth(r[2]), r[3], float(r[4]))
                for r in rows]
