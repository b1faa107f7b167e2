"""Bringing a reserved board to a known state: health checks, the candidate flash, the boot check.

The farm's preparation role, as functions of a :class:`~pytest_hilfarm.farm.core.Farm`: a health
check (power-cycle, baseline, boot) when a board is not GOOD, the candidate's plan written only
where the store's digests or the device's MD5s differ, and a boot check that tells the firmware's
fault (boot output, no app) from the rig's (nothing at all).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_hilfarm.board.device import Device
from pytest_hilfarm.description.rack import BoardSpec
from pytest_hilfarm.drivers.flashing import FlashPlan, FlashReport
from pytest_hilfarm.errors import BootError, HilfarmError, ImageError, InfrastructureError
from pytest_hilfarm.esp.image import app_identity
from pytest_hilfarm.farm.candidate import firmware_plan, plan_digest
from pytest_hilfarm.farm.session import BoardFault, PreparedBoard
from pytest_hilfarm.store import BoardHealth

if TYPE_CHECKING:
    from pytest_hilfarm.farm.core import Farm

# A boot that printed the ROM banner / bootloader lines but never reached the app is the
# firmware's fault; a board that printed nothing at all is the rig's.
_ANY_BOOT_OUTPUT = re.compile(r"rst:0x|ESP-ROM:|ets [A-Z][a-z]{2} |boot: ")


def baseline_of(farm: Farm, board: BoardSpec) -> Path | None:
    if farm.baseline_override is not None:
        path = farm.baseline_override.for_chip(board.chip)
        if path is not None:
            return path
    spec = board.baseline or farm.rack.baseline_for(board)
    if spec is not None:
        return spec.path
    if board.is_virtual:
        baselines = farm.virtual_info().get("baselines") or {}
        path = baselines.get(board.chip)
        return Path(path) if path else None
    return None

def health_check(farm: Farm, device: Device, *, reason: str = "") -> BoardHealth:
    """Power-cycle, flash the baseline (skipping identical regions), check that it boots."""
    board = farm.board(device.id)
    before = farm.store.health(board.id).health
    try:
        baseline = baseline_of(farm, board)
        if board.power.driver != "none":
            device.power_driver.cycle(0.2)
            device.console.wait_connected(timeout=device.boot_timeout)
        if baseline is not None:
            device.flash(baseline, skip_identical=True)
            device.check_stays_up()
            detail = f"baseline {device.boot_info().project or 'app'} booted"
        else:
            # No baseline to boot: check what can be checked (port, reset lines, ROM).
            device.probe(wait=False)
            detail = "download mode answers (no baseline configured)"
        ok = True
    except HilfarmError as exc:
        ok, detail = False, str(exc).splitlines()[0]
    after = farm.store.record_check(board.id, ok, detail)
    if after != before:
        farm.note_health_change(f"{board.id}: {before.value} -> {after.value} ({detail})")
    if not ok:
        raise BoardFault(
            f"health check of {board.id} failed: {detail}",
            board_ids=[board.id],
            where=str(device.log_path),
            hint=("the board is marked " + after.value
                  + "; see its log; `hilfarm board restore` after fixing a quarantined board"),
        )
    return after

def _store_says_flashed(farm: Farm, board_id: str, plan: FlashPlan) -> bool:
    """Whether the store's digests alone may stand for the device's flash.

    Not for a plan with otadata: an OTA update (or a rollback) in an earlier test rewrites
    otadata without changing what the boot log shows, so such plans are compared on the
    device (one MD5 per region, no data sent when equal).
    """
    if any(r.role == "otadata" for r in plan.regions):
        return False
    for region in plan.regions:
        record = farm.store.flashed_digest(board_id, region.offset)
        if record is None or record.digest != region.sha256:
            return False
    return True

def prepare_board(farm: Farm, board_id: str, *, firmware: object, needs_check: bool,
                  boot_timeout: float, log_path: Path) -> PreparedBoard:
    """Bring one reserved board to a known state and start the candidate firmware.

    ``firmware`` is a :class:`Candidate` (or anything :meth:`candidate` resolves).
    """
    board = farm.board(board_id)
    candidate = farm.candidate(firmware)
    try:
        device = farm.open_device(board_id, log_path=log_path, boot_timeout=boot_timeout)
    except HilfarmError as exc:
        raise BoardFault(str(exc), board_ids=[board_id]) from exc
    try:
        health = farm.store.health(board_id).health
        checked = False
        if needs_check or health != BoardHealth.GOOD:
            health_check(farm, device)
            checked = True
        plan = firmware_plan(candidate, board)
        report: FlashReport | None = None
        digest = plan_digest(plan) if plan else None  # the candidate's, the same on every board
        if plan is not None:
            plan = _with_board_data(farm, board, device, plan)
        if plan is not None and not _store_says_flashed(farm, board_id, plan):
            report = device.flash(plan, skip_identical=True, wait=False)
        failure = _boot(farm, device, plan)
        if plan is not None and report is None and (
            failure or not _runs_candidate(device, plan)
        ):
            # The store's digests were stale (flashed by hand, an OTA in the last test):
            # compare on the device, region by region, and write what differs.
            farm.store.forget_flash(board_id)
            report = device.flash(plan, skip_identical=True, wait=False)
            failure = _boot(farm, device, plan)
        return PreparedBoard(device, report, digest, failure, checked,
                             device.console.lost_count)
    except BoardFault:
        device.console.close()
        raise
    except ImageError as exc:
        # The image does not fit this board (its chip revision, its flash): nothing was
        # written and the board is as healthy as before; say where the image came from.
        device.console.close()
        source = f" (candidate from {candidate.source})" if candidate is not None else ""
        if source and candidate is not None and candidate.source in (exc.where or ""):
            source = ""
        raise ImageError(exc.what, where=f"{exc.where}{source}", hint=exc.hint) from None
    except InfrastructureError as exc:
        device.console.close()
        farm.store.set_health(board_id, BoardHealth.UNKNOWN, str(exc).splitlines()[0])
        raise BoardFault(str(exc), board_ids=[board_id]) from exc
    except BaseException:
        device.console.close()
        raise

def _with_board_data(farm: Farm, board: BoardSpec, device: Device, plan: FlashPlan
                     ) -> FlashPlan:
    """The plan plus this board's own NVS partition (the rack's ``nvs:``), if it has one."""
    spec = farm.rack.nvs_for(board)
    if spec is None or spec.csv is None:
        return plan
    from pytest_hilfarm.projects import nvs

    region = nvs.board_region(spec.csv, plan, board_id=board.id, mac=device.mac,
                              chip=board.chip, values=spec.values,
                              partition=spec.partition or "nvs")
    return nvs.with_region(plan, region)


def _runs_candidate(device: Device, plan: FlashPlan) -> bool:
    """Whether the boot log shows the plan's app (project, version, offset) running."""
    for region in plan.regions:
        ident = app_identity(region.data) if region.role in ("app", None) else None
        if ident is not None:
            info = device.boot_info()
            return (info.project, info.app_version, info.partition_offset) == (
                ident[0], ident[1], region.offset
            )
    return True  # no app descriptor to compare (a raw image): trust the digests

def _boot(farm: Farm, device: Device, plan: FlashPlan | None) -> str | None:
    """Reset into the app; None if it started, else the failure text (firmware's fault)."""
    mark = device.console.mark()
    try:
        device.reset()
    except BootError as exc:
        seen = device.console.text_since(mark)
        if not _ANY_BOOT_OUTPUT.search(seen):
            raise  # nothing at all on the console: the rig, not the firmware
        return (
            f"{device.id}: the candidate firmware did not start\n{exc}\n"
            f"log: {device.log_path}"
        )
    return None
