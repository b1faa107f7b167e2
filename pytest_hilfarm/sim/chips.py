"""Per-chip facts of the simulated ESP32, ESP32-S2 and ESP32-C3 that esptool 5.6 relies on.

Magic values, IMAGE_CHIP_ID, eFuse words (including where the MAC lives), SPI controller
registers, GET_SECURITY_INFO payloads, ROM banner text, bootloader offsets and the simulated
SPI flash's JEDEC id / SFDP table. Values come from esptool's target classes and real-chip traces
(see the ESP ROM protocol note). Everything here is constant data or pure functions: no I/O, no
state, nothing about how the loader uses it.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

CHIP_DETECT_MAGIC_REG = 0x40001000

# SPI_CMD_REG bit that starts a "user" command (esptool's SPI_CMD_USR).
SPI_CMD_USR = 1 << 18

FLASH_SECTOR = 0x1000


@dataclass(frozen=True)
class ChipSpec:
    """What one chip family looks like from the serial port."""

    name: str  # "esp32", as in the rack file and model.CHIPS
    esptool_name: str  # esptool's CHIP_NAME, "ESP32"
    magic: int  # word at CHIP_DETECT_MAGIC_REG
    image_chip_id: int  # IMAGE_CHIP_ID in app images and in GET_SECURITY_INFO
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
    bootloader_offset: int  # where the second-stage bootloader lives in flash
    oui: bytes  # Espressif OUI used for simulated MACs
    rom_header: str  # banner lines before the "rst:" line (CRLF line ends)
    # eFuse / peripheral words that are not zero (MAC words are added per board).
    fixed_registers: tuple[tuple[int, int], ...]

    @property
    def mac_words(self) -> tuple[int, int]:
        """Addresses of the eFuse words holding MAC bytes 2..5 and MAC bytes 0..1."""
        if self.name == "esp32":
            return (_ESP32_EFUSE + 4, _ESP32_EFUSE + 8)
        base = 0x3F41A044 if self.name == "esp32s2" else 0x60008844
        return (base, base + 4)


_ESP32_EFUSE = 0x3FF5A000

# ESP32: word3 = pkg 1 (D0WD) + rev bit0, word5 = rev bit1, APB_CTL_DATE bit31 = rev bit2
# -> "ESP32-D0WD-V3 (revision v3.0)". word4[7:0] (CK8M) and RTCCALICFG1 make esptool's
# ROM-calculated crystal exactly 40 MHz (800 * 15625 * 128 / 40), so the stub path agrees too.
_ESP32_FIXED = (
    (_ESP32_EFUSE + 0x0C, (1 << 9) | (1 << 15)),
    (_ESP32_EFUSE + 0x10, 128),
    (_ESP32_EFUSE + 0x14, 1 << 20),
    (0x3FF6607C, 1 << 31),
    (0x3FF5F06C, 800 << 7),
)

_S2_SECURITY = bytes(12)  # flags 0, crypt_cnt 0, 7 key purposes 0
_C3_SECURITY = bytes(12) + struct.pack("<II", 5, 0)  # + chip_id, api_version

ESP32 = ChipSpec(
    name="esp32",
    esptool_name="ESP32",
    magic=0x00F01D83,
    image_chip_id=0,
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
    bootloader_offset=0x1000,
    oui=bytes.fromhex("240ac4"),
    rom_header="ets Jun  8 2016 00:22:57\r\n\r\n",
    fixed_registers=_ESP32_FIXED,
)

ESP32S2 = ChipSpec(
    name="esp32s2",
    esptool_name="ESP32-S2",
    magic=0x000007C6,
    image_chip_id=2,
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
    bootloader_offset=0x1000,
    oui=bytes.fromhex("7cdfa1"),
    rom_header="ESP-ROM:esp32s2-rc4-20191025\r\nBuild:Oct 25 2019\r\n",
    fixed_registers=(),
)

ESP32C3 = ChipSpec(
    name="esp32c3",
    esptool_name="ESP32-C3",
    # esptool 5.x identifies the C3 by chip id, not magic; this is the real ECO3 ROM word.
    magic=0x1B31506F,
    image_chip_id=5,
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
    bootloader_offset=0x0,
    oui=bytes.fromhex("58cf79"),
    rom_header="ESP-ROM:esp32c3-api1-20210207\r\nBuild:Feb  7 2021\r\n",
    # EFUSE_RD_MAC_SPI_SYS_3 bits 20:18 = WAFER_VERSION_MINOR_LO: revision v0.4, as shipping
    # silicon (ECO3+) and the boot log say; ESP-IDF 5 images require v0.3 or later.
    fixed_registers=((0x60008844 + 12, 4 << 18),),
)

CHIP_SPECS: Mapping[str, ChipSpec] = MappingProxyType(
    {spec.name: spec for spec in (ESP32, ESP32S2, ESP32C3)}
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


def efuse_registers(chip: str | ChipSpec, mac: bytes) -> dict[int, int]:
    """Read-only register words of one board (magic, eFuses incl. MAC); absent words read 0.

    Returns a fresh dict the caller may keep. MAC encoding: ESP32 ``BE(word2)[2:4] + BE(word1)``
    (word2's upper half is a CRC); S2/C3 ``BE(reg + 4)[2:4] + BE(reg)``.
    """
    spec = chip_spec(chip)
    if len(mac) != 6:
        raise ValueError(f"a MAC has 6 bytes, got {len(mac)}")
    regs = dict(spec.fixed_registers)
    regs[CHIP_DETECT_MAGIC_REG] = spec.magic
    low_reg, high_reg = spec.mac_words
    regs[low_reg] = int.from_bytes(mac[2:6], "big")
    high = int.from_bytes(mac[0:2], "big")
    if spec.name == "esp32":
        high |= _esp32_mac_crc(mac) << 16
    regs[high_reg] = high
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
        boot = "boot:0x3 (DOWNLOAD_BOOT(UART0/UART1/SDIO_REI_REO_V2))\r\nwaiting for download\r\n"
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
