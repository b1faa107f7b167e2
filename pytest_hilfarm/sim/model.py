"""Records shared by the virtual rack's parts: boot outcome, app identity, the app's host.

``boot.py`` produces a :class:`BootOutcome` from a board's flash; ``board.py`` then runs the
:class:`~pytest_hilfarm.sim.app.DemoApp` it names, giving it an :class:`AppHost` to act on the
board (reboot, panic, confirm the OTA slot, reach the radio medium). Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

CHIPS = ("esp32", "esp32s2", "esp32c3")


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
