"""An HTTP server on 127.0.0.1 that serves OTA images and manifests to boards, with faults.

Its job: give a test (or a bench) a local update server that virtual boards download from, with
the faults an OTA client must survive: a connection dropped after N bytes, a slow link, a 404,
and a log of every request (with its ``Range``). It supports ``Range: bytes=N-`` / ``N-M``
(206 + ``Content-Range``), which is what a resuming client sends.

It must not listen on anything but 127.0.0.1 (an ephemeral port by default), never follows or
proxies other URLs, and every thread it starts stops with :meth:`OtaServer.stop`. It does not
sign or verify images (that is :mod:`pytest_hilfarm.ota.signing`).
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from pytest_hilfarm.errors import UsageError

HOST = "127.0.0.1"
# Bytes written per send: small enough that "drop after N" and "slow" act at a fine grain.
SEND_CHUNK = 4096
# A client that stops reading (a board powered off mid-download) must not hold a server
# thread forever.
CLIENT_TIMEOUT = 30.0
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


@dataclass(frozen=True)
class Faults:
    """Faults for one published file (all off by default).

    ``drop_after``: close the connection after sending this many body bytes (``drop_times``
    times; then serve normally). ``bytes_per_s``: pace the body. ``status``: answer with this
    HTTP status and no body (404, 500...). ``ignore_range``: answer a Range request with the
    whole file (200), as a server without Range support does.
    """

    drop_after: int | None = None
    drop_times: int = 1
    bytes_per_s: float | None = None
    status: int | None = None
    ignore_range: bool = False


@dataclass(frozen=True)
class RequestRecord:
    """One request the server answered (or dropped)."""

    time: float  # time.monotonic() when it arrived
    method: str
    path: str
    name: str | None  # the published name it asked for, None if unknown
    range: str | None  # the Range header as sent
    status: int
    bytes_sent: int  # body bytes actually written
    dropped: bool  # the connection was closed on purpose before the body ended
    client: str


@dataclass
class _Entry:
    data: bytes
    content_type: str
    faults: Faults = field(default_factory=Faults)
    drops_done: int = 0


class OtaServer:
    """A threaded HTTP server for OTA images and manifests (start/stop, or use ``with``).

    ``publish(name, data)`` returns the URL a board downloads from. Faults are per name and can
    change while the server runs; ``requests`` is the log so far.
    """

    def __init__(self, port: int = 0) -> None:
        self._port = port
        self._lock = threading.Lock()
        self._files: dict[str, _Entry] = {}
        self._log: list[RequestRecord] = []
        self._logged = threading.Condition(self._lock)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> OtaServer:
        if self._httpd is not None:
            return self
        handler = _make_handler(self)
        try:
            httpd = ThreadingHTTPServer((HOST, self._port), handler)
        except OSError as exc:
            raise UsageError(f"cannot listen on {HOST}:{self._port}: {exc.strerror}",
                             where="OTA server", hint="use port 0 (any free port)") from exc
        httpd.daemon_threads = True
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="ota-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> OtaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        if self._httpd is None:
            raise UsageError("the OTA server is not running", where="OTA server",
                             hint="call start() first (or use it as a context manager)")
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def base_url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    # -- content

    def publish(self, name: str, content: bytes | str | Path | Mapping[str, Any], *,
                content_type: str | None = None) -> str:
        """Serve ``content`` (bytes, a file path, or a mapping served as JSON) at ``/name``.

        Returns its URL. Publishing a name again replaces the content and clears its faults.
        """
        _check_name(name)
        if isinstance(content, Mapping):
            data = json.dumps(content, indent=2).encode()
            ctype = content_type or "application/json"
        elif isinstance(content, (str, Path)):
            path = Path(content)
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise UsageError(f"cannot read {path}: {exc.strerror}", where="OTA server",
                                 hint="publish an existing file, or bytes") from None
            ctype = content_type or ("application/json" if path.suffix == ".json"
                                     else "application/octet-stream")
        else:
            data = bytes(content)
            ctype = content_type or "application/octet-stream"
        with self._lock:
            self._files[name] = _Entry(data, ctype)
        return self.url_for(name)

    def url_for(self, name: str) -> str:
        """The URL of a name (published or not: a test may want the 404)."""
        _check_name(name)
        return f"{self.base_url}/{quote(name)}"

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._files)

    # -- faults

    def set_faults(self, name: str, **faults: Any) -> Faults:
        """Replace fields of a published name's :class:`Faults` (see there)."""
        with self._lock:
            entry = self._entry(name)
            entry.faults = replace(entry.faults, **faults)
            entry.drops_done = 0
            return entry.faults

    def drop_after(self, name: str, n: int, *, times: int = 1) -> None:
        """Close the connection after ``n`` body bytes, for the next ``times`` downloads."""
        if n < 0 or times < 1:
            raise UsageError(f"drop_after needs n >= 0 and times >= 1, got {n}, {times}",
                             where="OTA server")
        self.set_faults(name, drop_after=n, drop_times=times)

    def slow(self, name: str, bytes_per_s: float | None) -> None:
        """Pace the body of ``name`` (None: full speed)."""
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise UsageError(f"bytes_per_s must be > 0, got {bytes_per_s}", where="OTA server")
        self.set_faults(name, bytes_per_s=bytes_per_s)

    def fail(self, name: str, status: int | None = 404) -> None:
        """Answer requests for ``name`` with ``status`` (None: serve it again)."""
        self.set_faults(name, status=status)

    def clear_faults(self, name: str) -> None:
        with self._lock:
            self._entry(name).faults = Faults()

    # -- log

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request answered so far, in the order they finished (a copy).

        A request is logged once its response is over, which can be a moment after the client
        has read the last byte: use :meth:`wait_requests` to wait for it.
        """
        with self._lock:
            return list(self._log)

    def wait_requests(self, count: int, *, name: str | None = None,
                      timeout: float = 5.0) -> list[RequestRecord]:
        """Wait until ``count`` requests (for ``name``, if given) are logged; return them all."""
        def matching() -> list[RequestRecord]:
            return [r for r in self._log if name is None or r.name == name]

        with self._logged:
            self._logged.wait_for(lambda: len(matching()) >= count, timeout)
            found = matching()
        if len(found) < count:
            raise UsageError(f"{len(found)} of {count} expected requests arrived within "
                             f"{timeout:g} s", where="OTA server",
                             hint="check the client's URL and the server's request log")
        return found

    def requests_for(self, name: str) -> list[RequestRecord]:
        return [r for r in self.requests if r.name == name]

    def bytes_served(self, name: str) -> int:
        return sum(r.bytes_sent for r in self.requests_for(name))

    # -- internals (handler side)

    def _entry(self, name: str) -> _Entry:
        entry = self._files.get(name)
        if entry is None:
            raise UsageError(f"nothing is published as {name!r}", where="OTA server",
                             hint=f"publish it first; published: {', '.join(self._files) or '-'}")
        return entry

    def _lookup(self, name: str) -> tuple[_Entry | None, bool]:
        """(entry, drop this time?) and count the drop."""
        with self._lock:
            entry = self._files.get(name)
            if entry is None:
                return None, False
            drop = entry.faults.drop_after is not None and \
                entry.drops_done < entry.faults.drop_times
            if drop:
                entry.drops_done += 1
            return entry, drop

    def _record(self, record: RequestRecord) -> None:
        with self._logged:
            self._log.append(record)
            self._logged.notify_all()


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UsageError(f"{name!r} is not a plain file name", where="OTA server",
                         hint="use letters, digits, '.', '_', '-' (and '/' between parts)")


def _make_handler(server: OtaServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = CLIENT_TIMEOUT
        server_version = "hilfarm-ota/1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
            """Quiet: the request log is :attr:`OtaServer.requests`."""

        def do_HEAD(self) -> None:  # noqa: N802 - stdlib naming
            self._serve(body=False)

        def do_GET(self) -> None:  # noqa: N802 - stdlib naming
            self._serve(body=True)

        def _serve(self, *, body: bool) -> None:
            arrived = time.monotonic()
            name = unquote(urlsplit(self.path).path).lstrip("/")
            range_header = self.headers.get("Range")
            entry, drop = server._lookup(name)
            client = f"{self.client_address[0]}:{self.client_address[1]}"

            def record(status: int, sent: int = 0, dropped: bool = False) -> None:
                server._record(RequestRecord(arrived, self.command, self.path,
                                             name if entry is not None else None, range_header,
                                             status, sent, dropped, client))

            if entry is None or entry.faults.status is not None:
                status = entry.faults.status if entry is not None and entry.faults.status \
                    else HTTPStatus.NOT_FOUND
                self._plain(int(status), f"{name}: {HTTPStatus(status).phrase}\n".encode())
                record(int(status))
                return
            data = entry.data
            start, end = 0, len(data)
            status = HTTPStatus.OK
            if range_header and not entry.faults.ignore_range:
                span = _parse_range(range_header, len(data))
                if span is None:
                    self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    record(416)
                    return
                start, end = span
                status = HTTPStatus.PARTIAL_CONTENT
            self.send_response(status)
            self.send_header("Content-Type", entry.content_type)
            self.send_header("Content-Length", str(end - start))
            self.send_header("Accept-Ranges", "bytes")
            if status == HTTPStatus.PARTIAL_CONTENT:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.end_headers()
            if not body:
                record(int(status))
                return
            faults = entry.faults
            limit = faults.drop_after if drop and faults.drop_after is not None else None
            sent = 0
            began = time.monotonic()
            try:
                pos = start
                while pos < end:
                    n = min(SEND_CHUNK, end - pos)
                    if limit is not None:
                        n = min(n, limit - sent)
                        if n <= 0:
                            break
                    if faults.bytes_per_s:
                        # A chunk leaves once the link would have carried it.
                        delay = began + (sent + n) / faults.bytes_per_s - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
                    self.wfile.write(data[pos : pos + n])
                    pos += n
                    sent += n
                self.wfile.flush()
            except OSError:
                record(int(status), sent, dropped=False)
                self.close_connection = True
                return
            if limit is not None and pos < end:
                # The fault: the server goes away mid-body (the client sees a short read).
                record(int(status), sent, dropped=True)
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            record(int(status), sent)

        def _plain(self, status: int, text: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(text)

    return Handler


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One ``bytes=`` range as (start, end-exclusive); None if unsatisfiable or multi-range."""
    match = _RANGE.match(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if first == "" and last == "":
        return None
    if first == "":  # suffix range: the last N bytes
        n = int(last)
        return (max(0, size - n), size) if n > 0 else None
    start = int(first)
    end = size if last == "" else min(size, int(last) + 1)
    if start >= size or end <= start:
        return None
    return start, end
