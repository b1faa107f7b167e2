"""Writing and merging rack files: comments, keys and ids a person wrote survive (no udev)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from pytest_hilfarm.description.rack import load_rack
from pytest_hilfarm.drivers.discovery.rackwrite import (
    DiscoveredBoard,
    choose_identity,
    new_board_id,
    write_rack,
)
from pytest_hilfarm.drivers.discovery.udev import Adapter, ProbeResult
from pytest_hilfarm.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "rack-configs" / "esp32-mesh-rig.example.yaml"
NOW = datetime(2026, 11, 28, tzinfo=timezone.utc)


def adapter(node: str, usb_path: str, vid: str = "10c4", pid: str = "ea60",
            serial: str | None = None, interface: str = "1.0", links: tuple[str, ...] = (),
            product: str = "CP2102N USB to UART Bridge Controller") -> Adapter:
    return Adapter(device_node=node, sys_path=f"/sys/devices/x/{usb_path}/{node[5:]}",
                   usb_path=usb_path, interface=interface, vendor_id=vid, product_id=pid,
                   usb_serial=serial, product=product, by_id=links)


def probed(chip: str, name: str, mac: str) -> ProbeResult:
    return ProbeResult(chip, name, mac, f"{name} (revision v1.0)")


DEVKITC_1 = adapter(
    "/dev/ttyUSB0", "1-1.1", serial="3c0e5a1f6b2aec11b2f0a1b2c3d4e5f6",
    links=("/dev/serial/by-id/usb-Silicon_Labs_CP2102N_USB_to_UART_Bridge_Controller_"
           "3c0e5a1f6b2aec11b2f0a1b2c3d4e5f6-if00-port0",))
NEW_CP = adapter("/dev/ttyUSB7", "1-1.6", serial="0123456789abcdef0123456789abcdef")
NEW_CH340 = adapter("/dev/ttyUSB8", "1-1.7", vid="1a86", pid="7523", product="USB Serial")
C3 = adapter("/dev/ttyACM3", "1-3", vid="303a", pid="1001", serial="84:F7:03:00:00:01",
             product="USB JTAG/serial debug unit")


def test_merge_into_the_example_keeps_every_comment_key_and_id(tmp_path: Path) -> None:
    rack_file = tmp_path / "mesh.yaml"
    original = EXAMPLE.read_text()
    rack_file.write_text(original)
    report = write_rack(rack_file, [
        DiscoveredBoard(DEVKITC_1, probed("esp32", "ESP32-D0WD-V3", "24:0a:c4:00:00:01"),
                        ("1-1", 1)),
        DiscoveredBoard(NEW_CP, probed("esp32", "ESP32-D0WD-V3", "24:0a:c4:00:00:02"),
                        ("1-1", 6)),
        DiscoveredBoard(NEW_CH340),
    ], now=NOW)
    text = rack_file.read_text()
    # Everything that was there is still there, line for line and in order.
    old_lines = original.splitlines()
    new_lines = text.splitlines()
    assert new_lines[:len(old_lines)] == old_lines
    added = "\n".join(new_lines[len(old_lines):])
    assert "added by hilfarm discover 2026-11-28" in added
    assert "MAC 24:0a:c4:00:00:02" in added
    rack = load_rack(rack_file)
    assert [b.id for b in rack.boards][-2:] == ["esp32-1", "unknown-1"]
    new = rack.board("esp32-1")
    assert (new.chip, new.port.kind, new.port.value) == (
        "esp32", "usb_serial", "0123456789abcdef0123456789abcdef")
    assert (new.power.driver, dict(new.power.params)) == ("uhubctl", {"hub": "1-1", "port": 6})
    unknown = rack.board("unknown-1")
    assert (unknown.port.kind, unknown.port.value) == ("usb_path", "1-1.7")
    assert "unknown-1" in added and "not probed: the chip is a guess" in added
    actions = {u.board_id: u.action for u in report.updates}
    assert actions == {"devkitc-1": "unchanged", "esp32-1": "added", "unknown-1": "added"}
    assert report.changed and not report.created


def test_a_second_run_changes_nothing(tmp_path: Path) -> None:
    rack_file = tmp_path / "rig.yaml"
    found = [DiscoveredBoard(NEW_CP, probed("esp32", "ESP32", "24:0a:c4:00:00:02")),
             DiscoveredBoard(C3)]
    first = write_rack(rack_file, found, now=NOW)
    assert first.created
    text = rack_file.read_text()
    second = write_rack(rack_file, found, now=NOW)
    assert not second.changed
    assert rack_file.read_text() == text
    assert {u.action for u in second.updates} == {"unchanged"}


def test_power_is_added_to_a_board_that_has_none_but_never_overwritten(tmp_path: Path) -> None:
    rack_file = tmp_path / "rig.yaml"
    rack_file.write_text(
        "version: 1\nname: rig\nboards:\n"
        "  # my first board\n"
        "  - id: alice  # on the left\n    chip: esp32\n"
        '    usb_serial: "0123456789abcdef0123456789abcdef"\n'
        "  - id: bob\n    chip: esp32c3\n    usb_path: 1-3\n"
        "    power: {driver: uhubctl, hub: '2', port: 1}\n")
    report = write_rack(rack_file, [
        DiscoveredBoard(NEW_CP, power=("1-1", 6)),
        DiscoveredBoard(C3, probed("esp32c3", "ESP32-C3", "84:f7:03:00:00:01"), ("1", 3)),
    ], now=NOW)
    by_id = {u.board_id: u for u in report.updates}
    assert by_id["alice"].action == "power-added"
    assert by_id["bob"].action == "conflict"
    assert "the rack says power uhubctl" in by_id["bob"].detail
    rack = load_rack(rack_file)
    assert dict(rack.board("alice").power.params) == {"hub": "1-1", "port": 6}
    assert dict(rack.board("bob").power.params) == {"hub": "2", "port": 1}
    text = rack_file.read_text()
    assert "# my first board" in text and "- id: alice  # on the left" in text


def test_root_hub_locations_are_quoted_so_they_load_as_text(tmp_path: Path) -> None:
    rack_file = tmp_path / "rig.yaml"
    write_rack(rack_file, [DiscoveredBoard(C3, power=("1", 3))], now=NOW)
    assert 'hub: "1"' in rack_file.read_text()
    board = load_rack(rack_file).board("unknown-1")
    # Its USB-Serial/JTAG makes it an ESP32-C3 among the chips racks hold, reset through USB.
    assert (board.chip, board.reset) == ("esp32c3", "usb-jtag")
    assert board.power.params["hub"] == "1"


def test_identity_prefers_a_unique_serial_else_the_physical_path() -> None:
    clone_a = adapter("/dev/ttyUSB0", "1-1.1", serial="0001")
    clone_b = adapter("/dev/ttyUSB1", "1-1.2", serial="0001")
    ft_a = adapter("/dev/ttyUSB2", "1-2", vid="0403", pid="6010", serial="FT1")
    ft_b = adapter("/dev/ttyUSB3", "1-2", vid="0403", pid="6010", serial="FT1", interface="1.1")
    everyone = [NEW_CP, NEW_CH340, clone_a, clone_b, ft_a, ft_b]
    assert choose_identity(NEW_CP, everyone) == ("usb_serial", NEW_CP.usb_serial)
    assert choose_identity(NEW_CH340, everyone) == ("usb_path", "1-1.7")  # no serial
    assert choose_identity(clone_a, everyone) == ("usb_path", "1-1.1")  # shared serial
    assert choose_identity(ft_b, everyone) == ("usb_path", "1-2:1.1")  # one of two ports
    # A serial another board of the rack already uses is no identity for a new one.
    assert choose_identity(NEW_CP, everyone, {NEW_CP.usb_serial or ""})[0] == "usb_path"


def test_new_ids_fill_the_first_gap() -> None:
    assert new_board_id("esp32", ["esp32-1", "esp32-2", "esp32-3"]) == "esp32-4"
    assert new_board_id("esp32", ["esp32-2"]) == "esp32-1"
    assert new_board_id("unknown", []) == "unknown-1"


def test_a_chip_racks_cannot_hold_is_reported_not_added(tmp_path: Path) -> None:
    rack_file = tmp_path / "rig.yaml"
    s3 = ProbeResult(None, "ESP32-S3", "f4:12:fa:00:00:01")
    report = write_rack(rack_file, [DiscoveredBoard(NEW_CP, s3), DiscoveredBoard(C3)], now=NOW)
    assert [u.action for u in report.updates] == ["skipped", "added"]
    assert "ESP32-S3" in report.updates[0].detail
    assert [b.id for b in load_rack(rack_file).boards] == ["unknown-1"]


def test_a_broken_rack_is_refused_with_its_own_error(tmp_path: Path) -> None:
    rack_file = tmp_path / "rig.yaml"
    broken = "version: 1\nname: rig\nboards:\n  - id: a\n    chip: esp33\n    usb_path: 1-1.1\n"
    rack_file.write_text(broken)
    with pytest.raises(ConfigError, match="chip"):
        write_rack(rack_file, [DiscoveredBoard(NEW_CP)], now=NOW)
    assert rack_file.read_text() == broken


def test_an_adapter_two_boards_claim_is_a_conflict(tmp_path: Path) -> None:
    rack_file = tmp_path / "rig.yaml"
    rack_file.write_text(
        "version: 1\nname: rig\nboards:\n"
        '  - id: a\n    chip: esp32\n    usb_serial: "0123456789abcdef0123456789abcdef"\n'
        "  - id: b\n    chip: esp32\n    usb_path: 1-1.6\n")
    report = write_rack(rack_file, [DiscoveredBoard(NEW_CP)], now=NOW)
    assert report.updates[0].action == "conflict"
    assert "boards a, b" in report.updates[0].detail
    assert not report.changed


@pytest.mark.parametrize("layout", [
    "version: 1\nname: lab\nsettings:\n    lock_timeout: 5\nboards: []\n",
    "version: 1\nname: lab\nboards:\n- id: x\n  chip: esp32\n  usb_path: 1-1.4\n",
    "version: 1\nname: lab\nboards:\n    -   id: x\n        chip: esp32\n        usb_path: 1-1.4\n",
])
def test_the_files_own_indentation_is_kept(tmp_path: Path, layout: str) -> None:
    rack_file = tmp_path / "lab.yaml"
    rack_file.write_text(layout)
    write_rack(rack_file, [DiscoveredBoard(NEW_CP)], now=NOW)
    text = rack_file.read_text()
    assert text.startswith(layout.replace("boards: []\n", ""))
    assert load_rack(rack_file).boards[-1].id == "unknown-1"
