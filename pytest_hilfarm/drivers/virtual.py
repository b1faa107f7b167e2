"""Core-side client of the virtual rack's control endpoint (JSON lines over TCP).

Speaks exactly the protocol in docs/CONTRACTS.md: one JSON request line, one JSON response line,
``"ok": true`` or ``"ok": false, "error": "..."``. It finds a running daemon through
``daemon.json`` in the virtual rack state directory. It must not import ``pytest_hilfarm.sim``:
the core reaches virtual boards only through this endpoint and their port URLs, exactly as it
reaches physical ones through power/reset hardware and serial ports.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import weakref
from pathlib import Path
from typing import Any, Literal

# Where the virtual rack keeps its state: one rule, kept with the virtual rack's description.
from pytest_hilfarm.description.virtual import state_dir as sim_dir
from pytest_hilfarm.errors import InfrastructureError, PortError, UsageError

START_HINT = (
    "start it with `hilfarm sim up` (or check that HILFARM_SIM_DIR points at its state directory)"
)

BootMode = Literal["flash", "download"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # The process exists but belongs to someone else: still a live daemon.
        return True
    return True


def read_daemon_info(directory: Path | str | None = None) -> dict[str, Any] | None:
    """Return the running daemon's ``daemon.json`` as a dict, or None when no daemon runs.

    A file whose ``pid`` is no longer alive is stale (the daemon was killed before it could
    remove it) and also gives None. A file that is not valid JSON raises InfrastructureError
    naming it, because guessing would hide a half-written or corrupted state directory.
    """
    path = Path(directory if directory is not None else sim_dir()) / "daemon.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InfrastructureError(
            f"cannot read the virtual rack daemon file: {exc}",
            where=str(path),
            hint="check the directory's permissions, or " + START_HINT,
        ) from exc
    try:
        info = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InfrastructureError(
            f"the virtual rack daemon file is not valid JSON ({exc})",
            where=str(path),
            hint="stop the daemon (`hilfarm sim down`), delete the file and start it again",
        ) from exc
    if not isinstance(info, dict):
        raise InfrastructureError(
            "the virtual rack daemon file does not hold a JSON object",
            where=str(path),
            hint="delete the file and " + START_HINT,
        )
    pid = info.get("pid")
    if isinstance(pid, int) and pid > 0 and not _pid_alive(pid):
        return None
    return info


def _parse_addr(addr: str | tuple[str, int]) -> tuple[str, int]:
    if isinstance(addr, tuple):
        return addr
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(
            f"bad control endpoint address {addr!r}",
            where="virtual rack control",
            hint="give it as HOST:PORT, e.g. 127.0.0.1:40123 (the 'control' field of daemon.json)",
        )
    return host or "127.0.0.1", int(port)


class ControlClient:
    """Client of one virtual rack daemon's control endpoint (thread-safe).

    A request borrows an idle connection (the daemon serves any number of lines per
    connection) or opens one; a test's reset then costs one round trip, not a connect and a
    new thread in the daemon as well. A kept connection that the daemon has closed since (a
    restart, a shutdown) fails before any answer; the request is then sent once more, on a new
    connection, to whatever daemon serves the endpoint now. :meth:`close` closes the idle
    connections; they are also closed when the client is garbage-collected or the process
    exits.
    """

    _KEEP = 4  # idle connections kept: one per thread that resets or powers boards at once

    def __init__(self, addr: str | tuple[str, int], *, timeout: float = 10.0) -> None:
        self.host, self.port = _parse_addr(addr)
        self.timeout = timeout
        self._idle: list[socket.socket] = []
        self._pool_lock = threading.Lock()
        self._pid = os.getpid()
        weakref.finalize(self, _close_all, self._idle)  # at garbage collection or exit

    def close(self) -> None:
        """Close the idle connections (a later request opens a new one)."""
        with self._pool_lock:
            _close_all(self._idle)

    def _borrow(self) -> tuple[socket.socket, bool]:
        """An idle connection (True: it may have gone stale) or a new one (False)."""
        with self._pool_lock:
            if self._pid != os.getpid():
                # A forked child must not talk on its parent's connections: forget them here
                # (closing would not end them for the parent, but the objects would warn).
                for sock in self._idle:
                    sock.detach()
                self._idle.clear()
                self._pid = os.getpid()
            if self._idle:
                return self._idle.pop(), True
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        return sock, False

    def _give_back(self, sock: socket.socket) -> None:
        with self._pool_lock:
            if self._pid == os.getpid() and len(self._idle) < self._KEEP:
                self._idle.append(sock)
                return
        sock.close()

    def _exchange(self, line: bytes) -> str:
        """Send one line and read one answer line ("" when the daemon closed without one)."""
        while True:
            sock, kept = self._borrow()
            try:
                sock.settimeout(self.timeout)
                sock.sendall(line)
                reply = _read_line(sock)
            except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
                sock.close()
                if kept:
                    continue  # closed by the daemon while idle: nothing ran; a new connection
                raise
            except BaseException:
                sock.close()  # a timeout or an interruption: the answer may still come
                raise
            if not reply:
                sock.close()
                if kept:
                    continue
                return reply
            self._give_back(sock)
            return reply

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def from_sim_dir(cls, directory: Path | str | None = None) -> ControlClient:
        """Connect to the daemon described by ``daemon.json`` (PortError when none runs)."""
        where = str(Path(directory if directory is not None else sim_dir()))
        info = read_daemon_info(directory)
        if info is None or not isinstance(info.get("control"), str):
            raise PortError(
                "no virtual rack daemon is running",
                where=where,
                hint=START_HINT,
            )
        return cls(info["control"])

    def __repr__(self) -> str:
        return f"ControlClient({self.addr!r})"

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return the response dict (raises unless ``ok`` is true)."""
        line = json.dumps({"op": op, **fields}) + "\n"
        where = f"virtual rack control {self.addr}"
        try:
            reply = self._exchange(line.encode())
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            raise PortError(
                f"nothing listens on the control endpoint ({exc.strerror or exc})",
                where=where,
                hint=START_HINT,
            ) from exc
        except TimeoutError as exc:
            raise InfrastructureError(
                f"request {op!r} got no answer within {self.timeout:g} s",
                where=where,
                hint="the daemon may be stuck: check its log, or restart it "
                "(`hilfarm sim down && hilfarm sim up`)",
            ) from exc
        except OSError as exc:
            raise PortError(
                f"request {op!r} failed: {exc}",
                where=where,
                hint=START_HINT,
            ) from exc
        if not reply:
            raise InfrastructureError(
                f"the daemon closed the connection without answering {op!r}",
                where=where,
                hint="it may be shutting down; check `hilfarm sim status` and " + START_HINT,
            )
        try:
            response = json.loads(reply)
        except json.JSONDecodeError as exc:
            raise InfrastructureError(
                f"the daemon answered {op!r} with a line that is not JSON: {reply[:200]!r}",
                where=where,
                hint="the daemon and this client disagree on docs/CONTRACTS.md; update both",
            ) from exc
        if not isinstance(response, dict):
            raise InfrastructureError(
                f"the daemon answered {op!r} with {type(response).__name__}, not an object",
                where=where,
                hint="the daemon and this client disagree on docs/CONTRACTS.md; update both",
            )
        if response.get("ok") is not True:
            error = response.get("error", "no reason given")
            board = fields.get("board")
            raise InfrastructureError(
                f"request {op!r} refused: {error}",
                where=f"{where}, board {board}" if board else where,
                hint="check the board id against `hilfarm sim status`"
                if board
                else "check the request against docs/CONTRACTS.md",
            )
        return response

    def status(self) -> list[dict[str, Any]]:
        """Return every board's state (id, chip, mac, port, rfc2217, powered, mode, ...)."""
        boards = self.request("status").get("boards", [])
        return list(boards) if isinstance(boards, list) else []

    def board(self, board: str) -> dict[str, Any]:
        """Return one board's state from ``status`` (UsageError when the id is unknown)."""
        boards = self.status()
        for entry in boards:
            if entry.get("id") == board:
                return dict(entry)
        known = ", ".join(str(b.get("id")) for b in boards) or "none"
        raise UsageError(
            f"the virtual rack has no board {board!r} (it has: {known})",
            where=f"virtual rack control {self.addr}",
            hint="fix the board id in the rack file, or start a rack that has it",
        )

    def power(self, board: str, on: bool) -> None:
        """Switch a board's power (off: port stays open but silent, flash kept)."""
        self.request("power", board=board, on=bool(on))

    def reset(self, board: str, boot: BootMode = "flash") -> None:
        """Pulse EN with IO0 high (``"flash"``: SPI boot) or low (``"download"``)."""
        if boot not in ("flash", "download"):
            raise UsageError(
                f"unknown boot mode {boot!r}",
                where=f"reset of virtual board {board}",
                hint="use 'flash' (run the app) or 'download' (ROM serial loader)",
            )
        self.request("reset", board=board, boot=boot)

    def lines(self, board: str, *, en: bool | None = None, io0: bool | None = None) -> None:
        """Set the EN and/or IO0 levels (True = high); a rising EN samples IO0."""
        fields: dict[str, Any] = {}
        if en is not None:
            fields["en"] = bool(en)
        if io0 is not None:
            fields["io0"] = bool(io0)
        self.request("lines", board=board, **fields)

    def unplug(self, board: str) -> None:
        """Make the board's port vanish (clients dropped, new connects refused)."""
        self.request("unplug", board=board)

    def plug(self, board: str) -> None:
        """Bring an unplugged board's port back."""
        self.request("plug", board=board)

    def mesh(self, **conditions: Any) -> dict[str, Any]:
        """Set radio-medium conditions (loss, latency_ms, partitions); return the current ones."""
        response = self.request("mesh", **conditions)
        return {k: v for k, v in response.items() if k != "ok"}

    def wire_time(self, enabled: bool) -> None:
        """Make bytes take their real UART time at the current baud (or stop doing so)."""
        self.request("wire_time", enabled=bool(enabled))

    def shutdown(self) -> None:
        """Ask the daemon to exit cleanly."""
        self.request("shutdown")


def _close_all(sockets: list[socket.socket]) -> None:
    while sockets:
        sockets.pop().close()


def _read_line(sock: socket.socket, limit: int = 16 * 1024 * 1024) -> str:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        newline = chunk.find(b"\n")
        if newline >= 0:
            chunks.append(chunk[:newline])
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            break
    return b"".join(chunks).decode("utf-8", errors="replace").strip()


def control_client(control: Any) -> Any:
    """A :class:`ControlClient` for a control endpoint address, or the client itself if given."""
    return ControlClient(control) if isinstance(control, str) else control
