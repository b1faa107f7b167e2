"""Start, find and stop the background virtual rack daemon of a state dir.

:func:`up` starts ``python -m pytest_hilfarm.sim.daemon`` as a detached process (its own session,
output in ``daemon.log``) or reuses the one already serving the same rack; concurrent ``up`` calls
are serialised by an fcntl lock on ``manager.lock`` in the state dir. A ``daemon.json`` whose
process is gone (or does not answer) is stale and replaced. :func:`control` sends one request to
the control endpoint. This module never imports the farm core, and it never kills a process it
cannot identify as the daemon of its state dir.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_hilfarm.errors import InfrastructureError, UsageError
from pytest_hilfarm.sim.daemon import DAEMON_JSON, load_rack, resolve_state_dir

MANAGER_LOCK = "manager.lock"
DAEMON_LOG = "daemon.log"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


@dataclass(frozen=True)
class BoardEndpoint:
    """How to reach one virtual board."""

    id: str
    chip: str
    mac: str
    port: str  # socket://127.0.0.1:N
    rfc2217: str  # rfc2217://127.0.0.1:M


@dataclass(frozen=True)
class DaemonInfo:
    """A running daemon, as its ``daemon.json`` describes it."""

    pid: int
    control: str  # "127.0.0.1:N"
    rack: str
    rack_digest: str
    state_dir: str
    boards: tuple[BoardEndpoint, ...]

    def board(self, board_id: str) -> BoardEndpoint:
        for board in self.boards:
            if board.id == board_id:
                return board
        raise UsageError(
            f"no board {board_id!r} in the virtual rack",
            where=self.rack,
            hint=f"known boards: {', '.join(b.id for b in self.boards)}",
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DaemonInfo:
        return cls(
            pid=int(data["pid"]),
            control=str(data["control"]),
            rack=str(data.get("rack", "")),
            rack_digest=str(data.get("rack_digest", "")),
            state_dir=str(data.get("state_dir", "")),
            boards=tuple(
                BoardEndpoint(
                    id=b["id"], chip=b["chip"], mac=b["mac"], port=b["port"], rfc2217=b["rfc2217"]
                )
                for b in data.get("boards", [])
            ),
        )


def control(
    request: dict[str, Any], *, state_dir: Path | str | None = None, address: str | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Send one request to the control endpoint and return its response (``ok`` may be false)."""
    if address is None:
        info = read_info(state_dir)
        if info is None:
            raise InfrastructureError(
                "the virtual rack daemon is not running",
                where=str(resolve_state_dir(state_dir)),
                hint="start it with `hilfarm sim up`",
            )
        address = info.control
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            sock.sendall(json.dumps(request).encode() + b"\n")
            with sock.makefile("rb") as stream:
                line = stream.readline()
    except OSError as exc:
        raise InfrastructureError(
            f"control endpoint did not answer: {exc}",
            where=address,
            hint="check `hilfarm sim status`; restart with `hilfarm sim down && hilfarm sim up`",
        ) from exc
    if not line:
        raise InfrastructureError(
            "control endpoint closed the connection without an answer", where=address
        )
    response: dict[str, Any] = json.loads(line)
    return response


def read_info(state_dir: Path | str | None = None) -> DaemonInfo | None:
    """The running daemon of the state dir, or None (no daemon.json, or its process is dead)."""
    path = resolve_state_dir(state_dir) / DAEMON_JSON
    try:
        info = DaemonInfo.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if _alive(info.pid) else None


def status(state_dir: Path | str | None = None) -> dict[str, Any] | None:
    """The daemon's ``status`` answer plus its pid and state dir, or None if none is running."""
    info = read_info(state_dir)
    if info is None:
        return None
    try:
        answer = control({"op": "status"}, address=info.control, timeout=10.0)
    except InfrastructureError:
        return None
    answer.update(pid=info.pid, state_dir=info.state_dir, rack_digest=info.rack_digest)
    return answer


def up(
    rack: Path | str | None = None,
    state_dir: Path | str | None = None,
    *,
    base_port: int = 0,
    wire_time: bool = False,
    timeout: float = START_TIMEOUT,
) -> DaemonInfo:
    """Start the daemon for ``rack`` (None: built-in rack) or reuse the one serving it."""
    directory = resolve_state_dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    wanted = load_rack(rack)
    with _manager_lock(directory, timeout):
        info = _healthy_info(directory)
        if info is not None:
            if info.rack_digest == wanted.digest:
                return info
            raise UsageError(
                f"the virtual rack daemon (pid {info.pid}) serves another rack: {info.rack}",
                where=str(directory),
                hint="stop it with `hilfarm sim down` first, or use another HILFARM_SIM_DIR",
            )
        with contextlib.suppress(FileNotFoundError):
            (directory / DAEMON_JSON).unlink()  # stale: its process is gone or mute
        return _spawn(wanted.source if rack is not None else None, directory, base_port,
                      wire_time, timeout)


def ensure_running(
    rack: Path | str | None = None, state_dir: Path | str | None = None
) -> DaemonInfo:
    """What the farm calls before using virtual boards: a running daemon for ``rack``."""
    return up(rack, state_dir)


def down(state_dir: Path | str | None = None, *, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop the daemon of the state dir; True if one was running."""
    directory = resolve_state_dir(state_dir)
    info = read_info(directory)
    if info is None:
        return False
    with contextlib.suppress(InfrastructureError):
        control({"op": "shutdown"}, address=info.control, timeout=5.0)
    if _wait_dead(info.pid, timeout):
        return True
    # It did not stop when asked; it is still ours (daemon.json names it), so terminate it.
    with contextlib.suppress(ProcessLookupError):
        os.kill(info.pid, signal.SIGTERM)
    if not _wait_dead(info.pid, 5.0):
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.pid, signal.SIGKILL)
        _wait_dead(info.pid, 5.0)
    with contextlib.suppress(FileNotFoundError):
        (directory / DAEMON_JSON).unlink()
    return True


# ---------------------------------------------------------------------------- internals


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent, e.g. the process that ran `up`) is dead.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _healthy_info(directory: Path) -> DaemonInfo | None:
    info = read_info(directory)
    if info is None:
        return None
    try:
        answer = control({"op": "status"}, address=info.control, timeout=5.0)
    except InfrastructureError:
        return None
    return info if answer.get("ok") else None


@contextlib.contextmanager
def _manager_lock(directory: Path, timeout: float) -> Iterator[None]:
    with open(directory / MANAGER_LOCK, "a+") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise InfrastructureError(
                        f"another `hilfarm sim up` has held the lock for {timeout:.0f} s",
                        where=str(directory / MANAGER_LOCK),
                        hint="wait for it, or check for a stuck hilfarm process",
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _spawn(
    rack: str | None, directory: Path, base_port: int, wire_time: bool, timeout: float
) -> DaemonInfo:
    argv = [sys.executable, "-m", "pytest_hilfarm.sim.daemon", "--state-dir", str(directory)]
    if rack is not None:
        argv.append(rack)
    if base_port:
        argv += ["--base-port", str(base_port)]
    if wire_time:
        argv.append("--wire-time")
    env = dict(os.environ)
    # The daemon must import this very package, installed or not.
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (package_root, env.get("PYTHONPATH", "")) if p
    )
    log_path = directory / DAEMON_LOG
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            cwd=str(directory),
            start_new_session=True,  # outlives the caller's terminal and its Ctrl-C
            close_fds=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise InfrastructureError(
                f"the virtual rack daemon exited with status {code} while starting",
                where=str(log_path),
                hint="its log ends with:\n" + _tail(log_path),
            )
        info = read_info(directory)
        if info is not None and info.pid == proc.pid and _healthy_info(directory) is not None:
            return info
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    raise InfrastructureError(
        f"the virtual rack daemon did not come up within {timeout:.0f} s",
        where=str(log_path),
        hint="its log ends with:\n" + _tail(log_path),
    )


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
