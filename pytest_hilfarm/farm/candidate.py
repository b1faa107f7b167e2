"""The candidate firmware of a run, resolved and checked once, before any board is touched.

Job: turn what a user named (an app image, an ESP-IDF build directory or its flasher_args.json,
``CHIP=PATH`` per chip, a ``{chip: path}`` mapping, bytes, a FlashPlan) into one
:class:`Candidate`: a checked flash plan per chip it was built for, plus the place the value came
from (``option --hil-firmware``, an ini key, a variable, a marker). Everything that can be known
without a board is checked here: every image's magic byte, header, segment table, checksum and
appended SHA-256, its chip id, a partition table that parses (with its MD5), and each image
against its partition. What needs the board (its chip revision, its flash size) is checked by the
flasher after it connects and before it writes.

The chips a candidate exists for are what allocation filters on: a request without a chip gets a
board the firmware can run on. Must not: open ports, reserve boards, import pytest.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from pytest_hilfarm.description.rack import BoardSpec
from pytest_hilfarm.description.settings import ImageSpec
from pytest_hilfarm.drivers.flashing import FlashPlan, Region, check_plan, make_plan
from pytest_hilfarm.drivers.flashing.builds import detect as detect_build
from pytest_hilfarm.errors import HilfarmError, ImageError, UsageError
from pytest_hilfarm.esp.chips import BOOTLOADER_OFFSETS
from pytest_hilfarm.esp.image import AppImage, chip_for_id, parse_image
from pytest_hilfarm.esp.partitions import PartitionTable

PARTITION_MAGIC = b"\xaa\x50"
# Roles (flasher_args.json entry names, or partition labels) whose bytes are not images.
_DATA_ROLES = frozenset({"otadata", "nvs", "phy_init", "spiffs", "fat", "storage", "coredump",
                         "nvs_keys", "efuse", "littlefs"})


@dataclass(frozen=True)
class AppIdentity:
    """What an app image says it is (its ``esp_app_desc_t``); empty strings when it has none."""

    project: str = ""
    version: str = ""
    idf_version: str = ""
    min_chip_rev_full: int = 0
    max_chip_rev_full: int = 0xFFFF

    def describe(self) -> str:
        if not self.project and not self.version:
            return "app without a descriptor"
        return f"{self.project} {self.version}".strip()


@dataclass(frozen=True)
class Candidate:
    """Candidate firmware, checked: one flash plan per chip, and where the value came from.

    ``source`` names the setting (``option --hil-firmware``, ``ini hil_firmware in pytest.ini``,
    ``environment HILFARM_FIRMWARE``, ``marker @pytest.mark.hil on TEST``, ``firmware
    argument``): errors about the candidate quote it.
    """

    plans: Mapping[str, FlashPlan] = field(hash=False)
    source: str = "firmware argument"
    identities: Mapping[str, AppIdentity] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    # The ELF each chip's build left (for decoding panics), where the build has one.
    elves: Mapping[str, Path] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    @property
    def chips(self) -> frozenset[str]:
        """The chips this candidate was built for (a request without a chip picks among them)."""
        return frozenset(self.plans)

    def plan_for(self, chip: str) -> FlashPlan | None:
        return self.plans.get(chip)

    def require(self, chip: str, where: str) -> FlashPlan:
        """The plan for ``chip``, or an ImageError saying which chips the candidate is for."""
        plan = self.plans.get(chip)
        if plan is None:
            raise ImageError(
                f"the candidate firmware ({self.source}) is built for "
                f"{_chip_list(self.chips)}, not for {chip}",
                where=where,
                hint=f"add a build for {chip} ({chip}=PATH), or ask for a board the firmware "
                f"exists for",
            )
        return plan

    def digest(self, chip: str) -> str | None:
        plan = self.plans.get(chip)
        return plan_digest(plan) if plan is not None else None

    def describe(self) -> str:
        """``esp32: mesh-demo 2.4.0 (build/); esp32c3: ...`` for report headers."""
        parts = []
        for chip in sorted(self.plans):
            ident = self.identities.get(chip, AppIdentity())
            parts.append(f"{chip}: {ident.describe()} ({self.plans[chip].source})")
        return "; ".join(parts)


def plan_digest(plan: FlashPlan) -> str:
    """One SHA-256 over a plan's regions (offset + content), for reports and results."""
    h = hashlib.sha256()
    for region in plan.regions:
        h.update(region.offset.to_bytes(4, "little"))
        h.update(bytes.fromhex(region.sha256))
    return h.hexdigest()


def _chip_list(chips: frozenset[str] | Sequence[str]) -> str:
    names = sorted(chips)
    return names[0] + " only" if len(names) == 1 else ", ".join(names)


def resolve_candidate(firmware: object, *, source: str = "firmware argument",
                      base_dir: Path | None = None,
                      default_chip: str | None = None) -> Candidate | None:
    """Resolve and check candidate firmware; None when there is none.

    ``default_chip`` is the chip of a plan that holds no image at all (only data regions given
    as offset/file pairs, such as an NVS partition), which cannot say what it was built for.

    Raises :class:`ImageError` (a usage error: nothing was touched) naming the file and
    ``source`` for a path that does not exist or cannot be read, a file that is not an ESP image,
    a corrupt image, a chip mismatch, a partition table that does not parse or an image larger
    than its partition.
    """
    if firmware is None:
        return None
    if isinstance(firmware, Candidate):
        return firmware
    items: list[tuple[str | None, object]]
    if isinstance(firmware, ImageSpec):
        items = ([(None, firmware.any_chip)] if firmware.any_chip is not None else [])
        items += list(firmware.by_chip.items())
    elif isinstance(firmware, Mapping):
        items = [(str(chip), path) for chip, path in firmware.items()]
    else:
        items = [(None, firmware)]
    if not items:
        return None
    plans: dict[str, FlashPlan] = {}
    identities: dict[str, AppIdentity] = {}
    elves: dict[str, Path] = {}
    for wanted, what in items:
        if base_dir is not None and isinstance(what, str | os.PathLike) \
                and not Path(what).is_absolute():
            what = base_dir / Path(what)
        plan, elf = _plan(what, source)
        chip = _checked_chip(plan, wanted or _data_only_chip(plan, default_chip), source)
        if chip in plans:
            raise ImageError(
                f"two candidate builds for {chip}: {plans[chip].source} and {plan.source}",
                where=source,
                hint=f"give one build per chip (CHIP=PATH); this one is built for {chip}",
            )
        identities[chip] = check_images(plan, chip, source=source)
        plans[chip] = plan
        if elf is not None:
            elves[chip] = elf
    return Candidate(MappingProxyType(plans), source, MappingProxyType(identities),
                     MappingProxyType(elves))


def _plan(what: object, source: str) -> tuple[FlashPlan, Path | None]:
    """The flash plan of what the user named, and its build's ELF when there is one."""
    try:
        if isinstance(what, str | os.PathLike):
            build = detect_build(os.fspath(what))
            return build.plan, build.elf
        return make_plan(what), None  # type: ignore[arg-type]
    except ImageError as exc:
        raise ImageError(exc.what, where=f"{exc.where or what} (from {source})",
                         hint=exc.hint) from None
    except UsageError as exc:
        raise UsageError(exc.what, where=f"{exc.where} (from {source})", hint=exc.hint) from None


def plan_chip(plan: FlashPlan) -> str | None:
    """The chip a plan was built for: the build's own word, else its app's or bootloader's."""
    if plan.chip:
        return plan.chip
    for region in sorted(plan.regions, key=lambda r: (r.role != "app", r.offset)):
        if region.data[:1] == b"\xe9" and len(region.data) >= 24:
            return chip_for_id(int.from_bytes(region.data[12:14], "little")) or \
                f"unknown chip id {int.from_bytes(region.data[12:14], 'little')}"
    return None


def _data_only_chip(plan: FlashPlan, default_chip: str | None) -> str | None:
    if default_chip is None or plan.chip is not None:
        return None
    if any(r.role == "app" or r.data[:1] == b"\xe9" for r in plan.regions):
        return None
    return default_chip


def _checked_chip(plan: FlashPlan, wanted: str | None, source: str) -> str:
    chip = plan_chip(plan)
    if chip is None and wanted is not None and _data_only_chip(plan, wanted):
        return wanted
    if chip is None:
        region = plan.regions[0]
        raise ImageError(
            f"not an ESP image: the first byte is 0x{region.data[0]:02x}, not the image magic "
            "0xe9 (nothing was flashed)",
            where=f"{region.name} (from {source})",
            hint="pass an app image (.bin from `idf.py build`), an ESP-IDF build directory or "
            "its flasher_args.json",
        )
    if chip.startswith("unknown chip id"):
        raise ImageError(
            f"the image is built for {chip}, which esptool does not know (nothing was flashed)",
            where=f"{plan.source} (from {source})",
            hint="check that the file is an ESP image for a supported chip",
        )
    if wanted is not None and wanted != chip:
        raise ImageError(
            f"given as the {wanted} build, but it is built for {chip} (nothing was flashed)",
            where=f"{plan.source} (from {source})",
            hint=f"write {chip}=PATH, or build it for {wanted} (`idf.py set-target {wanted}`)",
        )
    return chip


def _role(region: Region, chip: str) -> str:
    if region.data[:2] == PARTITION_MAGIC or region.role == "partition-table":
        return "partition-table"
    if region.role == "bootloader" or region.offset == BOOTLOADER_OFFSETS.get(chip, -1):
        return "bootloader"
    if region.role in _DATA_ROLES:
        return "data"
    if region.role in ("app", "factory", "test") or (region.role or "").startswith("ota_"):
        return "app"
    # A file at an offset the build did not name: an image if it looks like one.
    return "app" if region.data[:1] == b"\xe9" else "data"


def check_images(plan: FlashPlan, chip: str, *, source: str = "firmware argument"
                 ) -> AppIdentity:
    """Check every image and the partition table of ``plan`` for ``chip``; return the app's id.

    Raises :class:`ImageError` naming the file, the offset and ``source``.
    """
    identity = AppIdentity()
    try:
        check_plan(plan, chip)  # chip ids, overlaps, sizes against partitions and flash size
    except HilfarmError as exc:
        raise type(exc)(exc.what, where=f"{exc.where} (from {source})", hint=exc.hint) from None
    for region in plan.regions:
        role = _role(region, chip)
        where = f"{region.name}, at flash offset {region.offset:#x} (from {source})"
        if role == "partition-table":
            try:
                PartitionTable.decode(region.data, verify_md5=True).validate()
            except ImageError as exc:
                raise ImageError(f"the partition table does not parse: {exc.what}"
                                 + (f" ({exc.where})" if exc.where else ""), where=where,
                                 hint="regenerate it with `idf.py partition-table` (nothing "
                                 "was flashed)") from None
            continue
        if role == "data":
            continue
        image = _parse(region, chip, role, where)
        if role == "app" and image.app_desc is not None:
            desc = image.app_desc
            identity = AppIdentity(desc.project_name, desc.version, desc.idf_ver,
                                   image.header.min_chip_rev_full,
                                   image.header.max_chip_rev_full)
        elif role == "app" and not identity.project:
            identity = AppIdentity(min_chip_rev_full=image.header.min_chip_rev_full,
                                   max_chip_rev_full=image.header.max_chip_rev_full)
    return identity


def _parse(region: Region, chip: str, role: str, where: str) -> AppImage:
    try:
        return parse_image(region.data, chip=chip, verify=True)
    except ImageError as exc:
        what = "bootloader" if role == "bootloader" else "app image"
        raise ImageError(
            f"the {what} is not a valid {chip} image: {exc.what}"
            + (f" ({exc.where})" if exc.where else ""),
            where=where,
            hint=(exc.hint + "; " if exc.hint else "")
            + "rebuild the firmware (`idf.py build`) and pass its build directory; nothing "
            "was flashed",
        ) from None


def revision_text(full: int) -> str:
    """Esptool's words for a full revision number (major * 100 + minor): ``v0.3``."""
    return f"v{full // 100}.{full % 100}"


__all__ = ["AppIdentity", "Candidate", "check_images", "plan_chip", "plan_digest",
           "resolve_candidate", "revision_text"]


def firmware_plan(candidate: Candidate | None, board: BoardSpec) -> FlashPlan | None:
    """The candidate's plan for this board's chip (ImageError naming the board if it has none)."""
    if candidate is None:
        return None
    return candidate.require(board.chip, where=f"board {board.id}")
