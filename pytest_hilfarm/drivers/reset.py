"""Reset drivers: restart a board into its app or into the ROM download mode, by name.

Each backend implements :class:`ResetDriver` and opens with the rack-file snippet that selects
it; ``make_reset(name, params)`` builds one from ``RESET_DRIVERS``. The DTR/RTS sequences are
the ones esptool 5.6 / esp-pylib use (notes/esp-rom-protocol.md section 6), written out here so
they run on the port the console already holds. This module must not open or close ports, read
rack files or flash anything.

``esptool_before`` tells the flasher whether esptool can enter download mode itself over the
port (``"default-reset"``, ``"usb-reset"``) or whether the caller must call
``reset_to_download()`` first and connect with ``"no-reset"`` (virtual boards over socket://,
boards without reset lines).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

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

# pyserial True = line asserted = electrically LOW (esp_pylib.serial_reset.PIN_LOW).
_LOW = True
_HIGH = False


def _set_dtr(port: ControlLines, level: bool) -> None:
    port.setDTR(level)


def _set_rts(port: ControlLines, level: bool) -> None:
    port.setRTS(level)
    # Re-write DTR after every RTS change: Windows usbser.sys only sends SET_CONTROL_LINE_STATE
    # when both are written; harmless elsewhere (esp_pylib.serial_reset.set_rts does the same).
    port.setDTR(port.dtr)


@dataclass(frozen=True)
class ClassicReset:
    """DTR/RTS auto-reset circuit of a DevKit's USB-UART bridge (the two-transistor circuit).

    Rack file::

        reset: classic

    ``port`` is a callable returning the open port (the console's, so no second opener is
    needed). Download entry is esptool's ClassicReset; app reset is esptool's HardReset (EN
    pulse with IO0 left high).
    """

    port: PortSource
    enter_boot_delay: float = 0.1
    reset_delay: float = 0.05
    hold_delay: float = 0.1
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)
    esptool_before: str = "default-reset"

    def reset_to_download(self) -> None:
        port = self.port()
        _set_dtr(port, _HIGH)  # IO0 high
        _set_rts(port, _LOW)  # EN low: chip in reset
        self.sleep(self.enter_boot_delay)
        _set_dtr(port, _LOW)  # IO0 low
        _set_rts(port, _HIGH)  # EN high: chip leaves reset and samples IO0 = low
        self.sleep(self.reset_delay)
        _set_dtr(port, _HIGH)  # IO0 released

    def reset_to_app(self) -> None:
        port = self.port()
        # pyserial opens ports with DTR and RTS asserted; with DTR asserted the circuit would
        # hold EN high whatever RTS does, so release DTR (IO0 high) before pulling EN low.
        _set_dtr(port, _HIGH)
        _set_rts(port, _LOW)  # EN low
        self.sleep(self.hold_delay)
        _set_rts(port, _HIGH)  # EN high: SPI boot


@dataclass(frozen=True)
class UsbJtagReset:
    """The USB-Serial-JTAG peripheral of ESP32-C3/S3/C6 (no external bridge, no transistors).

    Rack file::

        reset: usb-jtag

    The peripheral decodes DTR/RTS itself; the sequence walks through (1,1) rather than (0,0)
    (esptool's USBJTAGSerialReset). The port disappears while the chip resets, so callers wait
    for it to come back.
    """

    port: PortSource
    settle_delay: float = 0.1
    hold_delay: float = 0.2
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)
    esptool_before: str = "usb-reset"

    def reset_to_download(self) -> None:
        port = self.port()
        _set_rts(port, _HIGH)
        _set_dtr(port, _HIGH)  # idle
        self.sleep(self.settle_delay)
        _set_dtr(port, _LOW)  # IO0 low
        _set_rts(port, _HIGH)
        self.sleep(self.settle_delay)
        _set_rts(port, _LOW)  # reset
        _set_dtr(port, _HIGH)
        _set_rts(port, _LOW)
        self.sleep(self.settle_delay)
        _set_dtr(port, _HIGH)
        _set_rts(port, _HIGH)  # out of reset

    def reset_to_app(self) -> None:
        # esptool's HardReset with uses_usb: the peripheral needs a longer hold, then settles.
        port = self.port()
        _set_rts(port, _LOW)
        self.sleep(self.hold_delay)
        _set_rts(port, _HIGH)
        self.sleep(self.hold_delay)


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
    listener_wait: float = 0.5

    def reset_to_app(self) -> None:
        self._wait_for_listener()
        self.control.reset(self.board, "flash")

    def _wait_for_listener(self) -> None:
        """Give a console that just reconnected time to be attached before the boot log starts.

        The daemon admits a new port connection on its own thread; a reset sent through the
        control endpoint right after the console's connect() could otherwise boot the app while
        no client is attached, and the boot log would be lost. Costs one status request.
        """
        board_state = getattr(self.control, "board", None)
        if board_state is None:
            return
        deadline = time.monotonic() + self.listener_wait
        while time.monotonic() < deadline:
            try:
                if board_state(self.board).get("client", True):
                    return
            except Exception:  # status is best effort here; the reset itself reports errors
                return
            time.sleep(0.01)

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
    extra: dict[str, Any] = {n: float(params[n]) for n in names if n in params}
    if "sleep" in params:
        extra["sleep"] = params["sleep"]
    return extra


def _build_classic(params: Mapping[str, Any]) -> ResetDriver:
    return ClassicReset(
        _port_source(params), **_delays(params, ("enter_boot_delay", "reset_delay", "hold_delay"))
    )


def _build_usb_jtag(params: Mapping[str, Any]) -> ResetDriver:
    return UsbJtagReset(_port_source(params), **_delays(params, ("settle_delay", "hold_delay")))


def _build_virtual(params: Mapping[str, Any]) -> ResetDriver:
    from pytest_hilfarm.drivers.virtual import control_client

    return VirtualReset(control=control_client(params["control"]), board=str(params["board"]))


def _build_none(params: Mapping[str, Any]) -> ResetDriver:
    return NoReset(board=str(params.get("board", "board")))


RESET_DRIVERS: Mapping[str, DriverSpec] = {
    "classic": DriverSpec(
        _build_classic,
        ("port",),
        ("enter_boot_delay", "reset_delay", "hold_delay", "sleep", "board"),
    ),
    "usb-jtag": DriverSpec(
        _build_usb_jtag, ("port",), ("settle_delay", "hold_delay", "sleep", "board")
    ),
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
