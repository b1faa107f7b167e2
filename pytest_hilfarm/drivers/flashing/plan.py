"""Flash plans: the regions of bytes to write and the flash settings, built and checked.

A :class:`FlashPlan` (regions of bytes at offsets, plus flash mode/size/freq) is built from a
single app image, a list of (offset, file), or an ESP-IDF build directory / ``flasher_args.json``
(esptool-4 spellings are translated, never passed on). ``check_plan`` refuses, before any
connection, images built for another chip and images that do not fit the flash or their
partition: nothing is written on a mismatch. This module opens no port; image and partition
formats come from :mod:`pytest_hilfarm.esp`.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pytest_hilfarm.errors import ImageError, UsageError
from pytest_hilfarm.esp.chips import CHIPS
from pytest_hilfarm.esp.image import image_chip
from pytest_hilfarm.esp.partitions import MAGIC as PARTITION_MAGIC
from pytest_hilfarm.esp.partitions import Partition, flash_size_bytes, read_entries

APP_OFFSET = 0x10000  # the factory / first app partition in ESP-IDF's default tables
SECTOR = 0x1000
FLASH_MODES = ("qio", "qout", "dio", "dout", "keep")


@dataclass(frozen=True)
class Region:
    """Bytes to put at an offset. ``limit`` is the partition size the data must fit, if known."""

    offset: int
    data: bytes = field(repr=False)
    name: str
    role: str | None = None
    limit: int | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    @functools.cached_property
    def sha256(self) -> str:
        # Asked for on every test (store digests, reports): hashed once per region.
        return hashlib.sha256(self.data).hexdigest()


@dataclass(frozen=True)
class FlashPlan:
    """What to write: regions in offset order plus the flash settings for the bootloader header.

    ``chip`` is the target the plan was built for when the build says so (flasher_args.json);
    ``before``/``after`` are the build's reset hints, already in esptool-5 spelling.
    """

    regions: tuple[Region, ...]
    flash_mode: str = "keep"
    flash_size: str = "keep"
    flash_freq: str = "keep"
    chip: str | None = None
    source: str = ""
    before: str | None = None
    after: str | None = None

    @property
    def total_size(self) -> int:
        return sum(r.size for r in self.regions)

    @classmethod
    def from_image(
        cls,
        image: Path | str | bytes,
        offset: int = APP_OFFSET,
        *,
        partition_size: int | None = None,
        flash_mode: str = "keep",
        flash_size: str = "keep",
        flash_freq: str = "keep",
    ) -> FlashPlan:
        """One app image, to the app partition offset (0x10000 unless told)."""
        region = _region(offset, image, role="app", limit=partition_size)
        return _finish(cls((region,), flash_mode, flash_size, flash_freq, source=region.name))

    @classmethod
    def from_files(
        cls,
        pairs: Iterable[tuple[int | str, Path | str | bytes]],
        *,
        flash_mode: str = "keep",
        flash_size: str = "keep",
        flash_freq: str = "keep",
    ) -> FlashPlan:
        """A list of (offset, file or bytes); offsets may be ints or strings such as "0x8000"."""
        regions = [_region(_offset(o, "flash plan"), d) for o, d in pairs]
        if not regions:
            raise UsageError(
                "the flash plan is empty",
                where="flash plan",
                hint="give at least one (offset, file) pair",
            )
        source = ", ".join(r.name for r in regions)
        return _finish(cls(tuple(regions), flash_mode, flash_size, flash_freq, source=source))

    @classmethod
    def from_flasher_args(cls, path: Path | str) -> FlashPlan:
        """The ``flasher_args.json`` ESP-IDF writes into its build directory."""
        return _from_flasher_args(Path(path))

    @classmethod
    def from_build_dir(cls, path: Path | str) -> FlashPlan:
        """An ESP-IDF build directory (its ``flasher_args.json``)."""
        directory = Path(path)
        args = directory / "flasher_args.json"
        if not args.is_file():
            raise ImageError(
                "no flasher_args.json in this directory, so it is not an ESP-IDF build directory",
                where=str(directory),
                hint="run `idf.py build` first, or pass the app .bin file itself",
            )
        return _from_flasher_args(args)


def make_plan(what: FlashPlan | Path | str | bytes | Sequence[tuple[Any, Any]]) -> FlashPlan:
    """Build a plan from a plan, an image file, a build directory (ESP-IDF, Arduino CLI,
    PlatformIO), flasher_args.json, a merged image or (offset, file) pairs.
    """
    if isinstance(what, FlashPlan):
        return what
    if isinstance(what, bytes | bytearray):
        return FlashPlan.from_image(bytes(what))
    if isinstance(what, str | Path):
        # An ESP-IDF, Arduino CLI or PlatformIO build, a merged image or a plain app image:
        # recognised from the path (drivers/flashing/builds.py).
        from pytest_hilfarm.drivers.flashing.builds import plan_for

        return plan_for(what)
    if isinstance(what, Sequence):
        pairs = cast("list[tuple[Any, Any]]", list(what))
        return FlashPlan.from_files(pairs)
    raise UsageError(
        f"cannot flash a {type(what).__name__}",
        where="flash plan",
        hint="pass an image path, an ESP-IDF build directory, its flasher_args.json, "
        "a list of (offset, file) pairs or a FlashPlan",
    )


def _offset(value: int | str, where: str) -> int:
    if isinstance(value, int):
        return value
    try:
        return int(str(value), 0)
    except ValueError:
        raise ImageError(
            f"bad flash offset {value!r}",
            where=where,
            hint="write offsets as integers or hex strings such as '0x10000'",
        ) from None


def _region(
    offset: int, source: Path | str | bytes, *, role: str | None = None, limit: int | None = None
) -> Region:
    if isinstance(source, bytes | bytearray):
        return Region(offset, bytes(source), f"<{len(source)} bytes at {offset:#x}>", role, limit)
    path = Path(source)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(
            "the image file does not exist",
            where=str(path),
            hint="check the path (relative paths are taken from the current directory), "
            "or build the firmware first",
        ) from None
    except OSError as exc:
        raise ImageError(
            f"cannot read the image file: {exc.strerror or exc}",
            where=str(path),
            hint="check the file's permissions",
        ) from exc
    if not data:
        raise ImageError("the image file is empty", where=str(path), hint="rebuild the firmware")
    return Region(offset, data, str(path), role, limit)


def _finish(plan: FlashPlan) -> FlashPlan:
    """Sort regions, reject overlaps, attach partition sizes from a table in the plan."""
    if plan.flash_mode not in FLASH_MODES:
        raise ImageError(
            f"unknown flash mode {plan.flash_mode!r}",
            where=plan.source or "flash plan",
            hint=f"use one of {', '.join(FLASH_MODES)}",
        )
    regions = sorted(plan.regions, key=lambda r: r.offset)
    for before, after in zip(regions, regions[1:]):
        if before.offset + before.size > after.offset:
            raise ImageError(
                f"{before.name} ({before.offset:#x}..{before.offset + before.size:#x}) overlaps "
                f"{after.name} at {after.offset:#x}",
                where=plan.source or "flash plan",
                hint="fix the offsets, or check that the images belong to the same build",
            )
        # esptool erases whole 4 KiB sectors, so the second write would erase the first's tail.
        if (before.offset + before.size - 1) // SECTOR == after.offset // SECTOR:
            raise ImageError(
                f"{before.name} ends in the 4 KiB flash sector where {after.name} starts "
                f"({after.offset:#x}); writing one erases part of the other",
                where=plan.source or "flash plan",
                hint="place regions on 4 KiB (0x1000) boundaries",
            )
    table = next((r for r in regions if r.data[:2] == PARTITION_MAGIC), None)
    if table is not None:
        sizes = {p.offset: p for p in read_entries(table.data)}
        regions = [
            _with_limit(r, sizes[r.offset]) if r.offset in sizes and r.limit is None else r
            for r in regions
        ]
    return FlashPlan(
        tuple(regions),
        plan.flash_mode,
        plan.flash_size,
        plan.flash_freq,
        plan.chip,
        plan.source,
        plan.before,
        plan.after,
    )


def _with_limit(region: Region, part: Partition) -> Region:
    role = region.role or part.label
    return Region(region.offset, region.data, region.name, role, part.size)


# esptool 4 spellings found in flasher_args.json and their esptool 5 equivalents.
_RESET_SPELLINGS = {
    "default_reset": "default-reset",
    "no_reset": "no-reset",
    "no_reset_no_sync": "no-reset-no-sync",
    "usb_reset": "usb-reset",
    "hard_reset": "hard-reset",
    "soft_reset": "soft-reset",
    "no_reset_stub": "no-reset-stub",
    "watchdog_reset": "watchdog-reset",
}
_OPTION_SPELLINGS = {
    "--flash_mode": "flash_mode",
    "--flash-mode": "flash_mode",
    "-fm": "flash_mode",
    "--flash_size": "flash_size",
    "--flash-size": "flash_size",
    "-fs": "flash_size",
    "--flash_freq": "flash_freq",
    "--flash-freq": "flash_freq",
    "-ff": "flash_freq",
}


def _spelling5(value: str) -> str:
    """The esptool 5 spelling of a reset mode ("hard_reset" -> "hard-reset")."""
    return _RESET_SPELLINGS.get(value, value.replace("_", "-"))


def _from_flasher_args(path: Path) -> FlashPlan:
    where = str(path)
    try:
        args = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ImageError(
            "flasher_args.json does not exist",
            where=where,
            hint="run `idf.py build` first, or pass the app .bin file itself",
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ImageError(
            f"cannot read flasher_args.json: {exc}",
            where=where,
            hint="rebuild with `idf.py build` (the file may be truncated)",
        ) from exc
    files = args.get("flash_files")
    if not isinstance(files, dict) or not files:
        raise ImageError(
            "flasher_args.json has no 'flash_files'",
            where=where,
            hint="rebuild with `idf.py build`; the file must come from ESP-IDF",
        )
    settings = {"flash_mode": "keep", "flash_size": "keep", "flash_freq": "keep"}
    # "write_flash_args" is the CLI list (esptool-4 spellings); "flash_settings" the same as a
    # dict. Translate the list rather than pass it on: esptool 5 warns for each old spelling.
    argv = list(args.get("write_flash_args") or [])
    for flag, value in zip(argv, argv[1:]):
        key = _OPTION_SPELLINGS.get(flag)
        if key is not None:
            settings[key] = str(value)
    for key, value in (args.get("flash_settings") or {}).items():
        if key in settings and value:
            settings[key] = str(value)
    roles = {
        _offset(entry["offset"], where): name
        for name, entry in args.items()
        if isinstance(entry, dict) and "offset" in entry and "file" in entry
    }
    base = path.parent
    regions = []
    for offset_text, rel in files.items():
        offset = _offset(offset_text, where)
        regions.append(_region(offset, base / rel, role=roles.get(offset)))
    extra = args.get("extra_esptool_args") or {}
    chip = extra.get("chip")
    before = _spelling5(extra["before"]) if extra.get("before") else None
    after = _spelling5(extra["after"]) if extra.get("after") else None
    plan = FlashPlan(
        tuple(regions),
        settings["flash_mode"],
        settings["flash_size"],
        settings["flash_freq"],
        chip=str(chip) if chip else None,
        source=where,
        before=before,
        after=after,
    )
    return _finish(plan)


def check_plan(
    plan: FlashPlan, chip: str, *, flash_size: int | None = None, board: str | None = None
) -> None:
    """Refuse a plan that does not fit the board; raises ImageError, writes nothing.

    Checks: the plan's target chip and every image's chip id against ``chip``; each region
    against its partition size; the end of each region against the flash size (the plan's own
    setting, or ``flash_size`` in bytes when the caller knows it).
    """
    where = f"board {board}" if board else f"{chip} board"
    if chip not in CHIPS:
        raise UsageError(
            f"unknown chip {chip!r}",
            where=where,
            hint=f"use one of {', '.join(CHIPS)}",
        )
    if plan.chip and plan.chip != chip:
        raise ImageError(
            f"the build is for {plan.chip} but the board is an {chip}",
            where=plan.source,
            hint=f"build for the board (`idf.py set-target {chip}`) or pick an {plan.chip} board",
        )
    for region in plan.regions:
        built_for = image_chip(region.data)
        if built_for is not None and built_for != chip:
            raise ImageError(
                f"image at {region.offset:#x} is built for {built_for}, but {where} is an {chip}",
                where=region.name,
                hint=f"build it for {chip} (`idf.py set-target {chip}`), or flash it to an "
                f"{built_for} board; nothing was written",
            )
        if region.limit is not None and region.size > region.limit:
            part = f"partition {region.role!r}" if region.role else "partition"
            raise ImageError(
                f"image ({region.size} bytes) is larger than its {part} at {region.offset:#x} "
                f"({region.limit} bytes)",
                where=region.name,
                hint="make the partition bigger in the partition table, or the image smaller "
                "(optimize for size, drop components); nothing was written",
            )
    limit = flash_size_bytes(plan.flash_size) or flash_size
    if flash_size is not None and limit is not None:
        limit = min(limit, flash_size)
    if limit is not None:
        for region in plan.regions:
            if region.offset + region.size > limit:
                raise ImageError(
                    f"image ends at {region.offset + region.size:#x}, beyond the "
                    f"{limit // 1024} KiB flash of {where}",
                    where=region.name,
                    hint="use a board with more flash, or a smaller image/partition layout; "
                    "nothing was written",
                )
