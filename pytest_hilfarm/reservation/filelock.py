"""The single-host reservation backend: one flock per board, owner records and ticket files.

Job: what is particular to one host sharing a lock directory: how a board lock is taken (an
exclusive ``flock``, all boards of a request at once, never blocking on one while holding another),
where owner records and waiting tickets live (files), and how a waiter wakes (inotify). The policy
(fairness, backfill, priorities, timeouts, holds) is :mod:`.core` and :mod:`.scheduler`.

A holder killed with SIGKILL frees its boards at once because the kernel drops its flocks; the
next reserver finds its owner record on a free lock, marks the board UNKNOWN in the store and
reports it on :attr:`Lease.needs_check`.

Must not: reclaim any lock by its age (only the kernel frees a lock, when its holder dies); block
on one board while holding another; talk to hardware; import pytest.

Lock directory layout (one host, a local filesystem: flock is not reliable over NFS)::

    <board>.lock          flock held for the whole lease, through a descriptor opened for
                          writing: closing it (a release, or the kernel after a SIGKILL) is an
                          inotify IN_CLOSE_WRITE event that wakes waiters. Never deleted, so
                          every process locks the same inode. Probes open it read-only, which
                          wakes nobody.
    <board>.owner.json    who holds it: pid, host, user, test id, CI job, since, lease id and
                          the lease's expected end (for backfill); emptied on a clean release,
                          so a non-empty record on a board whose lock is free was left by a
                          holder that died
    queue.lock            scheduling lock: held for one decision while anyone waits, never while
                          waiting; a request finds its boards without it when nobody waits
    <board>.released      closed just before a clean release's unlock, so that a waiter can
                          tell a release from a death by the events alone
    queue.counter         arrival sequence numbers, overwritten in place (fixed width)
    queue/<seq>.ticket    a waiting request (priority, arrival, expected hold); its waiter holds
                          a flock on it, so a dead waiter's ticket is recognisably dead, and the
                          kernel closing it wakes the others
    nudge                 written when a bench hold ends, to wake waiters
    left-<seq>.ticket     a ticket moved out of the queue by a waiter that leaves it, until it
                          deletes it

Wake-ups: a waiter sleeps on inotify, watching each of its boards' lock and release marker, the
nudge file, the queue and its own ticket (:class:`~.filewake._Watch`), with no periodic loop.
Whoever frees boards or leaves the queue works out under the scheduling lock which waiters a
decision would now serve and touches only their tickets. Events nobody answers that way (a
holder or waiter that died, a nudge) wake everyone. Two things have no event: the kernel queues
a close event just before it drops a dead process's flock, so after a close event that did not
let it through, a waiter checks once more shortly after; and a person restoring a quarantined
board in the store, caught by the long :data:`~.core.SAFETY_RECHECK`. Without inotify (not
Linux, or the per-user instance limit reached) a waiter rechecks every
:data:`~.filewake.FALLBACK_RECHECK` seconds instead.

The lock primitive and a waiter's inotify watch are :mod:`.filewake`.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_hilfarm.errors import InfrastructureError, ReservationTimeout, UsageError
from pytest_hilfarm.reservation.allocate import (
    BoardDescription,
    BoardInfo,
    BoardRequest,
    Feasibility,
    natural_sorted,
    rank,
)
from pytest_hilfarm.store import (
    BoardHealth,
    FarmStoreProtocol,
    HoldRecord,
    LeaseOutcome,
    LeaseRecord,
    overall_outcome,
)

from .core import (
    SAFETY_RECHECK,
    BoardView,
    Lease,
    ReserverCore,
    Waiting,
    board_catalogue,
    dead_holder_reason,
    lease_end_reasons,
    owner_record,
    utc_iso,
)
from .filewake import _SHARED_HINT, _Flock, _Watch, parse_ticket, write_counter
from .protocol import UNREADABLE, BoardStatus, HoldResult, Owner, OwnerRecord
from .scheduler import Ask, Snapshot, decide, grants

# A decision that lost a race for a board it chose is made again at once, at most this often.
_RACES = 3
# Health and holds read from the store are reused while its change token stays the same (see
# FarmStore.change_token), and never longer than this: the bound covers a writer killed
# between its commit and the token's second move, the one case the token can miss.
STATE_CACHE_SECONDS = 5.0

@dataclass(frozen=True)
class _Grant:
    """What one successful decision hands to reserve(): locks taken, owner records written.

    It is also the lease's handle: the release records the lease from it.
    """

    lease_id: str
    locks: dict[str, _Flock]
    needs_check: frozenset[str]
    stale: dict[str, OwnerRecord]  # dead holders' records found on the granted boards
    granted_at: float
    requested_at: float


@dataclass
class _State:
    """Health and holds as read at ``token``, and what was worked out from them."""

    token: object
    read_at: float  # time.monotonic()
    infos: dict[str, BoardInfo]
    holds: dict[str, HoldRecord]
    ranked: dict[tuple[BoardRequest, str | None], list[str]] = field(default_factory=dict)


@dataclass
class _FileWait(Waiting):
    deadline: float = 0.0
    ticket_lock: _Flock | None = None
    watch: _Watch | None = None
    look_closely: bool = True  # not woken for us: see whether a decision could serve us first
    tickets_closed: bool = True  # a waiter may have died since our last decision
    left: Path | None = None  # our ticket, moved out of the queue, to delete


class Reserver(ReserverCore):
    """File-based reservation backend (the single-host default).

    ``boards`` are the rack's boards (anything with ``id``, ``chip`` and ``features``); health
    and manual holds come from ``store``. Every process on the host that shares ``lock_dir``
    (and the store) shares the boards, fairly.
    """

    def __init__(self, boards: Sequence[BoardDescription], lock_dir: str | os.PathLike[str],
                 store: FarmStoreProtocol, **options: Any) -> None:
        """``options``: :class:`~.core.ReserverCore`'s (policy, max_failures, timings)."""
        options.setdefault("safety_recheck", SAFETY_RECHECK)
        # Waiters are woken one by one for what they can take (see _Watch): the head of the
        # queue needs no head start.
        options.setdefault("stagger_step", 0.0)
        super().__init__(store, **options)
        for board in boards:
            bid = board.id
            if not bid or bid in {".", ".."} or "/" in bid or "\0" in bid or bid.startswith("."):
                raise UsageError(
                    f"board id {bid!r} cannot name a lock file",
                    where="rack boards",
                    hint="use ids made of letters, digits, '-', '_' and '.'",
                )
        self._boards = board_catalogue(boards)
        self._order = natural_sorted(self._boards)
        self._ids = frozenset(self._order)
        self.lock_dir = Path(lock_dir)
        self._queue_dir = self.lock_dir / "queue"
        try:
            self._queue_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(
                f"cannot create the lock directory: {exc}",
                where=str(self.lock_dir),
                hint="set the rack's lock_dir to a writable directory on a local filesystem",
            ) from exc
        # Built once: every decision touches these.
        self._lock_paths = {b: self.lock_dir / f"{b}.lock" for b in self._order}
        self._owner_paths = {b: self.lock_dir / f"{b}.owner.json" for b in self._order}
        self._released_paths = {b: self.lock_dir / f"{b}.released" for b in self._order}
        # Waiters watch these files, so they must exist (they are never deleted).
        for path in (*self._lock_paths.values(), *self._released_paths.values(),
                     self.lock_dir / "nudge"):
            if path.exists():
                continue
            try:
                os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666))
            except OSError as exc:
                raise UsageError(
                    f"cannot create {path.name} in the lock directory: {exc.strerror}",
                    where=str(self.lock_dir), hint=_SHARED_HINT) from exc
        self._tickets: dict[str, Ask] = {}  # parsed tickets by file name
        self._state: _State | None = None
        # Watches kept for the next wait: closing an inotify instance waits for the kernel's
        # SRCU grace period (milliseconds), opening one costs several system calls.
        self._idle_watches: list[_Watch] = []
        self._idle_pid = os.getpid()
        self._idle_lock = threading.Lock()
        self._feasible: dict[BoardRequest, Feasibility] = {}

    @property
    def where(self) -> str:
        return f"lock dir {self.lock_dir}"

    def _catalogue(self) -> list[BoardInfo]:
        return list(self._boards.values())

    def _feasibility(self, request: BoardRequest) -> Feasibility:
        # The boards of a rack file never change while this reserver lives.
        known = self._feasible.get(request)
        if known is None:
            if len(self._feasible) > 256:
                self._feasible.clear()
            known = self._feasible[request] = super()._feasibility(request)
        return known

    def _farm(self) -> _State:
        """Health and holds: from the last read while the store's change token is the same."""
        token = self.store.change_token()
        state = self._state
        now = time.monotonic()
        if (state is not None and token is not None and state.token == token
                and now - state.read_at < STATE_CACHE_SECONDS):
            return state
        # The token is read first: a change made while we read moves it again afterwards.
        health = self.store.all_health(self._order)
        infos = {b: BoardInfo(i.id, i.chip, i.features, health[b].health, health[b].failures)
                 for b, i in self._boards.items()}
        state = self._state = _State(token, now, infos, self.store.holds())
        return state

    def _board_ids(self) -> list[str]:
        return self._order

    def _now(self) -> float:
        return time.time()

    # -- owner records ----------------------------------------------------------------------------

    def _read_owner(self, board: str) -> OwnerRecord | None:
        """The board's owner record, or None if it is empty (nobody has it, or left cleanly)."""
        try:
            text = self._owner_paths[board].read_text()
        except FileNotFoundError:
            return None
        if not text:
            return None
        try:
            return OwnerRecord.from_json(text)
        except (ValueError, KeyError, TypeError):
            # A torn or foreign file: treat as "someone held it and did not clean up".
            return OwnerRecord(board, "", "", UNREADABLE)

    def _owner_busy(self, board: str) -> bool:
        try:
            return os.stat(self._owner_paths[board]).st_size > 0
        except FileNotFoundError:
            return False

    def _write_owner(self, record: OwnerRecord) -> None:
        # Rewritten in place, not via a temporary file and rename: creating an inode per grant
        # cost more than the rest of a reservation on ext4. Only the lock holder writes this
        # file, and a reader that catches it mid-write gets unparsable text, which it reports
        # as such (see _read_owner).
        data = record.to_json().encode()
        fd = os.open(self._owner_paths[record.board], os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC,
                     0o666)
        try:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)

    def _clear_owner(self, board: str) -> None:
        # Emptied, not deleted: an empty record means "released cleanly". Through a descriptor:
        # ext4 flushes a file truncated to zero by path while nobody has it open (3-4 ms here,
        # on every release), but only schedules that when the truncating descriptor closes.
        try:
            fd = os.open(self._owner_paths[board], os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)

    def _mark_released(self, board: str) -> None:
        """Tell waiters that the next close of this board's lock is a clean release.

        A waiter may read the lock's close event only after the next holder has written its
        owner record, so an owner record alone cannot tell a release from a death.
        """
        fd = os.open(self._released_paths[board], os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        os.close(fd)  # IN_CLOSE_WRITE, just before the lock's own

    def _nudge(self) -> None:
        """Wake every waiter (a bench hold ended): one close of a file opened for writing."""
        fd = os.open(self.lock_dir / "nudge", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        os.close(fd)

    @contextlib.contextmanager
    def _scheduling_lock(self, deadline: float | None = None) -> Iterator[None]:
        lock = _Flock(self.lock_dir / "queue.lock", probe=True)
        limit = time.monotonic() + 30.0 if deadline is None else max(deadline, time.monotonic())
        if not lock.acquire(limit + 0.5):
            raise ReservationTimeout(
                "the reservation scheduling lock stayed busy",
                where=str(self.lock_dir / "queue.lock"),
                hint="a process holding it may be stopped (SIGSTOP/debugger); "
                "find it with `fuser -v` on that file",
            )
        try:
            yield
        finally:
            lock.release()

    # -- the wait queue -------------------------------------------------------------------------

    def _ticket_path(self, seq: int) -> Path:
        return self._queue_dir / f"{seq:016d}.ticket"

    def _waiting(self) -> int:
        """How many tickets the queue holds (live or not: a glance, not a decision)."""
        try:
            with os.scandir(self._queue_dir) as entries:
                return sum(1 for e in entries if e.name.endswith(".ticket"))
        except FileNotFoundError:
            return 0

    def _live_tickets(self, *, locked: bool = True, probe_known: bool = True) -> list[Ask]:
        """Waiting requests in arrival order; dead waiters' tickets are removed.

        Without the scheduling lock (``locked=False``) a ticket that is not locked may be one
        being created: it is skipped, never removed. ``probe_known=False``: tickets seen alive
        before are taken as alive (the caller watched, and no ticket was closed since).
        """
        tickets: list[Ask] = []
        names = [n for n in os.listdir(self._queue_dir) if n.endswith(".ticket")]
        # A ticket is written once and never changed: parse each only once.
        self._tickets = {n: t for n, t in self._tickets.items() if n in names}
        for name in names:
            known = self._tickets.get(name)
            if known is not None and not probe_known:
                tickets.append(known)
                continue
            path = self._queue_dir / name
            probe = _Flock(path, probe=True, create=False)
            try:
                dead = probe.try_acquire()
            except FileNotFoundError:
                continue  # gone since the listing
            if dead:
                # Its waiter died (the kernel dropped its lock): forget the ticket.
                if locked:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                probe.release()
                continue
            ask = known or parse_ticket(path)
            if ask is not None:
                self._tickets[name] = ask
                tickets.append(ask)
        tickets.sort(key=lambda t: t.seq)
        return tickets

    def _new_ticket(self, ask: Ask, state: _FileWait) -> None:
        """Append a ticket to the queue. Needs the scheduling lock (it orders arrivals)."""
        counter = self.lock_dir / "queue.counter"
        try:
            last = int(counter.read_text().strip() or "0")
        except (FileNotFoundError, ValueError):
            last = 0  # missing, or written by something else
        # Never below a live ticket, even if the counter file was lost: arrival order must hold.
        queued = [int(n.split(".")[0]) for n in os.listdir(self._queue_dir)
                  if n.endswith(".ticket") and n.split(".")[0].isdigit()]
        seq = max([last, *queued]) + 1
        write_counter(counter, seq)
        path = self._ticket_path(seq)
        lock = _Flock(path)
        # A reader without the scheduling lock may probe the new file for a moment.
        if not lock.acquire(time.monotonic() + 1.0):  # pragma: no cover - nobody else holds it
            raise InfrastructureError(
                f"queue ticket {path.name} is locked by another waiter",
                where=str(self._queue_dir),
                hint="another program writes to this lock directory; give the rack its own",
            )
        assert lock.fd is not None
        ticket = Ask(seq, ask.request, ask.boards, ask.priority, ask.since, ask.hold, ask.owner)
        data = {"seq": seq, **ask.request.to_json(), "boards": self._order, "owner": ask.owner,
                "priority": ask.priority, "since": ask.since, "hold": ask.hold}
        os.pwrite(lock.fd, json.dumps(data).encode(), 0)  # through the lock's own descriptor
        if state.watch is not None:
            # Under the scheduling lock, as every wake-up is worked out: none is missed.
            state.watch.watch_ticket(path)
        state.ticket = ticket
        state.ticket_lock = lock

    def _drop_ticket(self, state: _FileWait) -> None:
        """Leave the queue without waking anyone (whoever that serves is woken by ticket).

        The ticket is moved out of the queue directory before its lock is closed: the close
        of a ticket in the queue directory means "its waiter died" to every other waiter.
        """
        gone: Path | None = None
        if state.ticket is not None:
            path = self._ticket_path(state.ticket.seq)
            gone = self.lock_dir / f"left-{path.name}"
            try:
                os.rename(path, gone)
            except FileNotFoundError:  # removed as dead by mistake: nothing to move
                gone = None
        if state.ticket_lock is not None:
            state.ticket_lock.release()
        if gone is not None:
            # Deleted by _close_wait, after the scheduling lock: deleting a file that still
            # has unwritten data costs ext4 about half a millisecond, and nobody reads it.
            state.left = gone
        state.ticket = None
        state.ticket_lock = None

    def _take_watch(self) -> _Watch:
        with self._idle_lock:
            if self._idle_pid != os.getpid():  # inherited over fork: not ours to reuse
                self._idle_watches, self._idle_pid = [], os.getpid()
            watch = self._idle_watches.pop() if self._idle_watches else None
        if watch is None:
            return _Watch(self.lock_dir, self._queue_dir, self._order)
        watch.reset()
        return watch

    def _give_watch(self, watch: _Watch) -> None:
        with self._idle_lock:
            # One kept per reserver and thread at most: an inotify instance is a per-user
            # resource (128 by default), and a process rarely waits twice at once.
            if self._idle_pid == os.getpid() and len(self._idle_watches) < 1:
                self._idle_watches.append(watch)
                return
        watch.close()

    def _wake_servable(self) -> None:
        """Wake exactly the waiters a decision would serve now (after a release or a leave).

        Under the scheduling lock: a waiter deciding at the same time either queued its ticket
        before we look (and we wake it) or decides after us (and sees what we freed). Each
        woken waiter still decides for itself; this only picks who is worth waking. A waiter
        that asks as the person holding a board at the bench is not foreseen here: its recheck
        after the release finds it (see _Watch).
        """
        if not self._waiting():
            return
        with self._scheduling_lock(time.monotonic() + 1.0):
            tickets = self._live_tickets(probe_known=False)
            if not tickets:
                return
            farm = self._farm()
            relevant = {b for b, i in farm.infos.items()
                        if any(t.request.matches(i) for t in tickets)}
            snap, _ = self._snapshot(farm.infos, farm.holds, relevant, time.time())
            served = [ask.seq for ask, _choice, _bf in grants(snap, tickets, self.policy)]
        # Woken after the scheduling lock is free again: the first thing they do is take it.
        for seq in served:
            try:
                os.utime(self._ticket_path(seq))  # IN_ATTRIB: its waiter wakes
            except FileNotFoundError:
                continue  # it left meanwhile
            except PermissionError:
                self._nudge()  # a ticket we may not touch: wake everyone instead
                return

    # -- one scheduling decision ----------------------------------------------------------------

    def _open_wait(self, deadline: float) -> _FileWait:
        return _FileWait(requested_at=time.time(), deadline=deadline)

    def _attempt(self, ask: Ask, owner: Owner, state: Waiting,
                 as_person: str | None) -> _Grant | None:
        assert isinstance(state, _FileWait)
        # Health is read outside any lock: a WAL read never blocks, and health changes are not
        # made under the scheduling lock anyway.
        infos = self._farm().infos
        self._unusable(infos, ask.request)
        waiting = self._waiting()
        if state.ticket is None and not waiting:
            grant = self._take_directly(ask, owner, state.requested_at, as_person)
            if grant is not None:
                return grant
        if state.watch is None:
            # Before the decision, so no release after it goes unnoticed.
            state.watch = self._take_watch()
        if state.ticket is None and waiting and self.stagger_step > 0:
            # Others wait, and a release has just woken them: let the head of the queue decide
            # first instead of making it wait for our (usually futile) first decision.
            time.sleep(self.stagger_step * min(waiting, 8))
        elif (state.ahead and state.look_closely
              and not self._decide(ask, owner, state, infos, as_person, dry=True)):
            # Woken for everyone (a death, a nudge, a recheck): only waiters a decision could
            # serve queue for the scheduling lock; one that was not first in line decides
            # without the lock first. One woken for itself goes straight to the lock.
            return None
        with self._scheduling_lock(state.deadline):
            decided = self._decide(ask, owner, state, infos, as_person)
        return decided if isinstance(decided, _Grant) else None

    def _mine(self, holds: Mapping[str, HoldRecord], as_person: str | None) -> set[str]:
        if as_person is None:
            return set()
        return {b for b, h in holds.items() if h.person == as_person}

    def _take_directly(self, ask: Ask, owner: Owner, requested_at: float,
                       as_person: str | None) -> _Grant | None:
        """Nobody waits: take the best free boards without the scheduling lock, or None.

        Walks the candidates in preference order and locks free ones until it has enough;
        boards with an owner record (held, or left by a dead holder) are skipped without
        touching their lock. Finding too few, it gives everything back and the caller queues.
        """
        farm = self._farm()
        holds = farm.holds
        mine = self._mine(holds, as_person)
        candidates = farm.ranked.get((ask.request, as_person))
        if candidates is None:  # the same until health or holds change
            candidates = farm.ranked[(ask.request, as_person)] = [
                i.id for i in rank((farm.infos[b] for b in self._order
                                    if b not in holds or b in mine),
                                   ask.request, max_failures=self.max_failures)]
        taken: dict[str, _Flock] = {}
        try:
            for board in candidates:
                if len(taken) == ask.request.count:
                    break
                if self._owner_busy(board):
                    continue
                lock = _Flock(self._lock_paths[board])
                if lock.try_acquire():
                    taken[board] = lock
            if len(taken) < ask.request.count:
                return None
            grant = self._claim(ask, owner, taken, farm.infos, {}, mine, requested_at)
            taken = {}
            return grant
        finally:
            for lock in taken.values():
                lock.release()

    def _claim(self, ask: Ask, owner: Owner, locks: dict[str, _Flock],
               infos: Mapping[str, BoardInfo], stale: dict[str, OwnerRecord],
               mine: set[str], requested_at: float) -> _Grant | None:
        """Write owner records on locked boards; None (all undone) if a bench hold came first.

        :meth:`hold` records the hold (moving the store's change token) and then looks at the
        lock; here the lock is taken and then the holds are read (again if the token moved).
        Whichever comes second sees the other, so a hold never misses a grant and a grant
        never misses a hold.

        The owner records carry the lease's history record (grant time, request): the store
        hears of the lease only at its release, or from a successor if its holder dies.
        """
        granted_at = time.time()
        lease_id = uuid.uuid4().hex
        end = self._expected_end(ask, granted_at)
        boards = tuple(locks)
        request = ask.request.describe()
        written: list[str] = []
        try:
            for board in locks:
                self._write_owner(owner_record(board, lease_id, granted_at, owner, end,
                                               requested_at=requested_at, request=request,
                                               boards=boards))
                written.append(board)
            held = self._farm().holds
        except BaseException:
            for board in written:  # unreadable later: the next holder marks them UNKNOWN
                if board not in stale:
                    self._clear_owner(board)
            for lock in locks.values():
                lock.release()
            raise
        if any(b in held and b not in mine for b in locks):
            for board in locks:
                if board in stale:
                    self._write_owner(stale[board])  # still a dead holder's board
                else:
                    self._clear_owner(board)
            for lock in locks.values():
                lock.release()
            return None
        needs = frozenset(b for b in locks if infos[b].health is not BoardHealth.GOOD)
        return _Grant(lease_id, dict(locks), needs, stale, granted_at, requested_at)

    def _snapshot(self, infos: Mapping[str, BoardInfo], holds: Mapping[str, HoldRecord],
                  relevant: set[str], now: float
                  ) -> tuple[Snapshot, dict[str, OwnerRecord]]:
        """The farm for one decision, from the owner records of the boards that matter."""
        free: set[str] = set()
        ends: dict[str, float] = {}
        records: dict[str, OwnerRecord] = {}
        for board in relevant:
            record = self._read_owner(board)
            if record is None:
                if board not in holds:
                    free.add(board)
                continue
            records[board] = record
            # A record without an expected end (an older writer) counts as due: strict FIFO.
            ends[board] = record.expected_end if record.expected_end is not None else now
        return Snapshot(now, infos, frozenset(free), ends, frozenset(holds)), records

    def _decide(self, ask: Ask, owner: Owner, state: _FileWait, infos: Mapping[str, BoardInfo],
                as_person: str | None, *, dry: bool = False) -> _Grant | bool | None:
        """One decision; under the scheduling lock unless ``dry``.

        ``dry``: only say whether a decision under the lock could grant something now (it reads
        the same records, takes nothing and writes nothing).
        """
        holds = self._farm().holds
        mine = self._mine(holds, as_person)
        tickets = self._live_tickets(locked=not dry, probe_known=state.tickets_closed)
        if not dry:
            state.tickets_closed = False
        me = state.ticket or ask
        wanted = [me.request, *(t.request for t in tickets)]
        relevant = {b for b, i in infos.items() if any(r.matches(i) for r in wanted)}
        for _ in range(_RACES):
            snap, records = self._snapshot(infos, holds, relevant, time.time())
            free_mine = {b for b in mine if b not in records}
            decision = decide(snap, tickets, me, self.policy, free_mine)
            if decision.choice is None:
                # Boards whose record says "held" but whose lock is free: their holders died.
                # Probed only now, and only those this request could use.
                stale = {b: r for b, r in records.items() if me.request.matches(infos[b])
                         and not _Flock(self._lock_paths[b]).busy()}
                if stale:
                    free = snap.free | {b for b in stale if b not in holds}
                    ends = {b: e for b, e in snap.ends.items() if b not in stale}
                    snap = Snapshot(snap.now, infos, frozenset(free), ends, snap.blocked)
                    decision = decide(snap, tickets, me, self.policy,
                                      free_mine | (set(stale) & mine))
            state.ahead = decision.ahead
            if dry:
                return decision.choice is not None
            if decision.choice is None:
                break
            taken: dict[str, _Flock] = {}
            for board in decision.choice.boards:
                lock = _Flock(self._lock_paths[board])
                if not lock.try_acquire():
                    break  # taken directly since our snapshot, or a release is finishing
                taken[board] = lock
            else:
                found = {b: records[b] for b in taken if b in records}
                grant = self._claim(me, owner, taken, infos, found, mine, state.requested_at)
                if grant is not None:
                    self._drop_ticket(state)  # IN_DELETE: a younger request may now be first
                    return grant
                holds = self._farm().holds  # a bench hold came first: decide again
                continue
            for lock in taken.values():
                lock.release()
        if state.ticket is None:
            self._new_ticket(ask, state)
        return None

    def _sleep(self, state: Waiting, seconds: float) -> None:
        assert isinstance(state, _FileWait) and state.watch is not None
        state.look_closely, closed = state.watch.wait(seconds)
        state.tickets_closed = state.tickets_closed or closed

    def _close_wait(self, state: Waiting) -> None:
        assert isinstance(state, _FileWait)
        left = state.ticket is not None  # leaving the queue without a grant
        self._drop_ticket(state)
        if state.left is not None:
            with contextlib.suppress(FileNotFoundError):
                state.left.unlink()
            state.left = None
        if state.watch is not None:
            self._give_watch(state.watch)
            state.watch = None
        if left:
            # Whoever waited behind us may be served now. Best effort: failing here must not
            # hide why we left (a timeout, an interruption); the others recheck soon anyway.
            with contextlib.suppress(Exception):
                self._wake_servable()

    # -- the lease --------------------------------------------------------------------------------

    def _lease(self, ask: Ask, owner: Owner, state: Waiting, grant: Any,
               waited: float) -> Lease:
        assert isinstance(state, _FileWait) and isinstance(grant, _Grant)
        self._close_wait(state)
        boards = tuple(grant.locks)
        lease = Lease(self, grant.lease_id, boards, grant.needs_check | frozenset(grant.stale),
                      owner, ask.request, grant.granted_at, waited, grant)
        try:
            for board, dead in grant.stale.items():
                # The lock was free, so its holder is gone: it died before this grant.
                self._record_dead(dead, grant.granted_at)
                self.store.set_health(board, BoardHealth.UNKNOWN,
                                      dead_holder_reason(dead.owner.describe(), dead.since))
                self.store.forget_flash(board)
        except BaseException:
            # Unlock but keep the owner records: the next reserver then treats these boards as
            # left by a dead holder (UNKNOWN), which is the safe reading of "we do not know".
            for lock in grant.locks.values():
                lock.release()
            raise
        return lease

    def _record_dead(self, dead: OwnerRecord, found_at: float) -> None:
        """Close a dead holder's lease in the history at ``found_at`` (it held until then)."""
        if not dead.lease_id:
            return  # unreadable record: nothing to close
        outcome = LeaseOutcome.HOLDER_DIED.value
        if dead.granted_at is None:  # an older writer: it recorded its grant itself
            self.store.record_release(dead.lease_id, found_at, outcome)
            return
        requested = dead.requested_at if dead.requested_at is not None else dead.granted_at
        self.store.record_lease(LeaseRecord(
            dead.lease_id, dead.boards or (dead.board,), dead.owner.to_dict(), dead.request,
            requested, dead.granted_at, dead.granted_at - requested, found_at, outcome))

    def _finish(self, lease: Lease, per_board: Mapping[str, LeaseOutcome], note: str) -> None:
        grant: _Grant = lease.handle
        released_at = time.time()  # while we still hold the boards: before any successor
        try:
            # Health first, under the locks: the next holder must find these boards UNKNOWN.
            # If this fails the owner records stay, and the next holder marks them UNKNOWN.
            for board, reason in lease_end_reasons(lease.owner, lease.granted_at, per_board,
                                                   note).items():
                self.store.set_health(board, BoardHealth.UNKNOWN, reason)
                self.store.forget_flash(board)
            for board in grant.locks:
                self._clear_owner(board)
                self._mark_released(board)
        finally:
            for lock in grant.locks.values():
                lock.release()
            with contextlib.suppress(Exception):  # best effort: waiters recheck soon anyway
                self._wake_servable()
            # The history record after the unlock, off the hand-off to the next holder. Its
            # times were both taken while the boards were ours, so it cannot overlap the next
            # holder's. A holder killed right here leaves no record (never a wrong one).
            outcome = overall_outcome(per_board).value
            self.store.record_lease(LeaseRecord(
                lease.id, lease.boards, lease.owner.to_dict(), lease.request.describe(),
                grant.requested_at, grant.granted_at, lease.waited, released_at, outcome,
                {b: o.value for b, o in per_board.items()}))

    # -- holds, status, queue -----------------------------------------------------------------

    def _add_hold(self, board: str, person: str, reason: str) -> HoldResult:
        record = self.store.add_hold(board, person, reason)
        # After recording the hold (see _claim): a grant that did not see it has its lock.
        busy = _Flock(self._lock_paths[board]).busy()
        return HoldResult(record, self._read_owner(board) if busy else None)

    def _remove_hold(self, board: str) -> HoldRecord | None:
        record = self.store.remove_hold(board)
        self._nudge()  # waiters may now take it
        return record

    def status(self) -> list[BoardStatus]:
        """Every board: health, live holder, manual hold, dead holder's leftover record."""
        health = self.store.all_health(self._order)
        holds = self.store.holds()
        result = []
        for board in self._order:
            busy = _Flock(self._lock_paths[board]).busy()
            record = self._read_owner(board)
            result.append(BoardStatus(board=board, chip=self._boards[board].chip,
                                      health=health[board], holder=record if busy else None,
                                      hold=holds.get(board),
                                      stale_owner=None if busy else record))
        return result

    def _views(self) -> list[BoardView]:
        return [BoardView(s, self._boards[s.board]) for s in self.status()]

    def _snapshot_and_queue(self) -> tuple[Snapshot, list[Ask]]:
        farm = self._farm()
        snap, _ = self._snapshot(farm.infos, farm.holds, set(self._order), time.time())
        return snap, self._live_tickets()


__all__ = ["Lease", "Reserver", "_Flock", "utc_iso"]
