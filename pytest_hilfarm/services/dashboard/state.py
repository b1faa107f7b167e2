"""What the dashboard shows, read from the farm in one go: a frozen :class:`Snapshot`.

Every board with its host, chip, health and since when, its holder (user, CI job, test, since)
or bench hold; the waiting queue; quarantined boards with their last failed check (the store's
words and, when the sweep ran it on this machine, its console log); the health checks of the
last days; and per board the health timeline of the window. Works with either backend (it reads
through the reservation backend and the store protocols only).

Must not: reserve, flash, or write to the store.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pytest_hilfarm.services.sweep import latest_health_log
from pytest_hilfarm.store import BoardHealth, HealthEvent

WINDOW_S = 7 * 86400.0
LOG_TAIL_LINES = 60


@dataclass(frozen=True)
class Holder:
    """Who holds a board now: a lease (a test, a CLI command) or a person at the bench."""

    kind: str  # "lease" or "bench"
    user: str
    host: str
    pid: int
    test_id: str
    ci_job: str
    reason: str
    since: float | None  # epoch seconds


@dataclass(frozen=True)
class BoardRow:
    board: str
    chip: str
    host: str  # the rig host, or "" for this rack file's boards on a single host
    online: bool
    health: str
    health_since: float | None
    check_due: bool
    reason: str
    failures: int
    holder: Holder | None
    firmware: str | None


@dataclass(frozen=True)
class QuarantinedBoard:
    board: str
    since: float | None
    reason: str
    last_failed: HealthEvent | None
    log_path: Path | None
    log_tail: str


@dataclass(frozen=True)
class Snapshot:
    at: float
    rack: str
    backend: str
    boards: tuple[BoardRow, ...]
    queue: tuple[Mapping[str, Any], ...]
    quarantined: tuple[QuarantinedBoard, ...]
    checks: tuple[HealthEvent, ...]  # health checks of the window, newest first
    timelines: Mapping[str, tuple[tuple[float, float, str, str], ...]] = field(
        default_factory=lambda: MappingProxyType({}))
    window_start: float = 0.0


def _epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    from datetime import datetime

    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def is_check(event: HealthEvent) -> bool:
    """Whether a health event is a health check's verdict (the store's record_check words)."""
    reason = event.reason
    return reason.startswith(("check passed", "check failed")) or \
        "failed health checks in a row" in reason


def timelines(events: Sequence[HealthEvent], boards: Sequence[str], current: Mapping[str, str],
              start: float, end: float) -> dict[str, tuple[tuple[float, float, str, str], ...]]:
    """Per board: (from, to, state, why) segments covering ``start``..``end``."""
    per: dict[str, list[HealthEvent]] = defaultdict(list)
    for event in events:
        per[event.board].append(event)
    out = {}
    for board in boards:
        evs = sorted(per.get(board, []), key=lambda e: e.at)
        state = evs[0].old.value if evs else current.get(board, BoardHealth.UNKNOWN.value)
        segments: list[tuple[float, float, str, str]] = []
        t0, why = start, "before the window"
        for event in evs:
            if event.new.value != state:
                segments.append((t0, event.at, state, why))
                t0, state = event.at, event.new.value
            why = event.reason
        segments.append((t0, end, state, why))
        out[board] = tuple(s for s in segments if s[1] > s[0] or len(segments) == 1)
    return out


def _tail(path: Path | None) -> str:
    """The log's last lines, with runs of repeated messages (a port flapping) folded."""
    if path is None:
        return ""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    kept: list[str] = []
    recent: list[str] = []  # the last few messages, without their time stamps
    folded = 0
    for line in lines:
        message = line.split("] ", 1)[-1]
        if message in recent:
            folded += 1
            continue
        if folded:
            kept.append(f"    ... {folded} more lines like the ones above")
            folded = 0
        kept.append(line)
        recent = (recent + [message])[-2:]
    if folded:
        kept.append(f"    ... {folded} more lines like the ones above")
    return "\n".join(kept[-LOG_TAIL_LINES:])


def snapshot(farm: Any, *, window_s: float = WINDOW_S) -> Snapshot:
    """Read the whole dashboard's state from ``farm`` (a :class:`~pytest_hilfarm.farm.Farm`)."""
    now = time.time()
    start = now - window_s
    store, reserver = farm.store, farm.reserver
    statuses = {s.board: s for s in reserver.status()}
    rows_by_board = {r["board"]: r for r in farm.status()}
    hosts: dict[str, Any] = {}
    if hasattr(reserver, "host_status"):
        hosts = {r.status.board: r for r in reserver.host_status()}
    health = store.all_health(list(statuses))
    rows = []
    for board, st in statuses.items():
        row = rows_by_board.get(board, {})
        holder = None
        if st.hold is not None:
            holder = Holder("bench", st.hold.person, "", 0, "", "", st.hold.reason,
                            st.hold.since)
        elif st.holder is not None:
            o = st.holder.owner
            holder = Holder("lease", o.user, o.host, o.pid, o.test_id, o.ci_job, o.reason,
                            _epoch(st.holder.since))
        remote = hosts.get(board)
        rows.append(BoardRow(
            board=board, chip=st.chip, host=(remote.host or "") if remote else "",
            online=remote.online if remote else True,
            health=str(row.get("health", st.health.health.value)),
            health_since=health[board].changed_at if board in health else None,
            check_due=bool(row.get("check_due", False)),
            reason=str(row.get("reason", st.health.reason)),
            failures=st.health.failures, holder=holder, firmware=row.get("firmware")))
    events = store.health_events_since(start)
    quarantined = []
    for row in rows:
        if row.health != BoardHealth.QUARANTINED.value:
            continue
        failed = [e for e in store.health_history(row.board, 50)
                  if e.reason.startswith("check failed") or "failed health checks" in e.reason]
        log = latest_health_log(farm.rack.state_dir, row.board)
        quarantined.append(QuarantinedBoard(row.board, row.health_since, row.reason,
                                            failed[0] if failed else None, log, _tail(log)))
    current = {r.board: r.health for r in rows}
    return Snapshot(
        at=now, rack=farm.rack.name, backend=type(store).__name__,
        boards=tuple(rows), queue=tuple(MappingProxyType(q) for q in farm.queue()),
        quarantined=tuple(quarantined),
        checks=tuple(e for e in reversed(events) if is_check(e))[:100],
        timelines=MappingProxyType(timelines(events, [r.board for r in rows], current, start,
                                             now)),
        window_start=start)
