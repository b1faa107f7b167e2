"""The otadata partition: ``esp_ota_select_entry_t`` records and the bootloader's choice of slot.

Encodes and decodes the two 32-byte entries, and reproduces the pure decisions ESP-IDF makes with
them: which OTA slot the second-stage bootloader selects and which ``ota_seq`` the app writes when
it switches slot. It must not touch flash (the boot chain in ``sim/boot.py`` does the I/O) and
must not guess: every rule below cites the ESP-IDF function it copies.
"""

from __future__ import annotations

import binascii
import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from pytest_hilfarm.errors import ImageError

# esp_ota_select_entry_t is 32 bytes; the two copies sit one flash sector apart
# (IDF: app_update/esp_ota_ops.c read_otadata, bootloader_utility.c read_otadata).
ENTRY_SIZE = 32
SECTOR_SIZE = 0x1000
OTADATA_SIZE = 2 * SECTOR_SIZE
SEQ_ERASED = 0xFFFFFFFF
_ENTRY_FMT = "<I20sII"  # ota_seq, seq_label[20], ota_state, crc


class OtaState(enum.IntEnum):
    """``esp_ota_img_states_t`` (IDF: bootloader_support/include/esp_flash_partitions.h)."""

    NEW = 0x0
    PENDING_VERIFY = 0x1
    VALID = 0x2
    INVALID = 0x3
    ABORTED = 0x4
    UNDEFINED = 0xFFFFFFFF


def state_name(state: int) -> str:
    """Name of an ``ota_state`` value ("VALID", ...), or its hex for values ESP-IDF never writes."""
    try:
        return OtaState(state).name
    except ValueError:
        return f"0x{state:08x}"


def ota_seq_crc(seq: int) -> int:
    """CRC of an entry: ``esp_rom_crc32_le(UINT32_MAX, &ota_seq, 4)``, over ``ota_seq`` only.

    Source: IDF bootloader_common_loader.c ``bootloader_common_ota_select_crc``; the Python form
    is the one in IDF app_update/otatool.py.
    """
    return binascii.crc32(struct.pack("<I", seq & 0xFFFFFFFF), 0xFFFFFFFF) & 0xFFFFFFFF


@dataclass(frozen=True)
class OtaSelectEntry:
    """One ``esp_ota_select_entry_t`` as stored (``state`` kept as a raw int)."""

    seq: int = SEQ_ERASED
    state: int = OtaState.UNDEFINED
    crc: int = 0xFFFFFFFF
    seq_label: bytes = b"\xff" * 20

    @classmethod
    def make(cls, seq: int, state: int = OtaState.UNDEFINED) -> OtaSelectEntry:
        """An entry with the correct CRC, label erased (as esp_ota_ops.c leaves it)."""
        return cls(seq=seq, state=int(state), crc=ota_seq_crc(seq))

    @classmethod
    def erased(cls) -> OtaSelectEntry:
        return cls()

    @classmethod
    def decode(cls, data: bytes) -> OtaSelectEntry:
        if len(data) < ENTRY_SIZE:
            raise ImageError(
                f"otadata entry needs {ENTRY_SIZE} bytes, got {len(data)}", where="otadata"
            )
        seq, label, state, crc = struct.unpack_from(_ENTRY_FMT, data, 0)
        return cls(seq=seq, state=state, crc=crc, seq_label=bytes(label))

    def encode(self) -> bytes:
        return struct.pack(_ENTRY_FMT, self.seq, self.seq_label, self.state, self.crc)

    def with_state(self, state: int) -> OtaSelectEntry:
        """Same entry, new state; the CRC covers only ``ota_seq`` so it stays."""
        return OtaSelectEntry(seq=self.seq, state=int(state), crc=self.crc,
                              seq_label=self.seq_label)

    @property
    def crc_ok(self) -> bool:
        return self.crc == ota_seq_crc(self.seq)

    @property
    def is_erased(self) -> bool:
        return self.seq == SEQ_ERASED

    @property
    def is_invalid(self) -> bool:
        """``bootloader_common_ota_select_invalid``: erased, INVALID or ABORTED."""
        return self.seq == SEQ_ERASED or self.state in (OtaState.INVALID, OtaState.ABORTED)

    @property
    def is_valid(self) -> bool:
        """``bootloader_common_ota_select_valid``: not invalid and the CRC matches."""
        return not self.is_invalid and self.crc_ok

    @property
    def state_name(self) -> str:
        return state_name(self.state)

    def slot(self, app_count: int) -> int:
        """OTA slot this entry points at: ``(ota_seq - 1) % app_count`` (bootloader_utility.c)."""
        if app_count <= 0:
            raise ValueError("app_count must be >= 1")
        return ((self.seq - 1) & 0xFFFFFFFF) % app_count


def decode_otadata(data: bytes) -> tuple[OtaSelectEntry, OtaSelectEntry]:
    """Both entries from the otadata partition contents (at +0x0 and +0x1000)."""
    if len(data) < SECTOR_SIZE + ENTRY_SIZE:
        raise ImageError(
            f"otadata partition data is {len(data)} bytes; need at least "
            f"{SECTOR_SIZE + ENTRY_SIZE} (two copies one 4 KiB sector apart, partition 0x2000)",
            where="otadata",
        )
    return (
        OtaSelectEntry.decode(data[0:ENTRY_SIZE]),
        OtaSelectEntry.decode(data[SECTOR_SIZE : SECTOR_SIZE + ENTRY_SIZE]),
    )


def encode_otadata(entries: Sequence[OtaSelectEntry]) -> bytes:
    """A full 0x2000-byte otadata image; unused bytes are erased flash (0xFF)."""
    if len(entries) != 2:
        raise ValueError("otadata has exactly two entries")
    out = bytearray(b"\xff" * OTADATA_SIZE)
    out[0:ENTRY_SIZE] = entries[0].encode()
    out[SECTOR_SIZE : SECTOR_SIZE + ENTRY_SIZE] = entries[1].encode()
    return bytes(out)


def initial_otadata() -> bytes:
    """``ota_data_initial.bin``: all 0xFF, meaning "boot factory (or ota_0)"."""
    return b"\xff" * OTADATA_SIZE


def select_otadata(valid: Sequence[bool], entries: Sequence[OtaSelectEntry]) -> int | None:
    """``bootloader_common_select_otadata(..., max=true)``: index of the active copy or None.

    Both valid: the larger ``ota_seq`` wins (ties go to copy 0); else the single valid one.
    """
    if valid[0] and valid[1]:
        return 0 if max(entries[0].seq, entries[1].seq) == entries[0].seq else 1
    for i in (0, 1):
        if valid[i]:
            return i
    return None


def active_entry_index(entries: Sequence[OtaSelectEntry]) -> int | None:
    """``bootloader_common_get_active_otadata``: which copy is active, None if neither is."""
    return select_otadata([entries[0].is_valid, entries[1].is_valid], entries)


def select_boot_slot(entries: Sequence[OtaSelectEntry], app_count: int, *,
                     has_factory: bool = True) -> int | None:
    """The OTA slot the bootloader selects from these entries, or None for the factory app.

    Mirrors ``bootloader_utility_get_selected_boot_partition`` without anti-rollback and without
    the writes: both entries invalid (or no OTA slots) -> factory (None), or slot 0 when there
    is no factory partition; otherwise ``(seq - 1) % app_count`` of the active entry. An entry
    that is not INVALID/ABORTED but has a bad CRC is not active, so a lone such entry also
    gives factory (or slot 0). The PENDING_VERIFY -> ABORTED rewrite that precedes this on a
    real boot is the caller's job (see ``sim/boot.py``): pass the entries *after* it.
    """
    if app_count <= 0 or (entries[0].is_invalid and entries[1].is_invalid):
        return None if has_factory or app_count <= 0 else 0
    active = active_entry_index(entries)
    if active is None:
        # "ota data partition invalid ..."; without a factory the bootloader tries every slot
        # starting from the factory index, i.e. ota_0 first.
        return None if has_factory else 0
    return entries[active].slot(app_count)


def next_seq_for(slot: int, current_seq: int | None, n: int) -> int:
    """``ota_seq`` that ``esp_ota_set_boot_partition`` writes to make ``slot`` boot next.

    Source: IDF esp_ota_ops.c ``esp_rewrite_ota_data``: with an active entry of sequence ``seq``
    it is the smallest ``(slot + 1) % n + i * n`` that is >= ``seq``; with no active entry
    (``current_seq`` None) it is ``slot + 1``.
    """
    if n <= 0:
        raise ValueError("n (number of OTA slots) must be >= 1")
    if not 0 <= slot < n:
        raise ValueError(f"slot {slot} is not an OTA slot (0..{n - 1})")
    if current_seq is None:
        return slot + 1
    base = (slot + 1) % n
    i = 0
    while current_seq > base + i * n:
        i += 1
    return base + i * n


def set_boot_slot(
    entries: Sequence[OtaSelectEntry], slot: int, n: int, *, rollback_enabled: bool = True
) -> tuple[int, OtaSelectEntry]:
    """Which copy ``esp_ota_set_boot_partition(ota_<slot>)`` rewrites, and with what.

    The inactive copy (``~active & 1``) gets the new sequence, or copy 0 when neither is active;
    its state becomes NEW with ``CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE`` else UNDEFINED
    (``set_new_state_otadata``). The seq_label is kept as read, as ESP-IDF does.
    """
    active = active_entry_index(entries)
    state = OtaState.NEW if rollback_enabled else OtaState.UNDEFINED
    if active is None:
        index, seq = 0, next_seq_for(slot, None, n)
    else:
        index, seq = (~active) & 1, next_seq_for(slot, entries[active].seq, n)
    old = entries[index]
    return index, OtaSelectEntry(
        seq=seq, state=int(state), crc=ota_seq_crc(seq), seq_label=old.seq_label
    )
