"""``hilfarm discover``: list a rig's USB serial adapters, probe them, map power, write the rack.

A thin layer over :mod:`pytest_hilfarm.drivers.discovery.udev`,
:mod:`pytest_hilfarm.drivers.discovery.powermap` and
:mod:`pytest_hilfarm.drivers.discovery.rackwrite`: it reads the rack (to name known boards and to
ask whether they are reserved), calls them in a safe order (map power, list again, probe, write) and
prints a table or JSON. It must not import the pytest plugin, and never probes or switches a
reserved board.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_hilfarm.cli.common import example
from pytest_hilfarm.errors import ConfigError, HilfarmError


def register(subparsers: Any) -> None:
    """Add the ``discover`` command to the ``hilfarm`` parser."""
    p = subparsers.add_parser(
        "discover",
        help="list USB serial adapters (ESP boards), probe chips, map hub power, write a rack",
        description="List the USB serial adapters of ESP boards on this host with their USB "
        "serial number, physical path and /dev/serial links, and which rack boards they are. "
        "Boards that are reserved are never probed or power-switched.",
        epilog=example("hilfarm discover", "hilfarm discover --probe --write my-rig.yaml",
                       "hilfarm discover --map-power --write my-rig.yaml"),
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--probe", action="store_true",
                   help="ask each free adapter's chip for its type and MAC (esptool), then "
                   "hard-reset it back to normal boot")
    p.add_argument("--write", metavar="RACK",
                   help="add new boards (and measured power:) to this rack file, keeping "
                   "everything already in it; created if missing")
    p.add_argument("--map-power", action="store_true",
                   help="switch each uhubctl hub port with an adapter behind it off and on, "
                   "and record which board it powers")
    p.add_argument("--rack", metavar="RACK",
                   help="rack file whose boards to match and whose reservations to respect "
                   "(default: the --write file if it exists, else HILFARM_RACK)")
    p.add_argument("--off-timeout", type=float, default=5.0, metavar="S",
                   help="--map-power: how long a board may take to vanish after its port "
                   "goes off (default: 5)")
    p.add_argument("--on-timeout", type=float, default=20.0, metavar="S",
                   help="--map-power: how long it may take to enumerate again (default: 20)")
    p.add_argument("--uhubctl", default="uhubctl", metavar="PATH",
                   help="the uhubctl program (default: uhubctl on PATH)")
    p.set_defaults(handler=run)


def _load_rack(args: argparse.Namespace) -> Any:
    from pytest_hilfarm.description.rack import lists_boards, load_rack

    if args.rack:
        return load_rack(args.rack)
    if args.write and Path(args.write).exists():
        try:
            return load_rack(args.write)
        except ConfigError:
            # A skeleton a person started (no boards yet) is fine to write into; any other
            # mistake is reported now, before anything is probed or switched.
            if lists_boards(Path(args.write)):
                raise
            return None
    env = os.environ.get("HILFARM_RACK", "")
    return load_rack(env) if env else None


def reserved_checker(rack: Any) -> Callable[[str], bool]:
    """``reserved(board_id)``: True while a lease or a bench hold has the board.

    Asked afresh on every call (never cached), so a board reserved while discovery runs is
    still left alone.
    """
    if rack is None or not rack.boards or rack.is_virtual:
        return lambda board_id: False
    from pytest_hilfarm.reservation import Reserver
    from pytest_hilfarm.store import FarmStore

    reserver = Reserver(rack.boards, rack.lock_dir, FarmStore(rack.state_dir / "farm.db"))

    def reserved(board_id: str) -> bool:
        for status in reserver.status():
            if status.board == board_id:
                return status.holder is not None or status.hold is not None
        return False

    return reserved


def run(args: argparse.Namespace) -> int:
    from pytest_hilfarm.drivers.discovery import powermap, rackwrite
    from pytest_hilfarm.drivers.discovery import udev as discovery

    rack = _load_rack(args)
    reserved = reserved_checker(rack)
    say: Callable[[str], None] = lambda text: print(text, file=sys.stderr)  # noqa: E731

    power = None
    if args.map_power:
        hubs = powermap.list_hubs(args.uhubctl)
        power = powermap.map_power(
            hubs, reserved, rack=rack, switch=powermap.uhubctl_switch(args.uhubctl),
            off_timeout=args.off_timeout, on_timeout=args.on_timeout,
            # Other adapters behind the same port (a hub on it) get a tenth of that to vanish.
            settle=min(0.5, args.off_timeout / 10), progress=say)

    # Listed after power mapping: boards that were power-cycled may have new /dev nodes.
    adapters = discovery.list_adapters()
    matches = discovery.match_rack(adapters, rack)
    probes: dict[str, discovery.ProbeResult] = {}
    problems: dict[str, str] = {}
    if args.probe:
        for adapter in adapters:
            if adapter.kind == "other":
                continue
            try:
                probes[adapter.key] = discovery.probe(adapter, reserved, rack=rack)
            except HilfarmError as exc:
                problems[adapter.key] = exc.what
                say(f"{adapter.device_node}: {exc.what}")

    report = None
    if args.write:
        found = [rackwrite.DiscoveredBoard(a, probes.get(a.key),
                                           power.power_of(a) if power else None)
                 for a in adapters if a.kind != "other"]
        report = rackwrite.write_rack(args.write, found)

    if args.json:
        print(json.dumps(_as_json(adapters, matches, probes, problems, power, report), indent=2))
    else:
        _print_table(adapters, matches, probes, problems, power)
        if power is not None:
            _print_power(power)
        if report is not None:
            _print_report(report)
    return 0


def _as_json(adapters: Sequence[Any], matches: Mapping[Any, Sequence[Any]],
             probes: Mapping[str, Any], problems: Mapping[str, str], power: Any,
             report: Any) -> dict[str, Any]:
    rows = []
    for adapter in adapters:
        row = adapter.to_dict()
        row["boards"] = [m.board_id for m in matches.get(adapter, ())]
        row["probe"] = probes[adapter.key].to_dict() if adapter.key in probes else None
        row["probe_error"] = problems.get(adapter.key)
        hub_port = power.power_of(adapter) if power is not None else None
        row["power"] = ({"driver": "uhubctl", "hub": hub_port[0], "port": hub_port[1]}
                        if hub_port else None)
        rows.append(row)
    result: dict[str, Any] = {"adapters": rows}
    if power is not None:
        result["power_map"] = [
            {"hub": r.hub, "port": r.port, "outcome": r.outcome, "note": r.note,
             "adapters": [a.key for a in r.gone]} for r in power.results]
    if report is not None:
        result["write"] = {
            "path": str(report.path), "created": report.created, "changed": report.changed,
            "updates": [{"board": u.board_id, "action": u.action, "detail": u.detail}
                        for u in report.updates]}
    return result


def _print_table(adapters: Sequence[Any], matches: Mapping[Any, Sequence[Any]],
                 probes: Mapping[str, Any], problems: Mapping[str, str], power: Any) -> None:
    if not adapters:
        print("no USB serial adapters found (is the hub powered? `lsusb` lists what the "
              "kernel sees)")
        return
    header = ["PORT", "KIND", "VID:PID", "USB PATH", "SERIAL", "BOARD", "CHIP", "MAC", "POWER"]
    rows = []
    for adapter in adapters:
        probe = probes.get(adapter.key)
        hub_port = power.power_of(adapter) if power is not None else None
        rows.append([
            adapter.device_node, adapter.kind, adapter.vid_pid, adapter.port_path,
            adapter.usb_serial or "-",
            ",".join(m.board_id for m in matches.get(adapter, ())) or "(new)",
            probe.chip_name if probe else ("error" if adapter.key in problems else "-"),
            probe.mac if probe else "-",
            f"{hub_port[0]}:{hub_port[1]}" if hub_port else "-",
        ])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    for adapter in adapters:
        for link in adapter.by_id:
            print(f"  {adapter.device_node}: {link}")


def _print_power(power: Any) -> None:
    print("\npower map (uhubctl):")
    for result in power.results:
        names = ", ".join(a.port_path for a in result.gone) or "-"
        note = f"  ({result.note})" if result.note else ""
        print(f"  hub {result.hub} port {result.port}: {result.outcome} {names}{note}")


def _print_report(report: Any) -> None:
    verb = "created" if report.created else ("updated" if report.changed else "unchanged")
    print(f"\nrack file {report.path}: {verb}")
    for update in report.updates:
        print(f"  {update.board_id or '-'}: {update.action}: {update.detail}")
