"""The pure scheduling decision: table tests, and the starvation bound under adversarial holds."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import pytest

from pytest_hilfarm.reservation.allocate import BoardInfo, BoardRequest, Choice, choose
from pytest_hilfarm.reservation.scheduler import (
    NEWCOMER,
    Ask,
    Policy,
    Snapshot,
    decide,
    forecast,
    grants,
    queue_order,
)
from pytest_hilfarm.reservation.simulate import Job, Run, simulate, utilisation

ESP = {f"b{i}": BoardInfo(f"b{i}", "esp32") for i in (1, 2, 3)}
RACK = {**ESP, "c1": BoardInfo("c1", "esp32c3")}
IDS = frozenset(RACK)
NOW = 1000.0
POLICY = Policy(bound=60.0, ageing=30.0)


def esp(count: int) -> BoardRequest:
    return BoardRequest(count, "esp32")


def ask(seq: int, count: int = 1, *, hold: float | None = None, priority: int = 0,
        waited: float = 0.0, chip: str = "esp32") -> Ask:
    return Ask(seq, BoardRequest(count, chip), IDS, priority, NOW - waited, hold, f"r{seq}")


def snap(free: Sequence[str], ends: dict[str, float] | None = None,
         blocked: Sequence[str] = ()) -> Snapshot:
    return Snapshot(NOW, RACK, frozenset(free), ends or {}, frozenset(blocked))


# A 3-board request (#1) waits: b1 is leased until NOW+10, b2 and b3 are free.
BIG_WAITS = dict(free=["b2", "b3", "c1"], ends={"b1": NOW + 10})

CASES = [
    # name, snapshot, queue, me, policy, expected boards (None: waits), by backfill
    ("a free board and nobody waiting", snap(["b1", "b2", "b3"]), [],
     ask(NEWCOMER), POLICY, ("b1",), False),
    ("a short request with history fits before the big one's start",
     snap(**BIG_WAITS), [ask(1, 3, hold=5)], ask(NEWCOMER, hold=5), POLICY, ("b2",), True),
    ("one that would end after the big one's start waits",
     snap(**BIG_WAITS), [ask(1, 3, hold=5)], ask(NEWCOMER, hold=10.5), POLICY, None, False),
    ("ending exactly at the start is not before it",
     snap(**BIG_WAITS), [ask(1, 3, hold=5)], ask(NEWCOMER, hold=10), POLICY, None, False),
    ("no history: never backfills (conservative)",
     snap(**BIG_WAITS), [ask(1, 3, hold=5)], ask(NEWCOMER), POLICY, None, False),
    ("after waiting the bound, the big one's boards are kept (strict FIFO for it)",
     snap(**BIG_WAITS), [ask(1, 3, hold=5, waited=60)], ask(NEWCOMER, hold=1), POLICY,
     None, False),
    ("the lease it waits for ran past its expected end: nothing fits before it",
     snap(free=["b2", "b3"], ends={"b1": NOW - 1}), [ask(1, 3, hold=5)], ask(NEWCOMER, hold=0.1),
     POLICY, None, False),
    ("strict FIFO keeps every board the waiting request could use",
     snap(**BIG_WAITS), [ask(1, 3, hold=5)], ask(NEWCOMER, hold=1), Policy(backfill=False),
     None, False),
    ("a request for another chip does not wait behind it",
     snap(**BIG_WAITS), [ask(1, 3, hold=5)], ask(NEWCOMER, chip="esp32c3"), POLICY,
     ("c1",), False),
    ("a ticket waiting on a held board does not block others",
     snap(free=["b1", "b2"], blocked=["b3"]), [ask(1, 3)], ask(NEWCOMER), POLICY, ("b1",), False),
    ("higher priority goes first", snap(["b1"]), [ask(1, priority=0)],
     ask(NEWCOMER, priority=5), POLICY, ("b1",), False),
    ("lower priority waits behind an older request", snap(["b1"]), [ask(1, priority=0)],
     ask(NEWCOMER, priority=-1), POLICY, None, False),
    ("ageing: two steps of waiting make up two steps of priority", snap(["b1"]),
     [ask(1, priority=-2, waited=60.0)], ask(NEWCOMER, priority=0), POLICY, None, False),
    ("not yet aged enough", snap(["b1"]), [ask(1, priority=-2, waited=59.0)],
     ask(NEWCOMER, priority=0), POLICY, ("b1",), False),
    ("a ticket ahead that can run takes its boards first", snap(["b1", "b2"]), [ask(1, 2)],
     ask(NEWCOMER), POLICY, None, False),
    ("the asker's own ticket is not ahead of itself", snap(["b1"]), [ask(1), ask(2)],
     ask(1), POLICY, ("b1",), False),
]


@pytest.mark.parametrize(("name", "snapshot", "queue", "me", "policy", "boards", "backfilled"),
                         CASES, ids=[c[0] for c in CASES])
def test_decide(name: str, snapshot: Snapshot, queue: list[Ask], me: Ask, policy: Policy,
                boards: tuple[str, ...] | None, backfilled: bool) -> None:
    decision = decide(snapshot, queue, me, policy)
    got = None if decision.choice is None else decision.choice.boards
    assert (got, decision.backfilled) == (boards, backfilled)


def test_waiting_decision_names_who_is_ahead_and_when_it_may_start() -> None:
    decision = decide(snap(**BIG_WAITS), [ask(1, 3, hold=5)], ask(NEWCOMER), POLICY)
    assert [a.seq for a in decision.ahead] == [1]
    # The big one starts at NOW+10 and holds 5 s; then a board is free for this one.
    assert decision.start == NOW + 15


def test_the_person_holding_a_board_may_take_it() -> None:
    held = snap(free=["b2"], blocked=["b1"])
    only_b1 = Ask(NEWCOMER, BoardRequest(1, only=frozenset({"b1"})), IDS, 0, NOW, None, "erin")
    assert decide(held, [], only_b1, POLICY).choice is None
    decision = decide(held, [], only_b1, POLICY, mine={"b1"})
    assert decision.choice is not None and decision.choice.boards == ("b1",)


def test_forecast_orders_by_priority_and_foresees_starts() -> None:
    queue = [ask(1, 3, hold=5), ask(2, 1, hold=20, priority=-1), ask(3, 1, chip="esp32c3")]
    rows = forecast(snap(free=["b2", "b3"], ends={"b1": NOW + 10, "c1": NOW + 4}), queue, POLICY)
    assert [(r.ask.seq, r.position, r.start) for r in rows] == [
        (1, 1, NOW + 10), (3, 2, NOW + 4), (2, 3, NOW + 15)]
    assert queue_order(queue, NOW, POLICY)[0].seq == 1


def test_grants_serves_everyone_who_can_run_in_one_replay() -> None:
    queue = [ask(1, 3, hold=5), ask(2, 1, hold=1), ask(3, 1, chip="esp32c3"), ask(4, 1)]
    got = grants(snap(**BIG_WAITS), queue, POLICY)
    assert [(a.seq, c.boards, bf) for a, c, bf in got] == [(2, ("b2",), True), (3, ("c1",), False)]


# --- the starvation bound, against adversarial hold times ------------------------------------

BOARDS = list(ESP.values())


def _greedy(snapshot: Snapshot, queue: Sequence[Ask], policy: Policy
            ) -> list[tuple[Ask, Choice, bool]]:
    """The control: whoever finds free boards takes them (no queue, no plans)."""
    pool = set(snapshot.free)
    out = []
    for waiting in sorted(queue, key=lambda a: a.seq):
        choice = choose([snapshot.boards[b] for b in pool if b in waiting.boards],
                        waiting.request)
        if choice is not None:
            pool -= set(choice.boards)
            out.append((waiting, choice, False))
    return out


class Adversary:
    """A 3-board request among liars, in simulated time.

    b1 is leased from time 0 by a request whose history over-estimates it (expected 60 s, really
    0.5-3 s), so the big request's plan starts far in the future and much fits before it. Four
    closed-loop clients ask for one board each, back to back; each claims a hold of 20-400 ms
    (their history) and really holds exactly that long or up to 4 times as long.
    """

    def __init__(self, seed: int, bound: float, rule=grants) -> None:  # noqa: ANN001
        rng = random.Random(seed)
        self.blocker = rng.uniform(0.5, 3.0)
        self.claims: list[float] = []
        self.holds: list[float] = []

        def liar(name: str, at: float) -> Job:
            claim = rng.uniform(0.02, 0.4)
            hold = claim * rng.choice([1.0, rng.uniform(1.0, 4.0)])
            self.claims.append(claim)
            self.holds.append(hold)
            return Job(name, at, esp(1), hold, expected=claim)

        def again(run: Run) -> list[Job]:
            if run.job.name.startswith("liar") and run.start < 30:
                return [liar(run.job.name, run.end)]
            return []

        big = Job("big", 0.2, esp(3), 1.0, expected=1.0)
        runs = simulate(BOARDS, [big, *(liar(f"liar{i}", 0.0) for i in range(4))],
                        Policy(bound=bound), then=again,
                        running=[(("b1",), self.blocker, 60.0)], horizon=60, rule=rule)
        self.runs = runs
        self.big = next((r for r in runs if r.job is big), None)
        # Strict FIFO would start it when the leases running at its arrival have ended.
        self.fifo_start = max([self.blocker] + [r.end for r in runs if r.start < big.arrival])
        self.arrival = big.arrival

    def overtakers(self, bound: float) -> list[Run]:
        """Later requests that started after the big one had waited longer than ``bound``."""
        assert self.big is not None
        return [r for r in self.runs if r.job.arrival > self.arrival
                and self.arrival + bound < r.start < self.big.start]


@pytest.mark.parametrize("seed", range(30))
def test_wrong_estimates_delay_a_waiting_request_by_two_holds_at_most(seed: int) -> None:
    run = Adversary(seed, bound=math.inf)
    assert run.big is not None, "the 3-board request never started"
    # Backfill onto its plan must claim to end before its expected start, and that start only
    # moves earlier once its real blockers are gone: so at most one claimed hold plus one real
    # hold pass after strict FIFO would have started it.
    limit = run.fifo_start + max(run.claims) + max(run.holds)
    assert run.big.start <= limit + 1e-9, (run.big.start, run.fifo_start)


@pytest.mark.parametrize("seed", range(30))
def test_no_request_is_overtaken_after_waiting_the_bound(seed: int) -> None:
    bound = 0.3
    run = Adversary(seed, bound=bound)
    assert run.big is not None
    assert run.overtakers(bound) == []
    assert run.big.start <= max(run.fifo_start, run.arrival + bound) + max(run.holds) + 1e-9


def test_without_the_bound_backfill_goes_on_while_the_over_estimated_lease_runs() -> None:
    # The control for the test above: EASY alone lets requests that fit before the (wrongly
    # far) expected start overtake for as long as the blocker runs.
    overtaken = sum(bool(Adversary(seed, bound=math.inf).overtakers(0.3)) for seed in range(30))
    assert overtaken >= 25


def test_the_control_starves_the_big_request() -> None:
    # The same workload under "whoever finds free boards takes them": the 3-board request
    # waits until the liars stop, so the checks above can fail.
    starved = 0
    for seed in range(30):
        run = Adversary(seed, bound=math.inf, rule=_greedy)
        limit = run.fifo_start + max(run.claims) + max(run.holds)
        if run.big is None or run.big.start > limit:
            starved += 1
    assert starved >= 25


def test_backfill_beats_strict_fifo_on_the_benchmark_mix() -> None:
    # 8 clients over 3 boards, 1-3 board requests of 5-20 ms, each test with a steady hold:
    # backfill keeps boards busier than strict FIFO (the bench measures the real thing).
    def run(policy: Policy) -> float:
        rng = random.Random(7)
        tests = [(rng.randint(1, 3), rng.uniform(0.005, 0.020)) for _ in range(12)]

        def job(client: int, at: float) -> Job:
            count, hold = tests[rng.randrange(len(tests))]
            return Job(f"c{client}", at, esp(count), hold, expected=hold * 1.05)

        runs = simulate(BOARDS, [job(i, 0.0) for i in range(8)], policy,
                        then=lambda r: [job(int(r.job.name[1:]), r.end)] if r.start < 10 else [])
        return utilisation(runs, 3, until=10.0)

    fifo, backfill = run(Policy(backfill=False)), run(Policy())
    assert backfill > fifo + 0.05, (fifo, backfill)
    assert backfill > 0.9
