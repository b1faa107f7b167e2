"""The chip table: one record per ESP32-family chip esptool 5 supports, and the farm's chips.

Names (the rack file's and esptool's ``--chip``), image chip ids, second-stage bootloader
offsets, flash-mapped windows, USB-Serial/JTAG support and the SPI flash clocks come from
esptool's own target classes (``esptool.targets.CHIP_DEFS``) and image classes, so a new
esptool brings its numbers along. ``FARM_CHIPS`` are the chips a rack file may name: the ones
the virtual rack models and the suite tests. This module does no I/O and knows nothing of
boards, racks or the simulator.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from pytest_hilfarm.errors import ImageError

if TYPE_CHECKING:
    from esptool.bin_image import ESP32FirmwareImage

K = TypeVar("K")
V = TypeVar("V")

# The chips a rack may name (and the virtual rack simulates), in the order the docs list them.
FARM_CHIPS = ("esp32", "esp32s2", "esp32c3", "esp32s3", "esp32c6")

# ESP-IDF's IDF_TARGET_ARCH_XTENSA targets; every chip after them has RISC-V cores.
_XTENSA = ("esp32", "esp32s2", "esp32s3")
# ESP-IDF's sdkconfig default for ESPTOOLPY_FLASHFREQ: the clock a build of that chip writes
# into its image header unless the project changes it. Known for the farm's chips only.
_DEFAULT_FLASH_FREQ = {"esp32": "40m", "esp32s2": "80m", "esp32c3": "80m", "esp32s3": "80m",
                       "esp32c6": "80m"}


# Width of the anti-rollback eFuse field (SECURE_VERSION) in bits; 16 on the chips not listed.
# The counter is stored as set bits, so a secure_version above the width can never be burned.
_SECURE_VERSION_BITS = {"esp32": 32, "esp32c2": 4, "esp32c5": 9}


@dataclass(frozen=True)
class Chip:
    """What the farm needs to know about one chip family (all from esptool's tables)."""

    name: str  # "esp32c3": rack files, esptool --chip
    esptool_name: str  # "ESP32-C3": esptool's CHIP_NAME, as detect_chip reports it
    image_chip_id: int  # esp_image_header_t.chip_id (bytes 12-13 of an image)
    bootloader_offset: int  # where the second-stage bootloader lives in flash
    irom_start: int  # flash-mapped instruction window [irom_start, irom_end)
    irom_end: int
    drom_start: int  # flash-mapped data window [drom_start, drom_end)
    drom_end: int
    usb_serial_jtag: bool  # has the built-in USB-Serial/JTAG peripheral
    architecture: str  # "xtensa" or "riscv": what its panics and ELF files look like
    flash_freqs: tuple[str, ...]  # SPI flash clocks its image header can name
    default_flash_freq: str | None  # ESP-IDF's default for this chip; None where not modelled
    image_class: type[ESP32FirmwareImage]  # esptool's image class for this chip
    secure_version_bits: int  # width of the anti-rollback eFuse field

    def is_irom(self, addr: int) -> bool:
        return self.irom_start <= addr < self.irom_end

    def is_drom(self, addr: int) -> bool:
        return self.drom_start <= addr < self.drom_end

    def is_mapped(self, addr: int) -> bool:
        return self.is_irom(addr) or self.is_drom(addr)


def _build() -> dict[str, Chip]:
    from esptool import bin_image
    from esptool.targets import CHIP_DEFS

    chips = {}
    for name, rom in CHIP_DEFS.items():
        # esptool names each image class after its ROM class (ESP32C3ROM -> ESP32C3FirmwareImage)
        image_class = getattr(bin_image, rom.__name__.replace("ROM", "FirmwareImage"), None)
        if image_class is None or not issubclass(image_class, bin_image.ESP32FirmwareImage):
            continue  # the ESP8266: no ESP32-style image, not a farm chip
        chips[name] = Chip(
            name=name,
            esptool_name=rom.CHIP_NAME,
            image_chip_id=int(rom.IMAGE_CHIP_ID),
            bootloader_offset=int(rom.BOOTLOADER_FLASH_OFFSET),
            irom_start=rom.IROM_MAP_START,
            irom_end=rom.IROM_MAP_END,
            drom_start=rom.DROM_MAP_START,
            drom_end=rom.DROM_MAP_END,
            usb_serial_jtag=bool(rom.USB_SERIAL_JTAG_SUPPORTED),
            architecture="xtensa" if name in _XTENSA else "riscv",
            flash_freqs=tuple(rom.FLASH_FREQUENCY),
            default_flash_freq=_DEFAULT_FLASH_FREQ.get(name),
            image_class=image_class,
            secure_version_bits=_SECURE_VERSION_BITS.get(name, 16),
        )
    return chips


class _Table(Mapping[K, V]):
    """A read-only mapping built from esptool's classes on first use.

    Importing esptool costs tens of milliseconds; a rack file or the pytest plugin that never
    needs more than :data:`FARM_CHIPS` should not pay it in every process.
    """

    def __init__(self, value: Callable[[Chip], V], key: Callable[[Chip], K]) -> None:
        self._value = value
        self._key = key
        self._data: dict[K, V] | None = None

    def _items(self) -> dict[K, V]:
        if self._data is None:
            self._data = {self._key(c): self._value(c) for c in _chips().values()}
        return self._data

    def __getitem__(self, key: K) -> V:
        return self._items()[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())


@functools.cache
def _chips() -> dict[str, Chip]:
    return _build()


def _itself(c: Chip) -> Chip:
    return c


CHIPS: Mapping[str, Chip] = _Table(_itself, lambda c: c.name)
# Where each chip's second-stage bootloader lives (an index of the table, for look-ups by name).
BOOTLOADER_OFFSETS: Mapping[str, int] = _Table(lambda c: c.bootloader_offset, lambda c: c.name)
_BY_IMAGE_ID: Mapping[int, Chip] = _Table(_itself, lambda c: c.image_chip_id)
_BY_ESPTOOL_NAME: Mapping[str, Chip] = _Table(_itself, lambda c: c.esptool_name)


def chip(name: str) -> Chip:
    """The record of a chip name ("esp32c3"); ImageError naming the known ones otherwise."""
    try:
        return CHIPS[name]
    except KeyError:
        raise ImageError(f"unsupported chip {name!r}",
                         hint=f"use one of {', '.join(sorted(CHIPS))}") from None


def chip_id_of(name: str) -> int:
    """``esp_chip_id_t`` of a chip name (esptool ``ROM_LOADER.IMAGE_CHIP_ID``)."""
    return chip(name).image_chip_id


def chip_for_id(chip_id: int) -> str | None:
    """Chip name for an image chip_id, or None when no chip has it."""
    found = _BY_IMAGE_ID.get(chip_id)
    return found.name if found else None


def chip_for_esptool_name(esptool_name: str) -> str | None:
    """The rack name ("esp32c3") of esptool's chip name ("ESP32-C3"), or None."""
    found = _BY_ESPTOOL_NAME.get(esptool_name)
    return found.name if found else None


def parse_revision(text: str | int | float) -> int:
    """A chip revision as ESP-IDF and esptool count it (major * 100 + minor).

    ``"v0.4"``, ``"0.4"``, ``"v3.1"`` -> 4, 4, 301; an int passes as major*100+minor.
    """
    if isinstance(text, bool):
        raise ValueError(f"revision {text!r} is not a chip revision like v0.4")
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*v?(\d+)\.(\d+)\s*", str(text))
    if not match:
        raise ValueError(f"revision {text!r} is not a chip revision like v0.4 or v3.1")
    return int(match.group(1)) * 100 + int(match.group(2))


def format_revision(revision: int) -> str:
    return f"v{revision // 100}.{revision % 100}"
