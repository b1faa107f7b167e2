"""Client of a rig host's control API: remote flash (upload path), power and reset.

Job: let the farm on any host use boards of another host: :class:`RigClient` uploads each image
region once (content-addressed: a ``HEAD`` first, so an image the rig host already caches is not
sent again), asks the rig host to run esptool locally and returns its :class:`FlashReport`;
:class:`RemotePower` and :class:`RemoteReset` fit the farm's ``PowerDriver`` / ``ResetDriver``
seams, and :func:`remote_flasher` has the signature of
:func:`pytest_hilfarm.drivers.flashing.flash`, so a ``Device`` can use it as its flasher unchanged.
Errors the rig host reports come back as the same error classes (FlashError, PortError, UsageError,
...), with the rig host named in ``where``.

Must not: send the token anywhere but the configured rig host; retry a flash on its own (the
farm decides about retries and health); import pytest.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from pytest_hilfarm import errors
from pytest_hilfarm.drivers.flashing import FlashPlan, FlashReport, RegionResult, make_plan
from pytest_hilfarm.errors import ConfigError, HilfarmError, InfrastructureError

TOKEN_ENV = "HILFARM_RIG_TOKEN"
# A 16 MB image at ROM baud takes minutes; the rig host answers when esptool is done.
DEFAULT_TIMEOUT = 600.0


def read_token(path: Path | str) -> str:
    """The shared token from a file (first line, stripped), with an error naming the file."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip().splitlines()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the token file: {exc.strerror or exc}",
            where=str(path),
            hint="create it with a long random secret, e.g. "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE; chmod 600 FILE`",
        ) from exc
    if not token or len(token[0].strip()) < 16:
        raise ConfigError(
            "the token file is empty or its token is shorter than 16 characters",
            where=str(path),
            hint="put one long random secret on the first line (secrets.token_urlsafe(32))",
        )
    return token[0].strip()


def token_from(path: Path | str | None = None, environ: Mapping[str, str] | None = None
               ) -> str | None:
    """The shared token: from ``path`` if given, else ``HILFARM_RIG_TOKEN``, else None."""
    if path is not None:
        return read_token(path)
    env = os.environ if environ is None else environ
    return env.get(TOKEN_ENV) or None


def report_from_json(data: Mapping[str, Any]) -> FlashReport:
    regions = tuple(
        RegionResult(int(r["offset"]), int(r["size"]), str(r["sha256"]), str(r["name"]),
                     bool(r["written"]), float(r["seconds"]))
        for r in data["regions"]
    )
    return FlashReport(str(data["port"]), str(data["chip"]), regions, float(data["seconds"]),
                       int(data["baud"]))


class RigClient:
    """One rig host's control API (``http(s)://host:port``); thread-safe (a connection per call)."""

    def __init__(self, base_url: str, token: str | None = None, *,
                 ssl_context: ssl.SSLContext | None = None,
                 timeout: float = DEFAULT_TIMEOUT, lease: str | None = None) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"not a rig host control URL: {base_url!r}",
                where="rig host URL",
                hint="use http://HOST:PORT or https://HOST:PORT (as `hilfarm export` prints)",
            )
        self.base_url = base_url.rstrip("/")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.https = parts.scheme == "https"
        self.token = token
        self.ssl_context = ssl_context
        self.timeout = timeout
        # Sent with every board request: the rig host refuses if this lease no longer holds
        # the board (lost connection, re-granted), so a stale client cannot touch it.
        self.lease = lease

    def __repr__(self) -> str:
        return f"RigClient({self.base_url!r})"

    # -- transport ------------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        if self.https:
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                               context=self.ssl_context)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def request(self, method: str, path: str, body: bytes | Mapping[str, Any] | None = None,
                ) -> tuple[int, Any]:
        """One call; returns (status, decoded JSON or None). Raises on errors the host reports."""
        headers = {}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        data: bytes | None
        if isinstance(body, bytes):
            data = body
            headers["Content-Type"] = "application/octet-stream"
        elif body is not None:
            if self.lease is not None and path.startswith("/v1/boards/"):
                body = {**body, "lease_id": self.lease}
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        else:
            data = None
        where = f"rig host {self.base_url}, {method} {path}"
        conn = self._connection()
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise InfrastructureError(
                f"cannot reach the rig host: {exc}",
                where=where,
                hint="check that `hilfarm export` runs there and that this host can reach its "
                "--listen address (firewall, TLS settings)",
            ) from exc
        finally:
            conn.close()
        payload = json.loads(raw) if raw else None
        if response.status < 400:
            return response.status, payload
        if method == "HEAD" and response.status == 404:
            return response.status, None
        self._raise(response.status, payload, where)
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _raise(status: int, payload: Any, where: str) -> None:
        info = payload if isinstance(payload, dict) else {}
        what = str(info.get("error") or f"HTTP {status}")
        hint = str(info.get("hint") or "see the rig host's log")
        remote_where = str(info.get("where") or "")
        full_where = f"{where} ({remote_where})" if remote_where else where
        if status == 401:
            # HEAD answers carry no body: say it here in the rig host's words.
            raise ConfigError(
                str(info.get("error") or "missing or wrong token: the rig host refused it"),
                where=full_where,
                hint=str(info.get("hint") or "send 'Authorization: Bearer <token>' with the "
                         f"rig host's shared token (set {TOKEN_ENV} or pass token=)"),
            )
        kind = getattr(errors, str(info.get("kind") or ""), None)
        if not (isinstance(kind, type) and issubclass(kind, HilfarmError)):
            kind = InfrastructureError if status >= 500 else errors.UsageError
        raise kind(what, where=full_where, hint=hint)

    # -- API ----------------------------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        return dict(self.request("GET", "/v1/ping")[1])

    def boards(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/v1/boards")[1]["boards"])

    def has_image(self, digest: str) -> bool:
        return self.request("HEAD", f"/v1/images/{digest}")[0] == 200

    def upload(self, data: bytes) -> tuple[str, bool]:
        """Make ``data`` available on the rig host; returns (sha256, whether bytes were sent)."""
        digest = hashlib.sha256(data).hexdigest()
        if self.has_image(digest):
            return digest, False
        self.request("PUT", f"/v1/images/{digest}", data)
        return digest, True

    def flash(self, board: str, plan: FlashPlan | Path | str | bytes | Sequence[Any], *,
              baud: int | None = None, skip_identical: bool = True,
              boot: bool = True) -> FlashReport:
        """Flash ``plan`` onto ``board`` through the rig host's local esptool (fast path)."""
        plan = make_plan(plan)
        regions = []
        for region in plan.regions:
            digest, _ = self.upload(region.data)
            regions.append({"offset": region.offset, "sha256": digest, "name": region.name})
        body = {"regions": regions, "flash_mode": plan.flash_mode,
                "flash_size": plan.flash_size, "flash_freq": plan.flash_freq,
                "baud": baud, "skip_identical": skip_identical, "boot": boot}
        return report_from_json(self.request("POST", f"/v1/boards/{board}/flash", body)[1])

    def attach(self, board: str, seconds: float = 60.0) -> str:
        """Allow this host's address to open ``board``'s RFC 2217 port; returns its URL.

        RFC 2217 has no authentication, so the rig host only accepts connections from
        addresses that attached through this authenticated call within ``seconds``.
        """
        return str(self.request("POST", f"/v1/boards/{board}/attach",
                                {"seconds": seconds})[1]["rfc2217"])

    def power(self, board: str, on: bool) -> None:
        self.request("POST", f"/v1/boards/{board}/power", {"on": on})

    def cycle(self, board: str, off_seconds: float = 1.0) -> None:
        self.request("POST", f"/v1/boards/{board}/power", {"cycle": off_seconds})

    def reset(self, board: str, boot: str = "flash") -> None:
        self.request("POST", f"/v1/boards/{board}/reset", {"boot": boot})


@dataclass(frozen=True)
class RemotePower:
    """A board's power on another host (the farm's PowerDriver protocol)."""

    client: RigClient
    board: str

    def on(self) -> None:
        self.client.power(self.board, True)

    def off(self) -> None:
        self.client.power(self.board, False)

    def cycle(self, off_seconds: float = 1.0) -> None:
        self.client.cycle(self.board, off_seconds)


@dataclass(frozen=True)
class RemoteReset:
    """EN/IO0 of a board on another host through its control API (the ResetDriver protocol).

    ``esptool_before`` stays ``no-reset``: esptool over the board's RFC 2217 URL is put into
    download mode by :meth:`reset_to_download` first, one round trip instead of ~50 ms per line
    change.
    """

    client: RigClient
    board: str
    esptool_before: str = "no-reset"

    def reset_to_app(self) -> None:
        self.client.reset(self.board, "flash")

    def reset_to_download(self) -> None:
        self.client.reset(self.board, "download")


class BoardDirectory(Protocol):
    """Where boards live (PgFarmStore fits): registered boards and their hosts."""

    def registered_boards(self) -> Mapping[str, Any]: ...
    def hosts(self) -> Mapping[str, Any]: ...


def client_for_board(directory: BoardDirectory, board: str, token: str | None = None, *,
                     ssl_context: ssl.SSLContext | None = None,
                     lease: str | None = None) -> RigClient:
    """The control API client of the rig host that exports ``board`` (token: HILFARM_RIG_TOKEN)."""
    record = directory.registered_boards().get(board)
    if record is None or not record.host:
        raise ConfigError(
            f"no rig host exports board {board!r}",
            where="farm database",
            hint="start `hilfarm export` on the host the board is plugged into, or check the id "
            "with `hilfarm status`",
        )
    host = directory.hosts().get(record.host)
    if host is None or not host.online:
        raise InfrastructureError(
            f"rig host {record.host} of board {board} is offline",
            where="farm database",
            hint=f"start `hilfarm export` again on {record.host}",
        )
    return RigClient(host.control_url, token if token is not None else token_from(),
                     ssl_context=ssl_context, lease=lease)


def remote_flasher(client: RigClient, board: str) -> Callable[..., FlashReport]:
    """A flasher with :func:`pytest_hilfarm.drivers.flashing.flash`'s signature that uses the upload
    path.

    The port argument is ignored (the rig host flashes its local port); ``after="no-reset"`` from
    the caller means "do not boot", as with local esptool.
    """

    def flasher(port: str, chip: str, plan: Any, **kwargs: Any) -> FlashReport:
        return client.flash(
            board, plan, baud=kwargs.get("baud"),
            skip_identical=bool(kwargs.get("skip_identical", True)),
            boot=kwargs.get("after", "hard-reset") != "no-reset",
        )

    return flasher
