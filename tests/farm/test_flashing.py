"""Flash plans, pre-write refusals, and end-to-end flashing against an in-process virtual loader."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pytest_hilfarm.drivers import flashing
from pytest_hilfarm.drivers.flashing import (
    FlashJob,
    FlashPlan,
    check_plan,
    flash,
    flash_many,
    make_plan,
)
from pytest_hilfarm.errors import FlashError, ImageError, PortError, UsageError
from pytest_hilfarm.esp.chips import BOOTLOADER_OFFSETS

FLASH_DEFL_BEGIN, FLASH_BEGIN, CHANGE_BAUDRATE = 0x10, 0x02, 0x0F


def make_image(chip_id: int = 0, size: int = 64 * 1024, fill: bytes = b"app!") -> bytes:
    """A byte string with an ESP image header (magic, 1 segment, DIO, chip id) and a body."""
    header = bytes([0xE9, 1, 2, 0x20]) + struct.pack("<I", 0x40080000)
    ext = bytes([0xEE, 0, 0, 0]) + struct.pack("<H", chip_id) + bytes(10)
    body = (fill * (size // len(fill) + 1))[: size - 24]
    return header + ext + body


def partition_table(*entries: tuple[str, int, int, int, int]) -> bytes:
    out = b""
    for label, ptype, subtype, offset, size in entries:
        out += struct.pack("<2sBBII16sI", b"\xaa\x50", ptype, subtype, offset, size,
                           label.encode(), 0)
    return out + b"\xff" * 32


# -- plan building ---------------------------------------------------------------------------------


def test_single_image_goes_to_app_offset(tmp_path: Path) -> None:
    app = tmp_path / "app.bin"
    app.write_bytes(make_image())
    plan = make_plan(app)
    assert [(r.offset, r.name, r.role) for r in plan.regions] == [(0x10000, str(app), "app")]
    assert FlashPlan.from_image(app, 0x20000).regions[0].offset == 0x20000


def test_list_of_pairs_sorted_with_string_offsets(tmp_path: Path) -> None:
    (tmp_path / "b.bin").write_bytes(b"b" * 100)
    plan = make_plan([("0x10000", make_image()), (0x8000, tmp_path / "b.bin")])
    assert [r.offset for r in plan.regions] == [0x8000, 0x10000]


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as info:
        make_plan(tmp_path / "nope.bin")
    assert str(tmp_path / "nope.bin") in str(info.value) and "does not exist" in str(info.value)


def test_overlap_and_shared_sector_refused() -> None:
    with pytest.raises(ImageError, match="overlaps"):
        make_plan([(0x1000, b"x" * 0x2000), (0x2000, b"y")])
    with pytest.raises(ImageError, match="4 KiB"):
        make_plan([(0x1000, b"x" * 0x10), (0x1800, b"y")])


def write_build(tmp_path: Path, chip: str = "esp32", chip_id: int = 0) -> Path:
    build = tmp_path / "build"
    (build / "bootloader").mkdir(parents=True)
    (build / "partition_table").mkdir()
    (build / "bootloader" / "bootloader.bin").write_bytes(make_image(chip_id, 0x4000, b"boot"))
    (build / "partition_table" / "partition-table.bin").write_bytes(
        partition_table(("nvs", 1, 2, 0x9000, 0x6000), ("factory", 0, 0, 0x10000, 0x20000))
    )
    (build / "my_app.bin").write_bytes(make_image(chip_id, 0x8000))
    boot_offset = "0x1000" if chip in ("esp32", "esp32s2") else "0x0"
    args = {
        "write_flash_args": ["--flash_mode", "dio", "--flash_size", "4MB", "--flash_freq", "40m"],
        "flash_settings": {"flash_mode": "dio", "flash_size": "4MB", "flash_freq": "40m"},
        "flash_files": {
            boot_offset: "bootloader/bootloader.bin",
            "0x8000": "partition_table/partition-table.bin",
            "0x10000": "my_app.bin",
        },
        "bootloader": {"offset": boot_offset, "file": "bootloader/bootloader.bin",
                       "encrypted": "false"},
        "app": {"offset": "0x10000", "file": "my_app.bin", "encrypted": "false"},
        "partition-table": {"offset": "0x8000", "file": "partition_table/partition-table.bin",
                            "encrypted": "false"},
        "extra_esptool_args": {"after": "hard_reset", "before": "default_reset", "stub": True,
                               "chip": chip},
    }
    (build / "flasher_args.json").write_text(json.dumps(args))
    return build


def test_build_dir_and_flasher_args_translate_esptool4_spellings(tmp_path: Path) -> None:
    build = write_build(tmp_path)
    for plan in (make_plan(build), make_plan(build / "flasher_args.json")):
        assert [r.offset for r in plan.regions] == [0x1000, 0x8000, 0x10000]
        assert [r.role for r in plan.regions] == ["bootloader", "partition-table", "app"]
        assert (plan.flash_mode, plan.flash_size, plan.flash_freq) == ("dio", "4MB", "40m")
        assert (plan.before, plan.after, plan.chip) == ("default-reset", "hard-reset", "esp32")
        # The partition table in the plan gives the app its partition size.
        assert plan.regions[2].limit == 0x20000


def test_write_flash_args_list_alone_is_enough(tmp_path: Path) -> None:
    build = write_build(tmp_path)
    args = json.loads((build / "flasher_args.json").read_text())
    del args["flash_settings"]
    args["write_flash_args"] = ["--flash_mode", "qio", "--flash_freq", "80m", "--flash_size",
                                "2MB"]
    (build / "flasher_args.json").write_text(json.dumps(args))
    plan = make_plan(build)
    assert (plan.flash_mode, plan.flash_size, plan.flash_freq) == ("qio", "2MB", "80m")


def test_not_a_build_dir(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="idf.py build"):
        make_plan(tmp_path)


# -- refusals before any connection -------------------------------------------------------------


def closed_port_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"socket://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    return url


def test_image_for_other_chip_refused_before_connecting(tmp_path: Path) -> None:
    app = tmp_path / "c3.bin"
    app.write_bytes(make_image(chip_id=5))
    # The port does not exist: an ImageError (not a PortError) proves nothing was attempted.
    with pytest.raises(ImageError) as info:
        flash(closed_port_url(), "esp32", app, board="esp32-1")
    text = str(info.value)
    assert str(app) in text and "esp32c3" in text and "esp32" in text
    assert "set-target esp32" in text and "nothing was written" in text


def test_build_for_other_chip_refused(tmp_path: Path) -> None:
    build = write_build(tmp_path, "esp32c3", 5)
    with pytest.raises(ImageError, match="build is for esp32c3"):
        check_plan(make_plan(build), "esp32")


def test_oversize_for_partition_refused(tmp_path: Path) -> None:
    build = write_build(tmp_path)
    (build / "my_app.bin").write_bytes(make_image(0, 0x30000))
    with pytest.raises(ImageError) as info:
        flash(closed_port_url(), "esp32", build)
    assert "larger than its partition 'app'" in str(info.value)
    assert "my_app.bin" in str(info.value)


def test_oversize_for_flash_refused() -> None:
    plan = FlashPlan.from_image(make_image(), 0x3F8000, flash_size="4MB")
    with pytest.raises(ImageError, match="beyond the 4096 KiB flash"):
        flash(closed_port_url(), "esp32", plan)
    with pytest.raises(ImageError, match="beyond the 2048 KiB"):
        check_plan(FlashPlan.from_image(make_image(), 0x1F8000), "esp32", flash_size=2 << 20)


def test_unknown_chip_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown chip 'esp8266'"):
        check_plan(make_plan(make_image()), "esp8266")


def test_data_regions_are_not_chip_checked() -> None:
    check_plan(make_plan([(0x9000, b"\x00" * 64), (0x10000, make_image(0))]), "esp32")


# -- end to end against the virtual loader --------------------------------------------------------

loader_mod = pytest.importorskip(
    "pytest_hilfarm.sim.loader", reason="sim/loader.py (LoaderSession) is not available yet"
)
from pytest_hilfarm.sim import slip  # noqa: E402
from pytest_hilfarm.sim.flash import FlashMemory  # noqa: E402


class LoaderServer:
    """A virtual chip's ROM loader served over TCP: socket://127.0.0.1:N for esptool.

    Each new connection starts in download mode, as the farm's virtual reset driver would leave
    the board. ``ops`` records every command opcode the host sent.
    """

    def __init__(
        self, chip: str, flash_path: Path, *, drop_on_fast_baud: int = 0, busy: int = 0
    ) -> None:
        self.flash = FlashMemory(flash_path, 4 * 1024 * 1024)
        self.session = loader_mod.LoaderSession(chip, self.flash, b"\x24\x0a\xc4\x00\x00\x01")
        self.ops: list[int] = []
        self.connections = 0
        self.drop_on_fast_baud = drop_on_fast_baud  # drop this many connections at CHANGE_BAUD
        self.busy = busy  # accept-and-close this many connections (previous client not gone yet)
        self.fail_writes = False  # answer FLASH_DEFL_BEGIN with "flash write error" (0x08)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(4)
        self.url = f"socket://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            if self.busy:
                self.busy -= 1
                client.close()
                continue
            self.session.enter_download()
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        decoder = slip.SlipDecoder()
        with client:
            while True:
                try:
                    data = client.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                for frame in decoder.feed(data):
                    if len(frame) >= 8 and frame[0] == 0:
                        self.ops.append(frame[1])
                        if frame[1] == CHANGE_BAUDRATE and self.drop_on_fast_baud:
                            self.drop_on_fast_baud -= 1
                            client.shutdown(socket.SHUT_RDWR)
                            return
                        if frame[1] == FLASH_DEFL_BEGIN and self.fail_writes:
                            # The stub's reply: 2 status bytes, failed / 0x08 flash write error.
                            reply = struct.pack("<BBHI", 1, FLASH_DEFL_BEGIN, 2, 0) + b"\x01\x08"
                            client.sendall(b"\xc0" + reply + b"\xc0")
                            data = b""
                            break
                out = self.session.feed(data) if data else b""
                if out:
                    client.sendall(out)

    def written_ops(self) -> list[int]:
        return [op for op in self.ops if op in (FLASH_DEFL_BEGIN, FLASH_BEGIN)]

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self.flash.close()


@pytest.fixture
def board(tmp_path: Path):
    server = LoaderServer("esp32", tmp_path / "esp32-1.flash")
    yield server
    server.close()


OPTS: dict[str, Any] = {"before": "no-reset", "after": "no-reset-stub"}


def test_flash_then_skip_identical(board: LoaderServer, tmp_path: Path, capsys) -> None:
    build = write_build(tmp_path)
    seen: list[flashing.RegionProgress] = []
    first = flash(board.url, "esp32", build, progress=seen.append, **OPTS)
    assert [r.written for r in first.regions] == [True, True, True]
    assert first.bytes_written == sum(r.size for r in make_plan(build).regions)
    app = make_plan(build).regions[2]
    # Each event names its region; the app's ends written at full size, then verified.
    app_events = [e for e in seen if e.offset == 0x10000]
    assert {(e.index, e.name, e.size) for e in app_events} == {(2, app.name, app.size)}
    assert [e.state for e in app_events][-2:] == ["written", "verified"]
    assert app_events[-1].done == app.size
    assert {e.state for e in seen} == {"writing", "written", "verified"}
    assert board.flash.read(0x10000, app.size) == app.data
    # The bootloader header got the plan's flash settings (DIO, 4MB/40m) as esptool writes it.
    assert board.flash.read(0x1000, 4)[2:4] == bytes([2, 0x20])

    board.ops.clear()
    seen.clear()
    second = flash(board.url, "esp32", build, progress=seen.append, **OPTS)
    assert second.written == () and len(second.skipped) == 3
    assert [(e.offset, e.state) for e in seen] == [(r.offset, "skipped")
                                                   for r in make_plan(build).regions]
    assert board.written_ops() == []  # no FLASH_BEGIN / FLASH_DEFL_BEGIN: no data sent
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""  # esptool's chatter stays out of the terminal


def test_only_changed_region_is_written(board: LoaderServer, tmp_path: Path) -> None:
    build = write_build(tmp_path)
    flash(board.url, "esp32", build, **OPTS)
    (build / "my_app.bin").write_bytes(make_image(0, 0x8000, b"v2.0"))
    board.ops.clear()
    report = flash(board.url, "esp32", build, **OPTS)
    assert [r.written for r in report.regions] == [False, False, True]
    assert board.written_ops() == [FLASH_DEFL_BEGIN]
    assert board.flash.read(0x10018, 4) == b"v2.0"


def test_detected_flash_size_checked_before_writing(board: LoaderServer) -> None:
    # 4 MB flash detected on the board; the region ends beyond it.
    plan = FlashPlan.from_image(make_image(0, 0x2000), 0x3FF000)
    with pytest.raises(ImageError, match="beyond the 4096 KiB flash"):
        flash(board.url, "esp32", plan, **OPTS)
    assert board.written_ops() == []


def test_retry_at_rom_baud_when_fast_baud_fails(tmp_path: Path) -> None:
    server = LoaderServer("esp32", tmp_path / "f.flash", drop_on_fast_baud=1)
    resets: list[str] = []
    try:
        report = flash(server.url, "esp32", make_image(), baud=921600,
                       enter_download=lambda: resets.append("download"), **OPTS)
    finally:
        server.close()
    assert report.baud == 115200 and report.regions[0].written
    assert server.connections == 2
    assert resets == ["download", "download"]  # each attempt starts from a fresh ROM loader


def test_port_still_busy_for_a_moment_is_retried(tmp_path: Path) -> None:
    server = LoaderServer("esp32", tmp_path / "f.flash", busy=2)
    try:
        report = flash(server.url, "esp32", make_image(), **OPTS)
    finally:
        server.close()
    assert report.regions[0].written and report.baud == 921600
    assert server.connections == 3


def test_unreachable_board_is_flash_error_naming_port(tmp_path: Path) -> None:
    url = closed_port_url()
    with pytest.raises(PortError) as info:
        flash(url, "esp32", make_image(), board="esp32-9", **OPTS)
    assert url in str(info.value) and "esp32-9" in str(info.value)
    assert "hilfarm sim up" in str(info.value)


def test_write_failure_is_flash_error_naming_board_and_region(board: LoaderServer,
                                                             tmp_path: Path) -> None:
    build = write_build(tmp_path)
    flash(board.url, "esp32", build, **OPTS)
    (build / "my_app.bin").write_bytes(make_image(0, 0x8000, b"v3.0"))
    board.fail_writes = True
    with pytest.raises(FlashError) as info:
        flash(board.url, "esp32", build, board="esp32-1", **OPTS)
    text = str(info.value)
    assert "esp32-1 on socket://" in text and "region 0x10000" in text and "my_app.bin" in text
    assert "921600 and 115200 baud" in text and "UNKNOWN" in text


def test_wrong_chip_on_the_wire_is_flash_error(tmp_path: Path) -> None:
    server = LoaderServer("esp32c3", tmp_path / "c3.flash")
    try:
        with pytest.raises(FlashError) as info:
            flash(server.url, "esp32", make_image(0), board="esp32-1", connect_attempts=1,
                  baud=115200, **OPTS)
    finally:
        server.close()
    assert "esp32-1" in str(info.value) and "rack file" in str(info.value)
    assert server.written_ops() == []


def test_read_md5(board: LoaderServer) -> None:
    import hashlib

    image = make_image()
    flash(board.url, "esp32", image, **OPTS)
    digest = flashing.read_md5(board.url, "esp32", 0x10000, len(image), before="no-reset")
    assert digest == hashlib.md5(image).hexdigest()


def test_flash_many_in_parallel(tmp_path: Path) -> None:
    servers = [LoaderServer("esp32", tmp_path / f"b{i}.flash") for i in range(3)]
    try:
        jobs = [FlashJob(s.url, "esp32", make_image(), board=f"esp32-{i}", options=OPTS)
                for i, s in enumerate(servers)]
        jobs.append(FlashJob(closed_port_url(), "esp32", make_image(), board="gone",
                             options={**OPTS, "connect_attempts": 1}))
        started = time.monotonic()
        results = flash_many(jobs)
        took = time.monotonic() - started
    finally:
        for s in servers:
            s.close()
    assert all(isinstance(r, flashing.FlashReport) for r in results[:3])
    assert isinstance(results[3], PortError) and "board gone" in str(results[3])
    assert took < 10


def test_flash_many_refuses_everything_before_writing(tmp_path: Path, board: LoaderServer) -> None:
    jobs = [FlashJob(board.url, "esp32", make_image(0), options=OPTS),
            FlashJob(board.url, "esp32", make_image(5), board="esp32-2", options=OPTS)]
    with pytest.raises(ImageError, match="esp32c3"):
        flash_many(jobs)
    assert board.ops == []


@pytest.mark.parametrize(("chip", "chip_id"), [("esp32s2", 2), ("esp32c3", 5)])
def test_flash_and_skip_per_chip(chip: str, chip_id: int, tmp_path: Path) -> None:
    server = LoaderServer(chip, tmp_path / f"{chip}.flash")
    try:
        build = write_build(tmp_path, chip, chip_id)
        plan = make_plan(build)
        assert plan.regions[0].offset == BOOTLOADER_OFFSETS[chip]
        first = flash(server.url, chip, build, **OPTS)
        assert all(r.written for r in first.regions)
        second = flash(server.url, chip, build, **OPTS)
        assert second.written == ()
    finally:
        server.close()
