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

from pytest_hilfarm.cli.common import (
    NEGATIVE,
    OK,
    example,
    exit_code_for,
    flash_exit_code,
    worst,
)
from pytest_hilfarm.errors import HilfarmError, UsageError


def _farm(args: argparse.Namespace) -> Any:
    """Open the farm and check every board id the command names (did-you-mean on a typo).

    The one place board ids are checked for every farm command, before anything is reserved.
    """
    from pytest_hilfarm.farm import Farm

    rack = args.rack or os.environ.get("HILFARM_RACK") or None
    farm = Farm.open(rack, log_root=Path.cwd() / "hilfarm-logs" / "cli")
    try:
        for board_id in _board_ids(args):
            farm.board(board_id)
    except BaseException:
        farm.close()
        raise
    return farm


def _board_ids(args: argparse.Namespace) -> list[str]:
    """The board ids a command names: ``BOARD`` or ``BOARD,BOARD,...`` (none for all boards)."""
    given = getattr(args, "board", None)
    return [b.strip() for b in given.split(",") if b.strip()] if given else []


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
        queue = farm.queue()
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
    _print_queue(queue, time.time())
    return 0


def _print_queue(queue: list[dict[str, Any]], now: float) -> None:
    """The requests waiting for boards, first served first, under the board table."""
    if not queue:
        return
    headers = ("pos", "priority", "waiting", "expected start", "request", "owner")
    table = []
    for entry in queue:
        priority = str(entry["priority"])
        if entry["effective_priority"] != entry["priority"]:
            priority += f" (aged {entry['effective_priority']})"
        start = entry["expected_start"]
        when = ("unknown" if start is None else "now" if start <= now
                else f"in {start - now:.0f} s")
        table.append([str(entry["position"]), priority, f"{now - entry['since']:.0f} s", when,
                      entry["request"], entry["owner"]])
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
    print(f"\nwaiting for boards: {len(queue)}")
    print("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)))
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def _flash_plan(images: list[str]) -> Any:
    """The plan from the command line, read and checked before any board is reserved."""
    from pytest_hilfarm.drivers.flashing import make_plan

    if len(images) == 1 and "@" not in images[0]:
        what: Any = Path(images[0])
        paths = [what]
    else:
        what = []
        for item in images:
            offset, sep, path = item.partition("@")
            if not sep:
                raise UsageError(f"{item!r}: several images need OFFSET@FILE each",
                                 where="hilfarm flash",
                                 hint="e.g. 0x1000@bootloader.bin 0x8000@pt.bin 0x10000@app.bin")
            what.append((offset, Path(path)))
        paths = [path for _, path in what]
    for path in paths:
        if not path.exists():
            raise UsageError(f"no such file or directory: {path}", where="hilfarm flash",
                             hint="give an app image, an ESP-IDF build directory, its "
                             "flasher_args.json, or OFFSET@FILE pairs")
    return make_plan(what)


def cmd_flash(args: argparse.Namespace) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from pytest_hilfarm.cli.flashprogress import FINAL, open_progress, short_name
    from pytest_hilfarm.drivers.flashing import FlashReport, RegionProgress
    from pytest_hilfarm.farm import flash_boards

    plan = _flash_plan(args.image)
    boards = _board_ids(args)
    outcomes: dict[str, FlashReport | HilfarmError] = {}
    states: dict[tuple[str, int], str] = {}
    with _farm(args) as farm:
        started = time.monotonic()
        progress = open_progress(boards, sys.stderr)

        def one(board: str) -> None:
            shown = progress.callback(board)

            def track(event: RegionProgress) -> None:
                states[(board, event.offset)] = event.state
                shown(event)

            # One reservation per board: a board that fails (or is busy) never stops the others.
            try:
                outcomes[board] = flash_boards(farm, [board], plan, timeout=args.timeout,
                                               progress=track)[0]
            except HilfarmError as exc:
                outcomes[board] = exc
                progress.failed(board, exc.what)

        try:
            with ThreadPoolExecutor(max_workers=len(boards)) as pool:
                for future in [pool.submit(one, b) for b in boards]:
                    future.result()  # only a bug gets here: HilfarmErrors are outcomes
        finally:
            progress.close()  # the bars end before the summary starts
    seconds = time.monotonic() - started
    codes = {b: (flash_exit_code(o) if isinstance(o, HilfarmError) else OK)
             for b, o in outcomes.items()}
    code = worst(codes.values())
    if args.json:
        print(json.dumps({"boards": [_flash_json(b, outcomes[b], states, codes[b])
                                     for b in boards],
                          "seconds": round(seconds, 3), "exit_code": code}, indent=2))
        return code
    for board in boards:
        outcome = outcomes[board]
        if isinstance(outcome, HilfarmError):
            print(f"{board}: FAILED: {outcome}")
            continue
        for region in outcome.regions:
            state = FINAL.get(states.get((board, region.offset), ""), "written") \
                if region.written else FINAL["skipped"]
            print(f"{board}: 0x{region.offset:x} {short_name(region.name)} {region.size} "
                  f"bytes {state} ({region.seconds:.2f} s)")
    failed = [b for b in boards if codes[b] != OK]
    if failed:
        ok = [b for b in boards if codes[b] == OK]
        print(f"{', '.join(ok) or 'no board'} flashed; {', '.join(failed)} FAILED "
              f"({seconds:.2f} s)")
    else:
        print(f"{', '.join(boards)}: done in {seconds:.2f} s")
    return code


def _flash_json(board: str, outcome: Any, states: dict[tuple[str, int], str],
                code: int) -> dict[str, Any]:
    if isinstance(outcome, HilfarmError):
        return {"board": board, "ok": False, "exit_code": code,
                "error": {"type": type(outcome).__name__, "what": outcome.what,
                          "where": outcome.where, "hint": outcome.hint}}
    regions = [{"offset": r.offset, "name": r.name, "size": r.size, "sha256": r.sha256,
                "state": states.get((board, r.offset), "written" if r.written else "skipped"),
                "seconds": round(r.seconds, 3)} for r in outcome.regions]
    return {"board": board, "ok": True, "exit_code": code, "regions": regions,
            "seconds": round(outcome.seconds, 3)}


class _EchoFilter:
    """Hides the board's echo of a line the terminal has already shown as it was typed.

    In a terminal, the tty echoes each key (and lets the person edit the line); the board's
    console (ESP-IDF's, and the virtual rack's app) echoes the line once more. Output that
    matches the line just sent is held back; anything else lets it through unchanged, so a
    board that does not echo loses nothing.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._expect = ""
        self._held = ""

    def sent(self, line: str) -> None:
        with self._lock:
            self._expect += line.rstrip("\r\n") + "\n"

    def feed(self, text: str) -> str:
        out: list[str] = []
        with self._lock:
            for ch in text:
                if not self._expect:
                    out.append(ch)
                elif ch == "\r" and self._held:
                    self._held += ch  # CRLF or LF: both end the echoed line
                elif ch == self._expect[0]:
                    self._held += ch
                    self._expect = self._expect[1:]
                    if ch == "\n":
                        self._held = ""  # the whole line was the echo: drop it
                else:
                    out.append(self._held + ch)  # not the echo after all: show all of it
                    if self._held:
                        self._expect = ""
                    self._held = ""
        return "".join(out)


def cmd_console(args: argparse.Namespace) -> int:
    # In a terminal the tty shows what is typed; the board's echo would show it twice.
    echo = _EchoFilter() if sys.stdin.isatty() else None
    with _farm(args) as farm:
        lease = farm.reserve(1, only=[args.board], timeout=args.timeout, reason="hilfarm console")
        with lease:
            dev = farm.open_device(args.board)
            leave = "Ctrl-C or Ctrl-D to leave" if echo else "ends with the input"
            print(f"--- {args.board} console ({dev.port}); {leave} ---", file=sys.stderr)
            mark = 0
            stop = threading.Event()

            def pump() -> None:
                nonlocal mark
                while not stop.is_set():
                    text = dev.console.text_since(mark)
                    if text:
                        mark += len(text)
                        sys.stdout.write(echo.feed(text) if echo else text)
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
                    if echo is not None:
                        echo.sent(line)
                    dev.write(line)
                time.sleep(args.linger)  # let the last reply arrive
            except KeyboardInterrupt:
                pass  # Ctrl-C is how a person leaves: not an error
            finally:
                stop.set()
                reader.join(1)
                dev.console.close()
    return OK


def cmd_health_all(args: argparse.Namespace) -> int:
    """The sweep: every idle board, none waited for (services/sweep.py)."""
    from pytest_hilfarm.cli.common import INFRASTRUCTURE
    from pytest_hilfarm.services.sweep import SweepResult, sweep

    def show(result: SweepResult) -> None:
        if args.json:
            return
        if not result.checked and result.ok:
            print(f"{result.board}: {result.detail}")
        elif result.ok:
            print(f"{result.board}: {result.health} ({result.seconds:.1f} s)")
        else:
            print(f"{result.board}: FAILED ({result.health}): {result.detail}"
                  + (f"; log {result.log}" if result.log else ""))

    with _farm(args) as farm:
        results = sweep(farm, boards=_board_ids(args) or None, on_result=show)
    codes = [OK if r.ok else NEGATIVE if r.checked else INFRASTRUCTURE for r in results]
    code = worst(codes)
    checked = sum(1 for r in results if r.checked)
    if args.json:
        print(json.dumps({"boards": [{
            "board": r.board, "checked": r.checked, "ok": r.ok, "health": r.health,
            "detail": r.detail, "log": str(r.log) if r.log else None,
            "seconds": round(r.seconds, 3)} for r in results], "exit_code": code}, indent=2))
    else:
        print(f"health sweep: {checked} checked, {len(results) - checked} skipped, "
              f"{sum(1 for r in results if not r.ok)} failed")
    return code


def cmd_health(args: argparse.Namespace) -> int:
    if args.all:
        return cmd_health_all(args)
    rows: list[dict[str, Any]] = []
    with _farm(args) as farm:
        boards = _board_ids(args) or [b.id for b in farm.boards]
        for board_id in boards:
            row: dict[str, Any] = {"board": board_id, "ok": False, "health": None,
                                   "error": None, "exit_code": OK}
            try:
                lease = farm.reserve(1, only=[board_id], timeout=args.timeout,
                                     reason="hilfarm health")
                with lease:
                    dev = farm.open_device(board_id)
                    try:
                        row["health"] = farm.health_check(dev).value
                        row["ok"] = True
                    except HilfarmError as exc:  # the check ran and failed
                        row["error"], row["exit_code"] = str(exc), NEGATIVE
                    finally:
                        dev.console.close()
            except HilfarmError as exc:  # the check could not run (busy, port gone)
                row["error"], row["exit_code"] = str(exc), exit_code_for(exc)
            if row["health"] is None:
                row["health"] = farm.store.health(board_id).health.value
            rows.append(row)
            if not args.json:
                print(f"{board_id}: {row['health']}" if row["ok"]
                      else f"{board_id}: FAILED ({row['health']}): {row['error']}")
    code = worst(r["exit_code"] for r in rows)
    if args.json:
        print(json.dumps({"boards": rows, "exit_code": code}, indent=2))
    return code


def cmd_board(args: argparse.Namespace) -> int:
    with _farm(args) as farm:
        if args.action == "restore":
            health = farm.store.restore(args.board, _person())
            farm.store.forget_flash(args.board)
        else:
            health = farm.store.quarantine(args.board, args.reason or f"by {_person()}")
    print(f"{args.board}: {health.value}")
    return 0


def cmd_lock(args: argparse.Namespace) -> int:
    with _farm(args) as farm:
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
        removed = farm.reserver.unhold(args.board)
    print(f"{args.board}: " + ("released to the farm" if removed else "was not held"))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="every board: chip, health, holder, since, firmware",
                       epilog=example("hilfarm status", "hilfarm status --json | jq '.[].health'"))
    _add_rack(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("who", help="who holds which board (same as status)",
                       epilog=example("hilfarm who --rack rack-configs/my-rig.yaml"))
    _add_rack(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser(
        "flash", help="reserve boards and flash images onto them (in parallel)",
        description="Reserve each board, flash it (regions it already holds are skipped) and "
        "release it. Progress goes to stderr: live bars in a terminal, plain lines otherwise; "
        "the summary (or --json) to stdout. One board's failure does not stop the others; "
        "the exit code is 1 when a flash failed, 2 for a bad image or argument, 3 when a "
        "board could not be reached or reserved.",
        epilog=example("hilfarm flash esp32-1,esp32-2 build/",
                       "hilfarm flash esp32c3-1 0x0@bootloader.bin 0x8000@partition-table.bin "
                       "0x10000@app.bin"))
    _add_rack(p)
    p.add_argument("board", metavar="BOARD[,BOARD...]",
                   help="board id, or several separated by commas (flashed in parallel)")
    p.add_argument("image", nargs="+", metavar="IMAGE",
                   help="app image, ESP-IDF build dir, flasher_args.json, or OFFSET@FILE ...")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="seconds to wait for each board to be free")
    p.add_argument("--json", action="store_true",
                   help="machine-readable result on stdout (regions, states, errors)")
    p.set_defaults(handler=cmd_flash)

    p = sub.add_parser(
        "console", help="reserve a board and attach to its console",
        description="Reserve the board and show its console; what you type is sent line by "
        "line. To leave: Ctrl-C, or Ctrl-D (end of input). With input from a pipe, the "
        "console stays --linger seconds after the input ends, then leaves.",
        epilog=example("hilfarm console esp32-1 --reset",
                       "echo version | hilfarm console esp32-1"))
    _add_rack(p)
    p.add_argument("board", metavar="BOARD", help="board id")
    p.add_argument("--reset", action="store_true", help="reset the board after attaching")
    p.add_argument("--linger", type=float, default=1.0, metavar="S",
                   help="seconds to keep showing output after the input ends")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="seconds to wait for the board to be free")
    p.set_defaults(handler=cmd_console)

    p = sub.add_parser(
        "health", help="run the health check on one board or all",
        description="Power-cycle, flash the baseline and check that it boots (without a "
        "baseline: check that the ROM loader answers). Exit code 1 when a check failed, 3 when "
        "a board could not be reserved or reached. With --all (the farm health sweep, for a "
        "systemd timer or a CI schedule): only idle boards, none waited for; busy, held and "
        "quarantined boards are skipped.",
        epilog=example("hilfarm health esp32-1", "hilfarm health --json",
                       "hilfarm health --all"))
    _add_rack(p)
    p.add_argument("board", nargs="?", metavar="BOARD",
                   help="board id (default: every board of the rack, one after another)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="seconds to wait for each board to be free")
    p.add_argument("--all", action="store_true",
                   help="sweep: check every idle board now, skip busy ones (never wait); logs "
                   "in the rack's state_dir/health-logs/")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_health)

    p = sub.add_parser("board", help="restore a quarantined board, or quarantine one",
                       epilog=example("hilfarm board quarantine esp32-2 --reason 'flaky USB'",
                                      "hilfarm board restore esp32-2"))
    _add_rack(p)
    p.add_argument("action", choices=("restore", "quarantine"),
                   help="restore: back in service (health check due); quarantine: out of it")
    p.add_argument("board", metavar="BOARD", help="board id")
    p.add_argument("--reason", default="",
                   help="why it is quarantined (default: who did it)")
    p.set_defaults(handler=cmd_board)

    p = sub.add_parser("lock", help="hold a board for a person at the bench (CI waits)",
                       epilog=example("hilfarm lock esp32-1 --reason 'probing UART with a scope'"))
    _add_rack(p)
    p.add_argument("board", metavar="BOARD", help="board id")
    p.add_argument("--reason", required=True, help="shown to everyone waiting for the board")
    p.set_defaults(handler=cmd_lock)

    p = sub.add_parser("unlock", help="give a held board back to the farm",
                       epilog=example("hilfarm unlock esp32-1"))
    _add_rack(p)
    p.add_argument("board", metavar="BOARD", help="board id")
    p.set_defaults(handler=cmd_unlock)
