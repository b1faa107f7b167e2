"""The multi-host reservation backend: PostgreSQL advisory locks, owners and tickets in tables.

Job: what is particular to a farm of several hosts: how a board lock is taken (every lease has a
dedicated database connection holding one session-level advisory lock per board,
``pg_try_advisory_lock(NS_BOARD, key)``: the server releases them the moment that connection dies,
so nothing is ever reclaimed by age), where owner records and tickets live (``board_owners`` and
``waiters``), and how a waiter wakes (LISTEN/NOTIFY). The policy (fairness, backfill, priorities,
timeouts, holds) is :mod:`.core` and :mod:`.scheduler`, the same as on one host. Boards of a rig
host that is offline (no liveness lock, stale heartbeat or stopped) are never allocated.

A waiting request has a row in ``waiters`` and proves it is alive with a session lock on its
ticket. After a server restart every such lock is gone; a ticket its waiter registered before the
restart still counts for :data:`RESTART_GRACE` seconds, and the waiter re-registers it on
reconnecting with its original sequence number, so it keeps its place in the queue.

A lease that loses its connection has lost its locks, and another client may already hold its
boards. It cannot know when that happened, so it never writes "released at now" over a successor:
its next operation (:meth:`PgLease.release` or :meth:`PgLease.verify`) raises
:class:`InfrastructureError`; the successor's grant closes the lost lease's record at the grant time
(outcome ``holder_died``) and marks the boards UNKNOWN. History therefore never shows a board held
twice. All times are the database server's clock.

Wake-ups: a release, a grant leaving the queue and an unhold send NOTIFY; only a waiter LISTENs
(ticket to grant: a NOTIFY wakes every listener). A holder that died sends nothing: the next
release anywhere, or the long :data:`SAFETY_RECHECK`, finds it.

Must not: reclaim a lock by age; block on a board lock (boards are taken with try-locks, all at
once); talk to hardware; import pytest.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pytest_hilfarm.errors import InfrastructureError, UsageError
from pytest_hilfarm.reservation.allocate import (
    BoardDescription,
    BoardInfo,
    BoardRequest,
    natural_sorted,
    rank,
)
from pytest_hilfarm.store import BoardHealth, HoldRecord, LeaseOutcome, overall_outcome
from pytest_hilfarm.store.postgresql import (
    HostRecord,
    PgFarmStore,
    connect,
    is_connection_error,
    jsonb,
    live_locks,
    redact,
    sql_add_hold,
    sql_all_health,
    sql_board_keys,
    sql_forget_flash,
    sql_record_release,
    sql_registered_boards,
    sql_set_health,
)
from pytest_hilfarm.store.postgresql_schema import NS_BOARD, NS_HOST, NS_SCHED, NS_TICKET

from .core import (
    BoardView,
    Lease,
    ReserverCore,
    Waiting,
    board_catalogue,
    dead_holder_reason,
    lease_end_reasons,
    utc_iso,
)
from .pgsql import CLOCKS_SQL, FARM_DIRECT_SQL, FARM_SQL, GRANT_SQL, RELEASE_SQL
from .protocol import UNREADABLE, BoardStatus, HoldResult, Owner, OwnerRecord
from .scheduler import Ask, Snapshot, decide

# Without a notification a waiter decides again after this long: it catches holders whose
# connection died (the server frees their locks but nobody sends NOTIFY) and hosts coming back.
SAFETY_RECHECK = 1.0
# A ticket registered before the server (re)started keeps its place this long without its lock,
# so that its waiter can reconnect and take the lock again.
RESTART_GRACE = 30.0
CHANNEL = "hilfarm_release"
_TICKET_KEYS = 2**31 - 1  # ticket sequence -> int4 lock key
IDLE_CONNECTIONS = 4  # released lease connections kept per reserver for reuse
# A decision that lost a race for a board it chose (to a direct grant) is made again at once, at
# most this many times, before the waiter sleeps until the next event.
_RACES = 3
_RETRY = object()
@dataclass(frozen=True)
class RemoteBoardStatus:
    """A board as ``hilfarm status`` shows it on a multi-host farm: who, health, which host."""

    status: BoardStatus
    host: str | None  # None: a board of the rack file no rig host registered
    online: bool
    port_url: str


@dataclass(frozen=True)
class _Grant:
    lease_id: str
    boards: tuple[str, ...]
    keys: dict[str, int]
    needs_check: frozenset[str]
    granted_at: float
    requested_at: float


@dataclass
class _PgWait(Waiting):
    conn: Any = None
    deadline: float = 0.0
    recheck: bool = False  # decide again before sleeping: we just started listening


@dataclass(frozen=True)
class _Health:
    """Boards as one health reading made them, and what was worked out from them."""

    rows: tuple[tuple[Any, ...], ...]  # the health rows they were built from
    infos: dict[str, BoardInfo]
    ranked: dict[tuple[BoardRequest, frozenset[str]], list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Farm:
    """One transaction's view of the farm (the inputs of a decision)."""

    now: float
    started: float  # when the server last started
    infos: dict[str, BoardInfo]
    offline: set[str]
    holds: dict[str, HoldRecord]
    keys: dict[str, int]
    locks: dict[tuple[int, int], int]
    owners: dict[str, tuple[str, str, float, float | None]]  # lease, owner text, since, end
    waiters: list[Any]  # rows of the waiters table (see _live_tickets)
    host_of: dict[str, str]  # board -> the rig host that registered it

    def locked(self, board: str) -> bool:
        return (NS_BOARD, self.keys[board]) in self.locks


class _LockLost(Exception):
    """Internal: a lease found it no longer holds what it was granted."""


class PgLease(Lease):
    """A lease whose locks live on its database connection (see the module docstring).

    Same contract as :class:`~pytest_hilfarm.reservation.Lease`, plus :meth:`verify` and
    ``lost``.
    """

    _lost = False

    @property
    def lost(self) -> bool:
        """True once the lease found its locks gone (its boards may be someone else's)."""
        return self._lost

    def _state_word(self) -> str:
        return "lost" if self._lost else super()._state_word()

    def verify(self) -> None:
        """Raise :class:`InfrastructureError` unless this lease still holds all its boards."""
        reserver = self._reserver
        assert isinstance(reserver, PgReserver)
        with self._mutex:
            if self._released:
                raise UsageError(
                    f"lease {self.id[:8]} was already released",
                    where=f"lease {self.id[:8]} ({', '.join(self.boards)})",
                    hint="reserve the boards again",
                )
            conn, grant = self.handle
            try:
                reserver._check_locks(conn, grant)
            except _LockLost as exc:
                self._released = True
                raise reserver._lost(self, str(exc)) from None


class PgReserver(ReserverCore):
    """Reservation backend on PostgreSQL (see the module docstring).

    ``boards``: the rack's boards (allocation is limited to them; a board no rig host registered
    counts as always online, e.g. one behind a ser2net the rack file names). None: every board
    that a rig host registered.
    """

    missing_hint = ("ask for fewer boards or other chips/features, or start the rig host "
                    "(`hilfarm export`) that has them")

    def __init__(self, url: str, store: PgFarmStore,
                 boards: Sequence[BoardDescription] | None = None, **options: Any) -> None:
        """``options``: :class:`~.core.ReserverCore`'s (policy, max_failures, timings)."""
        options.setdefault("safety_recheck", SAFETY_RECHECK)
        super().__init__(store, **options)
        self.url = url
        self._static = None if boards is None else board_catalogue(boards)
        self._keys: dict[str, int] = {}
        self._keys_lock = threading.Lock()
        self._idle: list[Any] = []  # released lease connections, reused by this process only
        self._idle_pid = os.getpid()
        self._idle_lock = threading.Lock()
        # The boards of the rack file, as the last health reading made them: health changes
        # rarely, and rebuilding and ranking every board is most of a direct grant's client CPU.
        self._health: _Health | None = None

    @property
    def where(self) -> str:
        return f"farm database {redact(self.url)}"

    def _now(self) -> float:
        return self.store.now()

    # -- the universe of boards ---------------------------------------------------------------

    def _catalogue(self) -> list[BoardInfo]:
        if self._static is not None:
            return list(self._static.values())
        registered = self.store.registered_boards()
        return [BoardInfo(b, r.chip, r.features) for b, r in registered.items()]

    def _board_ids(self) -> list[str]:
        return natural_sorted(b.id for b in self._catalogue())

    def _keys_for(self, conn: Any, boards: Sequence[str]) -> dict[str, int]:
        with self._keys_lock:
            missing = [b for b in boards if b not in self._keys]
        if missing:
            found = sql_board_keys(conn, missing)
            with self._keys_lock:
                self._keys.update(found)
        with self._keys_lock:
            return {b: self._keys[b] for b in boards}

    def _farm(self, conn: Any, *, locks: bool = True) -> _Farm:
        """Everything one decision reads, in one statement (one round trip, one snapshot)."""
        row = conn.execute(FARM_SQL if locks else FARM_DIRECT_SQL, (NS_HOST,)).fetchone()
        now, started, boards, hosts, health, owners, holds, lock_rows, waiters = row
        online = {str(h): bool(up) for h, up in hosts}
        if self._static is None:
            base = {str(b): BoardInfo(str(b), str(chip), frozenset(features or ()))
                    for b, _host, chip, features in boards}
        else:
            base = dict(self._static)
        rows = tuple(tuple(r) for r in health)
        known = self._health
        if self._static is not None and known is not None and known.rows == rows:
            infos = known.infos
        else:
            states = {str(b): (BoardHealth(h), int(f)) for b, h, f in health}
            infos = {b: BoardInfo(i.id, i.chip, i.features,
                                  *states.get(b, (BoardHealth.UNKNOWN, 0)))
                     for b, i in base.items()}
            if self._static is not None:
                self._health = _Health(rows, infos)
        host_of = {str(b): str(host) for b, host, _chip, _features in boards
                   if host is not None and b in infos}
        offline = {b for b, host in host_of.items() if not online.get(host, False)}
        return _Farm(
            float(now), float(started), infos, offline,
            {str(b): HoldRecord(str(b), str(p), str(r), float(t)) for b, p, r, t in holds},
            self._keys_for(conn, natural_sorted(infos)),
            {(int(c), int(o)): 0 for c, o in lock_rows},
            {str(b): (str(lease), str(text), float(since), None if end is None else float(end))
             for b, lease, text, since, end in owners},
            waiters, host_of,
        )

    def _ranked(self, infos: dict[str, BoardInfo], ask: Ask) -> list[str]:
        """Every board ``ask`` may take by health, best first (:func:`rank`).

        Ranking is per board (health, surplus features, id), so the boards free now are this
        list with the others left out; it is kept with the health reading it came from.
        """
        known = self._health
        key = (ask.request, ask.boards)
        if known is not None and known.infos is infos and key in known.ranked:
            return known.ranked[key]
        ranked = [i.id for i in rank((infos[b] for b in infos if b in ask.boards), ask.request,
                                     max_failures=self.max_failures)]
        if known is not None and known.infos is infos:
            known.ranked[key] = ranked
        return ranked

    def _snapshot(self, farm: _Farm) -> Snapshot:
        free: set[str] = set()
        ends: dict[str, float] = {}
        blocked = set(farm.holds) | farm.offline
        for board in farm.infos:
            if farm.locked(board):
                owner = farm.owners.get(board)
                # No expected end known (an older writer): count it as due, strict FIFO.
                end = owner[3] if owner is not None else None
                ends[board] = end if end is not None else farm.now
            elif board not in blocked:
                free.add(board)
        return Snapshot(farm.now, farm.infos, frozenset(free), ends, frozenset(blocked))

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
        # No LISTEN here: only a waiter listens (see _register). Every NOTIFY wakes every
        # listening backend and client, and most connections never wait.
        return connect(self.url, purpose="lease")

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

    def _connected(self, state: _PgWait) -> Any:
        """The waiter's connection, (re)opened if needed; a ticket it had is registered again."""
        if state.conn is not None and not state.conn.closed and not state.conn.broken:
            return state.conn
        self._close(state.conn)
        state.conn = None
        delay = 0.05
        while True:
            try:
                conn = self._lease_connection()
                break
            except InfrastructureError:
                if time.monotonic() + delay >= state.deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        try:
            if state.ticket is not None:
                self._register(conn, state.ticket)  # same sequence number: same place
                state.recheck = True
        except BaseException:
            self._close(conn)
            raise
        state.conn = conn
        return conn

    # -- tickets ----------------------------------------------------------------------------------

    @staticmethod
    def _register(conn: Any, ticket: Ask) -> None:
        """Write (or write again, after a restart) a ticket and take its liveness lock."""
        conn.execute(
            "INSERT INTO waiters (seq, request, boards, owner_text, created_at, priority, hold,"
            " registered_at) VALUES (%s, %s, %s, %s, %s, %s, %s,"
            " extract(epoch from clock_timestamp())) ON CONFLICT (seq) DO UPDATE"
            " SET registered_at = excluded.registered_at",
            (ticket.seq, jsonb(ticket.request.to_json()), natural_sorted(ticket.boards),
             ticket.owner, ticket.since, ticket.priority, ticket.hold),
        )
        # Session-level: survives the transaction, dies with the waiter's connection.
        conn.execute("SELECT pg_advisory_lock(%s, %s)", (NS_TICKET, ticket.seq % _TICKET_KEYS))
        # From the commit on, releases wake us; one that came between our read of the farm and
        # the commit is found by the decision the caller makes at once (_PgWait.recheck).
        conn.execute(f"LISTEN {CHANNEL}")

    def _live_tickets(self, conn: Any, farm: _Farm, mine: Ask | None) -> list[Ask]:
        rows = sorted(farm.waiters, key=lambda r: int(r[0]))
        tickets: list[Ask] = []
        dead: list[int] = []
        orphan_until = farm.started + RESTART_GRACE
        for seq, request, boards, owner_text, since, priority, hold, registered in rows:
            seq = int(seq)
            alive = (NS_TICKET, seq % _TICKET_KEYS) in farm.locks
            # Registered before the server restarted: its waiter may be reconnecting.
            orphaned = registered is not None and float(registered) < farm.started
            if not alive and not (orphaned and farm.now < orphan_until):
                if mine is None or seq != mine.seq:
                    dead.append(seq)  # its waiter's connection is gone
                    continue
            try:
                tickets.append(Ask(seq, BoardRequest.from_json(request), frozenset(boards),
                                   int(priority or 0), float(since),
                                   None if hold is None else float(hold), str(owner_text)))
            except (KeyError, TypeError, ValueError, UsageError):
                continue  # written by another version: not ours to interpret
        if dead:
            conn.execute("DELETE FROM waiters WHERE seq = ANY(%s)", (dead,))
        return tickets

    def _new_ticket(self, conn: Any, ask: Ask, state: _PgWait) -> None:
        seq = int(conn.execute("SELECT nextval(pg_get_serial_sequence('waiters', 'seq'))"
                               ).fetchone()[0])
        ticket = Ask(seq, ask.request, ask.boards, ask.priority, ask.since, ask.hold, ask.owner)
        self._register(conn, ticket)
        state.ticket = ticket
        state.recheck = True

    def _drop_ticket(self, state: _PgWait) -> None:
        ticket, state.ticket = state.ticket, None
        if ticket is None or state.conn is None or state.conn.closed:
            return
        with contextlib.suppress(Exception):
            state.conn.execute("DELETE FROM waiters WHERE seq = %s", (ticket.seq,))
            state.conn.execute("SELECT pg_advisory_unlock(%s, %s)",
                               (NS_TICKET, ticket.seq % _TICKET_KEYS))

    # -- one scheduling decision ----------------------------------------------------------------

    def _open_wait(self, deadline: float) -> _PgWait:
        state = _PgWait(deadline=deadline)
        self._connected(state)
        return state

    def _attempt(self, ask: Ask, owner: Owner, state: Waiting,
                 as_person: str | None) -> _Grant | None:
        assert isinstance(state, _PgWait)
        try:
            conn = self._connected(state)
            if state.ticket is None:
                grant = self._decide(conn, ask, owner, state, as_person, direct=True)
                if isinstance(grant, _Grant):
                    return grant
            for _ in range(_RACES):
                grant = self._decide(conn, ask, owner, state, as_person, direct=False)
                if grant is not _RETRY:
                    return grant if isinstance(grant, _Grant) else None
            return None
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            # The server restarted or the network dropped: our ticket lock died with the
            # connection; the next attempt reconnects and registers the ticket again.
            self._close(state.conn)
            state.conn = None
            return None

    def _decide(self, conn: Any, ask: Ask, owner: Owner, state: _PgWait,
                as_person: str | None, *, direct: bool) -> _Grant | object | None:
        """One decision in one transaction.

        ``direct``: nobody waits, so no scheduling lock: the best free boards are try-locked and
        a lost race just means "decide again under the lock". Otherwise the decision runs under
        the transaction-level scheduling lock and replays the queue. Returns :data:`_RETRY` when
        a board it chose was taken in the meantime (by a direct grant, or a bench hold).
        """
        taken: list[int] = []
        try:
            # A direct grant needs no transaction: each statement is atomic, and the grant's
            # records are one statement. (A board left by a dead holder goes the queued way,
            # whose transaction closes the dead lease together with the grant.)
            with contextlib.nullcontext() if direct else conn.transaction():
                if not direct:
                    conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (NS_SCHED,))
                farm = self._farm(conn, locks=not direct)
                if not state.requested_at:
                    # The request's time is the server's clock at its first read of the farm
                    # (the records' one clock), not a round trip of its own.
                    state.requested_at = farm.now
                if ask.since != state.requested_at:
                    ask = replace(ask, since=state.requested_at)
                self._unusable(farm.infos, ask.request)
                mine = {b for b, h in farm.holds.items() if as_person and h.person == as_person}
                if direct:
                    if farm.waiters:
                        return None  # someone waits: decide under the lock, in queue order
                    me = ask
                    # The best boards without an owner, skipping any taken since the snapshot
                    # (a board a dead holder left has an owner row: the queued way takes it).
                    candidates = tuple(
                        b for b in self._ranked(farm.infos, ask)
                        if b not in farm.owners and b not in farm.offline
                        and (b not in farm.holds or b in mine))
                else:
                    snap = self._snapshot(farm)
                    free_mine = {b for b in mine if not farm.locked(b) and b not in farm.offline}
                    me = state.ticket or ask
                    tickets = self._live_tickets(conn, farm, state.ticket)
                    decision = decide(snap, tickets, me, self.policy, free_mine)
                    state.ahead = decision.ahead
                    if decision.choice is None:
                        if state.ticket is None:
                            self._new_ticket(conn, ask, state)
                        return None
                    candidates = decision.choice.boards
                return self._grant(conn, farm, me, owner, state, candidates, mine, taken)
        except BaseException as exc:
            for key in taken:
                with contextlib.suppress(Exception):
                    conn.execute("SELECT pg_advisory_unlock(%s, %s)", (NS_BOARD, key))
            if isinstance(exc, _LockLost):
                return _RETRY
            raise

    def _grant(self, conn: Any, farm: _Farm, me: Ask, owner: Owner, state: _PgWait,
               candidates: tuple[str, ...], mine: set[str], taken: list[int]) -> _Grant:
        """Lock the first ``me.request.count`` of ``candidates`` that are free and record the
        grant, in one statement (:data:`GRANT_SQL`).

        Raises :class:`_LockLost` (the caller decides again) if too few were free or a bench
        hold came first; the keys of the boards it did lock are added to ``taken`` either way,
        so the caller unlocks them on any failure.
        """
        lease_id = uuid.uuid4().hex
        hold = self.policy.default_hold if me.hold is None else me.hold
        at, ok, boards = conn.execute(GRANT_SQL, {
            "keys": [farm.keys[b] for b in candidates], "boards": list(candidates),
            "ns": NS_BOARD, "count": me.request.count,
            "lease": lease_id, "owner": jsonb(owner.to_dict()), "request": me.request.describe(),
            "requested": state.requested_at, "mine": sorted(mine),
            "owner_text": owner.describe(), "hold": hold,
        }).fetchone()
        boards = tuple(str(b) for b in boards)
        taken.extend(farm.keys[b] for b in boards)
        if not ok:
            raise _LockLost("taken or held at the bench")  # since our snapshot: decide again
        granted_at = float(at)
        stale = [b for b in boards if b in farm.owners]
        if stale:
            self._take_over_stale(conn, farm, stale, granted_at)
        if state.ticket is not None:
            # One round trip: leave the queue, wake the others (a younger request may now be
            # first in line) and stop listening (a holder needs no wake-ups).
            conn.execute(f"DELETE FROM waiters WHERE seq = {int(state.ticket.seq)};"
                         f" NOTIFY {CHANNEL}; UNLISTEN {CHANNEL}")
        taken.clear()  # the lease's locks now
        needs = frozenset(b for b in boards if farm.infos[b].health is not BoardHealth.GOOD)
        return _Grant(lease_id, boards, {b: farm.keys[b] for b in boards},
                      needs | frozenset(stale), granted_at, state.requested_at)

    def _take_over_stale(self, conn: Any, farm: _Farm, stale: Sequence[str],
                         granted_at: float) -> None:
        """Boards whose previous holder's lock vanished without a release: close, mark UNKNOWN."""
        for board in stale:
            dead_lease, owner_text, since, _ = farm.owners[board]
            # Its lock was free, so its connection died before this grant: the record closes
            # here, never later, so history cannot show two holders at once.
            sql_record_release(conn, dead_lease, granted_at, LeaseOutcome.HOLDER_DIED.value)
            sql_set_health(conn, board, BoardHealth.UNKNOWN,
                           dead_holder_reason(owner_text, utc_iso(since),
                                              note="or lost its database connection"))
            sql_forget_flash(conn, board)

    def _sleep(self, state: Waiting, seconds: float) -> None:
        assert isinstance(state, _PgWait)
        conn = state.conn
        if conn is None:  # reconnecting: the next attempt opens a new connection
            time.sleep(min(seconds, 0.05))
            return
        if state.recheck or state.ticket is None:
            # Just started listening, or lost races without queueing (not listening): decide
            # again at once.
            state.recheck = False
            return
        try:
            for _ in conn.notifies(timeout=max(0.0, seconds), stop_after=1):
                pass
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            self._close(conn)
            state.conn = None

    def _close_wait(self, state: Waiting) -> None:
        assert isinstance(state, _PgWait)
        self._drop_ticket(state)
        self._close(state.conn)
        state.conn = None

    # -- the lease ------------------------------------------------------------------------------

    def _lease(self, ask: Ask, owner: Owner, state: Waiting, grant: Any,
               waited: float) -> Lease:
        assert isinstance(state, _PgWait) and isinstance(grant, _Grant)
        conn, state.conn = state.conn, None  # the lease's locks live on this connection now
        return PgLease(self, grant.lease_id, grant.boards, grant.needs_check, owner,
                       ask.request, grant.granted_at, grant.granted_at - grant.requested_at,
                       (conn, grant))

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

    def _finish(self, lease: Lease, per_board: Mapping[str, LeaseOutcome], note: str) -> None:
        conn, grant = lease.handle
        checks = lease_end_reasons(lease.owner, grant.granted_at, per_board, note)
        try:
            try:
                # The records in one statement; health changes (rare) in the same transaction,
                # so a board that needs a check is never left GOOD.
                with conn.transaction() if checks else contextlib.nullcontext():
                    closed, _ = conn.execute(RELEASE_SQL, {
                        "lease": lease.id, "outcome": overall_outcome(per_board).value,
                        "per_board": jsonb({b: o.value for b, o in per_board.items()}),
                    }).fetchone()
                    if not closed:
                        raise _LockLost("its reservation record was already closed by another "
                                        "holder's grant")
                    for board, reason in checks.items():
                        sql_set_health(conn, board, BoardHealth.UNKNOWN, reason)
                        sql_forget_flash(conn, board)
                # Unlock, then wake the waiters: woken first, they would find the boards locked.
                conn.execute(f"SELECT pg_advisory_unlock_all(), pg_notify('{CHANNEL}', '')")
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
        except _LockLost as exc:
            assert isinstance(lease, PgLease)
            raise self._lost(lease, str(exc)) from None
        finally:
            # Closing the connection frees every lock it still has, whatever happened above.
            self._close(conn)

    def _lost(self, lease: PgLease, why: str) -> InfrastructureError:
        """Mark ``lease`` lost, settle its record if nobody took its boards, say what happened."""
        lease._lost = True
        self._settle_lost(lease)
        return InfrastructureError(
            f"lease {lease.id[:8]} on {', '.join(lease.boards)} lost its board locks: {why}; "
            "another client may have been given these boards since",
            where=self.where,
            hint="treat this test's results on these boards as void and rerun it; the boards "
            "are marked UNKNOWN and get a health check before their next use",
        )

    def _settle_lost(self, lease: PgLease) -> None:
        """Close a lost lease's record now if nobody took its boards since (best effort).

        If no other connection holds the boards, no grant happened since the loss (a grant
        would have closed the record), so closing the record at the current time cannot overlap
        a successor.
        """
        old, grant = lease.handle
        self._close(old)
        with contextlib.suppress(Exception):
            conn = connect(self.url, purpose="settle lost lease")
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (NS_SCHED,))
                    locks = live_locks(conn)
                    if any((NS_BOARD, k) in locks for k in grant.keys.values()):
                        return  # a successor holds them; its grant closed our record
                    now = float(conn.execute(CLOCKS_SQL).fetchone()[0])
                    if sql_record_release(conn, lease.id, now, LeaseOutcome.HOLDER_DIED.value):
                        for board in lease.boards:
                            sql_set_health(conn, board, BoardHealth.UNKNOWN, dead_holder_reason(
                                lease.owner.describe(), utc_iso(lease.granted_at),
                                note=f"lease {lease.id[:8]} lost its database connection"))
                            sql_forget_flash(conn, board)
                    conn.execute("DELETE FROM board_owners WHERE lease_id = %s", (lease.id,))
            finally:
                conn.close()

    # -- holds, status, queue -------------------------------------------------------------------

    def _add_hold(self, board: str, person: str, reason: str) -> HoldResult:
        def op(conn: Any) -> HoldResult:
            # Under the scheduling lock, so no queued decision made before the hold grabs it;
            # a direct grant reads the holds after locking (see _decide).
            conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (NS_SCHED,))
            record = sql_add_hold(conn, board, person, reason)
            return HoldResult(record, self._holders(conn, [board]).get(board))

        return self.store._run(op, transaction=True)

    def _remove_hold(self, board: str) -> HoldRecord | None:
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
            "SELECT board, lease_id, owner, since, expected_end FROM board_owners"
            " WHERE board = ANY(%s)", (list(keys),),
        ).fetchall()
        found: dict[str, tuple[OwnerRecord, bool]] = {}
        for board, lease_id, owner, since, end in rows:
            try:
                who = Owner.from_dict(dict(owner))
            except TypeError:
                who = UNREADABLE
            record = OwnerRecord(board, lease_id, utc_iso(float(since)), who,
                                 None if end is None else float(end))
            found[board] = (record, (NS_BOARD, keys[board]) in locks)
        return found

    def host_status(self) -> list[RemoteBoardStatus]:
        """Every board with its health, live holder, hold, stale record, host and liveness."""

        def op(conn: Any) -> list[RemoteBoardStatus]:
            farm = self._farm(conn)
            order = natural_sorted(farm.infos)
            health = sql_all_health(conn, order)
            owners = self._owner_records(conn, farm.keys, farm.locks)
            registered = sql_registered_boards(conn)
            result = []
            for board in order:
                record, busy = owners.get(board, (None, False))
                status = BoardStatus(
                    board=board, chip=farm.infos[board].chip, health=health[board],
                    holder=record if busy else None, hold=farm.holds.get(board),
                    stale_owner=None if busy else record,
                )
                port = registered[board].port_url if board in registered else ""
                result.append(RemoteBoardStatus(status, farm.host_of.get(board),
                                                board not in farm.offline, port))
            return result

        return self.store._run(op, transaction=True)

    def status(self) -> list[BoardStatus]:
        """Every board: health, live holder, manual hold, dead holder's leftover record."""
        return [entry.status for entry in self.host_status()]

    def _views(self) -> list[BoardView]:
        catalogue = {b.id: b for b in self._catalogue()}
        views = []
        for entry in self.host_status():
            status = entry.status
            facts = catalogue.get(status.board)
            info = BoardInfo(status.board, status.chip,
                             facts.features if facts else frozenset(), status.health.health)
            views.append(BoardView(status, info, None if entry.online else entry.host))
        return views

    def _snapshot_and_queue(self) -> tuple[Snapshot, list[Ask]]:
        def op(conn: Any) -> tuple[Snapshot, list[Ask]]:
            farm = self._farm(conn)
            return self._snapshot(farm), self._live_tickets(conn, farm, None)

        return self.store._run(op, transaction=True)

    def hosts(self) -> dict[str, HostRecord]:
        return self.store.hosts()
