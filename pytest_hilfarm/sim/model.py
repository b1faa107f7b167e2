"""Records shared by the virtual rack's parts: boot outcome, app identity, the app's host.

``boot.py`` produces a :class:`BootOutcome` from a board's flash; ``board.py`` then runs the
:class:`~pytest_hilfarm.sim.app.DemoApp` it names when the image is a demo build (any other
image stops at ``app_main``, saying so), giving it an :class:`AppHost` to act on the
board (reboot, panic, confirm the OTA slot, write an OTA update, download over HTTP, reach the
radio medium). Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Faults:
    """Faults built into an app image (properties of the image, not of the board).

    ``slow_boot`` is seconds of extra boot time; ``drop_mesh`` is the fraction (0..1) of mesh
    packets the app drops.
    """

    crash_at_boot: bool = False
    hang_at_boot: bool = False
    fail_self_test: bool = False
    slow_boot: float = 0.0
    drop_mesh: float = 0.0
    # Not a fault: the image is a Unity unit-test app (ESP-IDF's unity_run_menu() from
    # app_main), so the demo app shows the Unity test menu instead of its console.
    unity_menu: bool = False
    # Where the image's code faults when it panics (the crash command, crash_at_boot): the
    # program counter and return address, taken from the build's ELF so a decoded backtrace
    # names real functions. 0: addresses derived from the image's hash (no ELF to point into).
    panic_pc: int = 0
    panic_ra: int = 0


@dataclass(frozen=True)
class AppInfo:
    """What the boot chain learned about the app it started."""

    project: str
    version: str
    secure_version: int
    idf_ver: str
    chip: str
    partition_label: str  # "factory", "ota_0", "ota_1", ...
    partition_offset: int
    partition_size: int
    image_sha256: str  # hex of the appended SHA-256 (or of the whole image if none)
    faults: Faults = field(default_factory=Faults)
    # otadata state of the running slot after the boot ("PENDING_VERIFY", "VALID", "UNDEFINED",
    # ...); None for a factory boot.
    ota_state: str | None = None
    # The image carries the virtual rack's demo-app marker (built by sim/appbuild.py): only then
    # is there a model of the app for the board to run. Any other image (a real ESP-IDF build)
    # boots up to app_main and stops there.
    demo: bool = True
    elf_sha256: str = ""  # hex of esp_app_desc_t.app_elf_sha256 ("" without a descriptor)
    has_app_desc: bool = True


@dataclass(frozen=True)
class BootOutcome:
    """Result of one pass through ROM -> second-stage bootloader -> app selection.

    ``log`` is the text the board prints (CRLF line ends, as the chips do), from the ROM banner
    through the bootloader's lines. ``app`` is set when an app was started; otherwise ``halted``
    is True (the chip stops) or ``boot_loop`` is True (the chip resets and tries again), and
    ``error`` says why in the words ESP-IDF uses.
    """

    log: str
    app: AppInfo | None = None
    halted: bool = False
    boot_loop: bool = False
    error: str | None = None


class OtaError(Exception):
    """An OTA step the board refused, with the ``esp_err_t`` name ESP-IDF returns for it.

    ``code`` is e.g. ``ESP_ERR_OTA_VALIDATE_FAILED``; ``lines`` are the log lines (``(level,
    tag, text)``) the ESP-IDF component would have printed before returning it.
    """

    def __init__(self, code: str, message: str,
                 lines: tuple[tuple[str, str, str], ...] = ()) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.lines = lines


@dataclass(frozen=True)
class OtaResult:
    """What ``ota_end`` verified: the new image's identity and the key that accepted it."""

    partition_label: str
    project: str
    version: str
    secure_version: int
    size: int
    sha256: str
    signed_by: str | None  # hex key digest of the accepting signature block; None if unchecked


class FetchHandle(Protocol):
    """A download started by :meth:`AppHost.fetch`."""

    def cancel(self) -> None:
        """Stop the download; no further callbacks are made."""


class AppHost(Protocol):
    """What a running demo app may do to the board that runs it."""

    board_id: str
    chip: str
    mac: str  # "aa:bb:cc:dd:ee:ff"

    def emit(self, text: str) -> None:
        """Write text to the board's UART (the console the test reads)."""

    def reboot(self, reason: str) -> None:
        """Software reset (``esp_restart``): the board boots again from flash."""

    def panic(self, text: str) -> None:
        """Print the panic text and reset, as a crashing app does."""

    def mark_app_valid(self) -> None:
        """``esp_ota_mark_app_valid_cancel_rollback``: confirm the running OTA slot."""

    def mark_app_invalid_and_reboot(self) -> None:
        """``esp_ota_mark_app_invalid_rollback_and_reboot``: reject the running slot."""

    def now(self) -> float:
        """Monotonic seconds (the daemon's clock)."""

    def call_later(self, delay: float, func: Callable[[], None]) -> None:
        """Run ``func`` after ``delay`` seconds on the board's own thread, if still running."""

    # --- OTA (esp_ota_ops / esp_https_ota on the board; all run on the board's thread) ----------

    def ota_begin(self, image_size: int) -> tuple[str, int]:
        """``esp_ota_begin`` on the next update slot: erase it, return its label and offset.

        Raises :class:`OtaError` (ESP_ERR_OTA_ROLLBACK_INVALID_STATE, ESP_ERR_INVALID_SIZE,
        ESP_ERR_NOT_FOUND).
        """

    def ota_write(self, data: bytes) -> None:
        """``esp_ota_write``: append to the slot being written (raises :class:`OtaError`)."""

    def ota_end(self) -> OtaResult:
        """``esp_ota_end`` + ``esp_image_verify``: chip, checksum, SHA-256 and, with Secure Boot
        or signed apps, the signature against the trusted key digests. Raises :class:`OtaError`.
        """

    def ota_set_boot_partition(self) -> None:
        """``esp_ota_set_boot_partition`` for the slot just verified (otadata NEW); raises
        :class:`OtaError` (ESP_ERR_OTA_SMALL_SEC_VER with anti-rollback).
        """

    def ota_abort(self) -> None:
        """``esp_ota_abort``: forget the slot being written (otadata is untouched)."""

    def fetch(
        self,
        url: str,
        *,
        offset: int,
        on_response: Callable[[int, int, int | None], None],
        on_data: Callable[[bytes], None],
        on_done: Callable[[str | None], None],
    ) -> FetchHandle:
        """HTTP GET ``url`` (127.0.0.1 only) from byte ``offset`` (a Range request when > 0) on a
        background thread; the callbacks run on the board's thread, in order:
        ``on_response(status, start, total_size)`` (``start`` = the body's first byte in the
        file, from Content-Range), ``on_data(chunk)`` per chunk, then
        ``on_done(error)`` (None when the whole body arrived). Nothing is called after a reset.
        """
