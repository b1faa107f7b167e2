"""ESP-IDF partition tables: 32-byte entries, the MD5 entry, validation and the standard layouts.

Encodes and decodes the binary ``partition-table.bin`` exactly as IDF's ``gen_esp32part.py``
writes it and as the bootloader's ``esp_partition_table_verify`` reads it, and checks the rules
gen_esp32part enforces. It does no flash I/O and knows nothing about boards.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from pytest_hilfarm.errors import ImageError

# IDF partition_table/gen_esp32part.py: STRUCT_FORMAT, MAGIC_BYTES, MD5_PARTITION_BEGIN,
# MAX_PARTITION_LENGTH; esp_flash_partitions.h ESP_PARTITION_TABLE_OFFSET.
ENTRY_SIZE = 32
_ENTRY_FMT = "<2sBBLL16sL"
MAGIC = b"\xaa\x50"
MD5_MAGIC = b"\xeb\xeb"
MD5_BEGIN = MD5_MAGIC + b"\xff" * 14
TABLE_OFFSET = 0x8000
MAX_TABLE_LENGTH = 0xC00
TABLE_SECTOR = 0x1000

TYPE_APP = 0x00
TYPE_DATA = 0x01
TYPE_BOOTLOADER = 0x02
TYPE_PARTITION_TABLE = 0x03
TYPES: Mapping[str, int] = MappingProxyType({
    "app": TYPE_APP, "data": TYPE_DATA, "bootloader": TYPE_BOOTLOADER,
    "partition_table": TYPE_PARTITION_TABLE})

SUBTYPE_FACTORY = 0x00
SUBTYPE_OTA_MIN = 0x10
SUBTYPE_OTA_MAX = 0x1F
SUBTYPE_TEST = 0x20
SUBTYPE_DATA_OTA = 0x00
SUBTYPE_DATA_PHY = 0x01
SUBTYPE_DATA_NVS = 0x02

# gen_esp32part.py SUBTYPES (names the CSV format accepts).
APP_SUBTYPES: Mapping[str, int] = MappingProxyType({
    "factory": SUBTYPE_FACTORY, "test": SUBTYPE_TEST,
    **{f"ota_{i}": SUBTYPE_OTA_MIN + i for i in range(16)}})
DATA_SUBTYPES: Mapping[str, int] = MappingProxyType({
    "ota": 0x00, "phy": 0x01, "nvs": 0x02, "coredump": 0x03, "nvs_keys": 0x04, "efuse": 0x05,
    "undefined": 0x06, "esphttpd": 0x80, "fat": 0x81, "spiffs": 0x82, "littlefs": 0x83})

# gen_esp32part.py ALIGNMENT: app partitions on 64 KiB (MMU page), data on a 4 KiB sector.
APP_ALIGN = 0x10000
DATA_ALIGN = 0x1000
OTADATA_SIZE = 0x2000  # gen_esp32part: "otadata partition must have size = 0x2000"

FLAG_ENCRYPTED = 0x1
FLAG_READONLY = 0x2

_SIZE_RE = re.compile(r"^\s*(0x[0-9a-fA-F]+|\d+)\s*([kKmM]?)(?:[bB])?\s*$")


def parse_size(value: int | str) -> int:
    """``4MB``, ``1M``, ``0x100000``, ``512K``, ``4096`` -> bytes."""
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(value)
    if not m:
        raise ImageError(f"cannot read {value!r} as a size (e.g. 4MB, 1M, 0x100000, 64K)")
    number = int(m.group(1), 0)
    unit = m.group(2).upper()
    return number * {"": 1, "K": 1024, "M": 1024 * 1024}[unit]


def flash_size_bytes(size: str | None) -> int | None:
    """A flash size setting as esptool spells it (``"4MB"``) in bytes; None for keep/detect."""
    if not size or size in ("keep", "detect"):
        return None
    for unit, factor in (("KB", 1024), ("MB", 1024 * 1024)):
        if size.upper().endswith(unit):
            try:
                return int(size[: -len(unit)]) * factor
            except ValueError:
                break
    raise ImageError(
        f"unknown flash size {size!r}",
        where="flash settings",
        hint="write it as esptool does: 2MB, 4MB, 8MB, 16MB ...",
    )


@dataclass(frozen=True)
class Partition:
    """One partition table entry."""

    label: str
    type: int
    subtype: int
    offset: int
    size: int
    flags: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.size

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & FLAG_ENCRYPTED)

    @property
    def readonly(self) -> bool:
        return bool(self.flags & FLAG_READONLY)

    @property
    def is_app(self) -> bool:
        return self.type == TYPE_APP

    @property
    def ota_slot(self) -> int | None:
        """N for an ``ota_N`` app partition, else None."""
        if self.type == TYPE_APP and SUBTYPE_OTA_MIN <= self.subtype <= SUBTYPE_OTA_MAX:
            return self.subtype - SUBTYPE_OTA_MIN
        return None

    @property
    def type_name(self) -> str:
        for name, value in TYPES.items():
            if value == self.type:
                return name
        return f"0x{self.type:02x}"

    @property
    def subtype_name(self) -> str:
        table = APP_SUBTYPES if self.type == TYPE_APP else DATA_SUBTYPES
        if self.type in (TYPE_APP, TYPE_DATA):
            for name, value in table.items():
                if value == self.subtype:
                    return name
        return f"0x{self.subtype:02x}"

    @property
    def usage(self) -> str:
        """The bootloader's "Usage" column (IDF bootloader_utility.c load_partition_table)."""
        if self.type == TYPE_APP:
            if self.subtype == SUBTYPE_FACTORY:
                return "factory app"
            if self.subtype == SUBTYPE_TEST:
                return "test app"
            return "OTA app" if self.ota_slot is not None else "Unknown app"
        if self.type == TYPE_DATA:
            return {0x00: "OTA data", 0x01: "RF data", 0x02: "WiFi data", 0x04: "NVS keys",
                    0x05: "efuse"}.get(self.subtype, "Unknown data")
        return "unknown"

    def encode(self) -> bytes:
        label = self.label.encode("ascii")
        if len(label) > 16:
            raise ImageError(f"partition label {self.label!r} is longer than 16 bytes")
        return struct.pack(_ENTRY_FMT, MAGIC, self.type, self.subtype, self.offset, self.size,
                           label.ljust(16, b"\0"), self.flags)

    @classmethod
    def decode(cls, data: bytes, *, at: int = 0) -> Partition:
        magic, ptype, subtype, offset, size, label, flags = struct.unpack_from(_ENTRY_FMT, data, 0)
        if magic != MAGIC:
            raise ImageError(f"partition entry has magic {magic.hex()} (expected aa50)",
                             where=f"partition table offset 0x{at:x}")
        text = label.split(b"\0", 1)[0].decode("ascii", errors="replace")
        return cls(label=text, type=ptype, subtype=subtype, offset=offset, size=size, flags=flags)


def read_entries(data: bytes) -> tuple[Partition, ...]:
    """The entries at the start of a binary table, up to its MD5 record, erased space or end.

    No checks beyond each entry's magic: for a flash plan that only wants the partition sizes
    of a table it is about to write (``PartitionTable.decode`` checks the whole table).
    """
    entries: list[Partition] = []
    for at in range(0, min(len(data), MAX_TABLE_LENGTH), ENTRY_SIZE):
        raw = data[at : at + ENTRY_SIZE]
        if len(raw) < ENTRY_SIZE or raw[:2] != MAGIC:
            break
        entries.append(Partition.decode(raw, at=at))
    return tuple(entries)


@dataclass(frozen=True)
class PartitionTable:
    """A decoded partition table; ``md5_ok`` is None when the table had no MD5 entry."""

    entries: tuple[Partition, ...]
    md5_ok: bool | None = True

    def __iter__(self) -> Iterator[Partition]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def encode(self, *, md5: bool = True, pad: bool = True) -> bytes:
        """Binary table as gen_esp32part writes it: entries, MD5 entry, 0xFF up to 0xC00."""
        body = b"".join(p.encode() for p in self.entries)
        out = body
        if md5:
            out += MD5_BEGIN + hashlib.md5(body).digest()
        if len(out) > MAX_TABLE_LENGTH:
            raise ImageError(f"partition table is {len(out)} bytes; max is 0x{MAX_TABLE_LENGTH:x}")
        if pad:
            out += b"\xff" * (MAX_TABLE_LENGTH - len(out))
        return out

    @classmethod
    def decode(cls, data: bytes, *, verify_md5: bool = True) -> PartitionTable:
        """Parse a binary table (gen_esp32part ``from_binary`` / ``esp_partition_table_verify``).

        With ``verify_md5`` a mismatching MD5 raises; without it the result says ``md5_ok``.
        """
        entries: list[Partition] = []
        md5_ok: bool | None = None
        for at in range(0, min(len(data), MAX_TABLE_LENGTH), ENTRY_SIZE):
            raw = data[at : at + ENTRY_SIZE]
            if len(raw) < ENTRY_SIZE:
                break
            if raw == b"\xff" * ENTRY_SIZE:
                return cls(tuple(entries), md5_ok)
            if raw[:2] == MD5_MAGIC:
                if md5_ok is not None:
                    raise ImageError("only one MD5 entry is allowed",
                                     where=f"partition table offset 0x{at:x}")
                expected = hashlib.md5(data[:at]).digest()
                md5_ok = raw[16:32] == expected
                if not md5_ok and verify_md5:
                    raise ImageError(
                        f"partition table MD5 mismatch: stored {raw[16:32].hex()}, "
                        f"calculated {expected.hex()}",
                        where=f"partition table offset 0x{at:x}",
                        hint="the table was edited or corrupted; regenerate it",
                    )
                continue
            if md5_ok is not None:
                raise ImageError("partition entry after the MD5 entry",
                                 where=f"partition table offset 0x{at:x}")
            entries.append(Partition.decode(raw, at=at))
        raise ImageError("partition table has no terminating (all 0xFF) entry",
                         where=f"partition table offset 0x{min(len(data), MAX_TABLE_LENGTH):x}")

    def validate(self, flash_size: int | str | None = None, *,
                 table_offset: int = TABLE_OFFSET) -> PartitionTable:
        """Check gen_esp32part's rules; raise ImageError naming the partition; return self."""
        labels: set[str] = set()
        first_free = table_offset + TABLE_SECTOR
        limit = parse_size(flash_size) if flash_size is not None else None
        for p in self.entries:
            where = f"partition {p.label!r}"
            if p.label in labels:
                raise ImageError("duplicate partition label", where=where)
            labels.add(p.label)
            align = APP_ALIGN if p.type == TYPE_APP else DATA_ALIGN
            if p.offset % align:
                raise ImageError(f"offset 0x{p.offset:x} is not aligned to 0x{align:x}",
                                 where=where)
            if p.size <= 0 or p.size % DATA_ALIGN:
                raise ImageError(f"size 0x{p.size:x} is not a positive multiple of 0x1000",
                                 where=where)
            if p.offset < first_free:
                raise ImageError(
                    f"offset 0x{p.offset:x} is below 0x{first_free:x} (bootloader and "
                    f"partition table at 0x{table_offset:x} come first)", where=where)
            if p.type == TYPE_DATA and p.subtype == SUBTYPE_DATA_OTA and p.size != OTADATA_SIZE:
                raise ImageError(f"otadata partition must have size 0x2000, not 0x{p.size:x}",
                                 where=where)
            if limit is not None and p.end > limit:
                raise ImageError(
                    f"ends at 0x{p.end:x}, past the end of the {limit // (1024 * 1024)} MB flash",
                    where=where, hint="choose a larger flash size or smaller partitions")
        ordered = sorted(self.entries, key=lambda q: q.offset)
        for a, b in zip(ordered, ordered[1:]):
            if b.offset < a.end:
                raise ImageError(
                    f"overlaps partition {a.label!r} (0x{a.offset:x}..0x{a.end:x}) at "
                    f"0x{b.offset:x}", where=f"partition {b.label!r}")
        if sum(1 for p in self.entries if p.type == TYPE_DATA
               and p.subtype == SUBTYPE_DATA_OTA) > 1:
            raise ImageError("more than one otadata partition")
        return self

    def find(self, label: str | None = None, *, type: int | str | None = None,
             subtype: int | str | None = None) -> Partition | None:
        """First partition matching the label and/or type/subtype (names or numbers)."""
        want_type = TYPES[type] if isinstance(type, str) else type
        for p in self.entries:
            if label is not None and p.label != label:
                continue
            if want_type is not None and p.type != want_type:
                continue
            if subtype is not None:
                if isinstance(subtype, str):
                    names = APP_SUBTYPES if p.type == TYPE_APP else DATA_SUBTYPES
                    if names.get(subtype) != p.subtype:
                        continue
                elif p.subtype != subtype:
                    continue
            return p
        return None

    @property
    def factory(self) -> Partition | None:
        return self.find(type=TYPE_APP, subtype=SUBTYPE_FACTORY)

    @property
    def test(self) -> Partition | None:
        return self.find(type=TYPE_APP, subtype=SUBTYPE_TEST)

    @property
    def otadata(self) -> Partition | None:
        return self.find(type=TYPE_DATA, subtype=SUBTYPE_DATA_OTA)

    @property
    def ota_slots(self) -> dict[int, Partition]:
        """``ota_N`` partitions by N (the bootloader's ``bs->ota[]``)."""
        return {p.ota_slot: p for p in self.entries if p.ota_slot is not None}

    @property
    def app_count(self) -> int:
        """Number of ``ota_N`` partitions (the bootloader's ``bs->app_count``)."""
        return len(self.ota_slots)


def _table(parts: Iterable[tuple[str, str, str, int, int]]) -> PartitionTable:
    out = []
    for label, ptype, subtype, offset, size in parts:
        t = TYPES[ptype]
        s = (APP_SUBTYPES if t == TYPE_APP else DATA_SUBTYPES)[subtype]
        out.append(Partition(label, t, s, offset, size))
    return PartitionTable(tuple(out))


_MB = 1024 * 1024


def factory_layout(flash_size: int | str = "4MB") -> PartitionTable:
    """IDF ``partitions_singleapp.csv``: nvs 0x9000+0x6000, phy_init 0xf000, factory 0x10000+1M."""
    return _table([
        ("nvs", "data", "nvs", 0x9000, 0x6000),
        ("phy_init", "data", "phy", 0xF000, 0x1000),
        ("factory", "app", "factory", 0x10000, _MB),
    ]).validate(flash_size)


def two_ota_layout(flash_size: int | str = "4MB") -> PartitionTable:
    """IDF ``partitions_two_ota.csv`` (offsets per partition-tables.rst); needs 4 MB of flash."""
    return _table([
        ("nvs", "data", "nvs", 0x9000, 0x4000),
        ("otadata", "data", "ota", 0xD000, 0x2000),
        ("phy_init", "data", "phy", 0xF000, 0x1000),
        ("factory", "app", "factory", 0x10000, _MB),
        ("ota_0", "app", "ota_0", 0x110000, _MB),
        ("ota_1", "app", "ota_1", 0x210000, _MB),
    ]).validate(flash_size)


def layout(name: str, flash_size: int | str = "4MB") -> PartitionTable:
    """``factory`` or ``two-ota`` by name."""
    if name == "factory":
        return factory_layout(flash_size)
    if name in ("two-ota", "two_ota"):
        return two_ota_layout(flash_size)
    raise ImageError(f"unknown partition layout {name!r}", hint="use 'factory' or 'two-ota'")
