"""The reservation policy, written once: the wait loop, leases, timeouts, holds, the queue view.

Job: everything both backends do the same way. :class:`ReserverCore.reserve` checks the request,
estimates its hold from the store's history (:class:`HoldEstimates`), then alternates one
scheduling decision (the backend's :meth:`~ReserverCore._attempt`, which asks
:func:`~pytest_hilfarm.reservation.scheduler.decide`) with an event-driven sleep until it is
granted or times out; the timeout report says what was asked and who holds what. :class:`Lease`
is the one lease type (idempotent release, a context manager that fails closed), and the rules
for the boards a lease leaves (which need a health check, and why) live here too.

A backend (``filelock.py``, ``postgresql.py``) supplies only what differs: how a lock is taken,
where owner records and tickets live, and how a waiter is woken.

Must not: lock, touch files or SQL itself, talk to hardware, import pytest.
"""

from __future__ import annotations

import abc
import contextlib
import math
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

from pytest_hilfarm.errors import InfrastructureError, ReservationTimeout, UsageError
from pytest_hilfarm.reservation.allocate import (
    BoardDescription,
    BoardInfo,
    BoardRequest,
    Feasibility,
    can_ever_satisfy,
    choose,
    natural_sorted,
)
from pytest_hilfarm.store import (
    OUTCOMES_NEEDING_CHECK,
    BoardHealth,
    HoldRecord,
    LeaseOutcome,
    board_outcomes,
    check_due_reason,
    outcome_of,
)

from .protocol import BoardStatus, HoldResult, Owner, OwnerRecord, QueueEntry
from .scheduler import NEWCOMER, Ask, Policy, Snapshot, forecast

# Sleep between two decisions when no event came: only catches what has no event (a person
# restoring a quarantined board in the store, a rig host coming back). Releases, dead holders
# and dead waiters wake waiters at once through the backend's events.
SAFETY_RECHECK = 5.0
# When a release wakes every waiter, the k-th in line waits k steps before it competes for the
# scheduling lock, so the head of the queue (the one that usually wins) decides first.
STAGGER_STEP = 0.0005
# Hold estimates: the p90 of the last HOLD_SAMPLES holds of the test, once it has HOLD_MINIMUM.
HOLD_QUANTILE = 0.9
HOLD_SAMPLES = 50
HOLD_MINIMUM = 3
HOLD_CACHE_SECONDS = 10.0


def utc_iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds")


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank; ``values`` not empty)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class HoldEstimates:
    """Expected hold of a test's lease: the p90 of its recorded holds, or None (no history).

    Cached per test for a few seconds: a test's history changes once per lease, and this runs
    on every reservation.
    """

    def __init__(self, store: Any, *, samples: int = HOLD_SAMPLES,
                 minimum: int = HOLD_MINIMUM, cache_seconds: float = HOLD_CACHE_SECONDS) -> None:
        self._store = store
        self._samples = samples
        self._minimum = minimum
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, float | None]] = {}
        self._lock = threading.Lock()

    def expected(self, test_id: str) -> float | None:
        if not test_id:
            return None
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(test_id)
        if cached is not None and now - cached[0] < self._cache_seconds:
            return cached[1]
        reader = getattr(self._store, "hold_times", None)
        holds = reader(test_id, self._samples) if reader is not None else []
        value = quantile(holds, HOLD_QUANTILE) if len(holds) >= self._minimum else None
        with self._lock:
            self._cache[test_id] = (now, value)
        return value


def lease_end_reasons(owner: Owner, granted_at: float, per_board: Mapping[str, LeaseOutcome],
                      note: str = "") -> dict[str, str]:
    """The boards a lease leaves for a health check, each with the reason ``status`` shows."""
    return {
        board: check_due_reason(outcome, holder=owner.describe(), since=utc_iso(granted_at),
                                note=note)
        for board, outcome in per_board.items() if outcome in OUTCOMES_NEEDING_CHECK
    }


def dead_holder_reason(holder: str, since: str, note: str = "") -> str:
    """Why a board whose holder died without releasing it waits for a health check."""
    return check_due_reason(LeaseOutcome.HOLDER_DIED, holder=holder, since=since, note=note)


@dataclass
class Waiting:
    """One reserve() call's bookkeeping (local to that call, never shared).

    Backends subclass it with what their waiting needs (an inotify descriptor, a connection).
    """

    requested_at: float = 0.0  # the records' clock
    ticket: Ask | None = None  # our place in the queue, once we have one
    ahead: tuple[Ask, ...] = ()  # competing requests served before us, at the last decision


class Lease:
    """Exclusive use of ``boards`` until :meth:`release` (idempotent; also a context manager).

    ``needs_check`` names boards that must pass a health check before a test uses them: boards
    not GOOD in the store, and boards whose previous holder died without releasing.
    ``handle`` is the backend's (the board locks, or the database connection that holds them).
    """

    def __init__(self, reserver: ReserverCore, lease_id: str, boards: tuple[str, ...],
                 needs_check: frozenset[str], owner: Owner, request: BoardRequest,
                 granted_at: float, waited: float, handle: Any) -> None:
        self._reserver = reserver
        self._id = lease_id
        self._boards = boards
        self._needs_check = needs_check
        self.owner = owner
        self.request = request
        self.granted_at = granted_at  # epoch seconds (the records' clock)
        self.waited = waited  # seconds between reserve() and the grant
        self.handle = handle
        self._mutex = threading.Lock()
        self._released = False

    @property
    def id(self) -> str:
        return self._id

    @property
    def boards(self) -> tuple[str, ...]:
        return self._boards

    @property
    def needs_check(self) -> frozenset[str]:
        return self._needs_check

    @property
    def released(self) -> bool:
        return self._released

    def _state_word(self) -> str:
        return "released" if self._released else "held"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._id[:8]}, boards={list(self._boards)}, " \
               f"{self._state_word()})"

    def release(
        self,
        outcomes: Mapping[str, str | LeaseOutcome] | None = None,
        *,
        default: str | LeaseOutcome = LeaseOutcome.OK,
        note: str = "",
    ) -> None:
        """Record history and health changes, then unlock. Calling it again does nothing.

        ``outcomes`` maps board ids to ``"ok"``, ``"failed"``, ``"infra_error"``, ...; boards
        not named get ``default``. ``infra_error``, ``aborted`` and ``broken_app`` mark the board
        UNKNOWN ("health check due"), with ``note`` (e.g. the signal that interrupted the holder)
        in the reason ``hilfarm status`` shows.
        """
        where = f"release of lease {self._id[:8]} ({', '.join(self._boards)})"
        per_board = board_outcomes(self._boards, outcomes, default, where=where)
        with self._mutex:
            if self._released:
                return
            self._released = True
            self._reserver._finish(self, per_board, note)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release(default=outcome_of(exc))


@dataclass(frozen=True)
class BoardView:
    """A board for the timeout report: its status, its facts, and its offline host if any."""

    status: BoardStatus
    info: BoardInfo
    offline_host: str | None = None


class ReserverCore(abc.ABC):
    """The policy both backends share (see the module docstring); subclasses fill the hooks."""

    #: What to do when the boards a request names do not exist at all.
    missing_hint = "ask for fewer boards or other chips/features, or use a rack that has them"

    def __init__(self, store: Any, *, policy: Policy | None = None,
                 max_failures: int | None = None, stagger_step: float = STAGGER_STEP,
                 safety_recheck: float = SAFETY_RECHECK) -> None:
        """``policy`` defaults to backfill with the store's quarantine threshold (or
        ``max_failures``); ``safety_recheck``: see :data:`SAFETY_RECHECK`.
        """
        self.store = store
        if max_failures is None:
            max_failures = getattr(store, "quarantine_after", None)
        if policy is None:
            policy = Policy() if max_failures is None else Policy(max_failures=max_failures)
        self.policy = policy
        self.stagger_step = stagger_step
        self.safety_recheck = safety_recheck
        self.estimates = HoldEstimates(store)
        # The last boards checked by _unusable, and the requests they allow: a backend hands
        # the same mapping again until health changes, so each request is checked once per
        # health reading, not on every wake-up.
        self._usable_checked: tuple[Mapping[str, BoardInfo], set[BoardRequest]] | None = None

    @property
    def max_failures(self) -> int:
        return self.policy.max_failures

    # -- hooks: what differs between backends -------------------------------------------------

    @property
    @abc.abstractmethod
    def where(self) -> str:
        """Where the locks live, for error messages."""

    @abc.abstractmethod
    def _catalogue(self) -> list[BoardInfo]:
        """Every board this reserver could hand out (static facts, health aside)."""

    @abc.abstractmethod
    def _open_wait(self, deadline: float) -> Waiting:
        """Start one reserve() call's bookkeeping (sets ``requested_at``)."""

    @abc.abstractmethod
    def _attempt(self, ask: Ask, owner: Owner, state: Waiting,
                 as_person: str | None) -> Any | None:
        """One scheduling decision: a grant, or None after leaving (or keeping) a ticket."""

    @abc.abstractmethod
    def _sleep(self, state: Waiting, seconds: float) -> None:
        """Wait for an event that may change the decision (a release, a death), or ``seconds``."""

    @abc.abstractmethod
    def _close_wait(self, state: Waiting) -> None:
        """Give up waiting: drop the ticket, close what the wait opened."""

    @abc.abstractmethod
    def _lease(self, ask: Ask, owner: Owner, state: Waiting, grant: Any,
               waited: float) -> Lease:
        """Turn a grant into a lease (records it in the store)."""

    @abc.abstractmethod
    def _finish(self, lease: Lease, per_board: Mapping[str, LeaseOutcome], note: str) -> None:
        """End a lease: history, health, owner records, unlock."""

    @abc.abstractmethod
    def _now(self) -> float:
        """The records' clock (epoch seconds)."""

    @abc.abstractmethod
    def _board_ids(self) -> list[str]:
        """Ids of every board this reserver knows, in human order."""

    @abc.abstractmethod
    def _views(self) -> list[BoardView]:
        """Every board with its status, for the timeout report."""

    @abc.abstractmethod
    def _snapshot_and_queue(self) -> tuple[Snapshot, list[Ask]]:
        """The farm and the live tickets, for :meth:`queue`."""

    @abc.abstractmethod
    def _add_hold(self, board: str, person: str, reason: str) -> HoldResult:
        """Record a bench hold so that no decision made after this returns grants the board."""

    @abc.abstractmethod
    def _remove_hold(self, board: str) -> HoldRecord | None:
        """Remove a bench hold and wake waiters."""

    @abc.abstractmethod
    def status(self) -> list[BoardStatus]:
        """Every board: health, live holder, manual hold, dead holder's leftover record."""

    # -- the policy ---------------------------------------------------------------------------

    def expected_hold(self, test_id: str) -> float | None:
        """The p90 of this test's recorded holds (None: no history, treated conservatively)."""
        return self.estimates.expected(test_id)

    def _feasibility(self, request: BoardRequest) -> Feasibility:
        """Whether the boards could ever satisfy ``request`` (health, holds and leases aside)."""
        return can_ever_satisfy(self._catalogue(), request)

    def _check(self, request: BoardRequest, timeout: float) -> None:
        feasible = self._feasibility(request)
        if not feasible:
            raise UsageError(feasible.reason,
                             where=f"reservation of {request.describe()} ({self.where})",
                             hint=self.missing_hint)
        if not timeout >= 0:
            raise UsageError(
                f"reservation timeout must be >= 0 seconds, not {timeout}",
                where=f"reservation of {request.describe()}",
                hint="use 0 to try once without waiting",
            )

    def reserve(
        self,
        request: BoardRequest,
        owner: Owner | None = None,
        timeout: float = 300.0,
        *,
        as_person: str | None = None,
        priority: int = 0,
    ) -> Lease:
        """Reserve ``request.count`` distinct boards, all or nothing, within ``timeout`` s.

        ``priority``: higher is served first among waiting requests; waiting raises it over
        time (ageing), so a low priority still runs. ``as_person``: boards this person holds at
        the bench count as free for this request (``hilfarm flash BOARD`` on a held board).

        Raises :class:`UsageError` at once if the boards can never satisfy the request,
        :class:`InfrastructureError` if quarantined boards make it impossible until a person
        acts, :class:`ReservationTimeout` (saying who holds what) when the time runs out.
        """
        self._check(request, timeout)
        owner = owner or Owner.current()
        start = time.monotonic()
        deadline = start + timeout
        state = self._open_wait(deadline)
        try:
            ask = Ask(NEWCOMER, request, frozenset(self._board_ids()), int(priority),
                      state.requested_at, self.expected_hold(owner.test_id), owner.describe())
            while True:
                grant = self._attempt(ask, owner, state, as_person)
                if grant is not None:
                    break
                now = time.monotonic()
                if now >= deadline:
                    self._timeout(request, owner, state, now - start)
                self._sleep(state, min(deadline - now, self.safety_recheck))
                if state.ahead and self.stagger_step > 0:
                    time.sleep(self.stagger_step * min(len(state.ahead), 8))
        except BaseException:
            self._close_wait(state)
            raise
        return self._lease(ask, owner, state, grant, time.monotonic() - start)

    def _timeout(self, request: BoardRequest, owner: Owner, state: Waiting,
                 waited: float) -> None:
        older = state.ahead
        self._close_wait(state)
        lines = self._blocking_lines(request)
        for ticket in older:
            lines.append(
                f"queued ahead (#{ticket.seq}): {ticket.request.describe()} for {ticket.owner}"
            )
        lease_id = uuid.uuid4().hex
        with contextlib.suppress(Exception):  # the report matters more than the record
            now = self._now()
            self.store.record_reservation(lease_id, (), owner.to_dict(), request.describe(),
                                          state.requested_at or now, None, waited)
            self.store.record_release(lease_id, now, LeaseOutcome.TIMEOUT.value)
        raise ReservationTimeout(
            f"could not reserve {request.describe()} within {waited:.1f} s (waited "
            f"{waited:.1f} s for {owner.describe()}):\n    " + "\n    ".join(lines),
            where=self.where,
            hint="raise the reservation timeout, or see who holds boards with `hilfarm status`",
        )

    def _blocking_lines(self, request: BoardRequest) -> list[str]:
        lines = []
        for view in self._views():
            status = view.status
            if not request.matches(view.info):
                continue
            if status.holder is not None:
                lines.append(f"{status.board}: held by {status.holder.owner.describe()}"
                             f" since {status.holder.since}")
            elif status.hold is not None:
                lines.append(f"{status.board}: held at the bench by {status.hold.person} since "
                             f"{utc_iso(status.hold.since)} (reason: {status.hold.reason})")
            elif view.offline_host is not None:
                lines.append(f"{status.board}: its rig host {view.offline_host} is offline")
            elif status.health.health is BoardHealth.QUARANTINED:
                lines.append(f"{status.board}: QUARANTINED ({status.health.reason})")
            else:
                lines.append(f"{status.board}: free now ({status.health.health.value})")
        return lines

    def _unusable(self, infos: Mapping[str, BoardInfo], request: BoardRequest) -> None:
        """Raise if even with every lease, hold and host back, health leaves too few boards.

        Only a person can change that (``hilfarm board restore``), so waiting would hide it.
        """
        checked = self._usable_checked
        if checked is not None and checked[0] is infos and request in checked[1]:
            return
        if choose(infos.values(), request, max_failures=self.max_failures) is not None:
            if checked is None or checked[0] is not infos:
                checked = self._usable_checked = (infos, set())
            checked[1].add(request)
            return
        lines = [
            f"{b}: {i.health.value}" for b, i in infos.items()
            if request.matches(i) and i.health in (BoardHealth.QUARANTINED, BoardHealth.BAD)
        ]
        raise InfrastructureError(
            f"cannot reserve {request.describe()}: too few usable boards",
            where=self.where,
            hint="boards out of service: " + "; ".join(lines)
            + "; a person restores one with `hilfarm board restore BOARD`",
        )

    def _expected_end(self, ask: Ask, granted_at: float) -> float:
        hold = self.policy.default_hold if ask.hold is None else ask.hold
        return granted_at + hold

    # -- holds and the queue --------------------------------------------------------------------

    def _known(self, board: str, action: str) -> None:
        known = self._board_ids()
        if board not in known:
            raise UsageError(
                f"no board named {board!r} in this farm",
                where=f"{action} {board} ({self.where})",
                hint=f"boards: {', '.join(natural_sorted(known)) or 'none registered'}",
            )

    def hold(self, board: str, reason: str, person: str) -> HoldResult:
        """A person holds ``board`` (outlives this process). Reservations skip it until unhold.

        A lease already running on the board is not interrupted; ``in_use_by`` names it.
        """
        self._known(board, "hold")
        if not reason.strip():
            raise UsageError(
                "a manual hold needs a reason", where=f"hold {board}",
                hint='say why, e.g. --reason "probing UART with a scope"',
            )
        return self._add_hold(board, person, reason)

    def unhold(self, board: str) -> HoldRecord | None:
        self._known(board, "unhold")
        return self._remove_hold(board)

    def queue(self) -> list[QueueEntry]:
        """Every waiting request: place, priority (as asked and with ageing), expected start."""
        snap, asks = self._snapshot_and_queue()
        return [
            QueueEntry(f.position, f.ask.seq, f.ask.request.describe(), f.ask.owner,
                       f.ask.priority, f.effective_priority, f.ask.since, f.start)
            for f in forecast(snap, asks, self.policy)
        ]


def board_catalogue(boards: Sequence[BoardDescription]) -> dict[str, BoardInfo]:
    """The boards a reserver hands out, by id; an id given twice is an error."""
    catalogue: dict[str, BoardInfo] = {}
    for board in boards:
        if board.id in catalogue:
            raise UsageError(f"board id {board.id!r} appears twice", where="rack boards",
                             hint="give every board a unique id")
        catalogue[board.id] = BoardInfo.of(board)
    return catalogue


def owner_record(board: str, lease_id: str, granted_at: float, owner: Owner,
                 expected_end: float, *, requested_at: float | None = None, request: str = "",
                 boards: tuple[str, ...] = ()) -> OwnerRecord:
    """The owner record a grant writes for one board."""
    return OwnerRecord(board, lease_id, utc_iso(granted_at), owner, expected_end, granted_at,
                       requested_at, request, boards)
