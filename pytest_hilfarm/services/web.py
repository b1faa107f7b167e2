"""What the rig host and the dashboard share as web services: serving, authentication, errors.

:class:`WebServer` runs an ASGI app on uvicorn in a background thread on a socket bound before
it starts (so a port in use is a :class:`ConfigError` at once, and port 0 reports the port it
got); :class:`Authenticator` is the ASGI middleware that refuses every request without the
shared token (``Authorization: Bearer``; for browsers, HTTP Basic with the token as password)
when a token is configured, TLS client certificates having been verified in the handshake;
:func:`error_response` is the project's error shape ``{"error", "where", "hint", "kind"}``.

Must not: trust ``X-Forwarded-For`` (the rig host lets attached addresses open serial ports);
compare tokens in variable time; bind anywhere but the configured address; import pytest.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from starlette.responses import JSONResponse

from pytest_hilfarm.errors import ConfigError

log = logging.getLogger("pytest_hilfarm.web")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class TlsConfig:
    """HTTPS; with ``client_ca``, clients need a certificate it signed (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def server_context(self) -> ssl.SSLContext:
        """The server's context, loaded now so that a bad file is a ConfigError at start."""
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

    def uvicorn_options(self) -> dict[str, Any]:
        """The same settings in uvicorn's words (it builds its context from them)."""
        options: dict[str, Any] = {"ssl_certfile": str(self.cert), "ssl_keyfile": str(self.key)}
        if self.client_ca is not None:
            options.update(ssl_ca_certs=str(self.client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
        return options


def tls_from_args(args: Any, command: str) -> TlsConfig | None:
    """``--tls-cert``/``--tls-key``/``--tls-client-ca`` of ``hilfarm export`` or ``serve``."""
    if not (args.tls_cert or args.tls_key):
        return None
    if not (args.tls_cert and args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together", where=command,
                          hint="pass both PEM files, or neither for plain HTTP")
    return TlsConfig(Path(args.tls_cert), Path(args.tls_key),
                     Path(args.tls_client_ca) if args.tls_client_ca else None)


def error_body(what: str, where: str, hint: str, kind: str = "UsageError") -> dict[str, str]:
    return {"error": what, "where": where, "hint": hint, "kind": kind}


def error_response(status: int, what: str, where: str, hint: str, kind: str = "UsageError",
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The project's error shape; ``kind`` is the error class a client re-raises."""
    return JSONResponse(error_body(what, where, hint, kind), status_code=status, headers=headers)


class Authenticator:
    """ASGI middleware: every request needs the token (when one is configured).

    ``basic`` also accepts HTTP Basic with any user name and the token as password, the one
    credential a browser asks a person for by itself. Without a token the server relies on TLS
    client certificates (verified before a request reaches this) or, for the read-only
    dashboard on a loopback address, on nobody else reaching it.
    """

    def __init__(self, app: ASGIApp, *, token: str | None, service: str,
                 hint: str, basic: bool = False) -> None:
        self.app = app
        self.token = token.encode() if token is not None else None
        self.service = service
        self.hint = hint
        self.basic = basic

    def _ok(self, header: str) -> bool:
        assert self.token is not None
        scheme, _, value = header.partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer":
            given = value.strip().encode()
        elif scheme == "basic" and self.basic:
            try:
                decoded = base64.b64decode(value.strip(), validate=True)
            except (binascii.Error, ValueError):
                return False
            given = decoded.partition(b":")[2]
        else:
            return False
        return hmac.compare_digest(given, self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.token is None:
            await self.app(scope, receive, send)
            return
        header = ""
        for key, value in scope.get("headers", ()):
            if key == b"authorization":
                header = value.decode("latin-1")
                break
        if self._ok(header):
            await self.app(scope, receive, send)
            return
        challenge = 'Bearer realm="hilfarm"'
        if self.basic:
            challenge = 'Basic realm="hilfarm", charset="UTF-8"'
        response = error_response(
            401, f"missing or wrong token: {self.service} needs authentication",
            f"{self.service} {scope.get('method', '')} {scope.get('path', '')}", self.hint,
            "ConfigError", headers={"WWW-Authenticate": challenge})
        await response(scope, receive, send)


def split_listen(value: str, option: str = "--listen") -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as a pair, or a ConfigError naming the option."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{option} {value!r} is not HOST:PORT", where=option,
                          hint=f"e.g. {option} 127.0.0.1:7410 or {option} 10.0.0.5:7410")
    return host.strip("[]") or "127.0.0.1", int(port)


def bind(host: str, port: int, *, option: str = "--listen") -> socket.socket:
    """A listening socket on ``host:port`` (0: a free port), or a ConfigError naming the option."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}",
            where=option, hint="pick a free port and an address of this machine",
        ) from exc
    return sock


class WebServer:
    """An ASGI app on uvicorn in a daemon thread, on a socket bound by :func:`bind`."""

    def __init__(self, app: ASGIApp, sock: socket.socket, *, tls: TlsConfig | None = None,
                 name: str = "web") -> None:
        import uvicorn

        if tls is not None:
            tls.server_context()  # a bad certificate or key is refused here, not in the thread
        self.sock = sock
        self.tls = tls
        self.name = name
        # proxy_headers off: the client address is the peer's, never a header's claim.
        config = uvicorn.Config(
            app, lifespan="off", log_config=None, access_log=False, proxy_headers=False,
            server_header=False, timeout_graceful_shutdown=2,
            **(tls.uvicorn_options() if tls is not None else {}))
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def start(self, timeout: float = 10.0) -> None:
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        daemon=True, name=f"{self.name}-http")
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"the {self.name} web server did not start",
                                  where=f"port {self.port}",
                                  hint="see the log above for uvicorn's reason")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(5)
        try:
            self.sock.close()
        except OSError:
            pass


_S = TypeVar("_S", bound="ForegroundService")


class ForegroundService:
    """A service run in the foreground (`hilfarm serve`, `hilfarm export`): start it, wait until
    :meth:`request_stop` (a signal handler calls it), stop it. Subclasses set ``self._stop`` and
    implement ``start`` and ``stop``.
    """

    _stop: threading.Event

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def request_stop(self) -> None:
        self._stop.set()

    def serve_forever(self: _S, ready: Callable[[_S], None] | None = None) -> None:
        self.start()
        if ready is not None:
            ready(self)
        try:
            while not self._stop.wait(0.5):
                pass
        finally:
            self.stop()
