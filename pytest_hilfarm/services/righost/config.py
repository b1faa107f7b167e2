"""The rig host's configuration: where it listens, its token, TLS, its rack and database.

Built once from the command line and the environment (:func:`config_from_args`) into a frozen
:class:`RigHostConfig`; every error names the option or variable at fault. Nothing here listens
or connects.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_hilfarm.drivers.rigclient import read_token
from pytest_hilfarm.errors import (
    ConfigError,
)
from pytest_hilfarm.services.web import TlsConfig, split_listen, tls_from_args

API_PREFIX = "/v1"
# Images above this are refused before any byte is stored (the largest ESP32 flash is 16 MB).
MAX_IMAGE_BYTES = 32 * 1024 * 1024
# How long an attach lets its address open a board's RFC 2217 port (a session, once open, lasts).
ATTACH_WINDOW_S = 60.0
# store.postgresql_schema.NS_HOST, repeated so this module imports psycopg lazily
NS_HOST = 0x48494C48



# -- configuration ---------------------------------------------------------------------------


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



def config_from_args(args: Any, environ: Mapping[str, str] | None = None) -> RigHostConfig:
    env = os.environ if environ is None else environ
    database = args.database or env.get("HILFARM_DATABASE_URL", "")
    if not database:
        raise ConfigError("no farm database given", where="hilfarm export",
                          hint="pass --database postgresql://USER@HOST/DB or set "
                          "HILFARM_DATABASE_URL")
    host, port = split_listen(args.listen)
    tls = tls_from_args(args, "hilfarm export")
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
