"""hilfarm status|flash|health|board|lock|unlock|console against the virtual rack.

Each test: argv in, exact exit code and output out (the README's exit-code table).
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from pytest_hilfarm.cli import main
from pytest_hilfarm.farm import Farm
from pytest_hilfarm.sim.appbuild import write_build_dir

RACK = """\
version: 1
name: cli-test
boards:
  - {id: esp32-1, chip: esp32, port: virtual, reset: virtual, power: virtual}
  - {id: esp32-2, chip: esp32, port: virtual, reset: virtual, power: virtual}
  - {id: esp32c3-1, chip: esp32c3, port: virtual, reset: virtual, power: virtual}
"""
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def rack(tmp_path_factory: pytest.TempPathFactory, private_virtual_rack: Path) -> Path:
    path = tmp_path_factory.mktemp("cli") / "rack.yaml"
    path.write_text(RACK)
    return path


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_build_dir(tmp_path_factory.mktemp("fw") / "b", "esp32", "cli-demo", "5.0.0").path


def status(rack: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, dict]:
    assert main(["status", "--rack", str(rack), "--json"]) == 0
    return {row["board"]: row for row in json.loads(capsys.readouterr().out)}


def run_cli(*argv: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest_hilfarm", *argv], capture_output=True,
                          text=True, timeout=120, **kwargs)  # type: ignore[call-overload]


def in_terminal(argv: list[str], typed: list[bytes] = (), *, settle: float = 0.0,
                timeout: float = 90) -> tuple[int, str]:
    """Run ``hilfarm ARGV`` with stdin, stdout and stderr on a real pseudo-terminal.

    ``typed`` is sent (after ``settle`` s) as a person types it, the line discipline echoing
    it; returns the exit code and everything the terminal showed.
    """
    master, slave = pty.openpty()
    # A terminal window of 120 x 40 (a pty starts with none, and programs then guess).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen([sys.executable, "-m", "pytest_hilfarm", *argv], stdin=slave,
                            stdout=slave, stderr=slave, close_fds=True, env=env)
    os.close(slave)
    shown = b""
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    pending = list(typed)
    try:
        while time.monotonic() < deadline:
            if pending and time.monotonic() - started >= settle and b"> " in shown:
                os.write(master, pending.pop(0))
                started = time.monotonic()
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # the other side closed: the program ended
                    break
                if not chunk:
                    break
                shown += chunk
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, shown.decode(errors="replace")


def test_status_lists_boards(rack: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = status(rack, capsys)
    assert set(rows) == {"esp32-1", "esp32-2", "esp32c3-1"}
    assert rows["esp32c3-1"]["chip"] == "esp32c3"
    assert main(["status", "--rack", str(rack)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["BOARD", "CHIP", "HEALTH"]


def test_status_and_who_show_the_queue(rack: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import threading

    with Farm.open(rack) as farm:
        held = farm.reserve(1, chip="esp32c3", timeout=5, test_id="t::holder")
        waiter = threading.Thread(target=lambda: farm.reserve(
            1, chip="esp32c3", timeout=10, test_id="t::queued", priority=-5).release())
        waiter.start()
        deadline = time.monotonic() + 10
        while not farm.queue() and time.monotonic() < deadline:
            time.sleep(0.01)
        (entry,) = farm.queue()
        assert (entry["position"], entry["priority"]) == (1, -5)
        assert "t::queued" in entry["owner"] and entry["expected_start"] is not None
        for command in ("status", "who"):
            assert main([command, "--rack", str(rack)]) == 0
            out = capsys.readouterr().out
            assert "waiting for boards: 1" in out
            line = next(x for x in out.splitlines() if "t::queued" in x)
            assert line.split()[:2] == ["1", "-5"] and "1 x esp32c3 board(s)" in line
        held.release()
        waiter.join(10)
    assert main(["status", "--rack", str(rack)]) == 0
    assert "waiting for boards" not in capsys.readouterr().out


# -- flash ----------------------------------------------------------------------------------------


def test_flash_writes_then_skips_identical(rack: Path, build: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flash", "--rack", str(rack), "esp32-1", str(build)]) == 0
    first = capsys.readouterr()
    # Not a terminal: plain progress lines on stderr, one per region and state, with file names.
    for name in ("bootloader.bin", "partition-table.bin", "cli-demo.bin"):
        assert re.search(rf"^esp32-1: 0x[0-9a-f]+ {name} \d+ bytes writing$", first.err, re.M)
        assert re.search(rf"^esp32-1: 0x[0-9a-f]+ {name} \d+ bytes written, verified$",
                         first.err, re.M)
        assert re.search(rf"^esp32-1: 0x[0-9a-f]+ {name} \d+ bytes written, verified "
                         r"\(\d+\.\d\d s\)$", first.out, re.M)
    assert "\r" not in first.err and "%" not in first.err
    assert main(["flash", "--rack", str(rack), "esp32-1", str(build)]) == 0
    second = capsys.readouterr()
    assert second.out.count("identical, skipped") == 3
    assert second.err.count("identical, skipped") == 3 and "writing" not in second.err
    assert status(rack, capsys)["esp32-1"]["firmware"]


def test_flash_several_boards_in_parallel(rack: Path, build: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flash", "--rack", str(rack), "esp32-1,esp32-2", str(build)]) == 0
    out = capsys.readouterr().out
    for board in ("esp32-1", "esp32-2"):
        assert f"{board}: 0x10000 cli-demo.bin " in out
    assert out.splitlines()[-1].startswith("esp32-1, esp32-2: done in")
    rows = status(rack, capsys)
    assert rows["esp32-1"]["firmware"] == rows["esp32-2"]["firmware"] is not None


def test_flash_wrong_chip_is_a_usage_error(rack: Path, build: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flash", "--rack", str(rack), "esp32c3-1", str(build)]) == 2
    out = capsys.readouterr().out
    assert out.startswith("esp32c3-1: FAILED:") and "esp32" in out and "esp32c3" in out


def test_one_board_failing_does_not_hide_the_others(rack: Path, build: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["flash", "--rack", str(rack), "esp32c3-1,esp32-2", str(build), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 2 == result["exit_code"]
    c3, esp32 = result["boards"]
    assert (c3["board"], c3["ok"], c3["exit_code"]) == ("esp32c3-1", False, 2)
    assert c3["error"]["type"] == "ImageError" and "esp32c3" in c3["error"]["what"]
    assert (esp32["board"], esp32["ok"], esp32["exit_code"]) == ("esp32-2", True, 0)
    assert [r["offset"] for r in esp32["regions"]] == [0x1000, 0x8000, 0x10000]
    assert {r["state"] for r in esp32["regions"]} <= {"skipped", "verified"}
    assert all(len(r["sha256"]) == 64 and r["name"].endswith(".bin")
               for r in esp32["regions"])


def test_flash_json_reports_written_and_verified(rack: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    fresh = write_build_dir(tmp_path / "v6", "esp32", "cli-demo", "6.0.0").path
    assert main(["flash", "--rack", str(rack), "esp32-2", str(fresh), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # stdout is only the JSON; progress is on stderr
    states = {r["offset"]: r["state"] for r in result["boards"][0]["regions"]}
    assert states[0x10000] == "verified"  # a new app: written, then read back
    assert states[0x1000] == "skipped"  # the same bootloader as before
    assert "cli-demo-6" not in captured.err and "esp32-2: 0x10000" in captured.err


def test_flash_missing_file_is_a_usage_error_before_reserving(
        rack: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flash", "--rack", str(rack), "esp32-1", str(tmp_path / "nope.bin")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "nope.bin" in captured.err and "esp32-1" not in captured.err


def test_flash_progress_in_a_terminal_is_one_line_per_board_and_region(
        rack: Path, build: Path, tmp_path: Path) -> None:
    fresh = write_build_dir(tmp_path / "v7", "esp32", "cli-demo", "7.0.0").path
    code, shown = in_terminal(["flash", "--rack", str(rack), "esp32-1,esp32-2", str(fresh)])
    assert code == 0, shown
    text = ANSI.sub("", shown).replace("\r\n", "\n").replace("\r", "\n")
    summary_at = text.index("esp32-1: 0x1000 bootloader.bin")  # the summary's first line
    bars = text[:summary_at]
    # The last frame of the bars: each board's regions on lines of their own, finished.
    last = {}
    for line in bars.splitlines():
        found = re.match(r"(esp32-[12]) +(0x[0-9a-f]+) (\S+) .*?(identical, skipped|written, "
                         r"verified|written|writing)\s*$", line.strip())
        if found:
            last[(found.group(1), found.group(2))] = (found.group(3), found.group(4), line)
    assert set(last) == {(b, o) for b in ("esp32-1", "esp32-2")
                         for o in ("0x001000", "0x008000", "0x010000")}, bars[-2000:]
    assert last[("esp32-1", "0x010000")][:2] == ("cli-demo.bin", "written, verified")
    assert last[("esp32-2", "0x001000")][:2] == ("bootloader.bin", "identical, skipped")
    assert re.search(r"\d+(\.\d+)?/\d+(\.\d+)? [kM]?B", last[("esp32-1", "0x010000")][2])
    assert text.rstrip().splitlines()[-1].startswith("esp32-1, esp32-2: done in")


# -- board ids: one did-you-mean for every command that takes one --------------------------------


@pytest.mark.parametrize("argv", [
    ["health", "esp32-9"],
    ["console", "esp32-9"],
    ["board", "quarantine", "esp32-9"],
    ["lock", "esp32-9", "--reason", "x"],
    ["unlock", "esp32-9"],
    ["flash", "esp32-1,esp32-9", "BUILD"],
])
def test_unknown_board_is_a_usage_error_with_did_you_mean(
        argv: list[str], rack: Path, build: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(build) if a == "BUILD" else a for a in argv]
    assert main([*argv, "--rack", str(rack)]) == 2
    err = capsys.readouterr().err
    assert "no board 'esp32-9'" in err and re.search(r"did you mean 'esp32-\d'\?", err)
    assert "fewer boards" not in err


def test_quarantine_and_restore(rack: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["board", "quarantine", "--rack", str(rack), "esp32c3-1", "--reason", "x"]) == 0
    assert capsys.readouterr().out.strip() == "esp32c3-1: QUARANTINED"
    assert status(rack, capsys)["esp32c3-1"]["health"] == "QUARANTINED"
    with Farm.open(rack) as farm:
        assert farm.unsatisfiable(1, chip="esp32c3") is None  # the rack has it...
        with pytest.raises(Exception, match="restore"):
            farm.reserve(1, chip="esp32c3", timeout=1)  # ...but it is out of service
    assert main(["board", "restore", "--rack", str(rack), "esp32c3-1"]) == 0
    capsys.readouterr()
    assert status(rack, capsys)["esp32c3-1"]["health"] == "UNKNOWN"


# -- health ---------------------------------------------------------------------------------------


def test_health_check_brings_a_board_to_good(rack: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", "--rack", str(rack), "esp32c3-1"]) == 0
    assert capsys.readouterr().out == "esp32c3-1: GOOD\n"


def test_failed_health_check_exits_1(tmp_path: Path, private_virtual_rack: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    # A baseline the board refuses (built for another chip): the check runs and fails, a
    # negative result (1), not a crash of the command.
    wrong = write_build_dir(tmp_path / "c3", "esp32c3", "bad-baseline", "0.0.1").path
    bad_rack = tmp_path / "rack.yaml"
    bad_rack.write_text(RACK.replace("version: 1\n", f"version: 1\nbaseline: {{esp32: {wrong}}}\n")
                        .replace("name: cli-test", "name: cli-bad-baseline"))
    assert main(["health", "--rack", str(bad_rack), "esp32-1", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["exit_code"] == 1
    (row,) = result["boards"]
    assert (row["board"], row["ok"], row["health"], row["exit_code"]) == ("esp32-1", False,
                                                                          "BAD", 1)
    assert "health check of esp32-1 failed" in row["error"] and "esp32c3" in row["error"]
    assert main(["health", "--rack", str(bad_rack), "esp32-1"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("esp32-1: FAILED (BAD): ") and "health check of esp32-1 failed" in out


def test_health_of_a_held_board_is_an_infrastructure_error(
        rack: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lock", "--rack", str(rack), "esp32-2", "--reason", "soldering"]) == 0
    try:
        capsys.readouterr()
        assert main(["health", "--rack", str(rack), "esp32-2", "--timeout", "0.5",
                     "--json"]) == 3
        (row,) = json.loads(capsys.readouterr().out)["boards"]
        assert row["exit_code"] == 3 and "soldering" in row["error"]
    finally:
        assert main(["unlock", "--rack", str(rack), "esp32-2"]) == 0
        capsys.readouterr()


def test_bench_hold_survives_the_cli_and_blocks_ci(rack: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lock", "--rack", str(rack), "esp32c3-1", "--reason", "scope probing"]) == 0
    capsys.readouterr()
    try:
        row = status(rack, capsys)["esp32c3-1"]
        assert "scope probing" in row["holder"]
        with Farm.open(rack) as farm, pytest.raises(Exception, match="scope probing"):
            farm.reserve(1, chip="esp32c3", timeout=0.5)
    finally:
        assert main(["unlock", "--rack", str(rack), "esp32c3-1"]) == 0
    capsys.readouterr()
    assert status(rack, capsys)["esp32c3-1"]["holder"] is None


def test_ctrl_c_exits_130(rack: Path) -> None:
    # A real SIGINT on a real process, while it waits for a board someone holds.
    with Farm.open(rack) as farm, farm.reserve(1, only=["esp32-2"], timeout=10):
        # SIGINT back to its default in the child: a suite run as a background job (`cmd &`
        # in a script) inherits SIGINT ignored, and so would the command, as POSIX wants.
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest_hilfarm", "health", "--rack", str(rack), "esp32-2",
             "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL))
        # Interrupt once it waits for the lease (its ticket is in the queue), however long the
        # import and the farm's opening take on a loaded machine.
        deadline = time.monotonic() + 60
        while not farm.queue() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        assert farm.queue(), "the command never queued for esp32-2"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert err.strip().endswith("hilfarm: interrupted")


# -- console --------------------------------------------------------------------------------------


def test_console_shows_the_app_and_sends_input(rack: Path, build: Path) -> None:
    assert main(["flash", "--rack", str(rack), "esp32-1", str(build)]) == 0
    proc = run_cli("console", "--rack", str(rack), "esp32-1", "--reset", input="version\n")
    assert proc.returncode == 0, proc.stderr
    assert "project: cli-demo" in proc.stdout
    assert "> version" in proc.stdout  # piped input is not echoed by a tty: the board's shows


def test_console_in_a_terminal_shows_what_you_type_once(rack: Path, build: Path) -> None:
    assert main(["flash", "--rack", str(rack), "esp32-1", str(build)]) == 0
    code, shown = in_terminal(["console", "--rack", str(rack), "esp32-1", "--reset",
                               "--linger", "1"], [b"version\n", b"\x04"], settle=0.5)
    text = shown.replace("\r", "")
    assert code == 0, text
    assert "Ctrl-C or Ctrl-D to leave" in text
    assert "project: cli-demo" in text
    assert text.count("version\n") == 1, text  # the terminal's echo; the board's is hidden
    assert re.search(r"> version\nproject: cli-demo", text), text


def test_console_echo_filter_keeps_what_is_not_an_echo() -> None:
    from pytest_hilfarm.cli.farm import _EchoFilter

    echo = _EchoFilter()
    echo.sent("status\n")
    # A board that does not echo: its reply starts like the typed line but is not it.
    assert echo.feed("status: ok\r\n> ") == "status: ok\r\n> "
    echo.sent("version\n")
    assert echo.feed("I (5) log line\r\n") == "I (5) log line\r\n"  # before the echo
    assert echo.feed("vers") == "" and echo.feed("ion\r\nproject: x\r\n> ") == "project: x\r\n> "


# -- help, examples, exit codes -------------------------------------------------------------------


def farm_parsers() -> list[tuple[tuple[str, ...], object]]:
    import argparse

    from pytest_hilfarm.cli import build_parser, walk_parsers

    found = []
    for path, parser in walk_parsers(build_parser()):
        # `hilfarm rollout|fleet|advise` are cli/rollout.py's: its own tests hold them.
        if len(path) > 1 and path[1] in ("rollout", "fleet", "advise"):
            continue
        assert isinstance(parser, argparse.ArgumentParser)
        found.append((path, parser))
    return found


def test_every_argument_has_help_and_every_command_ends_with_an_example() -> None:
    import argparse

    parsers = farm_parsers()
    assert len(parsers) > 30
    for path, parser in parsers:
        assert isinstance(parser, argparse.ArgumentParser)
        name = " ".join(path)
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction,
                                   argparse._SubParsersAction)):
                continue
            assert action.help, f"`{name}`: {action.dest} has no help text"
        text = parser.format_help().rstrip()
        if len(path) > 1:
            last = text.splitlines()[-1].strip()
            assert "example:" in text and last.startswith(("hilfarm ", "echo ")), \
                f"`{name} --help` does not end with an example:\n{text[-300:]}"


def test_defaults_are_shown(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["health", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "(default: 120.0)" in out and "default: every board" in out
    with pytest.raises(SystemExit):
        main(["sim", "build-app", "--help"])
    assert "(default: 4MB)" in capsys.readouterr().out


def test_exit_code_table_is_in_help_and_matches_the_readme(
        capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_hilfarm.cli.common import EXIT_CODES

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Command line"):]
    section = section[:section.index("\n## ", 3)]
    rows = re.findall(r"^\| (\d+) \| (.+?) \|$", section, re.M)
    assert [(int(c), m) for c, m in rows] == list(EXIT_CODES)
    for code, meaning in EXIT_CODES:
        assert re.search(rf"^ +{code}  {re.escape(meaning)}$", out, re.M)
    assert "README" in out


def test_no_command_and_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: hilfarm" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["flash"])
    assert exited.value.code == 2
    with pytest.raises(SystemExit) as exited:
        main(["health", "--timeout", "soon"])
    assert exited.value.code == 2
