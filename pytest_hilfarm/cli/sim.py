"""``hilfarm sim``: run and drive the virtual rack (serve, up, down, status, power, reset, mesh,
efuse).

Each subcommand is a thin wrapper over :mod:`pytest_hilfarm.sim.manager` (background daemon and
control endpoint) or :mod:`pytest_hilfarm.sim.daemon` (foreground ``serve``). It must not
import the pytest plugin or the farm core; ``build-app`` comes from ``cli/sim_build.py``.
"""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any

from pytest_hilfarm.cli.common import example
from pytest_hilfarm.errors import UsageError


def register(subparsers: Any) -> None:
    """Add the ``sim`` command group to the ``hilfarm`` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir",
        help="virtual rack state dir (default: HILFARM_SIM_DIR, else "
        "$XDG_STATE_HOME/hilfarm/virtual-rack)",
    )
    sim = subparsers.add_parser("sim", help="the virtual rack of simulated boards",
                                epilog=example("hilfarm sim up", "hilfarm sim status"))
    sim_sub = sim.add_subparsers(dest="sim_command", metavar="SUBCOMMAND")
    sim.set_defaults(handler=lambda args: _help(sim))

    p = sim_sub.add_parser("serve", parents=[common], help="run the daemon in the foreground",
                           epilog=example("hilfarm sim serve rack-configs/virtual.yaml "
                                          "--base-port 40000"))
    p.add_argument("rack", nargs="?", help="rack YAML file (default: built-in virtual rack)")
    p.add_argument("--base-port", type=int, default=0, help="fixed ports from here (default: any)")
    p.add_argument("--wire-time", action="store_true", help="emulate UART wire time")
    p.set_defaults(handler=_serve)

    p = sim_sub.add_parser("up", parents=[common], help="start the daemon in the background",
                           epilog=example("hilfarm sim up"))
    p.add_argument("rack", nargs="?", help="rack YAML file (default: built-in virtual rack)")
    p.add_argument("--base-port", type=int, default=0, help="fixed ports from here (default: any)")
    p.set_defaults(handler=_up)

    p = sim_sub.add_parser("down", parents=[common], help="stop the background daemon",
                           epilog=example("hilfarm sim down"))
    p.set_defaults(handler=_down)

    p = sim_sub.add_parser("status", parents=[common], help="boards, ports and modes",
                           description="Boards, ports and modes of the running virtual rack "
                           "(exit code 3 when it is not running).",
                           epilog=example("hilfarm sim status --json"))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_status)

    p = sim_sub.add_parser("power", parents=[common], help="switch a board's power",
                           epilog=example("hilfarm sim power esp32-1 off"))
    p.add_argument("board", metavar="BOARD", help="virtual board id")
    p.add_argument("state", choices=("on", "off"), help="switch the power on or off")
    p.set_defaults(handler=_power)

    p = sim_sub.add_parser("reset", parents=[common], help="reset a board (EN pulse)",
                           epilog=example("hilfarm sim reset esp32-1 --download"))
    p.add_argument("board", metavar="BOARD", help="virtual board id")
    p.add_argument("--download", action="store_true", help="hold IO0 low: enter download mode")
    p.set_defaults(handler=_reset)

    p = sim_sub.add_parser("mesh", parents=[common], help="show or set radio conditions",
                           epilog=example("hilfarm sim mesh --loss 0.1 --latency-ms 20",
                                          "hilfarm sim mesh --partition esp32-1 "
                                          "--partition esp32-2,esp32-3", "hilfarm sim mesh --heal"))
    p.add_argument("--loss", type=float, help="per-hop loss probability, 0..1")
    p.add_argument("--latency-ms", type=float, help="per-hop latency in ms")
    p.add_argument(
        "--partition",
        action="append",
        metavar="ID,ID",
        help="a group of boards that only reach each other (repeat for more groups)",
    )
    p.add_argument("--heal", action="store_true", help="lift all partitions")
    p.set_defaults(handler=_mesh)

    p = sim_sub.add_parser(
        "efuse", parents=[common],
        help="show or burn a virtual board's eFuses (Secure Boot, key digests, secure version)",
        description="Without an action: show the board's virtual eFuses. Burning is one-way, as "
        "on a chip: bits only go from 0 to 1 (a digest fills a free key block, the secure "
        "version only rises).",
        epilog=example("hilfarm sim efuse esp32c3-1",
                       "hilfarm sim efuse esp32c3-1 burn-key-digest --key release.pem",
                       "hilfarm sim efuse esp32c3-1 enable-secure-boot"))
    p.add_argument("board", metavar="BOARD", help="virtual board id")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    actions = p.add_subparsers(dest="efuse_action", metavar="ACTION")
    a = actions.add_parser("burn-key-digest", help="burn a Secure Boot V2 key digest",
                           epilog=example("hilfarm sim efuse esp32c3-1 burn-key-digest "
                                          "--key release.pem"))
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("digest", nargs="?", help="64 hex digits (`hilfarm ota digest KEY`)")
    src.add_argument("--key", help="an RSA-3072 key file (public or private PEM)")
    a = actions.add_parser("burn-secure-version", help="raise the anti-rollback counter",
                           epilog=example("hilfarm sim efuse esp32c3-1 burn-secure-version 2"))
    a.add_argument("version", type=int, help="the new secure version (never lower)")
    for name, what in (
        ("enable-secure-boot", "burn SECURE_BOOT_EN (needs a key digest)"),
        ("enable-anti-rollback", "turn on the bootloader's anti-rollback check (one-way)"),
        ("enable-signed-apps", "turn on signed apps without hardware Secure Boot (one-way)"),
        ("new-chip", "simulator only: replace the chip (eFuses as the rack file burns them at "
         "start)"),
    ):
        actions.add_parser(name, help=what, epilog=example(f"hilfarm sim efuse esp32c3-1 {name}"))
    p.set_defaults(handler=_efuse)

    try:
        sim_build = importlib.import_module("pytest_hilfarm.cli.sim_build")
    except ModuleNotFoundError as exc:
        if exc.name != "pytest_hilfarm.cli.sim_build":
            raise
    else:
        sim_build.add_build_app_parser(sim_sub)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _manager() -> Any:
    return importlib.import_module("pytest_hilfarm.sim.manager")


def _serve(args: argparse.Namespace) -> int:
    from pytest_hilfarm.sim import daemon

    def announce(text: str) -> None:
        print(text, flush=True)

    return daemon.serve(
        args.rack, args.state_dir, base_port=args.base_port, wire_time=args.wire_time,
        announce=announce,
    )


def _up(args: argparse.Namespace) -> int:
    info = _manager().up(args.rack, args.state_dir, base_port=args.base_port)
    print(f"virtual rack up: pid {info.pid}, control {info.control}, rack {info.rack}")
    for board in info.boards:
        print(f"  {board.id:<12} {board.chip:<8} {board.port}  {board.rfc2217}")
    return 0


def _down(args: argparse.Namespace) -> int:
    stopped = _manager().down(args.state_dir)
    print("virtual rack stopped" if stopped else "virtual rack was not running")
    return 0


def _status(args: argparse.Namespace) -> int:
    answer = _manager().status(args.state_dir)
    if answer is None:
        if args.json:
            print(json.dumps({"running": False}))
        else:
            print("virtual rack is not running (start it with `hilfarm sim up`)")
        return 3
    if args.json:
        boards = [
            {
                "id": b["id"],
                "chip": b["chip"],
                "mac": b["mac"],
                "port": b["port"],
                "rfc2217": b["rfc2217"],
                "control": answer["control"],
                "mode": b["mode"],
                "powered": b["powered"],
                "app": b["app"],
            }
            for b in answer["boards"]
        ]
        print(
            json.dumps(
                {
                    "running": True,
                    "pid": answer["pid"],
                    "control": answer["control"],
                    "rack": answer["rack"],
                    "state_dir": answer["state_dir"],
                    "boards": boards,
                },
                indent=2,
            )
        )
        return 0
    print(f"virtual rack: pid {answer['pid']}, control {answer['control']}, rack {answer['rack']}")
    rows = [("BOARD", "CHIP", "MAC", "PORT", "RFC2217", "MODE", "APP")]
    for b in answer["boards"]:
        app = b["app"]
        app_text = f"{app['project']} {app['version']} ({app['slot']})" if app else "-"
        mode = b["mode"] if b.get("plugged", True) else "unplugged"
        rows.append((b["id"], b["chip"], b["mac"], b["port"], b["rfc2217"], mode, app_text))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _request(args: argparse.Namespace, request: dict[str, Any]) -> dict[str, Any]:
    answer: dict[str, Any] = _manager().control(request, state_dir=args.state_dir)
    if not answer.get("ok"):
        where = f"virtual rack control {request['op']}"
        board = request.get("board")
        if board is not None:
            _check_board(args, board, where)  # a typo gets its did-you-mean
        raise UsageError(str(answer.get("error")), where=where)
    return answer


def _check_board(args: argparse.Namespace, board: str, where: str) -> None:
    """Raise a "did you mean" error when the running virtual rack has no board ``board``."""
    from pytest_hilfarm.description.rack import closest

    status = _manager().status(args.state_dir) or {}
    ids = [b["id"] for b in status.get("boards", ())]
    if ids and board not in ids:
        guess = closest(board, ids)
        raise UsageError(f"no board {board!r} in the virtual rack", where=where,
                         hint=f"did you mean {guess!r}?" if guess
                         else f"its boards: {', '.join(ids)}")


def _power(args: argparse.Namespace) -> int:
    _request(args, {"op": "power", "board": args.board, "on": args.state == "on"})
    print(f"{args.board}: power {args.state}")
    return 0


def _reset(args: argparse.Namespace) -> int:
    boot = "download" if args.download else "flash"
    answer = _request(args, {"op": "reset", "board": args.board, "boot": boot})
    print(f"{args.board}: reset ({boot}), now {answer.get('mode')}")
    return 0


def _mesh(args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"op": "mesh"}
    if args.loss is not None:
        request["loss"] = args.loss
    if args.latency_ms is not None:
        request["latency_ms"] = args.latency_ms
    if args.heal:
        request["partitions"] = []
    elif args.partition:
        request["partitions"] = [
            [b.strip() for b in group.split(",") if b.strip()] for group in args.partition
        ]
    answer = _request(args, request)
    parts = answer.get("partitions") or []
    print(f"loss {answer.get('loss')}, latency {answer.get('latency_ms')} ms, partitions "
          + (" | ".join(",".join(g) for g in parts) if parts else "none"))
    return 0


def _efuse(args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"op": "efuse", "board": args.board}
    action = args.efuse_action
    if action == "burn-key-digest":
        if args.key:
            from pytest_hilfarm.ota.keys import key_digest

            digest = key_digest(args.key).hex()
        else:
            from pytest_hilfarm.ota.keys import parse_digest

            digest = parse_digest(args.digest).hex()
        request["burn"] = {"key_digest": digest}
    elif action == "burn-secure-version":
        request["burn"] = {"secure_version": args.version}
    elif action == "enable-secure-boot":
        request["burn"] = {"secure_boot": True}
    elif action == "enable-anti-rollback":
        request["burn"] = {"anti_rollback": True}
    elif action == "enable-signed-apps":
        request["burn"] = {"signed_apps": True}
    elif action == "new-chip":
        request["new_chip"] = True
    answer = _request(args, request)
    if args.json:
        print(json.dumps({k: v for k, v in answer.items() if k != "ok"}, indent=2))
        return 0
    efuse = answer["efuse"]
    digests = efuse.get("key_digests") or []
    print(f"{answer['board']} ({answer['chip']}) virtual eFuses:")
    print(f"  secure boot         : {'enabled' if efuse['secure_boot_enabled'] else 'disabled'}")
    print(f"  key digests         : {len(digests)} of {answer['key_digest_slots']} burned")
    for i, d in enumerate(digests):
        print(f"    SECURE_BOOT_DIGEST{i}: {d}")
    print(f"  secure_version      : {efuse['secure_version']} "
          f"(of {answer['secure_version_bits']})")
    print(f"  anti-rollback check : {'on' if efuse['anti_rollback'] else 'off'}")
    print(f"  signed apps (no SB) : {'on' if efuse['signed_apps_no_secure_boot'] else 'off'}")
    return 0
