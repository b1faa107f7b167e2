import contextlib
import hashlib
import io
import random
import struct

import pytest
from esptool.bin_image import LoadFirmwareImage
from esptool.cmds import _parse_app_info, image_info
from esptool.loader import ESPLoader
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_hilfarm.errors import ImageError
from pytest_hilfarm.esp.image import (
    APP_DESC_OFFSET,
    AppDesc,
    ImageFormatError,
    build_app_image,
    chip_for_id,
    chip_id_of,
    memory_map,
    parse_image,
    xor_checksum,
)

CHIPS = ["esp32", "esp32s2", "esp32c3"]
RAM = {"esp32": 0x3FFB0000, "esp32s2": 0x3FFBE000, "esp32c3": 0x3FC8A600}
DESC = AppDesc(project_name="blink", version="2.1.0", secure_version=3, idf_ver="v5.3.1",
               time="12:34:56", date="Nov 28 2026", app_elf_sha256=bytes(range(32)),
               mmu_page_size=16)


def make(chip, desc=DESC, **kw):
    mm = memory_map(chip)
    return build_app_image(
        chip,
        [(mm.drom_start + 0x20, b"rodata!!" * 8), (RAM[chip], b"\x11" * 64),
         (mm.irom_start + 0x20, b"\x13\x00\x00\x00" * 100)],
        entry=mm.irom_start + 0x20, app_desc=desc, **kw)


def esptool_info(data, chip):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        image_info(data, chip=chip)
    return out.getvalue()


@pytest.mark.parametrize("chip", CHIPS)
def test_build_then_parse(chip):
    data = make(chip)
    img = parse_image(data, chip=chip)
    assert img.header.magic == 0xE9
    assert img.header.chip_id == chip_id_of(chip) and img.chip == chip
    assert img.header.hash_appended == 1
    assert img.header.entry_addr == memory_map(chip).irom_start + 0x20
    assert img.checksum_ok and img.sha256_ok
    assert img.length == len(data)
    assert img.segments[0].data_offset == APP_DESC_OFFSET
    assert img.app_desc == DESC
    assert img.bootloader_desc is None and img.signature_sector is None
    assert img.sha256_hex == data[-32:].hex()
    assert (img.checksum_offset + 1) % 16 == 0


@pytest.mark.parametrize("chip", CHIPS)
def test_esptool_agrees(chip):
    data = make(chip)
    ours = parse_image(data, chip=chip)
    theirs = LoadFirmwareImage(chip, data)
    assert [(s.addr, bytes(s.data)) for s in theirs.segments] == \
        [(s.load_addr, s.data) for s in ours.segments]
    assert theirs.checksum == ours.stored_checksum == theirs.calculate_checksum()
    assert theirs.stored_digest == theirs.calc_digest == ours.calculated_sha256
    assert theirs.chip_id == chip_id_of(chip)
    info = esptool_info(data, chip)
    assert "(valid)" in info.split("Checksum:")[1].splitlines()[0]
    assert "(valid)" in info.split("Validation hash:")[1].splitlines()[0]
    assert "Project name: blink" in info and "App version: 2.1.0" in info
    assert "Secure version: 3" in info


def test_app_desc_matches_esptool_parser():
    raw = DESC.encode()
    assert len(raw) == 256
    parsed = _parse_app_info(raw)
    assert parsed["project_name"] == "blink" and parsed["version"] == "2.1.0"
    assert parsed["secure_version"] == 3 and parsed["idf_ver"] == "v5.3.1"
    assert parsed["app_elf_sha256"] == bytes(range(32)).hex()
    assert parsed["mmu_page_size"] == "64 KB"


text = st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=15)


@settings(max_examples=50, deadline=None)
@given(project=text, version=text, sv=st.integers(0, 0xFFFFFFFF), idf=text,
       sha=st.binary(min_size=32, max_size=32), mode=st.integers(0, 255))
def test_app_desc_round_trip(project, version, sv, idf, sha, mode):
    desc = AppDesc(project_name=project, version=version, secure_version=sv, idf_ver=idf,
                   app_elf_sha256=sha, spi_flash_mode=mode)
    assert AppDesc.decode(desc.encode()) == desc


def test_app_desc_too_long_field():
    with pytest.raises(ImageError, match="project_name"):
        AppDesc(project_name="x" * 32).encode()


@given(st.binary(max_size=3000))
def test_xor_checksum_matches_esptool(data):
    assert xor_checksum(data) == ESPLoader.checksum(data)


def test_xor_checksum_matches_esptool_on_random_images_of_every_awkward_size():
    """Sizes around the halving steps (odd lengths leave a byte over at each level), up to a
    1 MB app, with a running state as segment after segment uses it."""
    rng = random.Random(2026)
    sizes = [*range(0, 140), 255, 256, 257, 4095, 4097, 65535, (1 << 20) + 3]
    for size in sizes:
        data = rng.randbytes(size)
        state = rng.randrange(256)
        assert xor_checksum(data, state) == ESPLoader.checksum(data, state), size


def test_chip_ids():
    assert [chip_id_of(c) for c in CHIPS] == [0, 2, 5]
    assert chip_for_id(5) == "esp32c3" and chip_for_id(77) is None


def kind_of(data, **kw):
    with pytest.raises(ImageFormatError) as info:
        parse_image(data, **kw)
    return info.value


def test_bad_magic():
    err = kind_of(b"\xff" * 64)
    assert err.kind == "magic" and err.offset == 0
    assert "offset 0x0" in str(err) and "0xff" in str(err)


def test_wrong_chip():
    err = kind_of(make("esp32c3"), chip="esp32")
    assert err.kind == "chip_id" and "chip_id 5 (esp32c3), not esp32" in str(err)
    assert "offset 0xc" in str(err)
    assert parse_image(make("esp32c3"), chip="esp32", verify=False).header.chip_id == 5


def test_truncated():
    data = make("esp32")
    err = kind_of(data[:100])
    assert err.kind == "truncated" and "segment 0 data" in str(err)


def test_checksum_error_names_offset():
    data = bytearray(make("esp32s2"))
    img = parse_image(bytes(data))
    data[img.segments[-1].data_offset + 4] ^= 0xFF
    err = kind_of(bytes(data))
    assert err.kind == "checksum" and err.offset == img.checksum_offset
    assert f"offset 0x{img.checksum_offset:x}" in str(err)
    relaxed = parse_image(bytes(data), verify=False)
    assert not relaxed.checksum_ok and relaxed.sha256_ok is False


def test_sha256_error():
    data = bytearray(make("esp32c3"))
    data[-1] ^= 0x01
    err = kind_of(bytes(data))
    assert err.kind == "sha256" and err.offset == len(data) - 32
    relaxed = parse_image(bytes(data), verify=False)
    assert relaxed.checksum_ok and relaxed.sha256_ok is False


def test_no_hash_appended():
    data = make("esp32", hash_appended=False)
    img = parse_image(data)
    assert img.header.hash_appended == 0 and img.sha256_ok is None
    assert img.sha256_hex == hashlib.sha256(data).hexdigest()


def test_too_many_segments_and_bad_length():
    data = bytearray(make("esp32"))
    data[1] = 17
    assert kind_of(bytes(data)).kind == "segment_count"
    data = bytearray(make("esp32"))
    struct.pack_into("<I", data, 24 + 4, 0x102)  # first segment length not a multiple of 4
    err = kind_of(bytes(data))
    assert err.kind == "segment_length" and err.offset == 24 and err.values == (0, 0x102)


def test_mapped_segment_alignment_checked():
    data = bytearray(make("esp32"))
    struct.pack_into("<I", data, 24, memory_map("esp32").drom_start + 0x40)
    assert kind_of(bytes(data), chip="esp32").kind == "segment_alignment"


def test_hash_appended_field_checked():
    data = bytearray(make("esp32"))
    data[23] = 7
    assert kind_of(bytes(data)).kind == "hash_appended"


def test_unknown_chip_rejected():
    with pytest.raises(ImageError, match="unsupported chip"):
        build_app_image("esp8266", [], entry=0)


def test_signature_sector_detected_from_espsecure(tmp_path):
    espsecure = pytest.importorskip("espsecure")
    key = tmp_path / "key.pem"
    unsigned = tmp_path / "app.bin"
    signed = tmp_path / "signed.bin"
    digest = tmp_path / "digest.bin"
    unsigned.write_bytes(make("esp32c3"))
    with contextlib.redirect_stdout(io.StringIO()):
        espsecure.generate_signing_key(version="2", scheme="ecdsa256", keyfile=str(key))
        with key.open("rb") as k, unsigned.open("rb") as d:
            espsecure.sign_data(version="2", keyfile=[k], output=str(signed),
                                append_signatures=False, hsm=False, hsm_config=None,
                                pub_key=[], signature=[], datafile=d, skip_padding=False)
        with key.open("rb") as k:
            espsecure.digest_sbv2_public_key(k, str(digest))
    data = signed.read_bytes()
    img = parse_image(data, chip="esp32c3")
    sector = img.signature_sector
    assert sector is not None
    assert sector.offset == (img.length + 4095) // 4096 * 4096 == img.signed_length
    assert len(data) == sector.offset + 4096
    (block,) = sector.blocks
    assert block.crc_ok and block.version == 3
    assert block.image_digest == hashlib.sha256(data[: sector.offset]).digest()
    assert block.key_digest == digest.read_bytes()
