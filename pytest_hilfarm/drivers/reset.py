"""Reset drivers: restart a board into its app or into the ROM download mode, by name.

Each backend implements :class:`ResetDriver` and opens with the rack-file snippet that selects
it; ``make_reset(name, params)`` builds one from ``RESET_DRIVERS``. The DTR/RTS sequences are
Espressif's own, from ``esp_pylib.serial_reset`` (which esptool and esp-idf-monitor share),
run on the port the console already holds; a rack file may give its own sequences in esptool's
custom reset-sequence syntax. This module must not open or close ports, read rack files or
flash anything.

``esptool_before`` tells the flasher whether esptool can enter download mode itself over the
port (``"default-reset"``, ``"usb-reset"``) or whether the caller must call
``reset_to_download()`` first and connect with ``"no-reset"`` (virtual boards over socket://,
boards without reset lines).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from esp_pylib import serial_reset

from pytest_hilfarm.drivers.power import DriverSpec, build_driver
from pytest_hilfarm.errors import UsageError


@runtime_checkable
class ResetDriver(Protocol):
    """Restarts one board."""

    @property
    def esptool_before(self) -> str:
        """The ``before`` mode esptool uses on this board (how flashing enters download mode)."""

    def reset_to_app(self) -> None:
        """Reset with IO0 high: the chip boots from SPI flash."""

    def reset_to_download(self) -> None:
        """Reset with IO0 low: the chip waits in the ROM serial loader."""


class ControlLines(Protocol):
    """The pyserial surface the DTR/RTS sequences need (a Serial, or a recording fake)."""

    dtr: bool

    def setDTR(self, value: bool = True) -> None: ...  # noqa: N802 - pyserial's name

    def setRTS(self, value: bool = True) -> None: ...  # noqa: N802 - pyserial's name


PortSource = Callable[[], ControlLines]

def _tight(port: ControlLines) -> bool:
    """Whether the port can take both lines in one ioctl (a local tty on POSIX)."""
    fileno = getattr(port, "fileno", None)
    if os.name == "nt" or not callable(fileno):
        return False
    try:
        fileno()
    except Exception:  # an RFC 2217 port, a socket, a closed port: no modem-control ioctl
        return False
    return True


@dataclass(frozen=True)
class ClassicReset:
    """DTR/RTS auto-reset circuit of a DevKit's USB-UART bridge (the two-transistor circuit).

    Rack file::

        reset: classic

    ``port`` is a callable returning the open port (the console's, so no second opener is
    needed). The sequences are Espressif's own (``esp_pylib.serial_reset``, shared by esptool
    and esp-idf-monitor): download entry is the tight Unix reset on a local tty (both lines in
    one ioctl) and the classic sequential one elsewhere (RFC 2217); the app reset is the hard
    reset (EN pulsed with IO0 left high).
    """

    port: PortSource
    enter_boot_delay: float = 0.1
    reset_delay: float = serial_reset.DEFAULT_RESET_DELAY
    hold_delay: float = 0.1
    esptool_before: str = "default-reset"

    def reset_to_download(self) -> None:
        port = self.port()
        sequence = (serial_reset.unix_tight_bootloader_reset if _tight(port)
                    else serial_reset.classic_bootloader_reset)
        sequence(port, enter_boot_delay=self.enter_boot_delay,  # type: ignore[arg-type]
                 reset_delay=self.reset_delay)

    def reset_to_app(self) -> None:
        port = self.port()
        # pyserial opens ports with DTR and RTS asserted; with DTR asserted the circuit would
        # hold EN high whatever RTS does, so release DTR (IO0 high) before pulling EN low.
        serial_reset.set_dtr(port, serial_reset.PIN_HIGH)  # type: ignore[arg-type]
        serial_reset.hard_reset(port, hold_delay=self.hold_delay)  # type: ignore[arg-type]


@dataclass(frozen=True)
class UsbJtagReset:
    """The USB-Serial-JTAG peripheral of ESP32-C3/S3/C6 (no external bridge, no transistors).

    Rack file::

        reset: usb-jtag

    The peripheral decodes DTR/RTS itself (``esp_pylib.serial_reset.usb_jtag_bootloader_reset``,
    esptool's USBJTAGSerialReset). A hard reset takes the chip, and with it the USB device, off
    the bus: the port re-enumerates (possibly under another /dev node, found again by its USB
    serial number or path), and the console reconnects to it.
    """

    port: PortSource
    settle_delay: float = 0.1
    hold_delay: float = 0.2
    esptool_before: str = "usb-reset"

    def reset_to_download(self) -> None:
        serial_reset.usb_jtag_bootloader_reset(  # type: ignore[arg-type]
            self.port(), settle_delay=self.settle_delay)

    def reset_to_app(self) -> None:
        # esptool's HardReset with uses_usb: a longer hold, then time to re-enumerate.
        serial_reset.hard_reset(self.port(), hold_delay=self.hold_delay,  # type: ignore[arg-type]
                                post_release_delay=self.hold_delay)


@dataclass(frozen=True)
class CustomReset:
    """DTR/RTS sequences of the rack file's own, in esptool's custom reset-sequence syntax.

    Rack file::

        reset: {download: "D0|R1|W0.1|D1|R0|W0.05|D0", app: "D0|R1|W0.1|R0"}

    ``D<0|1>``/``R<0|1>`` set DTR/RTS (1 = asserted), ``U<dtr>,<rts>`` both at once, ``W<s>``
    waits (esptool's ``custom_reset_sequence``, parsed by ``esp_pylib.serial_reset``). Without
    ``app`` the app reset is the hard reset. The flasher runs the download sequence itself on
    its own port (``esptool_before`` is ``custom:<sequence>``).
    """

    port: PortSource
    download: str
    app: str | None = None
    hold_delay: float = 0.1

    @property
    def esptool_before(self) -> str:
        return CUSTOM_BEFORE + self.download

    def reset_to_download(self) -> None:
        serial_reset.execute_custom_reset(self.port(), self.download)  # type: ignore[arg-type]

    def reset_to_app(self) -> None:
        port = self.port()
        if self.app is not None:
            serial_reset.execute_custom_reset(port, self.app)  # type: ignore[arg-type]
        else:
            serial_reset.set_dtr(port, serial_reset.PIN_HIGH)  # type: ignore[arg-type]
            serial_reset.hard_reset(port, hold_delay=self.hold_delay)  # type: ignore[arg-type]


# The flasher's ``before`` for a custom download sequence: "custom:" + the sequence.
CUSTOM_BEFORE = "custom:"


class VirtualResetControl(Protocol):
    """The part of the virtual rack control client reset needs (virtual.ControlClient)."""

    def reset(self, board: str, boot: Any = "flash") -> None:
        """Pulse EN of a virtual board with IO0 high ("flash") or low ("download")."""
        ...


@dataclass(frozen=True)
class VirtualReset:
    """EN/IO0 of a virtual rack board, through the rack's control endpoint.

    Rack file::

        reset: virtual

    Over ``socket://`` esptool cannot toggle lines at all, so the flasher connects with
    ``no-reset`` after ``reset_to_download()``.
    """

    control: VirtualResetControl
    board: str
    esptool_before: str = "no-reset"

    def reset_to_app(self) -> None:
        # The daemon holds the reset until connections already made to the board's ports are
        # attached (Daemon._settle_ports), so a console that just reconnected hears the boot.
        self.control.reset(self.board, "flash")

    def reset_to_download(self) -> None:
        self.control.reset(self.board, "download")


@dataclass(frozen=True)
class NoReset:
    """A board whose reset lines are not wired.

    Rack file::

        reset: none

    Both methods raise UsageError: silently not resetting would make a test read a stale boot
    log or flash a chip that is not in download mode.
    """

    board: str = "board"
    esptool_before: str = "no-reset"

    def reset_to_app(self) -> None:
        self._refuse("reset the board")

    def reset_to_download(self) -> None:
        self._refuse("put the board into download mode")

    def _refuse(self, action: str) -> None:
        raise UsageError(
            f"cannot {action}: it has no reset control (reset: none)",
            where=self.board,
            hint="wire EN/IO0 to the USB-UART's RTS/DTR and set reset: classic, or use a board "
            "with USB-Serial-JTAG (reset: usb-jtag)",
        )


def _port_source(params: Mapping[str, Any]) -> PortSource:
    port = params["port"]
    if callable(port) and not hasattr(port, "setDTR"):
        return port  # type: ignore[no-any-return]
    return lambda: port  # type: ignore[no-any-return]


def _delays(params: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {n: float(params[n]) for n in names if n in params}


def _build_classic(params: Mapping[str, Any]) -> ResetDriver:
    return ClassicReset(
        _port_source(params), **_delays(params, ("enter_boot_delay", "reset_delay", "hold_delay"))
    )


def _build_usb_jtag(params: Mapping[str, Any]) -> ResetDriver:
    return UsbJtagReset(_port_source(params), **_delays(params, ("settle_delay", "hold_delay")))


def _build_custom(params: Mapping[str, Any]) -> ResetDriver:
    return CustomReset(_port_source(params), download=str(params["download"]),
                       app=None if params.get("app") is None else str(params["app"]))


def _build_virtual(params: Mapping[str, Any]) -> ResetDriver:
    from pytest_hilfarm.drivers.virtual import control_client

    return VirtualReset(control=control_client(params["control"]), board=str(params["board"]))


def _build_none(params: Mapping[str, Any]) -> ResetDriver:
    return NoReset(board=str(params.get("board", "board")))


RESET_DRIVERS: Mapping[str, DriverSpec] = {
    "classic": DriverSpec(
        _build_classic,
        ("port",),
        ("enter_boot_delay", "reset_delay", "hold_delay", "board"),
    ),
    "usb-jtag": DriverSpec(
        _build_usb_jtag, ("port",), ("settle_delay", "hold_delay", "board")
    ),
    "custom": DriverSpec(_build_custom, ("port", "download"), ("app", "board")),
    "virtual": DriverSpec(_build_virtual, ("control", "board")),
    "none": DriverSpec(_build_none, (), ("board",)),
}


def make_reset(driver_name: str, params: Mapping[str, Any] | None = None) -> ResetDriver:
    """Build the reset driver called ``driver_name`` from plain parameters.

    ``classic`` and ``usb-jtag`` take ``port``: an open pyserial port or a callable returning
    the port currently open (the console's). ``virtual`` takes ``control`` (a ControlClient or
    its HOST:PORT) and ``board``.
    """
    driver: ResetDriver = build_driver("reset", RESET_DRIVERS, driver_name, dict(params or {}))
    return driver
