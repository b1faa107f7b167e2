"""A farm session: the boards one test (or one command) holds, prepared, and how it ends.

:class:`HilSession` holds the lease and one :class:`PreparedBoard` per board (its Device, the
flash report of its preparation, the candidate's digest) and releases the boards with the
test's outcome; :func:`flash_boards` is the command line's reserve-flash-release. Reserving
and preparing are the farm's (:mod:`pytest_hilfarm.farm.core`, :mod:`pytest_hilfarm.farm.prepare`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pytest_hilfarm.board.device import Device
from pytest_hilfarm.drivers.flashing import FlashReport, RegionResult
from pytest_hilfarm.errors import InfrastructureError
from pytest_hilfarm.farm.candidate import Candidate, firmware_plan, resolve_candidate
from pytest_hilfarm.reservation import LeaseProtocol
from pytest_hilfarm.store import LeaseOutcome

if TYPE_CHECKING:
    from pytest_hilfarm.farm.core import Farm


class BoardFault(InfrastructureError):
    """An infrastructure fault on specific boards (they are marked UNKNOWN)."""

    def __init__(self, what: str, *, board_ids: Iterable[str], where: str | None = None,
                 hint: str | None = None) -> None:
        self.board_ids = tuple(board_ids)
        super().__init__(what, where=where, hint=hint)


@dataclass
class PreparedBoard:
    """A board of a session after preparation."""

    device: Device
    report: FlashReport | None
    firmware_sha256: str | None
    firmware_failure: str | None = None
    health_checked: bool = False
    lost_at_start: int = 0  # the console's lost_count when the test got the board

    @property
    def seconds(self) -> float:
        return self.report.seconds if self.report else 0.0

    @property
    def regions(self) -> tuple[RegionResult, ...]:
        """The regions written or skipped while preparing (none when nothing was flashed)."""
        return self.report.regions if self.report else ()


@dataclass
class HilSession:
    """Boards reserved and prepared for one test (or one CLI command)."""

    farm: Farm
    lease: LeaseProtocol
    boards: list[PreparedBoard]
    test_id: str
    started: float = field(default_factory=time.monotonic)
    _finished: bool = False
    candidate: Candidate | None = None

    @property
    def devices(self) -> list[Device]:
        return [b.device for b in self.boards]

    @property
    def flash_reports(self) -> list[PreparedBoard]:
        """What the plugin reports per board: each board's record, as preparation left it."""
        return list(self.boards)

    def port_lost(self, board_id: str) -> bool:
        """Whether the board's console port vanished since the board was handed out."""
        for prepared in self.boards:
            if prepared.device.id == board_id:
                return prepared.device.console.lost_count > prepared.lost_at_start
        return False

    @property
    def firmware_failure(self) -> str | None:
        failures = [b.firmware_failure for b in self.boards if b.firmware_failure]
        return "\n\n".join(failures) if failures else None

    def finish(self, outcome: str = "passed", board_outcomes: Mapping[str, str] | None = None,
               *, note: str = "") -> None:
        """Close consoles, record results and release the boards (idempotent).

        ``outcome`` is the test's: passed, failed, xfail (expected), skipped, not_run,
        infra_error or aborted (interrupted; ``note`` says by what, e.g. "SIGINT"). A board
        whose firmware did not start (the candidate, or an image the test flashed) is left for
        a health check whatever the test's outcome, so nobody else gets a board that boots into
        a crash.
        """
        if self._finished:
            return
        self._finished = True
        duration = time.monotonic() - self.started
        lease_outcomes: dict[str, str] = {}
        notes: list[str] = [note] if note else []
        for prepared in self.boards:
            dev = prepared.device
            per_board = (board_outcomes or {}).get(dev.id, outcome)
            lease_outcomes[dev.id] = _lease_outcome(per_board)
            broken = prepared.firmware_failure or dev.boot_failure
            if broken and lease_outcomes[dev.id] != LeaseOutcome.ABORTED.value:
                lease_outcomes[dev.id] = LeaseOutcome.BROKEN_APP.value
                first = broken.strip().splitlines()[0] if broken.strip() else "no boot"
                notes.append(f"{dev.id}: {first}"[:200])
            if self.port_lost(dev.id):
                # The port vanished during the test: a rig fault, whatever the test made of it.
                lease_outcomes[dev.id] = LeaseOutcome.INFRA_ERROR.value
            try:
                dev.console.close()
            except Exception:  # noqa: BLE001 - closing must not hide the test's own result
                lease_outcomes[dev.id] = LeaseOutcome.INFRA_ERROR.value
            if per_board in ("passed", "failed", "xfail"):
                self.farm.store.record_result(
                    dev.id, self.test_id, per_board, duration, prepared.firmware_sha256 or ""
                )
        self.lease.release(lease_outcomes, note="; ".join(notes))

    def __enter__(self) -> HilSession:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.finish("passed")
        elif isinstance(exc, InfrastructureError):
            self.finish("infra_error")
        elif isinstance(exc, Exception):
            self.finish("failed")
        else:
            self.finish("aborted", note=interruption_note(exc))


def interruption_note(exc: BaseException) -> str:
    """How an interruption reads in a board's health reason: ``SIGINT (Ctrl-C)``, ``SIGTERM``."""
    signal_name = getattr(exc, "signal_name", None)
    if signal_name:
        return str(signal_name)
    if isinstance(exc, KeyboardInterrupt):
        return "SIGINT (Ctrl-C)"
    return type(exc).__name__


def _lease_outcome(test_outcome: str) -> str:
    return {
        "passed": LeaseOutcome.OK.value,
        "failed": LeaseOutcome.FAILED.value,
        "xfail": LeaseOutcome.OK.value,  # failed as the suite expects: nothing about the board
        "skipped": LeaseOutcome.SKIPPED.value,
        "not_run": LeaseOutcome.OK.value,
        "infra_error": LeaseOutcome.INFRA_ERROR.value,
        "aborted": LeaseOutcome.ABORTED.value,
        "broken_app": LeaseOutcome.BROKEN_APP.value,
    }.get(test_outcome, LeaseOutcome.FAILED.value)


def flash_boards(farm: Farm, board_ids: Sequence[str], plan: object, *,
                 timeout: float = 60.0, progress: Any = None) -> list[FlashReport]:
    """Reserve the named boards, flash ``plan`` on each (in parallel) and release them.

    ``progress`` is one callback for every board, or a mapping of board id to callback.
    """
    boards = [farm.board(b) for b in board_ids]
    chips = {b.chip for b in boards}
    candidate = resolve_candidate(plan, source="the command line",
                                  default_chip=chips.pop() if len(chips) == 1 else None)
    for board in boards:  # refuse before reserving anything: nothing is written on a mismatch
        firmware_plan(candidate, board)
    lease = farm.reserve(len(board_ids), only=board_ids, timeout=timeout,
                         reason="hilfarm flash")
    reports: list[FlashReport] = []
    outcome = LeaseOutcome.OK
    try:
        def one(board_id: str) -> FlashReport:
            dev = farm.open_device(board_id)
            try:
                chip_plan = firmware_plan(candidate, farm.board(board_id))
                assert chip_plan is not None
                board_progress = progress.get(board_id) if isinstance(progress, Mapping) \
                    else progress
                return dev.flash(chip_plan, progress=board_progress, skip_identical=True)
            finally:
                dev.console.close()

        with ThreadPoolExecutor(max_workers=len(board_ids)) as pool:
            reports = list(pool.map(one, board_ids))
    except InfrastructureError:
        outcome = LeaseOutcome.INFRA_ERROR
        raise
    finally:
        lease.release(default=outcome)
    return reports
