"""The rig host's lifecycle: start the exporters and the API, register in the farm database.

:class:`RigHost` binds the configured address, serves every board of its rack, registers the
host and its boards (heartbeat row plus a session advisory lock, so the host shows offline the
moment its process dies), and stops cleanly. It locks no boards for tests: the farm's
reservation does that.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from pytest_hilfarm.description.rack import load_rack
from pytest_hilfarm.drivers.flashing import FlashPlan, FlashReport, Region
from pytest_hilfarm.errors import (
    ConfigError,
    ImageError,
    UsageError,
)
from pytest_hilfarm.services.righost.api import ImageCache, build_app
from pytest_hilfarm.services.righost.boards import (
    LeaseNotHeld,
    LocalBoard,
    local_boards,
)
from pytest_hilfarm.services.righost.config import (
    NS_HOST,
    RigHostConfig,
)
from pytest_hilfarm.services.righost.exporter import SerialExporter
from pytest_hilfarm.services.web import ForegroundService, WebServer, bind

log = logging.getLogger("pytest_hilfarm.righost")

class RigHost(ForegroundService):
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
        self._http: WebServer | None = None
        self._store: Any = None

    # -- life cycle -------------------------------------------------------------------------

    @property
    def control_url(self) -> str:
        scheme = "https" if self.config.tls else "http"
        assert self._http is not None
        return f"{scheme}://{self.config.public_host}:{self._http.port}"

    def start(self) -> None:
        from pytest_hilfarm.store.postgresql import PgFarmStore

        for index, board in enumerate(self.boards.values()):
            port = self.config.serial_base_port + index if self.config.serial_base_port else 0
            exporter = SerialExporter(board, self.config.listen_host, port,
                                      open_serial=self.config.open_serial)
            board.served_url = f"rfc2217://{self.config.public_host}:{exporter.port}"
            self._exporters.append(exporter)
        http = WebServer(build_app(self), bind(self.config.listen_host, self.config.listen_port),
                         tls=self.config.tls, name="righost")
        self._http = http
        self._store = PgFarmStore(self.config.database_url)
        self._register()
        for exporter in self._exporters:
            exporter.start()
        http.start()
        self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, daemon=True,
                                                  name="righost-heartbeat")
        self._heartbeat_thread.start()

    def _register(self) -> None:
        """Take the host's liveness lock, then (re-)register the host and its boards."""
        from pytest_hilfarm.store.postgresql import connect

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
            self._http.stop()
        for exporter in self._exporters:
            exporter.stop()

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
