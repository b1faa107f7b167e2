"""The RFC 2217 exporter: one board's serial port on the network, DTR/RTS included.

pyserial's ``PortManager`` around the local port; on a virtual board DTR/RTS are mapped to
EN/IO0 through the virtual rack's control endpoint with the DevKit auto-reset circuit. Only an
address that attached through the authenticated API (or any, with ``--open-serial``) gets in.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from typing import Any

from pytest_hilfarm.drivers.transports import open_port
from pytest_hilfarm.errors import (
    HilfarmError,
)
from pytest_hilfarm.services.righost.boards import (
    BoardBusy,
    Lines,
    LocalBoard,
)
from pytest_hilfarm.services.righost.config import (
    API_PREFIX,
)

log = logging.getLogger("pytest_hilfarm.righost")

class _LinesProxy:
    """The serial object PortManager drives: the local port, with DTR/RTS sent to ``lines``.

    PortManager sets ``dtr``/``rts``/``baudrate``/... as attributes; everything but the two
    lines goes to the real port (a virtual board's socket:// port ignores them harmlessly).
    """

    def __init__(self, port: Any, lines: Lines) -> None:
        object.__setattr__(self, "_port", port)
        object.__setattr__(self, "_lines", lines)
        object.__setattr__(self, "_state", {"dtr": True, "rts": True})

    def __getattr__(self, name: str) -> Any:
        if name in ("dtr", "rts"):
            return self._state[name]
        return getattr(self._port, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("dtr", "rts"):
            self._state[name] = bool(value)
            self._lines.apply(self._state["dtr"], self._state["rts"])
            return
        setattr(self._port, name, value)


class _Connection:
    """The socket side of a PortManager: one write lock for data and protocol answers."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self.lock:
            self.sock.sendall(data)


class SerialExporter:
    """One board's RFC 2217 listener; one client at a time (others get EOF at once)."""

    def __init__(self, board: LocalBoard, host: str, port: int, *, open_serial: bool) -> None:
        self.board = board
        self.open_serial = open_serial
        self.listener = socket.create_server((host, port), reuse_port=False)
        self.listener.settimeout(0.5)
        self.port = int(self.listener.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name=f"rfc2217-{board.id}")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.listener.close()
        self._thread.join(2)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, addr = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock, addr), daemon=True,
                             name=f"rfc2217-{self.board.id}-client").start()

    def _serve(self, sock: socket.socket, addr: Any) -> None:
        from serial import rfc2217

        who = f"RFC 2217 client {addr[0]}:{addr[1]}"
        if not self.open_serial and not self.board.allowed(addr[0]):
            # Not attached through the authenticated API: EOF, like a busy port.
            log.warning("%s refused on board %s: not attached (POST %s/boards/%s/attach)",
                        who, self.board.id, API_PREFIX, self.board.id)
            with contextlib.suppress(OSError):
                sock.close()
            return
        try:
            with self.board.use(who):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                port = open_port(self.board.port_url, 115200, timeout=0.02)
                lines = self.board.lines()
                serial_obj: Any = _LinesProxy(port, lines) if lines is not None else port
                conn = _Connection(sock)
                manager = rfc2217.PortManager(serial_obj, conn)
                done = threading.Event()
                reader = threading.Thread(target=self._uart_to_net,
                                          args=(port, manager, conn, done), daemon=True)
                reader.start()
                try:
                    while not done.is_set() and not self._stop.is_set():
                        data = sock.recv(4096)
                        if not data:
                            break
                        if manager.mode == rfc2217.M_NORMAL and manager.suboption is None \
                                and b"\xff" not in data:
                            # No telnet command in this chunk: skip the per-byte filter (the
                            # virtual rack's fast path; 0.2 s CPU per MB, bench_rfc2217.py).
                            port.write(data)
                        else:
                            port.write(b"".join(manager.filter(data)))
                finally:
                    done.set()
                    reader.join(2)
                    with contextlib.suppress(Exception):
                        port.close()
                    if lines is not None:
                        # DTR/RTS released with the client: no reset edge, board keeps running.
                        with contextlib.suppress(HilfarmError):
                            lines.release()
        except BoardBusy:
            pass  # one UART, one client: the newcomer sees EOF, as on the virtual rack
        except (OSError, HilfarmError) as exc:
            log.info("%s on board %s ended: %s", who, self.board.id, exc)
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    @staticmethod
    def _uart_to_net(port: Any, manager: Any, conn: _Connection, done: threading.Event) -> None:
        try:
            while not done.is_set():
                data = port.read(port.in_waiting or 1)
                if data:
                    conn.write(data.replace(b"\xff", b"\xff\xff"))  # PortManager.escape
        except Exception:  # noqa: BLE001 - the port or socket went away: end the session
            pass
        finally:
            done.set()


# -- the control API ----------------------------------------------------------------------------
