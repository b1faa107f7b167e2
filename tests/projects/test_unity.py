"""Unity unit-test apps: the menu, per-case results, crashes; end to end on a virtual board."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import board_of, open_device

from pytest_hilfarm.errors import ConsoleTimeout, UsageError
from pytest_hilfarm.projects.unity import UnityRunner, parse_menu, parse_results, select
from pytest_hilfarm.sim import appbuild
from pytest_hilfarm.sim.model import Faults

# As unity_runner.c print_test_menu() prints it (tab after the number; sub-cases indented).
MENU = (
    "\r\n\r\nHere's the test menu, pick your combo:\r\n"
    '(1)\t"gpio output level" [gpio]\r\n'
    '(2)\t"gpio interrupt" [gpio][timeout=60]\r\n'
    '(3)\t"deep sleep wakeup" [sleep][multi_stage]\r\n'
    '\t(1)\t"trigger_deepsleep"\r\n'
    '\t(2)\t"check_wakeup"\r\n'
    '(4)\t"flaky radio" [wifi][ignore]\r\n'
    "\r\nEnter test for running.\r\n"
)


def test_menu_cases_groups_and_tags() -> None:
    body = re.search(r"pick your combo:(.*)Enter test", MENU, re.S)
    assert body is not None
    cases = parse_menu(body.group(1))
    assert [(c.index, c.name, c.groups, c.kind) for c in cases] == [
        (1, "gpio output level", ("gpio",), "normal"),
        (2, "gpio interrupt", ("gpio",), "normal"),
        (3, "deep sleep wakeup", ("sleep",), "multi_stage"),
        (4, "flaky radio", ("wifi",), "normal"),
    ]
    assert cases[1].attributes == (("timeout", "60"),)
    assert cases[2].subcases == ("trigger_deepsleep", "check_wakeup")
    assert cases[3].ignored and not cases[0].ignored
    assert [c.index for c in select(cases)] == [1, 2, 3]  # [ignore] left out
    assert [c.index for c in select(cases, group="[gpio]")] == [1, 2]
    assert [c.index for c in select(cases, name="flaky radio")] == [4]  # named: run anyway
    with pytest.raises(UsageError, match=r"(?s)no Unity case in group \[adc\].*gpio, sleep, wifi"):
        select(cases, group="adc")
    with pytest.raises(UsageError, match="no Unity case named 'nope'"):
        select(cases, name="nope")
    with pytest.raises(UsageError, match="unrecognised line"):
        parse_menu("(1) missing quotes [x]\n")


def test_result_lines() -> None:
    text = ("Running gpio output level...\r\n/idf/components/driver/test/test_gpio.c:112:gpio "
            "output level:FAIL: Expected 1 Was 0\r\nx.c:5:other: thing:PASS\r\n"
            "x.c:9:skipped one:IGNORE\r\n")
    assert parse_results(text) == [
        ("gpio output level", "failed", "Expected 1 Was 0",
         "/idf/components/driver/test/test_gpio.c", 112),
        ("other: thing", "passed", "", "x.c", 5),
        ("skipped one", "skipped", "", "x.c", 9),
    ]


class ScriptedConsole:
    """A console whose board answers each written line through ``answer``."""

    def __init__(self, answer: Callable[[str], str], start: str) -> None:
        self.buf = start
        self.pos = 0
        self.answer = answer

    def write(self, data: str) -> None:
        self.buf += self.answer(data)

    def expect(self, pattern: str | re.Pattern[str], timeout: float = 10.0) -> re.Match[str]:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        match = regex.search(self.buf, self.pos)
        if match is None:
            raise ConsoleTimeout(f"{regex.pattern!r} did not appear", where="scripted")
        self.pos = match.end()
        return match


def test_a_case_that_never_starts_or_never_ends() -> None:
    def answer(line: str) -> str:
        if line == "\n":
            return MENU
        if line == "1\n":
            return "Running gpio output level...\r\nstuck in a loop\r\n"
        return ""  # the board ignores the input

    runner = UnityRunner(ScriptedConsole(answer, "Press ENTER to see the list of tests.\r\n"),
                         case_timeout=0.1)
    hung, dead = runner.run([runner.menu()[0], runner.menu()[1]])
    assert (hung.outcome, hung.message) == ("failed", "no result within 0.1 s")
    assert dead.outcome == "error" and dead.message.startswith("the case did not start")
    multi = runner.run([runner.menu()[2]])[0]
    assert multi.outcome == "skipped" and "multi_stage cases are not run" in multi.message


# -- end to end on the virtual rack -----------------------------------------------------------


@pytest.fixture()
def unity_device(rack, tmp_path: Path):
    tmp = tmp_path
    board = board_of(rack, "esp32c3")
    build = appbuild.write_build_dir(tmp / "build", "esp32c3", "unit_test_app", "1.0",
                                     faults=Faults(unity_menu=True))
    device = open_device(rack, board, tmp / "dut.log")
    device.flash(build.path)
    yield device
    device.console.close()


def test_unity_app_on_a_virtual_board(unity_device) -> None:
    runner = UnityRunner(unity_device, case_timeout=10, ready_timeout=15)
    cases = runner.menu()
    assert len(cases) == 7 and cases[5].groups == ("panic",) and cases[6].ignored
    results = runner.run_all()
    assert [(r.name, r.outcome) for r in results] == [
        ("sensor values are plausible", "passed"),
        ("battery voltage is in range", "passed"),
        ("mesh node id is stable", "passed"),
        ("config checksum matches", "failed"),
        ("wear levelling on this flash", "skipped"),
        ("null pointer store", "failed"),
    ]
    checksum, ignored, crashed = results[3], results[4], results[5]
    assert checksum.message == "Expected 0x5A17C0DE Was 0x5A17C0DF"
    assert (checksum.file, checksum.line) == ("main/test_demo_app.c", 63)
    assert ignored.message == "not supported on a virtual board"
    assert crashed.reset and crashed.message.startswith(
        "the board reset during the case: Guru Meditation Error")
    assert "Store access fault" in crashed.text and "MEPC" in crashed.text
    # Each result holds its own case's output only.
    assert "temperature" in results[0].text and "checksum" not in results[0].text
    assert all(r.duration >= 0.04 for r in results[:5])
    # The board came back to its menu after the crash: the next cases still run.
    storage = runner.run_group("[storage]")
    assert [r.outcome for r in storage] == ["failed", "skipped"]
    assert runner.run_case("sensor soak over an hour").outcome == "passed"  # named [ignore]


def test_unity_cannot_run_a_real_build_on_a_virtual_board(rack, real, tmp_path: Path) -> None:
    # A real build is not the demo app: the board says it cannot run it, and the runner
    # passes that on instead of waiting for a menu that never comes.
    from pytest_hilfarm.board.device import AppCannotRun

    board = board_of(rack, "esp32c3")
    device = open_device(rack, board, tmp_path / "dut.log")
    try:
        device.flash([(0x0, real.bootloader_bin), (0x8000, _factory_table()),
                      (0x10000, real.app_bin)])
        with pytest.raises(AppCannotRun):
            UnityRunner(device, ready_timeout=2).menu()
    finally:
        device.console.close()


def _factory_table() -> bytes:
    from pytest_hilfarm.esp.partitions import layout

    return layout("factory").encode()
