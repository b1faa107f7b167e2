"""Per-board data and health checks that look past the banner, on the virtual rack.

The rack's ``nvs:`` gives every board its own NVS partition (device id, MAC, Wi-Fi), written
with the candidate as part of preparing the board; a baseline that crashes right after it
starts fails the health check instead of leaving the board GOOD.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pytest_hilfarm.description.settings import ImageSpec
from pytest_hilfarm.errors import InfrastructureError
from pytest_hilfarm.farm import Farm
from pytest_hilfarm.projects.nvs import read_nvs
from pytest_hilfarm.sim.appbuild import write_build_dir
from pytest_hilfarm.sim.model import Faults
from pytest_hilfarm.store import BoardHealth

RACK = """\
version: 1
name: board-data
nvs: {csv: identity.csv, values: {ssid: lab}}
boards:
  - {id: d-1, chip: esp32, port: virtual, reset: virtual, power: virtual}
  - {id: d-2, chip: esp32, port: virtual, reset: virtual, power: virtual,
     nvs: {values: {ssid: bench}}}
"""
CSV = """\
key,type,encoding,value
identity,namespace,,
device_id,data,string,{board_id}
mac,data,string,{mac}
net,namespace,,
ssid,data,string,{ssid}
"""


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory, private_virtual_rack: Path) -> Farm:
    root = tmp_path_factory.mktemp("board-data")
    (root / "rack.yaml").write_text(RACK)
    (root / "identity.csv").write_text(CSV)
    f = Farm.open(root / "rack.yaml", log_root=root / "logs")
    yield f
    f.close()


def test_each_board_gets_its_own_nvs_partition(farm: Farm, tmp_path: Path) -> None:
    build = write_build_dir(tmp_path / "app", "esp32", "identity-demo", "1.0.0").path
    with farm.session(2, firmware=build) as s:
        by_id = {d.id: d for d in s.devices}
        for dev in s.devices:
            assert "version: 1.0.0" in dev.command("version")  # the app still runs
    for board_id, ssid in (("d-1", "lab"), ("d-2", "bench")):
        dev = farm.open_device(board_id)
        try:
            dev.console.pause()
            try:
                # The real esptool reads the NVS partition (0x9000, 24 KiB) back.
                dev.reset_driver.reset_to_download()
                out = tmp_path / f"{board_id}-nvs.bin"
                subprocess.run([sys.executable, "-m", "esptool", "--chip", "esp32", "--port",
                                dev.port, "--before", "no-reset", "--after", "no-reset",
                                "read-flash", "0x9000", "0x6000", str(out)],
                               check=True, capture_output=True, timeout=120)
                data = out.read_bytes()
            finally:
                dev.console.resume()
        finally:
            dev.console.close()
        values = read_nvs(data)
        assert values["identity"]["device_id"] == board_id
        assert values["identity"]["mac"] == by_id[board_id].mac.lower()
        assert values["net"]["ssid"] == ssid
    # Unchanged data is not written again: the next session sends nothing.
    with farm.session(2, firmware=build) as again:
        assert all(b.report is None for b in again.boards)


def test_baseline_that_crashes_after_it_starts_fails_the_health_check(
        farm: Farm, tmp_path: Path) -> None:
    crashing = write_build_dir(tmp_path / "crash", "esp32", "bad-baseline", "0.0.1",
                               faults=Faults(crash_at_boot=True)).path
    farm.baseline_override = ImageSpec(by_chip={"esp32": crashing})
    try:
        farm.store.set_health("d-1", BoardHealth.UNKNOWN, "test")
        with pytest.raises(InfrastructureError, match="crashed right after it started"):
            farm.start_session(1, chip="esp32", exclude=["d-2"])
        events = farm.store.health_history("d-1")
        assert any(e.new == "BAD" and "crashed right after it started" in e.reason
                   for e in events), events
        assert farm.store.health("d-1").health is not BoardHealth.GOOD
    finally:
        farm.baseline_override = None


def test_custom_reset_sequences_from_the_rack_file_flash_and_boot(farm: Farm,
                                                                   tmp_path: Path) -> None:
    # d-2's UART over RFC 2217 (it carries DTR/RTS to the DevKit circuit), driven by the rack
    # file's own sequences in esptool's syntax: the classic download entry, an EN pulse to boot.
    entry = next(b for b in farm.virtual_info()["boards"] if b["id"] == "d-2")
    rack = tmp_path / "custom.yaml"
    rack.write_text(
        "version: 1\nname: custom-reset\nboards:\n"
        f"  - {{id: d-2, chip: esp32, port: '{entry['rfc2217']}', power: none,\n"
        "     reset: {download: 'D0|R1|W0.1|D1|R0|W0.05|D0', app: 'D0|R1|W0.1|R0'}}\n")
    build = write_build_dir(tmp_path / "app", "esp32", "custom-reset", "2.0.0").path
    with Farm.open(rack, log_root=tmp_path / "logs") as other:
        other.store.set_health("d-2", BoardHealth.GOOD, "test")
        with other.session(1, firmware=build, boot_timeout=20) as s:
            assert s.boards[0].report is not None and s.boards[0].report.written
            assert s.devices[0].boot_info().app_version == "2.0.0"


def test_a_bad_reset_sequence_is_named_with_its_line(tmp_path: Path) -> None:
    from pytest_hilfarm.description.rack import load_rack
    from pytest_hilfarm.errors import ConfigError

    rack = tmp_path / "bad.yaml"
    rack.write_text("version: 1\nname: bad\nboards:\n"
                    "  - id: b\n    chip: esp32\n    port: /dev/ttyUSB0\n"
                    "    reset: {download: 'D0|R2|W0.1'}\n")
    with pytest.raises(ConfigError) as err:
        load_rack(rack)
    text = str(err.value)
    assert "bad.yaml:7" in text and "R2" in text and "D<0|1>" in text
