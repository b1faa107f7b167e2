"""Example suite set-up: build the candidate firmware with the virtual rack's app builder.

On a real rig, pass your own build instead: ``pytest examples/ --hil-rack my-rig.yaml
--hil-firmware build/`` (an ESP-IDF build directory, an app image, or ``CHIP=PATH`` per chip).
Without ``--hil-firmware`` these examples build ESP-IDF-format images of the demo app for
every chip, so the suite runs on the built-in virtual rack with nothing else installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_hilfarm.settings import ImageSpec
from pytest_hilfarm.sim.appbuild import write_build_dir
from pytest_hilfarm.sim.model import Faults

CHIPS = ("esp32", "esp32s2", "esp32c3")
PROJECT = "mesh-demo"
VERSION = "2.4.0"


def build(root: Path, name: str, chip: str, **kwargs: object) -> Path:
    """An ESP-IDF-like build directory (bootloader, partition table, app, flasher_args.json)."""
    out = root / f"{name}-{chip}"
    if not (out / "flasher_args.json").exists():
        write_build_dir(out, chip, kwargs.pop("project", PROJECT),  # type: ignore[arg-type]
                        kwargs.pop("version", VERSION), **kwargs)  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="session")
def candidate() -> dict[str, str]:
    """What the candidate firmware says it is (its esp_app_desc_t)."""
    return {"project": PROJECT, "version": VERSION}


@pytest.fixture(scope="session")
def firmware_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "example-firmware"


@pytest.fixture(scope="session")
def hil_firmware(hil_firmware: ImageSpec | None, firmware_dir: Path) -> ImageSpec:
    """The candidate: --hil-firmware if given, else the demo app built for every chip."""
    if hil_firmware is not None:
        return hil_firmware
    return ImageSpec(by_chip={chip: build(firmware_dir, "candidate", chip) for chip in CHIPS})


@pytest.fixture(scope="session")
def crashing_firmware(firmware_dir: Path) -> Path:
    """The demo app built with a crash at boot (a fault is a property of the image)."""
    return build(firmware_dir, "crash", "esp32", faults=Faults(crash_at_boot=True))
