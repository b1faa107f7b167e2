"""FlashMemory: file-backed NOR flash."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pytest_hilfarm.sim.flash import FlashMemory, FlashRangeError

SIZE = 64 * 1024


@pytest.fixture
def flash(tmp_path: Path):
    f = FlashMemory(tmp_path / "b.flash", SIZE)
    yield f
    f.close()


def test_new_flash_is_erased(flash: FlashMemory, tmp_path: Path) -> None:
    assert flash.size == SIZE
    assert flash.read(0, SIZE) == b"\xff" * SIZE
    assert (tmp_path / "b.flash").stat().st_size == SIZE


def test_write_is_nor_and(flash: FlashMemory) -> None:
    flash.write(0x10, b"\xf0\x0f\xaa")
    flash.write(0x10, b"\x3c\x3c\xff")
    assert flash.read(0x10, 3) == b"\x30\x0c\xaa"
    flash.write(0x10, b"\xff\xff\xff")  # all-ones program changes nothing
    assert flash.read(0x10, 3) == b"\x30\x0c\xaa"


def test_erase_needs_sector_alignment(flash: FlashMemory) -> None:
    flash.write(0x1000, b"\x00" * 0x2000)
    flash.erase(0x2000, 0x1000)
    assert flash.read(0x1000, 0x2000) == b"\x00" * 0x1000 + b"\xff" * 0x1000
    with pytest.raises(ValueError, match="aligned"):
        flash.erase(0x1001, 0x1000)
    with pytest.raises(ValueError, match="aligned"):
        flash.erase(0x1000, 0x800)


def test_out_of_range_is_a_clear_error(flash: FlashMemory) -> None:
    with pytest.raises(FlashRangeError, match="outside"):
        flash.read(SIZE - 4, 8)
    with pytest.raises(FlashRangeError):
        flash.write(SIZE, b"x")
    with pytest.raises(FlashRangeError):
        flash.erase(SIZE, 0x1000)
    with pytest.raises(FlashRangeError):
        flash.md5(-1, 4)


def test_md5_and_erase_all(flash: FlashMemory) -> None:
    flash.write(0x100, b"data")
    assert flash.md5(0x100, 4) == hashlib.md5(b"data").digest()
    flash.erase_all()
    assert flash.read(0, SIZE) == b"\xff" * SIZE


def test_contents_persist_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "p.flash"
    with FlashMemory(path, SIZE) as f:
        f.write(0x4000, b"persist")
    with FlashMemory(path, SIZE) as f:
        assert f.read(0x4000, 7) == b"persist"
        assert f.read(0, 4) == b"\xff" * 4


def test_size_checks(tmp_path: Path) -> None:
    path = tmp_path / "s.flash"
    with FlashMemory(path, SIZE) as f:
        f.write(0, b"\x00")
    with FlashMemory(path, 2 * SIZE) as f:  # a short file grows with erased bytes
        assert f.read(0, 2) == b"\x00\xff"
        assert f.read(SIZE, 4) == b"\xff" * 4
    with pytest.raises(ValueError, match="more than"):
        FlashMemory(path, SIZE)
    with pytest.raises(ValueError, match="multiple of 4 KiB"):
        FlashMemory(tmp_path / "x.flash", 1000)


def test_close_is_idempotent(tmp_path: Path) -> None:
    f = FlashMemory(tmp_path / "c.flash", SIZE)
    f.close()
    f.close()
    assert f.closed
