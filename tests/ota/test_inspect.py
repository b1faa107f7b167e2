"""``inspect_image``: fields, integrity flags, signature blocks and the partition fit."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_hilfarm.errors import ImageError, UsageError
from pytest_hilfarm.esp.partitions import two_ota_layout
from pytest_hilfarm.ota.describe import format_report, inspect_image
from pytest_hilfarm.ota.keys import generate_signing_key, key_digest
from pytest_hilfarm.ota.signing import sign_image
from pytest_hilfarm.sim.appbuild import build_app


@pytest.fixture(scope="session")
def rsa_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # RSA-3072 keygen is slow: every OTA test module reuses the keys in the session's basetemp.
    d = tmp_path_factory.getbasetemp() / "ota-session-keys"
    d.mkdir(exist_ok=True)
    p = d / "k1.pem"
    if not p.exists():
        generate_signing_key(p)
    return p


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "app.bin"
    p.write_bytes(build_app("esp32s2", "inspectme", "3.4.5", secure_version=7,
                            idf_ver="v5.3.1"))
    return p


def test_fields_of_unsigned_image(image: Path) -> None:
    r = inspect_image(image)
    assert (r.chip, r.project, r.version, r.secure_version, r.idf_ver) == \
        ("esp32s2", "inspectme", "3.4.5", 7, "v5.3.1")
    assert r.checksum_ok and r.sha256_ok is True and r.intact
    assert not r.signed and r.blocks == () and r.fits is None
    text = format_report(r)
    for line in ("chip:           esp32s2", "secure_version: 7", "sha256 (hash):  ok",
                 "signature:      unsigned", "idf_ver:        v5.3.1"):
        assert line in text
    assert "partition:" not in text


def test_fit_against_size(image: Path) -> None:
    size = image.stat().st_size
    assert inspect_image(image, size).fits is True
    small = inspect_image(image, size - 1)
    assert small.fits is False
    assert "DOES NOT FIT (over by 1 bytes)" in format_report(small)


def test_fit_against_partition_table(tmp_path: Path, image: Path) -> None:
    table = tmp_path / "partition-table.bin"
    table.write_bytes(two_ota_layout("4MB").encode())
    r = inspect_image(image, partition_table=table)
    assert r.partition == f"ota_0 in {table}" and r.partition_size == 0x100000 and r.fits
    with pytest.raises(UsageError, match="not both"):
        inspect_image(image, 1, partition_table=table)
    table.write_bytes(b"\x00" * 64)
    with pytest.raises(ImageError, match="not a binary partition table"):
        inspect_image(image, partition_table=table)


def test_signed_image_lists_blocks(tmp_path: Path, image: Path, rsa_key: Path) -> None:
    signed = tmp_path / "signed.bin"
    signed.write_bytes(sign_image(image.read_bytes(), [rsa_key]))
    r = inspect_image(signed)
    assert r.signed and r.intact and r.signed_length == signed.stat().st_size - 4096
    assert r.blocks[0].key_digest == key_digest(rsa_key)
    assert f"block 0: RSA-3072 key digest {key_digest(rsa_key).hex()} crc ok digest ok" in \
        format_report(r)


def test_corruption_is_reported_not_raised(tmp_path: Path, image: Path, rsa_key: Path) -> None:
    data = bytearray(sign_image(image.read_bytes(), [rsa_key]))
    data[0x300] ^= 0xFF
    bad = tmp_path / "bad.bin"
    bad.write_bytes(data)
    r = inspect_image(bad)
    assert not r.checksum_ok and r.sha256_ok is False and not r.intact
    assert not r.blocks[0].digest_ok
    text = format_report(r)
    assert "checksum:       MISMATCH" in text and "digest MISMATCH" in text


def test_not_an_image(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world" * 10)
    with pytest.raises(ImageError, match="not an ESP app image"):
        inspect_image(junk)
