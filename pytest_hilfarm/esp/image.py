"""ESP app and bootloader images (``.bin``): parse into frozen records, and build them.

Parses the 24-byte header (with chip_id), the segments, the XOR checksum, the appended SHA-256,
``esp_app_desc_t`` / ``esp_bootloader_desc_t`` at offset 0x20 and a Secure Boot V2 signature
sector, from bytes or from any ``read(offset, n)`` callable. Builds images through esptool's own
``FirmwareImage`` classes so ``esptool image-info`` accepts them. It does not verify signatures
(that needs keys; see the signing module) and never reads files itself.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from esptool.bin_image import ELFSection
from esptool.loader import ESPLoader

from pytest_hilfarm.errors import ImageError
from pytest_hilfarm.esp.chips import Chip, chip_for_id, chip_id_of
from pytest_hilfarm.esp.chips import chip as _chip_record

# Header layout: esptool bin_image.py ("<BBBBI" + EXTENDED_HEADER_STRUCT_FMT) and IDF
# esp_app_format.h esp_image_header_t (static_assert size 24).
ESP_IMAGE_MAGIC = ESPLoader.ESP_IMAGE_MAGIC  # 0xE9
CHECKSUM_SEED = ESPLoader.ESP_CHECKSUM_MAGIC  # 0xEF
HEADER_SIZE = 24
SEGMENT_HEADER_SIZE = 8
MAX_SEGMENTS = 16  # IDF ESP_IMAGE_MAX_SEGMENTS
SIXTEEN_MB = 0x1000000  # IDF esp_image_format.c verify_segment_header
MMU_PAGE = 0x10000  # esptool IROM_ALIGN; IDF SPI_FLASH_MMU_PAGE_SIZE
APP_DESC_OFFSET = 0x20  # 24-byte header + 8-byte segment header (app_image_format.rst)
APP_DESC_SIZE = 256
APP_DESC_MAGIC = 0xABCD5432  # IDF esp_app_desc.h ESP_APP_DESC_MAGIC_WORD
# esptool cmds.py _parse_app_info; byte 181 is spi_flash_mode in newer IDF (reserv3[0] before).
_APP_DESC_FMT = "<II8s32s32s16s16s32s32sHHBB2s72s"
BOOTLOADER_DESC_MAGIC = 0x50  # esptool cmds.py _parse_bootloader_info
BOOTLOADER_DESC_SIZE = 80
_BOOTLOADER_DESC_FMT = "<B3sI32s24s16s"
# Secure Boot V2: IDF secure-boot-v2.rst, espsecure SIG_BLOCK_SIZE / SECTOR_SIZE.
SIG_SECTOR_SIZE = 4096
SIG_BLOCK_SIZE = 1216
SIG_BLOCK_MAGIC = 0xE7
MAX_SIG_BLOCKS = 3

# esptool cmds.py FLASH_MODES
FLASH_MODES: Mapping[str, int] = MappingProxyType({"qio": 0, "qout": 1, "dio": 2, "dout": 3})


def memory_map(chip_name: str) -> Chip:
    """A chip's flash-mapped windows and bootloader offset: its record in the chip table."""
    return _chip_record(chip_name)


def xor_checksum(data: bytes, state: int = CHECKSUM_SEED) -> int:
    """Same result as esptool ``ESPLoader.checksum`` (seed XOR every byte), without a per-byte
    Python loop: the bytes are folded as one big integer, XOR-ing the high half onto the low
    half, which keeps the XOR of all bytes while halving the length. 16 KiB takes 14 C-level
    passes, a 1 MB app (checked at every session start) about 3 ms.
    """
    n = len(data)
    if n == 0:
        return state & 0xFF
    value = int.from_bytes(data, "little")
    while n > 1:
        half = (n + 1) // 2
        value = (value & ((1 << (8 * half)) - 1)) ^ (value >> (8 * half))
        n = half
    return (state ^ value) & 0xFF


class ImageFormatError(ImageError):
    """An image problem with a machine-readable ``kind`` and the byte ``offset`` it concerns.

    Kinds: ``truncated``, ``magic``, ``chip_id``, ``segment_count``, ``segment_length``,
    ``segment_alignment``, ``hash_appended``, ``checksum``, ``sha256``, ``too_big``.
    """

    def __init__(self, kind: str, what: str, *, offset: int, hint: str | None = None,
                 values: tuple[int, ...] = ()) -> None:
        self.kind = kind
        self.offset = offset
        # segment_length: (index, data_len); segment_alignment: (index, load_addr, data_offset);
        # too_big / truncated: (bytes the image needs from its start,)
        self.values = values
        super().__init__(what, where=f"image offset 0x{offset:x}", hint=hint)


@dataclass(frozen=True)
class ImageHeader:
    """``esp_image_header_t`` (24 bytes)."""

    magic: int
    segment_count: int
    spi_mode: int
    spi_speed: int  # low nibble of byte 3
    spi_size: int  # high nibble of byte 3
    entry_addr: int
    wp_pin: int
    spi_pin_drv: tuple[int, int, int]
    chip_id: int
    min_chip_rev: int
    min_chip_rev_full: int
    max_chip_rev_full: int
    reserved: bytes
    hash_appended: int

    @property
    def chip(self) -> str | None:
        return chip_for_id(self.chip_id)

    @classmethod
    def decode(cls, data: bytes) -> ImageHeader:
        magic, count, mode, size_speed, entry = struct.unpack_from("<BBBBI", data, 0)
        wp, d0, d1, d2, chip_id, min_rev, min_full, max_full = struct.unpack_from(
            "<BBBBHBHH", data, 8
        )
        reserved = bytes(data[19:23])
        return cls(magic, count, mode, size_speed & 0x0F, size_speed >> 4, entry, wp,
                   (d0, d1, d2), chip_id, min_rev, min_full, max_full, reserved, data[23])


@dataclass(frozen=True)
class Segment:
    """One image segment; ``data_offset`` is where its data starts, relative to the image."""

    index: int
    load_addr: int
    header_offset: int
    data_offset: int
    length: int
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class AppDesc:
    """``esp_app_desc_t`` (256 bytes at image offset 0x20); strings decoded as text."""

    project_name: str = ""
    version: str = ""
    secure_version: int = 0
    idf_ver: str = ""
    time: str = ""
    date: str = ""
    app_elf_sha256: bytes = bytes(32)
    min_efuse_blk_rev_full: int = 0
    max_efuse_blk_rev_full: int = 0
    mmu_page_size: int = 0  # log2 of the page size; 16 = 64 KiB, 0 = unset
    spi_flash_mode: int = 0  # newer IDF; 0 = unset
    magic_word: int = APP_DESC_MAGIC
    reserv1: bytes = bytes(8)
    reserv3: bytes = bytes(2)
    reserv2: bytes = bytes(72)

    def encode(self) -> bytes:
        def text(value: str, size: int, name: str) -> bytes:
            raw = value.encode("utf-8")
            if len(raw) >= size:
                raise ImageError(f"esp_app_desc_t.{name} {value!r} must be shorter than {size} "
                                 "bytes (it is NUL-terminated)")
            return raw.ljust(size, b"\0")

        return struct.pack(
            _APP_DESC_FMT, self.magic_word, self.secure_version, self.reserv1,
            text(self.version, 32, "version"), text(self.project_name, 32, "project_name"),
            text(self.time, 16, "time"), text(self.date, 16, "date"),
            text(self.idf_ver, 32, "idf_ver"), self.app_elf_sha256.ljust(32, b"\0")[:32],
            self.min_efuse_blk_rev_full, self.max_efuse_blk_rev_full, self.mmu_page_size,
            self.spi_flash_mode, self.reserv3, self.reserv2,
        )

    @classmethod
    def decode(cls, data: bytes, *, offset: int = APP_DESC_OFFSET) -> AppDesc:
        if len(data) < APP_DESC_SIZE:
            raise ImageFormatError("truncated", f"esp_app_desc_t needs 256 bytes, got {len(data)}",
                                   offset=offset)
        (magic, secure_version, reserv1, version, project, time, date, idf_ver, elf_sha,
         min_blk, max_blk, mmu, spi_mode, reserv3, reserv2) = struct.unpack_from(_APP_DESC_FMT,
                                                                               data, 0)
        if magic != APP_DESC_MAGIC:
            raise ImageFormatError(
                "magic", f"esp_app_desc_t magic is 0x{magic:08x}, expected 0x{APP_DESC_MAGIC:08x}",
                offset=offset)

        def text(raw: bytes) -> str:
            return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")

        return cls(text(project), text(version), secure_version, text(idf_ver), text(time),
                   text(date), bytes(elf_sha), min_blk, max_blk, mmu, spi_mode, magic,
                   bytes(reserv1), bytes(reserv3), bytes(reserv2))


@dataclass(frozen=True)
class BootloaderDesc:
    """``esp_bootloader_desc_t`` (80 bytes at offset 0x20 of a bootloader image)."""

    version: int = 1
    idf_ver: str = ""
    date_time: str = ""
    magic_byte: int = BOOTLOADER_DESC_MAGIC

    def encode(self) -> bytes:
        return struct.pack(_BOOTLOADER_DESC_FMT, self.magic_byte, bytes(3), self.version,
                           self.idf_ver.encode()[:31].ljust(32, b"\0"),
                           self.date_time.encode()[:23].ljust(24, b"\0"), bytes(16))

    @classmethod
    def decode(cls, data: bytes) -> BootloaderDesc | None:
        if len(data) < BOOTLOADER_DESC_SIZE or data[0] != BOOTLOADER_DESC_MAGIC:
            return None
        magic, _r1, version, idf_ver, date_time, _r2 = struct.unpack_from(
            _BOOTLOADER_DESC_FMT, data, 0)
        return cls(version, idf_ver.split(b"\0", 1)[0].decode(errors="replace"),
                   date_time.split(b"\0", 1)[0].decode(errors="replace"), magic)


@dataclass(frozen=True)
class SignatureBlock:
    """One Secure Boot V2 signature block (1216 bytes) found in the signature sector.

    ``key_digest`` is what the eFuse holds for the block's public key: RSA ``sha256(blk[36:812])``,
    ECDSA P-192/P-256 ``sha256(curve_id || X || Y)`` (secure-boot-v2.rst; espsecure).
    """

    index: int
    offset: int
    version: int  # 2 = RSA-3072, 3 = ECDSA
    image_digest: bytes
    crc_ok: bool
    key_digest: bytes | None
    raw: bytes = field(repr=False)


@dataclass(frozen=True)
class SignatureSector:
    """The 4 KiB sector after the signed data; ``offset`` = where the signed data ends."""

    offset: int
    blocks: tuple[SignatureBlock, ...]


@dataclass(frozen=True)
class AppImage:
    """A parsed image. Offsets are relative to the image start."""

    header: ImageHeader
    segments: tuple[Segment, ...]
    checksum_offset: int
    stored_checksum: int
    calculated_checksum: int
    length: int  # through the checksum and, if present, the appended SHA-256
    stored_sha256: bytes | None
    calculated_sha256: bytes  # of image[0:checksum_offset + 1]
    app_desc: AppDesc | None
    bootloader_desc: BootloaderDesc | None
    signature_sector: SignatureSector | None

    @property
    def chip(self) -> str | None:
        return self.header.chip

    @property
    def checksum_ok(self) -> bool:
        return self.stored_checksum == self.calculated_checksum

    @property
    def sha256_ok(self) -> bool | None:
        """None when no SHA-256 is appended."""
        if self.stored_sha256 is None:
            return None
        return self.stored_sha256 == self.calculated_sha256

    @property
    def signed_length(self) -> int | None:
        """Bytes covered by the Secure Boot V2 signature (everything before the sector)."""
        return self.signature_sector.offset if self.signature_sector else None

    @property
    def sha256_hex(self) -> str:
        """Hex of the appended SHA-256, or of the checksummed image when none is appended."""
        return (self.stored_sha256 or self.calculated_sha256).hex()


Reader = Callable[[int, int], bytes]


def image_chip(data: bytes) -> str | None:
    """The chip an app/bootloader image was built for; None when ``data`` is not an image.

    A cheap look at the header only (magic, segment count, chip id), for checks before a flash:
    an image whose chip id no chip has gives ``"unknown chip id N"``.
    """
    if len(data) < HEADER_SIZE or data[0] != ESP_IMAGE_MAGIC or data[1] > MAX_SEGMENTS:
        return None
    chip_id = struct.unpack_from("<H", data, 12)[0]
    return chip_for_id(chip_id) or f"unknown chip id {chip_id}"


def app_identity(data: bytes) -> tuple[str, str] | None:
    """(project_name, version) from an app image's ``esp_app_desc_t``; None if it has none.

    Reads only the descriptor's first 80 bytes (magic ... project_name), so a region that is cut
    short after them still names its app.
    """
    if image_chip(data) is None or len(data) < APP_DESC_OFFSET + 80:
        return None
    if struct.unpack_from("<I", data, APP_DESC_OFFSET)[0] != APP_DESC_MAGIC:
        return None

    def text(raw: bytes) -> str:
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")

    at = APP_DESC_OFFSET
    return text(data[at + 48 : at + 80]), text(data[at + 16 : at + 48])


def _bytes_reader(data: bytes) -> Reader:
    view = memoryview(data)

    def read(offset: int, n: int) -> bytes:
        return bytes(view[offset : offset + n])

    return read


def parse_image(data: bytes, *, chip: str | None = None, verify: bool = True) -> AppImage:
    """Parse an image held in memory. See :func:`parse_image_from`."""
    return _parse(_bytes_reader(data), 0, len(data), chip, verify, "truncated")


def parse_image_from(read: Reader, *, offset: int = 0, limit: int | None = None,
                     chip: str | None = None, verify: bool = True) -> AppImage:
    """Parse the image at ``offset`` through ``read(addr, n)`` (e.g. a flash), within ``limit``.

    Raises :class:`ImageFormatError` when the bytes cannot be an image (bad magic, truncated,
    too many segments, bad segment length or flash-mapping alignment). With ``verify`` it also
    raises for a chip_id that is not ``chip``'s, a wrong checksum or a wrong appended SHA-256;
    without it those are only reported by ``checksum_ok`` / ``sha256_ok`` / ``header.chip_id``.
    """
    return _parse(read, offset, limit if limit is not None else 1 << 32, chip, verify, "too_big")


def _parse(read: Reader, offset: int, end_limit: int, chip: str | None, verify: bool,
           past_limit: str) -> AppImage:
    where = "the data" if past_limit == "truncated" else "the partition"

    def get(rel: int, n: int, what: str) -> bytes:
        if rel + n > end_limit:
            raise ImageFormatError(past_limit, f"{what} runs past the end of {where} "
                                   f"(0x{end_limit:x} bytes)", offset=rel, values=(rel + n,))
        raw = read(offset + rel, n)
        if len(raw) < n:
            raise ImageFormatError("truncated", f"{what}: wanted {n} bytes, got {len(raw)}",
                                   offset=rel, values=(rel + n,))
        return raw

    head = get(0, HEADER_SIZE, "image header")
    if head[0] != ESP_IMAGE_MAGIC:
        raise ImageFormatError(
            "magic", f"invalid magic byte 0x{head[0]:02x} (expected 0x{ESP_IMAGE_MAGIC:02x}); "
            "nothing flashed here, or not an app/bootloader image", offset=0)
    header = ImageHeader.decode(head)
    if verify and chip is not None and header.chip_id != chip_id_of(chip):
        found = header.chip or "unknown chip"
        raise ImageFormatError(
            "chip_id", f"image is for chip_id {header.chip_id} ({found}), not {chip} "
            f"(chip_id {chip_id_of(chip)})", offset=12, hint="build the image for this chip")
    if header.segment_count > MAX_SEGMENTS:
        raise ImageFormatError("segment_count", f"segment count {header.segment_count} exceeds "
                               f"max {MAX_SEGMENTS}", offset=1)
    if header.hash_appended not in (0, 1):
        raise ImageFormatError("hash_appended", f"hash_appended is {header.hash_appended}, "
                               "must be 0 or 1", offset=23)
    mmap = memory_map(chip or header.chip or "esp32") if (chip or header.chip) else None

    segments: list[Segment] = []
    pos = HEADER_SIZE
    checksum = CHECKSUM_SEED
    sha = hashlib.sha256(head)
    for i in range(header.segment_count):
        seg_head = get(pos, SEGMENT_HEADER_SIZE, f"segment {i} header")
        load_addr, data_len = struct.unpack("<II", seg_head)
        if data_len % 4 or data_len >= SIXTEEN_MB:
            raise ImageFormatError("segment_length", f"segment {i}: invalid segment length "
                                   f"0x{data_len:x} (must be a multiple of 4 below 16 MB)",
                                   offset=pos, values=(i, data_len))
        data_off = pos + SEGMENT_HEADER_SIZE
        if mmap is not None and mmap.is_mapped(load_addr) and \
                data_off % MMU_PAGE != load_addr % MMU_PAGE:
            raise ImageFormatError(
                "segment_alignment", f"segment {i} load address 0x{load_addr:08x} doesn't match "
                f"data offset 0x{data_off:08x} (mod 64 KiB)", offset=pos,
                values=(i, load_addr, data_off))
        seg_data = get(data_off, data_len, f"segment {i} data")
        checksum = xor_checksum(seg_data, checksum)
        sha.update(seg_head)
        sha.update(seg_data)
        segments.append(Segment(i, load_addr, pos, data_off, data_len, seg_data))
        pos = data_off + data_len

    # The checksum byte sits where pos % 16 == 15, after zero padding (esptool
    # align_file_position + append_checksum; IDF process_checksum).
    checksum_offset = pos + (15 - pos % 16)
    tail = get(pos, checksum_offset + 1 - pos, "checksum")
    sha.update(tail)
    stored_checksum = tail[-1]
    length = checksum_offset + 1
    if verify and stored_checksum != checksum:
        raise ImageFormatError(
            "checksum", f"checksum failed: calculated 0x{checksum:02x}, read "
            f"0x{stored_checksum:02x}", offset=checksum_offset,
            hint="the image is corrupt (or was edited without rebuilding)")
    calculated_sha = sha.digest()
    stored_sha: bytes | None = None
    if header.hash_appended:
        stored_sha = get(length, 32, "appended SHA-256")
        if verify and stored_sha != calculated_sha:
            raise ImageFormatError(
                "sha256", f"appended SHA-256 {stored_sha.hex()} does not match calculated "
                f"{calculated_sha.hex()}: image hash failed - image is corrupt", offset=length)
        length += 32

    app_desc = None
    boot_desc = None
    if segments and segments[0].data_offset == APP_DESC_OFFSET:
        first = segments[0]
        if len(first.data) >= APP_DESC_SIZE and \
                struct.unpack_from("<I", first.data, 0)[0] == APP_DESC_MAGIC:
            app_desc = AppDesc.decode(first.data)
        else:
            boot_desc = BootloaderDesc.decode(first.data)

    sector = _find_signature_sector(read, offset, length, end_limit)
    return AppImage(header, tuple(segments), checksum_offset, stored_checksum, checksum, length,
                    stored_sha, calculated_sha, app_desc, boot_desc, sector)


def _find_signature_sector(read: Reader, base: int, length: int,
                           limit: int) -> SignatureSector | None:
    # The sector starts at the next 4 KiB boundary after the image (espsecure pads with 0xFF;
    # IDF esp_image_format.c: "secure boot v2 signature block starts on 4K boundary").
    start = (length + SIG_SECTOR_SIZE - 1) // SIG_SECTOR_SIZE * SIG_SECTOR_SIZE
    if start + SIG_BLOCK_SIZE > limit:
        return None
    raw = read(base + start, SIG_BLOCK_SIZE * MAX_SIG_BLOCKS)
    blocks: list[SignatureBlock] = []
    for i in range(MAX_SIG_BLOCKS):
        blk = raw[i * SIG_BLOCK_SIZE : (i + 1) * SIG_BLOCK_SIZE]
        if len(blk) < SIG_BLOCK_SIZE or blk[0] != SIG_BLOCK_MAGIC:
            break
        crc_ok = struct.unpack_from("<I", blk, 1196)[0] == zlib.crc32(blk[:1196]) & 0xFFFFFFFF
        version = blk[1]
        key_digest: bytes | None = None
        if version == 0x02:
            key_digest = hashlib.sha256(blk[36:812]).digest()
            digest = bytes(blk[4:36])
        elif version == 0x03 and blk[36] in (1, 2):
            key_digest = hashlib.sha256(blk[36:101]).digest()
            digest = bytes(blk[4:36])
        else:
            digest = bytes(blk[4:36])
        blocks.append(SignatureBlock(i, start + i * SIG_BLOCK_SIZE, version, digest, crc_ok,
                                     key_digest, bytes(blk)))
    if not blocks:
        return None
    return SignatureSector(start, tuple(blocks))


def build_app_image(
    chip: str,
    segments: Sequence[tuple[int, bytes] | tuple[int, bytes, str]],
    *,
    entry: int,
    app_desc: AppDesc | None = None,
    flash_mode: str = "dio",
    flash_freq: str = "40m",
    flash_size: str = "4MB",
    hash_appended: bool = True,
    min_chip_rev_full: int = 0,
    max_chip_rev_full: int = 0,
    secure_pad_v2: bool = False,
) -> bytes:
    """Build an image with esptool's ``FirmwareImage.save`` (segment order, padding, checksum).

    ``segments`` are ``(load_addr, data)`` or ``(load_addr, data, section_name)``; the name
    ``.dram0.bootdesc`` makes esptool write that RAM segment first (bootloaders). With
    ``app_desc`` the encoded ``esp_app_desc_t`` is prepended to the lowest DROM segment, which
    esptool then writes first, so the descriptor lands at image offset 0x20 as ESP-IDF requires.
    Data lengths are padded to 4 bytes.
    """
    cls = memory_map(chip).image_class
    image = cls()
    rom = cls.ROM_LOADER
    try:
        image.flash_mode = FLASH_MODES[flash_mode]
        image.flash_size_freq = rom.FLASH_SIZES[flash_size] + rom.FLASH_FREQUENCY[flash_freq]
    except KeyError as exc:
        raise ImageError(f"unsupported flash setting {exc.args[0]!r} for {chip}") from None
    image.entrypoint = entry
    image.append_digest = hash_appended
    image.min_rev_full = min_chip_rev_full
    image.max_rev_full = max_chip_rev_full
    image.min_rev = min_chip_rev_full // 100
    if secure_pad_v2:
        image.secure_pad = "2"
    mmap = memory_map(chip)
    drom_addrs = sorted(seg[0] for seg in segments if mmap.is_drom(seg[0]))
    if app_desc is not None and not drom_addrs:
        raise ImageError("an app image needs a DROM segment to hold esp_app_desc_t")
    for i, seg in enumerate(segments):
        addr, blob = seg[0], bytes(seg[1])
        name = seg[2] if len(seg) > 2 else f".segment{i}"  # type: ignore[misc]
        if app_desc is not None and addr == drom_addrs[0]:
            blob = app_desc.encode() + blob
            if addr % MMU_PAGE != APP_DESC_OFFSET:
                raise ImageError(f"DROM segment at 0x{addr:08x} must have address 0x20 mod 64 "
                                 "KiB so esp_app_desc_t lands at image offset 0x20")
            # ".flash.appdesc" is the name esptool moves to the front of the flash segments.
            image.segments.append(ELFSection(b".flash.appdesc", addr, _pad4(blob), 0))
        else:
            image.segments.append(ELFSection(str(name).encode(), addr, _pad4(blob), 0))
    image.verify()
    out = image.save(None)
    assert out is not None
    return out


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)
