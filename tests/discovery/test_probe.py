"""probe(): never touches a reserved board, always hard-resets back to normal boot."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from pytest_hilfarm.description.rack import parse_rack
from pytest_hilfarm.drivers.discovery.udev import Adapter, probe
from pytest_hilfarm.errors import PortError, UsageError

C3 = Adapter(device_node="/dev/ttyACM1", sys_path="/sys/x/ttyACM1", usb_path="1-1.5",
             interface="1.0", vendor_id="303a", product_id="1001",
             usb_serial="84:F7:03:A1:B2:C3")
MODEM = Adapter(device_node="/dev/ttyUSB6", sys_path="/sys/x/ttyUSB6", usb_path="1-1.6",
                interface="1.0", vendor_id="12d1", product_id="1001")
RACK = parse_rack("""
version: 1
name: probing
boards:
  - id: c3
    chip: esp32c3
    usb_serial: "84:F7:03:A1:B2:C3"
    reset: usb-jtag
""")


class FakePort:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeLoader:
    CHIP_NAME = "ESP32-C3"

    def __init__(self, fail: bool = False) -> None:
        self._port = FakePort()
        self.fail = fail
        self.resets = 0

    def get_chip_description(self) -> str:
        return "ESP32-C3 (QFN32) (revision v0.4)"

    def read_mac(self) -> tuple[int, ...]:
        if self.fail:
            raise OSError(5, "Input/output error")
        return (0x84, 0xF7, 0x03, 0xA1, 0xB2, 0xC3)

    def hard_reset(self) -> None:
        self.resets += 1


def test_a_reserved_board_is_never_opened() -> None:
    opened: list[str] = []

    def connect(port: str) -> Any:
        opened.append(port)
        return FakeLoader()

    with pytest.raises(UsageError, match="board c3 is reserved"):
        probe(C3, lambda board: board == "c3", rack=RACK, connect=connect)
    assert opened == []


def test_an_unknown_adapter_is_not_probed() -> None:
    with pytest.raises(UsageError, match="not a known ESP adapter"):
        probe(MODEM, lambda board: False, connect=lambda port: pytest.fail("opened"))


def test_probe_reads_chip_and_mac_and_resets_to_normal_boot() -> None:
    loader = FakeLoader()
    result = probe(C3, lambda board: False, rack=RACK, connect=lambda port: loader)
    assert (result.chip, result.chip_name, result.mac) == ("esp32c3", "ESP32-C3",
                                                           "84:f7:03:a1:b2:c3")
    assert loader.resets == 1 and loader._port.closed


def test_a_failed_probe_still_resets_and_closes() -> None:
    loader = FakeLoader(fail=True)
    with pytest.raises(PortError, match="probing failed"):
        probe(C3, lambda board: False, connect=lambda port: loader)
    assert loader.resets == 1 and loader._port.closed


@pytest.fixture(scope="module")
def virtual_rack(private_virtual_rack: Path) -> Path:
    """The module's own virtual rack (tests/conftest.py), started; its sim state dir."""
    from pytest_hilfarm.sim import manager

    manager.up()
    return Path(os.environ["HILFARM_SIM_DIR"])


def test_real_esptool_probe_of_a_virtual_esp32c3(virtual_rack: Path) -> None:
    """The real esptool path (open, auto-detect, read MAC, hard reset) over RFC 2217."""
    from pytest_hilfarm.sim import manager

    info = manager.read_info()
    assert info is not None
    url = str(info.board("esp32c3-1").rfc2217)
    result = probe(C3, lambda board: False, port=url)
    assert (result.chip, result.chip_name) == ("esp32c3", "ESP32-C3")
    assert len(result.mac.split(":")) == 6
    boards = manager.control({"op": "status"})["boards"]
    mode = next(b["mode"] for b in boards if b["id"] == "esp32c3-1")
    assert mode != "download"  # back to a normal boot (nothing flashed yet: its boot loop)
