"""The board side of the demo app's calls: reboot, panic, OTA writes, HTTP downloads.

:class:`AppHostImpl` is the :class:`~pytest_hilfarm.sim.model.AppHost` one app instance of a
:class:`~pytest_hilfarm.sim.board.VirtualBoard` sees: ``esp_ota_begin/write/end`` and
``esp_ota_set_boot_partition`` on the board's flash (image, chip and signature checks as ESP-IDF
makes them), and an HTTP download thread that reaches nothing but 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import http.client
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pytest_hilfarm.errors import ImageError
from pytest_hilfarm.esp.image import (
    AppImage,
    chip_for_id,
    chip_id_of,
)
from pytest_hilfarm.esp.partitions import Partition, PartitionTable
from pytest_hilfarm.ota.signing import verify_block
from pytest_hilfarm.sim import boot as boot_chain
from pytest_hilfarm.sim.model import AppInfo, OtaError, OtaResult

if TYPE_CHECKING:
    from pytest_hilfarm.sim.board import VirtualBoard

# esp_restart() to the next boot log on a DevKit takes a few hundred ms; a panic adds the
# handler's backtrace print. Kept short so tests that reboot stay fast.
RESTART_DELAY = 0.1
PANIC_RESTART_DELAY = 0.3
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


class AppHostImpl:
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
            image = boot_chain.parse_flash_image(flash, offset=part.offset, limit=part.size,
                                                 chip=None, verify=False)
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
            running = boot_chain.parse_flash_image(flash, offset=info.partition_offset,
                                                   limit=info.partition_size, chip=None,
                                                   verify=False)
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

    def __init__(self, host: AppHostImpl, url: str, offset: int,
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
