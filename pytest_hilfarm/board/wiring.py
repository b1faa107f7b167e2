"""Wire a rack board to its drivers: port, console opener, power, reset and flasher, in one place.

A board of a rack file is only a description (:class:`~pytest_hilfarm.description.rack.BoardSpec`).
This module is the one place that turns it into things that act: :class:`LocalWiring` for a board on
this host (a device path, a USB serial number or physical path, a pyserial URL, or a board of the
virtual rack) and :class:`RemoteWiring` for a board another host exports (``hilfarm export``). Both
implement :class:`BoardWiring`; the farm builds each Device from one, and the rig host drives the
boards it exports with the same local wiring, so the two can never disagree about how a rack file's
``power:`` or ``reset:`` is spelled for a driver.

:class:`VirtualRack` is the running virtual rack daemon for a rack, started on demand: boards of
the virtual rack are reached through their port URLs and its control endpoint, like a physical
rack; this module never imports the simulator.

Must not: reserve boards, keep health, read rack files, import pytest or the rig host's server.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pytest_hilfarm.description.rack import BoardSpec, RackSpec, builtin_virtual_rack_path
from pytest_hilfarm.drivers.flashing import FlashPlan, FlashReport
from pytest_hilfarm.drivers.flashing import flash as esptool_flash
from pytest_hilfarm.drivers.power import PowerDriver, make_power
from pytest_hilfarm.drivers.reset import CUSTOM_BEFORE, ResetDriver, make_reset
from pytest_hilfarm.drivers.transports import open_port, resolve_usb
from pytest_hilfarm.drivers.virtual import ControlClient, read_daemon_info, sim_dir
from pytest_hilfarm.errors import PortError, UsageError

Flasher = Callable[..., FlashReport]
PortSource = Callable[[], Any]


class BoardWiring(Protocol):
    """One rack board wired to the drivers that act on it."""

    @property
    def spec(self) -> BoardSpec: ...

    def port(self) -> str:
        """Where esptool and the console open the board, resolved now."""

    def resolver(self) -> Callable[[], str] | None:
        """A function that re-resolves the port after re-enumeration (None: it never moves)."""

    def open_console_port(self) -> Any:
        """Open the board's UART for the console (an open pyserial port)."""

    def power(self) -> PowerDriver: ...

    def reset(self, port: PortSource | None) -> ResetDriver:
        """The reset driver; ``port`` returns the port a DTR/RTS sequence runs on (the console's
        or one opened for the reset), for boards whose reset goes through the UART.
        """

    def flasher(self) -> Flasher:
        """A function with :func:`~pytest_hilfarm.drivers.flashing.flash`'s signature, for it."""

    def mac(self) -> str | None: ...


class VirtualRack:
    """The virtual rack daemon serving a rack's virtual boards, started on demand (thread-safe).

    ``start=False`` only attaches to a daemon that already runs (a PortError says how to start
    one otherwise).
    """

    def __init__(self, rack: RackSpec, *, start: bool = True,
                 boards: tuple[BoardSpec, ...] | None = None) -> None:
        self.rack = rack
        self._start = start
        self._wanted = {b.id for b in (boards if boards is not None else rack.boards)
                        if b.is_virtual}
        self._info: dict[str, Any] | None = None
        self._control: ControlClient | None = None
        self._lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        """The running daemon's description (daemon.json), started first when needed."""
        with self._lock:
            if self._info is not None:
                return self._info
            info = read_daemon_info()
            if info is None or not self._serves(info):
                if not self._start:
                    raise PortError(
                        "the virtual rack is not running",
                        where=str(self.rack.source),
                        hint="start it with `hilfarm sim up`",
                    )
                self._start_daemon()
                info = read_daemon_info()
                if info is None or not self._serves(info):
                    raise PortError(
                        "the virtual rack did not come up for this rack",
                        where=str(sim_dir()),
                        hint="run `hilfarm sim serve RACK` in a terminal to see why (same "
                        "HILFARM_SIM_DIR)",
                    )
            self._info = info
            return info

    def _serves(self, info: Mapping[str, Any]) -> bool:
        return self._wanted <= {b.get("id") for b in info.get("boards", [])}

    def _start_daemon(self) -> None:
        rack_path = self.rack.path or builtin_virtual_rack_path()
        cmd = [sys.executable, "-m", "pytest_hilfarm", "sim", "up", str(rack_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise PortError(
                f"could not start the virtual rack: {proc.stderr.strip() or proc.stdout.strip()}",
                where=" ".join(cmd),
                hint="run `hilfarm sim up RACK` by hand to see the full error",
            )

    def control(self) -> ControlClient:
        """The daemon's control client, one per rack (it keeps its connections for reuse)."""
        address = self.info()["control"]
        with self._lock:
            if self._control is None or self._control.addr != address:
                self._control = ControlClient(address)
            return self._control

    def board(self, board: BoardSpec) -> Mapping[str, Any]:
        for entry in self.info().get("boards", []):
            if entry.get("id") == board.id:
                return entry
        raise PortError(
            f"board {board.id} is not served by the running virtual rack",
            where=str(board.where),
            hint="restart it for this rack: `hilfarm sim down && hilfarm sim up RACK`",
        )


def power_params(board: BoardSpec) -> dict[str, Any]:
    """The rack file's ``power:`` spelling as the driver's parameters (not for virtual power)."""
    params: dict[str, Any] = dict(board.power.params)
    if board.power.driver == "http":
        # The rack file says on/off/status; the driver names them as URLs.
        params = {f"{k}_url": v for k, v in params.items() if k in ("on", "off", "status")}
    elif board.power.driver == "none":
        params = {"board": board.id}
    return params


@dataclass(frozen=True)
class LocalWiring:
    """A board on this host (``virtual`` is the virtual rack, for virtual ports and drivers)."""

    spec: BoardSpec
    virtual: VirtualRack | None = None

    def _virtual(self) -> VirtualRack:
        if self.virtual is None:
            raise UsageError(
                f"board {self.spec.id} is a virtual board but no virtual rack was given",
                where=str(self.spec.where),
                hint="open it through Farm.open() or the rig host, which start the virtual rack",
            )
        return self.virtual

    def port(self) -> str:
        kind, value = self.spec.port.kind, self.spec.port.value
        if kind in ("path", "url"):
            return value
        if kind == "usb_serial":
            return resolve_usb(serial=value)
        if kind == "usb_path":
            return resolve_usb(path=value)
        return str(self._virtual().board(self.spec)["port"])

    def resolver(self) -> Callable[[], str] | None:
        return self.port if self.spec.port.kind in ("usb_serial", "usb_path") else None

    def open_console_port(self) -> Any:
        return open_port(self.port())

    def power(self) -> PowerDriver:
        if self.spec.power.driver == "virtual":
            return make_power("virtual", {"control": self._virtual().control(),
                                          "board": self.spec.id})
        return make_power(self.spec.power.driver, power_params(self.spec))

    def reset(self, port: PortSource | None) -> ResetDriver:
        kind = self.spec.reset
        params: dict[str, Any] = {"board": self.spec.id}
        if kind == "virtual":
            params["control"] = self._virtual().control()
        elif kind in ("classic", "usb-jtag", "custom"):
            if port is None:
                raise UsageError(
                    f"{kind} reset of board {self.spec.id} needs the board's UART open",
                    where=str(self.spec.where),
                    hint="open the board's console first (the reset lines are DTR/RTS)",
                )
            params["port"] = port
            if kind == "custom" and self.spec.reset_sequences is not None:
                params["download"], params["app"] = self.spec.reset_sequences
        return make_reset(kind, params)

    def flasher(self) -> Flasher:
        return esptool_flash

    def mac(self) -> str | None:
        if self.spec.is_virtual:
            mac = self._virtual().board(self.spec).get("mac")
            return str(mac) if mac else None
        return None


@dataclass(frozen=True)
class RemoteWiring:
    """A board another host exports: console over its RFC 2217 URL, the rest over its API.

    Flashing uses the rig host's upload path (esptool runs next to the board), which is about as
    fast as local flashing; RFC 2217 carries only the console.
    """

    spec: BoardSpec
    client: Any  # a RigClient (pytest_hilfarm.drivers.rigclient)

    @classmethod
    def registered(cls, spec: BoardSpec, directory: Any) -> RemoteWiring:
        """The wiring of a board a rig host registered in the farm database (``directory``).

        The rig host's control URL comes from its registration; the token from
        ``HILFARM_RIG_TOKEN``. An offline host is an InfrastructureError.
        """
        from pytest_hilfarm.drivers.rigclient import client_for_board

        return cls(spec, client_for_board(directory, spec.id))

    def port(self) -> str:
        return self.spec.port.value

    def resolver(self) -> Callable[[], str] | None:
        return None

    def open_console_port(self) -> Any:
        self.client.attach(self.spec.id)  # RFC 2217 has no authentication of its own
        return open_port(self.spec.port.value)

    def power(self) -> PowerDriver:
        from pytest_hilfarm.drivers.rigclient import RemotePower

        return RemotePower(self.client, self.spec.id)

    def reset(self, port: PortSource | None) -> ResetDriver:
        from pytest_hilfarm.drivers.rigclient import RemoteReset

        return RemoteReset(self.client, self.spec.id)

    def flasher(self) -> Flasher:
        from pytest_hilfarm.drivers.rigclient import remote_flasher

        return remote_flasher(self.client, self.spec.id)

    def mac(self) -> str | None:
        return None


def flash_and_boot(port: str, chip: str, plan: FlashPlan, *, reset: ResetDriver,
                   flasher: Flasher = esptool_flash, boot: bool = True,
                   **options: Any) -> FlashReport:
    """Flash through ``flasher`` entering download mode the way ``reset`` allows, then boot.

    esptool resets boards whose UART carries the reset lines itself (``reset.esptool_before`` is
    ``default-reset`` or ``usb-reset``); others (virtual boards over socket://, boards without
    reset lines) are put into download mode by the reset driver before each attempt and booted by
    it afterwards. ``options`` go to the flasher (baud, progress, skip_identical, board...).
    """
    before = reset.esptool_before
    out_of_band = before == "no-reset"
    # A custom download sequence runs on the flasher's own port (drivers/flashing/session.py);
    # booting afterwards is the reset driver's app sequence, not esptool's hard reset.
    own_app_reset = out_of_band or before.startswith(CUSTOM_BEFORE)

    def enter_download() -> None:
        try:
            reset.reset_to_download()
        except UsageError:
            pass  # reset: none: the board must already wait in download mode

    report = flasher(
        port, chip, plan, before=before,
        after="no-reset" if own_app_reset or not boot else "hard-reset",
        enter_download=enter_download if out_of_band else None, **options,
    )
    if boot and own_app_reset:
        reset.reset_to_app()
    return report
