"""The farm health sweep (``hilfarm health --all``): check every idle board, never a busy one.

Rigs need regular health checks (the design's maintenance pitfall): run this from a systemd timer
or a CI schedule. Each board is reserved with a zero timeout, so a board a test holds, a board a
person holds at the bench and a board someone is already waiting for are skipped, not waited on
(the sweep never delays a test); a quarantined board is skipped too (only a person brings it
back). Each check's console log goes to ``<state_dir>/health-logs/<board>/<UTC time>.log`` (the
newest few are kept), where the dashboard finds the last failed check's log.

Must not: wait for a board, check a reserved one, or clear a quarantine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_hilfarm.errors import HilfarmError, InfrastructureError, ReservationTimeout
from pytest_hilfarm.store import BoardHealth

KEEP_LOGS = 10


@dataclass(frozen=True)
class SweepResult:
    board: str
    checked: bool  # False: skipped (busy, held, quarantined, unplugged)
    ok: bool
    health: str
    detail: str
    log: Path | None
    seconds: float


def health_log_dir(state_dir: Path, board: str) -> Path:
    return state_dir / "health-logs" / board


def latest_health_log(state_dir: Path, board: str) -> Path | None:
    """The newest health check log of ``board`` on this machine, if any."""
    logs = sorted(health_log_dir(state_dir, board).glob("*.log"))
    return logs[-1] if logs else None


def _prune(directory: Path) -> None:
    for old in sorted(directory.glob("*.log"))[:-KEEP_LOGS]:
        old.unlink(missing_ok=True)


def sweep(farm: Any, *, boards: list[str] | None = None,
          on_result: Callable[[SweepResult], None] | None = None) -> list[SweepResult]:
    """Health-check each idle board of ``farm`` (all, or ``boards``), one after another."""
    results = []
    for board_id in boards or [b.id for b in farm.boards]:
        started = time.monotonic()
        result = _one(farm, board_id, started)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def _one(farm: Any, board_id: str, started: float) -> SweepResult:
    def skipped(why: str) -> SweepResult:
        health = farm.store.health(board_id).health.value
        return SweepResult(board_id, False, True, health, why, None,
                           time.monotonic() - started)

    if farm.store.health(board_id).health is BoardHealth.QUARANTINED:
        return skipped("skipped: quarantined (a person restores it: hilfarm board restore)")
    try:
        lease = farm.reserve(1, only=[board_id], timeout=0, reason="hilfarm health --all")
    except ReservationTimeout:
        return skipped("skipped: in use, held at the bench, or waited for")
    except InfrastructureError as exc:  # unplugged, quarantined meanwhile, host offline
        return skipped(f"skipped: {exc.what}")
    log_dir = health_log_dir(farm.rack.state_dir, board_id)
    now = time.time()  # to the millisecond: two sweeps in one second keep two logs
    log = log_dir / (time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
                     + f"{int(now * 1000) % 1000:03d}Z.log")
    with lease:
        try:
            device = farm.open_device(board_id, log_path=log)
        except HilfarmError as exc:  # the check could not start (its port, its rig host)
            return SweepResult(board_id, False, False, farm.store.health(board_id).health.value,
                               str(exc), None, time.monotonic() - started)
        try:
            health = farm.health_check(device)
            ok, detail = True, farm.store.health(board_id).reason
        except HilfarmError as exc:  # the check ran and failed (recorded by the check)
            health, ok, detail = farm.store.health(board_id).health, False, str(exc)
        finally:
            device.console.close()
    # The verdict at the end of the console log: a person reading it needs no other window.
    with log.open("a", encoding="utf-8") as out:
        stamp = time.strftime("%H:%M:%S", time.gmtime())
        out.write(f"[{stamp}] --- hilfarm health check {'passed' if ok else 'FAILED'} "
                  f"({health.value}): {detail}\n")
    _prune(log_dir)
    return SweepResult(board_id, True, ok, health.value, detail, log,
                       time.monotonic() - started)
