"""VirtualBoard on its own: lines, auto-reset circuit, power, modes, console, wire time."""

from __future__ import annotations

import re
import struct
import threading
import time
from pathlib import Path

import pytest

from pytest_hilfarm.sim import slip
from pytest_hilfarm.sim.appbuild import build_app, build_flash_layout
from pytest_hilfarm.sim.board import VirtualBoard
from pytest_hilfarm.sim.flash import FlashMemory

MAC = "24:0a:c4:00:00:01"
SYNC = slip.encode(struct.pack("<BBHI", 0, 0x08, 36, 0) + b"\x07\x07\x12\x20" + b"\x55" * 32)


class Sink:
    """Collects what the board sends; tests wait on it."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._cond = threading.Condition()

    def write(self, data: bytes) -> None:
        with self._cond:
            self._buf += data
            self._cond.notify_all()

    @property
    def text(self) -> str:
        with self._cond:
            return self._buf.decode("latin-1")

    def clear(self) -> None:
        with self._cond:
            self._buf.clear()

    def wait_for(self, pattern: str, timeout: float = 5.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = re.search(pattern, self._buf.decode("latin-1"))
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{pattern!r} not seen in {bytes(self._buf)[-500:]!r}")
                self._cond.wait(left)


def wait_mode(board: VirtualBoard, mode: str, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while board.status().mode != mode:
        assert time.monotonic() < deadline, f"mode {board.status().mode}, wanted {mode}"
        time.sleep(0.01)


def write_layout(path: Path, chip: str, **app_kwargs: object) -> None:
    app = build_app(chip, "board-test", "2.0.1", **app_kwargs)  # type: ignore[arg-type]
    with FlashMemory(path, 4 << 20) as flash:
        for offset, data in build_flash_layout(chip, app):
            flash.erase(offset, (len(data) + 0xFFF) & ~0xFFF)
            flash.write(offset, data)


@pytest.fixture
def make_board(tmp_path: Path):
    boards: list[VirtualBoard] = []

    def make(chip: str = "esp32", *, layout: bool = False, powered: bool = True, **kw: object):
        path = tmp_path / f"{chip}-{len(boards)}.flash"
        if layout:
            write_layout(path, chip)
        board = VirtualBoard(
            f"{chip}-{len(boards) + 1}",
            chip,
            path,
            4 << 20,
            MAC,
            None,
            powered=False,
            **kw,  # type: ignore[arg-type]
        )
        boards.append(board)
        sink = Sink()
        board.attach(sink)
        if powered:
            board.power(True)
        return board, sink

    yield make
    for board in boards:
        board.close()


def test_erased_flash_boot_loops_with_the_roms_banner(make_board) -> None:
    board, sink = make_board("esp32", boot_retry_delay=0.05)
    sink.wait_for(r"(?s)boot:0x13.*boot:0x13")  # at least two attempts
    assert board.status().mode == "boot-loop"
    assert "waiting for download" not in sink.text


def test_control_reset_to_download_prints_banner_and_answers_sync(make_board) -> None:
    board, sink = make_board("esp32c3")
    sink.clear()
    board.reset("download")
    assert board.status().mode == "download"
    assert re.search(r"boot:(0x[0-9a-fA-F]+)(.*waiting for download)?", sink.text, re.S)
    sink.clear()
    board.feed(SYNC)
    sink.wait_for("\xc0\x01\x08")


def test_devkit_classic_reset_enters_download_and_hard_reset_boots(make_board) -> None:
    board, sink = make_board("esp32", layout=True)
    sink.wait_for("board-test 2.0.1 ready")
    # esptool ClassicReset as an rfc2217 client delivers it: ~50 ms between line changes.
    board.set_client_lines(dtr=False)
    board.set_client_lines(rts=True)  # EN low
    time.sleep(0.1)
    board.set_client_lines(dtr=True)  # (1,1): EN high, IO0 still high for a moment
    time.sleep(0.05)
    board.set_client_lines(rts=False)  # (1,0): IO0 low inside the RC window
    time.sleep(0.1)
    board.set_client_lines(dtr=False)  # after the sample (event order, not timing, decides)
    wait_mode(board, "download")
    assert "waiting for download" in sink.text
    # --after hard-reset: RTS pulse with DTR released -> SPI boot.
    sink.clear()
    board.set_client_lines(rts=True)
    time.sleep(0.1)
    board.set_client_lines(rts=False)
    sink.wait_for("board-test 2.0.1 ready")
    assert board.status().mode == "app"


def test_io0_released_before_the_rc_delay_boots_from_flash(make_board) -> None:
    board, sink = make_board("esp32", layout=True, rc_delay=0.5)
    sink.wait_for("ready")
    board.set_lines(en=False, io0=False)
    board.set_lines(en=True)
    board.set_lines(io0=True)  # released well before the 500 ms sample
    wait_mode(board, "app")


def test_lines_en_low_holds_reset_and_silence(make_board) -> None:
    board, sink = make_board("esp32", layout=True)
    sink.wait_for("ready")
    board.set_lines(en=False)
    assert board.status().mode == "reset"
    sink.clear()
    board.feed(b"version\r\n")
    time.sleep(0.2)
    assert sink.text == ""
    board.set_lines(io0=False)
    board.set_lines(en=True)
    wait_mode(board, "download")
    board.set_lines(io0=True)


def test_power_off_is_silent_and_keeps_flash(make_board) -> None:
    board, sink = make_board("esp32s2", layout=True)
    sink.wait_for("ready")
    board.power(False)
    st = board.status()
    assert (st.powered, st.mode, st.app) == (False, "off", None)
    sink.clear()
    board.feed(b"version\r\n")
    time.sleep(0.1)
    assert sink.text == ""
    board.power(True)
    sink.wait_for("board-test 2.0.1 ready")


def test_app_console_and_reboot(make_board) -> None:
    board, sink = make_board("esp32", layout=True)
    sink.wait_for("ready")
    sink.clear()
    board.feed(b"version\r\n")
    sink.wait_for(r"version: 2\.0\.1")
    assert board.status().app == {
        "project": "board-test",
        "version": "2.0.1",
        "slot": "factory",
        "ota_state": "",
        "runs": "yes",
    }
    sink.clear()
    board.feed(b"reboot\r\n")
    sink.wait_for(r"(?s)restart requested.*Project name: +board-test.*ready")


def test_slip_is_ignored_in_app_mode(make_board) -> None:
    board, sink = make_board("esp32", layout=True)
    sink.wait_for("ready")
    sink.clear()
    board.feed(SYNC)
    time.sleep(0.1)
    assert "\xc0\x01" not in sink.text
    assert board.status().mode == "app"


def test_wire_time_paces_output_at_the_baud(make_board) -> None:
    board, sink = make_board("esp32", powered=False, wire_time=True)
    board.power(True)
    board.reset("download")
    sink.clear()
    started = time.monotonic()
    board.feed(SYNC * 4)  # 4 x (46 bytes in, 8 x 14 bytes out)
    deadline = time.monotonic() + 5
    while sink.text.count("\xc0\x01\x08") < 32:
        assert time.monotonic() < deadline, sink.text
        time.sleep(0.002)
    elapsed = time.monotonic() - started
    wire = (len(SYNC) * 4 + 32 * 14) * 10 / 115200
    assert wire * 0.9 <= elapsed <= wire * 2 + 0.25  # generous above: shared CI cores
    st = board.status()
    assert st.rx_bytes >= len(SYNC) * 4 and st.wire_seconds > 0
