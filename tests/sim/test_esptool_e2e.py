"""The real esptool (CLI, subprocess) against virtual boards served by a background daemon."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_hilfarm.sim import manager
from pytest_hilfarm.sim.appbuild import build_app, build_flash_layout
from pytest_hilfarm.sim.model import Faults

BOARDS = {"esp32": "esp32-1", "esp32s2": "esp32s2-1", "esp32c3": "esp32c3-1"}
ESPTOOL_NAMES = {"esp32": "ESP32", "esp32s2": "ESP32-S2", "esp32c3": "ESP32-C3"}


@pytest.fixture(scope="module")
def state_dir(private_virtual_rack: Path) -> Path:
    """The module's own virtual rack (tests/conftest.py), started; its sim state dir."""
    manager.up()
    return Path(os.environ["HILFARM_SIM_DIR"])


def url(board_id: str, kind: str = "port") -> str:
    info = manager.read_info()
    assert info is not None
    return str(getattr(info.board(board_id), kind))


def ctl(**request: object) -> dict:
    answer = manager.control(dict(request))
    assert answer["ok"], answer
    return answer


def mode(board_id: str) -> str:
    boards = manager.control({"op": "status"})["boards"]
    return str(next(b for b in boards if b["id"] == board_id)["mode"])


def esptool(
    *args: str, port: str, before: str = "no-reset", after: str = "no-reset", timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable,
        "-m",
        "esptool",
        "--port",
        port,
        "--before",
        before,
        "--after",
        after,
        *args,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def flash_layout(board_id: str, chip: str, tmp: Path, **app_kwargs: object) -> None:
    app = build_app(chip, "e2e-demo", "3.1.4", **app_kwargs)  # type: ignore[arg-type]
    args: list[str] = []
    for offset, data in build_flash_layout(chip, app):
        path = tmp / f"{board_id}-{offset:x}.bin"
        path.write_bytes(data)
        args += [hex(offset), str(path)]
    ctl(op="reset", board=board_id, boot="download")
    ok(esptool("--chip", chip, "write-flash", *args, port=url(board_id)))


class Console:
    """A raw socket:// console on a board's port."""

    def __init__(self, board_id: str) -> None:
        host, port = url(board_id).split("//")[1].split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.buf = b""
        time.sleep(0.05)  # let the daemon attach us before anything is printed

    def expect(self, pattern: str, timeout: float = 8.0) -> re.Match[bytes]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern.encode(), re.S)
        self.sock.settimeout(0.2)
        while True:
            m = rx.search(self.buf)
            if m:
                self.buf = self.buf[m.end() :]
                return m
            assert time.monotonic() < deadline, f"{pattern!r} not in {self.buf[-800:]!r}"
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            assert data, "console closed"
            self.buf += data

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\r\n")

    def close(self) -> None:
        self.sock.close()
        time.sleep(0.1)  # the daemon releases the port


@pytest.mark.parametrize("chip", list(BOARDS))
def test_detect_write_verify_read_wrong_chip(state_dir: Path, tmp_path: Path, chip: str) -> None:
    board_id = BOARDS[chip]
    port = url(board_id)
    ctl(op="reset", board=board_id, boot="download")
    out = ok(esptool("--chip", "auto", "flash-id", port=port))
    assert f"Detecting chip type... {ESPTOOL_NAMES[chip]}" in out
    assert "Detected flash size: 4MB" in out
    data = os.urandom(0x9000) + bytes(range(256)) * 0x30
    image = tmp_path / "data.bin"
    image.write_bytes(data)
    out = ok(esptool("--chip", chip, "write-flash", "0x21000", str(image), port=port))
    assert "Hash of data verified" in out
    ok(esptool("--chip", chip, "verify-flash", "0x21000", str(image), port=port))
    back = tmp_path / "back.bin"
    ok(esptool("--chip", chip, "read-flash", "0x21000", hex(len(data)), str(back), port=port))
    assert back.read_bytes() == data
    wrong = "esp32c3" if chip != "esp32c3" else "esp32"
    proc = esptool("--chip", wrong, "chip-id", port=port)
    assert proc.returncode != 0
    assert f"This chip is {ESPTOOL_NAMES[chip]}, not {ESPTOOL_NAMES[wrong]}" in (
        proc.stdout + proc.stderr
    )


@pytest.mark.parametrize("chip", list(BOARDS))
def test_flashed_layout_boots_the_app(state_dir: Path, tmp_path: Path, chip: str) -> None:
    board_id = BOARDS[chip]
    flash_layout(board_id, chip, tmp_path)
    console = Console(board_id)
    try:
        ctl(op="reset", board=board_id, boot="flash")
        console.expect(r"boot:0x[0-9a-f]+ \(SPI_FAST_FLASH_BOOT\)")
        console.expect(r"Project name: +e2e-demo\r\n")
        console.expect(r"App version: +3\.1\.4\r\n")
        console.expect(r"e2e-demo 3\.1\.4 ready\r\n> ")
        console.send("version")
        console.expect(r"version: 3\.1\.4\r\n.*chip: " + chip)
    finally:
        console.close()
    assert mode(board_id) == "app"


def test_crash_at_boot_shows_the_panic_and_reboots(state_dir: Path, tmp_path: Path) -> None:
    flash_layout("esp32-2", "esp32", tmp_path, faults=Faults(crash_at_boot=True))
    console = Console("esp32-2")
    try:
        ctl(op="reset", board="esp32-2", boot="flash")
        console.expect(r"Guru Meditation Error")
        console.expect(r"Rebooting\.\.\.")
        console.expect(r"rst:0x\w+ \(\w+\).*Project name: +e2e-demo")  # and round again
    finally:
        console.close()


def test_erased_flash_shows_the_invalid_header_loop(state_dir: Path) -> None:
    ctl(op="reset", board="esp32-3", boot="download")
    ok(esptool("--chip", "esp32", "erase-flash", port=url("esp32-3")))
    console = Console("esp32-3")
    try:
        ctl(op="reset", board="esp32-3", boot="flash")
        console.expect(r"invalid header: 0xffffffff")
        console.expect(r"boot:0x13.*invalid header: 0xffffffff")  # it loops
    finally:
        console.close()
    assert mode("esp32-3") == "boot-loop"


@pytest.mark.slow
def test_rfc2217_default_reset_enters_download_and_hard_reset_boots(
    state_dir: Path, tmp_path: Path
) -> None:
    flash_layout("esp32c3-1", "esp32c3", tmp_path)
    rfc = url("esp32c3-1", "rfc2217")
    out = ok(esptool("read-mac", port=rfc, before="default-reset", after="hard-reset"))
    assert "Chip type:" in out and "Hard resetting via RTS pin" in out
    deadline = time.monotonic() + 5
    while mode("esp32c3-1") != "app":
        assert time.monotonic() < deadline, mode("esp32c3-1")
        time.sleep(0.05)


def test_flash_persists_across_daemon_restart(state_dir: Path, tmp_path: Path) -> None:
    data = os.urandom(0x3000)
    image = tmp_path / "keep.bin"
    image.write_bytes(data)
    ctl(op="reset", board="esp32s2-1", boot="download")
    ok(esptool("--chip", "esp32s2", "write-flash", "0x200000", str(image), port=url("esp32s2-1")))
    old = manager.read_info()
    assert manager.down() is True
    new = manager.up()
    assert old is not None and new.pid != old.pid
    assert [b.mac for b in new.boards] == [b.mac for b in old.boards]
    ctl(op="reset", board="esp32s2-1", boot="download")
    back = tmp_path / "back.bin"
    ok(
        esptool(
            "--chip",
            "esp32s2",
            "read-flash",
            "0x200000",
            "0x3000",
            str(back),
            port=url("esp32s2-1"),
        )
    )
    assert back.read_bytes() == data


def test_wire_time_write_at_921600(state_dir: Path, tmp_path: Path) -> None:
    data = os.urandom(0x10000)
    image = tmp_path / "wire.bin"
    image.write_bytes(data)
    ctl(op="wire_time", enabled=True, board="esp32-2")
    try:
        ctl(op="reset", board="esp32-2", boot="download")
        before = next(b for b in manager.control({"op": "status"})["boards"]
                      if b["id"] == "esp32-2")
        started = time.monotonic()
        out = ok(esptool("--chip", "esp32", "-b", "921600", "write-flash", "0x30000", str(image),
                         port=url("esp32-2")))
        elapsed = time.monotonic() - started
        after = next(b for b in manager.control({"op": "status"})["boards"]
                     if b["id"] == "esp32-2")
    finally:
        ctl(op="wire_time", enabled=False)
    assert "Hash of data verified" in out
    wire = after["wire_seconds"] - before["wire_seconds"]
    assert after["baud"] == 921600
    assert wire > len(data) * 10 / 921600  # the data alone crossed at 921600
    assert elapsed >= wire  # nothing arrived faster than its UART time
