"""One esptool session per flash: connect, compare, write, verify, with a retry at 115200 baud.

``flash`` connects once, asks the chip for the MD5 of each region (SPI_FLASH_MD5) and writes
only those that differ, compressed, verified, with a retry at 115200 baud when the fast baud
fails. esptool's console output goes to the ``pytest_hilfarm.esptool`` logger (and, on failure,
into the FlashError), not to the terminal. ``flash_many`` runs several boards in threads.

This module must not know about rack files, boards' health or the console: callers pause the
console and pass plain values (port URL or path, chip name).
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_hilfarm.drivers.flashing.log import EsptoolOutput, capture, install_router
from pytest_hilfarm.drivers.flashing.plan import FlashPlan, Region, check_plan, make_plan
from pytest_hilfarm.errors import FlashError, HilfarmError, ImageError, PortError
from pytest_hilfarm.esp.image import ESP_IMAGE_MAGIC
from pytest_hilfarm.esp.partitions import flash_size_bytes

ROM_BAUD = 115200

@dataclass(frozen=True)
class RegionProgress:
    """One progress event of one region: which region, how far, and in what state.

    ``state``: "writing" (``done`` of ``size`` bytes sent so far), "written", "skipped" (the
    board already holds identical bytes, checked by MD5), or "verified" (read back after the
    whole plan was written, and it matches).
    """

    index: int
    offset: int
    name: str
    size: int
    done: int
    state: str


ProgressFn = Callable[[RegionProgress], None]


def check_chip_revision(esp: Any, plan: FlashPlan, *, board: str | None = None) -> None:
    """Refuse images that need another revision of the connected chip (ImageError).

    esptool itself only refuses the bootloader (and only notes the app), but ESP-IDF's
    bootloader will not start an app outside its revision range either, so a farm refuses both:
    flashing it could only leave an unbootable board. Uses esptool's own rules and words.
    """
    from esptool import cmds
    from esptool.bin_image import LoadFirmwareImage
    from esptool.util import FatalError

    incompatibility = getattr(cmds, "_get_image_incompatibility", None)
    for region in plan.regions:
        if region.data[:1] != bytes([ESP_IMAGE_MAGIC]) or region.role in ("otadata",):
            continue
        try:
            image = LoadFirmwareImage(esp.CHIP_NAME, region.data)
        except (FatalError, struct.error, RuntimeError, KeyError):
            continue  # not an image of this chip: check_plan says so
        if incompatibility is not None:
            problem = incompatibility(esp, image, region.name)
        else:  # pragma: no cover - esptool 5.x has it; compare the full revisions ourselves
            rev = esp.get_chip_revision()
            low, high = image.min_rev_full, image.max_rev_full or 0xFFFF
            problem = None if low <= rev <= high else (
                f"'{region.name}' requires chip revision v{low // 100}.{low % 100} - "
                f"v{high // 100}.{high % 100} (this chip is revision v{rev // 100}.{rev % 100})")
        if problem:
            where = f"board {board}" if board else esp.CHIP_NAME
            raise ImageError(
                f"{problem}; nothing was written",
                where=f"{where}, image at {region.offset:#x}",
                hint="build for this chip revision (ESP-IDF: the chip's minimum/maximum revision "
                "options), or use a board of a revision the image supports; the board itself "
                "is fine",
            )


@dataclass(frozen=True)
class RegionResult:
    """What happened to one region: written (and verified) or skipped as already identical."""

    offset: int
    size: int
    sha256: str
    name: str
    written: bool
    seconds: float


@dataclass(frozen=True)
class FlashReport:
    """Per-region outcome, total time, and the baud rate that finally worked."""

    port: str
    chip: str
    regions: tuple[RegionResult, ...]
    seconds: float
    baud: int

    @property
    def written(self) -> tuple[RegionResult, ...]:
        return tuple(r for r in self.regions if r.written)

    @property
    def skipped(self) -> tuple[RegionResult, ...]:
        return tuple(r for r in self.regions if not r.written)

    @property
    def bytes_written(self) -> int:
        return sum(r.size for r in self.written)


def _esptool_errors() -> tuple[type[BaseException], ...]:
    import serial
    from esptool.util import FatalError

    return (FatalError, serial.SerialException, OSError, struct.error)


_DROPPED = ("reset by peer", "socket disconnected", "Broken pipe", "Connection reset")


def _connect(port_url: str, chip: str, before: str, attempts: int, busy_wait: float = 2.0) -> Any:
    """Open the port ourselves (no 0.3 s socket close sleep) and connect esptool's loader.

    A network port whose previous client (the paused console) has only just hung up may still
    count as busy on the server side, which drops the new connection at once; that is retried
    for up to ``busy_wait`` seconds with a short backoff, instead of failing the flash.
    """
    from esp_pylib.serial_reset import execute_custom_reset
    from esptool.targets import CHIP_DEFS

    from pytest_hilfarm.drivers.reset import CUSTOM_BEFORE
    from pytest_hilfarm.drivers.transports import open_port

    deadline = time.monotonic() + busy_wait
    delay = 0.02
    while True:
        port = open_port(port_url, ROM_BAUD, timeout=3.0, exclusive=True)
        try:
            esp = CHIP_DEFS[chip](port, ROM_BAUD)
            if port_url.startswith("rfc2217:"):
                esp.USES_RFC2217 = True
            if before.startswith(CUSTOM_BEFORE):
                # The rack file's own download sequence (esptool's syntax), on this port; then
                # connect to the ROM loader it started.
                execute_custom_reset(port, before[len(CUSTOM_BEFORE):])
                esp.connect("no-reset", attempts)
            else:
                esp.connect(before, attempts)
            return esp
        except _esptool_errors() as exc:
            port.close()
            dropped = any(word in str(exc) for word in _DROPPED)
            if not dropped or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.3)
        except BaseException:
            port.close()
            raise


def _prepared(esp: Any, region: Region, plan: FlashPlan) -> bytes:
    """The exact bytes esptool writes for a region, so our MD5 matches what ends up on flash."""
    from esptool import cmds

    data = region.data
    # esptool pads every write to 4 bytes (pad_to(image, 4)) and verifies the padded data.
    if len(data) % 4:
        data += b"\xff" * (4 - len(data) % 4)
    settings = (plan.flash_freq, plan.flash_mode, plan.flash_size)
    if region.offset == esp.BOOTLOADER_FLASH_OFFSET and settings != ("keep",) * 3:
        # esptool rewrites the bootloader header's mode/size/freq bytes (and its SHA-256) before
        # writing; do it here once and pass "keep" on, so the skip check compares real bytes.
        data = cmds._update_image_flash_params(
            esp, region.offset, plan.flash_freq, plan.flash_mode, plan.flash_size, data
        )
    return bytes(data)


def _report(progress: ProgressFn | None, index: int, region: Region, done: int,
            state: str) -> None:
    if progress is not None:
        progress(RegionProgress(index, region.offset, region.name, region.size, done, state))


def _result(region: Region, written: bool, started: float) -> RegionResult:
    seconds = time.monotonic() - started
    return RegionResult(region.offset, region.size, region.sha256, region.name, written, seconds)


def _flash_once(
    port_url: str,
    chip: str,
    plan: FlashPlan,
    *,
    baud: int,
    progress: ProgressFn | None,
    skip_identical: bool,
    verify: bool,
    before: str,
    after: str,
    attempts: int,
    session: EsptoolOutput,
    board: str | None,
) -> tuple[RegionResult, ...]:
    from esptool import cmds
    from esptool.util import NotImplementedInROMError

    esp = _connect(port_url, chip, before, attempts)
    try:
        # Before anything else (even the skip check): an image this very chip cannot run is
        # the image's fault, never something to retry at a lower baud or blame on the cable.
        check_chip_revision(esp, plan, board=board)
        cmds.attach_flash(esp)
        detected = flash_size_bytes(cmds.detect_flash_size(esp))
        check_plan(plan, chip, flash_size=detected, board=board)
        prepared = [_prepared(esp, region, plan) for region in plan.regions]
        digests = [hashlib.md5(data).hexdigest() for data in prepared]
        results: list[RegionResult | None] = [None] * len(plan.regions)
        # Compare first, before the stub upload and the baud change where the ROM can hash
        # (ESP32): an unchanged board then costs a sync, a few register reads and one MD5 per
        # region, instead of ~7 KB of stub at 115200 baud plus esptool's 50 ms baud settle.
        if skip_identical:
            for index, region in enumerate(plan.regions):
                started = time.monotonic()
                session.region = region
                try:
                    same = esp.flash_md5sum(region.offset, len(prepared[index])) == digests[index]
                except NotImplementedInROMError:  # ESP32-S2/C3 ROMs: hash with the stub
                    esp = cmds.run_stub(esp)
                    cmds.attach_flash(esp)
                    same = esp.flash_md5sum(region.offset, len(prepared[index])) == digests[index]
                if same:
                    results[index] = _result(region, False, started)
                    _report(progress, index, region, region.size, "skipped")
        if any(r is None for r in results) and not esp.IS_STUB:
            esp = cmds.run_stub(esp)
            cmds.attach_flash(esp)
        if baud > ROM_BAUD and any(r is None for r in results):
            esp.change_baud(baud)
        for index, region in enumerate(plan.regions):
            if results[index] is not None:
                continue
            started = time.monotonic()

            def on_progress(done: int, total: int, i: int = index, r: Region = region) -> None:
                # esptool counts compressed bytes sent; report uncompressed bytes of the region.
                if total > 0:
                    _report(progress, i, r, min(r.size, done * r.size // total), "writing")

            session.on_progress = on_progress
            session.region = region
            try:
                cmds.write_flash(esp, [(region.offset, prepared[index])], compress=True)
            finally:
                session.on_progress = None
            results[index] = _result(region, True, started)
            _report(progress, index, region, region.size, "written")
        done = tuple(r for r in results if r is not None)
        session.region = None
        if verify and any(r.written for r in done):
            # write_flash verified each region right after writing it; this pass catches a later
            # region's sector erase clobbering an earlier one and a chip reset mid-plan. With
            # nothing written, the skip check's MD5s already were the verification.
            for region, data, digest in zip(plan.regions, prepared, digests):
                if esp.flash_md5sum(region.offset, len(data)) != digest:
                    raise FlashError(
                        f"region at {region.offset:#x} does not hold the image after flashing",
                        where=f"{board or chip} on {port_url}, {region.name}",
                        hint="the flash may be failing or the board reset during flashing; "
                        "run a health check on the board",
                    )
            for index, (region, result) in enumerate(zip(plan.regions, done)):
                if result.written:
                    _report(progress, index, region, region.size, "verified")
        cmds.reset_chip(esp, after)
        return done
    finally:
        try:
            esp._port.close()
        except Exception:  # the port may already be gone with the board
            pass


def flash(
    port_url: str,
    chip: str,
    plan: FlashPlan | Path | str | bytes | Sequence[tuple[Any, Any]],
    *,
    baud: int = 921600,
    progress: ProgressFn | None = None,
    skip_identical: bool = True,
    verify: bool = True,
    before: str = "default-reset",
    after: str = "hard-reset",
    board: str | None = None,
    echo: bool = False,
    connect_attempts: int = 7,
    enter_download: Callable[[], None] | None = None,
) -> FlashReport:
    """Flash ``plan`` onto the ``chip`` board at ``port_url``; return what was written/skipped.

    ``before``/``after`` are esptool 5's reset modes ("default-reset", "no-reset", "usb-reset";
    "hard-reset", "no-reset", "no-reset-stub"). ``progress(RegionProgress)`` is
    called from this thread as each region is skipped, written (bytes as they go out) and
    verified. ``echo`` logs esptool's output at INFO instead of DEBUG. ``enter_download`` is called
    before each attempt when esptool cannot reset the board itself (``before="no-reset"`` with an
    out-of-band reset driver), so the retry at 115200 starts from a fresh ROM loader too.
    """
    plan = make_plan(plan)
    check_plan(plan, chip, board=board)  # before any connection: nothing written on a mismatch
    label = board or port_url
    started = time.monotonic()
    rates = [baud] if baud <= ROM_BAUD else [baud, ROM_BAUD]
    errors = _esptool_errors()
    failure: BaseException | None = None
    with capture(label, echo) as session:
        for rate in rates:
            try:
                if enter_download is not None:
                    enter_download()
                results = _flash_once(
                    port_url,
                    chip,
                    plan,
                    baud=rate,
                    progress=progress,
                    skip_identical=skip_identical,
                    verify=verify,
                    before=before,
                    after=after,
                    attempts=connect_attempts,
                    session=session,
                    board=board,
                )
            except PortError as exc:
                if board is None:
                    raise
                where = f"board {board}, {exc.where}"
                raise PortError(exc.what, where=where, hint=exc.hint) from exc
            except HilfarmError:
                raise
            except errors as exc:
                failure = exc
                session.text(f"flash at {rate} baud failed: {exc}", logging.INFO)
                continue
            return FlashReport(port_url, chip, results, time.monotonic() - started, rate)
    assert failure is not None
    raise _flash_error(failure, plan, port_url, chip, board, session, rates)


def _flash_error(
    exc: BaseException,
    plan: FlashPlan,
    port_url: str,
    chip: str,
    board: str | None,
    session: EsptoolOutput,
    rates: list[int],
) -> FlashError:
    region = session.region
    where = f"{board + ' on ' if board else ''}{port_url}"
    if region is not None:
        where += f", region {region.offset:#x} ({region.name})"
    tail = "\n".join(f"    | {line}" for line in list(session.lines)[-12:])
    tried = " and ".join(str(r) for r in rates)
    hint = (
        "check the cable and that nothing else holds the port; for a virtual board check "
        "`hilfarm sim status`; the board is marked UNKNOWN and gets a health check"
    )
    if "not " in str(exc) and "This chip is" in str(exc):
        hint = "the board's chip differs from the rack file's: fix the rack file"
    return FlashError(
        f"flashing failed at {tried} baud: {exc}\n  esptool said:\n{tail}",
        where=where,
        hint=hint,
    )


def read_md5(
    port_url: str,
    chip: str,
    offset: int,
    size: int,
    *,
    before: str = "default-reset",
    after: str = "no-reset",
    echo: bool = False,
) -> str:
    """Return the lowercase hex MD5 of ``size`` bytes of flash at ``offset`` (via the stub)."""
    from esptool import cmds

    with capture(port_url, echo) as session:
        try:
            esp = _connect(port_url, chip, before, 7)
            try:
                esp = cmds.run_stub(esp)
                digest: str = esp.flash_md5sum(offset, size)
                cmds.reset_chip(esp, after)
                return digest
            finally:
                esp._port.close()
        except HilfarmError:
            raise
        except _esptool_errors() as exc:
            tail = "\n".join(f"    | {line}" for line in list(session.lines)[-8:])
            raise FlashError(
                f"reading the MD5 of {size} bytes at {offset:#x} failed: {exc}\n{tail}",
                where=port_url,
                hint="check the port and that the board can enter download mode",
            ) from exc


@dataclass(frozen=True)
class FlashJob:
    """One board's share of a parallel flash: ``flash(port, chip, plan, **options)``."""

    port: str
    chip: str
    plan: FlashPlan | Path | str | bytes | Sequence[tuple[Any, Any]]
    board: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


def flash_many(
    jobs: Sequence[FlashJob], max_workers: int | None = None
) -> list[FlashReport | HilfarmError]:
    """Flash several boards in parallel threads; results in job order.

    A board's failure does not stop the others: its slot holds the FlashError/ImageError/
    PortError instead of a report, so the caller can mark just that board UNKNOWN.
    """
    for job in jobs:
        check_plan(make_plan(job.plan), job.chip, board=job.board)  # all refusals before writes
    install_router()  # once, here, rather than racing in every worker

    def run(job: FlashJob) -> FlashReport | HilfarmError:
        try:
            return flash(job.port, job.chip, job.plan, board=job.board, **dict(job.options))
        except (FlashError, PortError, ImageError) as exc:
            return exc

    workers = max_workers or max(1, len(jobs))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flash") as pool:
        return list(pool.map(run, jobs))
