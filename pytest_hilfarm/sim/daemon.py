"""The virtual rack daemon: serves a rack of virtual boards on TCP ports and a control endpoint.

Per board it listens on a ``socket://`` port (raw UART bytes) and an ``rfc2217://`` port (UART
plus DTR/RTS through pyserial's :class:`serial.rfc2217.PortManager`), both on 127.0.0.1. A board
has one UART, so it takes one client at a time across both ports; further connects are accepted
and closed at once (the client sees EOF / "socket disconnected"), and the first client keeps
working. Opening a port never changes the board's mode: over ``socket://`` the farm drives reset
and boot mode through the control endpoint (``reset`` with ``boot=download|flash``), over
``rfc2217://`` esptool's own DTR/RTS reset works. The control endpoint speaks JSON lines
(docs/virtual-rack.md; its ops are :mod:`pytest_hilfarm.sim.control`'s, the port clients
:mod:`pytest_hilfarm.sim.ports`'). The daemon writes ``daemon.json`` into its state dir while it
runs; this module is its lifecycle (start, admit clients, stop) and its command line.

It reads the rack through :mod:`pytest_hilfarm.description.virtual` (the virtual boards of the
one rack parser's result) and must never import the farm core (farm, board, drivers, plugin):
the farm reaches it only through port URLs and the control endpoint, like a physical rack.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import select
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pytest_hilfarm.description.virtual import (
    SIM_KEY,
    load_virtual_rack,
    parse_virtual_rack,
    state_dir,
)
from pytest_hilfarm.description.virtual import VirtualBoardSpec as BoardSpec
from pytest_hilfarm.description.virtual import VirtualRackSpec as RackSpec
from pytest_hilfarm.errors import ConfigError, UsageError
from pytest_hilfarm.esp.chips import format_revision
from pytest_hilfarm.sim.board import VirtualBoard
from pytest_hilfarm.sim.boot import BootEfuse
from pytest_hilfarm.sim.chips import check_revision, chip_spec, mac_for
from pytest_hilfarm.sim.control import (
    EFUSE_KEYS,
    ControlOps,
    atomic_write,
    burn_security,
    efuse_from_json,
    efuse_to_json,
)
from pytest_hilfarm.sim.mesh import MeshMedium
from pytest_hilfarm.sim.ports import PortClient, Scheduler, Slot

HOST = "127.0.0.1"
DAEMON_JSON = "daemon.json"
DAEMON_LOCK = "daemon.lock"
MESH_FEATURE = "mesh-radio"
MAX_CONTROL_LINE = 1 << 20  # a control request is small; a megabyte means a confused client


# ---------------------------------------------------------------------------- rack & state dir


# How long a new connection waits for the previous client's hang-up to be noticed before it is
# refused as busy (a real tty is free the moment close() returns; TCP needs the EOF read).
HANDOVER_GRACE = 0.5

# What the virtual rack's baseline (health-check) firmware calls itself.
BASELINE_PROJECT = "hilfarm-baseline"
BASELINE_VERSION = "1.0.0"


def _checked(rack: RackSpec) -> RackSpec:
    """Refuse a ``sim: revision`` the board's chip cannot carry in its eFuse fields."""
    for board in rack.boards:
        if board.revision is None:
            continue
        spec = chip_spec(board.chip)
        try:
            check_revision(spec, board.revision)
        except ValueError as exc:
            raise ConfigError(str(exc), where=f"{board.where}: {SIM_KEY}.revision",
                              hint=f'write it as vMAJOR.MINOR, e.g. revision: "'
                                   f'{format_revision(spec.default_revision)}" (the default for '
                                   f'{spec.esptool_name})') from None
    return rack


def parse_rack(data: Any, source: str) -> RackSpec:
    """The virtual boards of a loaded rack YAML document, checked against the simulated chips."""
    return _checked(parse_virtual_rack(data, source))


def load_rack(path: Path | str | None = None) -> RackSpec:
    """Load a rack file, or the packaged default virtual rack when ``path`` is None."""
    return _checked(load_virtual_rack(path))


def resolve_state_dir(explicit: Path | str | None = None) -> Path:
    """The state dir, absolute: ``explicit``, else :func:`state_dir`'s rule (HILFARM_SIM_DIR)."""
    return (Path(explicit).expanduser() if explicit else state_dir()).resolve()


# ---------------------------------------------------------------------------- the daemon


class Daemon(ControlOps):
    """Hosts the boards of one rack. ``start()`` binds and writes daemon.json; ``stop()`` ends."""

    def __init__(
        self,
        rack: RackSpec,
        state_dir: Path | str,
        *,
        base_port: int = 0,
        wire_time: bool = False,
        seed: int = 0,
    ) -> None:
        self.rack = rack
        self.state_dir = Path(state_dir)
        self._base_port = base_port
        self._wire_time = wire_time
        self._seed = seed
        self._lock = threading.Lock()
        # Notified when a port connection is attached or refused (_settle_ports waits on it).
        self._settled = threading.Condition(self._lock)
        # Open control connections: clients keep theirs between requests, and a stop must end
        # them (a client then reconnects to whatever serves the endpoint next).
        self._controls: set[socket.socket] = set()
        self._slots: dict[str, Slot] = {}
        # What each board's eFuses are when its chip is new (the rack's ``sim:`` burned onto
        # blank eFuses): the state ``efuse new_chip`` returns a board to.
        self._fresh_efuse: dict[str, BootEfuse] = {}
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._stop_done = threading.Event()
        self._lock_file: Any = None
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._control_sock: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._scheduler: Scheduler | None = None
        self.medium: Any = None

    # -- lifecycle

    def start(self) -> None:
        """Bind every port, power the boards on, write daemon.json; undone if anything fails."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self._scheduler = Scheduler()
        self.medium = MeshMedium(
            time.monotonic, random.Random(self._seed), self._scheduler.schedule
        )
        self._control_sock = self._listen(self._port(0))
        for index, spec in enumerate(self.rack.boards):
            serial_sock = self._listen(self._port(1 + 2 * index))
            rfc_sock = self._listen(self._port(2 + 2 * index))
            board = VirtualBoard(
                spec.id,
                spec.chip,
                self.state_dir / f"{spec.id}.flash",
                spec.flash_size,
                (spec.mac or mac_for(spec.id, spec.chip)).hex(":"),
                # Only boards with a radio join the medium; the app answers "no mesh radio".
                self.medium if MESH_FEATURE in spec.features else None,
                position=spec.position,
                features=spec.features,
                wire_time=self._wire_time,
                revision=spec.revision,
                **self._board_state(spec),
            )
            self._slots[spec.id] = Slot(spec, board, serial_sock, rfc_sock)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._selector.register(self._control_sock, selectors.EVENT_READ, ("control", None))
        for slot in self._slots.values():
            self._selector.register(slot.serial_sock, selectors.EVENT_READ, ("socket", slot))
            self._selector.register(slot.rfc_sock, selectors.EVENT_READ, ("rfc2217", slot))
        self._acceptor = threading.Thread(target=self._accept_loop, name="acceptor", daemon=True)
        self._acceptor.start()
        self._baselines = self._build_baselines()
        self._write_daemon_json()

    def _build_baselines(self) -> dict[str, str]:
        """A known-good build per chip, offered to the farm for health checks.

        A physical rack's owner keeps a golden image for each board type; the virtual rack
        keeps its own (the demo app, factory layout) so health checks on it flash and boot a
        baseline like on real hardware. Built once per state dir.
        """
        from pytest_hilfarm.sim.appbuild import write_build_dir

        out: dict[str, str] = {}
        for chip in sorted({spec.chip for spec in self.rack.boards}):
            smallest = min(s.flash_size for s in self.rack.boards if s.chip == chip)
            path = self.state_dir / "baselines" / chip
            if not (path / "flasher_args.json").exists():
                write_build_dir(path, chip, BASELINE_PROJECT, BASELINE_VERSION,
                                flash_size=f"{max(2, smallest // (1024 * 1024))}MB")
            out[chip] = str(path)
        return out

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the daemon stops (shutdown op, signal, or :meth:`stop`)."""
        return self._stopped.wait(timeout)

    def stop(self) -> None:
        """Stop serving, close boards (flash flushed), remove daemon.json; waits until done."""
        with self._stop_lock:
            first = not self._stopped.is_set()
            self._stopped.set()
        if not first:
            self._stop_done.wait(30)  # another thread is stopping: return once it has
            return
        try:
            self._stop_now()
        finally:
            self._stop_done.set()

    def _stop_now(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._acceptor is not None:
            self._acceptor.join(timeout=5)
        with self._lock:
            slots = list(self._slots.values())
        for slot in slots:
            if slot.client is not None:
                slot.client.close()
            for sock in (slot.serial_sock, slot.rfc_sock):
                with contextlib.suppress(OSError):
                    sock.close()
            slot.board.close()
        if self._control_sock is not None:
            with contextlib.suppress(OSError):
                self._control_sock.close()
        with self._lock:
            controls = list(self._controls)
        for sock in controls:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # its thread reads EOF and closes it
        if self._scheduler is not None:
            self._scheduler.stop()
        self._selector.close()
        for sock in (self._wake_r, self._wake_w):
            sock.close()
        self._remove_daemon_json()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # -- info

    @property
    def control_address(self) -> str:
        assert self._control_sock is not None
        host, port = self._control_sock.getsockname()[:2]
        return f"{host}:{port}"

    def board_urls(self, slot: Slot) -> tuple[str, str]:
        port = slot.serial_sock.getsockname()[1]
        rfc = slot.rfc_sock.getsockname()[1]
        return f"socket://{HOST}:{port}", f"rfc2217://{HOST}:{rfc}"

    def info(self) -> dict[str, Any]:
        """The content of daemon.json."""
        boards = []
        for slot in self._slots.values():
            port, rfc = self.board_urls(slot)
            boards.append(
                {
                    "id": slot.spec.id,
                    "chip": slot.spec.chip,
                    "mac": slot.board.mac,
                    "port": port,
                    "rfc2217": rfc,
                    "features": list(slot.spec.features),
                }
            )
        return {
            "pid": os.getpid(),
            "control": self.control_address,
            "rack": self.rack.source,
            "rack_name": self.rack.name,
            "rack_digest": self.rack.digest,
            "state_dir": str(self.state_dir),
            "boards": boards,
            "baselines": dict(getattr(self, "_baselines", {})),
        }

    # -- internals: setup

    def _port(self, offset: int) -> int:
        return self._base_port + offset if self._base_port else 0

    def _listen(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            sock.close()
            raise UsageError(
                f"cannot listen on {HOST}:{port}: {exc.strerror}",
                where="virtual rack daemon",
                hint="pick another --base-port, or omit it to use free ports",
            ) from exc
        sock.listen(64)
        sock.setblocking(False)
        return sock

    def _take_lock(self) -> None:
        # One daemon per state dir: two would write the same flash files.
        handle = open(self.state_dir / DAEMON_LOCK, "a+")  # noqa: SIM115 - held for our lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            raise UsageError(
                "another virtual rack daemon is already running on this state dir",
                where=str(self.state_dir),
                hint="use `hilfarm sim status`, or `hilfarm sim down` before starting another",
            ) from exc
        self._lock_file = handle

    def _board_state(self, spec: BoardSpec) -> dict[str, Any]:
        # <id>.json keeps per-board facts that are not flash: eFuses and the bootloader's
        # rollback option. Written once so that a person can edit it between runs.
        path = self.state_dir / f"{spec.id}.json"
        state: dict[str, Any] = {"chip": spec.chip, "efuse": None, "rollback_enabled": True}
        if path.exists():
            try:
                loaded = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"board state file is unreadable: {exc}",
                    where=str(path),
                    hint="fix or delete it (it is recreated with defaults)",
                ) from exc
            if isinstance(loaded, dict):
                state.update(loaded)
        else:
            atomic_write(path, json.dumps(state, indent=2) + "\n")
        try:
            efuse = efuse_from_json(state.get("efuse"))
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"bad 'efuse' entry: {exc}",
                where=str(path),
                hint=f"use null or an object with keys {', '.join(EFUSE_KEYS)}",
            ) from exc

        lock = threading.Lock()

        def store(new: BootEfuse) -> None:
            # Called on the board's thread (anti-rollback raise, a burn): written at once, as
            # an eFuse burn is immediate and survives a crash of the daemon.
            with lock:
                state["efuse"] = efuse_to_json(new)
                atomic_write(path, json.dumps(state, indent=2) + "\n")

        security = spec.security
        if security is not None:
            try:
                burned = burn_security(efuse, spec.chip, security)
            except UsageError as exc:
                raise ConfigError(f"the rack's '{SIM_KEY}:' cannot be burned: {exc.what}",
                                  where=f"board {spec.id}", hint=exc.hint) from None
            if security.rollback is not None:
                state["rollback_enabled"] = security.rollback
            if burned != efuse or security.rollback is not None:
                efuse = burned
                store(efuse)
        self._fresh_efuse[spec.id] = burn_security(BootEfuse(), spec.chip, security) \
            if security is not None else BootEfuse()
        return {
            "efuse": efuse,
            "on_efuse_change": store,
            "rollback_enabled": bool(state.get("rollback_enabled", True)),
        }

    def _write_daemon_json(self) -> None:
        atomic_write(self.state_dir / DAEMON_JSON, json.dumps(self.info(), indent=2) + "\n")

    def _remove_daemon_json(self) -> None:
        path = self.state_dir / DAEMON_JSON
        try:
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        except (OSError, ValueError):
            pass

    # -- internals: sockets

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            for key, _ in self._selector.select():
                if key.data is None:
                    return  # woken by stop()
                kind, slot = key.data
                with self._lock:  # accepted and counted at once: _settle_ports sees one or other
                    try:
                        sock, _addr = key.fileobj.accept()  # type: ignore[union-attr]
                    except OSError:
                        continue
                    if slot is not None:
                        slot.admitting += 1
                    elif kind == "control":
                        self._controls.add(sock)
                sock.setblocking(True)
                if kind == "control":
                    threading.Thread(
                        target=self._serve_control, args=(sock,), name="control", daemon=True
                    ).start()
                else:
                    self._admit(slot, sock, kind)

    def _admit(self, slot: Slot, sock: socket.socket, kind: str, *, waited: bool = False
               ) -> None:
        with self._lock:
            held = slot.client is not None
            busy = held or not slot.plugged or self._stopped.is_set()
            client = None if busy else PortClient(sock, slot.board, kind,
                                               on_attached=lambda: self._admitted(slot))
            if client is not None:
                slot.client = client
        if client is None and held and not waited and slot.plugged:
            # The previous client may have just hung up (esptool handing the port back to a
            # console) while its thread has not read the EOF yet: give it a moment, off the
            # accept thread, before refusing the way a busy port does.
            threading.Thread(target=self._admit_after_handover, args=(slot, sock, kind),
                             name=f"handover-{slot.spec.id}", daemon=True).start()
            return
        if client is None:
            # Busy (or unplugged) port: the way a serial port that is already open elsewhere
            # refuses a second open, as close to it as TCP allows: accept, then close at once.
            # The first client is untouched.
            with contextlib.suppress(OSError):
                sock.close()
            self._admitted(slot)
            return
        threading.Thread(
            target=self._serve_client, args=(slot, client), name=f"{kind}-{slot.spec.id}",
            daemon=True,
        ).start()

    def _admit_after_handover(self, slot: Slot, sock: socket.socket, kind: str) -> None:
        deadline = time.monotonic() + HANDOVER_GRACE
        while time.monotonic() < deadline and not self._stopped.is_set():
            with self._lock:
                if slot.client is None:
                    break
            time.sleep(0.005)
        self._admit(slot, sock, kind, waited=True)

    def _admitted(self, slot: Slot) -> None:
        """One pending connection is decided (attached to its board, or refused)."""
        with self._lock:
            slot.admitting = max(0, slot.admitting - 1)
            self._settled.notify_all()

    def _settle_ports(self, slot: Slot, timeout: float = 2.0) -> None:
        """Wait until connections made to the board's ports so far are attached or refused.

        A client's connect() returns once the kernel queued the connection, before the daemon
        accepted it (or, while the previous client's hang-up is still in flight, before the
        hand-over decided it). Output emitted then has no listener and is lost, like bytes sent
        to a closed tty. On a real board the port is open when open() returns, so a reset that
        follows it is always heard: resets and power switching wait here to keep that order.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self._stopped.is_set():
                pending = slot.admitting > 0 or bool(
                    select.select([slot.serial_sock, slot.rfc_sock], [], [], 0)[0])
                if not pending or time.monotonic() >= deadline:
                    return
                # Woken as soon as a connection is decided; the short timeout covers one the
                # accept thread has not taken from the listen queue yet.
                self._settled.wait(0.002)

    def _serve_client(self, slot: Slot, client: PortClient) -> None:
        try:
            client.serve()
        finally:
            client.announce_attached()  # serve() failed before attaching: decided all the same

            slot.board.detach(client)
            client.close()
            with self._lock:
                if slot.client is client:
                    slot.client = None

    def _serve_control(self, sock: socket.socket) -> None:
        try:
            self._serve_control_lines(sock)
        finally:
            with self._lock:
                self._controls.discard(sock)

    def _serve_control_lines(self, sock: socket.socket) -> None:
        with sock, sock.makefile("rwb") as stream:
            while not self._stopped.is_set():
                try:
                    line = stream.readline(MAX_CONTROL_LINE)
                except OSError:
                    return
                if not line:
                    return
                if not line.strip():
                    continue
                response = self.handle_line(line)
                try:
                    stream.write(json.dumps(response).encode() + b"\n")
                    stream.flush()
                except OSError:
                    return
                if response.get("shutdown"):
                    threading.Thread(target=self.stop, name="shutdown", daemon=True).start()
                    return

@contextlib.contextmanager
def running(
    rack: RackSpec | None = None, state_dir: Path | str | None = None, **kwargs: Any
) -> Iterator[Daemon]:
    """Run a daemon in this process for the duration of a ``with`` block (tests, benches)."""
    daemon = Daemon(rack or load_rack(None), resolve_state_dir(state_dir), **kwargs)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


def serve(
    rack_path: Path | str | None = None,
    state_dir: Path | str | None = None,
    *,
    base_port: int = 0,
    wire_time: bool = False,
    announce: Callable[[str], None] | None = None,
) -> int:
    """Run the daemon in the foreground until SIGINT/SIGTERM or a ``shutdown`` request."""
    daemon = Daemon(
        load_rack(rack_path), resolve_state_dir(state_dir), base_port=base_port,
        wire_time=wire_time,
    )
    daemon.start()

    def on_signal(signum: int, frame: Any) -> None:
        # Stop from another thread: the handler runs on the main thread, inside wait().
        threading.Thread(target=daemon.stop, name="signal-stop", daemon=True).start()

    previous = {
        sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        if announce is not None:
            announce(json.dumps(daemon.info(), indent=2))
        daemon.wait()  # until shutdown op or signal; blocks without polling
    finally:
        daemon.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pytest_hilfarm.sim.daemon", description="Serve a virtual rack."
    )
    parser.add_argument("rack", nargs="?", help="rack YAML file (default: built-in virtual rack)")
    parser.add_argument("--state-dir", help="state dir (default: HILFARM_SIM_DIR or XDG state)")
    parser.add_argument("--base-port", type=int, default=0, help="fixed ports from here (0: any)")
    parser.add_argument("--wire-time", action="store_true", help="emulate UART wire time")
    args = parser.parse_args(argv)
    try:
        return serve(
            args.rack, args.state_dir, base_port=args.base_port, wire_time=args.wire_time,
            announce=lambda text: print(text, flush=True),  # goes to daemon.log under `up`
        )
    except (ConfigError, UsageError) as exc:
        print(f"hilfarm sim daemon: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
