"""The boot chain of a virtual chip: ROM -> second-stage bootloader -> app selection.

Reads a board's flash the way the ESP ROM and ESP-IDF's bootloader do (image checks, partition
table MD5, otadata selection with the rollback / anti-rollback state machine, fallback order),
writes otadata back where the bootloader does, and returns a :class:`BootOutcome` with the log
the chip would print. Also the app-side otadata calls (``esp_ota_mark_app_valid...``). It does not
run apps, sleep, or own flash storage: ``FlashAccess`` is whatever the board gives it.

Log texts are ESP-IDF's own (v5.x ``bootloader_utility.c``, ``esp_image_format.c``,
``bootloader_common_loader.c``, ``flash_partitions.c``, ``app_init`` / ``cpu_start``). What the
log says about the second-stage bootloader and the app comes from the images themselves (their
``esp_bootloader_desc_t`` / ``esp_app_desc_t``); where an image does not record something, the
log says so instead of inventing it. The boot outcome tells whether the app carries the virtual
rack's demo-app marker (``AppInfo.demo``): only such an app has a model the board can run.
"""

from __future__ import annotations

import hashlib
import re
import struct
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from pytest_hilfarm.errors import ImageError, UsageError
from pytest_hilfarm.esp.chips import FARM_CHIPS
from pytest_hilfarm.esp.image import (
    APP_DESC_MAGIC,
    APP_DESC_OFFSET,
    APP_DESC_SIZE,
    HEADER_SIZE,
    MAX_SEGMENTS,
    AppDesc,
    AppImage,
    ImageFormatError,
    ImageHeader,
    SignatureBlock,
    chip_id_of,
    memory_map,
    parse_image_from,
)
from pytest_hilfarm.esp.otadata import (
    ENTRY_SIZE,
    OTADATA_SIZE,
    SECTOR_SIZE,
    OtaSelectEntry,
    OtaState,
    active_entry_index,
    select_otadata,
    set_boot_slot,
    state_name,
)
from pytest_hilfarm.esp.partitions import (
    ENTRY_SIZE as PART_ENTRY_SIZE,
)
from pytest_hilfarm.esp.partitions import (
    MAGIC as PART_MAGIC,
)
from pytest_hilfarm.esp.partitions import (
    MAX_TABLE_LENGTH,
    MD5_MAGIC,
    TABLE_OFFSET,
    Partition,
    PartitionTable,
)
from pytest_hilfarm.sim.appbuild import faults_from_desc_segment, has_demo_marker
from pytest_hilfarm.sim.chips import chip_spec
from pytest_hilfarm.sim.model import AppInfo, BootOutcome, Faults

FACTORY_INDEX = -1  # IDF bootloader_utility.h
TEST_APP_INDEX = -2
INVALID_INDEX = -99
_ROM_INVALID_HEADER_REPEATS = 3  # the ROM repeats the line forever; the log shows a few


class FlashAccess(Protocol):
    """The flash the boot chain reads and (for otadata) writes; NOR semantics."""

    @property
    def size(self) -> int: ...

    def read(self, addr: int, n: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None:
        """Program bytes: new = old AND data (erase first to get 1s back)."""

    def erase(self, addr: int, n: int) -> None:
        """Erase to 0xFF; ``addr`` and ``n`` are multiples of the 4 KiB sector."""


@dataclass(frozen=True)
class BootEfuse:
    """Security state the bootloader acts on.

    ``secure_version`` is the anti-rollback eFuse value (a count, as the eFuse stores set bits);
    ``anti_rollback`` stands for ``CONFIG_BOOTLOADER_APP_ANTI_ROLLBACK`` in the bootloader (with
    the eFuse emulated, as ``CONFIG_BOOTLOADER_EFUSE_SECURE_VERSION_EMULATE`` allows). When it is
    on and the booted app's ``ota_state`` is VALID, the board should raise ``secure_version`` to
    the app's (the bootloader's ``update_anti_rollback``); boot() does not mutate this record.
    """

    secure_boot_enabled: bool = False
    key_digests: tuple[bytes, ...] = ()
    secure_version: int = 0
    signed_apps_no_secure_boot: bool = False
    anti_rollback: bool = False


# Checks one signature block against the image digest; True if the signature verifies. Virtual
# boards pass pytest_hilfarm.ota.signing.verify_block (the RSA-PSS check the ROM's RSA routines
# do, secure_boot_signatures_bootloader.c); without a verifier only the structure, the trusted
# key digest and the image digest are checked (enough for tests of the selection logic).
SignatureVerifier = Callable[[SignatureBlock, bytes], bool]


@dataclass(frozen=True)
class _RomInfo:
    banner: tuple[str, ...]
    boot_mode: str  # "boot:0x13 (SPI_FAST_FLASH_BOOT)"
    resets: Mapping[str, str]
    decimal_len: bool  # ESP32's ROM prints "len:7104", the newer ROMs "len:0x1bc0"
    extra: tuple[str, ...]
    multicore: bool


# ROM banners and reset-reason names as printed by each chip's ROM (ESP-IDF
# esp_rom/<chip>/include/<chip>/rom/rtc.h RESET_REASON names).
_NEW_ROM_RESETS: Mapping[str, str] = MappingProxyType({
    "poweron": "rst:0x1 (POWERON)", "sw": "rst:0x3 (RTC_SW_SYS_RST)",
    "panic": "rst:0xc (RTC_SW_CPU_RST)", "wdt": "rst:0x10 (RTCWDT_RTC_RST)"})
_ROM: Mapping[str, _RomInfo] = MappingProxyType({
    "esp32": _RomInfo(
        ("ets Jun  8 2016 00:22:57", ""), "boot:0x13 (SPI_FAST_FLASH_BOOT)",
        MappingProxyType({"poweron": "rst:0x1 (POWERON_RESET)", "sw": "rst:0xc (SW_CPU_RESET)",
                          "panic": "rst:0xc (SW_CPU_RESET)",
                          "wdt": "rst:0x10 (RTCWDT_RTC_RESET)"}),
        True,
        ("configsip: 0, SPIWP:0xee",
         "clk_drv:0x00,q_drv:0x00,d_drv:0x00,cs0_drv:0x00,hd_drv:0x00,wp_drv:0x00",
         "mode:DIO, clock div:2"),
        True),
    "esp32s2": _RomInfo(
        ("ESP-ROM:esp32s2-rc4-20191025", "Build:Oct 25 2019"), "boot:0x8 (SPI_FAST_FLASH_BOOT)",
        _NEW_ROM_RESETS,
        False, ("SPIWP:0xee", "mode:DIO, clock div:1"), False),
    "esp32c3": _RomInfo(
        ("ESP-ROM:esp32c3-api1-20210207", "Build:Feb  7 2021"), "boot:0xc (SPI_FAST_FLASH_BOOT)",
        _NEW_ROM_RESETS,
        False, ("SPIWP:0xee", "mode:DIO, clock div:1"), False),
    "esp32s3": _RomInfo(
        ("ESP-ROM:esp32s3-20210327", "Build:Mar 27 2021"), "boot:0x8 (SPI_FAST_FLASH_BOOT)",
        _NEW_ROM_RESETS,
        False, ("SPIWP:0xee", "mode:DIO, clock div:1"), True),
    "esp32c6": _RomInfo(
        ("ESP-ROM:esp32c6-20220919", "Build:Sep 19 2022"), "boot:0xc (SPI_FAST_FLASH_BOOT)",
        _NEW_ROM_RESETS,
        False, ("SPIWP:0xee", "mode:DIO, clock div:2"), False),
})
# The compile-time line of a bootloader without esp_bootloader_desc_t (ESP-IDF 5.0 and older)
# is a string literal in the binary ("compile time " __DATE__ " " __TIME__): quote it from there.
_COMPILE_TIME = re.compile(rb"compile time ([A-Z][a-z]{2} [ 0-3]\d \d{4} \d\d:\d\d:\d\d)")

_SPI_SPEED: Mapping[int, str] = MappingProxyType(
    {0x0: "40MHz", 0x1: "26.7MHz", 0x2: "20MHz", 0xF: "80MHz"})
_SPI_MODE: Mapping[int, str] = MappingProxyType(
    {0: "QIO", 1: "QOUT", 2: "DIO", 3: "DOUT", 4: "FAST READ", 5: "SLOW READ"})


@dataclass
class _Log:
    """Accumulates CRLF lines with an ESP-IDF-like millisecond stamp (deterministic)."""

    lines: list[str] = field(default_factory=list)
    ms: int = 27
    last_error: str | None = None

    def raw(self, text: str) -> None:
        self.lines.append(text)

    def _emit(self, level: str, tag: str, msg: str, step: int) -> None:
        self.ms += step
        self.lines.append(f"{level} ({self.ms}) {tag}: {msg}")

    def i(self, tag: str, msg: str, step: int = 4) -> None:
        self._emit("I", tag, msg, step)

    def w(self, tag: str, msg: str) -> None:
        self._emit("W", tag, msg, 4)

    def e(self, tag: str, msg: str) -> None:
        self._emit("E", tag, msg, 4)
        self.last_error = f"{tag}: {msg}"

    def text(self) -> str:
        return "".join(line + "\r\n" for line in self.lines)


def _rom_info(chip: str) -> _RomInfo:
    if chip not in _ROM:
        raise UsageError(f"unknown chip {chip!r}", hint=f"use one of {', '.join(FARM_CHIPS)}")
    return _ROM[chip]


def rom_reset_text(chip: str, reason: str) -> str:
    """The ROM's ``rst:`` field for ``reason`` (poweron, sw, panic, wdt), without ``rst:``."""
    return _rom_info(chip).resets[reason].removeprefix("rst:")


def _bootloader_banner(log: _Log, bootloader: AppImage) -> None:
    """The second stage's first two lines, from what the bootloader image records."""
    bdesc = bootloader.bootloader_desc
    if bdesc is not None and bdesc.idf_ver:
        log.i("boot", f"ESP-IDF {bdesc.idf_ver} 2nd stage bootloader", step=2)
        log.i("boot", f"compile time {bdesc.date_time}", 0)
        return
    # No esp_bootloader_desc_t (ESP-IDF 5.0 and older): the version is not recorded in a form
    # that can be read back, so say so; the compile time is quoted if the binary holds it.
    log.i("boot", "2nd stage bootloader (its ESP-IDF version is not recorded in the image: "
          "no esp_bootloader_desc_t)", step=2)
    for seg in bootloader.segments:
        found = _COMPILE_TIME.search(seg.data)
        if found:
            log.i("boot", f"compile time {found.group(1).decode()}", 0)
            return


def boot(
    chip: str,
    flash: FlashAccess,
    *,
    efuse: BootEfuse = BootEfuse(),  # noqa: B008 - frozen record, safe as a default
    rollback_enabled: bool = True,
    reset_reason: str = "poweron",
    signature_verifier: SignatureVerifier | None = None,
    chip_revision: int | None = None,
) -> BootOutcome:
    """One SPI boot of ``chip`` from ``flash`` (see the module docstring).

    ``reset_reason`` picks the ROM's ``rst:`` line: poweron, sw, panic or wdt.
    ``rollback_enabled`` stands for ``CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE``.
    ``chip_revision`` (major * 100 + minor) is what the eFuses say; default: the chip's
    current silicon (``ChipSpec.default_revision``), as the virtual board's eFuses report it.
    """
    rom = _rom_info(chip)
    revision = chip_spec(chip).default_revision if chip_revision is None else chip_revision
    if reset_reason not in rom.resets:
        raise UsageError(f"unknown reset reason {reset_reason!r}",
                         hint=f"use one of {', '.join(rom.resets)}")
    log = _Log()
    for line in rom.banner:
        log.raw(line)
    log.raw(f"{rom.resets[reset_reason]},{rom.boot_mode}")

    # --- ROM: load the second-stage bootloader -------------------------------------------
    boot_off = memory_map(chip).bootloader_offset
    first_word = struct.unpack("<I", _read(flash, boot_off, 4).ljust(4, b"\xff"))[0]
    bootloader: AppImage | None = None
    try:
        bootloader = parse_flash_image(flash, offset=boot_off, limit=TABLE_OFFSET - boot_off,
                                       chip=chip, verify=False)
    except ImageFormatError:
        bootloader = None
    if bootloader is None or bootloader.header.chip_id != chip_id_of(chip):
        # The ROM keeps re-reading a header it cannot use (e.g. erased flash, or a bootloader
        # for another chip at another offset).
        for _ in range(_ROM_INVALID_HEADER_REPEATS):
            log.raw(f"invalid header: 0x{first_word:08x}")
        return BootOutcome(log=log.text(), boot_loop=True,
                           error=f"invalid header: 0x{first_word:08x}")
    for line in rom.extra:
        log.raw(line)
    for seg in bootloader.segments:
        if seg.load_addr >= 0x10000000:  # padding segments (addr 0) are not loaded
            size = f"{seg.length}" if rom.decimal_len else f"0x{seg.length:x}"
            log.raw(f"load:0x{seg.load_addr:08x},len:{size}")
    if not bootloader.checksum_ok:
        log.raw(f"csum err:0x{bootloader.calculated_checksum:02x}!="
                f"0x{bootloader.stored_checksum:02x}")
        log.raw("ets_main.c 371")
        return BootOutcome(log=log.text(), boot_loop=True,
                           error=f"csum err:0x{bootloader.calculated_checksum:02x}!="
                                 f"0x{bootloader.stored_checksum:02x}")
    log.raw(f"entry 0x{bootloader.header.entry_addr:08x}")

    # --- second stage -------------------------------------------------------------------
    _bootloader_banner(log, bootloader)
    if rom.multicore:
        log.i("boot", "Multicore bootloader", 0)
    log.i("boot", f"chip revision: v{revision // 100}.{revision % 100}")
    hdr = bootloader.header
    tag = f"boot.{chip}"
    log.i(tag, f"SPI Speed      : {_SPI_SPEED.get(hdr.spi_speed, '40MHz')}")
    log.i(tag, f"SPI Mode       : {_SPI_MODE.get(hdr.spi_mode, 'DIO')}")
    log.i(tag, f"SPI Flash Size : {1 << hdr.spi_size}MB")
    log.i("boot", "Enabling RNG early entropy source...")

    table = _load_partition_table(flash, log)
    if table is None:
        return BootOutcome(log=log.text(), boot_loop=True, error=log.last_error)

    ctx = _Ctx(chip, flash, efuse, rollback_enabled, signature_verifier, table, log, revision)
    start = ctx.select_boot_partition()
    if start == INVALID_INDEX:
        return BootOutcome(log=log.text(), boot_loop=True, error=log.last_error)
    return ctx.load_boot_image(start)


def _read(flash: FlashAccess, addr: int, n: int) -> bytes:
    # Reads past the end of the chip come back short (the parser reports "truncated") rather
    # than raising from whatever flash backend the board uses.
    if addr >= flash.size or n <= 0:
        return b""
    return flash.read(addr, min(n, flash.size - addr))


def _reader(flash: FlashAccess) -> Callable[[int, int], bytes]:
    return lambda addr, n: _read(flash, addr, n)


# Parsed images per flash, by (offset, limit, chip, verify): (flash generation, image). A
# board's boot reads and checks the same image again on every reset, as the chip does; the
# outcome only changes when the flash does, so an unchanged image is not hashed again.
_PARSED: weakref.WeakKeyDictionary[object, dict[tuple[int, int | None, str | None, bool],
                                                tuple[int, AppImage]]] = \
    weakref.WeakKeyDictionary()


def parse_flash_image(flash: FlashAccess, *, offset: int, limit: int | None,
                      chip: str | None, verify: bool = False) -> AppImage:
    """``parse_image_from`` on ``flash``, reused while the flash's ``generation`` is unchanged.

    A flash without a ``generation`` (a test double) is parsed every time. Failures are not
    kept: they raise again on the next read, with the same text.
    """
    generation = getattr(flash, "generation", None)
    key = (offset, limit, chip, verify)
    if generation is not None:
        known = _PARSED.get(flash, {}).get(key)
        if known is not None and known[0] == generation:
            return known[1]
    image = parse_image_from(_reader(flash), offset=offset, limit=limit, chip=chip,
                             verify=verify)
    if generation is not None:
        per_flash = _PARSED.setdefault(flash, {})
        if len(per_flash) > 16:  # a few partitions per board; never grows with resets
            per_flash.clear()
        per_flash[key] = (generation, image)
    return image


def _load_partition_table(flash: FlashAccess, log: _Log) -> PartitionTable | None:
    """``bootloader_utility_load_partition_table`` + ``esp_partition_table_verify``."""
    raw = _read(flash, TABLE_OFFSET, MAX_TABLE_LENGTH).ljust(MAX_TABLE_LENGTH, b"\xff")
    entries: list[Partition] = []
    md5_found = False
    error: str | None = None
    for n in range(MAX_TABLE_LENGTH // PART_ENTRY_SIZE):
        at = n * PART_ENTRY_SIZE
        entry = raw[at : at + PART_ENTRY_SIZE]
        magic = entry[:2]
        if magic == PART_MAGIC:
            part = Partition.decode(entry)
            if part.offset > flash.size or part.end > flash.size:
                error = (f"partition {n} invalid - offset 0x{part.offset:x} size 0x{part.size:x} "
                         f"exceeds flash chip size 0x{flash.size:x}")
                break
            entries.append(part)
            continue
        if magic == MD5_MAGIC:
            if md5_found:
                error = "Only one MD5 checksum is allowed"
                break
            if entry[16:32] != hashlib.md5(raw[:at]).digest():
                error = "Incorrect MD5 checksum"
                break
            md5_found = True
            continue
        if magic == b"\xff\xff" and entry[2] == 0xFF and entry[3] == 0xFF:
            break
        error = f"partition {n} invalid magic number 0x{int.from_bytes(magic, 'little'):x}"
        break
    else:
        error = "partition table has no terminating entry, not valid"
    if error is not None:
        log.e("flash_parts", error)
        log.e("boot", "Failed to verify partition table")
        log.e("boot", "load partition table error!")
        return None
    log.i("boot", "Partition Table:")
    log.i("boot", "## Label            Usage          Type ST Offset   Length", 3)
    for n, p in enumerate(entries):
        log.i("boot", f"{n:2d} {p.label:<16} {p.usage:<16} {p.type:02x} {p.subtype:02x} "
                      f"{p.offset:08x} {p.size:08x}", 7)
    log.i("boot", "End of partition table")
    return PartitionTable(tuple(entries), md5_found or None)


@dataclass
class _Ctx:
    """One boot's bootloader state (``bootloader_state_t`` plus what we log and write)."""

    chip: str
    flash: FlashAccess
    efuse: BootEfuse
    rollback_enabled: bool
    verifier: SignatureVerifier | None
    table: PartitionTable
    log: _Log
    chip_revision: int
    ota_has_initial_contents: bool = False

    # --- selection (bootloader_utility_get_selected_boot_partition) ------------------------
    def select_boot_partition(self) -> int:
        otadata = self.table.otadata
        log = self.log
        if otadata is None:
            return FACTORY_INDEX
        if otadata.size < OTADATA_SIZE:
            log.e("boot", f"ota_info partition size {otadata.size} is too small (minimum "
                          f"{OTADATA_SIZE} bytes)")
            return INVALID_INDEX
        entries = list(read_otadata_entries(self.flash, otadata.offset))
        app_count = self.table.app_count
        factory = self.table.factory
        if self.rollback_enabled:
            for i in (0, 1):
                if entries[i].state == OtaState.PENDING_VERIFY:
                    # Reset before the app confirmed itself: one attempt only (ota.rst).
                    entries[i] = entries[i].with_state(OtaState.ABORTED)
                    write_otadata_entry(self.flash, otadata.offset, i, entries[i])

        def blank(e: OtaSelectEntry) -> bool:
            return e.is_erased or not e.crc_ok

        active: int | None
        if not self.efuse.anti_rollback:
            if (entries[0].is_invalid and entries[1].is_invalid) or app_count == 0:
                if factory is not None:
                    log.i("boot", "Defaulting to factory image")
                    return FACTORY_INDEX
                log.i("boot", "No factory image, trying OTA 0")
                if blank(entries[0]) and blank(entries[1]):
                    self.ota_has_initial_contents = True
                return 0
            active = active_entry_index(entries)
        else:
            log.i("boot", "Enabled a check secure version of app for anti rollback")
            log.i("boot", f"Secure version (from eFuse) = {self.efuse.secure_version}")
            if blank(entries[0]) and blank(entries[1]):
                log.i("boot", "otadata[0..1] in initial state")
                self.ota_has_initial_contents = True
                return FACTORY_INDEX
            ok = [False, False]
            for i in (0, 1):
                if entries[i].is_valid and app_count:
                    part = self.index_to_partition(entries[i].slot(app_count))
                    ok[i] = part is not None and self.check_anti_rollback(part)
            active = select_otadata(ok, entries)
        if active is not None:
            index = entries[active].slot(app_count)
            if self.rollback_enabled and entries[active].state == OtaState.NEW:
                entries[active] = entries[active].with_state(OtaState.PENDING_VERIFY)
                write_otadata_entry(self.flash, otadata.offset, active, entries[active])
            return index
        if factory is not None:
            log.e("boot", "ota data partition invalid, falling back to factory")
        else:
            log.e("boot", "ota data partition invalid and no factory, will try all partitions")
        return FACTORY_INDEX

    def index_to_partition(self, index: int) -> Partition | None:
        if index == FACTORY_INDEX:
            return self.table.factory
        if index == TEST_APP_INDEX:
            return self.table.test
        if 0 <= index < self.table.app_count:
            return self.table.ota_slots.get(index)
        return None

    def check_anti_rollback(self, part: Partition) -> bool:
        if not self.efuse.anti_rollback:
            return True
        desc = _read(self.flash, part.offset + APP_DESC_OFFSET, APP_DESC_SIZE)
        if len(desc) < APP_DESC_SIZE or struct.unpack_from("<I", desc)[0] != APP_DESC_MAGIC:
            return False
        return AppDesc.decode(desc).secure_version >= self.efuse.secure_version

    # --- loading (bootloader_utility_load_boot_image) -------------------------------------
    def load_boot_image(self, start: int) -> BootOutcome:
        log = self.log
        order = list(range(start, FACTORY_INDEX - 1, -1))
        order += list(range(start + 1, self.table.app_count))
        for index in order:
            part = self.index_to_partition(index)
            if part is None or part.size == 0:
                continue
            image = self.try_load(part) if self.check_anti_rollback(part) else None
            if image is not None:
                self.set_actual_ota_seq(index)
                return self.started(part, image)
            if index == FACTORY_INDEX:
                log.e("boot", "Factory app partition is not bootable")
            else:
                log.e("boot", f"OTA app partition slot {index} is not bootable")
        test = self.table.test
        if test is not None and self.check_anti_rollback(test):
            image = self.try_load(test)
            if image is not None:
                log.w("boot", "Falling back to test app as only bootable partition")
                return self.started(test, image)
        log.e("boot", "No bootable app partitions in the partition table")
        return BootOutcome(log=log.text(), boot_loop=True, error=log.last_error)

    def set_actual_ota_seq(self, index: int) -> None:
        otadata = self.table.otadata
        if index > FACTORY_INDEX and self.ota_has_initial_contents and otadata is not None:
            entry = OtaSelectEntry.make(index + 1, OtaState.VALID)
            write_otadata_entry(self.flash, otadata.offset, 0, entry)
            self.log.i("boot", f"Set actual ota_seq={index + 1} in otadata[0]")

    def try_load(self, part: Partition) -> AppImage | None:
        """``bootloader_load_image`` with its log lines; None if the image is not bootable."""
        log = self.log
        head = _read(self.flash, part.offset, HEADER_SIZE).ljust(HEADER_SIZE, b"\xff")
        header = ImageHeader.decode(head)
        if header.magic != 0xE9:
            log.e("esp_image", f"image at 0x{part.offset:x} has invalid magic byte "
                               "(nothing flashed here?)")
            return None
        expected = chip_id_of(self.chip)
        if header.chip_id != expected:
            # v5.x text (bootloader_common_loader.c); IDF <= 4.x printed
            # "esp_image: Mismatch chip id, expected %d, found %d".
            log.e("boot_comm", f"mismatch chip ID, expected {expected}, found {header.chip_id}")
            return None
        if header.min_chip_rev_full > self.chip_revision:
            r, c = header.min_chip_rev_full, self.chip_revision
            log.e("boot_comm", f"chip revision check failed. Required >= v{r // 100}.{r % 100}, "
                               f"found v{c // 100}.{c % 100}.")
            return None
        if header.segment_count > MAX_SEGMENTS:
            log.e("esp_image", f"image at 0x{part.offset:x} segment count "
                               f"{header.segment_count} exceeds max {MAX_SEGMENTS}")
            return None
        try:
            image = parse_flash_image(self.flash, offset=part.offset, limit=part.size,
                                      chip=self.chip, verify=False)
        except ImageFormatError as exc:
            log.e("esp_image", _image_error_text(exc, part))
            return None
        mm = memory_map(self.chip)
        for seg in image.segments:
            kind = "map" if mm.is_mapped(seg.load_addr) else (
                "load" if seg.load_addr >= 0x10000000 else "")
            log.i("esp_image", f"segment {seg.index}: paddr={part.offset + seg.data_offset:08x} "
                               f"vaddr={seg.load_addr:08x} size={seg.length:05x}h "
                               f"({seg.length:6d}) {kind}".rstrip(), 6)
        if not image.checksum_ok:
            log.e("esp_image", f"Checksum failed. Calculated 0x{image.calculated_checksum:x} "
                               f"read 0x{image.stored_checksum:x}")
            return None
        secure = self.efuse.secure_boot_enabled or self.efuse.signed_apps_no_secure_boot
        if secure:
            problem = self.check_signature(part, image)
            if problem is not None:
                log.e("secure_boot_v2", problem)
                log.e("esp_image", "Secure boot signature verification failed")
                log.i("esp_image", "Calculating simple hash to check for corruption...")
                if image.sha256_ok is False:
                    log.w("esp_image", "image corrupted on flash")
                else:
                    log.w("esp_image", "image valid, signature bad")
                return None
        if image.sha256_ok is False:
            log.e("esp_image", "Image hash failed - image is corrupt")
            return None
        log.i("boot", f"Loaded app from partition at offset 0x{part.offset:x}")
        return image

    def check_signature(self, part: Partition, image: AppImage) -> str | None:
        """Structural Secure Boot V2 checks; the signature math is the ``verifier`` hook."""
        sector = image.signature_sector
        if sector is None:
            return "no signature block found after the image"
        digest = hashlib.sha256(_read(self.flash, part.offset, sector.offset)).digest()
        trusted = set(self.efuse.key_digests)
        for blk in sector.blocks:
            if not blk.crc_ok:
                continue
            if self.efuse.secure_boot_enabled and blk.key_digest not in trusted:
                continue
            if blk.image_digest != digest:
                continue
            if self.verifier is None or self.verifier(blk, digest):
                return None
        return "no signature block verifies with a trusted key"

    def started(self, part: Partition, image: AppImage) -> BootOutcome:
        log = self.log
        log.i("boot", "Disabling RNG early entropy source...", 1)
        rom = _ROM[self.chip]
        demo = False
        faults = Faults()
        desc = image.app_desc
        if desc is not None:
            # Only the virtual rack's demo builds carry the marker (sim/appbuild.py).
            demo = has_demo_marker(image.segments[0].data)
            try:
                faults = faults_from_desc_segment(image.segments[0].data) if demo else Faults()
            except ImageError:
                faults = Faults()
            self.app_startup_log(desc, image, rom)
        app = AppInfo(
            project=desc.project_name if desc else "",
            version=desc.version if desc else "",
            secure_version=desc.secure_version if desc else 0,
            idf_ver=desc.idf_ver if desc else "",
            chip=self.chip, partition_label=part.label,
            partition_offset=part.offset, partition_size=part.size,
            image_sha256=image.sha256_hex, faults=faults,
            ota_state=_slot_state(self.flash, self.table, part),
            demo=demo,
            elf_sha256=desc.app_elf_sha256.hex() if desc else "",
            has_app_desc=desc is not None,
        )
        return BootOutcome(log=log.text(), app=app)

    def app_startup_log(self, desc: AppDesc, image: AppImage, rom: _RomInfo) -> None:
        """ESP-IDF's own start-up lines (cpu_start, app_init, ...) up to ``app_main``.

        Printed only for an image with an ``esp_app_desc_t``: every ESP-IDF app has one, and
        the project, versions and ELF hash come from it.
        """
        log = self.log
        log.i("cpu_start", "Multicore app" if rom.multicore else "Unicore app", 12)
        log.i("cpu_start", "Pro cpu start user code", 9)
        log.i("cpu_start", "cpu freq: 160000000 Hz", 0)
        log.i("app_init", "Application information:")
        log.i("app_init", f"Project name:     {desc.project_name}")
        log.i("app_init", f"App version:      {desc.version}")
        if self.efuse.anti_rollback:  # printed with CONFIG_BOOTLOADER_APP_ANTI_ROLLBACK
            log.i("app_init", f"Secure version:   {desc.secure_version}")
        log.i("app_init", f"Compile time:     {desc.date} {desc.time}")
        log.i("app_init", f"ELF file SHA256:  {desc.app_elf_sha256.hex()[:8]}...")
        log.i("app_init", f"ESP-IDF:          {desc.idf_ver}")
        hdr = image.header
        lo, hi, rev = hdr.min_chip_rev_full, hdr.max_chip_rev_full, self.chip_revision
        log.i("efuse_init", f"Min chip rev:     v{lo // 100}.{lo % 100}")
        log.i("efuse_init", f"Max chip rev:     v{hi // 100}.{hi % 100}")
        log.i("efuse_init", f"Chip rev:         v{rev // 100}.{rev % 100}")
        log.i("heap_init", "Initializing. RAM available for dynamic allocation:")
        log.i("spi_flash", "detected chip: generic", 8)
        log.i("spi_flash", "flash io: dio")
        if rom.multicore:
            log.i("cpu_start", "Starting scheduler on PRO CPU.", 10)
            log.i("cpu_start", "Starting scheduler on APP CPU.", 1)
        log.i("main_task", "Started on CPU0", 10)
        log.i("main_task", "Calling app_main()", 10)


def _image_error_text(exc: ImageFormatError, part: Partition) -> str:
    """The esp_image_format.c wording for a structural image failure."""
    v = exc.values
    if exc.kind == "segment_length" and len(v) == 2:
        return f"invalid segment length 0x{v[1]:x}"
    if exc.kind == "segment_alignment" and len(v) == 3:
        return (f"Segment {v[0]} load address 0x{v[1]:08x}, doesn't match data "
                f"0x{part.offset + v[2]:08x}")
    if exc.kind in ("too_big", "truncated") and v:
        return f"Image length {v[0]} doesn't fit in partition length {part.size}"
    return f"image at 0x{part.offset:x}: {exc.what}"


# --- otadata I/O used by the bootloader and by the running app -------------------------------

def read_otadata_entries(flash: FlashAccess, offset: int) -> tuple[OtaSelectEntry, OtaSelectEntry]:
    return (OtaSelectEntry.decode(flash.read(offset, ENTRY_SIZE)),
            OtaSelectEntry.decode(flash.read(offset + SECTOR_SIZE, ENTRY_SIZE)))


def write_otadata_entry(flash: FlashAccess, offset: int, index: int,
                        entry: OtaSelectEntry) -> None:
    """Erase copy ``index``'s own 4 KiB sector, then write its 32 bytes (IDF write_otadata /
    rewrite_ota_seq).
    """
    sector = offset + SECTOR_SIZE * index
    flash.erase(sector, SECTOR_SIZE)
    flash.write(sector, entry.encode())


def read_partition_table(flash: FlashAccess) -> PartitionTable:
    """The table at 0x8000, MD5-checked; raises ImageError if it is not valid."""
    return PartitionTable.decode(_read(flash, TABLE_OFFSET, MAX_TABLE_LENGTH))


def _slot_state(flash: FlashAccess, table: PartitionTable, part: Partition) -> str | None:
    slot = part.ota_slot
    otadata = table.otadata
    if slot is None or otadata is None or table.app_count == 0:
        return None
    entries = read_otadata_entries(flash, otadata.offset)
    matching = [e for e in entries if not e.is_erased and e.crc_ok
                and e.slot(table.app_count) == slot]
    if not matching:
        return None
    return state_name(max(matching, key=lambda e: e.seq).state)


def read_running_state(flash: FlashAccess, app: AppInfo) -> str | None:
    """``esp_ota_get_state_partition`` for the running app: "VALID", "PENDING_VERIFY", ...;
    None for a factory/test app or when no otadata entry points at its slot.
    """
    table = read_partition_table(flash)
    part = table.find(app.partition_label)
    if part is None:
        return None
    return _slot_state(flash, table, part)


def _running_entry(flash: FlashAccess) -> tuple[PartitionTable, int, list[OtaSelectEntry],
                                                int | None]:
    table = read_partition_table(flash)
    otadata = table.otadata
    if otadata is None:
        return table, -1, [], None
    entries = list(read_otadata_entries(flash, otadata.offset))
    return table, otadata.offset, entries, active_entry_index(entries)


def mark_valid(flash: FlashAccess, app: AppInfo) -> str:
    """``esp_ota_mark_app_valid_cancel_rollback``: the active entry becomes VALID.

    Returns the esp_err_t name: ESP_OK, ESP_FAIL (running factory / no OTA data) or
    ESP_ERR_NOT_FOUND (no otadata partition). With anti-rollback the caller also raises the
    eFuse secure_version to ``app.secure_version``.
    """
    table, offset, entries, active = _running_entry(flash)
    if offset < 0:
        return "ESP_ERR_NOT_FOUND"
    if active is None or table.app_count == 0 or app.partition_label == "factory":
        return "ESP_FAIL"  # "Running firmware is factory"
    if entries[active].state != OtaState.VALID:
        write_otadata_entry(flash, offset, active, entries[active].with_state(OtaState.VALID))
    return "ESP_OK"


def rollback_is_possible(flash: FlashAccess, chip: str) -> bool:
    """``esp_ota_check_rollback_is_possible`` (without anti-rollback)."""
    table, offset, entries, _ = _running_entry(flash)
    if offset < 0 or table.app_count == 0:
        return False
    valid = [entries[0].is_valid, entries[1].is_valid]
    active = select_otadata(valid, entries)
    if active is None:
        return False
    last = (~active) & 1

    def bootable(part: Partition | None) -> bool:
        if part is None:
            return False
        try:
            parse_flash_image(flash, offset=part.offset, limit=part.size, chip=chip, verify=True)
        except ImageError:
            return False
        return True

    if not valid[last]:
        return bootable(table.factory)
    return bootable(table.ota_slots.get(entries[last].slot(table.app_count)))


def mark_invalid(flash: FlashAccess, app: AppInfo) -> str:
    """``esp_ota_mark_app_invalid_rollback``: the active entry becomes INVALID (the caller
    reboots). ESP_ERR_OTA_ROLLBACK_FAILED when there is nothing to roll back to.
    """
    table, offset, entries, active = _running_entry(flash)
    if offset < 0:
        return "ESP_ERR_NOT_FOUND"
    if active is None or table.app_count == 0 or app.partition_label == "factory":
        return "ESP_FAIL"
    if not rollback_is_possible(flash, app.chip):
        return "ESP_ERR_OTA_ROLLBACK_FAILED"
    write_otadata_entry(flash, offset, active, entries[active].with_state(OtaState.INVALID))
    return "ESP_OK"


def set_boot_partition(flash: FlashAccess, label: str, *, rollback_enabled: bool = True) -> str:
    """``esp_ota_set_boot_partition``: make ``label`` boot next (factory erases otadata)."""
    table = read_partition_table(flash)
    part = table.find(label)
    otadata = table.otadata
    if part is None or not part.is_app or otadata is None:
        return "ESP_ERR_INVALID_ARG" if otadata is not None else "ESP_ERR_NOT_FOUND"
    if part.ota_slot is None:
        if part == table.factory:
            flash.erase(otadata.offset, OTADATA_SIZE)
            return "ESP_OK"
        return "ESP_ERR_INVALID_ARG"
    entries = read_otadata_entries(flash, otadata.offset)
    index, entry = set_boot_slot(entries, part.ota_slot, table.app_count,
                                 rollback_enabled=rollback_enabled)
    write_otadata_entry(flash, otadata.offset, index, entry)
    return "ESP_OK"
