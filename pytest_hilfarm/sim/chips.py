"""Per-chip facts of the simulated ESP32, ESP32-S2, ESP32-C3, ESP32-S3 and ESP32-C6 that esptool
5.6 relies on.

Magic values, eFuse words (where the MAC and the chip revision live), SPI controller registers,
GET_SECURITY_INFO payloads, RTC watchdog registers, ROM banner text and the simulated SPI
flash's JEDEC id / SFDP table; names, image chip ids and bootloader offsets are the shared chip
table's (:mod:`pytest_hilfarm.esp.chips`). Values come from
esptool's target classes (``esptool/targets/*.py``: register addresses and the bit fields its
``get_major_chip_version`` / ``get_minor_chip_version`` read), Espressif's chip errata (which
revisions exist) and real-chip traces (see the ESP ROM protocol note). Everything here is
constant data or pure functions: no I/O, no state, nothing about how the loader uses it.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from pytest_hilfarm.esp.chips import CHIPS

CHIP_DETECT_MAGIC_REG = 0x40001000

# SPI_CMD_REG bit that starts a "user" command (esptool's SPI_CMD_USR).
SPI_CMD_USR = 1 << 18

FLASH_SECTOR = 0x1000


@dataclass(frozen=True)
class ChipSpec:
    """What one chip family looks like from the serial port."""

    name: str  # "esp32", as in the rack file (esp.chips.FARM_CHIPS)
    magic: int  # word at CHIP_DETECT_MAGIC_REG
    rom_sync_value: int  # the non-zero "value" of the ROM's SYNC replies
    rom_begin_words: int  # u32 words of FLASH_BEGIN / FLASH_DEFL_BEGIN the ROM takes
    # GET_SECURITY_INFO reply body, or None where the ROM lacks the command (ESP32).
    security_info: bytes | None
    spi_base: int  # SPI_CMD_REG; SPI_ADDR_REG is spi_base + 4
    spi_usr: int  # offsets from spi_base
    spi_usr1: int
    spi_usr2: int
    spi_mosi_dlen: int
    spi_miso_dlen: int
    spi_w0: int
    spi_addr_msb: bool  # address written MSB-aligned into SPI_ADDR_REG (ESP32 only)
    uart_clkdiv_reg: int
    oui: bytes  # Espressif OUI used for simulated MACs
    rom_header: str  # banner lines before the "rst:" line (CRLF line ends)
    # eFuse / peripheral words that are not zero (MAC and revision words are added per board).
    fixed_registers: tuple[tuple[int, int], ...]
    # Where the MAC lives: ESP32 eFuse word 1, the newer chips EFUSE_BLOCK1 (esptool
    # MAC_EFUSE_REG); the word after it holds MAC bytes 0..1 in its low half.
    mac_reg: int
    # The revision a board of this chip reports unless the rack file says otherwise
    # (major * 100 + minor, as ESP-IDF's chip_revision and esptool's get_chip_revision count).
    default_revision: int
    # ROM text of the download-mode boot, after "rst:...,": esptool looks for
    # ``boot:(0x..)(.*waiting for download)?``.
    download_boot: str
    # (RTC_CNTL_WDTWPROTECT_REG, RTC_CNTL_WDTCONFIG0_REG) where esptool's ``--after
    # watchdog-reset`` arms the RTC watchdog; None where esptool does not (ESP32, ESP32-C6:
    # WATCHDOG_RESET_SUPPORTED = False, it pulses RTS instead).
    rtc_wdt: tuple[int, int] | None = None
    # The high half of the word after the MAC: ESP32-C6 keeps the EUI-64 filler ff:fe there
    # (esptool prints it as MAC_EXT); 0 elsewhere.
    mac_ext: int = 0

    @property
    def esptool_name(self) -> str:
        """The chip's name in esptool (CHIP_NAME, "ESP32-C3"), from the chip table."""
        return CHIPS[self.name].esptool_name

    @property
    def image_chip_id(self) -> int:
        """IMAGE_CHIP_ID in app images and in GET_SECURITY_INFO, from the chip table."""
        return CHIPS[self.name].image_chip_id

    @property
    def bootloader_offset(self) -> int:
        """Where the second-stage bootloader lives in flash, from the chip table."""
        return CHIPS[self.name].bootloader_offset

    @property
    def mac_words(self) -> tuple[int, int]:
        """Addresses of the eFuse words holding MAC bytes 2..5 and MAC bytes 0..1."""
        return (self.mac_reg, self.mac_reg + 4)


_ESP32_EFUSE = 0x3FF5A000

# ESP32: word3 = pkg 1 (D0WD); the revision bits are added per board (revision_registers).
# word4[7:0] (CK8M) and RTCCALICFG1 make esptool's ROM-calculated crystal exactly 40 MHz
# (800 * 15625 * 128 / 40), so the stub path agrees too.
_ESP32_APB_CTL_DATE = 0x3FF6607C
_ESP32_FIXED = (
    (_ESP32_EFUSE + 0x0C, 1 << 9),
    (_ESP32_EFUSE + 0x10, 128),
    (0x3FF5F06C, 800 << 7),
)

_S2_SECURITY = bytes(12)  # flags 0, crypt_cnt 0, 7 key purposes 0
_C3_SECURITY = bytes(12) + struct.pack("<II", 5, 0)  # + chip_id, api_version
_S3_SECURITY = bytes(12) + struct.pack("<II", 9, 0)
_C6_SECURITY = bytes(12) + struct.pack("<II", 13, 0)
# The ESP32's download-mode ROM line (the note's trace); the newer ROMs name their own straps.
_ESP32_DOWNLOAD = "boot:0x3 (DOWNLOAD_BOOT(UART0/UART1/SDIO_REI_REO_V2))"

ESP32 = ChipSpec(
    name="esp32",
    magic=0x00F01D83,
    rom_sync_value=0x55551207,
    rom_begin_words=4,
    security_info=None,
    spi_base=0x3FF42000,
    spi_usr=0x1C,
    spi_usr1=0x20,
    spi_usr2=0x24,
    spi_mosi_dlen=0x28,
    spi_miso_dlen=0x2C,
    spi_w0=0x80,
    spi_addr_msb=True,
    uart_clkdiv_reg=0x3FF40014,
    oui=bytes.fromhex("240ac4"),
    rom_header="ets Jun  8 2016 00:22:57\r\n\r\n",
    fixed_registers=_ESP32_FIXED,
    mac_reg=_ESP32_EFUSE + 4,
    # v3.1: the ESP32-D0WD-V3 revision modules ship with since 2022 (ESP32 errata v2.4).
    default_revision=301,
    download_boot=_ESP32_DOWNLOAD,
)

ESP32S2 = ChipSpec(
    name="esp32s2",
    magic=0x000007C6,
    rom_sync_value=0x20120707,
    rom_begin_words=5,
    security_info=_S2_SECURITY,
    spi_base=0x3F402000,
    spi_usr=0x18,
    spi_usr1=0x1C,
    spi_usr2=0x20,
    spi_mosi_dlen=0x24,
    spi_miso_dlen=0x28,
    spi_w0=0x58,
    spi_addr_msb=False,
    uart_clkdiv_reg=0x3F400014,
    oui=bytes.fromhex("7cdfa1"),
    rom_header="ESP-ROM:esp32s2-rc4-20191025\r\nBuild:Oct 25 2019\r\n",
    fixed_registers=(),
    mac_reg=0x3F41A044,
    default_revision=100,  # v1.0, the current ESP32-S2 revision (errata: v0.0, v1.0)
    download_boot=_ESP32_DOWNLOAD,
    rtc_wdt=(0x3F4080AC, 0x3F408094),
)

ESP32C3 = ChipSpec(
    name="esp32c3",
    # esptool 5.x identifies the C3 by chip id, not magic; this is the real ECO3 ROM word.
    magic=0x1B31506F,
    rom_sync_value=0x20120707,
    rom_begin_words=5,
    security_info=_C3_SECURITY,
    spi_base=0x60002000,
    spi_usr=0x18,
    spi_usr1=0x1C,
    spi_usr2=0x20,
    spi_mosi_dlen=0x24,
    spi_miso_dlen=0x28,
    spi_w0=0x58,
    spi_addr_msb=False,
    uart_clkdiv_reg=0x60000014,
    oui=bytes.fromhex("58cf79"),
    rom_header="ESP-ROM:esp32c3-api1-20210207\r\nBuild:Feb  7 2021\r\n",
    fixed_registers=(),
    mac_reg=0x60008844,
    # v0.4: what C3 modules on sale carry (errata: v0.0-v0.4, v1.1); ESP-IDF 5 builds require
    # v0.3 or later (CONFIG_ESP32C3_REV_MIN_FULL = 3).
    default_revision=4,
    download_boot=_ESP32_DOWNLOAD,
    rtc_wdt=(0x600080A8, 0x60008090),
)

ESP32S3 = ChipSpec(
    name="esp32s3",
    magic=0x00000009,  # esptool 5.x identifies the S3 by chip id (USES_MAGIC_VALUE = False)
    rom_sync_value=0x20120707,  # real S3 ROM SYNC trace (ESP ROM protocol note)
    rom_begin_words=5,
    security_info=_S3_SECURITY,
    spi_base=0x60002000,
    spi_usr=0x18,
    spi_usr1=0x1C,
    spi_usr2=0x20,
    spi_mosi_dlen=0x24,
    spi_miso_dlen=0x28,
    spi_w0=0x58,
    spi_addr_msb=False,
    uart_clkdiv_reg=0x60000014,
    oui=bytes.fromhex("f412fa"),
    rom_header="ESP-ROM:esp32s3-20210327\r\nBuild:Mar 27 2021\r\n",
    fixed_registers=(),
    mac_reg=0x60007044,
    default_revision=2,  # v0.2, the current ESP32-S3 revision (errata: v0.0, v0.1, v0.2)
    download_boot="boot:0x0 (DOWNLOAD(USB/UART0))",
    rtc_wdt=(0x600080B0, 0x60008098),
)

ESP32C6 = ChipSpec(
    name="esp32c6",
    magic=0x2CE0806F,  # unused by esptool 5.x (chip id detection)
    rom_sync_value=0x20120707,
    rom_begin_words=5,
    security_info=_C6_SECURITY,
    spi_base=0x60003000,
    spi_usr=0x18,
    spi_usr1=0x1C,
    spi_usr2=0x20,
    spi_mosi_dlen=0x24,
    spi_miso_dlen=0x28,
    spi_w0=0x58,
    spi_addr_msb=False,
    uart_clkdiv_reg=0x60000014,
    oui=bytes.fromhex("404cca"),
    rom_header="ESP-ROM:esp32c6-20220919\r\nBuild:Sep 19 2022\r\n",
    fixed_registers=(),
    mac_reg=0x600B0844,
    # v0.1: the revision ESP32-C6 modules ship with (errata: v0.0, v0.1, v0.2).
    default_revision=1,
    download_boot="boot:0x4 (DOWNLOAD(USB/UART0/SDIO_FEI_FEO))",
    mac_ext=0xFFFE,
)

CHIP_SPECS: Mapping[str, ChipSpec] = MappingProxyType(
    {spec.name: spec for spec in (ESP32, ESP32S2, ESP32C3, ESP32S3, ESP32C6)}
)


def chip_spec(chip: str | ChipSpec) -> ChipSpec:
    """The spec for ``chip`` ("esp32", "esp32s2", "esp32c3"; a ChipSpec passes through)."""
    if isinstance(chip, ChipSpec):
        return chip
    try:
        return CHIP_SPECS[chip.lower().replace("-", "")]
    except (KeyError, AttributeError):
        raise ValueError(
            f"unknown chip {chip!r}; the virtual rack simulates {', '.join(CHIP_SPECS)}"
        ) from None


def _esp32_mac_crc(mac: bytes) -> int:
    # CRC-8 (reflected poly 0x8C) that the ESP32 stores next to its factory MAC; esptool
    # ignores it, espefuse checks it. Six bytes, so the per-byte loop costs nothing.
    crc = 0
    for byte in mac:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8C if crc & 1 else crc >> 1
    return crc


def _revision_fields(spec: ChipSpec) -> tuple[tuple[int, int, int], ...]:
    """Where ``spec``'s revision lives: ``(register, bit, width)`` for major then minor parts.

    From esptool's ``get_major_chip_version`` / ``get_minor_chip_version`` (ESP32 is special:
    its major number is a 3-bit code spread over two eFuse words and APB_CTL_DATE, see
    revision_registers).
    """
    b1 = spec.mac_reg  # EFUSE_BLOCK1 on every chip but the ESP32
    if spec.name == "esp32s2":
        # major word3[19:18]; minor = word3[20] << 3 | word4[6:4]
        return ((b1 + 12, 18, 2), (b1 + 12, 20, 1), (b1 + 16, 4, 3))
    if spec.name in ("esp32c3", "esp32s3"):
        # major word5[25:24]; minor = word5[23] << 3 | word3[20:18]
        return ((b1 + 20, 24, 2), (b1 + 20, 23, 1), (b1 + 12, 18, 3))
    if spec.name == "esp32c6":
        # major word3[23:22]; minor word3[21:18]
        return ((b1 + 12, 22, 2), (b1 + 12, 18, 4))
    raise ValueError(f"no revision fields for {spec.name}")


# ESP32 major revision -> (word3 bit 15, word5 bit 20, APB_CTL_DATE bit 31), esptool's table.
_ESP32_MAJOR_BITS = {0: (0, 0, 0), 1: (1, 0, 0), 2: (1, 1, 0), 3: (1, 1, 1)}


def check_revision(chip: str | ChipSpec, revision: int) -> None:
    """Raise ValueError unless ``revision`` (major * 100 + minor) fits ``chip``'s eFuse fields."""
    spec = chip_spec(chip)
    major, minor = divmod(revision, 100)
    if spec.name == "esp32":
        ok = major in _ESP32_MAJOR_BITS and 0 <= minor <= 3
    else:
        fields = _revision_fields(spec)
        minor_bits = sum(width for _, _, width in fields[1:])
        ok = 0 <= major < (1 << fields[0][2]) and 0 <= minor < (1 << minor_bits)
    if revision < 0 or not ok:
        raise ValueError(f"revision v{major}.{minor} cannot be encoded in {spec.esptool_name} "
                         "eFuses")


def revision_registers(chip: str | ChipSpec, revision: int) -> dict[int, int]:
    """Register bits that make esptool (and ESP-IDF) read ``revision`` (major*100+minor).

    Returned words hold only the revision bits: OR them into the board's other words.
    """
    spec = chip_spec(chip)
    check_revision(spec, revision)
    major, minor = divmod(revision, 100)
    regs: dict[int, int] = {}

    def put(addr: int, bit: int, width: int, value: int) -> None:
        regs[addr] = regs.get(addr, 0) | ((value & ((1 << width) - 1)) << bit)

    if spec.name == "esp32":
        bit0, bit1, bit2 = _ESP32_MAJOR_BITS[major]
        put(_ESP32_EFUSE + 0x0C, 15, 1, bit0)
        put(_ESP32_EFUSE + 0x14, 20, 1, bit1)
        put(_ESP32_APB_CTL_DATE, 31, 1, bit2)
        put(_ESP32_EFUSE + 0x14, 24, 2, minor)
        return regs
    fields = _revision_fields(spec)
    put(*fields[0], major)
    rest = minor
    for addr, bit, width in reversed(fields[1:]):  # low part last in the tuple
        put(addr, bit, width, rest)
        rest >>= width
    return regs


def efuse_registers(chip: str | ChipSpec, mac: bytes,
                    revision: int | None = None) -> dict[int, int]:
    """Read-only register words of one board (magic, eFuses incl. MAC and revision); absent
    words read 0.

    Returns a fresh dict the caller may keep. MAC encoding: ESP32 ``BE(word2)[2:4] + BE(word1)``
    (word2's upper half is a CRC); the others ``BE(reg + 4)[2:4] + BE(reg)``. ``revision``
    defaults to the chip's current silicon (``ChipSpec.default_revision``).
    """
    spec = chip_spec(chip)
    if len(mac) != 6:
        raise ValueError(f"a MAC has 6 bytes, got {len(mac)}")
    regs = dict(spec.fixed_registers)
    regs[CHIP_DETECT_MAGIC_REG] = spec.magic
    low_reg, high_reg = spec.mac_words
    regs[low_reg] = int.from_bytes(mac[2:6], "big")
    high = int.from_bytes(mac[0:2], "big") | (spec.mac_ext << 16)
    if spec.name == "esp32":
        high |= _esp32_mac_crc(mac) << 16
    regs[high_reg] = high
    rev = spec.default_revision if revision is None else revision
    for addr, bits in revision_registers(spec, rev).items():
        regs[addr] = regs.get(addr, 0) | bits
    return regs


def mac_for(board_id: str, chip: str | ChipSpec) -> bytes:
    """A stable MAC for ``board_id``: the chip's Espressif OUI + 3 bytes of SHA-256(id).

    Unique in practice (24 hash bits) and the same on every run, so tests can pin it.
    """
    spec = chip_spec(chip)
    return spec.oui + hashlib.sha256(board_id.encode("utf-8")).digest()[:3]


def rom_banner(
    chip: str | ChipSpec, download: bool, *, reset_reason: str = "0x1 (POWERON_RESET)"
) -> str:
    """What the ROM prints when the chip leaves reset (download mode or SPI boot).

    esptool looks for ``boot:(0x..)(.*waiting for download)?`` in it. The SPI-boot text is only
    the ROM's first lines; the bootloader's log follows it.
    """
    spec = chip_spec(chip)
    if download:
        boot = f"{spec.download_boot}\r\nwaiting for download\r\n"
    else:
        boot = "boot:0x13 (SPI_FAST_FLASH_BOOT)\r\n"
    return f"{spec.rom_header}rst:{reset_reason},{boot}"


def jedec_id_for_size(size: int) -> int:
    """RDID answer (``mfr | type << 8 | capacity << 16``) of a Winbond W25Q part of ``size``.

    W25Q16/32/64/128 give 0x1540EF/0x1640EF/0x1740EF/0x1840EF; esptool maps the capacity byte
    back to the size.
    """
    if size < 0x40000 or size > 0x4000000 or size & (size - 1):
        raise ValueError(f"flash size must be a power of two from 256 KiB to 64 MiB, got {size}")
    return 0xEF | (0x40 << 8) | ((size.bit_length() - 1) << 16)


def sfdp_table(size: int) -> bytes:
    """A minimal JEDEC SFDP area: header, one parameter header, basic table with the density."""
    header = b"SFDP" + bytes([0x06, 0x01, 0x00, 0xFF])  # rev 1.6, 1 header, legacy protocol
    param_header = bytes([0x00, 0x06, 0x01, 0x10, 0x30, 0x00, 0x00, 0xFF])  # 16 dwords @0x30
    basic = struct.pack("<II", 0xFFF120E5, size * 8 - 1)  # 4 KiB erase, density in bits - 1
    table = header + param_header
    return table + b"\xff" * (0x30 - len(table)) + basic + b"\xff" * 56
