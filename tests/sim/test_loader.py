"""LoaderSession: driven by the real, unmodified esptool in-process, and by hand-made packets."""

from __future__ import annotations

import hashlib
import os
import re
import struct
import zlib
from pathlib import Path

import esptool
import pytest
from esptool.cmds import attach_flash, connect_esp
from esptool.util import FatalError

from pytest_hilfarm.sim import slip
from pytest_hilfarm.sim.chips import (
    chip_spec,
    jedec_id_for_size,
    mac_for,
    rom_banner,
    sfdp_table,
)
from pytest_hilfarm.sim.flash import FlashMemory
from pytest_hilfarm.sim.loader import (
    CHANGE_BAUDRATE,
    ERASE_REGION,
    FLASH_BEGIN,
    FLASH_DATA,
    FLASH_DEFL_BEGIN,
    FLASH_DEFL_DATA,
    FLASH_DEFL_END,
    FLASH_END,
    GET_SECURITY_INFO,
    MEM_BEGIN,
    MEM_DATA,
    MEM_END,
    READ_FLASH,
    READ_FLASH_SLOW,
    READ_REG,
    SPI_ATTACH,
    SPI_FLASH_MD5,
    SYNC,
    SYNC_PAYLOAD,
    LoaderSession,
    xor_checksum,
)

CHIPS = ("esp32", "esp32s2", "esp32c3", "esp32s3", "esp32c6")
FLASH_SIZE = 4 << 20


class SimPort:
    """Just enough of a pyserial port for esptool: write() feeds the board, read() drains it.

    Named ``socket://`` so esptool does no DTR/RTS reset (the session starts in download mode).
    Reads never block: the session answers synchronously inside write(). esptool takes such an
    object wherever it takes a port name (``ESPLoader(port)``, ``connect_esp(port=...)``), and
    ``esptool.main(argv, esp=...)`` then runs the command on the connected loader.
    """

    def __init__(self, session: LoaderSession, name: str = "socket://sim") -> None:
        self.session = session
        self.port = self.name = name
        self._rx = bytearray()
        self.timeout: float | None = 3
        self.write_timeout: float | None = None
        self.baudrate = 115200
        self.dtr = self.rts = False
        self.is_open = True

    def write(self, data: bytes) -> int:
        self._rx += self.session.feed(bytes(data))
        return len(data)

    def read(self, size: int = 1) -> bytes:
        chunk = bytes(self._rx[:size])
        del self._rx[:size]
        return chunk

    @property
    def in_waiting(self) -> int:
        return len(self._rx)

    def inWaiting(self) -> int:  # noqa: N802 - pyserial's legacy name, esptool calls it
        return len(self._rx)

    def reset_input_buffer(self) -> None:
        self._rx.clear()

    flushInput = reset_input_buffer  # noqa: N815

    def reset_output_buffer(self) -> None:
        pass

    flushOutput = reset_output_buffer  # noqa: N815

    def setDTR(self, value: bool) -> None:  # noqa: N802
        self.dtr = value

    def setRTS(self, value: bool) -> None:  # noqa: N802
        self.rts = value

    def open(self) -> None:
        self.is_open = True

    def close(self) -> None:
        self.is_open = False

    def isOpen(self) -> bool:  # noqa: N802
        return self.is_open

    def fileno(self) -> int:
        raise OSError(25, "not a tty")


class Board:
    def __init__(self, tmp_path: Path, chip: str, size: int = FLASH_SIZE) -> None:
        self.chip = chip
        self.mac = mac_for(f"{chip}-1", chip)
        self.flash = FlashMemory(tmp_path / f"{chip}.flash", size)
        self.bauds: list[int] = []
        self.app_runs = 0
        self.session = LoaderSession(
            chip, self.flash, self.mac, on_baud=self.bauds.append, on_run_app=self._run_app
        )
        self.port = SimPort(self.session)

    def _run_app(self) -> None:
        self.app_runs += 1

    def connect(self, chip: str = "auto", *, attach: bool = False) -> esptool.ESPLoader:
        """Connect as ``esptool --port <this board> --chip <chip> --before no-reset`` does;
        ``attach`` then attaches the SPI flash as esptool does before any flash command.
        """
        self.port.reset_input_buffer()
        esp = connect_esp(port=self.port, chip=chip, before="no-reset")
        if attach:
            attach_flash(esp)
        return esp

    def esptool(self, *argv: str, chip: str = "auto") -> None:
        esp = self.connect(chip)
        esptool.main(["--after", "no-reset-stub", *argv], esp=esp)


@pytest.fixture(params=CHIPS)
def board(request: pytest.FixtureRequest, tmp_path: Path):
    b = Board(tmp_path, request.param)
    yield b
    assert b.session.internal_errors == 0, b.session.last_error
    b.flash.close()


def compressible(size: int, seed: int = 1) -> bytes:
    words = [f"line {i} of image {seed}: value {i * 7919 % 1000}\n".encode() for i in range(size)]
    return b"".join(words)[:size]


# --------------------------------------------------------------------------- real esptool


def test_auto_detect_each_chip(board: Board) -> None:
    esp = board.connect()
    assert esp.CHIP_NAME == chip_spec(board.chip).esptool_name
    assert not esp.IS_STUB


@pytest.mark.parametrize(
    ("actual", "claimed", "message"),
    [
        ("esp32c3", "esp32", "This chip is ESP32-C3, not ESP32"),
        ("esp32", "esp32s2", "This chip is ESP32, not ESP32-S2"),
        ("esp32s2", "esp32c3", "This chip is ESP32-S2, not ESP32-C3"),
    ],
)
def test_wrong_chip_is_rejected(tmp_path: Path, actual: str, claimed: str, message: str) -> None:
    b = Board(tmp_path, actual)
    with pytest.raises(FatalError, match=message):
        b.connect(claimed)
    b.connect(actual)  # and the right class connects fine


def test_flash_id_and_size(board: Board, capsys: pytest.CaptureFixture[str]) -> None:
    board.esptool("flash-id")
    out = capsys.readouterr().out
    assert "Manufacturer: ef" in out
    assert "Device: 4016" in out
    assert "Detected flash size: 4MB" in out


@pytest.mark.parametrize(
    ("size", "label", "device"), [(2 << 20, "2MB", "4015"), (16 << 20, "16MB", "4018")]
)
def test_flash_id_follows_flash_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], size: int, label: str, device: str
) -> None:
    b = Board(tmp_path, "esp32c3", size)
    b.esptool("--no-stub", "flash-id")
    out = capsys.readouterr().out
    assert f"Device: {device}" in out
    assert f"Detected flash size: {label}" in out


def test_sfdp_reads_through_spi_user_commands(board: Board) -> None:
    esp = board.connect(attach=True)
    table = sfdp_table(FLASH_SIZE)
    assert esp.read_spiflash_sfdp(0, 32) == 0x50444653  # "SFDP"
    assert esp.read_spiflash_sfdp(0x34, 32) == int.from_bytes(table[0x34:0x38], "little")
    assert esp.read_spiflash_sfdp(0x10, 8) == table[0x10]
    assert esp.read_status(3) == 0
    esp.write_status(0x0200, num_bytes=2)
    assert esp.read_status(2) == 0x0200


def test_read_mac(board: Board, capsys: pytest.CaptureFixture[str]) -> None:
    board.esptool("read-mac")
    out = capsys.readouterr().out
    if board.chip == "esp32c6":
        # The C6 keeps ff:fe next to its MAC: esptool prints the EUI-64 first, then the base.
        mac = board.mac
        eui64 = mac[:3] + bytes((0xFF, 0xFE)) + mac[3:]
        assert f"MAC:                {eui64.hex(':')}" in out
        assert f"BASE MAC:           {mac.hex(':')}" in out
        assert "MAC_EXT:            ff:fe" in out
    else:
        assert f"MAC:                {board.mac.hex(':')}" in out


def test_write_flash_stub_compressed_raw_and_read_back(board: Board, tmp_path: Path) -> None:
    image = compressible(200_000)
    raw = os.urandom(40_000)
    (tmp_path / "a.bin").write_bytes(image)
    (tmp_path / "b.bin").write_bytes(raw)
    board.esptool("write-flash", "0x10000", str(tmp_path / "a.bin"))
    assert board.flash.read(0x10000, len(image)) == image
    board.esptool("write-flash", "--no-compress", "0x50000", str(tmp_path / "b.bin"))
    assert board.flash.read(0x50000, len(raw)) == raw
    # The rest of the last sector was erased, the next sector untouched (still erased).
    end = 0x50000 + len(raw)
    assert board.flash.read(end, 0x1000 - end % 0x1000) == b"\xff" * (0x1000 - end % 0x1000)
    board.esptool("read-flash", "0x10000", "0x3000", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == image[:0x3000]
    board.esptool("verify-flash", "0x10000", str(tmp_path / "a.bin"))


def test_write_flash_rom_no_stub_raw(board: Board, tmp_path: Path) -> None:
    image = os.urandom(9000)
    (tmp_path / "r.bin").write_bytes(image)
    board.esptool("--no-stub", "write-flash", "--no-compress", "0x8000", str(tmp_path / "r.bin"))
    assert board.flash.read(0x8000, len(image)) == image
    assert board.session.mode == "download"
    board.esptool("--no-stub", "read-flash", "0x8000", "200", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == image[:200]


def test_write_flash_rom_compressed_unaligned_esp32(tmp_path: Path) -> None:
    b = Board(tmp_path, "esp32")
    image = compressible(30_000, seed=3)
    (tmp_path / "c.bin").write_bytes(image)
    b.esptool("--no-stub", "write-flash", "--compress", "0x10800", str(tmp_path / "c.bin"))
    assert b.flash.read(0x10800, len(image)) == image


def test_erase_region_and_erase_flash(board: Board, tmp_path: Path) -> None:
    board.flash.write(0, b"\x00" * 0x3000)
    board.flash.write(0x200000, b"\x12" * 16)
    board.esptool("erase-region", "0x1000", "0x1000")
    assert board.flash.read(0, 0x3000) == b"\x00" * 0x1000 + b"\xff" * 0x1000 + b"\x00" * 0x1000
    board.esptool("erase-flash")
    assert board.flash.read(0, 0x3000) == b"\xff" * 0x3000
    assert board.flash.read(0x200000, 16) == b"\xff" * 16


def test_change_baudrate(board: Board, tmp_path: Path) -> None:
    board.esptool("-b", "921600", "flash-id")
    assert board.bauds == [921600]
    assert board.session.baudrate == 921600


def test_change_baudrate_in_rom(tmp_path: Path) -> None:
    b = Board(tmp_path, "esp32")
    b.esptool("--no-stub", "-b", "460800", "read-mac")
    # The ESP32 ROM path sends a drift-corrected rate; with a 40 MHz calibration it is exact.
    assert b.bauds == [460800]


def test_stub_left_running_is_reused(board: Board, capsys: pytest.CaptureFixture[str]) -> None:
    board.esptool("read-mac")  # --after no-reset-stub leaves the stub running
    assert board.session.mode == "stub"
    capsys.readouterr()
    board.esptool("flash-id")
    assert "Stub flasher is already running" in capsys.readouterr().out


def test_after_no_reset_returns_to_rom(board: Board) -> None:
    esp = board.connect()
    esptool.main(["--after", "no-reset", "read-mac"], esp=esp)
    assert board.session.mode == "download"
    board.connect()  # the ROM answers again


def test_rom_run_hands_over_to_app(tmp_path: Path) -> None:
    b = Board(tmp_path, "esp32s2")
    esp = b.connect()
    esptool.main(["--no-stub", "--after", "no-reset", "run"], esp=esp)
    assert b.app_runs == 1
    assert b.session.mode == "app"
    assert b.session.feed(slip.encode(struct.pack("<BBHI", 0, SYNC, 36, 0) + SYNC_PAYLOAD)) == b""
    b.session.enter_download()
    b.connect()


def test_security_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for chip in ("esp32s2", "esp32c3"):
        b = Board(tmp_path, chip)
        b.esptool("--no-stub", "get-security-info")
        assert "Flags" in capsys.readouterr().out


# --------------------------------------------------------------------------- raw packets


def command(op: int, data: bytes = b"", chk: int = 0) -> bytes:
    return slip.encode(struct.pack("<BBHI", 0, op, len(data), chk) + data)


def block(op: int, payload: bytes, seq: int) -> bytes:
    return command(
        op, struct.pack("<IIII", len(payload), seq, 0, 0) + payload, xor_checksum(payload)
    )


def replies(out: bytes) -> list[tuple[int, int, bytes]]:
    """(op, value, data incl. status) of each response frame."""
    result = []
    for frame in slip.SlipDecoder().feed(out):
        direction, op, size, value = struct.unpack_from("<BBHI", frame)
        assert direction == 1 and size == len(frame) - 8
        result.append((op, value, frame[8:]))
    return result


@pytest.fixture(params=CHIPS)
def raw(request: pytest.FixtureRequest, tmp_path: Path):
    b = Board(tmp_path, request.param, size=1 << 20)
    # What esptool's attach_flash sends before any flash command in ROM mode.
    assert replies(b.session.feed(command(SPI_ATTACH, bytes(8))))[0][2] == b"\0\0\0\0"
    yield b
    assert b.session.internal_errors == 0, b.session.last_error
    b.flash.close()


def to_stub(session: LoaderSession) -> None:
    code = b"\x01" * 100
    out = session.feed(
        command(MEM_BEGIN, struct.pack("<IIII", len(code), 1, 0x1800, 0x40080000))
        + block(MEM_DATA, code, 0)
        + command(MEM_END, struct.pack("<II", 0, 0x40080000))
    )
    assert slip.SlipDecoder().feed(out)[-1] == b"OHAI"
    assert session.mode == "stub"


def test_sync_answers_eight_times(raw: Board) -> None:
    rom = replies(raw.session.feed(command(SYNC, SYNC_PAYLOAD)))
    assert len(rom) == 8
    assert all(op == SYNC and value != 0 and data == b"\0\0\0\0" for op, value, data in rom)
    to_stub(raw.session)
    stub = replies(raw.session.feed(command(SYNC, SYNC_PAYLOAD)))
    assert len(stub) == 8 and all(value == 0 and data == b"\0\0" for _, value, data in stub)


def test_unknown_op_status(raw: Board) -> None:
    assert replies(raw.session.feed(command(0x42))) == [(0x42, 0, b"\x01\x05\0\0")]
    assert replies(raw.session.feed(command(READ_FLASH, bytes(16))))[0][2] == b"\x01\x05\0\0"
    to_stub(raw.session)
    assert replies(raw.session.feed(command(0x42))) == [(0x42, 0, b"\x01\xff")]
    assert replies(raw.session.feed(command(READ_FLASH_SLOW, bytes(8))))[0][2] == b"\x01\xff"


def test_security_info_per_chip(raw: Board) -> None:
    ((op, _, data),) = replies(raw.session.feed(command(GET_SECURITY_INFO)))
    if raw.chip == "esp32":
        assert data == b"\x01\x05\0\0"
    elif raw.chip == "esp32s2":
        assert data == bytes(12) + b"\0\0\0\0"
    else:
        chip_id = {"esp32c3": 5, "esp32s3": 9, "esp32c6": 13}[raw.chip]
        assert data[12:16] == struct.pack("<I", chip_id) and len(data) == 24


def test_read_reg_magic(raw: Board) -> None:
    ((_, value, _),) = replies(raw.session.feed(command(READ_REG, struct.pack("<I", 0x40001000))))
    assert value == chip_spec(raw.chip).magic


def test_malformed_frames_are_ignored_or_refused(raw: Board) -> None:
    s = raw.session
    assert s.feed(slip.encode(b"\x00\x08")) == b""  # too short
    assert s.feed(slip.encode(b"\x01" + bytes(40))) == b""  # a response, not a request
    assert s.feed(b"noise without frame markers") == b""
    # Length field disagrees with the data: invalid message.
    bad = slip.encode(struct.pack("<BBHI", 0, READ_REG, 9, 0) + bytes(4))
    assert replies(s.feed(bad))[0][2] == b"\x01\x05\0\0"
    assert len(replies(s.feed(command(SYNC, SYNC_PAYLOAD)))) == 8


def begin_words(chip: str, *words: int) -> bytes:
    data = struct.pack("<IIII", *words)
    return data + (bytes(4) if chip_spec(chip).rom_begin_words == 5 else b"")


def test_rom_flash_checks_checksum_seq_and_end(raw: Board) -> None:
    s = raw.session
    status = replies(s.feed(command(FLASH_BEGIN, begin_words(raw.chip, 0x800, 2, 0x400, 0x1000))))
    assert status[0][2] == b"\0\0\0\0"
    payload = b"\x5a" * 0x400
    bad_chk = command(FLASH_DATA, struct.pack("<IIII", 0x400, 0, 0, 0) + payload, 0x00)
    assert replies(s.feed(bad_chk))[0][2] == b"\x01\x07\0\0"
    assert replies(s.feed(block(FLASH_DATA, payload, 1)))[0][2] == b"\x01\x05\0\0"  # seq skipped
    assert replies(s.feed(block(FLASH_DATA, payload, 0)))[0][2] == b"\0\0\0\0"
    assert raw.flash.read(0x1000, 0x400) == payload
    # Past the end of flash: the ROM's flash-write error.
    past = begin_words(raw.chip, 0x2000, 2, 0x1000, raw.flash.size - 0x1000)
    assert replies(s.feed(command(FLASH_BEGIN, past)))[0][2] == b"\x01\x08\0\0"


def test_rom_md5_is_hex_and_stub_md5_is_raw(raw: Board) -> None:
    raw.flash.write(0, b"hello")
    args = struct.pack("<IIII", 0, 5, 0, 0)
    ((_, _, rom),) = replies(raw.session.feed(command(SPI_FLASH_MD5, args)))
    assert rom == hashlib.md5(b"hello").hexdigest().encode() + b"\0\0\0\0"
    to_stub(raw.session)
    ((_, _, stub),) = replies(raw.session.feed(command(SPI_FLASH_MD5, args)))
    assert stub == hashlib.md5(b"hello").digest() + b"\0\0"


def test_nor_semantics_without_erase(raw: Board) -> None:
    s = raw.session
    raw.flash.write(0x3000, b"\x0f" * 0x400)
    # FLASH_BEGIN with erase size 0 erases nothing; the data block ANDs into old contents.
    s.feed(command(FLASH_BEGIN, begin_words(raw.chip, 0, 1, 0x400, 0x3000)))
    assert replies(s.feed(block(FLASH_DATA, b"\x3c" * 0x400, 0)))[0][2] == b"\0\0\0\0"
    assert raw.flash.read(0x3000, 0x400) == b"\x0c" * 0x400


def test_stub_deflate_and_end_flags(raw: Board) -> None:
    s = raw.session
    to_stub(s)
    image = compressible(50_000)
    packed = zlib.compress(image, 9)
    s.feed(command(FLASH_DEFL_BEGIN, struct.pack("<IIIII", len(image), 2, 0x4000, 0x20000, 0)))
    half = len(packed) // 2
    assert replies(s.feed(block(FLASH_DEFL_DATA, packed[:half], 0)))[0][2] == b"\0\0"
    # Ending early is refused (not enough data); then the rest arrives and END(1) keeps the stub.
    assert replies(s.feed(command(FLASH_DEFL_END, struct.pack("<I", 1))))[0][2] == b"\x01\xc8"
    assert replies(s.feed(block(FLASH_DEFL_DATA, packed[half:], 1)))[0][2] == b"\0\0"
    assert replies(s.feed(command(FLASH_DEFL_END, struct.pack("<I", 1))))[0][2] == b"\0\0"
    assert raw.flash.read(0x20000, len(image)) == image and s.mode == "stub"
    # A broken stream is a stub inflate error.
    s.feed(command(FLASH_DEFL_BEGIN, struct.pack("<IIIII", 100, 1, 0x4000, 0x30000, 0)))
    assert replies(s.feed(block(FLASH_DEFL_DATA, b"not zlib at all", 0)))[0][2] == b"\x01\xc7"
    # FLASH_BEGIN(0, 0) + FLASH_END(0): the stub reboots into the ROM loader.
    s.feed(command(FLASH_BEGIN, struct.pack("<IIIII", 0, 0, 0x4000, 0, 0)))
    assert replies(s.feed(command(FLASH_END, struct.pack("<I", 0))))[0][2] == b"\0\0"
    assert s.mode == "download"


def test_stub_write_past_end_and_erase_region_alignment(raw: Board) -> None:
    s = raw.session
    to_stub(s)
    past = struct.pack("<IIIII", 0x2000, 1, 0x4000, raw.flash.size - 0x1000, 0)
    assert replies(s.feed(command(FLASH_BEGIN, past)))[0][2] == b"\x01\xc4"
    unaligned = struct.pack("<II", 0x100, 0x1000)
    assert replies(s.feed(command(ERASE_REGION, unaligned)))[0][2] == b"\x01\xc0"


def test_stub_read_flash_streams_with_window(raw: Board) -> None:
    s = raw.session
    data = os.urandom(0x5000)
    raw.flash.write(0x1000, data)
    to_stub(s)
    out = s.feed(command(READ_FLASH, struct.pack("<IIII", 0x1000, len(data), 0x1000, 2)))
    frames = slip.SlipDecoder().feed(out)
    assert frames[0][:2] == bytes([1, READ_FLASH]) and len(frames) == 3  # ack + 2 in flight
    got = frames[1] + frames[2]
    while True:
        more = slip.SlipDecoder().feed(s.feed(slip.encode(struct.pack("<I", len(got)))))
        if not more:
            continue
        if len(got) == len(data):
            assert more == [hashlib.md5(data).digest()]
            break
        got += b"".join(more)
    assert got == data
    assert len(replies(s.feed(command(SYNC, SYNC_PAYLOAD)))) == 8


def test_rom_read_flash_slow_is_64_bytes(raw: Board) -> None:
    raw.flash.write(0x100, b"abc")
    ((_, _, data),) = replies(
        raw.session.feed(command(READ_FLASH_SLOW, struct.pack("<II", 0x100, 3)))
    )
    assert data[:3] == b"abc" and len(data) == 64 + 4
    too_long = command(READ_FLASH_SLOW, struct.pack("<II", 0, 65))
    assert replies(raw.session.feed(too_long))[0][2] == b"\x01\x0a\0\0"


def test_change_baud_acks_then_calls_on_baud(raw: Board) -> None:
    seen: list[int] = []
    session = LoaderSession(raw.chip, raw.flash, raw.mac, on_baud=seen.append)
    out = session.feed(command(CHANGE_BAUDRATE, struct.pack("<II", 921600, 0)))
    assert seen == [921600] and session.baudrate == 921600
    assert replies(out) == [(CHANGE_BAUDRATE, 0, b"\0\0\0\0")]
    session.enter_download()
    assert session.baudrate == 115200


def test_flash_id_register_emulation_matches_jedec(raw: Board) -> None:
    # Done through esptool above; here just the RDID default for a 1 MB flash.
    esp = raw.connect(attach=True)
    assert esp.flash_id() == 0x1440EF


# --------------------------------------------------------------------------- chip constants


@pytest.mark.parametrize("chip", CHIPS)
def test_rom_banner_matches_esptools_boot_mode_scan(chip: str) -> None:
    pattern = re.compile(rb"boot:(0x[0-9a-fA-F]+)(.*waiting for download)?", re.DOTALL)
    download = pattern.search(rom_banner(chip, download=True).encode())
    spi = pattern.search(rom_banner(chip, download=False).encode())
    # The newer ROMs name their own strapping modes (an ESP32-C6 trace: "boot:0x4
    # (DOWNLOAD(USB/UART0/SDIO_FEI_FEO))"); esptool only needs the pattern to match.
    boot_mode = {"esp32s3": b"0x0", "esp32c6": b"0x4"}.get(chip, b"0x3")
    assert download is not None and download.group(1) == boot_mode and download.group(2)
    assert spi is not None and spi.group(1) == b"0x13" and spi.group(2) is None
    first = rom_banner(chip, download=False).splitlines()[0]
    assert (
        first
        == {
            "esp32": "ets Jun  8 2016 00:22:57",
            "esp32s2": "ESP-ROM:esp32s2-rc4-20191025",
            "esp32c3": "ESP-ROM:esp32c3-api1-20210207",
            "esp32s3": "ESP-ROM:esp32s3-20210327",
            "esp32c6": "ESP-ROM:esp32c6-20220919",
        }[chip]
    )
    if chip in ("esp32", "esp32s2", "esp32c3"):
        assert rom_banner(chip, True).endswith(
            "rst:0x1 (POWERON_RESET),boot:0x3 (DOWNLOAD_BOOT(UART0/UART1/SDIO_REI_REO_V2))\r\n"
            "waiting for download\r\n"
        )


def test_mac_for_is_stable_unique_and_uses_espressif_ouis() -> None:
    assert mac_for("esp32-1", "esp32") == mac_for("esp32-1", "esp32")
    assert mac_for("esp32-1", "esp32")[:3] == bytes.fromhex("240ac4")
    assert mac_for("s2", "esp32s2")[:3] == bytes.fromhex("7cdfa1")
    assert mac_for("c3", "esp32c3")[:3] == bytes.fromhex("58cf79")
    macs = {mac_for(f"board-{i}", "esp32") for i in range(500)}
    assert len(macs) == 500


def test_chip_constants() -> None:
    assert [chip_spec(c).image_chip_id for c in CHIPS] == [0, 2, 5, 9, 13]
    assert [chip_spec(c).bootloader_offset for c in CHIPS] == [0x1000, 0x1000, 0x0, 0x0, 0x0]
    assert jedec_id_for_size(4 << 20) == 0x1640EF and jedec_id_for_size(16 << 20) == 0x1840EF
    with pytest.raises(ValueError, match="unknown chip"):
        chip_spec("esp8266")
    with pytest.raises(ValueError, match="power of two"):
        jedec_id_for_size(3 << 20)


@pytest.mark.parametrize("chip", CHIPS)
def test_chip_specs_agree_with_esptools_target_classes(chip: str) -> None:
    from esptool.targets import CHIP_DEFS

    spec, rom = chip_spec(chip), CHIP_DEFS[chip]
    assert spec.esptool_name == rom.CHIP_NAME
    assert spec.image_chip_id == rom.IMAGE_CHIP_ID
    assert spec.bootloader_offset == rom.BOOTLOADER_FLASH_OFFSET
    assert spec.uart_clkdiv_reg == rom.UART_CLKDIV_REG
    assert spec.mac_reg == (rom.EFUSE_RD_REG_BASE + 4 if chip == "esp32" else rom.MAC_EFUSE_REG)
    assert (spec.spi_base, spec.spi_usr, spec.spi_usr1, spec.spi_usr2, spec.spi_mosi_dlen,
            spec.spi_miso_dlen, spec.spi_w0) == (
        rom.SPI_REG_BASE, rom.SPI_USR_OFFS, rom.SPI_USR1_OFFS, rom.SPI_USR2_OFFS,
        rom.SPI_MOSI_DLEN_OFFS, rom.SPI_MISO_DLEN_OFFS, rom.SPI_W0_OFFS)
    if rom.WATCHDOG_RESET_SUPPORTED:
        assert spec.rtc_wdt == (rom.RTC_CNTL_WDTWPROTECT_REG, rom.RTC_CNTL_WDTCONFIG0_REG)
    else:
        assert spec.rtc_wdt is None


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("revision", [0, 1, 3, 100, 101, 102, 200, 301])
def test_revision_efuses_read_back_through_esptool(tmp_path: Path, chip: str,
                                                    revision: int) -> None:
    from pytest_hilfarm.sim.chips import check_revision

    try:
        check_revision(chip, revision)
    except ValueError:
        pytest.skip(f"v{revision // 100}.{revision % 100} does not fit {chip}'s eFuse fields")
    b = Board(tmp_path, chip)
    b.session = LoaderSession(chip, b.flash, b.mac, revision=revision)
    b.port = SimPort(b.session)
    esp = b.connect(chip)
    assert esp.get_chip_revision() == revision
    assert f"(revision v{revision // 100}.{revision % 100})" in esp.get_chip_description()
