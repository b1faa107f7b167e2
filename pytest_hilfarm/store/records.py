"""The farm store's records and rules: health states, lease outcomes, the records both stores
return, and :class:`FarmStoreProtocol`, the seam each backend implements.

Job: say what is recorded and what an outcome means for a board (``OUTCOMES_NEEDING_CHECK``,
``check_due_reason``). Must not: open a database, lock boards, talk to hardware, import pytest.
"""


from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from pytest_hilfarm.errors import InfrastructureError, UsageError

# Why 3: DESIGN.md "Board lifecycle": three failed health checks in a row quarantine a board.
QUARANTINE_AFTER = 3
# Long enough to ride out a burst of writers on a 2-core CI box, short enough that a wedged
# writer surfaces as an error instead of a hung test session.
BUSY_TIMEOUT_MS = 10_000


class BoardHealth(str, Enum):
    """A board's health, as LAVA models it (Good / Unknown / Bad, plus a manual quarantine)."""

    GOOD = "GOOD"
    UNKNOWN = "UNKNOWN"  # needs a health check before a test may use it
    BAD = "BAD"  # the last health check failed (counted; see QUARANTINE_AFTER)
    QUARANTINED = "QUARANTINED"  # never allocated until a person restores it


class LeaseOutcome(str, Enum):
    """How a lease ended, per board. Only infrastructure trouble changes a board's health."""

    OK = "ok"
    FAILED = "failed"  # the test failed: the firmware's fault, not the board's
    SKIPPED = "skipped"
    INFRA_ERROR = "infra_error"  # flash error, no banner, port vanished -> UNKNOWN
    ABORTED = "aborted"  # interrupted mid-use (Ctrl-C): the board's state is unknown -> UNKNOWN
    HOLDER_DIED = "holder_died"  # the holder was killed; found by the next reserver -> UNKNOWN
    TIMEOUT = "timeout"  # the request was never granted
    # The firmware on the board did not start (a candidate that panics or boot-loops): the next
    # user must not get a board that only boots into a crash -> UNKNOWN, and the health check
    # flashes the baseline back.
    BROKEN_APP = "broken_app"


# Outcomes after which nobody knows what state the board is in (fail closed).
OUTCOMES_NEEDING_CHECK = frozenset(
    {LeaseOutcome.INFRA_ERROR, LeaseOutcome.ABORTED, LeaseOutcome.HOLDER_DIED,
     LeaseOutcome.BROKEN_APP}
)

# Which per-board outcome names a whole lease (the worst one); the same for every backend.
SEVERITY: Mapping[LeaseOutcome, int] = {
    LeaseOutcome.HOLDER_DIED: 6,
    LeaseOutcome.INFRA_ERROR: 5,
    LeaseOutcome.ABORTED: 4,
    LeaseOutcome.BROKEN_APP: 3,
    LeaseOutcome.FAILED: 2,
    LeaseOutcome.SKIPPED: 1,
    LeaseOutcome.OK: 0,
    LeaseOutcome.TIMEOUT: 0,
}

# Test-result outcomes that count as a pass (an expected failure is what the suite wants) and as
# a failure; any other outcome (skipped) counts as neither in pass rates.
PASSING_OUTCOMES = ("passed", "ok", "xfail")
FAILING_OUTCOMES = ("failed", "error")

# The words `hilfarm status` starts a health reason with when a board waits for its check.
CHECK_DUE = "health check due"
_WHY_CHECK = {
    LeaseOutcome.INFRA_ERROR: "a rig fault",
    LeaseOutcome.ABORTED: "interrupted",
    LeaseOutcome.HOLDER_DIED: "its holder died without releasing it",
    LeaseOutcome.BROKEN_APP: "the firmware on it did not start",
}


def overall_outcome(per_board: Mapping[str, LeaseOutcome]) -> LeaseOutcome:
    """The outcome recorded for a whole lease: its worst board's."""
    return max(per_board.values(), key=lambda o: SEVERITY[o])


def check_due_reason(outcome: LeaseOutcome, *, holder: str, since: str = "",
                     at: float | None = None, note: str = "") -> str:
    """The health reason of a board a lease left for a health check: why, who, when.

    ``holder`` describes the owner (pid, host, user, test, CI job); ``note`` adds detail (the
    signal that interrupted it, the first line of a rig fault).
    """
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if at is None else at))
    why = _WHY_CHECK.get(outcome, f"lease ended with {outcome.value}")
    text = f"{CHECK_DUE}: {why}"
    if note:
        text += f" ({note})"
    text += f"; held by {holder}"
    if since:
        text += f" since {since}"
    verb = "found" if outcome is LeaseOutcome.HOLDER_DIED else "released"
    return text + f", {verb} at {when}"


def outcome_of(exc: BaseException | None) -> LeaseOutcome:
    """How a lease used as a context manager ended, from the exception that ended it.

    Fail closed: a rig fault or an interruption leaves the boards in an unknown state; an
    ordinary exception is the test's business and says nothing about the hardware.
    """
    if exc is None:
        return LeaseOutcome.OK
    if isinstance(exc, InfrastructureError):
        return LeaseOutcome.INFRA_ERROR
    if not isinstance(exc, Exception):
        return LeaseOutcome.ABORTED
    return LeaseOutcome.FAILED


def board_outcomes(boards: Sequence[str], outcomes: Mapping[str, str | LeaseOutcome] | None,
                   default: str | LeaseOutcome, *, where: str) -> dict[str, LeaseOutcome]:
    """Each of a lease's boards with its outcome: the named ones, ``default`` for the rest."""
    per_board = {b: parse_outcome(default, where=where) for b in boards}
    for board, outcome in (outcomes or {}).items():
        if board not in per_board:
            raise UsageError(
                f"outcome given for board {board!r}, which this lease does not hold",
                where=where,
                hint=f"name only the lease's boards: {', '.join(boards)}",
            )
        per_board[board] = parse_outcome(outcome, where=where)
    return per_board


def parse_outcome(value: str | LeaseOutcome, *, where: str) -> LeaseOutcome:
    """Turn ``"ok"`` (or a :class:`LeaseOutcome`) into a :class:`LeaseOutcome`, or explain."""
    try:
        return LeaseOutcome(value)
    except ValueError:
        allowed = ", ".join(o.value for o in LeaseOutcome)
        raise UsageError(
            f"unknown lease outcome {value!r}", where=where, hint=f"use one of: {allowed}"
        ) from None


@dataclass(frozen=True)
class BoardState:
    """A board's health record. Boards never seen are UNKNOWN: a new board is checked first."""

    board: str
    health: BoardHealth
    failures: int  # consecutive failed health checks
    reason: str
    changed_at: float | None  # epoch seconds; None if never recorded


@dataclass(frozen=True)
class HealthEvent:
    board: str
    old: BoardHealth
    new: BoardHealth
    reason: str
    at: float


@dataclass(frozen=True)
class FlashRecord:
    """What the farm last wrote at one flash offset of a board."""

    board: str
    offset: int
    digest: str  # hex
    algorithm: str  # "sha256" or "md5" (esptool's on-device region check is MD5)
    size: int
    at: float


@dataclass(frozen=True)
class HoldRecord:
    """A person holding a board at the bench (``hilfarm lock BOARD --reason``)."""

    board: str
    person: str
    reason: str
    since: float


@dataclass(frozen=True)
class ReservationRecord:
    """One reservation request and how it ended (times are epoch seconds)."""

    lease_id: str
    boards: tuple[str, ...]
    owner: Mapping[str, Any]
    request: str
    requested_at: float
    granted_at: float | None
    released_at: float | None
    outcome: str | None
    wait_s: float
    board_outcomes: Mapping[str, str]


@dataclass(frozen=True)
class LeaseRecord:
    """A whole lease for :meth:`FarmStoreProtocol.record_lease`: request, grant and end at once."""

    lease_id: str
    boards: tuple[str, ...]
    owner: Mapping[str, Any]
    request: str
    requested_at: float
    granted_at: float
    wait_s: float
    released_at: float
    outcome: str
    board_outcomes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TestResult:
    board: str
    test_id: str
    outcome: str
    duration: float
    firmware_sha256: str | None
    at: float


@dataclass(frozen=True)
class PassRate:
    passed: int
    total: int

    @property
    def rate(self) -> float | None:
        return self.passed / self.total if self.total else None


@dataclass(frozen=True)
class BoardLease:
    """One board of one lease, for reports: which test held it, how that ended, when."""

    board: str
    lease_id: str
    test_id: str
    outcome: str | None  # None: still held (or its holder died and nobody noticed yet)
    requested_at: float
    granted_at: float | None
    released_at: float | None


class FarmStoreProtocol(Protocol):
    """What the farm needs from a store. SQLite today; PostgreSQL later (issue 8)."""

    def close(self) -> None: ...
    def health(self, board: str) -> BoardState: ...
    def all_health(self, boards: Sequence[str] | None = None) -> dict[str, BoardState]: ...
    def set_health(self, board: str, health: BoardHealth, reason: str) -> BoardHealth: ...
    def record_check(self, board: str, ok: bool, detail: str) -> BoardHealth: ...
    def restore(self, board: str, person: str) -> BoardHealth: ...
    def quarantine(self, board: str, reason: str) -> BoardHealth: ...
    def health_history(self, board: str, limit: int = 50) -> list[HealthEvent]: ...
    def record_flash(
        self, board: str, offset: int, digest: str, size: int, *, algorithm: str = "sha256"
    ) -> None: ...
    def flashed_digest(self, board: str, offset: int) -> FlashRecord | None: ...
    def forget_flash(self, board: str) -> None: ...
    def record_reservation(
        self,
        lease_id: str,
        boards: Sequence[str],
        owner: Mapping[str, Any],
        request: str,
        requested_at: float,
        granted_at: float | None,
        wait_s: float,
    ) -> None: ...
    def record_release(
        self,
        lease_id: str,
        released_at: float,
        outcome: str,
        board_outcomes: Mapping[str, str] | None = None,
    ) -> bool: ...
    def record_lease(self, lease: LeaseRecord) -> bool: ...
    def change_token(self) -> object | None: ...
    def history(self, board: str | None = None, limit: int = 100) -> list[ReservationRecord]: ...
    def hold_times(self, test_id: str, limit: int = 50) -> list[float]: ...
    def record_result(
        self,
        board: str,
        test_id: str,
        outcome: str,
        duration: float,
        firmware_sha256: str | None = None,
        at: float | None = None,
    ) -> None: ...
    def results(self, board: str, since: float = 0.0, limit: int = 1000) -> list[TestResult]: ...
    def pass_rate(self, board: str, since: float = 0.0) -> PassRate: ...
    def add_hold(self, board: str, person: str, reason: str) -> HoldRecord: ...
    def remove_hold(self, board: str) -> HoldRecord | None: ...
    def holds(self) -> dict[str, HoldRecord]: ...


