"""Exclusive, fair board reservation across hosts on PostgreSQL session advisory locks.

Job: the multi-host :class:`~pytest_hilfarm.reservation.ReservationBackend`. Every lease has a
dedicated database connection and holds one session-level advisory lock per board on it
(``pg_try_advisory_lock(NS_BOARD, key)``): the server releases the locks the moment that
connection dies (holder SIGKILLed, host powered off, network cut, server restarted), so nothing is
ever reclaimed by age. Requests are all-or-nothing and served in arrival order among those that
compete for the same boards, exactly as :class:`~pytest_hilfarm.reservation.Reserver` does on one
host: a waiting request has a row in ``waiters`` (a ticket from a sequence) and proves it is alive
with a session lock on its ticket; each decision replays the queue under a transaction-level
scheduling lock. Boards of a rig host that is offline (no liveness lock, stale heartbeat or stopped)
are never allocated.

A lease that loses its connection has lost its locks, and another client may already hold its
boards. It cannot know when that happened, so it never writes "released at now" over a successor:
its next operation (:meth:`PgLease.release` or :meth:`PgLease.verify`) raises
:class:`InfrastructureError`; the successor's grant closes the lost lease's record at the grant time
(outcome ``holder_died``) and marks the boards UNKNOWN. History therefore never shows a board held
twice. All times are the database server's clock.

Must not: reclaim a lock by age; block on a board lock (boards are taken with try-locks, all at
once, under the scheduling lock); talk to hardware; import pytest.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

from pytest_hilfarm.allocate import (
    BoardDescription,
    BoardInfo,
    BoardRequest,
    can_ever_satisfy,
    choose,
    natural_sorted,
)
from pytest_hilfarm.errors import InfrastructureError, ReservationTimeout, UsageError
from pytest_hilfarm.reservation import (
    BoardStatus,
    HoldResult,
    Owner,
    OwnerRecord,
)
from pytest_hilfarm.store import (
    OUTCOMES_NEEDING_CHECK,
    BoardHealth,
    HoldRecord,
    LeaseOutcome,
    board_outcomes,
    check_due_reason,
    outcome_of,
    overall_outcome,
)

from .migrations import NS_BOARD, NS_SCHED, NS_TICKET
from .store import (
    HostRecord,
    PgFarmStore,
    connect,
    is_connection_error,
    live_locks,
    redact,
    server_now,
    sql_add_hold,
    sql_all_health,
    sql_board_keys,
    sql_forget_flash,
    sql_holds,
    sql_hosts,
    sql_record_release,
    sql_record_reservation,
    sql_registered_boards,
    sql_set_health,
)

# Periodic re-decision without a notification: catches holders whose connection died (the server
# frees their locks but nobody sends NOTIFY) and hosts coming back online.
RECHECK_INTERVAL = 0.25
# The k-th waiter in line waits k steps after a wake-up, so the head of the queue decides first.
STAGGER_STEP = 0.002
CHANNEL = "hilfarm_release"
_TICKET_KEYS = 2**31 - 1  # ticket sequence -> int4 lock key
IDLE_CONNECTIONS = 4  # released lease connections kept per reserver for reuse

def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class RemoteBoardStatus:
    """A board as ``hilfarm status`` shows it on a multi-host farm: who, health, which host."""

    status: BoardStatus
    host: str | None  # None: a board of the rack file no rig host registered
    online: bool
    port_url: str


@dataclass(frozen=True)
class _Ticket:
    seq: int
    request: BoardRequest
    boards: frozenset[str]
    owner: str


@dataclass(frozen=True)
class _Grant:
    lease_id: str
    boards: tuple[str, ...]
    keys: dict[str, int]
    needs_check: frozenset[str]
    granted_at: float
    requested_at: float


@dataclass
class _WaitState:
    """One reserve() call's bookkeeping (local to that call, never shared)."""

    conn: Any = None
    requested_at: float = 0.0
    ticket: _Ticket | None = None
    older: int = 0


class _LockLost(Exception):
    """Internal: a lease found it no longer holds what it was granted."""


class PgLease:
    """Exclusive use of ``boards`` while this lease's database connection lives.

    Same contract as :class:`~pytest_hilfarm.reservation.Lease` (idempotent ``release``, context
    manager, fail-closed outcomes), plus :meth:`verify` and ``lost``.
    """

    def __init__(self, reserver: PgReserver, conn: Any, grant: _Grant, owner: Owner,
                 request: BoardRequest) -> None:
        self._reserver = reserver
        self._conn = conn
        self._grant = grant
        self.owner = owner
        self.request = request
        self.granted_at = grant.granted_at  # database clock, epoch seconds
        self.waited = grant.granted_at - grant.requested_at
        self._mutex = threading.Lock()
        self._released = False
        self._lost = False

    @property
    def id(self) -> str:
        return self._grant.lease_id

    @property
    def boards(self) -> tuple[str, ...]:
        return self._grant.boards

    @property
    def needs_check(self) -> frozenset[str]:
        return self._grant.needs_check

    @property
    def released(self) -> bool:
        return self._released

    @property
    def lost(self) -> bool:
        """True once the lease found its locks gone (its boards may be someone else's)."""
        return self._lost

    def __repr__(self) -> str:
        state = "lost" if self._lost else "released" if self._released else "held"
        return f"PgLease({self.id[:8]}, boards={list(self.boards)}, {state})"

    def verify(self) -> None:
        """Raise :class:`InfrastructureError` unless this lease still holds all its boards."""
        with self._mutex:
            if self._released:
                raise UsageError(
                    f"lease {self.id[:8]} was already released",
                    where=f"lease {self.id[:8]} ({', '.join(self.boards)})",
                    hint="reserve the boards again",
                )
            try:
                self._reserver._check_locks(self._conn, self._grant)
            except _LockLost as exc:
                self._lost = True
                self._released = True
                self._reserver._settle_lost(self)
                raise self._reserver._lost_error(self, str(exc)) from None

    def release(
        self,
        outcomes: Mapping[str, str | LeaseOutcome] | None = None,
        *,
        default: str | LeaseOutcome = LeaseOutcome.OK,
        note: str = "",
    ) -> None:
        """Record history and health, then unlock; again does nothing (``note``: see Lease).

        Raises :class:`InfrastructureError` if the lease had lost its locks (the connection to
        the database dropped): results obtained on these boards are then not trustworthy.
        """
        where = f"release of lease {self.id[:8]} ({', '.join(self.boards)})"
        per_board = board_outcomes(self.boards, outcomes, default, where=where)
        with self._mutex:
            if self._released:
                return
            self._released = True
            try:
                self._reserver._finish(self, per_board, note)
            except _LockLost as exc:
                self._lost = True
                self._reserver._settle_lost(self)
                raise self._reserver._lost_error(self, str(exc)) from None

    def __enter__(self) -> PgLease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release(default=outcome_of(exc))


class PgReserver:
    """Reservation backend on PostgreSQL (see the module docstring).

    ``boards``: the rack's boards (allocation is limited to them; a board no rig host registered
    counts as always online, e.g. one behind a ser2net the rack file names). None: every board
    that a rig host registered.
    """

    def __init__(
        self,
        url: str,
        store: PgFarmStore,
        boards: Sequence[BoardDescription] | None = None,
        *,
        recheck_interval: float = RECHECK_INTERVAL,
        stagger_step: float = STAGGER_STEP,
        max_failures: int | None = None,
    ) -> None:
        self.url = url
        self.store = store
        self.recheck_interval = recheck_interval
        self.stagger_step = stagger_step
        self.max_failures = max_failures if max_failures is not None else store.quarantine_after
        self._static: dict[str, BoardInfo] | None = None
        if boards is not None:
            seen: dict[str, BoardInfo] = {}
            for board in boards:
                if board.id in seen:
                    raise UsageError(
                        f"board id {board.id!r} appears twice", where="rack boards",
                        hint="give every board a unique id",
                    )
                seen[board.id] = BoardInfo.of(board)
            self._static = seen
        self._keys: dict[str, int] = {}
        self._keys_lock = threading.Lock()
        self._idle: list[Any] = []  # released lease connections, reused by this process only
        self._idle_pid = os.getpid()
        self._idle_lock = threading.Lock()

    @property
    def where(self) -> str:
        return f"farm database {redact(self.url)}"

    # -- the universe of boards ---------------------------------------------------------------

    def _candidates(self, conn: Any) -> tuple[dict[str, BoardInfo], set[str], dict[str, str]]:
        """Boards this reserver may allocate (health applied), the offline ones, their hosts."""
        registered = sql_registered_boards(conn)
        hosts = sql_hosts(conn)
        static = self._static
        if static is None:
            base = {b: BoardInfo(b, r.chip, r.features) for b, r in registered.items()}
        else:
            base = dict(static)
        health = sql_all_health(conn, list(base))
        infos = {b: BoardInfo(i.id, i.chip, i.features, health[b].health, health[b].failures)
                 for b, i in base.items()}
        offline: set[str] = set()
        host_of: dict[str, str] = {}
        for board in infos:
            record = registered.get(board)
            if record is None or record.host is None:
                continue
            host_of[board] = record.host
            host = hosts.get(record.host)
            if host is None or not host.online:
                offline.add(board)
        return infos, offline, host_of

    def _keys_for(self, conn: Any, boards: Sequence[str]) -> dict[str, int]:
        with self._keys_lock:
            missing = [b for b in boards if b not in self._keys]
        if missing:
            found = sql_board_keys(conn, missing)
            with self._keys_lock:
                self._keys.update(found)
        with self._keys_lock:
            return {b: self._keys[b] for b in boards}

    def _all_boards(self) -> list[BoardInfo]:
        if self._static is not None:
            return list(self._static.values())
        registered = self.store.registered_boards()
        return [BoardInfo(b, r.chip, r.features) for b, r in registered.items()]

    # -- connections ----------------------------------------------------------------------------

    def _lease_connection(self) -> Any:
        with self._idle_lock:
            if self._idle_pid != os.getpid():  # inherited over fork: never reuse the parent's
                self._idle, self._idle_pid = [], os.getpid()
            conn = self._idle.pop() if self._idle else None
        if conn is not None and not conn.closed and not conn.broken:
            try:
                for _ in conn.notifies(timeout=0):  # drop wake-ups meant for its last user
                    pass
                return conn
            except Exception:  # noqa: BLE001 - a dead idle connection: open a new one
                self._close(conn)
        conn = connect(self.url, purpose="lease")
        try:
            conn.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _recycle(self, conn: Any) -> None:
        """Keep a cleanly released lease connection (it holds no lock any more) for reuse.

        Opening a connection costs about as much as a whole scheduling decision.
        """
        with self._idle_lock:
            if (self._idle_pid == os.getpid() and len(self._idle) < IDLE_CONNECTIONS
                    and not conn.closed and not conn.broken):
                self._idle.append(conn)
                return
        self._close(conn)

    @staticmethod
    def _close(conn: Any) -> None:
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    # -- one scheduling decision ----------------------------------------------------------------

    def _live_tickets(self, conn: Any, locks: Mapping[tuple[int, int], int],
                      mine: _Ticket | None) -> list[_Ticket]:
        rows = conn.execute(
            "SELECT seq, request, boards, owner_text FROM waiters ORDER BY seq"
        ).fetchall()
        tickets: list[_Ticket] = []
        dead: list[int] = []
        for seq, request, boards, owner_text in rows:
            seq = int(seq)
            alive = (NS_TICKET, seq % _TICKET_KEYS) in locks
            if not alive and (mine is None or seq != mine.seq):
                dead.append(seq)  # its waiter's connection is gone
                continue
            try:
                tickets.append(_Ticket(seq, BoardRequest.from_json(request), frozenset(boards),
                                       str(owner_text)))
            except (KeyError, TypeError, ValueError, UsageError):
                continue  # written by another version: not ours to interpret
        if dead:
            conn.execute("DELETE FROM waiters WHERE seq = ANY(%s)", (dead,))
        return tickets

    def _attempt(self, request: BoardRequest, owner: Owner, state: _WaitState) -> _Grant | None:
        conn = state.conn
        taken: list[int] = []
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (NS_SCHED,))
                infos, offline, _ = self._candidates(conn)
                holds = sql_holds(conn)
                blocked = set(holds) | offline
                universe = {b: i for b, i in infos.items() if b not in holds}
                if choose(infos.values(), request, max_failures=self.max_failures) is None:
                    # Even with every lease, hold and host back, unusable boards leave too few:
                    # only a person can change that, so waiting would hide it.
                    raise InfrastructureError(
                        f"cannot reserve {request.describe()}: too few usable boards",
                        where=self.where,
                        hint=self._health_hint(infos, request),
                    )
                universe = {b: i for b, i in universe.items() if b not in offline}
                keys = self._keys_for(conn, natural_sorted(infos))
                locks = live_locks(conn)
                busy = {b for b, k in keys.items() if (NS_BOARD, k) in locks}
                pool = {b for b in infos if b not in busy and b not in blocked}
                older = 0
                for ticket in self._live_tickets(conn, locks, state.ticket):
                    if state.ticket is not None and ticket.seq >= state.ticket.seq:
                        break
                    theirs = [universe[b] for b in ticket.boards if b in universe]
                    if choose(theirs, ticket.request, max_failures=self.max_failures) is None:
                        continue  # it waits on a person or a host: it must not block others
                    older += any(ticket.request.matches(i) for i in theirs if request.matches(i))
                    got = choose([infos[b] for b in pool if b in ticket.boards], ticket.request,
                                 max_failures=self.max_failures)
                    if got is not None:
                        pool -= set(got.boards)
                    else:
                        # It waits: keep every free board it could use for it, so a stream of
                        # younger, smaller requests cannot overtake it forever.
                        pool -= {b for b in pool if b in ticket.boards
                                 and ticket.request.matches(infos[b])}
                state.older = older
                choice = choose([infos[b] for b in pool], request,
                                max_failures=self.max_failures)
                if choice is None:
                    if state.ticket is None:
                        self._new_ticket(conn, request, owner, infos, state)
                    return None
                for board in choice.boards:
                    got_lock = conn.execute(
                        "SELECT pg_try_advisory_lock(%s, %s)", (NS_BOARD, keys[board])
                    ).fetchone()[0]
                    if not got_lock:  # pragma: no cover - pg_locks said it was free
                        raise _LockLost(f"board {board} was taken outside the scheduling lock")
                    taken.append(keys[board])
                lease_id = uuid.uuid4().hex
                granted_at = server_now(conn)
                stale = self._take_over_stale(conn, choice.boards, granted_at)
                owner_text = owner.describe()
                for board in choice.boards:
                    conn.execute(
                        "INSERT INTO board_owners (board, lease_id, owner, owner_text, since)"
                        " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (board) DO UPDATE SET"
                        " lease_id = excluded.lease_id, owner = excluded.owner,"
                        " owner_text = excluded.owner_text, since = excluded.since",
                        (board, lease_id, _json(owner.to_dict()), owner_text, granted_at),
                    )
                sql_record_reservation(
                    conn, lease_id, choice.boards, owner.to_dict(), request.describe(),
                    state.requested_at, granted_at, granted_at - state.requested_at,
                )
                if state.ticket is not None:
                    conn.execute("DELETE FROM waiters WHERE seq = %s", (state.ticket.seq,))
                    # A younger request may now be first in line.
                    conn.execute(f"NOTIFY {CHANNEL}")
        except BaseException:
            for key in taken:
                with contextlib.suppress(Exception):
                    conn.execute("SELECT pg_advisory_unlock(%s, %s)", (NS_BOARD, key))
            raise
        if state.ticket is not None:
            self._drop_ticket(state)
        return _Grant(lease_id, choice.boards, {b: keys[b] for b in choice.boards},
                      choice.needs_check | stale, granted_at, state.requested_at)

    def _take_over_stale(self, conn: Any, boards: Sequence[str], granted_at: float
                         ) -> frozenset[str]:
        """Boards whose previous holder's lock vanished without a release: close, mark UNKNOWN."""
        rows = conn.execute(
            "SELECT board, lease_id, owner_text, since FROM board_owners WHERE board = ANY(%s)",
            (list(boards),),
        ).fetchall()
        for board, dead_lease, owner_text, since in rows:
            # Its lock was free, so its connection died before this grant: the record closes
            # here, never later, so history cannot show two holders at once.
            sql_record_release(conn, dead_lease, granted_at, LeaseOutcome.HOLDER_DIED.value)
            sql_set_health(
                conn, board, BoardHealth.UNKNOWN,
                check_due_reason(LeaseOutcome.HOLDER_DIED, holder=owner_text,
                                 since=_iso(float(since)),
                                 note="or lost its database connection"),
            )
            sql_forget_flash(conn, board)
        return frozenset(r[0] for r in rows)

    def _new_ticket(self, conn: Any, request: BoardRequest, owner: Owner,
                    infos: Mapping[str, BoardInfo], state: _WaitState) -> None:
        boards = natural_sorted(infos)
        seq = int(conn.execute(
            "INSERT INTO waiters (request, boards, owner_text, created_at)"
            " VALUES (%s, %s, %s, extract(epoch from clock_timestamp())) RETURNING seq",
            (_json(request.to_json()), boards, owner.describe()),
        ).fetchone()[0])
        # Session-level: survives this transaction, dies with the waiter's connection.
        conn.execute("SELECT pg_advisory_lock(%s, %s)", (NS_TICKET, seq % _TICKET_KEYS))
        state.ticket = _Ticket(seq, request, frozenset(boards), owner.describe())

    def _drop_ticket(self, state: _WaitState) -> None:
        ticket, state.ticket = state.ticket, None
        if ticket is None or state.conn is None or state.conn.closed:
            return
        with contextlib.suppress(Exception):
            state.conn.execute("DELETE FROM waiters WHERE seq = %s", (ticket.seq,))
            state.conn.execute("SELECT pg_advisory_unlock(%s, %s)",
                               (NS_TICKET, ticket.seq % _TICKET_KEYS))

    def _health_hint(self, infos: Mapping[str, BoardInfo], request: BoardRequest) -> str:
        lines = [
            f"{b}: {i.health.value}" for b, i in infos.items()
            if request.matches(i) and i.health in (BoardHealth.QUARANTINED, BoardHealth.BAD)
        ]
        return ("boards out of service: " + "; ".join(lines)
                + "; a person restores one with `hilfarm board restore BOARD`")

    # -- public API ---------------------------------------------------------------------------

    def reserve(
        self, request: BoardRequest, owner: Owner | None = None, timeout: float = 300.0
    ) -> PgLease:
        """Reserve ``request.count`` distinct boards, all or nothing, within ``timeout`` s.

        Raises :class:`UsageError` at once if the farm can never satisfy the request,
        :class:`InfrastructureError` if quarantined boards make it impossible until a person
        acts, :class:`ReservationTimeout` (saying who holds what since when) when time runs out.
        """
        feasible = can_ever_satisfy(self._all_boards(), request)
        if not feasible:
            raise UsageError(
                feasible.reason,
                where=f"reservation of {request.describe()} ({self.where})",
                hint="ask for fewer boards or other chips/features, or start the rig host "
                "(`hilfarm export`) that has them",
            )
        if timeout < 0:
            raise UsageError(
                f"reservation timeout must be >= 0 seconds, not {timeout}",
                where=f"reservation of {request.describe()}",
                hint="use 0 to try once without waiting",
            )
        owner = owner or Owner.current()
        start = time.monotonic()
        deadline = start + timeout
        state = _WaitState()
        grant: _Grant | None = None
        try:
            while grant is None:
                if state.conn is None or state.conn.closed or state.conn.broken:
                    self._reconnect(state, deadline)
                try:
                    grant = self._attempt(request, owner, state)
                    if grant is not None:
                        break
                    now = time.monotonic()
                    if now >= deadline:
                        self._timeout(request, owner, state, now - start)
                    # Sleep until a release is announced or the periodic recheck is due.
                    for _ in state.conn.notifies(
                        timeout=min(deadline - now, self.recheck_interval), stop_after=1
                    ):
                        pass
                    if state.older:
                        time.sleep(self.stagger_step * min(state.older, 8))
                except Exception as exc:
                    if not is_connection_error(exc):
                        raise
                    # The server restarted or the network dropped while we waited: our ticket
                    # died with the connection; queue again on a new one.
                    self._close(state.conn)
                    state.conn = None
                    state.ticket = None
        except BaseException:
            self._drop_ticket(state)
            self._close(state.conn)
            raise
        return PgLease(self, state.conn, grant, owner, request)

    def _reconnect(self, state: _WaitState, deadline: float) -> None:
        delay = 0.05
        while True:
            try:
                state.conn = self._lease_connection()
                if not state.requested_at:
                    state.requested_at = server_now(state.conn)
                return
            except InfrastructureError:
                if time.monotonic() + delay >= deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _timeout(self, request: BoardRequest, owner: Owner, state: _WaitState,
                 waited: float) -> None:
        older: list[_Ticket] = []
        with contextlib.suppress(Exception):
            with state.conn.transaction():
                state.conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (NS_SCHED,))
                locks = live_locks(state.conn)
                older = [t for t in self._live_tickets(state.conn, locks, state.ticket)
                         if state.ticket is not None and t.seq < state.ticket.seq]
        self._drop_ticket(state)
        lines = []
        for entry in self.host_status():
            status = entry.status
            if self._static is not None and status.board not in self._static:
                continue
            info = BoardInfo(status.board, status.chip,
                             self._features_of(status.board), status.health.health)
            if not request.matches(info):
                continue
            if status.holder is not None:
                lines.append(f"{status.board}: held by {status.holder.owner.describe()}"
                             f" since {status.holder.since}")
            elif status.hold is not None:
                lines.append(f"{status.board}: held at the bench by {status.hold.person} since "
                             f"{_iso(status.hold.since)} (reason: {status.hold.reason})")
            elif not entry.online:
                lines.append(f"{status.board}: its rig host {entry.host} is offline")
            elif status.health.health is BoardHealth.QUARANTINED:
                lines.append(f"{status.board}: QUARANTINED ({status.health.reason})")
            else:
                lines.append(f"{status.board}: free now ({status.health.health.value})")
        for ticket in older:
            lines.append(
                f"queued ahead (#{ticket.seq}): {ticket.request.describe()} for {ticket.owner}"
            )
        lease_id = uuid.uuid4().hex
        with contextlib.suppress(Exception):  # the report matters more than the record
            now = self.store.now()
            self.store.record_reservation(lease_id, (), owner.to_dict(), request.describe(),
                                          state.requested_at or now, None, waited)
            self.store.record_release(lease_id, now, LeaseOutcome.TIMEOUT.value)
        raise ReservationTimeout(
            f"could not reserve {request.describe()} within {waited:.1f} s (waited "
            f"{waited:.1f} s for {owner.describe()}):\n    " + "\n    ".join(lines),
            where=self.where,
            hint="raise the reservation timeout, or see who holds boards with `hilfarm status`",
        )

    def _features_of(self, board: str) -> frozenset[str]:
        if self._static is not None and board in self._static:
            return self._static[board].features
        record = self.store.registered_boards().get(board)
        return record.features if record else frozenset()

    # -- lease end ------------------------------------------------------------------------------

    @staticmethod
    def _check_locks(conn: Any, grant: _Grant) -> None:
        """Raise _LockLost unless ``conn`` is alive and still holds every board lock."""
        try:
            held = int(conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND pid = pg_backend_pid() AND objsubid = 2 AND classid::bigint = %s"
                " AND objid::bigint = ANY(%s)",
                (NS_BOARD, list(grant.keys.values())),
            ).fetchone()[0])
        except Exception as exc:
            if is_connection_error(exc):
                raise _LockLost(f"its database connection dropped ({str(exc).strip()})") from exc
            raise
        if held != len(grant.keys):
            raise _LockLost(f"it holds {held} of its {len(grant.keys)} board locks")

    def _finish(self, lease: PgLease, per_board: Mapping[str, LeaseOutcome],
                note: str = "") -> None:
        conn = lease._conn
        overall = overall_outcome(per_board)
        try:
            try:
                with conn.transaction():
                    self._check_locks(conn, lease._grant)
                    now = server_now(conn)
                    closed = sql_record_release(conn, lease.id, now, overall.value,
                                                {b: o.value for b, o in per_board.items()})
                    if not closed:
                        raise _LockLost("its reservation record was already closed by another "
                                        "holder's grant")
                    for board, outcome in per_board.items():
                        if outcome in OUTCOMES_NEEDING_CHECK:
                            sql_set_health(
                                conn, board, BoardHealth.UNKNOWN,
                                check_due_reason(outcome, holder=lease.owner.describe(),
                                                 since=_iso(lease._grant.granted_at), note=note),
                            )
                            sql_forget_flash(conn, board)
                    conn.execute("DELETE FROM board_owners WHERE lease_id = %s", (lease.id,))
                    conn.execute(f"NOTIFY {CHANNEL}")
                conn.execute("SELECT pg_advisory_unlock_all()")
                recycled, conn = conn, None
                self._recycle(recycled)
            except Exception as exc:
                if isinstance(exc, _LockLost):
                    raise
                if is_connection_error(exc):
                    raise _LockLost(
                        f"its database connection dropped ({str(exc).strip()})"
                    ) from exc
                raise
        finally:
            # Closing the connection frees every lock it still has, whatever happened above.
            self._close(conn)

    def _settle_lost(self, lease: PgLease) -> None:
        """Close a lost lease's record now if nobody took its boards since (best effort).

        If no other connection holds the boards, no grant happened since the loss (a grant
        would have closed the record), so closing the record at the current time cannot overlap
        a successor.
        """
        self._close(lease._conn)
        with contextlib.suppress(Exception):
            conn = connect(self.url, purpose="settle lost lease")
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (NS_SCHED,))
                    locks = live_locks(conn)
                    if any((NS_BOARD, k) in locks for k in lease._grant.keys.values()):
                        return  # a successor holds them; its grant closed our record
                    now = server_now(conn)
                    if sql_record_release(conn, lease.id, now, LeaseOutcome.HOLDER_DIED.value):
                        for board in lease.boards:
                            sql_set_health(conn, board, BoardHealth.UNKNOWN, check_due_reason(
                                LeaseOutcome.HOLDER_DIED, holder=lease.owner.describe(),
                                since=_iso(lease.granted_at),
                                note=f"lease {lease.id[:8]} lost its database connection"))
                            sql_forget_flash(conn, board)
                    conn.execute("DELETE FROM board_owners WHERE lease_id = %s", (lease.id,))
            finally:
                conn.close()

    def _lost_error(self, lease: PgLease, why: str) -> InfrastructureError:
        return InfrastructureError(
            f"lease {lease.id[:8]} on {', '.join(lease.boards)} lost its board locks: {why}; "
            "another client may have been given these boards since",
            where=self.where,
            hint="treat this test's results on these boards as void and rerun it; the boards "
            "are marked UNKNOWN and get a health check before their next use",
        )

    # -- holds and status ---------------------------------------------------------------------

    def _known(self, board: str, action: str) -> None:
        known = ({b.id for b in self._all_boards()})
        if board not in known:
            raise UsageError(
                f"no board named {board!r} in this farm",
                where=f"{action} {board} ({self.where})",
                hint=f"boards: {', '.join(natural_sorted(known)) or 'none registered'}",
            )

    def hold(self, board: str, reason: str, person: str) -> HoldResult:
        """A person holds ``board`` on every host's view; reservations skip it until unhold."""
        self._known(board, "hold")
        if not reason.strip():
            raise UsageError(
                "a manual hold needs a reason", where=f"hold {board}",
                hint='say why, e.g. --reason "probing UART with a scope"',
            )

        def op(conn: Any) -> HoldResult:
            # Under the scheduling lock, so no decision made before the hold still grabs it.
            conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (NS_SCHED,))
            record = sql_add_hold(conn, board, person, reason)
            return HoldResult(record, self._holders(conn, [board]).get(board))

        return self.store._run(op, transaction=True)

    def unhold(self, board: str) -> HoldRecord | None:
        self._known(board, "unhold")

        def op(conn: Any) -> HoldRecord | None:
            row = conn.execute(
                "DELETE FROM holds WHERE board = %s RETURNING person, reason, since", (board,)
            ).fetchone()
            conn.execute(f"NOTIFY {CHANNEL}")  # waiters may now take it
            return None if row is None else HoldRecord(board, row[0], row[1], float(row[2]))

        return self.store._run(op, transaction=True)

    def _holders(self, conn: Any, boards: Sequence[str]) -> dict[str, OwnerRecord]:
        keys = self._keys_for(conn, boards)
        locks = live_locks(conn)
        return {b: r for b, (r, busy) in self._owner_records(conn, keys, locks).items() if busy}

    @staticmethod
    def _owner_records(conn: Any, keys: Mapping[str, int],
                       locks: Mapping[tuple[int, int], int]
                       ) -> dict[str, tuple[OwnerRecord, bool]]:
        rows = conn.execute(
            "SELECT board, lease_id, owner, since FROM board_owners WHERE board = ANY(%s)",
            (list(keys),),
        ).fetchall()
        found: dict[str, tuple[OwnerRecord, bool]] = {}
        fields = Owner.__dataclass_fields__
        for board, lease_id, owner, since in rows:
            try:
                who = Owner(**{k: v for k, v in dict(owner).items() if k in fields})
            except TypeError:
                who = Owner(0, "?", "?", reason="unreadable owner record")
            record = OwnerRecord(board, lease_id, _iso(float(since)), who)
            found[board] = (record, (NS_BOARD, keys[board]) in locks)
        return found

    def host_status(self) -> list[RemoteBoardStatus]:
        """Every board with its health, live holder, hold, stale record, host and liveness."""

        def op(conn: Any) -> list[RemoteBoardStatus]:
            infos, offline, host_of = self._candidates(conn)
            order = natural_sorted(infos)
            keys = self._keys_for(conn, order)
            locks = live_locks(conn)
            health = sql_all_health(conn, order)
            holds = sql_holds(conn)
            owners = self._owner_records(conn, keys, locks)
            registered = sql_registered_boards(conn)
            result = []
            for board in order:
                record, busy = owners.get(board, (None, False))
                status = BoardStatus(
                    board=board, chip=infos[board].chip, health=health[board],
                    holder=record if busy else None, hold=holds.get(board),
                    stale_owner=None if busy else record,
                )
                port = registered[board].port_url if board in registered else ""
                result.append(RemoteBoardStatus(status, host_of.get(board),
                                                board not in offline, port))
            return result

        return self.store._run(op, transaction=True)

    def status(self) -> list[BoardStatus]:
        """Every board: health, live holder, manual hold, dead holder's leftover record."""
        return [entry.status for entry in self.host_status()]

    def hosts(self) -> dict[str, HostRecord]:
        return self.store.hosts()


def _json(value: Any) -> Any:
    from psycopg.types.json import Jsonb

    return Jsonb(value)
