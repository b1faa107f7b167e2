"""The farm dashboard (``hilfarm serve``): a live, read-only web view of the farm.

Pages: ``/`` (every board with host, chip, health and since when, holder, a 7-day health
timeline; the waiting queue; quarantined boards with their last failed check's log; the health
checks of the week), ``/boards/<id>`` (one board's timeline, events and leases), ``/report`` (the
nightly report, ``?since=7d``) and ``/api/status.json`` (the same snapshot as JSON). The farm is
read in Starlette's thread pool, once per request.

Must not: change the farm (no page reserves, flashes, restores or writes the store); listen on a
non-loopback address without authentication unless told ``--anonymous``; import pytest.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_hilfarm.description.quarantine import Quarantine
from pytest_hilfarm.errors import ConfigError, HilfarmError
from pytest_hilfarm.services.web import (
    LOOPBACK,
    Authenticator,
    ForegroundService,
    TlsConfig,
    WebServer,
    bind,
    error_response,
    split_listen,
    tls_from_args,
)


@dataclass(frozen=True)
class DashboardConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 7420
    token: str | None = None
    tls: TlsConfig | None = None
    anonymous: bool = False  # serve a non-loopback address without authentication
    refresh: float = 1.0  # seconds between the live views' updates

    def check(self) -> None:
        authenticated = self.token is not None or (self.tls is not None
                                                   and self.tls.client_ca is not None)
        if self.listen_host not in LOOPBACK and not authenticated and not self.anonymous:
            raise ConfigError(
                f"refusing to show the farm on {self.listen_host} without authentication",
                where="hilfarm serve --listen",
                hint="pass --token-file FILE (browsers ask for it as the password), or "
                "--tls-cert/--tls-key with --tls-client-ca, or --anonymous on a trusted network",
            )
        if not 0.1 <= self.refresh <= 3600:
            raise ConfigError(f"--refresh {self.refresh} is out of range", where="--refresh",
                              hint="give seconds between 0.1 and 3600, e.g. --refresh 1")


def dashboard_config(args: Any) -> DashboardConfig:
    """The dashboard's settings from ``hilfarm serve``'s arguments (checked)."""
    from pytest_hilfarm.drivers.rigclient import read_token

    host, port = split_listen(args.listen)
    tls = tls_from_args(args, "hilfarm serve")
    config = DashboardConfig(host, port, read_token(args.token_file) if args.token_file else None,
                             tls, bool(args.anonymous), float(args.refresh))
    config.check()
    return config


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "items"):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "value") and not isinstance(value, (int, float, str)):
        return value.value  # enums
    return value


def build_app(farm: Any, config: DashboardConfig, quarantine: Quarantine | None = None) -> Any:
    """The dashboard as an ASGI app (Starlette behind the optional token check)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    from pytest_hilfarm.services.dashboard import state, views
    from pytest_hilfarm.services.report import from_store, parse_since
    from pytest_hilfarm.services.report.render import body as report_body

    title = f"hilfarm: {farm.rack.name}"

    def page(request: Request, name: str, live: str) -> Response:
        if request.query_params.get("fragment"):
            return HTMLResponse(live, headers={"Cache-Control": "no-store"})
        return HTMLResponse(views.frame(name, live, refresh=config.refresh),
                            headers={"Cache-Control": "no-store"})

    async def overview(request: Request) -> Response:
        snap = await run_in_threadpool(state.snapshot, farm)
        return page(request, title, views.overview(snap))

    async def board(request: Request) -> Response:
        board_id = request.path_params["board"]

        def read() -> tuple[Any, list[Any], list[Any]]:
            snap = state.snapshot(farm)
            if board_id not in {r.board for r in snap.boards}:
                return snap, [], []
            return snap, farm.store.health_history(board_id, 100), \
                farm.store.history(board_id, 30)

        snap, events, leases = await run_in_threadpool(read)
        if board_id not in {r.board for r in snap.boards}:
            return error_response(404, f"no board {board_id!r} in this farm",
                                  f"GET {request.url.path}",
                                  "boards: " + ", ".join(r.board for r in snap.boards))
        return page(request, f"{title}: {board_id}",
                    views.board_page(snap, board_id, events, leases))

    async def report(request: Request) -> Response:
        now = time.time()
        since_text = request.query_params.get("since", "7d")
        try:
            since = parse_since(since_text, now)
        except HilfarmError as exc:
            return error_response(400, exc.what, f"GET {request.url.path}", exc.hint or "")
        result = await run_in_threadpool(from_store, farm.store, since=since, until=now + 1,
                                         quarantine=quarantine)
        html = views.frame(f"{title}: report since {since_text}", report_body(result),
                           refresh=None)
        return HTMLResponse(html)

    async def status_json(request: Request) -> Response:
        snap = await run_in_threadpool(state.snapshot, farm)
        return JSONResponse(_jsonable(snap))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error_response(exc.status_code, f"no page {request.method} {request.url.path}",
                              f"{request.method} {request.url.path}",
                              "pages: /, /boards/<id>, /report, /api/status.json",
                              headers=dict(exc.headers or {}))

    app = Starlette(routes=[
        Route("/", overview, methods=["GET"]),
        Route("/boards/{board}", board, methods=["GET"]),
        Route("/report", report, methods=["GET"]),
        Route("/api/status.json", status_json, methods=["GET"]),
    ], exception_handlers={HTTPException: on_http_error})
    return Authenticator(app, token=config.token, service="hilfarm dashboard", basic=True,
                         hint="log in with the token of `hilfarm serve --token-file` as the "
                         "password (any user name), or send 'Authorization: Bearer <token>'")


class Dashboard(ForegroundService):
    """The running dashboard: a :class:`WebServer` around :func:`build_app`."""

    def __init__(self, farm: Any, config: DashboardConfig,
                 quarantine: Quarantine | None = None) -> None:
        config.check()
        self.farm = farm
        self.config = config
        self._server = WebServer(build_app(farm, config, quarantine),
                                 bind(config.listen_host, config.listen_port), tls=config.tls,
                                 name="dashboard")
        self._stop = threading.Event()

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls else "http"
        host = self.config.listen_host
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{self._server.port}"

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop()

