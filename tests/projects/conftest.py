"""Shared pieces for the projects tests: a private virtual rack daemon, a Device on one of its
boards, and the real RISC-V build from tests/sim/realbuild.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sim"))

from realbuild import RealBuild, build  # noqa: E402

from pytest_hilfarm.board.console import Console  # noqa: E402
from pytest_hilfarm.board.device import Device  # noqa: E402
from pytest_hilfarm.drivers.power import VirtualPower  # noqa: E402
from pytest_hilfarm.drivers.reset import VirtualReset  # noqa: E402
from pytest_hilfarm.drivers.transports import open_port  # noqa: E402
from pytest_hilfarm.drivers.virtual import ControlClient  # noqa: E402


@pytest.fixture(scope="session")
def real(tmp_path_factory: pytest.TempPathFactory) -> RealBuild:
    """The real RISC-V app/bootloader (Debian's GCC + esptool elf2image)."""
    return build(tmp_path_factory.mktemp("riscv"))


@pytest.fixture(scope="module")
def rack(private_rack_daemon: tuple[dict[str, Any], Path]) -> dict[str, Any]:
    """A virtual rack daemon of this module's own (its own state dir): its daemon info."""
    return private_rack_daemon[0]


def board_of(info: dict[str, Any], chip: str) -> dict[str, Any]:
    return next(b for b in info["boards"] if b["chip"] == chip)


def open_device(info: dict[str, Any], board: dict[str, Any], log: Path) -> Device:
    control = ControlClient(info["control"])
    console = Console(lambda: open_port(board["port"]), log, name=board["id"])
    return Device(id=board["id"], chip=board["chip"], port=board["port"], mac=board["mac"],
                  console=console, reset=VirtualReset(control, board["id"]),
                  power=VirtualPower(control, board["id"]), boot_timeout=10)


def read_flash(info: dict[str, Any], board: dict[str, Any], offset: int, size: int,
               out: Path) -> bytes:
    """Read a board's flash back with the real esptool CLI (download mode through the rack's
    control endpoint, as a person pressing BOOT + EN would), then boot it again.
    """
    control = ControlClient(info["control"])
    control.reset(board["id"], boot="download")
    proc = subprocess.run(
        [sys.executable, "-m", "esptool", "--port", board["port"], "--before", "no-reset",
         "--after", "no-reset", "read-flash", hex(offset), hex(size), str(out)],
        capture_output=True, text=True, check=False, timeout=120)
    control.reset(board["id"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out.read_bytes()
