"""The farm store on PostgreSQL: what the SQLite store records, for every host, plus rig hosts.

Job: implement :class:`~pytest_hilfarm.store.FarmStoreProtocol` with the same rules as the SQLite
store (three failed checks in a row -> QUARANTINED; only ``restore`` clears it; a quarantined
board stays quarantined whatever infra fault is reported), and record rig hosts (heartbeat,
liveness lock) and the boards they export. Every "now" written here is the database server's
clock, so history from hosts with skewed clocks still orders correctly.

Must not: hold board locks (``reservation/postgresql.py`` does); talk to hardware; import pytest;
keep a connection across ``fork`` (one connection per thread and process, opened on first use).

The module-level ``_sql_*`` helpers take a connection inside a caller's transaction: the
reserver uses them so that a grant or a release and its history are one atomic transaction.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pytest_hilfarm.errors import InfrastructureError, UsageError
from pytest_hilfarm.store import (
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
from pytest_hilfarm.store.postgresql_schema import NS_HEALTH, NS_HOST, migrate
from pytest_hilfarm.store.postgresql_schema import schema_version as _schema_version

if TYPE_CHECKING:  # allocation's protocol; importing the reservation package here would be a cycle
    from pytest_hilfarm.reservation.allocate import BoardDescription

T = TypeVar("T")

# A database that does not answer within this many seconds is reported, not waited on forever.
CONNECT_TIMEOUT_S = 10
_NOW = "extract(epoch from clock_timestamp())::double precision"
# Advisory locks of this database, as (namespace, key) pairs: the liveness view of everything.
LIVE_LOCKS_SQL = (
    "SELECT classid::bigint, objid::bigint, pid FROM pg_locks WHERE locktype = 'advisory'"
    " AND objsubid = 2 AND granted"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


def redact(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def _driver() -> Any:
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise UsageError(
            "the PostgreSQL backend needs the psycopg driver",
            where="backend: postgresql://...",
            hint="pip install 'psycopg[binary]>=3.2,<4'",
        ) from exc
    return psycopg


def connect(url: str, *, purpose: str) -> Any:
    """An autocommit psycopg connection, or an InfrastructureError saying what to check."""
    psycopg = _driver()
    try:
        return psycopg.connect(
            url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
            application_name=f"hilfarm {purpose}"[:63],
        )
    except psycopg.Error as exc:
        raise InfrastructureError(
            f"cannot connect to the farm database for {purpose}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
            where=redact(url),
            hint="check that PostgreSQL runs and accepts this user and database "
            "(psql with the same URL), or fix HILFARM_DATABASE_URL / the rack's backend",
        ) from exc


def is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` means the connection is gone (server restart, network), not bad SQL."""
    psycopg = _driver()
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


def jsonb(value: Any) -> Any:
    """``value`` as a JSONB query parameter."""
    return _driver().types.json.Jsonb(value)


def server_now(conn: Any) -> float:
    return float(conn.execute(f"SELECT {_NOW}").fetchone()[0])


def live_locks(conn: Any) -> dict[tuple[int, int], int]:
    """Every granted hilfarm-style advisory lock of this database -> the holding backend's pid."""
    return {(int(r[0]), int(r[1])): int(r[2]) for r in conn.execute(LIVE_LOCKS_SQL).fetchall()}


# -- records of the multi-host part ---------------------------------------------------------------


@dataclass(frozen=True)
class HostRecord:
    """A rig host as the database knows it. ``online``: live lock, fresh heartbeat, not stopped."""

    host: str
    control_url: str
    pid: int
    started_at: float
    heartbeat_at: float | None
    offline_after: float
    stopped_at: float | None
    online: bool


@dataclass(frozen=True)
class RegisteredBoard:
    """A board a rig host exports: where to reach it, and its static facts."""

    board: str
    host: str | None
    chip: str
    features: frozenset[str]
    port_url: str  # rfc2217://rig-host:port
    registered_at: float

    # BoardDescription protocol (allocate.py) spells it ``id``.
    @property
    def id(self) -> str:
        return self.board


# -- SQL helpers that run inside a caller's transaction -------------------------------------------


def _state_from_row(board: str, row: Sequence[Any] | None) -> BoardState:
    if row is None:
        return BoardState(board, BoardHealth.UNKNOWN, 0, "never checked", None)
    return BoardState(board, BoardHealth(row[0]), int(row[1]), str(row[2]), float(row[3]))


def sql_all_health(conn: Any, boards: Sequence[str] | None = None) -> dict[str, BoardState]:
    rows = conn.execute(
        "SELECT board, health, failures, reason, changed_at FROM board_health"
    ).fetchall()
    found = {r[0]: _state_from_row(r[0], r[1:]) for r in rows}
    if boards is None:
        return found
    return {b: found.get(b) or _state_from_row(b, None) for b in boards}


def _lock_health(conn: Any, board: str) -> BoardState:
    # Serialise read-modify-write per board (a row lock cannot cover a row that does not exist).
    conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (NS_HEALTH, board))
    row = conn.execute(
        "SELECT health, failures, reason, changed_at FROM board_health WHERE board = %s", (board,)
    ).fetchone()
    return _state_from_row(board, row)


def _change(conn: Any, board: str, old: BoardHealth, new: BoardHealth, failures: int,
            reason: str) -> BoardHealth:
    now = server_now(conn)
    conn.execute(
        "INSERT INTO board_health (board, health, failures, reason, changed_at)"
        " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (board) DO UPDATE SET health = excluded.health,"
        " failures = excluded.failures, reason = excluded.reason,"
        " changed_at = excluded.changed_at",
        (board, new.value, failures, reason, now),
    )
    conn.execute(
        "INSERT INTO health_events (board, old, new, reason, at) VALUES (%s, %s, %s, %s, %s)",
        (board, old.value, new.value, reason, now),
    )
    return new


def sql_set_health(conn: Any, board: str, health: BoardHealth, reason: str) -> BoardHealth:
    health = BoardHealth(health)
    current = _lock_health(conn, board)
    if current.health is BoardHealth.QUARANTINED and health is not current.health:
        return current.health
    failures = 0 if health is BoardHealth.GOOD else current.failures
    return _change(conn, board, current.health, health, failures, reason)


def sql_forget_flash(conn: Any, board: str) -> None:
    conn.execute("DELETE FROM flashes WHERE board = %s", (board,))


def sql_record_reservation(
    conn: Any, lease_id: str, boards: Sequence[str], owner: Mapping[str, Any], request: str,
    requested_at: float, granted_at: float | None, wait_s: float,
) -> None:
    conn.execute(
        "INSERT INTO reservations (lease_id, owner, request, requested_at, granted_at, wait_s)"
        " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (lease_id) DO NOTHING",
        (lease_id, json.dumps(dict(owner), sort_keys=True), request, requested_at, granted_at,
         wait_s),
    )
    for board in boards:
        conn.execute(
            "INSERT INTO reservation_boards (lease_id, board) VALUES (%s, %s)"
            " ON CONFLICT DO NOTHING",
            (lease_id, board),
        )


def sql_record_release(
    conn: Any, lease_id: str, released_at: float, outcome: str,
    board_outcomes: Mapping[str, str] | None = None,
) -> bool:
    cur = conn.execute(
        "UPDATE reservations SET released_at = %s, outcome = %s"
        " WHERE lease_id = %s AND released_at IS NULL",
        (released_at, outcome, lease_id),
    )
    if cur.rowcount == 0:
        return False
    for board, board_outcome in (board_outcomes or {}).items():
        conn.execute(
            "UPDATE reservation_boards SET outcome = %s WHERE lease_id = %s AND board = %s",
            (board_outcome, lease_id, board),
        )
    conn.execute(
        "UPDATE reservation_boards SET outcome = %s WHERE lease_id = %s AND outcome IS NULL",
        (outcome, lease_id),
    )
    return True


def sql_holds(conn: Any) -> dict[str, HoldRecord]:
    rows = conn.execute("SELECT board, person, reason, since FROM holds").fetchall()
    return {r[0]: HoldRecord(r[0], r[1], r[2], float(r[3])) for r in rows}


def sql_add_hold(conn: Any, board: str, person: str, reason: str) -> HoldRecord:
    conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (NS_HEALTH, "hold:" + board))
    row = conn.execute(
        "SELECT person, reason, since FROM holds WHERE board = %s", (board,)
    ).fetchone()
    if row is not None and row[0] != person:
        raise UsageError(
            f"board {board} is already held by {row[0]} since "
            f"{_iso(float(row[2]))} (reason: {row[1]})",
            where=f"hold {board}",
            hint=f"ask {row[0]}, or run `hilfarm unlock {board}` if the hold is stale",
        )
    since = server_now(conn) if row is None else float(row[2])
    conn.execute(
        "INSERT INTO holds (board, person, reason, since) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT (board) DO UPDATE SET person = excluded.person,"
        " reason = excluded.reason, since = excluded.since",
        (board, person, reason, since),
    )
    return HoldRecord(board, person, reason, since)


def sql_board_keys(conn: Any, boards: Iterable[str]) -> dict[str, int]:
    """Each board's advisory lock key (assigned on first sight, never reused)."""
    names = sorted(set(boards))
    if not names:
        return {}
    conn.execute(
        "INSERT INTO board_keys (board) SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING",
        (names,),
    )
    rows = conn.execute(
        "SELECT board, lock_key FROM board_keys WHERE board = ANY(%s)", (names,)
    ).fetchall()
    return {r[0]: int(r[1]) for r in rows}


HOSTS_SQL = (
    "SELECT h.host, h.control_url, h.pid, h.started_at, h.heartbeat_at, h.offline_after,"
    " h.stopped_at, (h.stopped_at IS NULL AND h.heartbeat_at IS NOT NULL"
    f" AND {_NOW} - h.heartbeat_at <= h.offline_after"
    f" AND EXISTS (SELECT 1 FROM ({LIVE_LOCKS_SQL}) l"
    "   WHERE l.classid = %s AND l.objid = h.lock_key)) AS online"
    " FROM hosts h ORDER BY h.host"
)


def sql_hosts(conn: Any) -> dict[str, HostRecord]:
    rows = conn.execute(HOSTS_SQL, (NS_HOST,)).fetchall()
    return {
        r[0]: HostRecord(
            host=r[0], control_url=r[1], pid=int(r[2]), started_at=float(r[3]),
            heartbeat_at=None if r[4] is None else float(r[4]), offline_after=float(r[5]),
            stopped_at=None if r[6] is None else float(r[6]), online=bool(r[7]),
        )
        for r in rows
    }


def sql_registered_boards(conn: Any) -> dict[str, RegisteredBoard]:
    rows = conn.execute(
        "SELECT board, host, chip, features, port_url, registered_at FROM boards ORDER BY board"
    ).fetchall()
    return {
        r[0]: RegisteredBoard(r[0], r[1], r[2], frozenset(r[3] or ()), r[4], float(r[5]))
        for r in rows
    }


def _iso(epoch: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


# -- the store ------------------------------------------------------------------------------


class PgFarmStore:
    """PostgreSQL farm store, safe for many hosts, processes and threads.

    One autocommit connection per thread and process. A connection that the server dropped
    (restart, network) is replaced once and the operation retried; if that fails too, an
    :class:`InfrastructureError` names the database and what to check.
    """

    def __init__(self, url: str, *, quarantine_after: int = QUARANTINE_AFTER) -> None:
        if quarantine_after < 1:
            raise UsageError(
                f"quarantine_after must be >= 1, not {quarantine_after}",
                where="PgFarmStore",
                hint="use the default (3) unless the rig documents a reason",
            )
        self.url = url
        self.quarantine_after = quarantine_after
        self._local = threading.local()
        self._run(lambda conn: migrate(conn, where=redact(url)))

    # -- connections ---------------------------------------------------------------------------

    def _connect(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            if not conn.closed and not conn.broken:
                return conn
        conn = connect(self.url, purpose="store")
        self._local.conn = conn
        self._local.pid = os.getpid()
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - it is already broken; closing is a courtesy
                pass

    def _run(self, operation: Callable[[Any], T], *, transaction: bool = False) -> T:
        for attempt in (1, 2):
            conn = self._connect()
            try:
                if transaction:
                    with conn.transaction():
                        return operation(conn)
                return operation(conn)
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                self._drop()
                if attempt == 2:
                    raise InfrastructureError(
                        f"lost the connection to the farm database: {str(exc).strip()}",
                        where=redact(self.url),
                        hint="check that PostgreSQL is up; the operation was not completed, "
                        "run it again",
                    ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Close this thread's connection (other threads' close when their thread ends)."""
        self._drop()

    def schema_version(self) -> int:
        return self._run(_schema_version)

    def now(self) -> float:
        """The database server's clock (epoch seconds): the farm's one time base."""
        return self._run(server_now)

    # -- health --------------------------------------------------------------------------------

    def health(self, board: str) -> BoardState:
        row = self._run(lambda c: c.execute(
            "SELECT health, failures, reason, changed_at FROM board_health WHERE board = %s",
            (board,),
        ).fetchone())
        return _state_from_row(board, row)

    def all_health(self, boards: Sequence[str] | None = None) -> dict[str, BoardState]:
        return self._run(lambda c: sql_all_health(c, boards))

    def set_health(self, board: str, health: BoardHealth, reason: str) -> BoardHealth:
        """Set a board's health; a QUARANTINED board stays so (only :meth:`restore` clears it)."""
        return self._run(lambda c: sql_set_health(c, board, health, reason), transaction=True)

    def record_check(self, board: str, ok: bool, detail: str) -> BoardHealth:
        """Record a health check: pass -> GOOD; fail -> BAD, or QUARANTINED at the threshold."""

        def op(conn: Any) -> BoardHealth:
            current = _lock_health(conn, board)
            if current.health is BoardHealth.QUARANTINED:
                # Keep the evidence, not the verdict: a person decides when it comes back.
                conn.execute(
                    "INSERT INTO health_events (board, old, new, reason, at)"
                    f" VALUES (%s, %s, %s, %s, {_NOW})",
                    (board, current.health.value, current.health.value,
                     f"check {'passed' if ok else 'failed'} while quarantined: {detail}"),
                )
                return current.health
            if ok:
                return _change(conn, board, current.health, BoardHealth.GOOD, 0,
                               f"check passed: {detail}")
            failures = current.failures + 1
            if failures >= self.quarantine_after:
                return _change(
                    conn, board, current.health, BoardHealth.QUARANTINED, failures,
                    f"{failures} failed health checks in a row; last: {detail}",
                )
            return _change(
                conn, board, current.health, BoardHealth.BAD, failures,
                f"check failed ({failures}/{self.quarantine_after}): {detail}",
            )

        return self._run(op, transaction=True)

    def restore(self, board: str, person: str) -> BoardHealth:
        """A person clears a quarantine. The board comes back UNKNOWN: checked before use."""

        def op(conn: Any) -> BoardHealth:
            current = _lock_health(conn, board)
            return _change(conn, board, current.health, BoardHealth.UNKNOWN, 0,
                           f"restored by {person}")

        return self._run(op, transaction=True)

    def quarantine(self, board: str, reason: str) -> BoardHealth:
        def op(conn: Any) -> BoardHealth:
            current = _lock_health(conn, board)
            return _change(conn, board, current.health, BoardHealth.QUARANTINED,
                           current.failures, f"quarantined: {reason}")

        return self._run(op, transaction=True)

    def health_history(self, board: str, limit: int = 50) -> list[HealthEvent]:
        rows = self._run(lambda c: c.execute(
            "SELECT board, old, new, reason, at FROM health_events WHERE board = %s"
            " ORDER BY id DESC LIMIT %s",
            (board, limit),
        ).fetchall())
        return [HealthEvent(r[0], BoardHealth(r[1]), BoardHealth(r[2]), r[3], float(r[4]))
                for r in rows]

    # -- flash digests -------------------------------------------------------------------------

    def record_flash(
        self, board: str, offset: int, digest: str, size: int, *, algorithm: str = "sha256"
    ) -> None:
        self._run(lambda c: c.execute(
            'INSERT INTO flashes (board, "offset", digest, algorithm, size, at)'
            f" VALUES (%s, %s, %s, %s, %s, {_NOW}) ON CONFLICT (board, \"offset\") DO UPDATE"
            " SET digest = excluded.digest, algorithm = excluded.algorithm,"
            " size = excluded.size, at = excluded.at",
            (board, offset, digest.lower(), algorithm, size),
        ))

    def flashed_digest(self, board: str, offset: int) -> FlashRecord | None:
        row = self._run(lambda c: c.execute(
            'SELECT digest, algorithm, size, at FROM flashes WHERE board = %s AND "offset" = %s',
            (board, offset),
        ).fetchone())
        if row is None:
            return None
        return FlashRecord(board, offset, row[0], row[1], int(row[2]), float(row[3]))

    def forget_flash(self, board: str) -> None:
        """Drop a board's flash records (after an erase or an infra fault mid-flash)."""
        self._run(lambda c: sql_forget_flash(c, board))

    # -- reservations --------------------------------------------------------------------------

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
        self._run(
            lambda c: sql_record_reservation(
                c, lease_id, boards, owner, request, requested_at, granted_at, wait_s
            ),
            transaction=True,
        )

    def record_release(
        self,
        lease_id: str,
        released_at: float,
        outcome: str,
        board_outcomes: Mapping[str, str] | None = None,
    ) -> bool:
        """Close a reservation record. Returns False if it was already closed (idempotent)."""
        return self._run(
            lambda c: sql_record_release(c, lease_id, released_at, outcome, board_outcomes),
            transaction=True,
        )

    def record_lease(self, lease: LeaseRecord) -> bool:
        """Record a whole lease at once; an existing record is only closed if still open."""

        def op(conn: Any) -> bool:
            sql_record_reservation(conn, lease.lease_id, lease.boards, lease.owner, lease.request,
                                   lease.requested_at, lease.granted_at, lease.wait_s)
            return sql_record_release(conn, lease.lease_id, lease.released_at, lease.outcome,
                                      lease.board_outcomes)

        return self._run(op, transaction=True)

    def change_token(self) -> object | None:
        """None: no cheap change counter (each decision reads health with the rest)."""
        return None

    def history(self, board: str | None = None, limit: int = 100) -> list[ReservationRecord]:
        """Reservations, newest first; with ``board``, only those that included it."""

        def op(conn: Any) -> list[ReservationRecord]:
            cols = ("r.lease_id, r.owner, r.request, r.requested_at, r.granted_at,"
                    " r.released_at, r.outcome, r.wait_s")
            if board is None:
                rows = conn.execute(
                    f"SELECT {cols} FROM reservations r"
                    " ORDER BY r.requested_at DESC LIMIT %s", (limit,),
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {cols} FROM reservations r JOIN reservation_boards b"
                    " ON b.lease_id = r.lease_id WHERE b.board = %s"
                    " ORDER BY r.requested_at DESC LIMIT %s", (board, limit),
                ).fetchall()
            per_lease: dict[str, dict[str, str]] = {}
            ids = [r[0] for r in rows]
            if ids:
                for lease_id, b, o in conn.execute(
                    "SELECT lease_id, board, outcome FROM reservation_boards"
                    " WHERE lease_id = ANY(%s) ORDER BY board", (ids,),
                ).fetchall():
                    per_lease.setdefault(lease_id, {})[b] = o or ""
            return [
                ReservationRecord(
                    lease_id=r[0],
                    boards=tuple(per_lease.get(r[0], {})),
                    owner=r[1] if isinstance(r[1], dict) else json.loads(r[1]),
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

        return self._run(op)

    def hold_times(self, test_id: str, limit: int = 50) -> list[float]:
        """How long ``test_id``'s last ``limit`` leases held their boards (see FarmStore)."""
        rows = self._run(lambda conn: conn.execute(
            "SELECT released_at - granted_at FROM reservations"
            " WHERE owner->>'test_id' = %s AND granted_at IS NOT NULL"
            " AND released_at IS NOT NULL AND outcome NOT IN (%s, %s)"
            " ORDER BY requested_at DESC LIMIT %s",
            (test_id, LeaseOutcome.HOLDER_DIED.value, LeaseOutcome.TIMEOUT.value, limit),
        ).fetchall())
        return [max(0.0, float(r[0])) for r in rows]

    # -- test results --------------------------------------------------------------------------

    def record_result(
        self,
        board: str,
        test_id: str,
        outcome: str,
        duration: float,
        firmware_sha256: str | None = None,
        at: float | None = None,
    ) -> None:
        self._run(lambda c: c.execute(
            "INSERT INTO results (board, test_id, outcome, duration, firmware_sha256, at)"
            f" VALUES (%s, %s, %s, %s, %s, COALESCE(%s, {_NOW}))",
            (board, test_id, outcome, duration, firmware_sha256, at),
        ))

    def results(self, board: str, since: float = 0.0, limit: int = 1000) -> list[TestResult]:
        rows = self._run(lambda c: c.execute(
            "SELECT board, test_id, outcome, duration, firmware_sha256, at FROM results"
            " WHERE board = %s AND at >= %s ORDER BY at DESC LIMIT %s",
            (board, since, limit),
        ).fetchall())
        return [TestResult(r[0], r[1], r[2], float(r[3]), r[4], float(r[5])) for r in rows]

    def pass_rate(self, board: str, since: float = 0.0) -> PassRate:
        """Passed / (passed + failed + errors) since ``since``; skips do not count."""
        row = self._run(lambda c: c.execute(
            "SELECT COALESCE(SUM(CASE WHEN outcome = ANY(%s) THEN 1 ELSE 0 END), 0), COUNT(*)"
            " FROM results WHERE board = %s AND at >= %s"
            " AND outcome NOT IN ('skipped', 'skip')",
            (list(PASSING_OUTCOMES), board, since),
        ).fetchone())
        return PassRate(passed=int(row[0]), total=int(row[1]))

    # -- manual holds --------------------------------------------------------------------------

    def add_hold(self, board: str, person: str, reason: str) -> HoldRecord:
        """Record that a person holds ``board``; an existing hold by someone else is an error."""
        return self._run(lambda c: sql_add_hold(c, board, person, reason), transaction=True)

    def remove_hold(self, board: str) -> HoldRecord | None:
        row = self._run(lambda c: c.execute(
            "DELETE FROM holds WHERE board = %s RETURNING person, reason, since", (board,)
        ).fetchone())
        return None if row is None else HoldRecord(board, row[0], row[1], float(row[2]))

    def holds(self) -> dict[str, HoldRecord]:
        return self._run(sql_holds)

    # -- rig hosts and their boards ------------------------------------------------------------

    def hosts(self) -> dict[str, HostRecord]:
        """Every rig host ever registered, with whether it is online now."""
        return self._run(sql_hosts)

    def registered_boards(self) -> dict[str, RegisteredBoard]:
        return self._run(sql_registered_boards)

    def register_host(self, host: str, control_url: str, pid: int, offline_after: float) -> int:
        """Create or refresh a host's record; returns its liveness lock key (see NS_HOST)."""
        if offline_after <= 0:
            raise UsageError(
                f"offline_after must be > 0 seconds, not {offline_after}",
                where=f"rig host {host}",
                hint="use a few heartbeat intervals, e.g. 15",
            )
        row = self._run(lambda c: c.execute(
            "INSERT INTO hosts (host, control_url, pid, started_at, heartbeat_at, offline_after,"
            f" stopped_at) VALUES (%s, %s, %s, {_NOW}, {_NOW}, %s, NULL)"
            " ON CONFLICT (host) DO UPDATE SET control_url = excluded.control_url,"
            " pid = excluded.pid, started_at = excluded.started_at,"
            " heartbeat_at = excluded.heartbeat_at, offline_after = excluded.offline_after,"
            " stopped_at = NULL RETURNING lock_key",
            (host, control_url, pid, offline_after),
        ).fetchone())
        return int(row[0])

    def register_boards(self, host: str, boards: Sequence[BoardDescription],
                        port_urls: Mapping[str, str]) -> None:
        """Record ``host``'s boards. A board id another online host exports is refused."""

        def op(conn: Any) -> None:
            hosts = sql_hosts(conn)
            ids = [b.id for b in boards]
            taken = conn.execute(
                "SELECT board, host FROM boards WHERE board = ANY(%s) AND host <> %s FOR UPDATE",
                (ids, host),
            ).fetchall()
            for board, other in taken:
                record = hosts.get(other)
                if record is not None and record.online:
                    raise UsageError(
                        f"board {board} is already exported by rig host {other} (online)",
                        where=f"rig host {host}",
                        hint="board ids must be unique across the farm: rename the board in "
                        "one of the rack files",
                    )
            for board in boards:
                conn.execute(
                    "INSERT INTO boards (board, host, chip, features, port_url, registered_at)"
                    f" VALUES (%s, %s, %s, %s, %s, {_NOW}) ON CONFLICT (board) DO UPDATE"
                    " SET host = excluded.host, chip = excluded.chip,"
                    " features = excluded.features, port_url = excluded.port_url,"
                    " registered_at = excluded.registered_at",
                    (board.id, host, board.chip, sorted(board.features),
                     port_urls.get(board.id, "")),
                )
            # Boards this host no longer exports are forgotten (their history stays).
            conn.execute(
                "DELETE FROM boards WHERE host = %s AND NOT (board = ANY(%s))", (host, ids)
            )
            sql_board_keys(conn, ids)

        self._run(op, transaction=True)

    def lease_holds(self, lease_id: str, board: str) -> bool:
        """Whether lease ``lease_id`` holds ``board`` right now (owner record + live lock).

        A rig host asks this before acting for a client, so a client whose lease was lost (its
        connection dropped, the board maybe re-granted) cannot touch the board any more.
        """
        from pytest_hilfarm.store.postgresql_schema import NS_BOARD

        def op(conn: Any) -> bool:
            row = conn.execute(
                "SELECT o.lease_id, k.lock_key FROM board_owners o JOIN board_keys k"
                " ON k.board = o.board WHERE o.board = %s", (board,),
            ).fetchone()
            if row is None or row[0] != lease_id:
                return False
            return (NS_BOARD, int(row[1])) in live_locks(conn)

        return self._run(op)

    def heartbeat(self, host: str) -> None:
        self._run(lambda c: c.execute(
            f"UPDATE hosts SET heartbeat_at = {_NOW} WHERE host = %s", (host,)
        ))

    def host_stopped(self, host: str) -> None:
        """A rig host stopped cleanly: offline at once, its boards no longer allocated."""
        self._run(lambda c: c.execute(
            f"UPDATE hosts SET stopped_at = {_NOW}, heartbeat_at = NULL WHERE host = %s",
            (host,),
        ))

    # -- history for reports and the dashboard (services/report, services/dashboard) ---------

    def results_since(self, since: float, until: float | None = None) -> list[TestResult]:
        """Every board's test results recorded in ``[since, until)``, oldest first."""
        rows = self._run(lambda c: c.execute(
            "SELECT board, test_id, outcome, duration, firmware_sha256, at FROM results"
            " WHERE at >= %s AND at < %s ORDER BY at, id",
            (since, float("inf") if until is None else until),
        ).fetchall())
        return [TestResult(r[0], r[1], r[2], float(r[3]), r[4], float(r[5])) for r in rows]

    def lease_outcomes_since(self, since: float) -> list[BoardLease]:
        """Each board of every lease requested since ``since``, oldest first (see FarmStore)."""
        rows = self._run(lambda c: c.execute(
            "SELECT b.board, r.lease_id, r.owner->>'test_id', b.outcome,"
            " r.requested_at, r.granted_at, r.released_at FROM reservations r"
            " JOIN reservation_boards b ON b.lease_id = r.lease_id"
            " WHERE r.requested_at >= %s ORDER BY r.requested_at, b.board",
            (since,),
        ).fetchall())
        return [BoardLease(r[0], r[1], r[2] or "", r[3], float(r[4]),
                           None if r[5] is None else float(r[5]),
                           None if r[6] is None else float(r[6])) for r in rows]

    def health_events_since(self, since: float) -> list[HealthEvent]:
        """Every board's health events since ``since``, oldest first."""
        rows = self._run(lambda c: c.execute(
            "SELECT board, old, new, reason, at FROM health_events WHERE at >= %s"
            " ORDER BY at, id", (since,),
        ).fetchall())
        return [HealthEvent(r[0], BoardHealth(r[1]), BoardHealth(r[2]), r[3], float(r[4]))
                for r in rows]
