"""The rig host's HTTP control API: attach, power, reset, and the content-addressed flash path.

A Starlette app (:func:`build_app`) served by uvicorn (:mod:`pytest_hilfarm.services.web`). Every
request needs the shared token (constant-time compare) and, when configured, a verified TLS
client certificate. Every body is checked against the OpenAPI contract
(:mod:`~pytest_hilfarm.services.righost.contract`) before anything acts, so bad input is a 4xx
in the project's error shape, never a 500. Images are uploaded once into the
:class:`ImageCache` (by SHA-256) and flashed by esptool on this host; blocking work runs in
Starlette's thread pool.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

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
from pytest_hilfarm.services.righost.contract import check_body, document_json
from pytest_hilfarm.services.web import Authenticator, error_response

if TYPE_CHECKING:
    from pytest_hilfarm.services.righost.host import RigHost

# An image is named by its SHA-256, in lowercase hex.
_SHA_RE = re.compile(r"[0-9a-f]{64}")
# A JSON request (flash, power, reset, attach) is a few hundred bytes; images go through PUT.
MAX_JSON_BYTES = 64 * 1024

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


# The HTTP status of each error class the host raises on purpose (first match wins).
_STATUS_OF: tuple[tuple[type[HilfarmError], int], ...] = (
    (BoardBusy, 409),
    (LeaseNotHeld, 409),
    (UsageError, 400),
    (ConfigError, 400),
    (InfrastructureError, 502),
)


class ApiError(Exception):
    """An answer other than success, in the project's error shape."""

    def __init__(self, status: int, what: str, where: str, hint: str,
                 kind: str = "UsageError") -> None:
        super().__init__(what)
        self.status, self.what, self.where, self.hint, self.kind = status, what, where, hint, kind


def _where(request: Request) -> str:
    return f"{request.method} {request.url.path}"


def _error_from(exc: HilfarmError, request: Request) -> JSONResponse:
    status = next((s for t, s in _STATUS_OF if isinstance(exc, t)), 502)
    # The client re-raises by name: send the nearest class it knows.
    kind = next(c.__name__ for c in type(exc).__mro__
                if c.__module__ == "pytest_hilfarm.errors")
    return error_response(status, exc.what, exc.where or _where(request), exc.hint or "", kind)


async def _read_body(request: Request, limit: int) -> bytes:
    """The whole body (Content-Length or chunked), refused with 413 as soon as it is too big."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes is over the limit",
                       _where(request), f"images are at most {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes",
                           _where(request), f"images are at most {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


async def _json_body(request: Request, schema: str) -> dict[str, Any]:
    """The JSON object body (empty: ``{}``), checked against the contract's ``schema``."""
    raw = await _read_body(request, MAX_JSON_BYTES)
    where = _where(request)
    if raw.strip():
        content_type = request.headers.get("content-type", "application/json")
        if content_type.split(";")[0].strip().lower() not in ("application/json", ""):
            raise ApiError(415, f"request body of type {content_type!r} is not JSON", where,
                           "send Content-Type: application/json and a JSON object")
        try:
            data = json.loads(raw, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, f"request body is not JSON: {exc}", where,
                           "send a JSON object") from None
    else:
        data = {}
    check_body(schema, data, where=where)
    return dict(data)


def build_app(host: RigHost) -> Any:
    """The control API as an ASGI app: Starlette routes behind the token check."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    def board_of(request: Request) -> LocalBoard:
        board_id = request.path_params["board"]
        board = host.boards.get(board_id)
        if board is None:
            raise ApiError(404, f"no board {board_id!r} on rig host {host.config.host_name}",
                           _where(request), f"boards here: {', '.join(host.boards)}")
        return board

    def digest_of(request: Request) -> str:
        digest = str(request.path_params["sha256"]).lower()
        if not _SHA_RE.fullmatch(digest):
            raise ApiError(400, "not a SHA-256 hex digest", _where(request),
                           "name images by the SHA-256 of their bytes (64 hex digits)")
        return digest

    async def ping(request: Request) -> Response:
        return JSONResponse({"host": host.config.host_name})

    async def openapi(request: Request) -> Response:
        return Response(document_json(), media_type="application/json")

    async def boards(request: Request) -> Response:
        return JSONResponse({"host": host.config.host_name, "boards": [
            {"id": b.id, "chip": b.chip, "features": sorted(b.features),
             "rfc2217": b.served_url, "in_use_by": b.user} for b in host.boards.values()
        ]})

    async def has_image(request: Request) -> Response:
        found = host.cache.has(digest_of(request))
        return Response(status_code=200 if found else 404)

    async def put_image(request: Request) -> Response:
        digest = digest_of(request)
        data = await _read_body(request, MAX_IMAGE_BYTES)
        created = await run_in_threadpool(host.cache.put, digest, data)
        return JSONResponse({"sha256": digest, "stored": created},
                            status_code=201 if created else 200)

    async def flash(request: Request) -> Response:
        board = board_of(request)
        body = await _json_body(request, "FlashRequest")
        await run_in_threadpool(host.check_lease, board, body.get("lease_id"), "flash")
        report = await run_in_threadpool(host.flash, board, body)
        return JSONResponse(report_to_json(report))

    async def power(request: Request) -> Response:
        board = board_of(request)
        body = await _json_body(request, "PowerRequest")
        await run_in_threadpool(host.check_lease, board, body.get("lease_id"), "power")
        if "cycle" in body:
            await run_in_threadpool(board.cycle, float(body["cycle"]))
        else:
            await run_in_threadpool(board.power, bool(body.get("on", True)))
        return JSONResponse({"ok": True})

    async def reset(request: Request) -> Response:
        board = board_of(request)
        body = await _json_body(request, "ResetRequest")
        await run_in_threadpool(host.check_lease, board, body.get("lease_id"), "reset")
        await run_in_threadpool(board.reset, str(body.get("boot", "flash")))
        return JSONResponse({"ok": True})

    async def attach(request: Request) -> Response:
        board = board_of(request)
        body = await _json_body(request, "AttachRequest")
        await run_in_threadpool(host.check_lease, board, body.get("lease_id"), "attach")
        seconds = float(body.get("seconds", ATTACH_WINDOW_S))
        address = request.client.host if request.client is not None else ""
        board.allow(address, seconds)
        return JSONResponse({"rfc2217": board.served_url, "address": address,
                             "seconds": seconds})

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.what, exc.where, exc.hint, exc.kind)

    async def on_hilfarm_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HilfarmError)
        return _error_from(exc, request)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            return error_response(405, f"{request.method} is not allowed on "
                                  f"{request.url.path}", _where(request),
                                  "see the OpenAPI document (GET /v1/openapi.json)",
                                  headers=dict(exc.headers or {}))
        return error_response(exc.status_code, f"no endpoint {_where(request)}",
                              _where(request), "endpoints live under /v1; see the OpenAPI "
                              "document (GET /v1/openapi.json) or docs/multi-host.md")

    async def on_bug(request: Request, exc: Exception) -> Response:
        log.exception("control API request %s failed", _where(request), exc_info=exc)
        return error_response(500, f"{type(exc).__name__}: {exc}", _where(request),
                              "see the rig host's log", "InfrastructureError")

    board_path = f"{API_PREFIX}/boards/{{board}}"
    routes = [
        Route(f"{API_PREFIX}/ping", ping, methods=["GET"]),
        Route(f"{API_PREFIX}/openapi.json", openapi, methods=["GET"]),
        Route(f"{API_PREFIX}/boards", boards, methods=["GET"]),
        Route(f"{API_PREFIX}/images/{{sha256}}", has_image, methods=["HEAD"]),
        Route(f"{API_PREFIX}/images/{{sha256}}", put_image, methods=["PUT"]),
        Route(f"{board_path}/flash", flash, methods=["POST"]),
        Route(f"{board_path}/power", power, methods=["POST"]),
        Route(f"{board_path}/reset", reset, methods=["POST"]),
        Route(f"{board_path}/attach", attach, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={
        ApiError: on_api_error, HilfarmError: on_hilfarm_error, HTTPException: on_http_error,
        Exception: on_bug})
    return Authenticator(
        app, token=host.config.token, service=f"rig host {host.config.host_name} control API",
        hint="send 'Authorization: Bearer <token>' with the shared token of this rig host "
        "(the file given to `hilfarm export --token-file`)")
