"""Nightly regression analysis: the farm's history turned into what a team acts on.

From the results per test, board and firmware and the per-board lease outcomes of a window (say
the last 7 days), :func:`analyse` computes per test the pass rate, the duration trend, whether
it is flaky (passed and failed on the same firmware) and a bisect hint (the last firmware it
passed on and the first of an unbroken run of firmwares it failed on); per board the
infrastructure-error rate and failed health checks, so a bad cable is told apart from a bad
test; per suite (a test file) the pass rate per day and whether it drifted down by more than a
threshold (98 % to 90 % is debt piling up). Quarantined tests are named with their entry.

Must not: read the store or the clock itself (callers pass the history and ``now``), or decide
anything for the farm (it only reports).
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from pytest_hilfarm.description.quarantine import Quarantine, QuarantineEntry
from pytest_hilfarm.errors import UsageError
from pytest_hilfarm.store import (
    FAILING_OUTCOMES,
    PASSING_OUTCOMES,
    BoardLease,
    HealthEvent,
    TestResult,
)

DAY = 86400.0
PASSING = frozenset(PASSING_OUTCOMES)
FAILING = frozenset(FAILING_OUTCOMES)


class HistorySource(Protocol):
    """The store queries the report reads (both backends have them)."""

    def results_since(self, since: float, until: float | None = None) -> list[TestResult]: ...
    def lease_outcomes_since(self, since: float) -> list[BoardLease]: ...
    def health_events_since(self, since: float) -> list[HealthEvent]: ...


@dataclass(frozen=True)
class Thresholds:
    """When the report flags something; the defaults are the design's examples."""

    drift: float = 0.05  # a suite's pass rate falling this much (98 % -> 93 %) is flagged
    # ... when the fall is also unlikely to be chance (one-sided Fisher exact test): a suite of
    # ten runs a day moves by ten points with one failure.
    significance: float = 0.05
    sick_infra_rate: float = 0.10  # a board with this share of its leases ending in rig faults
    sick_min_errors: int = 2  # ... and at least this many, so one fault in five is not "sick"
    slower: float = 0.25  # a test whose median duration grew this much over the window


@dataclass(frozen=True)
class FirmwareRuns:
    """One firmware (its SHA-256) as one test saw it."""

    sha256: str
    first_seen: float  # when the farm first ran any test on it (orders the candidates)
    passed: int
    failed: int

    @property
    def short(self) -> str:
        return self.sha256[:12] or "(unknown)"


@dataclass(frozen=True)
class BisectHint:
    """Where to start a bisect: the last firmware a test passed on, the first it broke on."""

    last_good: FirmwareRuns | None  # None: it failed on every firmware of the window
    first_bad: FirmwareRuns
    failing_firmwares: int  # how many firmwares in a row it failed on, first_bad included
    failed_runs: int


@dataclass(frozen=True)
class TestSummary:
    test_id: str
    suite: str
    passed: int
    failed: int
    duration_median: float
    duration_by_day: tuple[tuple[float, float], ...]  # (day start, median seconds)
    duration_change: float | None  # last day's median over the first day's, minus 1
    slower: bool
    flaky_on: tuple[FirmwareRuns, ...]  # firmwares it both passed and failed on
    failures_by_board: Mapping[str, int]
    bisect: BisectHint | None
    quarantine: QuarantineEntry | None

    @property
    def runs(self) -> int:
        return self.passed + self.failed

    @property
    def pass_rate(self) -> float | None:
        return self.passed / self.runs if self.runs else None

    @property
    def flaky(self) -> bool:
        return bool(self.flaky_on)


@dataclass(frozen=True)
class BoardSummary:
    board: str
    leases: int
    infra_errors: int  # leases that ended in a rig fault (flash error, port gone, no banner)
    holder_died: int
    broken_app: int  # the firmware on it did not start (the firmware's fault, counted apart)
    failed_checks: int
    passed: int
    failed: int
    sick: bool
    reasons: tuple[str, ...]

    @property
    def infra_rate(self) -> float:
        return self.infra_errors / self.leases if self.leases else 0.0

    @property
    def fail_rate(self) -> float | None:
        runs = self.passed + self.failed
        return self.failed / runs if runs else None


@dataclass(frozen=True)
class DayRate:
    day: float
    passed: int
    total: int

    @property
    def rate(self) -> float:
        return self.passed / self.total if self.total else math.nan


@dataclass(frozen=True)
class SuiteTrend:
    suite: str
    by_day: tuple[DayRate, ...]
    early: float | None  # pooled pass rate of the window's first third of days
    late: float | None  # ... and of its last third
    drifted: bool
    p_value: float | None = None  # chance of a fall this large with an unchanged pass rate

    @property
    def drop(self) -> float:
        return (self.early - self.late) if self.early is not None and self.late is not None \
            else 0.0


@dataclass(frozen=True)
class QuarantineStatus:
    entry: QuarantineEntry
    tests: tuple[str, ...]  # the tests of the window it covers
    passed: int
    failed: int


@dataclass(frozen=True)
class Report:
    since: float
    until: float
    thresholds: Thresholds
    tests: tuple[TestSummary, ...]
    boards: tuple[BoardSummary, ...]
    suites: tuple[SuiteTrend, ...]
    quarantine: tuple[QuarantineStatus, ...]
    quarantine_source: str = ""
    firmware_order: tuple[tuple[str, float], ...] = field(default=())

    @property
    def flaky(self) -> tuple[TestSummary, ...]:
        return tuple(t for t in self.tests if t.flaky)

    @property
    def broken(self) -> tuple[TestSummary, ...]:
        return tuple(t for t in self.tests if t.bisect is not None)

    @property
    def sick_boards(self) -> tuple[BoardSummary, ...]:
        return tuple(b for b in self.boards if b.sick)

    @property
    def drifting(self) -> tuple[SuiteTrend, ...]:
        return tuple(s for s in self.suites if s.drifted)

    @property
    def slower(self) -> tuple[TestSummary, ...]:
        return tuple(t for t in self.tests if t.slower)

    @property
    def results(self) -> int:
        return sum(t.runs for t in self.tests)


_SPAN = re.compile(r"(\d+(?:\.\d+)?)\s*([mhdw])")
_UNIT = {"m": 60.0, "h": 3600.0, "d": DAY, "w": 7 * DAY}


def parse_since(value: str, now: float) -> float:
    """``7d``, ``36h``, ``90m``, ``2w`` before ``now``, or an ISO date/time (UTC if no zone)."""
    from datetime import datetime, timezone

    match = _SPAN.fullmatch(value.strip().lower())
    if match:
        return now - float(match.group(1)) * _UNIT[match.group(2)]
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise UsageError(f"--since {value!r} is neither a span nor a date", where="--since",
                         hint="e.g. --since 7d, --since 36h, or --since 2026-05-01") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def suite_of(test_id: str) -> str:
    """A test's suite: its file (``examples/test_ota.py`` of ``examples/test_ota.py::test_x``)."""
    return test_id.split("::", 1)[0]


def day_of(epoch: float) -> float:
    return math.floor(epoch / DAY) * DAY


def _outcome(result: TestResult) -> str | None:
    if result.outcome in PASSING:
        return "passed"
    if result.outcome in FAILING:
        return "failed"
    return None  # skipped, not run: says nothing about the firmware


def _bisect(runs: Sequence[FirmwareRuns]) -> BisectHint | None:
    """The last firmware passed on, and the first of the failing run that ends the window."""
    tail: list[FirmwareRuns] = []
    for fw in reversed(runs):
        if fw.passed == 0 and fw.failed > 0:
            tail.insert(0, fw)
        else:
            break
    failed = sum(fw.failed for fw in tail)
    # One failed run on the newest firmware of a test that flakes is not a break yet.
    if not tail or failed < 2:
        return None
    before = runs[len(runs) - len(tail) - 1] if len(runs) > len(tail) else None
    return BisectHint(before, tail[0], len(tail), failed)


def _median_by_day(durations: Iterable[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    per_day: dict[float, list[float]] = defaultdict(list)
    for at, seconds in durations:
        per_day[day_of(at)].append(seconds)
    return tuple((d, statistics.median(v)) for d, v in sorted(per_day.items()))


def _tests(results: Sequence[TestResult], order: Mapping[str, float], quarantine: Quarantine,
           thresholds: Thresholds) -> tuple[TestSummary, ...]:
    by_test: dict[str, list[TestResult]] = defaultdict(list)
    for r in results:
        if _outcome(r) is not None:
            by_test[r.test_id].append(r)
    out = []
    for test_id, rows in sorted(by_test.items()):
        per_fw: dict[str, Counter[str]] = defaultdict(Counter)
        fails: Counter[str] = Counter()
        for r in rows:
            outcome = _outcome(r)
            assert outcome is not None
            per_fw[r.firmware_sha256 or ""][outcome] += 1
            if outcome == "failed":
                fails[r.board] += 1
        runs = [FirmwareRuns(sha, order.get(sha, 0.0), c["passed"], c["failed"])
                for sha, c in sorted(per_fw.items(), key=lambda kv: order.get(kv[0], 0.0))]
        by_day = _median_by_day((r.at, r.duration) for r in rows)
        change = (by_day[-1][1] / by_day[0][1] - 1) if len(by_day) >= 2 and by_day[0][1] > 0 \
            else None
        passed = sum(fw.passed for fw in runs)
        out.append(TestSummary(
            test_id=test_id, suite=suite_of(test_id), passed=passed,
            failed=sum(fw.failed for fw in runs),
            duration_median=statistics.median(r.duration for r in rows),
            duration_by_day=by_day, duration_change=change,
            slower=change is not None and change >= thresholds.slower,
            flaky_on=tuple(fw for fw in runs if fw.passed and fw.failed and fw.sha256),
            failures_by_board=MappingProxyType(dict(fails.most_common())),
            bisect=_bisect([fw for fw in runs if fw.sha256]),
            quarantine=quarantine.match(test_id),
        ))
    return tuple(out)


def _failed_check(event: HealthEvent) -> bool:
    # The store's words (record_check): "check failed (1/3): ...", "3 failed health checks in
    # a row; last: ...", "check failed while quarantined: ...".
    return event.reason.startswith("check failed") or \
        "failed health checks in a row" in event.reason


def _boards(results: Sequence[TestResult], leases: Sequence[BoardLease],
            events: Sequence[HealthEvent], thresholds: Thresholds) -> tuple[BoardSummary, ...]:
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for lease in leases:
        if lease.outcome is not None:
            counts[lease.board]["leases"] += 1
            counts[lease.board][lease.outcome] += 1
    for event in events:
        if _failed_check(event):
            counts[event.board]["failed_checks"] += 1
    for r in results:
        outcome = _outcome(r)
        if outcome is not None:
            counts[r.board][outcome] += 1
    out = []
    for board, c in sorted(counts.items()):
        leases_n, infra = c["leases"], c["infra_error"]
        reasons = []
        if infra >= thresholds.sick_min_errors and leases_n and \
                infra / leases_n >= thresholds.sick_infra_rate:
            reasons.append(f"{infra} of {leases_n} leases ended in a rig fault "
                           f"({infra / leases_n:.0%})")
        if c["failed_checks"] >= 2:
            reasons.append(f"{c['failed_checks']} failed health checks")
        out.append(BoardSummary(board, leases_n, infra, c["holder_died"], c["broken_app"],
                                c["failed_checks"], c["passed"], c["failed"], bool(reasons),
                                tuple(reasons)))
    return tuple(out)


def _pooled(days: Sequence[DayRate]) -> tuple[int, int]:
    return sum(d.passed for d in days), sum(d.total for d in days)


def _suites(results: Sequence[TestResult], thresholds: Thresholds) -> tuple[SuiteTrend, ...]:
    per: dict[str, dict[float, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
    for r in results:
        outcome = _outcome(r)
        if outcome is not None:
            per[suite_of(r.test_id)][day_of(r.at)][outcome] += 1
    out = []
    for suite, days in sorted(per.items()):
        by_day = tuple(DayRate(d, c["passed"], c["passed"] + c["failed"])
                       for d, c in sorted(days.items()))
        early = late = p_value = None
        if len(by_day) >= 2:
            third = max(1, math.ceil(len(by_day) / 3))
            first, last = _pooled(by_day[:third]), _pooled(by_day[-third:])
            early, late = first[0] / first[1], last[0] / last[1]
            if early - late >= thresholds.drift:
                from scipy.stats import fisher_exact

                # One-sided: did the first days pass more often than the last ones?
                table = [[first[0], first[1] - first[0]], [last[0], last[1] - last[0]]]
                p_value = float(fisher_exact(table, alternative="greater").pvalue)
        drifted = p_value is not None and p_value < thresholds.significance
        out.append(SuiteTrend(suite, by_day, early, late, drifted, p_value))
    return tuple(out)


def analyse(results: Sequence[TestResult], leases: Sequence[BoardLease],
            events: Sequence[HealthEvent], *, since: float, until: float,
            quarantine: Quarantine | None = None,
            thresholds: Thresholds | None = None) -> Report:
    """The report of one window of history (``since`` <= at < ``until``)."""
    quarantine = quarantine or Quarantine()
    thresholds = thresholds or Thresholds()
    results = [r for r in results if since <= r.at < until]
    order: dict[str, float] = {}
    for r in results:
        sha = r.firmware_sha256 or ""
        order[sha] = min(order.get(sha, r.at), r.at)
    tests = _tests(results, order, quarantine, thresholds)
    statuses = []
    for entry in quarantine.entries:
        covered = [t for t in tests if entry.matches(t.test_id)]
        statuses.append(QuarantineStatus(entry, tuple(t.test_id for t in covered),
                                         sum(t.passed for t in covered),
                                         sum(t.failed for t in covered)))
    return Report(
        since=since, until=until, thresholds=thresholds, tests=tests,
        boards=_boards(results, [lease for lease in leases if since <= lease.requested_at < until],
                       [e for e in events if since <= e.at < until], thresholds),
        suites=_suites(results, thresholds), quarantine=tuple(statuses),
        quarantine_source=quarantine.source,
        firmware_order=tuple(sorted(((s, t) for s, t in order.items() if s),
                                    key=lambda kv: kv[1])),
    )


def from_store(store: HistorySource, *, since: float, until: float,
               quarantine: Quarantine | None = None,
               thresholds: Thresholds | None = None) -> Report:
    """Read the window's history from a store (SQLite or PostgreSQL) and analyse it."""
    return analyse(store.results_since(since, until), store.lease_outcomes_since(since),
                   store.health_events_since(since), since=since, until=until,
                   quarantine=quarantine, thresholds=thresholds)


def _fw(fw: FirmwareRuns | None) -> dict[str, Any] | None:
    if fw is None:
        return None
    return {"sha256": fw.sha256, "first_seen": fw.first_seen, "passed": fw.passed,
            "failed": fw.failed}


def to_json(report: Report) -> dict[str, Any]:
    """The report as plain JSON (what ``hilfarm report --json`` prints)."""
    return {
        "since": report.since, "until": report.until,
        "thresholds": {"drift": report.thresholds.drift,
                       "significance": report.thresholds.significance,
                       "sick_infra_rate": report.thresholds.sick_infra_rate,
                       "sick_min_errors": report.thresholds.sick_min_errors,
                       "slower": report.thresholds.slower},
        "results": report.results,
        "flaky": [t.test_id for t in report.flaky],
        "broken": [t.test_id for t in report.broken],
        "sick_boards": [b.board for b in report.sick_boards],
        "drifting_suites": [s.suite for s in report.drifting],
        "slower": [t.test_id for t in report.slower],
        "tests": [{
            "test_id": t.test_id, "suite": t.suite, "passed": t.passed, "failed": t.failed,
            "pass_rate": t.pass_rate, "duration_median": t.duration_median,
            "duration_by_day": [list(p) for p in t.duration_by_day],
            "duration_change": t.duration_change, "slower": t.slower, "flaky": t.flaky,
            "flaky_on": [_fw(fw) for fw in t.flaky_on],
            "failures_by_board": dict(t.failures_by_board),
            "bisect": None if t.bisect is None else {
                "last_good": _fw(t.bisect.last_good), "first_bad": _fw(t.bisect.first_bad),
                "failing_firmwares": t.bisect.failing_firmwares,
                "failed_runs": t.bisect.failed_runs},
            "quarantine": None if t.quarantine is None else {
                "pattern": t.quarantine.pattern, "comment": t.quarantine.comment,
                "where": t.quarantine.where},
        } for t in report.tests],
        "boards": [{
            "board": b.board, "leases": b.leases, "infra_errors": b.infra_errors,
            "infra_rate": b.infra_rate, "holder_died": b.holder_died,
            "broken_app": b.broken_app, "failed_checks": b.failed_checks,
            "passed": b.passed, "failed": b.failed, "sick": b.sick, "reasons": list(b.reasons),
        } for b in report.boards],
        "suites": [{
            "suite": s.suite, "early": s.early, "late": s.late, "drifted": s.drifted,
            "p_value": s.p_value,
            "by_day": [{"day": d.day, "passed": d.passed, "total": d.total}
                       for d in s.by_day],
        } for s in report.suites],
        "quarantine": {"source": report.quarantine_source, "entries": [{
            "pattern": q.entry.pattern, "comment": q.entry.comment, "where": q.entry.where,
            "tests": list(q.tests), "passed": q.passed, "failed": q.failed,
        } for q in report.quarantine]},
        "firmware_order": [{"sha256": s, "first_seen": t} for s, t in report.firmware_order],
    }
