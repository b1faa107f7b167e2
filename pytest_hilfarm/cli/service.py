"""``hilfarm report`` and ``hilfarm serve``: the farm's history as a report, and the dashboard.

``report`` reads a window of the farm store's history (SQLite or PostgreSQL, whichever the rack
names) and prints the nightly regression report, or writes it as HTML or JSON. ``serve`` runs the
read-only dashboard in the foreground until Ctrl-C or SIGTERM. Must not: change the farm (neither
command reserves, flashes or writes to the store), or daemonise (run ``serve`` under systemd).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pytest_hilfarm.cli.common import NEGATIVE, OK, example

QUARANTINE_ENV = "HILFARM_QUARANTINE"


def _rate(value: str) -> float:
    try:
        rate = float(value.rstrip("%")) / (100 if value.endswith("%") else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a rate (e.g. 0.05 or 5%)") from None
    if not 0 < rate < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not between 0 and 1 (or 0% and 100%)")
    return rate


def _quarantine(path: str | None) -> Any:
    from pytest_hilfarm.description.quarantine import Quarantine, load_quarantine

    chosen = path or os.environ.get(QUARANTINE_ENV) or None
    return load_quarantine(chosen) if chosen else Quarantine()


def _open_farm(rack: str | None) -> Any:
    from pytest_hilfarm.farm import Farm

    # Read-only: no virtual rack daemon is started and no board is touched.
    return Farm.open(rack or os.environ.get("HILFARM_RACK") or None, start_virtual=False)


def cmd_report(args: argparse.Namespace) -> int:
    from pytest_hilfarm.services.report import Thresholds, from_store, parse_since, to_json
    from pytest_hilfarm.services.report.render import page, text

    now = time.time()
    since = parse_since(args.since, now)
    quarantine = _quarantine(args.quarantine)
    thresholds = Thresholds(drift=args.drift, sick_infra_rate=args.sick_rate)
    with _open_farm(args.rack) as farm:
        report = from_store(farm.store, since=since, until=now + 1, quarantine=quarantine,
                            thresholds=thresholds)
    if args.html:
        Path(args.html).write_text(page(report), encoding="utf-8")
    if args.json:
        print(json.dumps(to_json(report), indent=2))
    elif not args.html:
        sys.stdout.write(text(report))
    else:
        print(f"report written to {args.html}: {len(report.flaky)} flaky, "
              f"{len(report.broken)} broken, {len(report.sick_boards)} sick boards, "
              f"{len(report.drifting)} drifting suites")
    flagged = ([t for t in report.broken if t.quarantine is None] or report.sick_boards
               or report.drifting)
    return NEGATIVE if args.check and flagged else OK


def cmd_serve(args: argparse.Namespace) -> int:
    from pytest_hilfarm.services.dashboard import Dashboard, dashboard_config

    config = dashboard_config(args)
    farm = _open_farm(args.rack)
    dashboard = Dashboard(farm, config, quarantine=_quarantine(args.quarantine))

    def on_signal(signum: int, frame: Any) -> None:
        dashboard.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    auth = "token" if config.token else "client certificates" if config.tls and \
        config.tls.client_ca else "no authentication"
    try:
        dashboard.serve_forever(ready=lambda d: print(
            f"hilfarm serve: dashboard of rack {farm.rack.name!r} at {d.url} ({auth}; "
            "read-only)", flush=True))
    finally:
        farm.close()
    return OK


def register(sub: Any) -> None:
    p = sub.add_parser(
        "report", help="nightly regression report: flaky tests, bisect hints, sick boards, drift",
        description="Read the farm's results, leases and health events of a window and report "
        "per test the pass rate, duration trend, flakiness (passed and failed on the same "
        "firmware) and the first failing firmware; per board the infrastructure-error rate; "
        "per suite the pass-rate trend against a drift threshold. Exit code 1 with --check "
        "when a test broke (and is not quarantined), a board is sick or a suite drifted.",
        epilog=example("hilfarm report --since 7d", "hilfarm report --since 7d --html report.html",
                       "hilfarm report --since 2026-05-01 --json | jq .flaky"))
    p.add_argument("--rack", metavar="RACK",
                   help="rack file (default: $HILFARM_RACK, else the built-in virtual rack)")
    p.add_argument("--since", default="7d", metavar="SPAN|DATE",
                   help="window start: 7d, 36h, 90m, 2w before now, or an ISO date "
                   "(default: %(default)s)")
    p.add_argument("--html", metavar="FILE", help="write the report as one HTML page")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quarantine", metavar="FILE",
                   help=f"quarantine list to show (default: ${QUARANTINE_ENV})")
    p.add_argument("--drift", type=_rate, default=0.05, metavar="RATE",
                   help="flag a suite whose pass rate fell this much (default: %(default)s)")
    p.add_argument("--sick-rate", type=_rate, default=0.10, metavar="RATE",
                   help="flag a board with this share of rig faults (default: %(default)s)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when a test broke, a board is sick or a suite drifted")
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser(
        "serve", help="the farm dashboard: boards, holders, queue, health, reports (read-only)",
        description="Serve a live, read-only web dashboard of the farm: every board with its "
        "host, chip, health and holder, the waiting queue, quarantined boards with their last "
        "failed check's log, health timelines, the health sweep's history and the nightly "
        "report. Listens on 127.0.0.1 unless told otherwise; another address needs a token "
        "or client certificates (or --anonymous on a trusted network).",
        epilog=example("hilfarm serve", "hilfarm serve --listen 10.0.0.5:7420 "
                       "--token-file /etc/hilfarm/token --rack /etc/hilfarm/rig-a.yaml"))
    p.add_argument("--rack", metavar="RACK",
                   help="rack file (default: $HILFARM_RACK, else the built-in virtual rack)")
    p.add_argument("--listen", default="127.0.0.1:7420", metavar="HOST:PORT",
                   help="address of the dashboard (default: %(default)s)")
    p.add_argument("--token-file", help="file holding the token; browsers send it as the "
                   "password of HTTP Basic authentication, scripts as a Bearer token")
    p.add_argument("--tls-cert", help="PEM certificate for HTTPS")
    p.add_argument("--tls-key", help="PEM private key for HTTPS")
    p.add_argument("--tls-client-ca", help="PEM CA bundle: require client certificates it signed")
    p.add_argument("--anonymous", action="store_true",
                   help="serve a non-loopback address without authentication (trusted "
                   "networks only; the dashboard shows who holds boards and CI job ids)")
    p.add_argument("--refresh", type=float, default=1.0, metavar="S",
                   help="seconds between the live views' updates (default: %(default)s)")
    p.add_argument("--quarantine", metavar="FILE",
                   help=f"quarantine list the report page shows (default: ${QUARANTINE_ENV})")
    p.set_defaults(handler=cmd_serve)
