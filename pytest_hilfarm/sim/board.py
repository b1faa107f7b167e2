"""One virtual ESP board: power, EN/IO0 lines, boot modes, UART, and the app it runs.

A :class:`VirtualBoard` owns its flash file, its ROM-loader session and the demo app it boots.
All of its state changes under one execution lock, normally on its own worker thread (events
from the control endpoint and timers go through one queue; port bytes are handled inline when
nothing is queued ahead of them), so the loader, boot chain and app never see two threads at once.
It models what esptool and a console can observe (banners, modes, bytes and, optionally, their
UART time), not electrical or RF physics. It knows nothing about sockets or the daemon: bytes go
out through whatever :class:`OutputSink` is attached, and it must never import the farm core.

It also holds the board's virtual eFuses (:class:`BootEfuse`: Secure Boot, key digests, the
anti-rollback counter; burned only upwards, see :func:`burn_efuse`) and, for the app, the board
side of an OTA update (``esp_ota_begin/write/end``, ``esp_ota_set_boot_partition`` and an HTTP
download thread that reaches nothing but 127.0.0.1).
"""

from __future__ import annotations

import hashlib
import heapq
import http.client
import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from pytest_hilfarm.errors import ImageError, UsageError
from pytest_hilfarm.esp.chips import format_revision
from pytest_hilfarm.esp.image import (
    AppImage,
    chip_for_id,
    chip_id_of,
    parse_image_from,
)
from pytest_hilfarm.esp.partitions import Partition, PartitionTable
from pytest_hilfarm.ota.signing import max_signature_blocks, verify_block
from pytest_hilfarm.sim import boot as boot_chain
from pytest_hilfarm.sim.app import DemoApp
from pytest_hilfarm.sim.boot import BootEfuse
from pytest_hilfarm.sim.chips import rom_banner
from pytest_hilfarm.sim.flash import FlashMemory
from pytest_hilfarm.sim.loader import LoaderSession
from pytest_hilfarm.sim.model import AppInfo, BootOutcome, OtaError, OtaResult

# Modes reported by status(); "download"/"stub" come from the loader session itself. "stopped":
# the boot chain started an app that has no model here (not a demo build), see CANNOT_RUN.
MODES = ("off", "reset", "download", "stub", "app", "stopped", "halted", "boot-loop")
# The RTC watchdog esptool arms for --after watchdog-reset fires after WDTCONFIG1 = 2000
# slow-clock cycles (~136 kHz RTC clock on the C3/S3: ~15 ms).
RTC_WDT_DELAY = 0.015

# The DevKit EN pin has an RC delay (10k/1uF, ~10 ms on silicon). Over rfc2217 the pyserial client
# waits >= 50 ms for each control-line ack, so esptool's ClassicReset holds the (DTR=1, RTS=1)
# transient (EN high, IO0 high) for ~50 ms before IO0 goes low; sampling IO0 100 ms after EN rises
# is what makes default-reset land in download mode (notes/esp-rom-protocol.md section 7).
DEFAULT_RC_DELAY = 0.1
# A chip that fails to boot resets (RTC watchdog / esp_restart) and tries again; real chips
# repeat every few hundred ms, which keeps a console readable and the CPU idle.
DEFAULT_BOOT_RETRY_DELAY = 0.7
# esp_restart() to the next boot log on a DevKit takes a few hundred ms; a panic adds the
# handler's backtrace print. Kept short so tests that reboot stay fast.
RESTART_DELAY = 0.1
PANIC_RESTART_DELAY = 0.3
DEFAULT_BAUD = 115200
UART_BITS_PER_BYTE = 10  # start + 8 data + stop
# A console client that stops reading for this long is dropped instead of stalling the board
# (a real UART drops bytes the host does not take; blocking the board forever would be worse).
SINK_TIMEOUT = 5.0
# OTA download: esp_http_client's receive timeout in ESP-IDF's OTA examples
# (examples/system/ota/simple_ota_example CONFIG_EXAMPLE_OTA_RECV_TIMEOUT = 5000 ms), and the
# read size of esp_https_ota (CONFIG_ESP_HTTPS_OTA_BUF_SIZE-like 4 KiB).
FETCH_TIMEOUT = 5.0
FETCH_CHUNK = 4096
# Chunks handed to the board's thread but not yet written: the download thread waits beyond
# this, so a slow flash (or a busy board) throttles the socket instead of growing memory.
FETCH_IN_FLIGHT = 8
# The only hosts a virtual board may download from (the rack's network is this machine).
FETCH_HOSTS = ("127.0.0.1", "localhost")
# Anti-rollback eFuse field width (notes §3.4: ESP32 32 bits, 16 on S2/C3).
_SECURE_VERSION_BITS = {"esp32": 32}


def cannot_run_line(board_id: str, info: AppInfo) -> str:
    """The one console line a virtual board prints instead of running an app it has no model
    of (an image without the demo-app marker, e.g. a real ESP-IDF build).

    ``Device.boot_info()`` reads it back (``runs_on_virtual=False``); keep the
    ``[virtual board <id>: cannot run this app: ...]`` shape.
    """
    if info.has_app_desc:
        what = (f"'{info.project}' {info.version} (ESP-IDF {info.idf_ver}) was not built for the "
                "virtual rack (no demo-app marker)")
    else:
        what = (f"the image in {info.partition_label} at 0x{info.partition_offset:x} has no "
                "esp_app_desc_t and was not built for the virtual rack")
    return (f"[virtual board {board_id}: cannot run this app: {what}; a virtual board models "
            "the boot chain, not the CPU, so none of its code runs here and the board stops "
            "at app_main. Test its behaviour on a real board.]")


def secure_version_bits(chip: str) -> int:
    """Width of ``chip``'s anti-rollback eFuse field (the highest ``secure_version`` it holds)."""
    return _SECURE_VERSION_BITS.get(chip, 16)


def burn_efuse(
    efuse: BootEfuse,
    chip: str,
    *,
    key_digest: bytes | None = None,
    secure_version: int | None = None,
    secure_boot: bool = False,
    anti_rollback: bool = False,
    signed_apps: bool = False,
) -> BootEfuse:
    """The eFuse record after burning what is asked; raises UsageError for what eFuses cannot do.

    eFuse bits only go from 0 to 1: a digest fills the next free ``SECURE_BOOT_DIGESTx`` key
    block (1 on ESP32, 3 on S2/C3), the secure version only rises (it is a count of set bits),
    and enable flags stay enabled. Burning what is already burned changes nothing.
    ``anti_rollback`` and ``signed_apps`` stand for the bootloader options
    ``CONFIG_BOOTLOADER_APP_ANTI_ROLLBACK`` and ``CONFIG_SECURE_SIGNED_APPS_NO_SECURE_BOOT``:
    on a real board they come with the bootloader build, here they live with the eFuses and
    are as one-way (a bootloader that checks signatures is not replaced by one that does not).
    """
    where = f"virtual eFuses of a {chip}"
    out = efuse
    if key_digest is not None:
        if len(key_digest) != 32:
            raise UsageError(f"a key digest is 32 bytes, got {len(key_digest)}", where=where,
                             hint="pass 64 hex digits (`hilfarm ota digest KEY`)")
        if key_digest not in out.key_digests:
            limit = max_signature_blocks(chip)
            if len(out.key_digests) >= limit:
                raise UsageError(
                    f"all {limit} Secure Boot key digest block(s) are already burned",
                    where=where,
                    hint="eFuse key blocks cannot be rewritten; use a key whose digest is "
                    "already burned")
            out = replace(out, key_digests=out.key_digests + (key_digest,))
    if secure_version is not None:
        bits = secure_version_bits(chip)
        if not 0 <= secure_version <= bits:
            raise UsageError(
                f"secure_version {secure_version} does not fit the {bits}-bit anti-rollback "
                "eFuse field", where=where, hint=f"use 0..{bits}")
        if secure_version < out.secure_version:
            raise UsageError(
                f"the anti-rollback eFuse already holds secure_version {out.secure_version}; "
                f"eFuse bits only go from 0 to 1, so it cannot be lowered to {secure_version}",
                where=where, hint="burn a value >= the current one")
        out = replace(out, secure_version=secure_version)
    if secure_boot:
        if not out.key_digests:
            raise UsageError(
                "Secure Boot cannot be enabled before a key digest is burned: nothing would "
                "boot", where=where, hint="burn a key digest first (burn-key-digest)")
        out = replace(out, secure_boot_enabled=True)
    if anti_rollback:
        out = replace(out, anti_rollback=True)
    if signed_apps:
        out = replace(out, signed_apps_no_secure_boot=True)
    return out


class OutputSink(Protocol):
    """Where the board's UART TX bytes go (the connected client, if any)."""

    def write(self, data: bytes) -> None:
        """Deliver bytes to the client; may raise OSError if the client is gone."""


@dataclass(frozen=True)
class BoardStatus:
    """Snapshot of a board for the control endpoint's ``status``."""

    board_id: str
    chip: str
    mac: str
    powered: bool
    mode: str
    flash_size: int
    baud: int
    app: dict[str, str] | None
    client: bool
    en: bool
    io0: bool
    wire_time: bool
    rx_bytes: int  # UART bytes received / sent since the daemon started
    tx_bytes: int
    wire_seconds: float  # their UART time at the baud they crossed at (the bench's lower bound)
    revision: str = ""  # the chip revision the eFuses report, "v0.4"


class _Host:
    """The :class:`~pytest_hilfarm.sim.model.AppHost` one app instance sees.

    Bound to the board's boot epoch: once the board resets, calls from the old app are ignored,
    as a reset stops a real program mid-instruction.
    """

    def __init__(self, board: VirtualBoard, epoch: int) -> None:
        self._board = board
        self._epoch = epoch
        self.board_id = board.board_id
        self.chip = board.chip
        self.mac = board.mac
        self.position = board.position

    def _live(self) -> bool:
        return self._board._epoch == self._epoch

    def emit(self, text: str) -> None:
        if self._live():
            self._board._emit(text.encode("utf-8", "replace"))

    def reboot(self, reason: str) -> None:
        # Deferred: the app is usually inside feed_line() and must finish that call first.
        if self._live():
            self._board._schedule_soft_reset(self._epoch, RESTART_DELAY, "sw")

    def panic(self, text: str) -> None:
        if self._live():
            self._board._emit(text.encode("utf-8", "replace"))
            self._board._schedule_soft_reset(self._epoch, PANIC_RESTART_DELAY, "panic")

    def mark_app_valid(self) -> None:
        if self._live():
            self._board._mark_running_slot(valid=True)

    def mark_app_invalid_and_reboot(self) -> None:
        if self._live():
            self._board._mark_running_slot(valid=False)
            self._board._schedule_soft_reset(self._epoch, RESTART_DELAY, "sw")

    def now(self) -> float:
        return time.monotonic()

    def call_later(self, delay: float, func: Callable[[], None]) -> None:
        epoch = self._epoch

        def guarded() -> None:
            if self._board._epoch == epoch:
                func()

        self._board.call_later(delay, guarded)

    # -- OTA (esp_ota_ops.c); board thread only -------------------------------------------------

    _ota_part: Partition | None = None
    _ota_written = 0
    _ota_result: OtaResult | None = None

    def _running(self) -> tuple[AppInfo, PartitionTable]:
        info = self._board._app_info
        if info is None or not self._live():
            raise OtaError("ESP_ERR_INVALID_STATE", "the app is not running")
        try:
            table = boot_chain.read_partition_table(self._board._flash)
        except ImageError as exc:
            raise OtaError("ESP_ERR_NOT_FOUND", f"no valid partition table: {exc}") from None
        return info, table

    def ota_begin(self, image_size: int) -> tuple[str, int]:
        info, table = self._running()
        flash = self._board._flash
        if self._board._rollback_enabled and \
                boot_chain.read_running_state(flash, info) == "PENDING_VERIFY":
            # esp_ota_begin: "Running app has not confirmed state (ESP_OTA_IMG_PENDING_VERIFY)"
            raise OtaError("ESP_ERR_OTA_ROLLBACK_INVALID_STATE",
                           "the running app has not confirmed itself yet (PENDING_VERIFY)",
                           (("E", "esp_ota_ops", "Running app has not confirmed state "
                             "(ESP_OTA_IMG_PENDING_VERIFY)"),))
        target = _next_update_partition(table, info.partition_label)
        if target is None:
            raise OtaError("ESP_ERR_NOT_FOUND", "the partition table has no OTA app partition "
                           "to update (a factory-only layout)",
                           (("E", "esp_https_ota", "Passive OTA partition not found"),))
        if image_size > target.size:
            raise OtaError("ESP_ERR_INVALID_SIZE",
                           f"the image is {image_size} bytes but partition {target.label} holds "
                           f"{target.size}",
                           (("E", "esp_ota_ops", f"image size {image_size} exceeds partition "
                             f"{target.label} size {target.size}"),))
        # esp_https_ota calls esp_ota_begin(part, OTA_SIZE_UNKNOWN, ...), which erases the whole
        # partition before the first write (NOR flash is programmed only after an erase). That
        # also leaves no stale signature sector of an older image behind the new one.
        flash.erase(target.offset, target.size)
        self._ota_part, self._ota_written, self._ota_result = target, 0, None
        return target.label, target.offset

    def ota_write(self, data: bytes) -> None:
        part = self._ota_part
        if part is None or not self._live():
            raise OtaError("ESP_ERR_INVALID_ARG", "no OTA update in progress (ota_begin first)")
        if self._ota_written == 0 and data and data[0] != 0xE9:
            # esp_ota_write checks the first byte of the image (esp_ota_ops.c).
            raise OtaError("ESP_ERR_OTA_VALIDATE_FAILED", "not an ESP app image",
                           (("E", "esp_ota_ops", f"OTA image has invalid magic byte (expected "
                             f"0xE9, saw 0x{data[0]:02x})"),))
        if self._ota_written + len(data) > part.size:
            raise OtaError("ESP_ERR_INVALID_SIZE",
                           f"the image is larger than partition {part.label} ({part.size} bytes)",
                           (("E", "esp_ota_ops", f"size of data to write exceeds partition "
                             f"{part.label} size {part.size}"),))
        self._board._flash.write(part.offset + self._ota_written, data)
        self._ota_written += len(data)

    def ota_end(self) -> OtaResult:
        part = self._ota_part
        if part is None or not self._live():
            raise OtaError("ESP_ERR_INVALID_ARG", "no OTA update in progress (ota_begin first)")
        self._ota_part = None
        board = self._board
        flash = board._flash
        try:
            image = parse_image_from(lambda a, n: flash.read(a, n), offset=part.offset,
                                     limit=part.size, chip=None, verify=False)
        except ImageError as exc:
            raise OtaError("ESP_ERR_OTA_VALIDATE_FAILED", f"the image is malformed: {exc.what}",
                           (("E", "esp_image", f"image at 0x{part.offset:x}: {exc.what}"),)
                           ) from None
        expected = chip_id_of(board.chip)
        if image.header.chip_id != expected:
            found = chip_for_id(image.header.chip_id) or "unknown chip"
            raise OtaError("ESP_ERR_OTA_VALIDATE_FAILED",
                           f"the image is for {found}, this board is {board.chip}",
                           (("E", "boot_comm", f"mismatch chip ID, expected {expected}, found "
                             f"{image.header.chip_id}"),))
        if not image.checksum_ok:
            raise OtaError("ESP_ERR_OTA_VALIDATE_FAILED", "image checksum failed",
                           (("E", "esp_image", f"Checksum failed. Calculated "
                             f"0x{image.calculated_checksum:x} read "
                             f"0x{image.stored_checksum:x}"),))
        if image.sha256_ok is False:
            raise OtaError("ESP_ERR_OTA_VALIDATE_FAILED", "the image's SHA-256 does not match",
                           (("E", "esp_image", "Image hash failed - image is corrupt"),))
        signed_by = self._check_signature(part, image)
        desc = image.app_desc
        if desc is None:
            raise OtaError("ESP_ERR_OTA_VALIDATE_FAILED", "the image has no app description",
                           (("E", "esp_image", "image has no esp_app_desc_t at 0x20"),))
        end = image.signature_sector.offset + 4096 if image.signature_sector else image.length
        sha = hashlib.sha256(flash.read(part.offset, end)).hexdigest()
        self._ota_result = OtaResult(part.label, desc.project_name, desc.version,
                                     desc.secure_version, end, sha, signed_by)
        return self._ota_result

    def _trusted_digests(self) -> tuple[tuple[bytes, ...], str]:
        efuse = self._board._efuse
        if efuse.secure_boot_enabled:
            return efuse.key_digests, "eFuse"
        # CONFIG_SECURE_SIGNED_APPS_NO_SECURE_BOOT: trust the keys that signed the running app
        # (secure_boot_signatures_app.c get_secure_boot_key_digests; notes §4.5).
        info = self._board._app_info
        if info is None:
            return (), "the running app"
        flash = self._board._flash
        try:
            running = parse_image_from(lambda a, n: flash.read(a, n),
                                       offset=info.partition_offset,
                                       limit=info.partition_size, chip=None, verify=False)
        except ImageError:
            return (), "the running app"
        sector = running.signature_sector
        digests = tuple(b.key_digest for b in sector.blocks if b.crc_ok and b.key_digest) \
            if sector else ()
        return digests, "the running app"

    def _check_signature(self, part: Partition, image: AppImage) -> str | None:
        efuse = self._board._efuse
        if not (efuse.secure_boot_enabled or efuse.signed_apps_no_secure_boot):
            return None
        trusted, source = self._trusted_digests()
        sector = image.signature_sector
        fail = (("E", "secure_boot_v2", "secure boot verification failed"),
                ("E", "esp_image", "Secure boot signature verification failed"))
        if sector is None:
            raise OtaError("ESP_ERR_OTA_VALIDATE_FAILED", "the image is not signed",
                           (("E", "secure_boot_v2", "no signature block found after the "
                             "image"),) + fail[1:])
        if not trusted:
            raise OtaError("ESP_ERR_OTA_VALIDATE_FAILED",
                           f"no trusted key: {source} has no signature block",
                           (("E", "secure_boot_v2", f"no trusted key digest ({source} is not "
                             "signed)"),) + fail[1:])
        digest = hashlib.sha256(self._board._flash.read(part.offset, sector.offset)).digest()
        untrusted = False
        for blk in sector.blocks:
            if not blk.crc_ok or blk.image_digest != digest:
                continue
            if blk.key_digest not in trusted:
                untrusted = True
                continue
            if verify_block(blk, digest):
                assert blk.key_digest is not None
                return blk.key_digest.hex()
        why = ("signed by a key that is not trusted" if untrusted else
               "no signature block verifies (the image was altered after signing)")
        raise OtaError("ESP_ERR_OTA_VALIDATE_FAILED", f"{why} (trusted keys from {source})",
                       (("E", "secure_boot_v2", f"{why}"),) + fail[1:])

    def ota_set_boot_partition(self) -> None:
        result = self._ota_result
        if result is None or not self._live():
            raise OtaError("ESP_ERR_INVALID_ARG", "no verified OTA image (ota_end first)")
        board = self._board
        efuse = board._efuse
        flash = board._flash
        if efuse.anti_rollback and result.secure_version < efuse.secure_version:
            # esp_ota_set_boot_partition with anti-rollback erases the image and refuses
            # (esp_ota_ops.c, notes §3.4).
            _, table = self._running()
            part = table.find(result.partition_label)
            if part is not None:
                flash.erase(part.offset, min(part.size, -(-result.size // 4096) * 4096))
            self._ota_result = None
            raise OtaError(
                "ESP_ERR_OTA_SMALL_SEC_VER",
                f"the image's secure_version {result.secure_version} is below the eFuse's "
                f"{efuse.secure_version}",
                (("E", "esp_ota_ops", "The current secure version of the app is less than "
                  f"the one in eFuse ({result.secure_version} < {efuse.secure_version})"),))
        err = boot_chain.set_boot_partition(flash, result.partition_label,
                                            rollback_enabled=board._rollback_enabled)
        flash.flush()
        self._ota_result = None
        if err != "ESP_OK":
            raise OtaError(err, f"cannot select partition {result.partition_label}")

    def ota_abort(self) -> None:
        self._ota_part = None
        self._ota_result = None

    # -- HTTP download on a background thread (the board's Wi-Fi/TCP stack) ---------------------

    def fetch(
        self,
        url: str,
        *,
        offset: int,
        on_response: Callable[[int, int, int | None], None],
        on_data: Callable[[bytes], None],
        on_done: Callable[[str | None], None],
    ) -> _Fetch:
        job = _Fetch(self, url, offset, on_response, on_data, on_done)
        job.start()
        return job


def _next_update_partition(table: PartitionTable, running_label: str) -> Partition | None:
    """``esp_ota_get_next_update_partition``: the OTA slot after the running one (ota_0 when
    running factory or test).
    """
    slots = table.ota_slots
    if not slots:
        return None
    running = table.find(running_label)
    current = running.ota_slot if running is not None else None
    if current is None:
        return slots[min(slots)]
    order = sorted(slots)
    return slots[order[(order.index(current) + 1) % len(order)]]


class _Fetch:
    """One HTTP GET on its own thread; results go to the app on the board's thread.

    Stops (closing the socket) when cancelled or when the board resets or loses power, as a
    real chip's TCP stack dies with it. At most FETCH_IN_FLIGHT chunks wait for the board.
    """

    def __init__(self, host: _Host, url: str, offset: int,
                 on_response: Callable[[int, int, int | None], None],
                 on_data: Callable[[bytes], None], on_done: Callable[[str | None], None]) -> None:
        self._host = host
        self._url = url
        self._offset = offset
        self._on_response = on_response
        self._on_data = on_data
        self._on_done = on_done
        self._cancelled = threading.Event()
        self._slots = threading.Semaphore(FETCH_IN_FLIGHT)
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"ota-fetch-{host.board_id}")

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        self._cancelled.set()

    def _alive(self) -> bool:
        return not self._cancelled.is_set() and self._host._live()

    def _deliver(self, func: Callable[[], None]) -> bool:
        while not self._slots.acquire(timeout=0.2):
            if not self._alive():
                return False

        def run() -> None:
            self._slots.release()
            if not self._cancelled.is_set():
                func()

        self._host.call_later(0.0, run)
        return self._alive()

    def _run(self) -> None:
        error: str | None = None
        conn: http.client.HTTPConnection | None = None
        try:
            parts = urlsplit(self._url)
            if parts.scheme != "http" or parts.hostname not in FETCH_HOSTS:
                error = (f"cannot fetch {self._url!r}: a virtual board reaches only "
                         "http://127.0.0.1 (the rack's network is this host)")
                return
            conn = http.client.HTTPConnection(parts.hostname, parts.port or 80,
                                              timeout=FETCH_TIMEOUT)
            headers = {"Range": f"bytes={self._offset}-"} if self._offset > 0 else {}
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            start, total, length = _response_span(resp)
            status = resp.status
            if not self._deliver(lambda: self._on_response(status, start, total)):
                return
            if status not in (200, 206):
                error = f"HTTP status {status} {resp.reason}"
                return
            received = 0
            while self._alive():
                chunk = resp.read1(FETCH_CHUNK)
                if not chunk:
                    break
                received += len(chunk)
                if not self._deliver(lambda c=chunk: self._on_data(c)):  # type: ignore[misc]
                    return
            if not self._alive():
                return
            if length is not None and received < length:
                error = (f"connection closed after {start + received} of "
                         f"{start + length} bytes")
        except TimeoutError:
            error = f"no data for {FETCH_TIMEOUT:g} s (receive timeout)"
        except (OSError, http.client.HTTPException) as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        finally:
            if conn is not None:
                conn.close()
            if self._alive():
                final = error
                self._deliver(lambda: self._on_done(final))


def _response_span(resp: http.client.HTTPResponse) -> tuple[int, int | None, int | None]:
    """(first byte of the body in the file, file size, body length) from the headers."""
    length_header = resp.getheader("Content-Length")
    length = int(length_header) if length_header and length_header.isdigit() else None
    content_range = resp.getheader("Content-Range") or ""
    if resp.status == 206 and content_range.startswith("bytes "):
        span, _, size = content_range[6:].partition("/")
        first = span.partition("-")[0]
        total = int(size) if size.isdigit() else None
        return (int(first) if first.isdigit() else 0), total, length
    return 0, length, length


def _nothing() -> None:
    """An event that only wakes the worker (so it recomputes its next timer)."""


class VirtualBoard:
    """A simulated ESP32-family board driven through :meth:`feed`, lines, power and reset.

    Thread-safe entry points: :meth:`feed`, :meth:`attach`, :meth:`detach`,
    :meth:`set_client_lines`, :meth:`set_lines`, :meth:`power`, :meth:`reset`,
    :meth:`set_wire_time`, :meth:`call_later`, :meth:`status`, :meth:`close`. Everything else runs
    under the board's execution lock (on its worker thread, or inline in :meth:`feed`).
    """

    def __init__(
        self,
        board_id: str,
        chip: str,
        flash_path: Path | str,
        flash_size: int,
        mac: str,
        medium: Any,
        *,
        position: int = 0,
        features: tuple[str, ...] = (),
        rollback_enabled: bool = True,
        efuse: BootEfuse | None = None,
        on_efuse_change: Callable[[BootEfuse], None] | None = None,
        rc_delay: float = DEFAULT_RC_DELAY,
        boot_retry_delay: float = DEFAULT_BOOT_RETRY_DELAY,
        wire_time: bool = False,
        powered: bool = True,
        revision: int | None = None,
    ) -> None:
        self.board_id = board_id
        self.chip = chip
        self.mac = mac
        # major * 100 + minor, as the eFuses report it; None: the chip's current silicon.
        self.revision = revision
        self.flash_size = flash_size
        self.position = position
        self.features = tuple(features)
        self._medium = medium
        self._rollback_enabled = rollback_enabled
        self._efuse = efuse if efuse is not None else BootEfuse()
        self._on_efuse_change = on_efuse_change
        self._rc_delay = rc_delay
        self._boot_retry_delay = boot_retry_delay
        self._flash = FlashMemory(Path(flash_path), flash_size)
        self._loader = LoaderSession(
            chip,
            self._flash,
            bytes.fromhex(mac.replace(":", "")),
            on_run_app=self._on_run_app,
            on_baud=self._on_baud,
            revision=revision,
            on_watchdog=self._on_watchdog,
        )
        # Worker-thread state. Everything below runs under _exec_lock: on the worker thread, or
        # on a port thread in feed()'s fast path. _queued counts posted, not yet finished events.
        self._exec_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._queued = 0
        self._owner: int | None = None  # thread id holding _exec_lock
        self._event_time = 0.0  # when the event being handled happened (its timers count from it)
        # (time posted, event); None stops the worker.
        self._events: queue.SimpleQueue[tuple[float, Callable[[], None]] | None] = (
            queue.SimpleQueue()
        )
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._epoch = 0  # bumped by every reset/power change; stale timers and apps check it
        self._mode = "off"
        self._app: Any = None
        self._app_info: AppInfo | None = None
        self._console_line = bytearray()
        self._console_cr = False  # the last console byte was a CR (CR LF is one line end)
        self._pending_boot = False
        self._pending_wdt = False
        self._pending_baud: int | None = None
        self._loop_outcome: BootOutcome | None = None  # a "wdt" retry's outcome, reused
        self._loop_parked = False
        self._powered = False
        self._baud = DEFAULT_BAUD
        # Lines: the control endpoint's drivers and the USB-UART's DTR/RTS are wired-AND onto
        # EN and IO0 (both are open-drain pulls against the DevKit's pull-ups).
        self._ctl_en = True
        self._ctl_io0 = True
        self._dtr = False
        self._rts = False
        # Shared with port threads.
        self._sink_lock = threading.Lock()
        self._sink: OutputSink | None = None
        self._wire_time = wire_time
        self._rx_free_at = 0.0
        self._tx_free_at = 0.0
        self._rx_lock = threading.Lock()
        self._rx_bytes = 0
        self._tx_bytes = 0
        self._wire_seconds = 0.0
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name=f"board-{board_id}", daemon=True
        )
        self._thread.start()
        if powered:
            self.power(True)

    # ------------------------------------------------------------------ thread-safe API

    def feed(self, data: bytes) -> None:
        """Bytes from the client arrive on the board's UART RX (paced when wire time is on)."""
        if not data:
            return
        with self._rx_lock:
            self._rx_bytes += len(data)
            self._wire_seconds += len(data) * UART_BITS_PER_BYTE / self._baud
        if self._wire_time:
            # Sleep per chunk in the caller's (port) thread: the bytes reach the chip only once
            # they have crossed the wire, and the port thread has nothing else to do meanwhile.
            with self._rx_lock:
                now = time.monotonic()
                done = max(now, self._rx_free_at) + len(data) * UART_BITS_PER_BYTE / self._baud
                self._rx_free_at = done
            delay = done - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        # Fast path: with nothing queued ahead of these bytes, handle them right here under the
        # board's execution lock instead of waking the worker (a thread hand-off per packet is
        # most of the board's CPU cost in a flash write). Queued events keep their order.
        with self._exec_lock:
            with self._count_lock:
                idle = self._queued == 0
            if idle:
                self._owner = threading.get_ident()
                self._event_time = time.monotonic()
                try:
                    self._guard(lambda: self._on_rx(data))
                finally:
                    self._owner = None
                return
        self._post(lambda: self._on_rx(data))

    def attach(self, sink: OutputSink) -> None:
        """Connect a client; the board's TX goes to it from now on."""
        with self._sink_lock:
            self._sink = sink
        self._post(self._console_line.clear)
        self._post(self._resume_loop)

    def detach(self, sink: OutputSink) -> None:
        """Disconnect ``sink`` (if it is still the attached one) and release DTR/RTS."""
        with self._sink_lock:
            if self._sink is sink:
                self._sink = None
        # A closed USB-UART releases DTR and RTS: (0,0) leaves EN and IO0 high, no reset edge.
        self.set_client_lines(dtr=False, rts=False)

    @property
    def has_client(self) -> bool:
        return self._sink is not None

    def set_client_lines(self, *, dtr: bool | None = None, rts: bool | None = None) -> None:
        """DTR/RTS from the USB-UART (rfc2217 SET_CONTROL); True = asserted."""

        def apply() -> None:
            if dtr is not None:
                self._dtr = dtr
            if rts is not None:
                self._rts = rts
            self._lines_changed()

        self._post(apply)

    def set_lines(self, *, en: bool | None = None, io0: bool | None = None) -> None:
        """Drive EN/IO0 from the rack's control hardware (True = released/high); waits."""

        def apply() -> None:
            if en is not None:
                self._ctl_en = en
            if io0 is not None:
                self._ctl_io0 = io0
            self._lines_changed()

        self._call(apply)

    def power(self, on: bool) -> None:
        """Switch the board's supply; returns once the board has reacted."""
        self._call(lambda: self._set_power(on))

    def reset(self, boot: str = "flash") -> None:
        """EN pulse with IO0 held low (``"download"``) or high (``"flash"``); waits for the mode.

        Done atomically on the board (no RC window), so the caller can use the port right after.
        """
        if boot not in ("flash", "download"):
            raise ValueError(f"reset boot must be 'flash' or 'download', not {boot!r}")
        self._call(lambda: self._control_reset(download=boot == "download"))

    def set_wire_time(self, enabled: bool) -> None:
        """Turn UART wire-time emulation on or off."""
        self._wire_time = enabled
        with self._rx_lock:
            self._rx_free_at = 0.0
        self._tx_free_at = 0.0

    @property
    def wire_time(self) -> bool:
        return self._wire_time

    def call_later(self, delay: float, func: Callable[[], None]) -> None:
        """Run ``func`` under the board's execution lock after ``delay`` seconds."""
        if self._owner == threading.get_ident():
            # From board code itself: count from the time of the event being handled.
            entry = (self._event_time + max(0.0, delay), next(self._timer_seq), func)
            heapq.heappush(self._timers, entry)
            if threading.current_thread() is not self._thread:
                self._post(_nothing)  # feed()'s inline path: wake the worker to re-arm its wait
            return
        due = time.monotonic() + max(0.0, delay)
        self._post(lambda: heapq.heappush(self._timers, (due, next(self._timer_seq), func)))

    @property
    def efuse(self) -> BootEfuse:
        """The board's virtual eFuses now (an immutable record)."""
        return self._efuse

    def burn_efuse(self, **burn: Any) -> BootEfuse:
        """Burn eFuses (see :func:`burn_efuse`; raises UsageError); returns the new record.

        Takes effect at once for the running app's OTA checks and at the next boot for the
        bootloader, as on a chip. Stored through ``on_efuse_change``.
        """
        result: list[BootEfuse] = []

        def apply() -> None:
            new = burn_efuse(self._efuse, self.chip, **burn)
            self._set_efuse(new)
            result.append(new)

        self._call(apply)
        return result[0]

    def replace_chip(self, efuse: BootEfuse) -> None:
        """Simulator only: a fresh chip with these eFuses (what swapping the module does)."""
        self._call(lambda: self._set_efuse(efuse))

    def status(self) -> BoardStatus:
        """Snapshot of the board (read without stopping it; may be mid-transition)."""
        mode = self._mode
        if mode in ("download", "stub"):
            mode = "stub" if self._loader.mode == "stub" else "download"
        info = self._app_info if mode in ("app", "stopped") else None
        app = None
        if info is not None:
            app = {
                "project": info.project,
                "version": info.version,
                "slot": info.partition_label,
                "ota_state": info.ota_state or "",
                "runs": "yes" if info.demo else "no",
            }
        return BoardStatus(
            board_id=self.board_id,
            chip=self.chip,
            mac=self.mac,
            powered=self._powered,
            mode=mode,
            flash_size=self.flash_size,
            baud=self._baud,
            app=app,
            client=self.has_client,
            en=self._en(),
            io0=self._io0(),
            wire_time=self._wire_time,
            rx_bytes=self._rx_bytes,
            tx_bytes=self._tx_bytes,
            wire_seconds=self._wire_seconds,
            revision=format_revision(self._loader.revision),
        )

    def close(self) -> None:
        """Stop the app and the worker thread, and flush the flash file."""
        if self._closed:
            return
        self._call(self._shutdown)
        self._closed = True
        self._events.put(None)
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------ worker plumbing

    def _post(self, func: Callable[[], None]) -> None:
        with self._count_lock:
            self._queued += 1
        self._events.put((time.monotonic(), func))

    def _call(self, func: Callable[[], None], timeout: float = 30.0) -> None:
        if self._owner == threading.get_ident():  # already running board code: no hand-off
            func()
            return
        done: Future[None] = Future()

        def run() -> None:
            try:
                func()
            except BaseException as exc:  # handed back to the caller's thread
                done.set_exception(exc)
            else:
                done.set_result(None)

        self._post(run)
        done.result(timeout=timeout)

    def _run(self) -> None:
        while True:
            timeout = None
            if self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            try:
                item = self._events.get(timeout=timeout)
            except queue.Empty:
                item = None
                if self._closed:
                    return
            else:
                if item is None:
                    return
            with self._exec_lock:
                self._owner = threading.get_ident()
                if item is not None:
                    posted, event = item
                    # Timers that fell due before this event was posted go first, and the event
                    # runs at its posting time: a late worker must not reorder, e.g., the EN RC
                    # sample and a DTR change that came after it.
                    self._run_timers(posted)
                    self._event_time = posted
                    self._guard(event)
                    with self._count_lock:
                        self._queued -= 1
                self._run_timers(time.monotonic())
                self._owner = None

    def _run_timers(self, until: float) -> None:
        while self._timers and self._timers[0][0] <= until:
            due, _, func = heapq.heappop(self._timers)
            self._event_time = due
            self._guard(func)

    def _guard(self, func: Callable[[], None]) -> None:
        # One bad event (an app bug, a loader bug) must not kill the board's thread: log it on
        # the board's console, as a crashing firmware would print, and keep serving.
        try:
            func()
        except Exception as exc:  # noqa: BLE001 - the board must outlive any single fault
            self._emit(f"\r\n[virtual board {self.board_id}: internal error {exc!r}]\r\n".encode())

    # ------------------------------------------------------------------ output

    def _emit(self, data: bytes) -> None:
        if not data or not self._powered or self._mode in ("off", "reset"):
            return
        with self._sink_lock:
            sink = self._sink
        if sink is None:
            return
        with self._rx_lock:
            self._tx_bytes += len(data)
            self._wire_seconds += len(data) * UART_BITS_PER_BYTE / self._baud
        if self._wire_time:
            # Sleep per chunk: the chunk is delivered after its UART time, so a host sees the
            # throughput of a real UART at the current baud without a per-byte loop.
            now = time.monotonic()
            done = max(now, self._tx_free_at) + len(data) * UART_BITS_PER_BYTE / self._baud
            self._tx_free_at = done
            delay = done - now
            if delay > 0:
                time.sleep(delay)
        try:
            sink.write(data)
        except OSError:
            with self._sink_lock:
                if self._sink is sink:
                    self._sink = None

    # ------------------------------------------------------------------ input

    def _on_rx(self, data: bytes) -> None:
        if not self._powered:
            return
        mode = self._mode
        if mode in ("download", "stub"):
            out = self._loader.feed(data)
            if out:
                self._emit(out)
            # Baud changes after the ack went out at the old rate, as on the chip.
            if self._pending_baud is not None:
                self._baud = self._pending_baud
                self._pending_baud = None
            if self._pending_boot:
                self._pending_boot = False
                self._spi_boot("sw")  # the ROM loader jumps to flash boot: a software reset
            if self._pending_wdt:
                self._pending_wdt = False
                epoch = self._epoch
                self.call_later(RTC_WDT_DELAY, lambda: self._watchdog_reset(epoch))
        elif mode == "app":
            self._console_input(data)
        # off / reset / halted / boot-loop: the chip is not listening.

    def _console_input(self, data: bytes) -> None:
        for byte in data:
            after_cr, self._console_cr = self._console_cr, byte == 0x0D
            if byte in (0x0A, 0x0D):
                # An app that reads empty lines (a Unity menu: ENTER shows the test list) gets
                # them, with CR LF taken as one line end.
                empty_ok = getattr(self._app, "wants_empty_lines", False) and not (
                    byte == 0x0A and after_cr)
                if self._console_line or empty_ok:
                    line = self._console_line.decode("utf-8", "replace")
                    self._console_line.clear()
                    if self._app is not None:
                        self._app.feed_line(line)
                        if self._mode != "app":
                            return
            elif len(self._console_line) < 4096:  # a console line buffer is finite
                self._console_line.append(byte)

    def _on_run_app(self) -> None:
        # Called by the loader from inside feed(): boot once its reply has been sent.
        self._pending_boot = True

    def _on_watchdog(self) -> None:
        # Called by the loader from inside feed(): reset once its reply has been sent.
        self._pending_wdt = True

    def _watchdog_reset(self, epoch: int) -> None:
        # The RTC watchdog's system reset: the chip restarts and samples its strapping pins
        # again, so it boots from flash unless IO0 is held low (ROM or stub alike stop).
        if epoch != self._epoch or not self._powered or self._mode not in ("download", "stub"):
            return
        self._enter_reset()
        self._leave_reset(download=not self._io0(), reason="wdt")

    def _on_baud(self, baud: int) -> None:
        if baud > 0:
            self._pending_baud = baud

    # ------------------------------------------------------------------ lines, power, reset

    def _en(self) -> bool:
        return self._ctl_en and not (self._rts and not self._dtr)

    def _io0(self) -> bool:
        return self._ctl_io0 and not (self._dtr and not self._rts)

    def _lines_changed(self) -> None:
        if not self._powered:
            return
        en = self._en()
        in_reset = self._mode == "reset"
        if not en and not in_reset:
            self._enter_reset()
        elif en and in_reset and not self._rc_pending:
            self._rc_pending = True
            epoch = self._epoch
            self.call_later(self._rc_delay, lambda: self._rc_expired(epoch))

    _rc_pending = False

    def _rc_expired(self, epoch: int) -> None:
        self._rc_pending = False
        if epoch != self._epoch or self._mode != "reset":
            return
        if not self._en():
            return
        self._leave_reset(download=not self._io0())

    def _enter_reset(self) -> None:
        self._stop_app()
        self._epoch += 1
        self._rc_pending = False
        self._mode = "reset"

    def _leave_reset(self, *, download: bool, reason: str = "poweron") -> None:
        self._epoch += 1
        self._baud = DEFAULT_BAUD
        self._pending_baud = None
        self._pending_boot = False
        self._pending_wdt = False
        if download:
            self._mode = "download"
            # Banner first, at the reset edge: esptool looks for it right after its reset
            # sequence and flushes its input before SYNC (bytes after that break SLIP parsing).
            banner = rom_banner(self.chip, True) if reason == "poweron" else rom_banner(
                self.chip, True, reset_reason=boot_chain.rom_reset_text(self.chip, reason))
            self._emit(banner.encode())
            self._loader.enter_download()
        else:
            self._loop_outcome = None
            self._spi_boot(reason)

    def _set_power(self, on: bool) -> None:
        if on == self._powered:
            return
        if not on:
            self._stop_app()
            self._epoch += 1
            self._rc_pending = False
            self._mode = "off"
            self._powered = False
            self._flash.flush()
            return
        self._powered = True
        self._mode = "reset"
        if self._en():
            self._leave_reset(download=not self._io0())

    def _control_reset(self, *, download: bool) -> None:
        if not self._powered:
            raise RuntimeError(
                f"board {self.board_id} is powered off; power it on before resetting it"
            )
        self._enter_reset()
        self._leave_reset(download=download)

    def _schedule_soft_reset(self, epoch: int, delay: float, reason: str) -> None:
        # Deferred (never inside the app's own call) and delayed by the restart time, so a
        # crash-at-boot image loops at a chip's pace instead of spinning the CPU.
        self.call_later(delay, lambda: self._soft_reset(epoch, reason))

    def _soft_reset(self, epoch: int, reason: str) -> None:
        # esp_restart()/panic reset: EN is not involved, the chip boots from flash again.
        if epoch != self._epoch or not self._powered:
            return
        self._stop_app()
        self._epoch += 1
        self._loop_outcome = None
        self._spi_boot(reason)

    def _stop_app(self) -> None:
        app, self._app = self._app, None
        self._app_info = None
        self._console_line.clear()
        if app is not None:
            try:
                app.stop()
            except Exception:  # noqa: BLE001 - a stopping app cannot stop a reset
                pass

    # ------------------------------------------------------------------ boot

    def _spi_boot(self, reason: str) -> None:
        """Boot from flash; ``reason`` picks the ROM's rst: line (poweron, sw, panic, wdt)."""
        self._stop_app()
        self._loop_parked = False
        self._mode = "booting"  # transient, inside this call: the chip is out of reset and talks
        if reason != "wdt":  # a watchdog retry follows a boot that wrote nothing
            self._flash.flush()
        outcome = self._loop_outcome if reason == "wdt" else None
        if outcome is None:
            outcome = boot_chain.boot(
                self.chip,
                self._flash,
                efuse=self._efuse,
                rollback_enabled=self._rollback_enabled,
                reset_reason=reason,
                # The real RSA-PSS check of each Secure Boot V2 block (secure_boot_signatures
                # _bootloader.c verifies every candidate block with the ROM's RSA routines).
                signature_verifier=verify_block,
                chip_revision=self.revision,
            )
        log = outcome.log
        if outcome.app is not None and not outcome.app.demo:
            # Said in the same write as the boot log, so a reader never sees app_main without
            # the reason nothing follows it.
            log += cannot_run_line(self.board_id, outcome.app) + "\r\n"
        self._emit(log.encode("utf-8", "replace"))
        if outcome.app is not None:
            self._loop_outcome = None
            if outcome.app.ota_state == "VALID":
                self._raise_secure_version(outcome.app.secure_version)
            self._app_info = outcome.app
            if not outcome.app.demo:
                # Nothing of the app runs: no console, no mesh, no self-test (so an OTA slot
                # stays PENDING_VERIFY until the next reset rolls it back, as on a chip whose
                # app never confirms itself).
                self._mode = "stopped"
                return
            self._mode = "app"
            epoch = self._epoch
            self._app = DemoApp(_Host(self, epoch), outcome.app, self._medium)
            self._app.start()
        elif outcome.boot_loop:
            # Within one boot loop nothing can change the flash (no loader, no app), so a
            # retry's outcome is reused instead of re-parsing the flash every attempt.
            if reason == "wdt":
                self._loop_outcome = outcome
            self._mode = "boot-loop"
            epoch = self._epoch
            self.call_later(self._boot_retry_delay, lambda: self._retry_boot(epoch))
        else:
            self._loop_outcome = None
            self._mode = "halted"

    def _retry_boot(self, epoch: int) -> None:
        if epoch != self._epoch or self._mode != "boot-loop":
            return
        if self._sink is None and self._loop_outcome is not None:
            # Nobody listens and the outcome is known: another attempt would change nothing
            # observable, so park the loop (idle racks stay at ~0 CPU). attach() resumes it.
            self._loop_parked = True
            return
        self._epoch += 1
        self._spi_boot("wdt")  # the RTC watchdog resets a chip stuck in the ROM

    def _resume_loop(self) -> None:
        if self._loop_parked and self._mode == "boot-loop":
            self._loop_parked = False
            self._epoch += 1
            self._spi_boot("wdt")

    def _mark_running_slot(self, *, valid: bool) -> None:
        info = self._app_info
        if info is None:
            return
        if valid:
            if boot_chain.mark_valid(self._flash, info) == "ESP_OK":
                self._app_info = replace(info, ota_state="VALID")
                self._raise_secure_version(info.secure_version)
        else:
            boot_chain.mark_invalid(self._flash, info)
        self._flash.flush()

    def _raise_secure_version(self, secure_version: int) -> None:
        # The bootloader's update_anti_rollback(): the eFuse only ever goes up, and only when
        # anti-rollback is configured.
        efuse = self._efuse
        if efuse.anti_rollback and secure_version > efuse.secure_version:
            bits = secure_version_bits(self.chip)
            self._set_efuse(replace(efuse, secure_version=min(secure_version, bits)))

    def _set_efuse(self, efuse: BootEfuse) -> None:
        if efuse == self._efuse:
            return
        self._efuse = efuse
        if self._on_efuse_change is not None:
            self._on_efuse_change(efuse)

    def _shutdown(self) -> None:
        self._stop_app()
        self._epoch += 1
        self._mode = "off"
        self._powered = False
        self._flash.flush()
        self._flash.close()
