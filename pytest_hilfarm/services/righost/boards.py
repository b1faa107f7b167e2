"""The boards a rig host exports, each wired through the board wiring, one user at a time.

:class:`LocalBoard` drives one exported board through :mod:`pytest_hilfarm.board.wiring` (the
same wiring the farm uses, so the two never disagree about a rack board's drivers) and lets one
client (an RFC 2217 session or a flash request) use its UART at a time.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from pytest_hilfarm.board.wiring import LocalWiring, VirtualRack, flash_and_boot
from pytest_hilfarm.description.rack import BoardSpec, RackSpec
from pytest_hilfarm.drivers.flashing import FlashPlan, FlashReport
from pytest_hilfarm.drivers.transports import open_port
from pytest_hilfarm.drivers.virtual import ControlClient
from pytest_hilfarm.errors import (
    InfrastructureError,
    UsageError,
)


class Lines(Protocol):
    """Where DTR/RTS changes of an RFC 2217 client end up for one board."""

    def apply(self, dtr: bool, rts: bool) -> None: ...
    def release(self) -> None: ...


@dataclass(frozen=True)
class VirtualLines:
    """DTR/RTS of a virtual board -> EN/IO0 via the control endpoint (the DevKit circuit)."""

    control: ControlClient
    board: str

    def apply(self, dtr: bool, rts: bool) -> None:
        en = not (rts and not dtr)
        io0 = not (dtr and not rts)
        self.control.lines(self.board, en=en, io0=io0)

    def release(self) -> None:
        self.control.lines(self.board, en=True, io0=True)


@dataclass
class LocalBoard:
    """One exported board: its rack record, how to reach it here, and who uses it now."""

    spec: BoardSpec
    port_url: str  # local: /dev/..., socket://127.0.0.1:N (virtual)
    control: ControlClient | None  # virtual boards only
    wiring: LocalWiring
    busy: threading.Lock = field(default_factory=threading.Lock)
    user: str = ""  # who has the UART now, for 409 messages
    served_url: str = ""  # rfc2217://public-host:port
    # Source address -> monotonic deadline by which it may open the RFC 2217 port.
    attached: dict[str, float] = field(default_factory=dict)
    attach_lock: threading.Lock = field(default_factory=threading.Lock)

    def allow(self, address: str, seconds: float) -> None:
        with self.attach_lock:
            self.attached[address] = time.monotonic() + seconds

    def allowed(self, address: str) -> bool:
        with self.attach_lock:
            now = time.monotonic()
            for addr in [a for a, until in self.attached.items() if until < now]:
                del self.attached[addr]
            return address in self.attached

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def chip(self) -> str:
        return self.spec.chip

    @property
    def features(self) -> frozenset[str]:
        return self.spec.features

    def lines(self) -> Lines | None:
        return VirtualLines(self.control, self.id) if self.control is not None else None

    @contextlib.contextmanager
    def use(self, who: str) -> Iterator[None]:
        if not self.busy.acquire(blocking=False):
            raise BoardBusy(
                f"board {self.id} is in use by {self.user or 'another client'}",
                where=f"rig host board {self.id}",
                hint="one client per UART: close the console or RFC 2217 session first",
            )
        self.user = who
        try:
            yield
        finally:
            self.user = ""
            self.busy.release()

    def power(self, on: bool) -> None:
        driver = self.wiring.power()
        if on:
            driver.on()
        else:
            driver.off()

    def cycle(self, off_seconds: float) -> None:
        self.wiring.power().cycle(off_seconds)

    def reset(self, boot: str) -> None:
        if self.spec.reset == "none":
            raise UsageError(
                f"board {self.id} has no reset control here (reset: {self.spec.reset})",
                where=str(self.spec.where),
                hint="wire EN/IO0 to the USB-UART (reset: classic) or power-cycle instead",
            )
        # DTR/RTS resets need the UART (refused while an RFC 2217 client has it); a virtual
        # board's reset lines are the rack's control endpoint, usable at any time.
        needs_uart = self.spec.reset in ("classic", "usb-jtag")
        with (self.use("reset request") if needs_uart else contextlib.nullcontext()), \
                self._uart() as port:
            driver = self.wiring.reset(port)
            if boot == "download":
                driver.reset_to_download()
            else:
                driver.reset_to_app()

    @contextlib.contextmanager
    def _uart(self) -> Iterator[Callable[[], Any]]:
        """The board's UART, opened on first use and closed afterwards (DTR/RTS resets)."""
        opened: list[Any] = []

        def port() -> Any:
            if not opened:
                opened.append(open_port(self.port_url))
            return opened[0]

        try:
            yield port
        finally:
            for p in opened:
                p.close()

    def flash(self, plan: FlashPlan, *, baud: int | None, skip_identical: bool,
              boot: bool) -> FlashReport:
        """Run esptool on the local port (the fast path), then boot the new image if asked."""
        with self.use("a flash request"), self._uart() as port:
            return flash_and_boot(
                self.port_url, self.chip, plan, reset=self.wiring.reset(port), boot=boot,
                baud=baud or self.spec.flash.baud, skip_identical=skip_identical, board=self.id,
            )


class BoardBusy(InfrastructureError):
    """The board's UART is in use by another client of this rig host."""


class LeaseNotHeld(InfrastructureError):
    """A request named a lease that does not hold the board now."""


def local_boards(rack: RackSpec) -> list[LocalBoard]:
    """Every board of the rack with its local port and, for virtual boards, the control client."""
    virtual = VirtualRack(rack)
    boards: list[LocalBoard] = []
    for spec in rack.boards:
        wiring = LocalWiring(spec, virtual)
        control = virtual.control() if spec.port.kind == "virtual" else None
        boards.append(LocalBoard(spec, wiring.port(), control, wiring))
    return boards


# -- RFC 2217 ---------------------------------------------------------------------------------
