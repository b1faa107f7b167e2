import hashlib

import pytest

from pytest_hilfarm.errors import ImageError
from pytest_hilfarm.esp.partitions import (
    MAX_TABLE_LENGTH,
    Partition,
    PartitionTable,
    factory_layout,
    layout,
    parse_size,
    two_ota_layout,
)


def test_nvs_entry_bytes():
    raw = two_ota_layout().encode()
    assert raw[:32].hex() == (
        "aa50" "01" "02" "00900000" "00400000" + b"nvs".ljust(16, b"\0").hex() + "00000000"
    )


def test_two_ota_layout_matches_idf():
    t = two_ota_layout("4MB")
    rows = [(p.label, p.type, p.subtype, p.offset, p.size) for p in t]
    assert rows == [
        ("nvs", 1, 2, 0x9000, 0x4000),
        ("otadata", 1, 0, 0xD000, 0x2000),
        ("phy_init", 1, 1, 0xF000, 0x1000),
        ("factory", 0, 0x00, 0x10000, 0x100000),
        ("ota_0", 0, 0x10, 0x110000, 0x100000),
        ("ota_1", 0, 0x11, 0x210000, 0x100000),
    ]
    assert t.app_count == 2
    assert t.otadata is not None and t.otadata.offset == 0xD000


def test_factory_layout_matches_idf_singleapp():
    t = factory_layout("2MB")
    assert [(p.label, p.offset, p.size) for p in t] == [
        ("nvs", 0x9000, 0x6000), ("phy_init", 0xF000, 0x1000), ("factory", 0x10000, 0x100000)]
    assert t.otadata is None and t.app_count == 0


def test_encoding_md5_entry_and_padding():
    t = two_ota_layout()
    raw = t.encode()
    assert len(raw) == MAX_TABLE_LENGTH
    body = raw[: 6 * 32]
    md5 = raw[6 * 32 : 7 * 32]
    assert md5[:16] == b"\xeb\xeb" + b"\xff" * 14
    assert md5[16:] == hashlib.md5(body).digest()
    assert raw[7 * 32 :] == b"\xff" * (MAX_TABLE_LENGTH - 7 * 32)


@pytest.mark.parametrize("name", ["factory", "two-ota"])
def test_round_trip(name):
    t = layout(name)
    back = PartitionTable.decode(t.encode())
    assert back.entries == t.entries
    assert back.md5_ok is True
    no_md5 = PartitionTable.decode(t.encode(md5=False))
    assert no_md5.entries == t.entries and no_md5.md5_ok is None


def test_md5_mismatch_is_reported_with_offset():
    raw = bytearray(two_ota_layout().encode())
    raw[8] ^= 0x01  # size of nvs
    with pytest.raises(ImageError, match=r"MD5 mismatch") as info:
        PartitionTable.decode(bytes(raw))
    assert "offset 0xc0" in str(info.value)
    assert PartitionTable.decode(bytes(raw), verify_md5=False).md5_ok is False


def test_bad_magic_and_missing_end():
    raw = bytearray(two_ota_layout().encode(md5=False))
    raw[32] = 0x00
    with pytest.raises(ImageError, match="magic") as info:
        PartitionTable.decode(bytes(raw))
    assert "offset 0x20" in str(info.value)
    full = b"".join(Partition(f"p{i}", 1, 0x81, 0x9000 + i * 0x1000, 0x1000).encode()
                    for i in range(MAX_TABLE_LENGTH // 32))
    with pytest.raises(ImageError, match="terminating"):
        PartitionTable.decode(full)


def table(*parts):
    return PartitionTable(tuple(Partition(*p) for p in parts))


@pytest.mark.parametrize(
    "parts,message",
    [
        ((("a", 1, 2, 0x9000, 0x6000), ("b", 1, 1, 0xE000, 0x1000)), "overlaps"),
        ((("app", 0, 0, 0x18000, 0x10000),), "not aligned to 0x10000"),
        ((("d", 1, 2, 0x9800, 0x1000),), "not aligned to 0x1000"),
        ((("otadata", 1, 0, 0xD000, 0x1000),), "otadata partition must have size 0x2000"),
        ((("x", 1, 2, 0x9000, 0x1000), ("x", 1, 2, 0xA000, 0x1000)), "duplicate"),
        ((("low", 1, 2, 0x7000, 0x1000),), "below 0x9000"),
        ((("odd", 1, 2, 0x9000, 0x1234),), "multiple of 0x1000"),
    ],
)
def test_validation(parts, message):
    with pytest.raises(ImageError, match=message):
        table(*parts).validate()


def test_two_ota_needs_4mb():
    with pytest.raises(ImageError, match="past the end of the 2 MB flash"):
        two_ota_layout("2MB")


def found(p: Partition | None) -> Partition:
    assert p is not None
    return p


def test_find():
    t = two_ota_layout()
    assert found(t.find("ota_1")).offset == 0x210000
    assert found(t.find(type="app", subtype="ota_0")).label == "ota_0"
    assert found(t.find(type=0, subtype=0x11)).label == "ota_1"
    assert found(t.find(type="data", subtype="ota")).label == "otadata"
    assert found(t.find(type="data", subtype="phy")).label == "phy_init"
    assert t.find("nope") is None
    assert found(t.factory).label == "factory"
    assert found(t.find("ota_0")).usage == "OTA app"
    assert found(t.find("nvs")).subtype_name == "nvs"


@pytest.mark.parametrize("text,value", [("4MB", 4 << 20), ("1M", 1 << 20), ("0x1000", 4096),
                                        ("64K", 65536), ("123", 123)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_error():
    with pytest.raises(ImageError, match="size"):
        parse_size("lots")
