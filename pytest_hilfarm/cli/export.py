"""``hilfarm export``: run the rig host service for one rack in the foreground.

Job: parse the command line into a :class:`~pytest_hilfarm.services.righost.RigHostConfig`, start
the service, print where it serves each board, and stop it cleanly (host marked offline at once) on
Ctrl-C or SIGTERM. Must not: start without authentication, or daemonise (run it under systemd or a
CI service wrapper, which restarts it and collects its log).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from typing import Any

from pytest_hilfarm.cli.common import example, exit_code_for
from pytest_hilfarm.errors import HilfarmError


def register(subparsers: Any) -> None:
    """Add the ``export`` command to the ``hilfarm`` parser."""
    p = subparsers.add_parser(
        "export",
        help="serve this host's boards to the farm (rig host service)",
        description="Register the rack's boards in the farm database, serve their serial ports "
        "over RFC 2217 and an authenticated control API (power, reset, fast flash).",
        epilog=example("hilfarm export --rack rig-a.yaml --listen 10.0.0.5:7410 "
                       "--token-file /etc/hilfarm/token --database postgresql://farm@db/hilfarm"),
    )
    p.add_argument("--rack", required=True, help="rack YAML file of the boards on this host")
    p.add_argument("--listen", default="127.0.0.1:7410", metavar="HOST:PORT",
                   help="HOST:PORT of the control API; serial ports bind to the same HOST "
                   "(default: %(default)s; use this machine's LAN address to serve others)")
    p.add_argument("--database", default="",
                   help="farm database URL (default: HILFARM_DATABASE_URL)")
    p.add_argument("--token-file", help="file holding the shared client token")
    p.add_argument("--tls-cert", help="PEM certificate for HTTPS")
    p.add_argument("--tls-key", help="PEM private key for HTTPS")
    p.add_argument("--tls-client-ca", help="PEM CA bundle: require client certificates it signed")
    p.add_argument("--host-name", default="", help="name in the farm (default: the hostname)")
    p.add_argument("--advertise", default=None,
                   help="host name clients use to reach this machine (default: the --listen "
                   "address, or the FQDN when listening on 0.0.0.0)")
    p.add_argument("--serial-base-port", type=int, default=0,
                   help="board i's RFC 2217 port is BASE+i (default: free ports)")
    p.add_argument("--heartbeat", type=float, default=2.0, help="seconds between heartbeats")
    p.add_argument("--offline-after", type=float, default=10.0,
                   help="seconds without a heartbeat after which this host counts as offline")
    p.add_argument("--cache-dir", default=None,
                   help="uploaded image cache (default: the rack's state_dir/righost-images)")
    p.add_argument("--open-serial", action="store_true",
                   help="let anyone who reaches the RFC 2217 ports use them without first "
                   "attaching through the authenticated API (trusted networks only)")
    p.add_argument("--require-lease", action="store_true",
                   help="power, reset, flash and attach only for clients naming a lease that "
                   "holds the board (a lease id is always checked when one is sent)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pytest_hilfarm.services.righost import RigHost, config_from_args, describe

    host = RigHost(config_from_args(args))

    def on_signal(signum: int, frame: Any) -> None:
        host.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host.serve_forever(ready=lambda h: print(describe(h), flush=True))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pytest_hilfarm.cli.export ...`` (same as ``hilfarm export ...``)."""
    parser = argparse.ArgumentParser(prog="hilfarm")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.handler(args) or 0)
    except HilfarmError as exc:
        print(f"hilfarm: error: {exc}", file=sys.stderr)
        return exit_code_for(exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
