"""A discrete-event simulation of the scheduling policy: jobs and hold times, no boards, no locks.

Job: replay a workload (arrivals, real hold times, the holds the scheduler expects from history)
through :func:`~.scheduler.grants` in simulated time. The benchmarks use it to compare strict FIFO
with backfill on a farm far larger than this machine could run (bench/bench_scheduler.py); the
starvation-bound tests use it with adversarial hold times. It measures the policy alone: locks,
files and the database cost nothing here.

Must not: sleep, read a clock, touch files or the store.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from pytest_hilfarm.reservation.allocate import BoardInfo, BoardRequest, Choice

from .scheduler import Ask, Policy, Snapshot, grants


@dataclass(frozen=True)
class Job:
    """One request in the workload."""

    name: str
    arrival: float
    request: BoardRequest
    hold: float  # how long it really holds its boards
    expected: float | None = None  # what the scheduler expects (history); None: no history
    priority: int = 0


@dataclass(frozen=True)
class Run:
    """A job that got its boards."""

    job: Job
    start: float
    end: float
    boards: tuple[str, ...]
    backfilled: bool

    @property
    def wait(self) -> float:
        return self.start - self.job.arrival


Rule = Callable[[Snapshot, Sequence[Ask], Policy], list[tuple[Ask, Choice, bool]]]


def simulate(boards: Sequence[BoardInfo], jobs: Iterable[Job], policy: Policy, *,
             then: Callable[[Run], Iterable[Job]] | None = None,
             running: Iterable[tuple[tuple[str, ...], float, float]] = (),
             horizon: float = math.inf, rule: Rule = grants) -> list[Run]:
    """Run ``jobs`` to completion (or ``horizon``); returns every job that started.

    ``then(run)`` adds jobs when one starts (a closed-loop client asks again after its hold).
    ``running``: leases already held at time 0, as (boards, real end, expected end).
    ``rule``: who gets boards at each event (another rule serves as a control in tests).
    """
    infos = {b.id: b for b in boards}
    ids = frozenset(infos)
    order = itertools.count()
    events: list[tuple[float, int, str, object]] = []
    for job in jobs:
        heapq.heappush(events, (job.arrival, next(order), "arrive", job))
    leases: dict[str, tuple[float, float]] = {}  # board -> (real end, expected end)
    for held, end, expected in running:
        for board in held:
            leases[board] = (end, expected)
        heapq.heappush(events, (end, next(order), "end", held))
    waiting: dict[int, tuple[Ask, Job]] = {}
    seq = itertools.count(1)
    runs: list[Run] = []
    while events and events[0][0] <= horizon:
        now = events[0][0]
        while events and events[0][0] == now:
            _, _, kind, payload = heapq.heappop(events)
            if kind == "end":
                for board in payload:  # type: ignore[attr-defined]
                    leases.pop(board, None)
            else:
                assert isinstance(payload, Job)
                ask = Ask(next(seq), payload.request, ids, payload.priority, now,
                          payload.expected, payload.name)
                waiting[ask.seq] = (ask, payload)
        snap = Snapshot(now, infos, frozenset(b for b in infos if b not in leases),
                        {b: e for b, (_, e) in leases.items()})
        for ask, choice, backfilled in rule(snap, [a for a, _ in waiting.values()], policy):
            _, job = waiting.pop(ask.seq)
            end = now + job.hold
            expected = now + (policy.default_hold if job.expected is None else job.expected)
            for board in choice.boards:
                leases[board] = (end, expected)
            heapq.heappush(events, (end, next(order), "end", choice.boards))
            run = Run(job, now, end, choice.boards, backfilled)
            runs.append(run)
            for follow in (then(run) if then is not None else ()):
                heapq.heappush(events, (follow.arrival, next(order), "arrive", follow))
    return runs


def utilisation(runs: Sequence[Run], boards: int, until: float | None = None) -> float:
    """Busy board-time over ``boards`` x the span from the first start to the last end."""
    if not runs:
        return 0.0
    first = min(r.start for r in runs)
    last = max(r.end for r in runs) if until is None else until
    busy = sum((min(r.end, last) - r.start) * len(r.boards) for r in runs if r.start < last)
    return busy / (boards * (last - first))
