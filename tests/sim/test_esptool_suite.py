"""Scenarios of esptool's own hardware test suite, and the S3/C6, revision, MAC and flash-size
set-up, run with the real esptool (CLI subprocesses and its public API) against a private
virtual rack.

Each scenario failed on the earlier simulator: the stub answered MEM_BEGIN with "unsupported"
(stub reuse without sync), the ROM answered flash commands before SPI_ATTACH (flash size
detected without attaching), the C3 ignored the RTC watchdog (stayed in the stub), the C3's
eFuses said v0.0 while its boot log said v0.4, and only ESP32/S2/C3 existed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from realbuild import RealBuild, build, write_build_dir

from pytest_hilfarm.board.console import Console
from pytest_hilfarm.board.device import AppCannotRun, Device
from pytest_hilfarm.drivers.power import VirtualPower
from pytest_hilfarm.drivers.reset import VirtualReset
from pytest_hilfarm.drivers.transports import open_port
from pytest_hilfarm.drivers.virtual import ControlClient
from pytest_hilfarm.errors import ImageError
from pytest_hilfarm.esp.partitions import layout
from pytest_hilfarm.sim import manager
from pytest_hilfarm.sim.appbuild import build_app, build_flash_layout

RACK = """\
version: 1
name: esptool-suite
boards:
  - {id: esp32-1, chip: esp32, port: virtual}
  - {id: esp32s2-1, chip: esp32s2, port: virtual}
  - {id: esp32c3-1, chip: esp32c3, port: virtual}
  - {id: esp32s3-1, chip: esp32s3, port: virtual}
  - {id: esp32c6-1, chip: esp32c6, port: virtual}
  - id: esp32c3-old
    chip: esp32c3
    port: virtual
    sim: {revision: "v0.2", mac: "58:cf:79:aa:bb:01", flash_size: 8MB}
"""
BOARDS = {"esp32": "esp32-1", "esp32s2": "esp32s2-1", "esp32c3": "esp32c3-1",
          "esp32s3": "esp32s3-1", "esp32c6": "esp32c6-1"}
NAMES = {"esp32": "ESP32", "esp32s2": "ESP32-S2", "esp32c3": "ESP32-C3",
         "esp32s3": "ESP32-S3", "esp32c6": "ESP32-C6"}
# Current silicon per chip (sim/chips.py): ESP32 v3.1, S2 v1.0, C3 v0.4, S3 v0.2, C6 v0.1.
REVISIONS = {"esp32": "v3.1", "esp32s2": "v1.0", "esp32c3": "v0.4", "esp32s3": "v0.2",
             "esp32c6": "v0.1"}


@pytest.fixture(scope="module")
def rack(private_virtual_rack: Path) -> Path:
    rack_file = private_virtual_rack / "rack.yaml"
    rack_file.write_text(RACK)
    manager.up(rack_file)
    return rack_file


def url(board_id: str, kind: str = "port") -> str:
    info = manager.read_info()
    assert info is not None
    return str(getattr(info.board(board_id), kind))


def ctl(**request: object) -> dict:
    answer = manager.control(dict(request))
    assert answer["ok"], answer
    return answer


def status(board_id: str) -> dict:
    return next(b for b in manager.control({"op": "status"})["boards"] if b["id"] == board_id)


def esptool(*args: str, port: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "esptool", "--port", port, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.parametrize("chip", ["esp32", "esp32c3"])
def test_stub_reuse_without_synchronization(rack: Path, chip: str) -> None:
    # esptool's TestStubReuse.test_stub_reuse_without_synchronization: the second run does not
    # sync, so it uploads the stub again through the running stub (MEM_BEGIN/DATA/END). Over
    # rfc2217:// as esptool's suite runs it: on socket:// esptool turns every --before into
    # no-reset, which syncs and finds the stub.
    board = BOARDS[chip]
    ctl(op="reset", board=board, boot="download")
    port = url(board, "rfc2217")
    out = ok(esptool("--chip", chip, "--before", "no-reset", "--after", "no-reset-stub",
                     "flash-id", port=port))
    assert "Manufacturer:" in out
    out = ok(esptool("--chip", chip, "--before", "no-reset-no-sync", "--after",
                     "no-reset-stub", "flash-id", port=port))
    assert "Manufacturer:" in out and "Detected flash size: 4MB" in out
    assert status(board)["mode"] == "stub"


ATTACH_SCRIPT = """
import sys
from esptool.cmds import attach_flash, detect_chip, flash_id
esp = detect_chip(sys.argv[1], connect_mode="no-reset")
try:
    print("--- before attach")
    flash_id(esp)
    attach_flash(esp)
    print("--- after attach")
    flash_id(esp)
finally:
    esp._port.close()
"""


@pytest.mark.parametrize("chip", ["esp32", "esp32c3"])
def test_attach_flash(rack: Path, chip: str) -> None:
    # esptool's test_attach_flash: in ROM mode nothing talks to the flash until it is attached.
    board = BOARDS[chip]
    ctl(op="reset", board=board, boot="download")
    proc = subprocess.run([sys.executable, "-c", ATTACH_SCRIPT, url(board)],
                          capture_output=True, text=True, timeout=60, check=False)
    out = ok(proc)
    before, after = out.split("--- after attach")
    assert "Detected flash size: Unknown" in before
    assert "Detected flash size: 4MB" in after and "Manufacturer: ef" in after


@pytest.mark.parametrize("chip", ["esp32c3", "esp32s3", "esp32s2"])
def test_watchdog_reset_leaves_the_stub(rack: Path, chip: str) -> None:
    # esptool's test_watchdog_reset: --after watchdog-reset arms the RTC watchdog; the chip
    # resets and boots from flash (IO0 is not held low), wherever the stub was.
    board = BOARDS[chip]
    ctl(op="reset", board=board, boot="download")
    out = ok(esptool("--chip", chip, "--before", "no-reset", "--after", "watchdog-reset",
                     "flash-id", port=url(board)))
    assert "Hard resetting with a watchdog" in out
    deadline = time.monotonic() + 3
    while status(board)["mode"] in ("stub", "download"):
        assert time.monotonic() < deadline, status(board)
        time.sleep(0.02)


@pytest.mark.parametrize("chip", list(BOARDS))
def test_each_chip_reports_current_silicon_in_efuses_and_boot_log(
    rack: Path, tmp_path: Path, chip: str
) -> None:
    board = BOARDS[chip]
    ctl(op="reset", board=board, boot="download")
    out = ok(esptool("--chip", "auto", "--before", "no-reset", "--after", "no-reset",
                     "flash-id", port=url(board)))
    assert f"Detecting chip type... {NAMES[chip]}" in out
    assert re.search(rf"Chip type: +{re.escape(NAMES[chip])}\S* .*\(revision "
                     rf"{REVISIONS[chip]}\)", out), out
    assert "Detected flash size: 4MB" in out
    # The same revision in the second-stage bootloader's log.
    args: list[str] = []
    for offset, data in build_flash_layout(chip, build_app(chip, "rev-check", "1.0")):
        path = tmp_path / f"{offset:x}.bin"
        path.write_bytes(data)
        args += [hex(offset), str(path)]
    ok(esptool("--chip", chip, "--before", "no-reset", "--after", "no-reset", "write-flash",
               *args, port=url(board)))
    sock_console = Console(lambda: open_port(url(board)), tmp_path / "c.log", name=board)
    try:
        ctl(op="reset", board=board, boot="flash")
        sock_console.expect(rf"boot: chip revision: {re.escape(REVISIONS[chip])}\r\n", 10)
        sock_console.expect(r"rev-check 1\.0 ready", 10)
    finally:
        sock_console.close()


@pytest.mark.parametrize("chip", ["esp32s3", "esp32c6"])
def test_s3_and_c6_write_verify_read(rack: Path, tmp_path: Path, chip: str) -> None:
    board = BOARDS[chip]
    ctl(op="reset", board=board, boot="download")
    data = os.urandom(0x7000) + bytes(range(256)) * 0x20
    image = tmp_path / "data.bin"
    image.write_bytes(data)
    port = url(board)
    common = ("--chip", chip, "--before", "no-reset", "--after", "no-reset")
    out = ok(esptool(*common, "write-flash", "0x31000", str(image), port=port))
    assert "Hash of data verified" in out
    ok(esptool(*common, "verify-flash", "0x31000", str(image), port=port))
    back = tmp_path / "back.bin"
    ok(esptool(*common, "read-flash", "0x31000", hex(len(data)), str(back), port=port))
    assert back.read_bytes() == data
    wrong = esptool("--chip", "esp32c3", "--before", "no-reset", "chip-id", port=port)
    assert wrong.returncode != 0
    assert f"This chip is {NAMES[chip]}, not ESP32-C3" in wrong.stdout + wrong.stderr


def test_rack_sets_revision_mac_and_flash_size(rack: Path) -> None:
    ctl(op="reset", board="esp32c3-old", boot="download")
    out = ok(esptool("--chip", "esp32c3", "--before", "no-reset", "--after", "no-reset",
                     "flash-id", port=url("esp32c3-old")))
    assert "(revision v0.2)" in out
    assert "MAC:                58:cf:79:aa:bb:01" in out
    assert "Detected flash size: 8MB" in out
    assert status("esp32c3-old")["revision"] == "v0.2"


def write_real(board: str, real: RealBuild, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    table = tmp_path / "partitions.bin"
    table.write_bytes(layout("factory", "4MB").encode())
    ctl(op="reset", board=board, boot="download")
    return esptool("--chip", "esp32c3", "--before", "no-reset", "--after", "no-reset",
                   "write-flash", "0x0", str(real.bootloader_bin), "0x8000", str(table),
                   "0x10000", str(real.app_bin), port=url(board))


def test_real_c3_build_needs_v0_3_and_flashes_onto_current_silicon(
    rack: Path, tmp_path: Path
) -> None:
    real = build(tmp_path / "build")
    refused = write_real("esp32c3-old", real, tmp_path)
    assert refused.returncode != 0
    assert "requires chip revision in range v0.3 - v1.99 (this chip is revision v0.2)" in (
        refused.stdout + refused.stderr)
    out = ok(write_real("esp32c3-1", real, tmp_path))
    assert "Hash of data verified" in out


def test_device_flashes_a_real_build_dir_and_refuses_commands_to_it(
    rack: Path, tmp_path: Path
) -> None:
    real = build(tmp_path / "build")
    build_dir = write_build_dir(real, tmp_path / "idf-build", layout("factory", "4MB").encode())
    info = manager.read_info()
    assert info is not None
    control = ControlClient(info.control)
    console = Console(lambda: open_port(url("esp32c3-1")), tmp_path / "dut.log",
                      name="esp32c3-1")
    device = Device(id="esp32c3-1", chip="esp32c3", port=url("esp32c3-1"), console=console,
                    reset=VirtualReset(control, "esp32c3-1"),
                    power=VirtualPower(control, "esp32c3-1"), boot_timeout=10)
    try:
        # The farm's own flashing path (esptool API, MD5 skip) on a build it did not make.
        report = device.flash(build_dir)
        assert [r.offset for r in report.regions] == [0x0, 0x8000, 0x10000]
        again = device.flash(build_dir)
        assert again.written == ()  # identical on the chip: nothing rewritten
        booted = device.boot_info()
        assert booted.project == "riscv_null_store" and booted.app_version == "1.4.2"
        assert booted.partition_label == "factory"
        assert booted.runs_on_virtual is False
        assert booted.not_run_reason is not None and "riscv_null_store" in booted.not_run_reason
        started = time.monotonic()
        with pytest.raises(AppCannotRun, match="cannot run this app"):
            device.command("version", timeout=5)
        assert time.monotonic() - started < 2  # said at once, not after the timeout
        with pytest.raises(AppCannotRun):
            device.expect("hello from the app", timeout=0.5)
        assert status("esp32c3-1")["mode"] == "stopped"
    finally:
        console.close()
    # The same build on a board the rack file made a v0.2 C3: the farm sees the eFuses' revision
    # and refuses the image before writing anything.
    old = Device(id="esp32c3-old", chip="esp32c3", port=url("esp32c3-old"),
                 console=Console(lambda: open_port(url("esp32c3-old")), tmp_path / "old.log",
                                 name="esp32c3-old"),
                 reset=VirtualReset(control, "esp32c3-old"),
                 power=VirtualPower(control, "esp32c3-old"), boot_timeout=10)
    try:
        with pytest.raises(ImageError, match=re.escape(
                "requires chip revision in range v0.3 - v1.99 (this chip is revision v0.2)")):
            old.flash(build_dir, wait=False)
    finally:
        old.console.close()
