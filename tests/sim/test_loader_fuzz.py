"""Fuzzing LoaderSession: whatever arrives, feed() returns bytes and a SYNC still works after."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_hilfarm.sim import loader, slip
from pytest_hilfarm.sim.chips import mac_for
from pytest_hilfarm.sim.flash import FlashMemory
from pytest_hilfarm.sim.loader import SYNC, SYNC_PAYLOAD, LoaderSession, xor_checksum

CHIPS = ("esp32", "esp32s2", "esp32c3")
KNOWN_OPS = [
    loader.FLASH_BEGIN,
    loader.FLASH_DATA,
    loader.FLASH_END,
    loader.MEM_BEGIN,
    loader.MEM_END,
    loader.MEM_DATA,
    loader.SYNC,
    loader.WRITE_REG,
    loader.READ_REG,
    loader.SPI_SET_PARAMS,
    loader.SPI_ATTACH,
    loader.READ_FLASH_SLOW,
    loader.CHANGE_BAUDRATE,
    loader.FLASH_DEFL_BEGIN,
    loader.FLASH_DEFL_DATA,
    loader.FLASH_DEFL_END,
    loader.SPI_FLASH_MD5,
    loader.GET_SECURITY_INFO,
    loader.ERASE_FLASH,
    loader.ERASE_REGION,
    loader.READ_FLASH,
]
SETTINGS = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Small numbers land inside the 256 KiB flash and hit real code paths; big ones test bounds.
word = st.one_of(st.integers(0, 0x4000), st.integers(0, 0x50000), st.integers(0, 2**32 - 1))
words = st.lists(word, max_size=6).map(lambda ws: struct.pack(f"<{len(ws)}I", *ws))
data_block = st.tuples(st.integers(0, 3), st.binary(max_size=96)).map(
    lambda t: struct.pack("<IIII", len(t[1]), t[0], 0, 0) + t[1]
)
payload = st.one_of(st.binary(max_size=80), words, data_block)


@st.composite
def packets(draw: st.DrawFn) -> bytes:
    op = draw(st.one_of(st.sampled_from(KNOWN_OPS), st.integers(0, 255)))
    data = draw(payload)
    if draw(st.booleans()):
        chk = xor_checksum(data[16:])
    else:
        chk = draw(st.integers(0, 2**32 - 1))
    size = len(data) if draw(st.integers(0, 9)) else draw(st.integers(0, 0xFFFF))
    direction = 0 if draw(st.integers(0, 9)) else draw(st.integers(0, 255))
    return slip.encode(struct.pack("<BBHI", direction, op, size, chk) + data)


@pytest.fixture(scope="module")
def flash(tmp_path_factory: pytest.TempPathFactory):
    f = FlashMemory(Path(tmp_path_factory.mktemp("fuzz")) / "fuzz.flash", 256 * 1024)
    yield f
    f.close()


def session(flash: FlashMemory, chip: str, stub: bool) -> LoaderSession:
    s = LoaderSession(chip, flash, mac_for("fuzz", chip))
    # esptool attaches the SPI flash (SPI_ATTACH) before any flash command in ROM mode.
    s.feed(slip.encode(struct.pack("<BBHI", 0, loader.SPI_ATTACH, 8, 0) + bytes(8)))
    if stub:
        code = b"\x00" * 8
        s.feed(
            slip.encode(
                struct.pack("<BBHI", 0, loader.MEM_BEGIN, 16, 0) + struct.pack("<IIII", 8, 1, 8, 0)
            )
            + slip.encode(
                struct.pack("<BBHI", 0, loader.MEM_DATA, 24, xor_checksum(code))
                + struct.pack("<IIII", 8, 0, 0, 0)
                + code
            )
            + slip.encode(struct.pack("<BBHI", 0, loader.MEM_END, 8, 0) + struct.pack("<II", 0, 1))
        )
        assert s.mode == "stub"
    return s


def assert_still_syncs(s: LoaderSession) -> None:
    if s.mode == "app":  # a FLASH_END made the ROM start the app: a reset brings it back
        s.enter_download()
    # A lone C0 first: the fuzz may have left a half frame open, as noise on a real line does.
    out = s.feed(b"\xc0" + slip.encode(struct.pack("<BBHI", 0, SYNC, 36, 0) + SYNC_PAYLOAD))
    frames = slip.SlipDecoder().feed(out)
    syncs = [f for f in frames if f[:2] == b"\x01\x08"]
    assert len(syncs) == 8, frames
    assert all(f[8:10] == b"\0\0" for f in syncs)
    assert s.internal_errors == 0, s.last_error


@settings(SETTINGS, max_examples=4000)
@given(chip=st.sampled_from(CHIPS), stub=st.booleans(), noise=st.binary(max_size=400))
def test_random_bytes(flash: FlashMemory, chip: str, stub: bool, noise: bytes) -> None:
    s = session(flash, chip, stub)
    assert isinstance(s.feed(noise), bytes)
    assert_still_syncs(s)


@settings(SETTINGS, max_examples=3000)
@given(
    chip=st.sampled_from(CHIPS),
    stub=st.booleans(),
    batch=st.lists(packets(), min_size=1, max_size=8),
)
def test_random_packets(flash: FlashMemory, chip: str, stub: bool, batch: list[bytes]) -> None:
    s = session(flash, chip, stub)
    for pkt in batch:
        assert isinstance(s.feed(pkt), bytes)
    assert_still_syncs(s)


@settings(SETTINGS, max_examples=1500)
@given(
    chip=st.sampled_from(CHIPS),
    stub=st.booleans(),
    parts=st.lists(st.one_of(packets(), st.binary(max_size=40)), min_size=1, max_size=10),
    cut=st.integers(0, 10_000),
)
def test_mixed_stream_split_anywhere(
    flash: FlashMemory, chip: str, stub: bool, parts: list[bytes], cut: int
) -> None:
    s = session(flash, chip, stub)
    stream = b"".join(parts)
    cut %= len(stream) + 1
    out = s.feed(stream[:cut]) + s.feed(stream[cut:])
    assert isinstance(out, bytes)
    assert_still_syncs(s)


def _command(op: int, data: bytes, chk: int = 0) -> bytes:
    return slip.encode(struct.pack("<BBHI", 0, op, len(data), chk) + data)


@settings(SETTINGS, max_examples=2000)
@given(
    chip=st.sampled_from(CHIPS),
    stub=st.booleans(),
    compress=st.booleans(),
    sector=st.integers(0, 56),
    image=st.one_of(st.binary(max_size=3000), st.binary(max_size=40).map(lambda b: b * 50)),
    block_size=st.sampled_from([0x100, 0x400, 0x1000]),
    flips=st.lists(st.tuples(st.integers(0, 2**20), st.integers(1, 255)), max_size=3),
)
def test_plausible_writes_land_or_fail_cleanly(
    flash: FlashMemory,
    chip: str,
    stub: bool,
    compress: bool,
    sector: int,
    image: bytes,
    block_size: int,
    flips: list[tuple[int, int]],
) -> None:
    """esptool-shaped writes (optionally corrupted): intact ones must land exactly."""
    s = session(flash, chip, stub)
    offset = sector * 0x1000
    if compress:
        stream = zlib.compress(image, 9)
        size = len(image) if stub else -(-len(image) // block_size) * block_size
        begin_op, data_op, end_op = (
            loader.FLASH_DEFL_BEGIN,
            loader.FLASH_DEFL_DATA,
            loader.FLASH_DEFL_END,
        )
    else:
        stream = image
        size = len(image)
        begin_op, data_op, end_op = loader.FLASH_BEGIN, loader.FLASH_DATA, loader.FLASH_END
    blocks = [stream[i : i + block_size] for i in range(0, len(stream), block_size)]
    if not compress and blocks:
        blocks[-1] = blocks[-1].ljust(block_size, b"\xff")  # esptool pads the last raw block
    params = struct.pack("<IIII", size, len(blocks), block_size, offset)
    if stub or chip != "esp32":
        params += bytes(4)
    packets = [_command(begin_op, params)]
    for seq, chunk in enumerate(blocks):
        header = struct.pack("<IIII", len(chunk), seq, 0, 0)
        packets.append(_command(data_op, header + chunk, xor_checksum(chunk)))
    if stub:
        packets.append(_command(end_op, struct.pack("<I", 1)))
    for where, mask in flips:
        pkt = bytearray(packets[where % len(packets)])
        pkt[(where // len(packets)) % len(pkt)] ^= mask
        packets[where % len(packets)] = bytes(pkt)
    frames = slip.SlipDecoder().feed(b"".join(s.feed(p) for p in packets))
    if not flips:
        tail = 2 if stub else 4
        assert [f[-tail] for f in frames] == [0] * len(packets), frames
        assert flash.read(offset, len(image)) == image
    assert_still_syncs(s)


@settings(SETTINGS, max_examples=1000)
@given(
    chip=st.sampled_from(CHIPS),
    offset=st.integers(0, 0x3F000),
    length=st.integers(0, 0x3000),
    packet_size=st.sampled_from([1, 0x100, 0x1000]),
    window=st.integers(1, 80),
    bogus_acks=st.lists(st.integers(0, 2**32 - 1), max_size=4),
)
def test_read_flash_streaming_survives_bad_acks(
    flash: FlashMemory,
    chip: str,
    offset: int,
    length: int,
    packet_size: int,
    window: int,
    bogus_acks: list[int],
) -> None:
    """Stub READ_FLASH: wrong acks are ignored; honest acks get every byte and the digest."""
    s = session(flash, chip, True)
    length = min(length, flash.size - offset)
    request = struct.pack("<IIII", offset, length, packet_size, window)
    decoder = slip.SlipDecoder()
    frames = decoder.feed(s.feed(_command(loader.READ_FLASH, request)))
    assert frames[0][:2] == bytes([1, loader.READ_FLASH]) and frames[0][-2:] == b"\0\0"
    received = b"".join(frames[1:]) if length else b""
    for ack in bogus_acks:
        if ack > len(received):  # acks past what was sent must not release more data
            assert s.feed(slip.encode(struct.pack("<I", ack))) == b""
    digest = None
    for _ in range(length + 2):
        if len(received) >= length and digest is not None:
            break
        more = decoder.feed(s.feed(slip.encode(struct.pack("<I", len(received)))))
        for frame in more:
            if len(received) < length:
                received += frame
            else:
                digest = frame
        if length == 0 and frames[1:]:
            digest = frames[1]
    assert received == flash.read(offset, length)
    assert digest == hashlib.md5(received).digest()
    assert_still_syncs(s)
