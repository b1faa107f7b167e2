"""The rig host service (``hilfarm export``): serve one rack's boards to the whole farm.

Job: on the machine the boards are plugged into,

* register the host and its boards (chip, features, RFC 2217 URL) in the farm database and keep
  the registration alive: a heartbeat row plus a session advisory lock on a dedicated connection,
  so the host shows offline the moment its process dies, and after ``offline_after`` seconds
  without a heartbeat if it hangs; a clean stop marks it offline at once;
* serve each board's serial port over RFC 2217 (pyserial's ``PortManager`` around the local
  port), DTR/RTS included: on a physical board they drive the USB-UART's lines; on a virtual
  board they are mapped to EN/IO0 through the virtual rack's control endpoint with the DevKit
  auto-reset circuit (``EN = !(RTS && !DTR)``, ``IO0 = !(DTR && !RTS)``), synchronously;
* answer an authenticated HTTP(S) control API for power, reset and the fast flash path: the
  client uploads the image (content-addressed by SHA-256, cached here; an image already cached is
  not sent again) and this host runs esptool locally
  (:func:`pytest_hilfarm.drivers.flashing.flash`), avoiding RFC 2217's ~200 ms per esptool command
  (notes/esp-rom-protocol.md section 7).

Must not: bind anywhere but the configured address; accept a power, reset or flash request
without the shared token (constant-time compare) or, when configured, a verified TLS client
certificate; accept an RFC 2217 connection from an address that did not first ``attach`` to the
board through the authenticated API (RFC 2217 itself has no authentication; ``--open-serial``
lifts this on a trusted network); let two clients use one board at once (one UART: an RFC 2217
client and a flash request exclude each other, the loser gets EOF or HTTP 409); lock boards for
tests (the farm's reservation does that; this service trusts the token holder to hold a lease);
import pytest.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from pytest_hilfarm.board.wiring import LocalWiring, VirtualRack, flash_and_boot
from pytest_hilfarm.description.rack import BoardSpec, RackSpec, load_rack
from pytest_hilfarm.drivers.flashing import FlashPlan, FlashReport, Region
from pytest_hilfarm.drivers.rigclient import read_token
from pytest_hilfarm.drivers.transports import open_port
from pytest_hilfarm.drivers.virtual import ControlClient
from pytest_hilfarm.errors import (
    ConfigError,
    HilfarmError,
    ImageError,
    InfrastructureError,
    UsageError,
)

log = logging.getLogger("pytest_hilfarm.righost")

API_PREFIX = "/v1"
# Images above this are refused before any byte is stored (the largest ESP32 flash is 16 MB).
MAX_IMAGE_BYTES = 32 * 1024 * 1024
_SHA_RE = re.compile(r"[0-9a-f]{64}")
# How long an attach lets its address open a board's RFC 2217 port (a session, once open, lasts).
ATTACH_WINDOW_S = 60.0
NS_HOST = 0x48494C48  # pg.migrations.NS_HOST; repeated so this module imports psycopg lazily


# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsConfig:
    """HTTPS for the control API; with ``client_ca``, clients need a certificate it signed."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(str(self.cert), str(self.key))
            if self.client_ca is not None:
                ctx.load_verify_locations(str(self.client_ca))
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load the TLS certificate, key or client CA: {exc}",
                where=f"--tls-cert {self.cert} --tls-key {self.key}",
                hint="pass PEM files readable by this user",
            ) from exc
        return ctx


@dataclass(frozen=True)
class RigHostConfig:
    """Everything ``hilfarm export`` needs; see :func:`pytest_hilfarm.cli.export.register`."""

    rack: Path
    database_url: str
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    token: str | None = None
    tls: TlsConfig | None = None
    host_name: str = field(default_factory=socket.gethostname)
    advertise: str | None = None  # the name clients use to reach us (default: listen_host)
    serial_base_port: int = 0  # 0: free ports; else board i listens at base + i
    heartbeat_s: float = 2.0
    offline_after_s: float = 10.0
    cache_dir: Path | None = None
    # RFC 2217 has no authentication of its own: unless this is set, a client must first call
    # POST /v1/boards/<id>/attach (with the token) from the address it then connects from.
    open_serial: bool = False
    # Power, reset and flash only for a client naming a lease that holds the board right now.
    require_lease: bool = False

    @property
    def public_host(self) -> str:
        if self.advertise:
            return self.advertise
        if self.listen_host in ("0.0.0.0", "::", ""):
            return socket.getfqdn()
        return self.listen_host


# -- local board access ---------------------------------------------------------------------


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


class ImageCache:
    """Uploaded images, content-addressed: ``<dir>/<sha256>``; written atomically."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the image cache directory: {exc.strerror or exc}",
                where=str(directory),
                hint="pass --cache-dir with a writable directory",
            ) from exc

    def path(self, digest: str) -> Path:
        return self.directory / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def put(self, digest: str, data: bytes) -> bool:
        """Store ``data`` under ``digest`` (checked). Returns False if it was already cached."""
        if hashlib.sha256(data).hexdigest() != digest:
            raise UsageError(
                "the uploaded bytes do not match the SHA-256 in the URL",
                where=f"PUT {API_PREFIX}/images/{digest}",
                hint="upload again; the transfer was cut or the client computed the wrong hash",
            )
        if self.has(digest):
            return False
        tmp = self.directory / f".{digest}.{os.getpid()}.{threading.get_ident()}"
        tmp.write_bytes(data)
        os.replace(tmp, self.path(digest))
        return True

    def get(self, digest: str) -> bytes:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            raise UsageError(
                f"image {digest[:12]}... is not in this rig host's cache",
                where=f"rig host cache {self.directory}",
                hint=f"upload it first: PUT {API_PREFIX}/images/{digest}",
            ) from None


def report_to_json(report: FlashReport) -> dict[str, Any]:
    return {
        "port": report.port, "chip": report.chip, "seconds": report.seconds,
        "baud": report.baud,
        "regions": [{"offset": r.offset, "size": r.size, "sha256": r.sha256, "name": r.name,
                     "written": r.written, "seconds": r.seconds} for r in report.regions],
    }


_STATUS_OF: tuple[tuple[type[HilfarmError], HTTPStatus], ...] = (
    (BoardBusy, HTTPStatus.CONFLICT),
    (LeaseNotHeld, HTTPStatus.CONFLICT),
    (UsageError, HTTPStatus.BAD_REQUEST),
    (ConfigError, HTTPStatus.BAD_REQUEST),
    (InfrastructureError, HTTPStatus.BAD_GATEWAY),
)


class _ApiError(Exception):
    def __init__(self, status: HTTPStatus, what: str, where: str, hint: str,
                 kind: str = "UsageError") -> None:
        super().__init__(what)
        self.status, self.what, self.where, self.hint, self.kind = status, what, where, hint, kind


def _make_handler(host: RigHost) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "hilfarm-righost/1"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
            log.debug("%s %s", self.address_string(), format % args)

        # -- plumbing ---------------------------------------------------------------------

        def _send(self, status: HTTPStatus, body: Mapping[str, Any] | None,
                  headers: Mapping[str, str] | None = None) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, exc: _ApiError) -> None:
            headers = {"WWW-Authenticate": 'Bearer realm="hilfarm"'} \
                if exc.status == HTTPStatus.UNAUTHORIZED else None
            self._send(exc.status, {"error": exc.what, "where": exc.where, "hint": exc.hint,
                                    "kind": exc.kind}, headers)

        def _authorize(self) -> None:
            if host.config.token is None:
                return  # TLS client certificates were verified in the handshake
            given = self.headers.get("Authorization", "")
            scheme, _, token = given.partition(" ")
            ok = scheme.lower() == "bearer" and hmac.compare_digest(
                token.strip().encode(), host.config.token.encode()
            )
            if not ok:
                raise _ApiError(
                    HTTPStatus.UNAUTHORIZED,
                    "missing or wrong token: power, reset and flash need authentication",
                    f"rig host {host.config.host_name} control API {self.path}",
                    "send 'Authorization: Bearer <token>' with the shared token of this rig "
                    "host (the file given to `hilfarm export --token-file`)",
                )

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_IMAGE_BYTES:
                raise _ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                f"request body of {length} bytes is over the limit",
                                self.path, f"images are at most {MAX_IMAGE_BYTES} bytes")
            return self.rfile.read(length) if length else b""

        def _json(self) -> dict[str, Any]:
            try:
                data = json.loads(self._body() or b"{}")
            except json.JSONDecodeError as exc:
                raise _ApiError(HTTPStatus.BAD_REQUEST, f"request body is not JSON: {exc}",
                                self.path, "send a JSON object") from None
            if not isinstance(data, dict):
                raise _ApiError(HTTPStatus.BAD_REQUEST, "request body is not a JSON object",
                                self.path, "send a JSON object")
            return data

        def _board(self, board_id: str) -> LocalBoard:
            board = host.boards.get(board_id)
            if board is None:
                raise _ApiError(HTTPStatus.NOT_FOUND,
                                f"no board {board_id!r} on rig host {host.config.host_name}",
                                self.path, f"boards here: {', '.join(host.boards)}")
            return board

        def _dispatch(self) -> None:
            try:
                parts = [p for p in self.path.split("?")[0].split("/") if p]
                if parts[:1] != ["v1"]:
                    raise _ApiError(HTTPStatus.NOT_FOUND, f"no such endpoint {self.path}",
                                    self.path, "endpoints live under /v1 (see docs/multi-host.md)")
                parts = parts[1:]
                if parts == ["ping"] and self.command == "GET":
                    # Liveness only: no board, power or flash information without the token.
                    self._send(HTTPStatus.OK, {"host": host.config.host_name})
                    return
                self._authorize()
                self._route(parts)
            except _ApiError as exc:
                self._error(exc)
            except HilfarmError as exc:
                status = next((s for t, s in _STATUS_OF if isinstance(exc, t)),
                              HTTPStatus.INTERNAL_SERVER_ERROR)
                # The client re-raises by name: send the nearest class it knows.
                kind = next(c.__name__ for c in type(exc).__mro__
                            if c.__module__ == "pytest_hilfarm.errors")
                self._error(_ApiError(status, exc.what, exc.where or self.path,
                                      exc.hint or "", kind))
            except (BrokenPipeError, ConnectionResetError):
                pass
            except Exception as exc:  # noqa: BLE001 - report, never kill the service
                log.exception("control API request %s %s failed", self.command, self.path)
                self._error(_ApiError(HTTPStatus.INTERNAL_SERVER_ERROR,
                                      f"{type(exc).__name__}: {exc}", self.path,
                                      "see the rig host's log", "InfrastructureError"))

        def _route(self, parts: list[str]) -> None:
            method = self.command
            if parts == ["boards"] and method == "GET":
                self._send(HTTPStatus.OK, {"host": host.config.host_name, "boards": [
                    {"id": b.id, "chip": b.chip, "features": sorted(b.features),
                     "rfc2217": b.served_url, "in_use_by": b.user} for b in host.boards.values()
                ]})
                return
            if len(parts) == 2 and parts[0] == "images":
                digest = parts[1].lower()
                if not _SHA_RE.fullmatch(digest):
                    raise _ApiError(HTTPStatus.BAD_REQUEST, "not a SHA-256 hex digest",
                                    self.path, "name images by the SHA-256 of their bytes")
                if method == "HEAD":
                    status = HTTPStatus.OK if host.cache.has(digest) else HTTPStatus.NOT_FOUND
                    self._send(status, None)
                    return
                if method == "PUT":
                    created = host.cache.put(digest, self._body())
                    self._send(HTTPStatus.CREATED if created else HTTPStatus.OK,
                               {"sha256": digest, "stored": created})
                    return
            if len(parts) == 3 and parts[0] == "boards" and method == "POST":
                board = self._board(parts[1])
                body = self._json()
                action = parts[2]
                host.check_lease(board, body.get("lease_id"), action)
                if action == "flash":
                    self._send(HTTPStatus.OK, report_to_json(host.flash(board, body)))
                    return
                if action == "power":
                    if "cycle" in body:
                        board.cycle(float(body["cycle"]))
                    else:
                        board.power(bool(body.get("on", True)))
                    self._send(HTTPStatus.OK, {"ok": True})
                    return
                if action == "attach":
                    seconds = min(float(body.get("seconds", ATTACH_WINDOW_S)), 3600.0)
                    board.allow(self.client_address[0], seconds)
                    self._send(HTTPStatus.OK, {"rfc2217": board.served_url,
                                               "address": self.client_address[0],
                                               "seconds": seconds})
                    return
                if action == "reset":
                    board.reset(str(body.get("boot", "flash")))
                    self._send(HTTPStatus.OK, {"ok": True})
                    return
            raise _ApiError(HTTPStatus.NOT_FOUND, f"no endpoint {method} {self.path}",
                            self.path, "see docs/multi-host.md for the control API")

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._dispatch()

        def do_HEAD(self) -> None:  # noqa: N802
            self._dispatch()

        def do_PUT(self) -> None:  # noqa: N802
            self._dispatch()

        def do_POST(self) -> None:  # noqa: N802
            self._dispatch()

    return Handler


# -- the service ----------------------------------------------------------------------------------


class RigHost:
    """The running service: registration + heartbeat, RFC 2217 listeners, control API."""

    def __init__(self, config: RigHostConfig) -> None:
        if config.token is None and (config.tls is None or config.tls.client_ca is None):
            raise ConfigError(
                "refusing to serve power and flash control without authentication",
                where="hilfarm export",
                hint="pass --token-file FILE (a shared secret), or --tls-cert/--tls-key with "
                "--tls-client-ca to require client certificates",
            )
        if config.offline_after_s <= config.heartbeat_s:
            raise ConfigError(
                f"offline_after ({config.offline_after_s} s) must exceed the heartbeat "
                f"interval ({config.heartbeat_s} s)",
                where="hilfarm export",
                hint="use about 3-5 heartbeats, e.g. --heartbeat 2 --offline-after 10",
            )
        self.config = config
        self.rack = load_rack(config.rack)
        cache_dir = config.cache_dir or self.rack.state_dir / "righost-images"
        self.cache = ImageCache(cache_dir)
        self.boards = {b.id: b for b in local_boards(self.rack)}
        self._exporters: list[SerialExporter] = []
        self._stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self._lock_conn: Any = None
        self._http: ThreadingHTTPServer | None = None
        self._store: Any = None

    # -- life cycle -------------------------------------------------------------------------

    @property
    def control_url(self) -> str:
        scheme = "https" if self.config.tls else "http"
        assert self._http is not None
        return f"{scheme}://{self.config.public_host}:{self._http.server_address[1]}"

    def start(self) -> None:
        from pytest_hilfarm.pg.store import PgFarmStore

        for index, board in enumerate(self.boards.values()):
            port = self.config.serial_base_port + index if self.config.serial_base_port else 0
            exporter = SerialExporter(board, self.config.listen_host, port,
                                      open_serial=self.config.open_serial)
            board.served_url = f"rfc2217://{self.config.public_host}:{exporter.port}"
            self._exporters.append(exporter)
        try:
            http = ThreadingHTTPServer((self.config.listen_host, self.config.listen_port),
                                       _make_handler(self))
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.config.listen_host}:{self.config.listen_port}: "
                f"{exc.strerror or exc}",
                where="--listen", hint="pick a free port and an address of this machine",
            ) from exc
        http.daemon_threads = True
        if self.config.tls is not None:
            http.socket = self.config.tls.server_context().wrap_socket(
                http.socket, server_side=True, do_handshake_on_connect=False)
        self._http = http
        self._store = PgFarmStore(self.config.database_url)
        self._register()
        for exporter in self._exporters:
            exporter.start()
        threading.Thread(target=http.serve_forever, kwargs={"poll_interval": 0.2},
                         daemon=True, name="righost-http").start()
        self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, daemon=True,
                                                  name="righost-heartbeat")
        self._heartbeat_thread.start()

    def _register(self) -> None:
        """Take the host's liveness lock, then (re-)register the host and its boards."""
        from pytest_hilfarm.pg.store import connect

        store = self._store
        key = store.register_host(self.config.host_name, self.control_url, os.getpid(),
                                  self.config.offline_after_s)
        conn = connect(self.config.database_url, purpose=f"rig host {self.config.host_name}")
        got = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (NS_HOST, key)).fetchone()[0]
        if not got:
            conn.close()
            raise ConfigError(
                f"another running rig host already serves the host name "
                f"{self.config.host_name!r}",
                where=self.config.database_url.split("@")[-1],
                hint="stop it first, or give this one another --host-name",
            )
        old, self._lock_conn = self._lock_conn, conn
        if old is not None:
            with contextlib.suppress(Exception):
                old.close()
        store.register_boards(self.config.host_name, list(self.boards.values()),
                              {b.id: b.served_url for b in self.boards.values()})

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.config.heartbeat_s):
            try:
                assert self._lock_conn is not None
                self._lock_conn.execute(
                    "UPDATE hosts SET heartbeat_at = extract(epoch from clock_timestamp())"
                    " WHERE host = %s", (self.config.host_name,))
            except Exception as exc:  # noqa: BLE001 - a heartbeat must never kill the service
                log.warning("heartbeat failed (%s); registering again", exc)
                with contextlib.suppress(Exception):
                    self._register()

    def stop(self) -> None:
        """Stop serving and mark the host offline at once (a clean stop)."""
        self._stop.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(5)
        with contextlib.suppress(Exception):
            if self._store is not None:
                self._store.host_stopped(self.config.host_name)
        if self._lock_conn is not None:
            with contextlib.suppress(Exception):
                self._lock_conn.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        for exporter in self._exporters:
            exporter.stop()

    def serve_forever(self, ready: Callable[[RigHost], None] | None = None) -> None:
        self.start()
        if ready is not None:
            ready(self)
        try:
            while not self._stop.wait(0.5):
                pass
        finally:
            self.stop()

    def request_stop(self) -> None:
        self._stop.set()

    def check_lease(self, board: LocalBoard, lease_id: Any, action: str) -> None:
        """Refuse to act for a lease that does not hold ``board`` now (lost, ended, foreign)."""
        if lease_id is None:
            if not self.config.require_lease:
                return
            raise UsageError(
                f"{action} on board {board.id} needs a lease: this rig host requires one",
                where=f"rig host {self.config.host_name}",
                hint="reserve the board first and send its lease id (RigClient(..., lease=...))",
            )
        if not self._store.lease_holds(str(lease_id), board.id):
            raise LeaseNotHeld(
                f"lease {str(lease_id)[:8]} does not hold board {board.id} (any more)",
                where=f"rig host {self.config.host_name}, {action} {board.id}",
                hint="the lease ended or lost its database connection and the board may "
                "belong to someone else now: reserve it again",
            )

    # -- flashing ------------------------------------------------------------------------------

    def flash(self, board: LocalBoard, body: Mapping[str, Any]) -> FlashReport:
        where = f"rig host {self.config.host_name}, flash {board.id}"
        try:
            regions = tuple(
                Region(int(r["offset"]), self.cache.get(str(r["sha256"]).lower()),
                       str(r.get("name") or f"image@{int(r['offset']):#x}"))
                for r in body["regions"]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ImageError(
                f"bad flash request: {exc!r}",
                where=where,
                hint='send {"regions": [{"offset": 65536, "sha256": "...", "name": "app"}]}',
            ) from None
        plan = FlashPlan(regions, str(body.get("flash_mode", "keep")),
                         str(body.get("flash_size", "keep")), str(body.get("flash_freq", "keep")),
                         source=", ".join(r.name for r in regions))
        baud = body.get("baud")
        return board.flash(plan, baud=int(baud) if baud else None,
                           skip_identical=bool(body.get("skip_identical", True)),
                           boot=bool(body.get("boot", True)))


def describe(host: RigHost) -> str:
    lines = [f"hilfarm export: rig host {host.config.host_name} serving "
             f"{len(host.boards)} board(s) of rack {host.rack.name!r}",
             f"  control API {host.control_url}"]
    lines += [f"  {b.id:<16} {b.chip:<8} {b.served_url}" for b in host.boards.values()]
    return "\n".join(lines)


def _split_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--listen {value!r} is not HOST:PORT", where="--listen",
                          hint="e.g. --listen 0.0.0.0:7410 or --listen 10.0.0.5:7410")
    return host.strip("[]") or "127.0.0.1", int(port)


def config_from_args(args: Any, environ: Mapping[str, str] | None = None) -> RigHostConfig:
    env = os.environ if environ is None else environ
    database = args.database or env.get("HILFARM_DATABASE_URL", "")
    if not database:
        raise ConfigError("no farm database given", where="hilfarm export",
                          hint="pass --database postgresql://USER@HOST/DB or set "
                          "HILFARM_DATABASE_URL")
    host, port = _split_listen(args.listen)
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together", where="hilfarm export",
                              hint="pass both PEM files, or neither for plain HTTP")
        tls = TlsConfig(Path(args.tls_cert), Path(args.tls_key),
                        Path(args.tls_client_ca) if args.tls_client_ca else None)
    return RigHostConfig(
        rack=Path(args.rack), database_url=database, listen_host=host, listen_port=port,
        token=read_token(args.token_file) if args.token_file else None, tls=tls,
        host_name=args.host_name or socket.gethostname(), advertise=args.advertise,
        serial_base_port=args.serial_base_port, heartbeat_s=args.heartbeat,
        offline_after_s=args.offline_after,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        open_serial=bool(getattr(args, "open_serial", False)),
        require_lease=bool(getattr(args, "require_lease", False)),
    )
