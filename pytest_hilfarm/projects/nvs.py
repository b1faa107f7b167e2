"""Per-board NVS data: a CSV (with ``{board_id}``, ``{mac}``, ``{chip}`` placeholders) turned into
an NVS partition image by Espressif's generator, placed where the build's partition table puts
the ``nvs`` partition, so every board in a rack carries its own identity.

The CSV is the generator's own format (``key,type,encoding,value``; ``namespace`` rows; ``file``
values relative to the CSV). Placeholders are filled per board with ``str.format`` rules (write
``{{`` / ``}}`` for literal braces); a placeholder nobody set is an error naming it.
:func:`read_nvs` reads a partition back (pages, entry bitmap, CRCs, strings, blobs) so a test or
the farm can check what a board holds. This module writes no flash itself: it returns a
:class:`~pytest_hilfarm.drivers.flashing.Region` for the flash plan.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import string
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

from pytest_hilfarm.drivers.flashing import FlashPlan, Region
from pytest_hilfarm.errors import ImageError
from pytest_hilfarm.esp.partitions import Partition
from pytest_hilfarm.esp.partitions import read_entries as parse_partition_table

PAGE_SIZE = 4096
MIN_SIZE = 3 * PAGE_SIZE  # generator: "Minimum partition size for read/write NVS is 0x3000"
MAX_KEY_LENGTH = 15  # NVS_KEY_NAME_MAX_SIZE - 1
ENTRY_SIZE = 32
FIRST_ENTRY = 64  # 32-byte page header + 32-byte entry state bitmap
ENTRIES_PER_PAGE = 126
# nvs_flash/src/nvs_types.hpp ItemType
_INTS = {0x01: "<B", 0x11: "<b", 0x02: "<H", 0x12: "<h", 0x04: "<I", 0x14: "<i", 0x08: "<Q",
         0x18: "<q"}
TYPE_STR, TYPE_BLOB_V1, TYPE_BLOB_DATA, TYPE_BLOB_IDX = 0x21, 0x41, 0x42, 0x48
PAGE_ACTIVE, PAGE_FULL = 0xFFFFFFFE, 0xFFFFFFFC
NVS_SUBTYPE = (0x01, 0x02)  # partition type data, subtype nvs


def fill_template(text: str, values: Mapping[str, object], *, where: str) -> str:
    """``text`` with its ``{name}`` placeholders filled from ``values``."""
    for _, name, _, _ in string.Formatter().parse(text):
        if name is not None and name not in values:
            known = ", ".join(sorted(values)) or "none"
            raise ImageError(f"placeholder {{{name}}} has no value (known: {known})",
                             where=where, hint="set it in the board's values, or write {{ and "
                             "}} for literal braces")
    try:
        return text.format_map(dict(values))
    except (ValueError, IndexError) as exc:
        raise ImageError(f"bad placeholder syntax: {exc}", where=where,
                         hint="placeholders look like {board_id}; literal braces are {{ }}") \
            from None


def generate(csv_text: str, size: int, *, base_dir: Path | None = None, where: str = "NVS CSV",
             version: int = 2) -> bytes:
    """An NVS partition image of ``size`` bytes from the generator's CSV format."""
    from esp_idf_nvs_partition_gen import nvs_partition_gen as gen

    if size % PAGE_SIZE or size < MIN_SIZE:
        raise ImageError(f"the NVS partition is {size:#x} bytes; it must be a multiple of 0x1000 "
                         "and at least 0x3000", where=where,
                         hint="make the nvs partition bigger in the partition table")
    rows = list(csv.DictReader(
        line for line in io.StringIO(csv_text) if line.strip() and not line.startswith("#")))
    if not rows or not {"key", "type", "encoding", "value"} <= set(rows[0]):
        raise ImageError("the CSV must have the header key,type,encoding,value", where=where,
                         hint="see ESP-IDF's NVS partition generator documentation")
    out = io.BytesIO()
    # One page stays free for the NVS library's page rotation (the generator's check_size).
    nvs = gen.nvs_open(out, size - PAGE_SIZE, gen.Page.VERSION2 if version == 2
                       else gen.Page.VERSION1)
    for number, row in enumerate(rows, start=2):
        key, kind, encoding, value = (row.get(k) or "" for k in ("key", "type", "encoding",
                                                                "value"))
        if len(key) > MAX_KEY_LENGTH:
            raise ImageError(f"key {key!r} is longer than {MAX_KEY_LENGTH} characters",
                             where=f"{where}, row {number}")
        if kind == "file":
            value = str((base_dir or Path.cwd()) / value)
        try:
            gen.write_entry(nvs, key, kind, encoding, value)
        except (gen.InputError, gen.InsufficientSizeError, gen.PageFullError, ValueError,
                OSError, KeyError, struct.error) as exc:
            raise ImageError(f"cannot store {key!r} ({kind}, {encoding}): {exc}",
                             where=f"{where}, row {number}",
                             hint="check the type/encoding/value columns, or make the nvs "
                             "partition bigger") from None
    try:
        gen.nvs_close(nvs)
    except (gen.InsufficientSizeError, gen.PageFullError) as exc:
        raise ImageError(f"the data does not fit a {size:#x}-byte NVS partition: {exc}",
                         where=where, hint="make the nvs partition bigger") from None
    data = out.getvalue()
    assert len(data) == size, (len(data), size)
    return data


def nvs_partition(table: bytes, label: str = "nvs", *, where: str = "partition table"
                  ) -> Partition:
    """The NVS partition called ``label`` in a binary partition table."""
    parts = parse_partition_table(table)
    found = next((p for p in parts if p.label == label), None)
    if found is None:
        raise ImageError(f"no partition {label!r} (the table has "
                         f"{', '.join(p.label for p in parts) or 'none'})", where=where,
                         hint="name the NVS partition to write (partition: ...)")
    if (found.type, found.subtype) != NVS_SUBTYPE:
        raise ImageError(f"partition {label!r} is not an NVS data partition (type "
                         f"{found.type:#x}, subtype {found.subtype:#x})", where=where)
    return found


def table_of(plan: FlashPlan) -> bytes:
    """The partition table the plan writes (an error when it writes none)."""
    for region in plan.regions:
        if region.data[:2] == b"\xaa\x50":
            return region.data
    raise ImageError("the firmware writes no partition table, so the NVS partition's place is "
                     "unknown", where=plan.source or "flash plan",
                     hint="flash a full build (bootloader, partition table, app)")


def board_region(csv_path: str | Path, plan: FlashPlan, *, board_id: str, mac: str | None = None,
                 chip: str | None = None, values: Mapping[str, object] | None = None,
                 partition: str = "nvs") -> Region:
    """The NVS region for one board: the CSV filled for it, generated to fit the plan's table.

    Placeholders: ``{board_id}``, ``{mac}`` (``aa:bb:..``), ``{mac_hex}`` (``aabb..``),
    ``{chip}`` and every key of ``values``.
    """
    path = Path(csv_path)
    try:
        template = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ImageError(f"cannot read the NVS CSV: {exc.strerror or exc}", where=str(path),
                         hint="check the path in the rack file (relative to the rack file)") \
            from None
    filled: dict[str, object] = {"board_id": board_id, "chip": chip or ""}
    if mac is not None:
        filled.update(mac=mac.lower(), mac_hex=mac.replace(":", "").lower())
    filled.update(values or {})
    where = f"{path} (board {board_id})"
    part = nvs_partition(table_of(plan), partition, where=plan.source or "partition table")
    data = generate(fill_template(template, filled, where=where), part.size,
                    base_dir=path.parent, where=where)
    return Region(part.offset, data, f"{partition} for {board_id} from {path.name}", partition,
                  part.size)


def with_region(plan: FlashPlan, region: Region) -> FlashPlan:
    """``plan`` with ``region`` added; parts of the plan inside the region's range (the erased
    NVS area of a merged image) are replaced, a part that straddles its edge is an error.
    """
    start, end = region.offset, region.offset + region.size
    kept = []
    for other in plan.regions:
        o_start, o_end = other.offset, other.offset + other.size
        if o_end <= start or o_start >= end:
            kept.append(other)
        elif start <= o_start and o_end <= end:
            continue  # replaced
        else:
            raise ImageError(f"{other.name} ({o_start:#x}..{o_end:#x}) overlaps the "
                             f"{region.role or 'new'} region {start:#x}..{end:#x}",
                             where=plan.source or "flash plan",
                             hint="the firmware writes into the NVS partition; check the "
                             "partition table")
    regions = tuple(sorted([*kept, region], key=lambda r: r.offset))
    return dataclasses.replace(plan, regions=regions)


# -- reading back ---------------------------------------------------------------------------------


def read_nvs(data: bytes) -> dict[str, dict[str, int | str | bytes]]:
    """Namespace -> key -> value of an NVS partition image (raises ImageError on bad CRCs).

    Follows ESP-IDF's format (nvs_flash ``nvs_page.cpp`` / ``nvs_types.hpp``): 4 KiB pages
    with a 32-byte header, a 2-bit-per-entry state bitmap, 126 entries of 32 bytes; strings and
    blob chunks span the entries after their header entry.
    """
    namespaces: dict[int, str] = {}
    items: list[tuple[int, str, int, int, bytes]] = []  # ns, key, type, chunk, payload
    for page_at in range(0, len(data) - PAGE_SIZE + 1, PAGE_SIZE):
        page = data[page_at : page_at + PAGE_SIZE]
        state = struct.unpack_from("<I", page)[0]
        if state not in (PAGE_ACTIVE, PAGE_FULL):
            continue  # empty, freeing or corrupt pages hold no live data
        bitmap = page[32:64]
        index = 0
        while index < ENTRIES_PER_PAGE:
            if (bitmap[index // 4] >> ((index % 4) * 2)) & 3 != 0b10:  # 0b10 = written
                index += 1
                continue
            at = FIRST_ENTRY + index * ENTRY_SIZE
            entry = page[at : at + ENTRY_SIZE]
            ns, kind, span, chunk = entry[0], entry[1], entry[2], entry[3]
            crc = struct.unpack_from("<I", entry, 4)[0]
            if zlib.crc32(entry[:4] + entry[8:], 0xFFFFFFFF) != crc:
                raise ImageError(f"entry {index} has a bad CRC", where=f"NVS page at {page_at:#x}")
            key = entry[8:24].split(b"\0", 1)[0].decode("ascii", "replace")
            payload = entry[24:32]
            if kind in (TYPE_STR, TYPE_BLOB_DATA, TYPE_BLOB_V1):
                size, _, data_crc = struct.unpack_from("<HHI", payload)
                body = page[at + ENTRY_SIZE : at + ENTRY_SIZE * span][:size]
                if zlib.crc32(body, 0xFFFFFFFF) != data_crc:
                    raise ImageError(f"the data of {key!r} has a bad CRC",
                                     where=f"NVS page at {page_at:#x}")
                payload = body
            if ns == 0 and kind == 0x01:
                namespaces[payload[0]] = key
            else:
                items.append((ns, key, kind, chunk, payload))
            index += max(span, 1)
    out: dict[str, dict[str, int | str | bytes]] = {}
    chunks: dict[tuple[int, str], list[tuple[int, bytes]]] = {}
    for ns, key, kind, chunk, payload in items:
        if kind == TYPE_BLOB_DATA:
            chunks.setdefault((ns, key), []).append((chunk, payload))
    for ns, key, kind, _, payload in items:
        name = namespaces.get(ns, f"#{ns}")
        value: int | str | bytes
        if kind in _INTS:
            fmt = _INTS[kind]
            value = struct.unpack_from(fmt, payload)[0]
        elif kind == TYPE_STR:
            value = payload.rstrip(b"\0").decode("utf-8", "replace")
        elif kind == TYPE_BLOB_V1:
            value = payload
        elif kind == TYPE_BLOB_IDX:
            value = b"".join(p for _, p in sorted(chunks.get((ns, key), [])))
        else:
            continue  # blob data chunks are collected above
        out.setdefault(name, {})[key] = value
    return out
