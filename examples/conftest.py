"""Example suite set-up: build the candidate firmware with the virtual rack's app builder.

On a real rig, pass your own build instead: ``pytest examples/ --hil-rack my-rig.yaml
--hil-firmware build/`` (an ESP-IDF build directory, an app image, or ``CHIP=PATH`` per chip).
Without ``--hil-firmware`` these examples build ESP-IDF-format images of the demo app for
every chip, so the suite runs on the built-in virtual rack with nothing else installed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pytest_hilfarm.description.settings import ImageSpec
from pytest_hilfarm.ota.keys import generate_signing_key, key_digest
from pytest_hilfarm.ota.signing import load_signing_keys, sign_image
from pytest_hilfarm.sim.appbuild import build_app, write_build_dir
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


# --- the mesh (examples/test_mesh.py, examples/test_network.py) ----------------------------------


def mesh_size(dev: Any) -> int:
    """How many nodes ``dev``'s mesh has, itself included (``esp_mesh_get_total_node_num()``)."""
    match = re.search(r"nodes: (\d+)", dev.command("mesh nodes"))
    assert match is not None, "the app's `mesh nodes` reply has no `nodes:` line"
    return int(match.group(1))


def wait_for_mesh(devices: Sequence[Any], limit: float = 30.0) -> float:
    """Wait until every board counts all of ``devices`` in its mesh; return the seconds taken."""
    start = time.monotonic()
    for dev in devices:
        left = max(limit - (time.monotonic() - start), 0.0)
        dev.wait_for("mesh nodes", rf"nodes: {len(devices)}\b", timeout=left)
    return time.monotonic() - start


# --- OTA firmware (examples/test_ota.py, examples/test_network.py) -----------------------------

OTA_CHIP = "esp32c3"
OTA_PROJECT = "ota-demo"


@dataclass(frozen=True)
class OtaFirmware:
    """A two-OTA base build (factory app 1.0.0, secure_version 1, signed) and update images."""

    base: Path  # build dir for the marker's firmware=
    key_digest: str  # hex digest of the release key (what eFuse trusts)
    images: dict[str, Path]  # name -> signed (or deliberately broken) update image


@pytest.fixture(scope="session")
def ota_firmware(tmp_path_factory: pytest.TempPathFactory) -> OtaFirmware:
    """Keys made once per session (pytest_hilfarm.ota.keys) and the images signed with them."""
    root = tmp_path_factory.mktemp("ota-firmware")
    release = generate_signing_key(root / "release.pem")
    rogue = generate_signing_key(root / "rogue.pem")
    signer, rogue_signer = load_signing_keys([release]), load_signing_keys([rogue])
    base = write_build_dir(root / "base", OTA_CHIP, OTA_PROJECT, "1.0.0", secure_version=1,
                           layout="two-ota")
    base.app_bin.write_bytes(sign_image(base.app_bin.read_bytes(), signer))

    def image(name: str, version: str, *, key: object = signer, **kwargs: object) -> Path:
        data = build_app(OTA_CHIP, OTA_PROJECT, version, **kwargs)  # type: ignore[arg-type]
        path = root / f"{name}.bin"
        path.write_bytes(sign_image(data, key) if key is not None else data)  # type: ignore
        return path

    images = {
        "good": image("good", "1.1.0", secure_version=1),
        "major": image("major", "2.0.0", secure_version=2),
        "self-test-fails": image("self-test-fails", "1.2.0", secure_version=1,
                                 faults=Faults(fail_self_test=True)),
        "downgrade": image("downgrade", "0.9.0", secure_version=0),
        "rogue": image("rogue", "1.1.0", key=rogue_signer, secure_version=1),
        "big": image("big", "1.3.0", secure_version=1, pad_to="384K"),
    }
    tampered = bytearray(images["good"].read_bytes())
    tampered[0x2000] ^= 0x01  # one bit inside the signed content
    images["tampered"] = root / "tampered.bin"
    images["tampered"].write_bytes(bytes(tampered))
    return OtaFirmware(base.path, key_digest(release).hex(), images)
