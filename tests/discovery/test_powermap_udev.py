"""Power-port mapping and the discover command against umockdev devices and a stand-in uhubctl."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import pytest

from pytest_hilfarm.cli import discover
from pytest_hilfarm.description.rack import load_rack, parse_rack
from pytest_hilfarm.drivers.discovery.powermap import list_hubs, map_power
from pytest_hilfarm.drivers.discovery.udev import list_adapters

pytestmark = pytest.mark.umockdev

FAST: dict[str, Any] = {"off_timeout": 0.3, "on_timeout": 2.0, "settle": 0.05, "poll": 0.02}


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def switched(log: Path) -> list[tuple[str, str, str]]:
    return [(c[1], c[3], c[5]) for c in calls(log) if "-a" in c]


def all_ports_on(log: Path) -> bool:
    state = json.loads(Path(os.environ["HILFARM_FAKE_UHUBCTL"] + ".state").read_text())
    return all(port["on"] for port in state.values())


def test_maps_each_switchable_port_and_restores_them_all(fake_uhubctl: Path) -> None:
    hubs = list_hubs()
    assert [(h.location, h.switching, len(h.ports)) for h in hubs] == [
        ("1-1", "ppps", 7), ("1", "ganged", 2)]
    result = map_power(hubs, lambda board: False, **FAST)
    outcomes = {(r.hub, r.port): r.outcome for r in result.results}
    assert outcomes == {
        ("1-1", 1): "mapped", ("1-1", 2): "no-switching", ("1-1", 3): "mapped",
        ("1-1", 4): "mapped", ("1-1", 5): "mapped",
    }
    # Port 6 has only a modem behind it and port 7 nothing: never switched. The root hub is
    # ganged (all ports at once): skipped.
    assert switched(fake_uhubctl) == [
        ("1-1", "1", "off"), ("1-1", "1", "on"), ("1-1", "2", "off"), ("1-1", "2", "on"),
        ("1-1", "3", "off"), ("1-1", "3", "on"), ("1-1", "4", "off"), ("1-1", "4", "on"),
        ("1-1", "5", "off"), ("1-1", "5", "on"),
    ]
    assert all_ports_on(fake_uhubctl)
    adapters = {a.device_node: a for a in list_adapters()}
    # The CP2102N came back as /dev/ttyUSB1 and is still recognised by its identity.
    assert "/dev/ttyUSB0" not in adapters
    assert result.power_of(adapters["/dev/ttyUSB1"]) == ("1-1", 1)
    assert result.power_of(adapters["/dev/ttyACM0"]) == ("1-1", 3)
    assert result.power_of(adapters["/dev/ttyACM1"]) == ("1-1", 5)
    assert result.power_of(adapters["/dev/ttyUSB2"]) is None  # its hub port only pretends
    mapped = next(r for r in result.results if (r.hub, r.port) == ("1-1", 1))
    assert [a.device_node for a in mapped.gone] == ["/dev/ttyUSB0"]
    assert [a.device_node for a in mapped.back] == ["/dev/ttyUSB1"]


def test_never_switches_a_reserved_board(fake_uhubctl: Path) -> None:
    rack = parse_rack("""
version: 1
name: reserved
boards:
  - id: held-c3
    chip: esp32c3
    usb_serial: "84:F7:03:A1:B2:C3"
    reset: usb-jtag
  - id: gone-but-held
    chip: esp32
    usb_serial: "not-here"
    power: {driver: uhubctl, hub: 1-1, port: 4}
  - id: free-ch9102
    chip: esp32
    usb_path: 1-1.3
""")
    asked: list[str] = []

    def reserved(board: str) -> bool:
        asked.append(board)
        return board in ("held-c3", "gone-but-held")

    result = map_power(list_hubs(), reserved, rack=rack, **FAST)
    outcomes = {(r.hub, r.port): r.outcome for r in result.results}
    assert outcomes[("1-1", 5)] == "reserved"
    assert outcomes[("1-1", 4)] == "reserved"  # the rack says it powers a reserved board
    assert outcomes[("1-1", 3)] == "mapped"
    ports = {(hub, port) for hub, port, _ in switched(fake_uhubctl)}
    assert ("1-1", "5") not in ports and ("1-1", "4") not in ports
    assert {"held-c3", "gone-but-held", "free-ch9102"} <= set(asked)
    assert all_ports_on(fake_uhubctl)


def run_discover(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="hilfarm")
    discover.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["discover", *argv])
    return int(args.handler(args))


def test_discover_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_discover() == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["PORT", "KIND", "VID:PID", "USB", "PATH", "SERIAL", "BOARD",
                                "CHIP", "MAC", "POWER"]
    assert any(line.split()[:3] == ["/dev/ttyACM1", "usb-serial-jtag", "303a:1001"]
               for line in lines)
    assert "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0" in out


def test_discover_map_power_write_json_then_merge_again(
        fake_uhubctl: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HILFARM_RACK", raising=False)
    rack_file = tmp_path / "bench-rig.yaml"
    assert run_discover("--map-power", "--off-timeout", "0.5", "--write", str(rack_file),
                        "--json") == 0
    report = json.loads(capsys.readouterr().out)
    rack = load_rack(rack_file)
    assert rack.name == "bench-rig"
    ids = {b.id: b for b in rack.boards}
    # Not probed: ids say "unknown", chips are guesses (the C3's USB-Serial/JTAG is certain).
    assert sorted(ids) == [f"unknown-{n}" for n in range(1, 8)]
    by_port = {(b.port.kind, b.port.value): b for b in rack.boards}
    cp2102n = by_port[("usb_serial", "3c0e5a1f6b2aec11b2f0a1b2c3d4e5f6")]
    assert (cp2102n.power.driver, dict(cp2102n.power.params)) == (
        "uhubctl", {"hub": "1-1", "port": 1})
    c3 = by_port[("usb_serial", "84:F7:03:A1:B2:C3")]
    assert (c3.chip, c3.reset) == ("esp32c3", "usb-jtag")
    assert by_port[("usb_path", "1-1.2")].power.driver == "none"  # CH340: no serial, no switch
    assert ("usb_path", "1-2:1.0") in by_port and ("usb_path", "1-2:1.1") in by_port
    assert not any(b.port.value.startswith("/dev/tty") for b in rack.boards)
    text = rack_file.read_text()
    assert "not probed: the chip is a guess" in text
    assert report["write"]["created"] is True
    assert {row["device_node"] for row in report["adapters"]} >= {"/dev/ttyUSB1"}

    # A person edits the file: renames a board, adds a comment and a key.
    text = text.replace("id: unknown-1", "id: my-devkit  # the one with the sensor")
    text = text.replace("version: 1", "version: 1\n# calibrated on Monday\n")
    rack_file.write_text(text)
    assert run_discover("--write", str(rack_file), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["write"]["changed"] is False
    assert {u["action"] for u in report["write"]["updates"]} == {"unchanged"}
    again = rack_file.read_text()
    assert "id: my-devkit  # the one with the sensor" in again
    assert "# calibrated on Monday" in again


def test_discover_writes_into_a_skeleton_a_person_started(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HILFARM_RACK", raising=False)
    rack_file = tmp_path / "lab.yaml"
    rack_file.write_text("# the lab rig, room 2.14\nversion: 1\nname: lab\nboards: []\n")
    assert run_discover("--write", str(rack_file)) == 0
    assert "rack file" in capsys.readouterr().out
    text = rack_file.read_text()
    assert text.startswith("# the lab rig, room 2.14\n")
    assert len(load_rack(rack_file).boards) == 7  # every ESP adapter, not the modem


def test_discover_refuses_a_broken_rack_before_touching_anything(
        fake_uhubctl: Path, tmp_path: Path) -> None:
    from pytest_hilfarm.errors import ConfigError

    rack_file = tmp_path / "lab.yaml"
    rack_file.write_text("version: 1\nname: lab\nboards:\n  - id: a\n    chip: esp33\n"
                         "    usb_path: 1-1.1\n")
    with pytest.raises(ConfigError, match="chip"):
        run_discover("--map-power", "--write", str(rack_file))
    assert not fake_uhubctl.exists() or switched(fake_uhubctl) == []
