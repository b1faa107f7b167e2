"""Flashing ESP32-family boards through esptool 5's Python API.

``plan`` builds and checks :class:`FlashPlan` records (from images, build directories and
``flasher_args.json``); ``session`` runs the esptool session that compares, writes and
verifies; ``log`` routes esptool's output per flash. The names below are the public face.
"""

from pytest_hilfarm.drivers.flashing.log import esptool_log
from pytest_hilfarm.drivers.flashing.plan import (
    APP_OFFSET,
    FLASH_MODES,
    SECTOR,
    FlashPlan,
    Region,
    check_plan,
    make_plan,
)
from pytest_hilfarm.drivers.flashing.session import (
    FlashJob,
    FlashReport,
    ProgressFn,
    RegionProgress,
    RegionResult,
    check_chip_revision,
    flash,
    flash_many,
    read_md5,
)

__all__ = [
    "APP_OFFSET",
    "FLASH_MODES",
    "FlashJob",
    "FlashPlan",
    "FlashReport",
    "ProgressFn",
    "Region",
    "RegionProgress",
    "RegionResult",
    "SECTOR",
    "check_chip_revision",
    "check_plan",
    "esptool_log",
    "flash",
    "flash_many",
    "make_plan",
    "read_md5",
]
