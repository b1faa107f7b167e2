"""The rig host's HTTP control API: attach, power, reset, and the content-addressed flash path.

Every request needs the shared token (constant-time compare) and, when configured, a verified
TLS client certificate. Images are uploaded once into the :class:`ImageCache` (by SHA-256) and
flashed by esptool on this host.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import threading
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_hilfarm.drivers.flashing import FlashReport
from pytest_hilfarm.errors import (
    ConfigError,
    HilfarmError,
    InfrastructureError,
    UsageError,
)
from pytest_hilfarm.services.righost.boards import (
    BoardBusy,
    LeaseNotHeld,
    LocalBoard,
)
from pytest_hilfarm.services.righost.config import (
    API_PREFIX,
    ATTACH_WINDOW_S,
    MAX_IMAGE_BYTES,
)

if TYPE_CHECKING:
    from pytest_hilfarm.services.righost.host import RigHost

# An image is named by its SHA-256, in lowercase hex.
_SHA_RE = re.compile(r"[0-9a-f]{64}")

log = logging.getLogger("pytest_hilfarm.righost")

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


def make_handler(host: RigHost) -> type[BaseHTTPRequestHandler]:
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
