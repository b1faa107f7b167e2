"""hilfarm status|flash|health|board|lock|unlock|console against the virtual rack."""

from __future__ import annotations

import json
import subprocess
import sys
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


def test_status_lists_boards(rack: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = status(rack, capsys)
    assert set(rows) == {"esp32-1", "esp32-2", "esp32c3-1"}
    assert rows["esp32c3-1"]["chip"] == "esp32c3"
    assert main(["status", "--rack", str(rack)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["BOARD", "CHIP", "HEALTH"]


def test_flash_writes_then_skips_identical(rack: Path, build: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flash", "--rack", str(rack), "esp32-1", str(build)]) == 0
    first = capsys.readouterr()
    assert "0x10000" in first.out and "written" in first.out
    assert "100%" in first.err  # the progress bar
    assert main(["flash", "--rack", str(rack), "esp32-1", str(build)]) == 0
    second = capsys.readouterr().out
    assert second.count("identical, skipped") == 3
    assert status(rack, capsys)["esp32-1"]["firmware"]


def test_flash_several_boards_in_parallel(rack: Path, build: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flash", "--rack", str(rack), "esp32-1,esp32-2", str(build)]) == 0
    out = capsys.readouterr().out
    for board in ("esp32-1", "esp32-2"):
        assert f"{board}: 0x10000 " in out
    assert "esp32-1, esp32-2: done in" in out
    rows = status(rack, capsys)
    assert rows["esp32-1"]["firmware"] == rows["esp32-2"]["firmware"] is not None


def test_flash_wrong_chip_is_refused_with_a_clear_error(
        rack: Path, build: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flash", "--rack", str(rack), "esp32c3-1", str(build)]) == 1
    err = capsys.readouterr().err
    assert "esp32" in err and "esp32c3" in err and "hilfarm: error:" in err


def test_unknown_board_gets_did_you_mean(rack: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["board", "quarantine", "--rack", str(rack), "esp32c3-l"]) == 1
    assert "esp32c3-1" in capsys.readouterr().err


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


def test_health_check_brings_a_board_to_good(rack: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", "--rack", str(rack), "esp32c3-1"]) == 0
    assert "esp32c3-1: GOOD" in capsys.readouterr().out


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


def test_console_shows_the_app_and_sends_input(rack: Path, build: Path) -> None:
    assert main(["flash", "--rack", str(rack), "esp32-1", str(build)]) == 0
    proc = subprocess.run(
        [sys.executable, "-m", "pytest_hilfarm", "console", "--rack", str(rack), "esp32-1",
         "--reset"],
        input="version\n", capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "project: cli-demo" in proc.stdout
