"""Recognise the build outputs people have and turn them into a flash plan.

Accepted, each detected from the path alone:

* an ESP-IDF build directory (``flasher_args.json``), its project directory (``build/`` inside),
  or ``flasher_args.json`` itself;
* Arduino CLI / arduino-esp32 outputs: ``<sketch>.ino.bin`` with ``.ino.bootloader.bin``,
  ``.ino.partitions.bin`` and ``boot_app0.bin`` (or the ``flash_args`` file arduino-esp32 3.x
  writes next to them, or the ``.ino.merged.bin``), a sketch directory with ``build/<fqbn>/``;
* a PlatformIO project (``platformio.ini`` + ``.pio/build/<env>/``), one environment directory,
  or ``PROJECT::ENV``;
* a merged image from ``esptool merge-bin`` (bootloader at the chip's offset, partition table at
  0x8000): flashed as esptool would write it at its target offset, split at the partition
  boundaries so each part is checked and skipped on its own;
* a single app image (``.bin``), to 0x10000 as before.

An ambiguous or incomplete directory raises :class:`ImageError` naming what is missing and what
was found. Offsets follow the tools that made the files (the sources are cited where used). This
module reads files only; it never flashes, and never invents a missing part.
"""

from __future__ import annotations

import configparser
import json
import os
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pytest_hilfarm.drivers.flashing.plan import APP_OFFSET, SECTOR, FlashPlan, Region
from pytest_hilfarm.errors import ImageError
from pytest_hilfarm.esp.chips import BOOTLOADER_OFFSETS
from pytest_hilfarm.esp.image import APP_DESC_MAGIC, image_chip, parse_image
from pytest_hilfarm.esp.partitions import TABLE_OFFSET as PARTITION_TABLE_OFFSET
from pytest_hilfarm.esp.partitions import read_entries as parse_partition_table

# arduino-esp32 platform.txt (tools.esptool_py.upload.pattern_args, 3.x):
#   {build.bootloader_addr} <sketch>.ino.bootloader.bin  0x8000 <sketch>.ino.partitions.bin
#   0xe000 {runtime.platform.path}/tools/partitions/boot_app0.bin  0x10000 <sketch>.ino.bin
# build.bootloader_addr comes from boards.txt: 0x1000 (ESP32, S2), 0x0 (C3, S3, C6, H2, C2),
# 0x2000 (P4) -- the same table as ESP-IDF's CONFIG_BOOTLOADER_OFFSET_IN_FLASH (flashing.py).
ARDUINO_BOOT_APP0_OFFSET = 0xE000
# PlatformIO platform-espressif32 builder/main.py: ESP32_APP_OFFSET = board
# "upload.offset_address" or 0x10000; frameworks/arduino.py puts bootloader.bin at the board's
# bootloader address, partitions.bin at 0x8000 and the framework's boot_app0.bin at the otadata
# partition (0xe000 in arduino-esp32's tables).
PIO_PROGNAME = "firmware"  # builder/main.py: PROGNAME defaults to "firmware"
_PIO_AUX = ("bootloader.bin", "partitions.bin", "boot_app0.bin", "ota_data_initial.bin")
_ARDUINO_SUFFIXES = (".ino.bootloader.bin", ".ino.partitions.bin", ".ino.merged.bin")
_TABLE_MAGIC = b"\xaa\x50"
_SUBTYPE_OTADATA = (0x01, 0x00)  # (type data, subtype ota)


@dataclass(frozen=True)
class Build:
    """A recognised build: how to flash it and where its symbols are.

    ``kind``: "esp-idf", "arduino", "platformio", "merged" or "image". ``elf`` is the app's ELF
    when the build left one (for panic decoding); ``notes`` say what was taken from where when
    that is not obvious (a boot_app0.bin from the framework package, an environment chosen by
    ``default_envs``).
    """

    kind: str
    path: Path
    plan: FlashPlan
    chip: str | None
    elf: Path | None = None
    env: str | None = None
    notes: tuple[str, ...] = ()


def plan_for(target: str | Path) -> FlashPlan:
    """The flash plan for a build path (see :func:`detect`)."""
    return detect(target).plan


def detect(target: str | Path) -> Build:
    """Recognise ``target`` (a file, a directory, or ``PLATFORMIO_PROJECT::ENV``)."""
    text = str(target)
    env: str | None = None
    if "::" in text:
        text, env = text.rsplit("::", 1)
        if not env:
            raise ImageError("empty environment name after '::'", where=str(target),
                             hint="write PROJECT::ENV, e.g. firmware/::esp32dev")
    path = Path(text)
    if not path.exists():
        raise ImageError("the firmware path does not exist", where=str(path),
                         hint="check the path (relative paths are taken from the current "
                         "directory), or build the firmware first")
    if env is not None:
        project = path.parent if path.name == "platformio.ini" else path
        return _platformio(project, env)
    if path.is_file():
        return _from_file(path)
    return _from_dir(path)


# -- files ----------------------------------------------------------------------------------------


def _from_file(path: Path) -> Build:
    if path.name.endswith(".json"):
        plan = FlashPlan.from_flasher_args(path)
        return Build("esp-idf", path, plan, plan.chip, _idf_elf(path.parent, path))
    if path.name == "platformio.ini":
        return _platformio(path.parent, None)
    data = _read(path)
    merged = _merged(data, path)
    if merged is not None:
        return merged
    return Build("image", path, FlashPlan.from_image(path), _chip_of(data), _sibling_elf(path))


def _sibling_elf(path: Path) -> Path | None:
    candidate = path.with_suffix(".elf")
    return candidate if candidate.is_file() else None


def _merged(data: bytes, path: Path) -> Build | None:
    """A full-flash image from ``esptool merge-bin``, or None when ``data`` is not one.

    esptool writes the lowest address at file offset 0 unless ``--target-offset`` moved it
    ("ready to flash to offset 0x0"), padding gaps with 0xFF; so the second-stage bootloader
    sits at its chip's flash offset minus the target offset, the partition table at 0x8000
    minus it.
    """
    for at in sorted(set(BOOTLOADER_OFFSETS.values())):
        if len(data) < at + 0x100 or data[at] != 0xE9:
            continue
        chip = _chip_of(data[at:])
        if chip is None or _has_app_desc(data[at:]):
            continue
        base = BOOTLOADER_OFFSETS[chip] - at  # esptool's --target-offset
        if base < 0 or data[:at] != b"\xff" * at:
            continue
        table_at = PARTITION_TABLE_OFFSET - base
        if data[table_at : table_at + 2] != _TABLE_MAGIC:
            if not _more_after_image(data, at):
                continue  # one image (an app without a descriptor), not a merged file
            raise ImageError(
                f"this looks like a merged image for {chip} (a bootloader at file offset "
                f"{at:#x}) but there is no partition table at file offset {table_at:#x}",
                where=str(path),
                hint="merge the partition table too (esptool merge-bin ... 0x8000 "
                "partition-table.bin ...), or flash the parts with their offsets",
            )
        return Build("merged", path, _split_merged(data, base, chip, path), chip,
                     _sibling_elf(path), notes=(f"merged image for {chip}, written from flash "
                                                f"offset {base:#x}",))
    return None


def _more_after_image(data: bytes, at: int) -> bool:
    """Whether the file holds more than the image at ``at`` (anything but 0xFF after it)."""
    try:
        end = at + parse_image(data[at:], verify=False).length
    except ImageError:
        return False  # not even one well-formed image: the image checks say what is wrong
    return data[end:].strip(b"\xff") != b""


def _has_app_desc(image: bytes) -> bool:
    return int.from_bytes(image[0x20:0x24], "little") == APP_DESC_MAGIC


def _split_merged(data: bytes, base: int, chip: str, path: Path) -> FlashPlan:
    """Regions covering every byte of the merged file (as writing it whole would), cut where
    the bootloader, the partition table and each partition start.
    """
    table_at = PARTITION_TABLE_OFFSET - base
    parts = parse_partition_table(data[table_at : table_at + 0xC00])
    end = base + len(data)
    names = {BOOTLOADER_OFFSETS[chip]: "bootloader", PARTITION_TABLE_OFFSET: "partition-table"}
    for part in parts:
        names.setdefault(part.offset, part.label)
    cuts = sorted({base, end, PARTITION_TABLE_OFFSET + SECTOR}
                  | {o for o in names if base <= o < end})
    regions = []
    for start, stop in zip(cuts, cuts[1:]):
        role = names.get(start)
        label = role or "padding"
        chunk = data[start - base : stop - base]
        regions.append(Region(start, chunk, f"{path.name}[{start:#x}:{stop:#x}] {label}", role))
    return FlashPlan(tuple(regions), chip=chip, source=str(path))


# -- directories ----------------------------------------------------------------------------------


def _from_dir(path: Path) -> Build:
    if (path / "flasher_args.json").is_file():
        return _idf(path)
    if (path / "platformio.ini").is_file():
        return _platformio(path, None)
    if path.parent.name == "build" and path.parent.parent.name == ".pio":
        project = path.parent.parent.parent
        return _pio_env(path, project if (project / "platformio.ini").is_file() else None)
    sketches = _arduino_apps(path)
    if sketches:
        return _arduino(path, sketches)
    if (path / "build" / "flasher_args.json").is_file():
        return _idf(path / "build")
    exported = sorted(d for d in (path / "build").glob("*") if d.is_dir() and _arduino_apps(d))
    if len(exported) == 1:
        return _arduino(exported[0], _arduino_apps(exported[0]))
    if len(exported) > 1:
        raise ImageError(
            f"{len(exported)} Arduino builds in build/: {_names(exported)}",
            where=str(path),
            hint=f"pass one of them, e.g. {exported[0]}",
        )
    raise ImageError(
        "not a build directory this farm recognises: no flasher_args.json (ESP-IDF), "
        "platformio.ini or .pio/build/<env> (PlatformIO), or <sketch>.ino.bin (Arduino); "
        f"found: {_listing(path)}",
        where=str(path),
        hint="pass the ESP-IDF build directory (run `idf.py build` first), the PlatformIO "
        "project, the Arduino output directory, a merged image or the app .bin itself",
    )


def _listing(path: Path, limit: int = 12) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not names:
        return "nothing (the directory is empty)"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _names(paths: Iterable[Path]) -> str:
    return ", ".join(p.name for p in paths)


def _read(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read the file: {exc.strerror or exc}", where=str(path),
                         hint="check the file's permissions") from exc
    if not data:
        raise ImageError("the file is empty", where=str(path), hint="rebuild the firmware")
    return data


def _chip_of(data: bytes) -> str | None:
    chip = image_chip(data)
    return chip if chip in BOOTLOADER_OFFSETS else None


def _app_chip(data: bytes, path: Path) -> str:
    chip = image_chip(data)
    if chip is None:
        raise ImageError("not an ESP app image (it does not start with the 0xE9 magic byte)",
                         where=str(path), hint="pass the app .bin the build produced")
    if chip not in BOOTLOADER_OFFSETS:
        raise ImageError(f"the image header names {chip}, which this farm does not know",
                         where=str(path), hint="check that the file is an ESP32-family image")
    return chip


# -- ESP-IDF --------------------------------------------------------------------------------------


def _idf(build_dir: Path) -> Build:
    args = build_dir / "flasher_args.json"
    plan = FlashPlan.from_flasher_args(args)
    return Build("esp-idf", build_dir, plan, plan.chip, _idf_elf(build_dir, args))


def _idf_elf(build_dir: Path, flasher_args: Path) -> Path | None:
    """The app ELF: project_description.json's ``app_elf``, else the app .bin's stem + .elf."""
    try:
        desc = json.loads((build_dir / "project_description.json").read_text(encoding="utf-8"))
        name = desc.get("app_elf")
        if name and (build_dir / name).is_file():
            return build_dir / name
    except (OSError, ValueError, AttributeError):
        pass
    try:
        app = json.loads(flasher_args.read_text(encoding="utf-8")).get("app", {}).get("file")
    except (OSError, ValueError, AttributeError):
        return None
    if not app:
        return None
    candidate = (build_dir / app).with_suffix(".elf")
    return candidate if candidate.is_file() else None


# -- Arduino --------------------------------------------------------------------------------------


def _arduino_apps(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.ino.bin")
                  if not p.name.endswith(_ARDUINO_SUFFIXES) and p.is_file())


def _arduino(directory: Path, apps: Sequence[Path]) -> Build:
    if len(apps) > 1:
        raise ImageError(
            f"{len(apps)} sketches' outputs in one directory: {_names(apps)}",
            where=str(directory),
            hint="give each sketch its own output directory (arduino-cli compile --output-dir)",
        )
    app = apps[0]
    stem = app.name[: -len(".bin")]  # "<sketch>.ino", arduino-cli's build.project_name
    elf = directory / f"{stem}.elf"
    elf_path = elf if elf.is_file() else None
    if (directory / "flash_args").is_file():
        plan, chip = _from_flash_args(directory / "flash_args", _read(app), app)
        return Build("arduino", directory, plan, chip, elf_path,
                     notes=("offsets from flash_args (arduino-esp32)",))
    app_data = _read(app)
    chip = _app_chip(app_data, app)
    wanted = {
        "bootloader": directory / f"{stem}.bootloader.bin",
        "partition table": directory / f"{stem}.partitions.bin",
        "boot_app0.bin": directory / "boot_app0.bin",
    }
    notes: list[str] = []
    if not wanted["boot_app0.bin"].is_file():
        found = _arduino_boot_app0()
        if found is not None:
            wanted["boot_app0.bin"] = found
            notes.append(f"boot_app0.bin from {found}")
    missing = [f"{what} ({path.name})" for what, path in wanted.items() if not path.is_file()]
    if missing:
        merged = directory / f"{stem}.merged.bin"
        if merged.is_file():
            build = _merged(_read(merged), merged)
            if build is not None:
                return Build("arduino", directory, build.plan, build.chip, elf_path,
                             notes=(f"{merged.name} (the parts are not all there)",))
        raise ImageError(
            f"incomplete Arduino build: missing {', '.join(missing)}; found "
            f"{_listing(directory)}",
            where=str(directory),
            hint="compile with arduino-cli compile --export-binaries (or --output-dir) so the "
            "bootloader and partition table are written next to the app; boot_app0.bin is in "
            "arduino-esp32's tools/partitions/",
        )
    pairs = [
        (BOOTLOADER_OFFSETS[chip], wanted["bootloader"], "bootloader"),
        (PARTITION_TABLE_OFFSET, wanted["partition table"], "partition-table"),
        (ARDUINO_BOOT_APP0_OFFSET, wanted["boot_app0.bin"], "otadata"),
        (APP_OFFSET, app, "app"),
    ]
    plan = _plan(pairs, chip, str(directory))
    return Build("arduino", directory, plan, chip, elf_path, notes=tuple(notes))


def _arduino_boot_app0() -> Path | None:
    """boot_app0.bin of an installed arduino-esp32 (one version only, else None: no guessing)."""
    data_dir = os.environ.get("ARDUINO_DIRECTORIES_DATA") or str(Path.home() / ".arduino15")
    found = sorted(Path(data_dir).glob("packages/esp32/hardware/esp32/*/tools/partitions/"
                                       "boot_app0.bin"))
    return _one_content(found)


def _one_content(paths: Sequence[Path]) -> Path | None:
    contents = {p.read_bytes() for p in paths}
    return paths[0] if len(contents) == 1 else None


def _from_flash_args(path: Path, app: bytes, app_path: Path) -> tuple[FlashPlan, str]:
    """arduino-esp32 3.x's ``flash_args``: a line of options, then ``<offset> <file>`` lines
    relative to the build directory (the same shape as ESP-IDF's ``build/flash_args``).
    """
    chip = _app_chip(app, app_path)
    settings = {"flash_mode": "keep", "flash_freq": "keep", "flash_size": "keep"}
    pairs: list[tuple[int, Path, str | None]] = []
    tokens = shlex.split(path.read_text(encoding="utf-8"))
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("-"):
            key = token.lstrip("-").replace("-", "_")
            if key in settings and i + 1 < len(tokens):
                settings[key] = tokens[i + 1]
            i += 2
            continue
        if i + 1 >= len(tokens):
            raise ImageError(f"offset {token!r} has no file after it", where=str(path))
        try:
            offset = int(token, 0)
        except ValueError:
            raise ImageError(f"bad offset {token!r}", where=str(path),
                             hint="regenerate the build (flash_args is written by it)") from None
        pairs.append((offset, path.parent / tokens[i + 1], None))
        i += 2
    missing = [f"{p.name} (at {o:#x})" for o, p, _ in pairs if not p.is_file()]
    if missing:
        raise ImageError(f"flash_args lists files that are not there: {', '.join(missing)}; "
                         f"found {_listing(path.parent)}", where=str(path),
                         hint="copy the missing files next to flash_args, or rebuild")
    plan = _plan(pairs, chip, str(path), **settings)
    return plan, chip


def _plan(pairs: Iterable[tuple[int, Path, str | None]], chip: str, source: str, *,
          flash_mode: str = "keep", flash_freq: str = "keep",
          flash_size: str = "keep") -> FlashPlan:
    base = FlashPlan.from_files([(offset, path) for offset, path, _ in pairs],
                                flash_mode=flash_mode, flash_freq=flash_freq,
                                flash_size=flash_size)
    roles = {offset: role for offset, _, role in pairs}
    regions = tuple(Region(r.offset, r.data, r.name, roles.get(r.offset) or r.role, r.limit)
                    for r in base.regions)
    return FlashPlan(regions, base.flash_mode, base.flash_size, base.flash_freq, chip=chip,
                     source=source)


# -- PlatformIO -----------------------------------------------------------------------------------


def _read_ini(project: Path) -> configparser.RawConfigParser:
    ini = configparser.RawConfigParser(strict=False, inline_comment_prefixes=(";", "#"))
    try:
        ini.read(project / "platformio.ini", encoding="utf-8")
    except configparser.Error as exc:
        raise ImageError(f"cannot read platformio.ini: {exc}", where=str(project),
                         hint="fix the file's syntax (pio run reports the same)") from exc
    return ini


def _ini_value(ini: configparser.RawConfigParser, env: str, key: str) -> str | None:
    # PlatformIO: [env:NAME] values override the common [env] section.
    for section in (f"env:{env}", "env"):
        if ini.has_option(section, key):
            return ini.get(section, key).strip()
    return None


def _platformio(project: Path, env: str | None) -> Build:
    ini = _read_ini(project)
    build_root = project / (ini.get("platformio", "build_dir", fallback=".pio/build").strip())
    declared = [s[len("env:"):] for s in ini.sections() if s.startswith("env:")]
    if env is not None:
        if env not in declared and not (build_root / env).is_dir():
            raise ImageError(f"no environment {env!r} in platformio.ini (it declares "
                             f"{', '.join(declared) or 'none'})", where=str(project),
                             hint="use one of the [env:...] names")
        if not (build_root / env).is_dir():
            raise ImageError(f"environment {env!r} is not built: no {build_root / env}",
                             where=str(project), hint=f"run `pio run -e {env}` first")
        return _pio_env(build_root / env, project, ini)
    built = sorted(d for d in build_root.glob("*") if d.is_dir() and _pio_app(d) is not None)
    defaults = [e.strip() for e in ini.get("platformio", "default_envs", fallback="")
                .replace(",", " ").split() if e.strip()]
    if len(defaults) == 1 and (build_root / defaults[0]).is_dir():
        build = _pio_env(build_root / defaults[0], project, ini)
        return Build(build.kind, build.path, build.plan, build.chip, build.elf, build.env,
                     build.notes + (f"environment {defaults[0]!r} from default_envs",))
    if len(built) == 1:
        return _pio_env(built[0], project, ini)
    if not built:
        raise ImageError(
            f"no built PlatformIO environment in {build_root} (platformio.ini declares "
            f"{', '.join(declared) or 'none'})",
            where=str(project), hint="run `pio run` first",
        )
    raise ImageError(
        f"{len(built)} built PlatformIO environments: {_names(built)}; which one is meant?",
        where=str(project),
        hint=f"name one: {project}::{built[0].name} or {build_root / built[0].name}",
    )


def _pio_app(env_dir: Path) -> Path | None:
    app = env_dir / f"{PIO_PROGNAME}.bin"
    if app.is_file():
        return app
    # A custom PROGNAME: the .bin that has an .elf of the same name beside it.
    paired = [p for p in env_dir.glob("*.bin") if p.with_suffix(".elf").is_file()
              and p.name not in _PIO_AUX]
    return paired[0] if len(paired) == 1 else None


def _pio_env(env_dir: Path, project: Path | None,
             ini: configparser.RawConfigParser | None = None) -> Build:
    env = env_dir.name
    if ini is None and project is not None:
        ini = _read_ini(project)
    app = _pio_app(env_dir)
    if app is None:
        raise ImageError(f"no {PIO_PROGNAME}.bin in environment {env!r}; found "
                         f"{_listing(env_dir)}", where=str(env_dir),
                         hint=f"run `pio run -e {env}` first")
    app_data = _read(app)
    chip = _app_chip(app_data, app)
    missing = [name for name in ("bootloader.bin", "partitions.bin")
               if not (env_dir / name).is_file()]
    if missing:
        raise ImageError(f"incomplete PlatformIO build: missing {', '.join(missing)}; found "
                         f"{_listing(env_dir)}", where=str(env_dir),
                         hint=f"rebuild with `pio run -e {env}` (it writes them next to "
                         f"{app.name})")
    table_offset = _pio_table_offset(env_dir)
    table = parse_partition_table(_read(env_dir / "partitions.bin"))
    otadata = next((p for p in table if (p.type, p.subtype) == _SUBTYPE_OTADATA), None)
    app_offset = _pio_app_offset(ini, env)
    pairs: list[tuple[int, Path, str | None]] = [
        (BOOTLOADER_OFFSETS[chip], env_dir / "bootloader.bin", "bootloader"),
        (table_offset, env_dir / "partitions.bin", "partition-table"),
        (app_offset, app, "app"),
    ]
    notes: list[str] = []
    framework = (_ini_value(ini, env, "framework") or "") if ini is not None else ""
    if otadata is not None:
        initial = _pio_otadata(env_dir, framework, notes)
        if initial is not None:
            pairs.append((otadata.offset, initial, "otadata"))
    plan = _plan(sorted(pairs), chip, str(env_dir))
    elf = app.with_suffix(".elf")
    return Build("platformio", env_dir, plan, chip, elf if elf.is_file() else None, env,
                 tuple(notes))


def _pio_table_offset(env_dir: Path) -> int:
    # ESP-IDF-framework builds keep the resolved sdkconfig (CONFIG_PARTITION_TABLE_OFFSET).
    try:
        config = json.loads((env_dir / "config" / "sdkconfig.json").read_text(encoding="utf-8"))
        value = config.get("PARTITION_TABLE_OFFSET")
        if value is not None:
            return int(str(value), 0)
    except (OSError, ValueError, AttributeError):
        pass
    return PARTITION_TABLE_OFFSET


def _pio_app_offset(ini: configparser.RawConfigParser | None, env: str) -> int:
    if ini is not None:
        value = _ini_value(ini, env, "board_upload.offset_address")
        if value:
            return int(value, 0)
    return APP_OFFSET


def _pio_otadata(env_dir: Path, framework: str, notes: list[str]) -> Path | None:
    """Initial otadata: ESP-IDF's ota_data_initial.bin, or Arduino's boot_app0.bin (which
    PlatformIO takes from the framework package, not from the build directory).
    """
    for name in ("ota_data_initial.bin", "boot_app0.bin"):
        if (env_dir / name).is_file():
            return env_dir / name
    if "arduino" not in framework:
        if framework:
            return None
        notes.append("otadata not written: no ota_data_initial.bin or boot_app0.bin in the "
                     "build directory and no platformio.ini saying which framework built it")
        return None
    core = os.environ.get("PLATFORMIO_CORE_DIR") or str(Path.home() / ".platformio")
    found = sorted(Path(core).glob("packages/framework-arduinoespressif32*/tools/partitions/"
                                   "boot_app0.bin"))
    chosen = _one_content(found)
    if chosen is None:
        looked = f"{core}/packages/framework-arduinoespressif32*/tools/partitions/"
        raise ImageError(
            "the Arduino partition table has an otadata partition but boot_app0.bin was not "
            f"found ({'several different copies' if found else 'none'} under {looked}, none "
            "in the build directory)",
            where=str(env_dir),
            hint="copy boot_app0.bin from the arduino-esp32 framework into the build "
            "directory, or set PLATFORMIO_CORE_DIR",
        )
    notes.append(f"boot_app0.bin from {chosen}")
    return chosen
