"""The scheduling decision, as a pure function: who gets which free boards now, who waits.

Given the boards (with health), which of them are free, when the leased ones are expected back,
the live waiting requests (priority, age, expected hold) and one request, :func:`decide` returns
boards for it or "wait" (with the requests served before it and when it may expect to start).
:func:`forecast` gives every waiting request's place and expected start (``hilfarm status``).

The policy, in order:

1. **Priority with ageing.** Requests are served by effective priority (their priority plus one
   step per :attr:`Policy.ageing` seconds waited), then by arrival. Ageing is what lets a
   nightly run's low priority still win against a steady stream of higher-priority PR jobs.
2. **Requests ahead keep their boards.** Each request ahead that can be served now takes its
   boards first. One that must wait gets a plan: the boards it will take (the free ones first,
   then the leased ones expected back soonest) and its expected start (when the last of them is
   expected back).
3. **EASY backfill.** A later request may take a free board of such a plan only if it is expected
   to give the board back before that plan's start: its expected hold (the p90 of that test's
   recorded holds) must end first. A request with no history never backfills (conservative), and
   the expected end of a lease with no history counts as :attr:`Policy.default_hold`.
4. **The starvation bound.** A lease that runs past its expected end (its estimate proved wrong)
   counts as due now, so once the last lease a plan waits for is due, the plan's start is "now":
   nothing fits before it any more, and every free board the request could use is kept for it,
   as strict FIFO does. The same holds once a request has waited :attr:`Policy.bound` seconds.
   Hence, checked against adversarial hold times in tests/farm/test_scheduler.py:

   - no request is overtaken by backfill after it has waited ``bound`` seconds;
   - backfilled leases whose estimates were wrong start it at most one expected hold plus one
     real hold (of those leases) later than strict FIFO would have: a backfill must claim to end
     before the plan's start, and that start only moves earlier once the real blockers are gone.

With ``Policy(backfill=False)`` this is strict FIFO (within a priority), the old policy, kept for
the benchmarks' side-by-side comparison.

Must not: read files, the store or a clock (``now`` is an argument), lock, sleep; this module is
a function of its arguments and is table-tested (tests/farm/test_scheduler.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pytest_hilfarm.reservation.allocate import BoardInfo, BoardRequest, Choice, rank
from pytest_hilfarm.store import QUARANTINE_AFTER, BoardHealth

# A request's expected hold when its test has no recorded history, used only to forecast when a
# lease ends (never to let the request backfill). Ten minutes: longer than most HIL tests, so a
# lease of unknown length does not make a waiting request look due sooner than it is.
DEFAULT_HOLD = 600.0
# After this long in the queue a request's boards are kept for it as strict FIFO does. Backfill
# delays a request by at most one expected plus one real hold anyway (see above); the bound also
# caps how long it can be overtaken when the lease it waits for was over-estimated.
BACKFILL_BOUND = 1800.0
# Seconds of waiting that raise a request's effective priority by one step.
AGEING_STEP = 30.0
# The arrival number of a request that has no ticket yet: after every queued one.
NEWCOMER = 1 << 62


@dataclass(frozen=True)
class Policy:
    """How :func:`decide` orders and fills (see the module docstring)."""

    backfill: bool = True
    bound: float = BACKFILL_BOUND
    ageing: float = AGEING_STEP
    default_hold: float = DEFAULT_HOLD
    max_failures: int = QUARANTINE_AFTER

    def __post_init__(self) -> None:
        if not self.ageing > 0 or not self.bound >= 0 or not self.default_hold > 0:
            raise ValueError(f"scheduling policy needs ageing > 0, bound >= 0 and "
                             f"default_hold > 0, not {self}")


@dataclass(frozen=True)
class Ask:
    """A request as the scheduler sees it: a queued ticket, or a newcomer (``seq=NEWCOMER``)."""

    seq: int
    request: BoardRequest
    boards: frozenset[str]  # the boards this asker may get at all (its rack's ids)
    priority: int = 0
    since: float = 0.0  # when it asked (same clock as Snapshot.now)
    hold: float | None = None  # expected hold in seconds; None: its test has no history
    owner: str = ""  # Owner.describe(), for people

    def effective_priority(self, now: float, policy: Policy) -> int:
        """Priority plus one step per ``policy.ageing`` seconds waited."""
        return self.priority + int(max(0.0, now - self.since) // policy.ageing)


@dataclass(frozen=True)
class Snapshot:
    """The farm at one instant, as one decision sees it."""

    now: float
    boards: Mapping[str, BoardInfo]  # every board, with its health
    free: frozenset[str]  # not leased and not blocked
    ends: Mapping[str, float] = field(default_factory=dict)  # leased board -> expected end
    blocked: frozenset[str] = frozenset()  # held at the bench, or its rig host is offline


@dataclass(frozen=True)
class Decision:
    """Boards for the asker now, or why it waits."""

    choice: Choice | None
    ahead: tuple[Ask, ...]  # requests served before it that want the same kind of board
    start: float | None = None  # when it waits: its expected start (None: not foreseeable)
    backfilled: bool = False  # granted inside the plan of a request ahead


@dataclass(frozen=True)
class Forecast:
    """One waiting request's place in the queue (``hilfarm status``)."""

    ask: Ask
    position: int  # 1 = served first
    effective_priority: int
    start: float | None  # expected start; None: it waits on a person or an offline host


def queue_order(asks: Iterable[Ask], now: float, policy: Policy) -> list[Ask]:
    """Who is served first: higher effective priority, then earlier arrival."""
    return sorted(asks, key=lambda a: (-a.effective_priority(now, policy), a.seq))


class _Replay:
    """The queue replayed in service order over one snapshot (the core of decide/forecast)."""

    def __init__(self, snap: Snapshot, policy: Policy) -> None:
        self.snap = snap
        self.policy = policy
        self.pool = set(snap.free)
        now = snap.now
        # When each usable board is expected to be available: free ones now; a lease that has
        # run past its expected end could end any moment, so "now" as well.
        self.avail: dict[str, float] = {b: max(e, now) for b, e in snap.ends.items()}
        for board in self.pool:
            self.avail[board] = now
        # Free board -> the earliest planned start it is part of: a backfill must end before it.
        self.limit: dict[str, float] = {}
        self.usable = {b: i for b, i in snap.boards.items() if b not in snap.blocked}
        self._ranked: dict[tuple[BoardRequest, frozenset[str]], list[BoardInfo]] = {}

    def hold_of(self, ask: Ask) -> float:
        return self.policy.default_hold if ask.hold is None else ask.hold

    def ranked(self, ask: Ask) -> list[BoardInfo]:
        """Every usable board ``ask`` may take, best first (:func:`rank`), once per replay.

        Ranking is per board (health, surplus features, id), so ranking a subset gives this
        list's order with the others left out: :meth:`offer` filters it instead of ranking
        again. Requests in a queue repeat, and this is most of a decision's work.
        """
        key = (ask.request, ask.boards)
        found = self._ranked.get(key)
        if found is None:
            found = self._ranked[key] = rank(
                (self.usable[b] for b in ask.boards if b in self.usable), ask.request,
                max_failures=self.policy.max_failures)
        return found

    def can_ever(self, ask: Ask) -> bool:
        """Whether ``ask`` could be served if every lease ended (holds and hosts aside)."""
        return len(self.ranked(ask)) >= ask.request.count

    def plan(self, ask: Ask) -> tuple[float, tuple[str, ...]]:
        """The boards ``ask`` expects to take and when (the last of them is expected back)."""
        order = {info.id: n for n, info in enumerate(self.ranked(ask))}
        soonest = sorted(order, key=lambda b: (self.avail.get(b, math.inf), order[b]))
        planned = tuple(soonest[: ask.request.count])
        if len(planned) < ask.request.count:
            return math.inf, planned  # it waits on a person or a host: not foreseeable
        # A lease past its expected end counts as due now: if it is the last one the plan waits
        # for, the start is now and nothing fits before it any more.
        return max(self.avail.get(b, math.inf) for b in planned), planned

    def offer(self, ask: Ask, extra: Iterable[str] = ()) -> tuple[Choice | None, bool]:
        """Boards for ``ask`` from the free ones now (and ``extra``), and whether by backfill."""
        extra = set(extra) & set(self.snap.boards)
        if extra:
            # Boards blocked for everyone else (held at the bench by the asker): rank afresh.
            pool = self.pool | extra
            allowed = [self.snap.boards[b] for b in pool if b in ask.boards]
            ranked = rank(allowed, ask.request, max_failures=self.policy.max_failures)
        else:
            pool = self.pool
            ranked = [i for i in self.ranked(ask) if i.id in pool]
        count = ask.request.count
        clear = [i for i in ranked if i.id not in self.limit]
        if len(clear) >= count:
            return _choice(clear[:count]), False
        if self.policy.backfill and ask.hold is not None:
            end = self.snap.now + ask.hold
            fits = [i for i in ranked if end < self.limit.get(i.id, math.inf)]
            if len(fits) >= count:
                return _choice(fits[:count]), True
        return None, False

    def serve(self, ask: Ask) -> tuple[Choice | None, bool, float | None]:
        """Let ``ask`` take its boards, or plan them: (choice, backfilled, expected start)."""
        now = self.snap.now
        choice, backfilled = self.offer(ask)
        if choice is not None:  # it takes these at its next attempt
            self.pool -= set(choice.boards)
            for board in choice.boards:
                self.avail[board] = now + self.hold_of(ask)
            return choice, backfilled, now
        start, planned = self.plan(ask)
        hard = not self.policy.backfill or now - ask.since >= self.policy.bound or start <= now
        if hard:
            # Strict FIFO for it: every free board it could use stays idle until it starts.
            keep = {b for b in self.pool if b in ask.boards
                    and ask.request.matches(self.snap.boards[b])}
            self.pool -= keep
            for board in keep:
                self.avail[board] = max(start, now) + self.hold_of(ask)
        else:
            for board in planned:
                if board in self.pool:
                    self.limit[board] = min(self.limit.get(board, math.inf), start)
        for board in planned:
            self.avail[board] = max(start, now) + self.hold_of(ask)
        return None, False, None if math.isinf(start) else start


def _choice(picked: Sequence[BoardInfo]) -> Choice:
    """The :class:`Choice` of boards already ranked best first (as :func:`choose` makes it)."""
    return Choice(tuple(b.id for b in picked),
                  frozenset(b.id for b in picked if b.health is not BoardHealth.GOOD))


def _competes(ask: Ask, me: Ask, usable: Mapping[str, BoardInfo]) -> bool:
    return any(ask.request.matches(usable[b]) and me.request.matches(usable[b])
               for b in ask.boards & me.boards if b in usable)


def decide(snap: Snapshot, queue: Sequence[Ask], me: Ask, policy: Policy,
           mine: Iterable[str] = ()) -> Decision:
    """Boards for ``me`` now, or None and why (see the module docstring for the rules).

    ``queue``: the live waiting requests (``me`` among them if it already has a ticket).
    ``mine``: free boards blocked for everyone else but usable by ``me`` (the person holding
    them at the bench asks for them).
    """
    replay = _Replay(snap, policy)
    others = [a for a in queue if a.seq != me.seq]
    ahead: list[Ask] = []
    for ask in queue_order([*others, me], snap.now, policy):
        if ask is me:
            break
        if not replay.can_ever(ask):
            continue  # it waits on a person or a host: it must not block others
        if _competes(ask, me, replay.usable):
            ahead.append(ask)
        replay.serve(ask)
    choice, backfilled = replay.offer(me, mine)
    if choice is not None:
        return Decision(choice, tuple(ahead), backfilled=backfilled)
    start, _ = replay.plan(me)
    return Decision(None, tuple(ahead), None if math.isinf(start) else max(start, snap.now))


def grants(snap: Snapshot, queue: Sequence[Ask], policy: Policy
           ) -> list[tuple[Ask, Choice, bool]]:
    """Every waiting request that gets boards now, in service order (with "by backfill").

    What the waiters' own decisions come to when each decides in turn; one replay instead of
    one per waiter (the simulation in :mod:`.simulate` uses it).
    """
    replay = _Replay(snap, policy)
    result = []
    for ask in queue_order(queue, snap.now, policy):
        if replay.can_ever(ask):
            choice, backfilled, _ = replay.serve(ask)
            if choice is not None:
                result.append((ask, choice, backfilled))
    return result


def forecast(snap: Snapshot, queue: Sequence[Ask], policy: Policy) -> list[Forecast]:
    """Every waiting request in service order, with its expected start."""
    replay = _Replay(snap, policy)
    result: list[Forecast] = []
    for position, ask in enumerate(queue_order(queue, snap.now, policy), start=1):
        start = replay.serve(ask)[2] if replay.can_ever(ask) else None
        result.append(Forecast(ask, position, ask.effective_priority(snap.now, policy), start))
    return result
