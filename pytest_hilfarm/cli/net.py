"""``hilfarm net reset|show``: repair and inspect network impairments from a terminal.

``reset`` puts every interface that has a restore record (written by
:class:`pytest_hilfarm.drivers.netem.NetemController` before it changes anything) back to its
original qdisc; interfaces whose lock a live test holds are left alone unless ``--force``. ``show``
prints the qdiscs of the rack's device-facing interfaces and the impairments in force. Neither
command touches an interface that is not in a restore record or the rack file.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_hilfarm.cli.common import example
from pytest_hilfarm.errors import HilfarmError

if TYPE_CHECKING:
    from pytest_hilfarm.description.rack import RackSpec


def _state_dir(args: argparse.Namespace) -> tuple[Path, RackSpec]:
    """The netem state directory (``--state-dir``, else the rack's) and the rack."""
    from pytest_hilfarm.description.rack import builtin_virtual_rack_path, load_rack

    rack = load_rack(args.rack or os.environ.get("HILFARM_RACK") or builtin_virtual_rack_path())
    state = Path(args.state_dir) if args.state_dir else rack.state_dir / "netem"
    return state, rack


def cmd_reset(args: argparse.Namespace) -> int:
    from pytest_hilfarm.drivers.netem import reset_all

    state, _ = _state_dir(args)
    outcomes = reset_all(state, force=args.force)
    for item in outcomes:
        rec = item.record
        print(f"{rec.label}: {item.outcome} (impaired by {rec.owner}, pid {rec.pid})")
    if not outcomes:
        print(f"nothing to reset: no restore records in {state}")
    return 0 if all(item.ok for item in outcomes) else 1


def cmd_show(args: argparse.Namespace) -> int:
    from pytest_hilfarm.drivers.netem import read_records, show_qdiscs, subprocess_runner

    state, rack = _state_dir(args)
    records = {(r.netns, r.interface): r for r in read_records(state)}
    rows: list[dict[str, Any]] = []
    interfaces: list[tuple[str | None, str, str]] = [
        (None, b.interface, b.id) for b in rack.boards if b.interface]
    seen = {(n, i) for n, i, _ in interfaces}
    interfaces += [(n, i, "-") for (n, i) in records if (n, i) not in seen]
    for netns, iface, board in interfaces:
        row: dict[str, Any] = {"board": board, "interface": iface, "netns": netns}
        try:
            row["qdiscs"] = show_qdiscs(iface, netns, subprocess_runner)
        except HilfarmError as exc:
            row["error"] = exc.what
        rec = records.get((netns, iface))
        row["impaired_by"] = f"{rec.owner} (pid {rec.pid})" if rec else None
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"rack {rack.name!r} names no board interface and {state} has no restore records")
    for row in rows:
        label = f"{row['netns']}:{row['interface']}" if row["netns"] else row["interface"]
        root = next((q for q in row.get("qdiscs", []) if q.get("root")), None)
        what = (f"{root.get('kind')} {root.get('handle')} {json.dumps(root.get('options', {}))}"
                if root else row.get("error", "no root qdisc"))
        who = f"  impaired by {row['impaired_by']}" if row["impaired_by"] else ""
        print(f"{row['board']:<12} {label:<20} {what}{who}")
    return 0


def register(subparsers: Any) -> None:
    net = subparsers.add_parser("net", help="network impairments (netem) of the rig",
                                description=__doc__,
                                epilog=example("hilfarm net show", "hilfarm net reset"))
    sub = net.add_subparsers(dest="command_net", metavar="ACTION", required=True)
    for name, func, text in (
        ("reset", cmd_reset, "restore every interface from its restore record"),
        ("show", cmd_show, "show the rack interfaces' qdiscs and active impairments"),
    ):
        p = sub.add_parser(name, help=text, description=text,
                           epilog=example(f"hilfarm net {name} --rack rack-configs/my-rig.yaml"))
        p.add_argument("--rack", metavar="RACK",
                       help="rack file (default: $HILFARM_RACK, else the built-in virtual rack)")
        p.add_argument("--state-dir", metavar="DIR",
                       help="netem restore records (default: <rack state_dir>/netem)")
        if name == "reset":
            p.add_argument("--force", action="store_true",
                           help="also reset interfaces a live test is impairing")
        else:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(handler=func)
