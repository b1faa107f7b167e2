"""Flash ESP32-family boards through esptool 5's Python API, skipping regions already on the chip.

A :class:`FlashPlan` (regions of bytes at offsets, plus flash mode/size/freq) is built from a
single app image, a list of (offset, file), or an ESP-IDF build directory / ``flasher_args.json``
(esptool-4 spellings are translated, never passed on). ``check_plan`` refuses, before any
connection, images built for another chip and images that do not fit the flash or their
partition: nothing is written on a mismatch. ``flash`` connects once, asks the chip for the MD5 of
each region (SPI_FLASH_MD5) and writes only those that differ, compressed, verified, with a retry
at 115200 baud when the fast baud fails. esptool's console output goes to the
``pytest_hilfarm.esptool`` logger (and, on failure, into the FlashError), not to the terminal.

This module must not know about rack files, boards' health or the console: callers pause the
console and pass plain values (port URL or path, chip name).
"""

from __future__ import annotations

import collections
import contextvars
import hashlib
import json
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pytest_hilfarm.errors import FlashError, HilfarmError, ImageError, PortError, UsageError

esptool_log = logging.getLogger("pytest_hilfarm.esptool")

# Image chip ids (esp_image_header_t.chip_id, bytes 12-13 of an image; esptool IMAGE_CHIP_ID).
CHIP_IDS: Mapping[str, int] = {
    "esp32": 0,
    "esp32s2": 2,
    "esp32c3": 5,
    "esp32s3": 9,
    "esp32c2": 12,
    "esp32c6": 13,
    "esp32h2": 16,
    "esp32p4": 18,
}
# Second-stage bootloader offsets (ESP-IDF's CONFIG_BOOTLOADER_OFFSET_IN_FLASH defaults).
BOOTLOADER_OFFSETS: Mapping[str, int] = {
    "esp32": 0x1000,
    "esp32s2": 0x1000,
    "esp32c3": 0x0,
    "esp32s3": 0x0,
    "esp32c2": 0x0,
    "esp32c6": 0x0,
    "esp32h2": 0x0,
    "esp32p4": 0x2000,
}
APP_OFFSET = 0x10000  # the factory / first app partition in ESP-IDF's default tables
PARTITION_TABLE_OFFSET = 0x8000
SECTOR = 0x1000
IMAGE_MAGIC = 0xE9
ROM_BAUD = 115200
FLASH_MODES = ("qio", "qout", "dio", "dout", "keep")



@dataclass(frozen=True)
class RegionProgress:
    """One progress event of one region: which region, how far, and in what state.

    ``state``: "writing" (``done`` of ``size`` bytes sent so far), "written", "skipped" (the
    board already holds identical bytes, checked by MD5), or "verified" (read back after the
    whole plan was written, and it matches).
    """

    index: int
    offset: int
    name: str
    size: int
    done: int
    state: str


ProgressFn = Callable[[RegionProgress], None]


# -- plans ----------------------------------------------------------------------------------------


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

    @property
    def sha256(self) -> str:
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
    """Build a plan from a plan, an image file, a build directory, flasher_args.json or pairs."""
    if isinstance(what, FlashPlan):
        return what
    if isinstance(what, bytes | bytearray):
        return FlashPlan.from_image(bytes(what))
    if isinstance(what, str | Path):
        path = Path(what)
        if path.is_dir():
            return FlashPlan.from_build_dir(path)
        if path.name.endswith(".json"):
            return FlashPlan.from_flasher_args(path)
        return FlashPlan.from_image(path)
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
    table = next((r for r in regions if r.data[:2] == b"\xaa\x50"), None)
    if table is not None:
        sizes = {p.offset: p for p in parse_partition_table(table.data)}
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


@dataclass(frozen=True)
class Partition:
    """One entry of an ESP-IDF partition table."""

    label: str
    type: int
    subtype: int
    offset: int
    size: int


def parse_partition_table(data: bytes) -> list[Partition]:
    """Entries of a binary partition table (32-byte records, magic 0xAA50; stops at the end)."""
    entries: list[Partition] = []
    for pos in range(0, min(len(data), 0xC00), 32):
        record = data[pos : pos + 32]
        if len(record) < 32 or record[:2] != b"\xaa\x50":
            break  # 0xEBEB (MD5 record) or 0xFFFF (erased) end the table
        _, ptype, subtype, offset, size, label, _ = struct.unpack("<2sBBII16sI", record)
        name = label.split(b"\0", 1)[0].decode("ascii", errors="replace")
        entries.append(Partition(name, ptype, subtype, offset, size))
    return entries


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


# -- checks before writing ------------------------------------------------------------------------


def image_chip(data: bytes) -> str | None:
    """The chip an ESP app/bootloader image was built for, or None when data is not an image."""
    if len(data) < 24 or data[0] != IMAGE_MAGIC or data[1] > 16:
        return None
    chip_id = struct.unpack_from("<H", data, 12)[0]
    for name, value in CHIP_IDS.items():
        if value == chip_id:
            return name
    return f"unknown chip id {chip_id}"


APP_DESC_MAGIC = 0xABCD5432


def app_identity(data: bytes) -> tuple[str, str] | None:
    """(project_name, version) from an app image's ``esp_app_desc_t``, or None if it has none.

    The descriptor sits at image offset 0x20 (ESP-IDF ``esp_app_desc.h``): magic, secure
    version, reserved, then version[32] at +16 and project_name[32] at +48.
    """
    if image_chip(data) is None or len(data) < 0x20 + 80:
        return None
    if struct.unpack_from("<I", data, 0x20)[0] != APP_DESC_MAGIC:
        return None

    def text(raw: bytes) -> str:
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")

    return text(data[0x20 + 48 : 0x20 + 80]), text(data[0x20 + 16 : 0x20 + 48])


_SIZE_UNITS = {"KB": 1024, "MB": 1024 * 1024}


def flash_size_bytes(size: str | None) -> int | None:
    """``"4MB"`` -> 4194304; None for "keep", "detect" or None."""
    if not size or size in ("keep", "detect"):
        return None
    for unit, factor in _SIZE_UNITS.items():
        if size.upper().endswith(unit):
            try:
                return int(size[: -len(unit)]) * factor
            except ValueError:
                break
    raise ImageError(
        f"unknown flash size {size!r}",
        where="flash settings",
        hint="write it as esptool does: 2MB, 4MB, 8MB, 16MB ...",
    )


def check_plan(
    plan: FlashPlan, chip: str, *, flash_size: int | None = None, board: str | None = None
) -> None:
    """Refuse a plan that does not fit the board; raises ImageError, writes nothing.

    Checks: the plan's target chip and every image's chip id against ``chip``; each region
    against its partition size; the end of each region against the flash size (the plan's own
    setting, or ``flash_size`` in bytes when the caller knows it).
    """
    where = f"board {board}" if board else f"{chip} board"
    if chip not in CHIP_IDS:
        raise UsageError(
            f"unknown chip {chip!r}",
            where=where,
            hint=f"use one of {', '.join(CHIP_IDS)}",
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


def check_chip_revision(esp: Any, plan: FlashPlan, *, board: str | None = None) -> None:
    """Refuse images that need another revision of the connected chip (ImageError).

    esptool itself only refuses the bootloader (and only notes the app), but ESP-IDF's
    bootloader will not start an app outside its revision range either, so a farm refuses both:
    flashing it could only leave an unbootable board. Uses esptool's own rules and words.
    """
    from esptool import cmds
    from esptool.bin_image import LoadFirmwareImage
    from esptool.util import FatalError

    incompatibility = getattr(cmds, "_get_image_incompatibility", None)
    for region in plan.regions:
        if region.data[:1] != bytes([IMAGE_MAGIC]) or region.role in ("otadata",):
            continue
        try:
            image = LoadFirmwareImage(esp.CHIP_NAME, region.data)
        except (FatalError, struct.error, RuntimeError, KeyError):
            continue  # not an image of this chip: check_plan says so
        if incompatibility is not None:
            problem = incompatibility(esp, image, region.name)
        else:  # pragma: no cover - esptool 5.x has it; compare the full revisions ourselves
            rev = esp.get_chip_revision()
            low, high = image.min_rev_full, image.max_rev_full or 0xFFFF
            problem = None if low <= rev <= high else (
                f"'{region.name}' requires chip revision v{low // 100}.{low % 100} - "
                f"v{high // 100}.{high % 100} (this chip is revision v{rev // 100}.{rev % 100})")
        if problem:
            where = f"board {board}" if board else esp.CHIP_NAME
            raise ImageError(
                f"{problem}; nothing was written",
                where=f"{where}, image at {region.offset:#x}",
                hint="build for this chip revision (ESP-IDF: the chip's minimum/maximum revision "
                "options), or use a board of a revision the image supports; the board itself "
                "is fine",
            )


# -- esptool output routing -----------------------------------------------------------------------


class _FlashSession:
    """Where esptool's output goes while one flash runs in this thread."""

    def __init__(self, label: str, echo: bool) -> None:
        self.label = label
        self.echo = echo
        self.lines: collections.deque[str] = collections.deque(maxlen=60)
        self.on_progress: Callable[[int, int], None] | None = None
        self.region: Region | None = None  # the region being checked or written, for errors

    def text(self, message: str, level: int = logging.DEBUG) -> None:
        for line in message.splitlines() or [""]:
            if line.strip():
                self.lines.append(line)
        esptool_log.log(logging.INFO if self.echo else level, "%s: %s", self.label, message)


_SESSION: contextvars.ContextVar[_FlashSession | None] = contextvars.ContextVar(
    "hilfarm_flash_session", default=None
)
_INSTALL_LOCK = threading.Lock()


def _render(args: tuple[Any, ...]) -> str:
    return " ".join(str(a) for a in args)


def _make_router(previous: Any) -> Any:
    from esp_pylib.logger import EspLogBase

    class _Router(EspLogBase):
        """esptool's logger while hilfarm is loaded: per-thread capture, else the old logger.

        esptool keeps one process-wide logger; flashes run in parallel threads, so each thread's
        output is routed by a context variable to its own session instead of a shared sink.
        """

        hilfarm_router = True

        def __init__(self, fallback: Any) -> None:
            self._fallback = fallback

        def _session(self) -> _FlashSession | None:
            return _SESSION.get()

        def print(self, *args: Any, **kwargs: Any) -> None:
            session = self._session()
            if session is None:
                self._fallback.print(*args, **kwargs)
            else:
                session.text(_render(args))

        def err(self, *args: Any, suggestion: str | None = None) -> None:
            session = self._session()
            if session is None:
                self._fallback.err(*args, suggestion=suggestion)
            else:
                session.text("Error: " + _render(args), logging.WARNING)

        def warn(self, *args: Any, suggestion: str | None = None) -> None:
            session = self._session()
            if session is None:
                self._fallback.warn(*args, suggestion=suggestion)
            else:
                session.text("Warning: " + _render(args))

        def warning(self, message: str, suggestion: str | None = None) -> None:
            self.warn(message, suggestion=suggestion)

        def error(self, message: str, suggestion: str | None = None) -> None:
            self.err(message, suggestion=suggestion)

        def note(self, *args: Any) -> None:
            session = self._session()
            if session is None:
                self._fallback.note(*args)
            else:
                session.text("Note: " + _render(args))

        def hint(self, *args: Any) -> None:
            session = self._session()
            if session is None:
                self._fallback.hint(*args)
            else:
                session.text("Hint: " + _render(args))

        def debug(self, *args: Any) -> None:
            session = self._session()
            if session is None:
                self._fallback.debug(*args)
            else:
                session.text(_render(args))

        def stage(self, finish: bool = False) -> None:
            if self._session() is None:
                self._fallback.stage(finish=finish)

        def set_verbosity(self, mode: int | str) -> None:
            self._fallback.set_verbosity(mode)

        def progress_bar(
            self,
            cur_iter: int,
            total_iters: int,
            prefix: str = "",
            suffix: str = "",
            bar_length: int = 30,
        ) -> None:
            session = self._session()
            if session is None:
                self._fallback.progress_bar(cur_iter, total_iters, prefix, suffix, bar_length)
            elif session.on_progress is not None:
                session.on_progress(cur_iter, total_iters)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._fallback, name)

    return _Router(previous)


def _install_router() -> None:
    """Put the routing logger in front of esptool's (once per process; idempotent)."""
    import esptool  # noqa: F401  (installs esptool's own logger first)
    from esp_pylib.logger import EspLog

    with _INSTALL_LOCK:
        current = EspLog.instance
        if getattr(current, "hilfarm_router", False):
            return
        if current is None:
            current = EspLog()
        EspLog.set_logger(_make_router(current))


@contextmanager
def _capture(label: str, echo: bool) -> Iterator[_FlashSession]:
    _install_router()
    session = _FlashSession(label, echo)
    token = _SESSION.set(session)
    try:
        yield session
    finally:
        _SESSION.reset(token)


# -- flashing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionResult:
    """What happened to one region: written (and verified) or skipped as already identical."""

    offset: int
    size: int
    sha256: str
    name: str
    written: bool
    seconds: float


@dataclass(frozen=True)
class FlashReport:
    """Per-region outcome, total time, and the baud rate that finally worked."""

    port: str
    chip: str
    regions: tuple[RegionResult, ...]
    seconds: float
    baud: int

    @property
    def written(self) -> tuple[RegionResult, ...]:
        return tuple(r for r in self.regions if r.written)

    @property
    def skipped(self) -> tuple[RegionResult, ...]:
        return tuple(r for r in self.regions if not r.written)

    @property
    def bytes_written(self) -> int:
        return sum(r.size for r in self.written)


def _esptool_errors() -> tuple[type[BaseException], ...]:
    import serial
    from esptool.util import FatalError

    return (FatalError, serial.SerialException, OSError, struct.error)


_DROPPED = ("reset by peer", "socket disconnected", "Broken pipe", "Connection reset")


def _connect(port_url: str, chip: str, before: str, attempts: int, busy_wait: float = 2.0) -> Any:
    """Open the port ourselves (no 0.3 s socket close sleep) and connect esptool's loader.

    A network port whose previous client (the paused console) has only just hung up may still
    count as busy on the server side, which drops the new connection at once; that is retried
    for up to ``busy_wait`` seconds with a short backoff, instead of failing the flash.
    """
    from esptool.targets import CHIP_DEFS

    from pytest_hilfarm.transports import open_port

    deadline = time.monotonic() + busy_wait
    delay = 0.02
    while True:
        port = open_port(port_url, ROM_BAUD, timeout=3.0, exclusive=True)
        try:
            esp = CHIP_DEFS[chip](port, ROM_BAUD)
            if port_url.startswith("rfc2217:"):
                esp.USES_RFC2217 = True
            esp.connect(before, attempts)
            return esp
        except _esptool_errors() as exc:
            port.close()
            dropped = any(word in str(exc) for word in _DROPPED)
            if not dropped or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.3)
        except BaseException:
            port.close()
            raise


def _prepared(esp: Any, region: Region, plan: FlashPlan) -> bytes:
    """The exact bytes esptool writes for a region, so our MD5 matches what ends up on flash."""
    from esptool import cmds

    data = region.data
    # esptool pads every write to 4 bytes (pad_to(image, 4)) and verifies the padded data.
    if len(data) % 4:
        data += b"\xff" * (4 - len(data) % 4)
    settings = (plan.flash_freq, plan.flash_mode, plan.flash_size)
    if region.offset == esp.BOOTLOADER_FLASH_OFFSET and settings != ("keep",) * 3:
        # esptool rewrites the bootloader header's mode/size/freq bytes (and its SHA-256) before
        # writing; do it here once and pass "keep" on, so the skip check compares real bytes.
        data = cmds._update_image_flash_params(
            esp, region.offset, plan.flash_freq, plan.flash_mode, plan.flash_size, data
        )
    return bytes(data)


def _report(progress: ProgressFn | None, index: int, region: Region, done: int,
            state: str) -> None:
    if progress is not None:
        progress(RegionProgress(index, region.offset, region.name, region.size, done, state))


def _result(region: Region, written: bool, started: float) -> RegionResult:
    seconds = time.monotonic() - started
    return RegionResult(region.offset, region.size, region.sha256, region.name, written, seconds)


def _flash_once(
    port_url: str,
    chip: str,
    plan: FlashPlan,
    *,
    baud: int,
    progress: ProgressFn | None,
    skip_identical: bool,
    verify: bool,
    before: str,
    after: str,
    attempts: int,
    session: _FlashSession,
    board: str | None,
) -> tuple[RegionResult, ...]:
    from esptool import cmds
    from esptool.util import NotImplementedInROMError

    esp = _connect(port_url, chip, before, attempts)
    try:
        # Before anything else (even the skip check): an image this very chip cannot run is
        # the image's fault, never something to retry at a lower baud or blame on the cable.
        check_chip_revision(esp, plan, board=board)
        cmds.attach_flash(esp)
        detected = flash_size_bytes(cmds.detect_flash_size(esp))
        check_plan(plan, chip, flash_size=detected, board=board)
        prepared = [_prepared(esp, region, plan) for region in plan.regions]
        digests = [hashlib.md5(data).hexdigest() for data in prepared]
        results: list[RegionResult | None] = [None] * len(plan.regions)
        # Compare first, before the stub upload and the baud change where the ROM can hash
        # (ESP32): an unchanged board then costs a sync, a few register reads and one MD5 per
        # region, instead of ~7 KB of stub at 115200 baud plus esptool's 50 ms baud settle.
        if skip_identical:
            for index, region in enumerate(plan.regions):
                started = time.monotonic()
                session.region = region
                try:
                    same = esp.flash_md5sum(region.offset, len(prepared[index])) == digests[index]
                except NotImplementedInROMError:  # ESP32-S2/C3 ROMs: hash with the stub
                    esp = cmds.run_stub(esp)
                    cmds.attach_flash(esp)
                    same = esp.flash_md5sum(region.offset, len(prepared[index])) == digests[index]
                if same:
                    results[index] = _result(region, False, started)
                    _report(progress, index, region, region.size, "skipped")
        if any(r is None for r in results) and not esp.IS_STUB:
            esp = cmds.run_stub(esp)
            cmds.attach_flash(esp)
        if baud > ROM_BAUD and any(r is None for r in results):
            esp.change_baud(baud)
        for index, region in enumerate(plan.regions):
            if results[index] is not None:
                continue
            started = time.monotonic()

            def on_progress(done: int, total: int, i: int = index, r: Region = region) -> None:
                # esptool counts compressed bytes sent; report uncompressed bytes of the region.
                if total > 0:
                    _report(progress, i, r, min(r.size, done * r.size // total), "writing")

            session.on_progress = on_progress
            session.region = region
            try:
                cmds.write_flash(esp, [(region.offset, prepared[index])], compress=True)
            finally:
                session.on_progress = None
            results[index] = _result(region, True, started)
            _report(progress, index, region, region.size, "written")
        done = tuple(r for r in results if r is not None)
        session.region = None
        if verify and any(r.written for r in done):
            # write_flash verified each region right after writing it; this pass catches a later
            # region's sector erase clobbering an earlier one and a chip reset mid-plan. With
            # nothing written, the skip check's MD5s already were the verification.
            for region, data, digest in zip(plan.regions, prepared, digests):
                if esp.flash_md5sum(region.offset, len(data)) != digest:
                    raise FlashError(
                        f"region at {region.offset:#x} does not hold the image after flashing",
                        where=f"{board or chip} on {port_url}, {region.name}",
                        hint="the flash may be failing or the board reset during flashing; "
                        "run a health check on the board",
                    )
            for index, (region, result) in enumerate(zip(plan.regions, done)):
                if result.written:
                    _report(progress, index, region, region.size, "verified")
        cmds.reset_chip(esp, after)
        return done
    finally:
        try:
            esp._port.close()
        except Exception:  # the port may already be gone with the board
            pass


def flash(
    port_url: str,
    chip: str,
    plan: FlashPlan | Path | str | bytes | Sequence[tuple[Any, Any]],
    *,
    baud: int = 921600,
    progress: ProgressFn | None = None,
    skip_identical: bool = True,
    verify: bool = True,
    before: str = "default-reset",
    after: str = "hard-reset",
    board: str | None = None,
    echo: bool = False,
    connect_attempts: int = 7,
    enter_download: Callable[[], None] | None = None,
) -> FlashReport:
    """Flash ``plan`` onto the ``chip`` board at ``port_url``; return what was written/skipped.

    ``before``/``after`` are esptool 5's reset modes ("default-reset", "no-reset", "usb-reset";
    "hard-reset", "no-reset", "no-reset-stub"). ``progress(RegionProgress)`` is
    called from this thread as each region is skipped, written (bytes as they go out) and
    verified. ``echo`` logs esptool's output at INFO instead of DEBUG. ``enter_download`` is called
    before each attempt when esptool cannot reset the board itself (``before="no-reset"`` with an
    out-of-band reset driver), so the retry at 115200 starts from a fresh ROM loader too.
    """
    plan = make_plan(plan)
    check_plan(plan, chip, board=board)  # before any connection: nothing written on a mismatch
    label = board or port_url
    started = time.monotonic()
    rates = [baud] if baud <= ROM_BAUD else [baud, ROM_BAUD]
    errors = _esptool_errors()
    failure: BaseException | None = None
    with _capture(label, echo) as session:
        for rate in rates:
            try:
                if enter_download is not None:
                    enter_download()
                results = _flash_once(
                    port_url,
                    chip,
                    plan,
                    baud=rate,
                    progress=progress,
                    skip_identical=skip_identical,
                    verify=verify,
                    before=before,
                    after=after,
                    attempts=connect_attempts,
                    session=session,
                    board=board,
                )
            except PortError as exc:
                if board is None:
                    raise
                where = f"board {board}, {exc.where}"
                raise PortError(exc.what, where=where, hint=exc.hint) from exc
            except HilfarmError:
                raise
            except errors as exc:
                failure = exc
                session.text(f"flash at {rate} baud failed: {exc}", logging.INFO)
                continue
            return FlashReport(port_url, chip, results, time.monotonic() - started, rate)
    assert failure is not None
    raise _flash_error(failure, plan, port_url, chip, board, session, rates)


def _flash_error(
    exc: BaseException,
    plan: FlashPlan,
    port_url: str,
    chip: str,
    board: str | None,
    session: _FlashSession,
    rates: list[int],
) -> FlashError:
    region = session.region
    where = f"{board + ' on ' if board else ''}{port_url}"
    if region is not None:
        where += f", region {region.offset:#x} ({region.name})"
    tail = "\n".join(f"    | {line}" for line in list(session.lines)[-12:])
    tried = " and ".join(str(r) for r in rates)
    hint = (
        "check the cable and that nothing else holds the port; for a virtual board check "
        "`hilfarm sim status`; the board is marked UNKNOWN and gets a health check"
    )
    if "not " in str(exc) and "This chip is" in str(exc):
        hint = "the board's chip differs from the rack file's: fix the rack file"
    return FlashError(
        f"flashing failed at {tried} baud: {exc}\n  esptool said:\n{tail}",
        where=where,
        hint=hint,
    )


def read_md5(
    port_url: str,
    chip: str,
    offset: int,
    size: int,
    *,
    before: str = "default-reset",
    after: str = "no-reset",
    echo: bool = False,
) -> str:
    """Return the lowercase hex MD5 of ``size`` bytes of flash at ``offset`` (via the stub)."""
    from esptool import cmds

    with _capture(port_url, echo) as session:
        try:
            esp = _connect(port_url, chip, before, 7)
            try:
                esp = cmds.run_stub(esp)
                digest: str = esp.flash_md5sum(offset, size)
                cmds.reset_chip(esp, after)
                return digest
            finally:
                esp._port.close()
        except HilfarmError:
            raise
        except _esptool_errors() as exc:
            tail = "\n".join(f"    | {line}" for line in list(session.lines)[-8:])
            raise FlashError(
                f"reading the MD5 of {size} bytes at {offset:#x} failed: {exc}\n{tail}",
                where=port_url,
                hint="check the port and that the board can enter download mode",
            ) from exc


@dataclass(frozen=True)
class FlashJob:
    """One board's share of a parallel flash: ``flash(port, chip, plan, **options)``."""

    port: str
    chip: str
    plan: FlashPlan | Path | str | bytes | Sequence[tuple[Any, Any]]
    board: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


def flash_many(
    jobs: Sequence[FlashJob], max_workers: int | None = None
) -> list[FlashReport | HilfarmError]:
    """Flash several boards in parallel threads; results in job order.

    A board's failure does not stop the others: its slot holds the FlashError/ImageError/
    PortError instead of a report, so the caller can mark just that board UNKNOWN.
    """
    for job in jobs:
        check_plan(make_plan(job.plan), job.chip, board=job.board)  # all refusals before writes
    _install_router()  # once, here, rather than racing in every worker

    def run(job: FlashJob) -> FlashReport | HilfarmError:
        try:
            return flash(job.port, job.chip, job.plan, board=job.board, **dict(job.options))
        except (FlashError, PortError, ImageError) as exc:
            return exc

    workers = max_workers or max(1, len(jobs))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flash") as pool:
        return list(pool.map(run, jobs))
