"""``hilfarm status|flash|console|health|board|lock|unlock``: the farm from a terminal.

Every command takes ``--rack`` (default: the built-in virtual rack) and goes through
:class:`pytest_hilfarm.farm.Farm`, so a person at the bench and CI share the same locks.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pytest_hilfarm.errors import HilfarmError, UsageError


def _farm(args: argparse.Namespace) -> Any:
    from pytest_hilfarm.farm import Farm

    rack = args.rack or os.environ.get("HILFARM_RACK") or None
    return Farm.open(rack, log_root=Path.cwd() / "hilfarm-logs" / "cli")


def _add_rack(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rack", metavar="RACK",
                   help="rack file (default: $HILFARM_RACK, else the built-in virtual rack)")


def _person() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def cmd_status(args: argparse.Namespace) -> int:
    with _farm(args) as farm:
        rows = farm.status()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    headers: tuple[str, ...] = ("board", "chip", "health", "holder", "since", "firmware")
    if any("host" in r for r in rows):
        headers += ("host", "online")
    table = [[str(r.get(h) if r.get(h) is not None else "-") for h in headers] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
    print("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)))
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    return 0


class _Progress:
    """A one-line progress bar per board on stderr (plain lines when not a terminal)."""

    def __init__(self, board: str) -> None:
        self.board = board
        self.tty = sys.stderr.isatty()
        self.last = -1
        self.lock = threading.Lock()

    def __call__(self, index: int, done: int, total: int) -> None:
        pct = 100 * done // total if total else 100
        with self.lock:
            if pct == self.last or (not self.tty and pct not in (0, 100)):
                return
            self.last = pct
            bar = "#" * (pct // 4)
            end = "\n" if pct == 100 or not self.tty else "\r"
            sys.stderr.write(f"{self.board} region {index}: [{bar:<25}] {pct:3d}%{end}")
            sys.stderr.flush()


def cmd_flash(args: argparse.Namespace) -> int:
    from pytest_hilfarm.farm import flash_boards

    images: list[str] = args.image
    plan: Any
    if len(images) == 1 and "@" not in images[0]:
        plan = Path(images[0])
    else:
        pairs = []
        for item in images:
            offset, sep, path = item.partition("@")
            if not sep:
                raise UsageError(f"{item!r}: several images need OFFSET@FILE each",
                                 where="hilfarm flash",
                                 hint="e.g. 0x1000@bootloader.bin 0x8000@pt.bin 0x10000@app.bin")
            pairs.append((offset, Path(path)))
        plan = pairs
    boards = [b for b in args.board.split(",") if b]
    with _farm(args) as farm:
        for board in boards:
            farm.board(board)  # a typo gets its did-you-mean before anything is reserved
        started = time.monotonic()
        progress = {b: _Progress(b) for b in boards}
        reports = flash_boards(farm, boards, plan, timeout=args.timeout, progress=progress)
    for board, rep in zip(boards, reports):
        for region in rep.regions:
            state = "written" if region.written else "identical, skipped"
            print(f"{board}: 0x{region.offset:x} {region.size} bytes {state} "
                  f"({region.seconds:.2f} s)")
    print(f"{', '.join(boards)}: done in {time.monotonic() - started:.2f} s")
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    with _farm(args) as farm:
        lease = farm.reserve(1, only=[args.board], timeout=args.timeout, reason="hilfarm console")
        with lease:
            dev = farm.open_device(args.board)
            print(f"--- {args.board} console ({dev.port}); Ctrl-C to leave ---", file=sys.stderr)
            mark = 0
            stop = threading.Event()

            def pump() -> None:
                nonlocal mark
                while not stop.is_set():
                    text = dev.console.text_since(mark)
                    if text:
                        mark += len(text)
                        sys.stdout.write(text)
                        sys.stdout.flush()
                    time.sleep(0.05)

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            try:
                if args.reset:
                    dev.reset(wait=True)
                    # Apps drop input typed before their first prompt: wait for one briefly.
                    with contextlib.suppress(HilfarmError):
                        dev.console.expect(r"(?m)^> ", timeout=3)
                for line in sys.stdin:
                    dev.write(line)
                time.sleep(args.linger)  # let the last reply arrive when stdin was a pipe
            except KeyboardInterrupt:
                pass
            finally:
                stop.set()
                reader.join(1)
                dev.console.close()
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    with _farm(args) as farm:
        boards = [args.board] if args.board else [b.id for b in farm.boards]
        failed = 0
        for board_id in boards:
            lease = farm.reserve(1, only=[board_id], timeout=args.timeout,
                                 reason="hilfarm health")
            with lease:
                dev = farm.open_device(board_id)
                try:
                    health = farm.health_check(dev)
                    print(f"{board_id}: {health.value}")
                except HilfarmError as exc:
                    failed += 1
                    print(f"{board_id}: FAILED: {exc}")
                finally:
                    dev.console.close()
    return 1 if failed else 0


def cmd_board(args: argparse.Namespace) -> int:
    with _farm(args) as farm:
        farm.board(args.board)  # did-you-mean on a typo
        if args.action == "restore":
            health = farm.store.restore(args.board, _person())
            farm.store.forget_flash(args.board)
        else:
            health = farm.store.quarantine(args.board, args.reason or f"by {_person()}")
    print(f"{args.board}: {health.value}")
    return 0


def cmd_lock(args: argparse.Namespace) -> int:
    with _farm(args) as farm:
        farm.board(args.board)
        result = farm.reserver.hold(args.board, args.reason, _person())
        # A person may reflash by hand: the farm must not trust its digests afterwards.
        farm.store.forget_flash(args.board)
    print(f"{args.board}: held by {result.hold.person} ({result.hold.reason})")
    if result.in_use_by is not None:
        print(f"  still in use by {result.in_use_by.owner.describe()}; "
              "it is yours when that lease ends")
    return 0


def cmd_unlock(args: argparse.Namespace) -> int:
    with _farm(args) as farm:
        farm.board(args.board)
        removed = farm.reserver.unhold(args.board)
    print(f"{args.board}: " + ("released to the farm" if removed else "was not held"))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="every board: chip, health, holder, since, firmware")
    _add_rack(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("who", help="who holds which board (same as status)")
    _add_rack(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("flash", help="reserve boards and flash images onto them (in parallel)")
    _add_rack(p)
    p.add_argument("board", help="board id, or several separated by commas (flashed in parallel)")
    p.add_argument("image", nargs="+",
                   help="app image, ESP-IDF build dir, flasher_args.json, or OFFSET@FILE ...")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the board")
    p.set_defaults(handler=cmd_flash)

    p = sub.add_parser("console", help="reserve a board and attach to its console")
    _add_rack(p)
    p.add_argument("board")
    p.add_argument("--reset", action="store_true", help="reset the board after attaching")
    p.add_argument("--linger", type=float, default=1.0,
                   help="seconds to keep showing output after the input ends (default 1)")
    p.add_argument("--timeout", type=float, default=60.0)
    p.set_defaults(handler=cmd_console)

    p = sub.add_parser("health", help="run the health check on one board or all")
    _add_rack(p)
    p.add_argument("board", nargs="?")
    p.add_argument("--timeout", type=float, default=120.0)
    p.set_defaults(handler=cmd_health)

    p = sub.add_parser("board", help="restore a quarantined board, or quarantine one")
    _add_rack(p)
    p.add_argument("action", choices=("restore", "quarantine"))
    p.add_argument("board")
    p.add_argument("--reason", default="")
    p.set_defaults(handler=cmd_board)

    p = sub.add_parser("lock", help="hold a board for a person at the bench (CI waits)")
    _add_rack(p)
    p.add_argument("board")
    p.add_argument("--reason", required=True)
    p.set_defaults(handler=cmd_lock)

    p = sub.add_parser("unlock", help="give a held board back to the farm")
    _add_rack(p)
    p.add_argument("board")
    p.set_defaults(handler=cmd_unlock)
