"""The virtual rack's ports: one board's TCP clients (raw ``socket://`` and RFC 2217) and timers.

A :class:`Slot` is a board with its two listening sockets and its one client: a board has one
UART, so one client at a time across both ports. :class:`PortClient` pumps bytes between a
connection and the board (through pyserial's ``PortManager`` for RFC 2217, whose DTR/RTS reach
the board through :class:`UartLines`); :class:`Scheduler` runs the rack's timed events on one
thread. Nothing here decides who may connect: the daemon admits clients.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from serial import rfc2217

from pytest_hilfarm.description.virtual import VirtualBoardSpec as BoardSpec
from pytest_hilfarm.sim.board import SINK_TIMEOUT, VirtualBoard


class Scheduler:
    """One timer thread for the radio medium (boards have their own threads for their timers)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="rack-clock", daemon=True)
        self._thread.start()

    def schedule(self, delay: float, func: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + max(0.0, delay), next(self._seq), func))
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    if self._heap and self._heap[0][0] <= time.monotonic():
                        break
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(wait)
                if self._stopped:
                    return
                _, _, func = heapq.heappop(self._heap)
            with contextlib.suppress(Exception):  # a medium bug must not stop the clock
                func()


class PortClient:
    """The one client connected to a board's UART, over socket:// or rfc2217://."""

    def __init__(self, sock: socket.socket, board: VirtualBoard, kind: str,
                 on_attached: Callable[[], None] | None = None) -> None:
        self.sock = sock
        self.board = board
        self.kind = kind
        self.on_attached = on_attached
        self._lock = threading.Lock()  # PortManager's own writes and board output share it
        self._pm: rfc2217.PortManager | None = None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The timeout bounds sendall() to a client that stopped reading (see board.SINK_TIMEOUT);
        # recv() just loops on it.
        sock.settimeout(SINK_TIMEOUT)

    def announce_attached(self) -> None:
        """Tell the daemon this connection's admission is decided (once; later calls no-op)."""
        callback, self.on_attached = self.on_attached, None
        if callback is not None:
            callback()

    def write_raw(self, data: bytes) -> None:
        with self._lock:
            self.sock.sendall(data)

    def write(self, data: bytes) -> None:
        """OutputSink: the board's TX bytes (telnet-escaped on rfc2217)."""
        if self._pm is not None:
            data = data.replace(b"\xff", b"\xff\xff")
        try:
            self.write_raw(data)
        except OSError:
            # Gone, or stopped reading for SINK_TIMEOUT: drop it so the port becomes free.
            self.close()
            raise

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()

    def serve(self) -> None:
        if self.kind == "rfc2217":
            self._pm = rfc2217.PortManager(UartLines(self.board), RawWriter(self))
        self.board.attach(self)
        self.announce_attached()
        while True:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            pm = self._pm
            if pm is not None:
                # Fast path: most chunks carry no telnet command, and PortManager.filter() is a
                # per-byte generator.
                if pm.mode == rfc2217.M_NORMAL and pm.suboption is None and b"\xff" not in data:
                    self.board.feed(data)
                else:
                    self.board.feed(b"".join(pm.filter(data)))
            else:
                self.board.feed(data)


class RawWriter:
    """The ``connection`` PortManager writes telnet replies to (unescaped, shared lock)."""

    def __init__(self, client: PortClient) -> None:
        self._client = client

    def write(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            self._client.write_raw(data)


class UartLines:
    """The serial-port object PortManager configures: forwards DTR/RTS to the board.

    Baud/format settings are acknowledged and remembered but do not change the board's UART: the
    chip sets its own baud (CHANGE_BAUDRATE); a real mismatch would only garble bytes.
    """

    def __init__(self, board: VirtualBoard) -> None:
        self._board = board
        self._dtr = False
        self._rts = False
        self.baudrate = 115200
        self.bytesize = 8
        self.parity = "N"
        self.stopbits = 1
        self.rtscts = False
        self.xonxoff = False
        self.break_condition = False
        # A DevKit's USB-UART leaves the modem-status inputs unconnected.
        self.cts = False
        self.dsr = False
        self.ri = False
        self.cd = False

    @property
    def dtr(self) -> bool:
        return self._dtr

    @dtr.setter
    def dtr(self, value: bool) -> None:
        self._dtr = bool(value)
        self._board.set_client_lines(dtr=self._dtr)

    @property
    def rts(self) -> bool:
        return self._rts

    @rts.setter
    def rts(self, value: bool) -> None:
        self._rts = bool(value)
        self._board.set_client_lines(rts=self._rts)

    def reset_input_buffer(self) -> None:
        """Purge request: the virtual UART has no buffer to purge."""

    def reset_output_buffer(self) -> None:
        """Purge request: the virtual UART has no buffer to purge."""


@dataclass
class Slot:
    """A board with its listeners and its (single) client; mutated under Daemon._lock."""

    spec: BoardSpec
    board: VirtualBoard
    serial_sock: socket.socket
    rfc_sock: socket.socket
    client: PortClient | None = None
    plugged: bool = True
    # Connections accepted (or waiting in the listen queue) whose admission is not decided yet:
    # reset and power wait for them, as a real port is open once open() returns (see
    # Daemon._settle_ports).
    admitting: int = 0
