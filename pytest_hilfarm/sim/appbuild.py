"""Synthetic but real-format ESP-IDF builds for the virtual rack: app, bootloader, build dir.

Produces images that ``esptool image-info`` accepts (right chip_id, DROM segment starting with
``esp_app_desc_t`` at offset 0x20, IROM segment, checksum, appended SHA-256) and a build
directory shaped like ``idf.py build`` output. Faults are properties of the image: they are
stored as ``HILFARM-FAULTS{json}`` in the DROM segment right after the app descriptor. That
record is also the demo-app marker: every image built here carries it, and a virtual board runs
its demo app only for images that do (:func:`has_demo_marker`).
Deterministic: the same inputs give the same bytes (so on-device MD5 checks can skip a flash).
It never talks to boards or ports.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from pytest_hilfarm.errors import ImageError
from pytest_hilfarm.esp.chips import FARM_CHIPS
from pytest_hilfarm.esp.image import (
    APP_DESC_OFFSET,
    APP_DESC_SIZE,
    AppDesc,
    BootloaderDesc,
    build_app_image,
    chip_for_id,
    memory_map,
)
from pytest_hilfarm.esp.otadata import initial_otadata
from pytest_hilfarm.esp.partitions import TABLE_OFFSET, PartitionTable, parse_size
from pytest_hilfarm.esp.partitions import layout as named_layout
from pytest_hilfarm.sim.model import Faults

FAULTS_MARKER = b"HILFARM-FAULTS"
# Fixed build stamp so builds are reproducible (a real build stamps __DATE__/__TIME__).
BUILD_DATE = "Nov 28 2026"
BUILD_TIME = "05:00:00"
DEFAULT_IDF_VER = "v5.3.1"


@dataclass(frozen=True)
class _ChipBuild:
    """Per-chip build constants for the synthetic images.

    RAM addresses are taken from real ESP-IDF v5.x boot logs / linker scripts of each chip, and
    lie inside esptool's MEMORY_MAP DRAM/IRAM windows so ``image-info`` labels them right.
    """

    flash_freq: str  # sdkconfig default (ESPTOOLPY_FLASHFREQ)
    app_dram: int
    app_iram: int
    boot_dram: int
    boot_iram: tuple[int, ...]
    boot_entry: int
    min_rev_full: int  # CONFIG_<CHIP>_REV_MIN_FULL default
    max_rev_full: int  # CONFIG_<CHIP>_REV_MAX_FULL (esp_hw_support Kconfig)


_CHIP_BUILD: Mapping[str, _ChipBuild] = MappingProxyType({
    "esp32": _ChipBuild("40m", 0x3FFB0000, 0x40080000, 0x3FFF0030, (0x40078000, 0x40080400),
                        0x40080640, 0, 399),
    "esp32s2": _ChipBuild("80m", 0x3FFBE000, 0x40024000, 0x3FFE6100, (0x4004C000, 0x40050000),
                          0x4004C1A4, 0, 199),
    "esp32c3": _ChipBuild("80m", 0x3FC8A600, 0x40380000, 0x3FCD5820, (0x403CC710, 0x403CE710),
                          0x403CC71A, 3, 199),
    # ESP32-S3 / ESP32-C6: addresses of ESP-IDF v5.1 boot logs (S3 bootloader load:0x3fce3818,
    # 0x403c9700, 0x403cc700, entry 0x403c9908; C6 0x4086c410, 0x4086e610, entry 0x4086c41a);
    # revision limits CONFIG_ESP32S3_REV_MAX_FULL = 99, CONFIG_ESP32C6_REV_MAX_FULL = 99.
    "esp32s3": _ChipBuild("80m", 0x3FC93000, 0x40374000, 0x3FCE3818, (0x403C9700, 0x403CC700),
                          0x403C9908, 0, 99),
    "esp32c6": _ChipBuild("80m", 0x40810000, 0x40800000, 0x4086C410, (0x4086E610, 0x40875720),
                          0x4086C41A, 0, 99),
})

_PROJECT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,31}$")


def _chip(chip: str) -> _ChipBuild:
    if chip not in _CHIP_BUILD:
        raise ImageError(f"unsupported chip {chip!r}", hint=f"use one of {', '.join(FARM_CHIPS)}")
    return _CHIP_BUILD[chip]


def flash_freq_of(chip: str) -> str:
    return _chip(chip).flash_freq


def encode_faults(faults: Faults) -> bytes:
    """``HILFARM-FAULTS`` + compact sorted JSON of every field + NUL.

    ``unity_menu`` is written only when set, so every other demo image keeps its bytes.
    """
    body = json.dumps(_fault_fields(faults), sort_keys=True, separators=(",", ":"))
    return FAULTS_MARKER + body.encode() + b"\0"


def _fault_fields(faults: Faults) -> dict[str, object]:
    fields = dataclasses.asdict(faults)
    # Written only when set, so every image built before these fields keeps its exact bytes.
    for name in ("unity_menu", "panic_pc", "panic_ra"):
        if not fields[name]:
            del fields[name]
    return fields


def _check_faults(faults: Faults) -> None:
    if faults.slow_boot < 0:
        raise ImageError(f"slow_boot must be >= 0 seconds, got {faults.slow_boot}")
    if not 0.0 <= faults.drop_mesh <= 1.0:
        raise ImageError(f"drop_mesh is a fraction 0..1, got {faults.drop_mesh}")


def has_demo_marker(segment_data: bytes) -> bool:
    """Whether the first (DROM) segment's data carries the demo-app marker after the descriptor.

    Looked for where :func:`build_app` puts it (right after ``esp_app_desc_t``), so a real
    build that happens to contain the text elsewhere is not taken for a demo build.
    """
    return segment_data[APP_DESC_SIZE : APP_DESC_SIZE + len(FAULTS_MARKER)] == FAULTS_MARKER


def faults_from_desc_segment(segment_data: bytes) -> Faults:
    """Faults stored after ``esp_app_desc_t`` in the first (DROM) segment's data."""
    window = segment_data[APP_DESC_SIZE : APP_DESC_SIZE + 1024]
    at = window.find(FAULTS_MARKER)
    if at < 0:
        return Faults()
    text = window[at + len(FAULTS_MARKER) :].split(b"\0", 1)[0].decode("utf-8", "replace")
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ImageError(f"unreadable fault record {text!r}: {exc}",
                         where=f"image offset 0x{APP_DESC_OFFSET + APP_DESC_SIZE + at:x}") from None
    if not isinstance(raw, dict):
        raise ImageError(f"fault record is not a JSON object: {text!r}")
    known = {f.name: f.type for f in dataclasses.fields(Faults)}
    # Unknown keys are ignored so an older farm can still boot a newer image.
    values = {k: v for k, v in raw.items() if k in known}
    try:
        return Faults(
            crash_at_boot=bool(values.get("crash_at_boot", False)),
            hang_at_boot=bool(values.get("hang_at_boot", False)),
            fail_self_test=bool(values.get("fail_self_test", False)),
            slow_boot=float(values.get("slow_boot", 0.0)),
            drop_mesh=float(values.get("drop_mesh", 0.0)),
            unity_menu=bool(values.get("unity_menu", False)),
            panic_pc=int(values.get("panic_pc", 0)),
            panic_ra=int(values.get("panic_ra", 0)),
        )
    except (TypeError, ValueError) as exc:
        raise ImageError(f"bad value in fault record {text!r}: {exc}") from None


def read_faults(image: bytes) -> Faults:
    """The faults built into an app image (``Faults()`` when it carries none)."""
    if len(image) < APP_DESC_OFFSET + APP_DESC_SIZE or image[0] != 0xE9:
        raise ImageError("not an app image (too short or no 0xE9 magic)", where="image offset 0x0")
    return faults_from_desc_segment(image[APP_DESC_OFFSET : APP_DESC_OFFSET + APP_DESC_SIZE + 1024])


def _elf_sha(*parts: str) -> bytes:
    # There is no ELF; a digest of the build inputs stands in for app_elf_sha256.
    return hashlib.sha256("\0".join(parts).encode()).digest()


def _code(seed: bytes, n: int) -> bytes:
    """Deterministic non-trivial "code" bytes (a SHA-256 chain)."""
    out = bytearray()
    block = seed
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


def _pattern(n: int) -> bytes:
    """Compressible filler (a repeated 64-byte line) for padded benchmark images."""
    line = b"HILFARM padding: compressible filler for benchmark-sized images.\n"
    return (line * (n // len(line) + 1))[:n]


def build_app(
    chip: str,
    project: str,
    version: str,
    secure_version: int = 0,
    idf_ver: str = DEFAULT_IDF_VER,
    faults: Faults = Faults(),  # noqa: B008 - frozen record, safe as a default
    pad_to: int | str | None = None,
    *,
    flash_size: str = "4MB",
    elf_sha256: bytes | None = None,
) -> bytes:
    """An ESP-IDF-format app image for ``chip`` (see the module docstring).

    ``flash_size`` goes into the image header (esptool ``--flash-size``), as idf.py does.
    ``elf_sha256`` is the app descriptor's ``app_elf_sha256`` (as esptool elf2image patches it
    in from the ELF); by default a digest of the build inputs stands in, as there is no ELF.

    ``pad_to`` grows the IROM segment with compressible filler so the image is just under that
    size (at most ``pad_to`` bytes, within 64 bytes of it), e.g. ``"1MB"`` for benchmarks.
    """
    cb = _chip(chip)
    if not _PROJECT_RE.match(project):
        raise ImageError(f"project name {project!r} must be 1-31 characters of A-Z a-z 0-9 _ . -")
    if not 0 <= secure_version <= 0xFFFFFFFF:
        raise ImageError(f"secure_version must be a 32-bit unsigned value, got {secure_version}")
    _check_faults(faults)
    mm = memory_map(chip)
    desc = AppDesc(
        project_name=project, version=version, secure_version=secure_version, idf_ver=idf_ver,
        time=BUILD_TIME, date=BUILD_DATE,
        app_elf_sha256=elf_sha256 or _elf_sha(
            chip, project, version, str(secure_version), idf_ver,
            json.dumps(_fault_fields(faults), sort_keys=True)),
        mmu_page_size=16,  # log2(64 KiB), CONFIG_MMU_PAGE_SIZE
    )
    rodata = encode_faults(faults) + f"{project} {version}\0".encode()
    seed = f"{chip}/{project}/{version}".encode()
    text = _code(seed + b"/irom", 512)
    dram = _code(seed + b"/dram", 256)
    iram = _code(seed + b"/iram", 256)

    def make(extra: int) -> bytes:
        return build_app_image(
            chip,
            [
                (mm.drom_start + APP_DESC_OFFSET, rodata, ".flash.rodata"),
                (cb.app_dram, dram, ".dram0.data"),
                (cb.app_iram, iram, ".iram0.text"),
                (mm.irom_start + APP_DESC_OFFSET, text + _pattern(extra), ".flash.text"),
            ],
            # The entry point is put at the start of the IROM segment, as requested for the sim;
            # a real ESP-IDF app enters call_start_cpu0 in IRAM.
            entry=mm.irom_start + APP_DESC_OFFSET,
            app_desc=desc,
            flash_freq=cb.flash_freq,
            flash_size=flash_size,
            min_chip_rev_full=cb.min_rev_full,
            max_chip_rev_full=cb.max_rev_full,
        )

    image = make(0)
    if pad_to is not None:
        target = parse_size(pad_to)
        if target < len(image):
            raise ImageError(f"pad_to {target} is smaller than the unpadded image "
                             f"({len(image)} bytes)")
        extra = (target - len(image) - 64) // 16 * 16
        if extra > 0:
            image = make(extra)
            # ESP32's esptool pads a flash segment that ends just past a 64 KiB page; trim back.
            while len(image) > target and extra > 0:
                extra -= 64
                image = make(extra)
    return image


def build_bootloader(chip: str, idf_ver: str = DEFAULT_IDF_VER, *,
                     flash_size: str = "4MB") -> bytes:
    """A second-stage bootloader image for ``chip``: RAM segments only, with
    ``esp_bootloader_desc_t`` at offset 0x20 (IDF ``.dram0.bootdesc``). The real descriptor has
    no project name; ``project_name``-style identification is the desc's magic 0x50.
    """
    cb = _chip(chip)
    desc = BootloaderDesc(version=1, idf_ver=idf_ver, date_time=f"{BUILD_DATE} {BUILD_TIME}")
    seed = f"{chip}/bootloader".encode()
    segs: list[tuple[int, bytes, str]] = [
        (cb.boot_dram, desc.encode() + _code(seed + b"/dram", 176), ".dram0.bootdesc"),
    ]
    for i, addr in enumerate(cb.boot_iram):
        segs.append((addr, _code(seed + b"/iram%d" % i, 1024), f".iram{i}.text"))
    return build_app_image(chip, segs, entry=cb.boot_entry, flash_freq=cb.flash_freq,
                           flash_size=flash_size, min_chip_rev_full=cb.min_rev_full,
                           max_chip_rev_full=0)


def partition_table_for(layout_name: str, flash_size: str = "4MB") -> PartitionTable:
    return named_layout(layout_name, flash_size)


def build_flash_layout(
    chip: str, app: bytes, layout: str = "factory", flash_size: str = "4MB",
    idf_ver: str = DEFAULT_IDF_VER,
) -> list[tuple[int, bytes]]:
    """``(offset, data)`` pairs to write: bootloader (0x1000 on ESP32/S2, 0x0 on C3), partition
    table 0x8000, ``ota_data_initial.bin`` at otadata (two-ota), app at the factory partition.
    """
    mm = memory_map(chip)
    table = partition_table_for(layout, flash_size)
    if len(app) < 16 or app[0] != 0xE9:
        raise ImageError("app is not an ESP image (no 0xE9 magic)", where="app offset 0x0")
    app_chip = chip_for_id(int.from_bytes(app[12:14], "little"))
    if app_chip != chip:
        raise ImageError(f"app image is for {app_chip or 'an unknown chip'}, not {chip}",
                         where="app offset 0xc", hint="rebuild the app for this chip")
    factory = table.factory
    assert factory is not None
    if len(app) > factory.size:
        raise ImageError(f"app is {len(app)} bytes; partition {factory.label!r} holds "
                         f"{factory.size}")
    out: list[tuple[int, bytes]] = [
        (mm.bootloader_offset, build_bootloader(chip, idf_ver, flash_size=flash_size)),
        (TABLE_OFFSET, table.encode()),
    ]
    otadata = table.otadata
    if otadata is not None:
        out.append((otadata.offset, initial_otadata()))
    out.append((factory.offset, app))
    return out


@dataclass(frozen=True)
class BuildDir:
    """What :func:`write_build_dir` wrote: ``flash_files`` are ``(offset, path relative to
    path)`` in flashing order.
    """

    path: Path
    app_bin: Path
    flasher_args: Path
    flash_files: tuple[tuple[int, str], ...]


def write_build_dir(
    path: str | Path,
    chip: str,
    project: str,
    version: str,
    *,
    secure_version: int = 0,
    idf_ver: str = DEFAULT_IDF_VER,
    faults: Faults = Faults(),  # noqa: B008 - frozen record, safe as a default
    pad_to: int | str | None = None,
    layout: str = "factory",
    flash_size: str = "4MB",
    elf_sha256: bytes | None = None,
) -> BuildDir:
    """Write an ESP-IDF-like ``build/`` directory (see docs: esp-idf-build-outputs.md)."""
    root = Path(path)
    app = build_app(chip, project, version, secure_version, idf_ver, faults, pad_to,
                    flash_size=flash_size, elf_sha256=elf_sha256)
    parts = build_flash_layout(chip, app, layout, flash_size, idf_ver)
    table = partition_table_for(layout, flash_size)
    names = {
        memory_map(chip).bootloader_offset: "bootloader/bootloader.bin",
        TABLE_OFFSET: "partition_table/partition-table.bin",
    }
    if table.otadata is not None:
        names[table.otadata.offset] = "ota_data_initial.bin"
    factory = table.factory
    assert factory is not None
    names[factory.offset] = f"{project}.bin"
    files: list[tuple[int, str]] = []
    for offset, data in parts:
        rel = names[offset]
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        files.append((offset, rel))

    freq = flash_freq_of(chip)
    boot_off = memory_map(chip).bootloader_offset
    args: dict[str, object] = {
        # esptool 4 spellings, exactly as idf.py writes them (consumers translate).
        "write_flash_args": ["--flash_mode", "dio", "--flash_size", flash_size,
                             "--flash_freq", freq],
        "flash_settings": {"flash_mode": "dio", "flash_size": flash_size, "flash_freq": freq},
        "flash_files": {hex(off): rel for off, rel in files},
        "bootloader": {"offset": hex(boot_off), "file": names[boot_off], "encrypted": "false"},
        "app": {"offset": hex(factory.offset), "file": f"{project}.bin", "encrypted": "false"},
        "partition-table": {"offset": hex(TABLE_OFFSET), "file": names[TABLE_OFFSET],
                            "encrypted": "false"},
    }
    if table.otadata is not None:
        args["otadata"] = {"offset": hex(table.otadata.offset), "file": "ota_data_initial.bin",
                           "encrypted": "false"}
    args["extra_esptool_args"] = {"after": "hard_reset", "before": "default_reset",
                                  "stub": True, "chip": chip}
    flasher_args = root / "flasher_args.json"
    flasher_args.write_text(json.dumps(args, indent=4) + "\n")
    (root / "config").mkdir(exist_ok=True)
    (root / "config" / "sdkconfig.json").write_text(json.dumps(
        {"IDF_TARGET": chip, "APP_PROJECT_VER": version,
         "BOOTLOADER_APP_SECURE_VERSION": secure_version,
         "PARTITION_TABLE_TWO_OTA": table.otadata is not None,
         "ESPTOOLPY_FLASHSIZE": flash_size}, indent=4) + "\n")
    (root / "project_description.json").write_text(json.dumps(
        {"project_name": project, "project_version": version, "target": chip,
         "idf_ver": idf_ver, "app_bin": f"{project}.bin", "build_dir": str(root.resolve()),
         "app_elf": f"{project}.elf"}, indent=4) + "\n")
    return BuildDir(root, root / f"{project}.bin", flasher_args, tuple(files))
