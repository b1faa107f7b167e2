"""Build outputs people have, recognised from the path: ESP-IDF, Arduino CLI, PlatformIO, merged.

Images come from esptool itself (elf2image on the real RISC-V ELF, merge-bin) and from the
virtual rack's builder (real-format ESP-IDF images for ESP32 / S3); the directory layouts are
those the tools leave (file names and offsets cited in pytest_hilfarm/drivers/flashing/builds.py).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import board_of, open_device, read_flash
from realbuild import RealBuild, write_build_dir

from pytest_hilfarm.drivers.flashing import FlashPlan, builds, check_plan
from pytest_hilfarm.errors import ImageError
from pytest_hilfarm.esp.otadata import OtaSelectEntry, encode_otadata, initial_otadata
from pytest_hilfarm.esp.partitions import layout
from pytest_hilfarm.sim import appbuild

TWO_OTA = layout("two_ota").encode()


def esptool(*args: str, cwd: Path | None = None) -> str:
    proc = subprocess.run([sys.executable, "-m", "esptool", *args], capture_output=True,
                          text=True, cwd=cwd, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def boot_app0() -> bytes:
    # What boot_app0.bin holds: otadata whose first entry selects ota_0 (seq 1).
    return encode_otadata([OtaSelectEntry.make(1), OtaSelectEntry.erased()])


@pytest.fixture()
def no_installed_cores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Neither an arduino-esp32 nor a PlatformIO installation of the host may leak in.
    monkeypatch.setenv("ARDUINO_DIRECTORIES_DATA", str(tmp_path / "no-arduino15"))
    monkeypatch.setenv("PLATFORMIO_CORE_DIR", str(tmp_path / "no-platformio"))


def arduino_dir(root: Path, chip: str, real: RealBuild | None = None) -> Path:
    """arduino-cli compile --output-dir: <sketch>.ino.{bin,bootloader.bin,partitions.bin,elf}."""
    root.mkdir(parents=True, exist_ok=True)
    if real is not None:
        shutil.copy(real.app_bin, root / "blink.ino.bin")
        shutil.copy(real.app_elf, root / "blink.ino.elf")
        shutil.copy(real.bootloader_bin, root / "blink.ino.bootloader.bin")
    else:
        (root / "blink.ino.bin").write_bytes(appbuild.build_app(chip, "blink", "1.0"))
        (root / "blink.ino.bootloader.bin").write_bytes(appbuild.build_bootloader(chip))
    (root / "blink.ino.partitions.bin").write_bytes(TWO_OTA)
    return root


# -- ESP-IDF ----------------------------------------------------------------------------------


def test_esp_idf_build_dir_and_its_elf(real: RealBuild, tmp_path: Path) -> None:
    root = write_build_dir(real, tmp_path / "build", TWO_OTA)
    found = builds.detect(root)
    assert found.kind == "esp-idf" and found.chip == "esp32c3"
    assert found.plan == FlashPlan.from_build_dir(root)
    assert found.elf == root / "riscv_null_store.elf"  # the app .bin's stem, as idf.py names it
    # The project directory (build/ inside) and flasher_args.json itself say the same.
    assert builds.detect(tmp_path).plan == found.plan
    assert builds.detect(root / "flasher_args.json").plan == found.plan


def test_esp_idf_elf_from_project_description(tmp_path: Path) -> None:
    out = appbuild.write_build_dir(tmp_path / "b", "esp32s3", "hello", "1.0")
    (out.path / "hello.elf").write_bytes(b"\x7fELF")
    assert builds.detect(out.path).elf == out.path / "hello.elf"


# -- Arduino ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chip, boot", [("esp32", 0x1000), ("esp32s3", 0x0)])
def test_arduino_outputs_at_the_offsets_arduino_esp32_uses(
    tmp_path: Path, chip: str, boot: int, no_installed_cores: None
) -> None:
    out = arduino_dir(tmp_path / "out", chip)
    (out / "boot_app0.bin").write_bytes(boot_app0())
    found = builds.detect(out)
    assert found.kind == "arduino" and found.chip == chip
    assert [(r.offset, Path(r.name).name, r.role) for r in found.plan.regions] == [
        (boot, "blink.ino.bootloader.bin", "bootloader"),
        (0x8000, "blink.ino.partitions.bin", "partition-table"),
        (0xE000, "boot_app0.bin", "otadata"),
        (0x10000, "blink.ino.bin", "app"),
    ]
    check_plan(found.plan, chip)  # the farm's own pre-flash checks accept it


def test_arduino_real_riscv_build_with_its_elf(real: RealBuild, tmp_path: Path,
                                               no_installed_cores: None) -> None:
    out = arduino_dir(tmp_path / "out", "esp32c3", real)
    (out / "boot_app0.bin").write_bytes(boot_app0())
    found = builds.detect(out)
    assert found.chip == "esp32c3" and found.plan.regions[0].offset == 0x0
    assert found.elf == out / "blink.ino.elf"


def test_arduino_missing_parts_are_named(tmp_path: Path, no_installed_cores: None) -> None:
    out = arduino_dir(tmp_path / "out", "esp32")
    (out / "blink.ino.partitions.bin").unlink()
    with pytest.raises(ImageError) as err:
        builds.detect(out)
    text = str(err.value)
    assert "missing partition table (blink.ino.partitions.bin), boot_app0.bin (boot_app0.bin)" \
        in text
    assert "found blink.ino.bin, blink.ino.bootloader.bin" in text
    assert "--export-binaries" in text


def test_arduino_boot_app0_from_the_installed_core(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "arduino15"
    core = data / "packages/esp32/hardware/esp32/3.2.1/tools/partitions"
    core.mkdir(parents=True)
    (core / "boot_app0.bin").write_bytes(boot_app0())
    monkeypatch.setenv("ARDUINO_DIRECTORIES_DATA", str(data))
    found = builds.detect(arduino_dir(tmp_path / "out", "esp32"))
    assert found.plan.regions[2].name == str(core / "boot_app0.bin")
    assert any("boot_app0.bin from" in note for note in found.notes)


def test_arduino_flash_args_file_wins(tmp_path: Path, no_installed_cores: None) -> None:
    out = arduino_dir(tmp_path / "out", "esp32")
    (out / "boot_app0.bin").write_bytes(boot_app0())
    # arduino-esp32 3.x writes this next to the outputs (recipe.hooks.objcopy.postobjcopy).
    (out / "flash_args").write_text(
        "--flash-mode dio --flash-freq 80m --flash-size 4MB\n0x1000 blink.ino.bootloader.bin\n"
        "0x8000 blink.ino.partitions.bin\n0xe000 boot_app0.bin\n0x10000 blink.ino.bin\n")
    plan = builds.plan_for(out)
    assert (plan.flash_mode, plan.flash_freq, plan.flash_size) == ("dio", "80m", "4MB")
    assert [r.offset for r in plan.regions] == [0x1000, 0x8000, 0xE000, 0x10000]
    (out / "boot_app0.bin").unlink()
    with pytest.raises(ImageError, match=r"not there: boot_app0.bin \(at 0xe000\)"):
        builds.detect(out)


def test_arduino_merged_bin_when_parts_are_missing(tmp_path: Path,
                                                   no_installed_cores: None) -> None:
    out = arduino_dir(tmp_path / "out", "esp32")
    (out / "boot_app0.bin").write_bytes(boot_app0())
    esptool("--chip", "esp32", "merge-bin", "-o", "blink.ino.merged.bin",
            "0x1000", "blink.ino.bootloader.bin", "0x8000", "blink.ino.partitions.bin",
            "0xe000", "boot_app0.bin", "0x10000", "blink.ino.bin", cwd=out)
    (out / "boot_app0.bin").unlink()
    found = builds.detect(out)
    assert found.kind == "arduino" and "merged.bin" in found.notes[0]
    assert b"".join(r.data for r in found.plan.regions) == \
        (out / "blink.ino.merged.bin").read_bytes()


def test_two_sketches_are_ambiguous(tmp_path: Path) -> None:
    out = arduino_dir(tmp_path / "out", "esp32")
    shutil.copy(out / "blink.ino.bin", out / "other.ino.bin")
    with pytest.raises(ImageError, match="2 sketches' outputs in one directory: blink.ino.bin, "
                                         "other.ino.bin"):
        builds.detect(out)


def test_sketch_dir_with_exported_binaries(tmp_path: Path, no_installed_cores: None) -> None:
    sketch = tmp_path / "blink"
    (sketch / "blink.ino").parent.mkdir(parents=True)
    (sketch / "blink.ino").write_text("void setup() {}\nvoid loop() {}\n")
    out = arduino_dir(sketch / "build" / "esp32.esp32.esp32", "esp32")
    (out / "boot_app0.bin").write_bytes(boot_app0())
    assert builds.detect(sketch).path == out
    arduino_dir(sketch / "build" / "esp32.esp32.esp32s3", "esp32s3")
    with pytest.raises(ImageError, match="2 Arduino builds in build/"):
        builds.detect(sketch)


# -- PlatformIO -------------------------------------------------------------------------------

INI = """\
; PlatformIO Project Configuration File
[platformio]
{default}

[env]
monitor_speed = 115200

[env:esp32dev]
platform = espressif32
board = esp32dev
framework = arduino

[env:c3]
platform = espressif32
board = esp32-c3-devkitm-1
framework = espidf
"""


def pio_project(root: Path, real: RealBuild, *, default: str = "") -> Path:
    """platformio.ini + .pio/build/<env>/ as `pio run` leaves them."""
    root.mkdir(parents=True)
    (root / "platformio.ini").write_text(INI.format(default=default))
    dev = root / ".pio" / "build" / "esp32dev"
    dev.mkdir(parents=True)
    (dev / "firmware.bin").write_bytes(appbuild.build_app("esp32", "pio_app", "2.0"))
    (dev / "firmware.elf").write_bytes(b"\x7fELF")
    (dev / "bootloader.bin").write_bytes(appbuild.build_bootloader("esp32"))
    (dev / "partitions.bin").write_bytes(TWO_OTA)
    c3 = root / ".pio" / "build" / "c3"
    c3.mkdir(parents=True)
    shutil.copy(real.app_bin, c3 / "firmware.bin")
    shutil.copy(real.app_elf, c3 / "firmware.elf")
    shutil.copy(real.bootloader_bin, c3 / "bootloader.bin")
    (c3 / "partitions.bin").write_bytes(TWO_OTA)
    (c3 / "ota_data_initial.bin").write_bytes(initial_otadata())
    return root


@pytest.fixture()
def pio_core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    core = tmp_path / "platformio"
    parts = core / "packages" / "framework-arduinoespressif32" / "tools" / "partitions"
    parts.mkdir(parents=True)
    (parts / "boot_app0.bin").write_bytes(boot_app0())
    monkeypatch.setenv("PLATFORMIO_CORE_DIR", str(core))
    return parts / "boot_app0.bin"


def test_platformio_several_envs_are_ambiguous(real: RealBuild, tmp_path: Path,
                                               pio_core: Path) -> None:
    project = pio_project(tmp_path / "proj", real)
    with pytest.raises(ImageError) as err:
        builds.detect(project)
    assert "2 built PlatformIO environments: c3, esp32dev" in str(err.value)
    assert f"{project}::c3" in str(err.value)


def test_platformio_env_by_name_by_dir_and_by_default_envs(real: RealBuild, tmp_path: Path,
                                                           pio_core: Path) -> None:
    project = pio_project(tmp_path / "proj", real)
    dev = builds.detect(f"{project}::esp32dev")
    assert dev.kind == "platformio" and dev.env == "esp32dev" and dev.chip == "esp32"
    assert [(r.offset, Path(r.name).name) for r in dev.plan.regions] == [
        (0x1000, "bootloader.bin"), (0x8000, "partitions.bin"), (0xD000, "boot_app0.bin"),
        (0x10000, "firmware.bin")]
    assert dev.plan.regions[2].name == str(pio_core)  # from the framework package
    assert dev.elf == project / ".pio/build/esp32dev/firmware.elf"
    c3 = builds.detect(project / ".pio" / "build" / "c3")
    assert c3.chip == "esp32c3"
    assert [(r.offset, Path(r.name).name) for r in c3.plan.regions] == [
        (0x0, "bootloader.bin"), (0x8000, "partitions.bin"), (0xD000, "ota_data_initial.bin"),
        (0x10000, "firmware.bin")]
    only = pio_project(tmp_path / "proj2", real, default="default_envs = c3")
    assert builds.detect(only).env == "c3"


def test_platformio_unknown_unbuilt_and_incomplete(real: RealBuild, tmp_path: Path,
                                                   pio_core: Path) -> None:
    project = pio_project(tmp_path / "proj", real)
    with pytest.raises(ImageError, match=r"no environment 'nope' in platformio.ini \(it "
                                         r"declares esp32dev, c3\)"):
        builds.detect(f"{project}::nope")
    (project / ".pio/build/c3/partitions.bin").unlink()
    with pytest.raises(ImageError, match="missing partitions.bin; found bootloader.bin, "
                                         "firmware.bin, firmware.elf, ota_data_initial.bin"):
        builds.detect(f"{project}::c3")
    shutil.rmtree(project / ".pio")
    with pytest.raises(ImageError, match="no built PlatformIO environment"):
        builds.detect(project)


def test_platformio_arduino_without_boot_app0_is_refused(real: RealBuild, tmp_path: Path,
                                                         no_installed_cores: None) -> None:
    project = pio_project(tmp_path / "proj", real)
    with pytest.raises(ImageError, match="boot_app0.bin was not found"):
        builds.detect(f"{project}::esp32dev")


# -- merged images ----------------------------------------------------------------------------


def merged_esp32(tmp_path: Path, *extra: str) -> Path:
    out = appbuild.write_build_dir(tmp_path / "b", "esp32", "demo", "1.0", layout="two_ota")
    esptool("--chip", "esp32", "merge-bin", "-o", "merged.bin", *extra,
            "0x1000", "bootloader/bootloader.bin", "0x8000", "partition_table/partition-table.bin",
            "0xd000", "ota_data_initial.bin", "0x10000", "demo.bin", cwd=out.path)
    return out.path / "merged.bin"


def test_merged_image_is_split_and_covers_every_byte(tmp_path: Path) -> None:
    merged = merged_esp32(tmp_path)
    found = builds.detect(merged)
    assert found.kind == "merged" and found.chip == "esp32"
    regions = found.plan.regions
    data = merged.read_bytes()
    assert regions[0].offset == 0 and b"".join(r.data for r in regions) == data
    assert all(a.offset + a.size == b.offset for a, b in zip(regions, regions[1:]))
    roles = {r.offset: r.role for r in regions}
    assert roles[0x1000] == "bootloader" and roles[0x8000] == "partition-table"
    assert roles[0x9000] == "nvs" and roles[0xD000] == "otadata" and roles[0x10000] == "factory"
    check_plan(found.plan, "esp32")
    with pytest.raises(ImageError, match="the build is for esp32 but the board is an esp32c3"):
        check_plan(found.plan, "esp32c3")


def test_merged_image_with_a_target_offset(tmp_path: Path) -> None:
    merged = merged_esp32(tmp_path, "--target-offset", "0x1000")
    regions = builds.plan_for(merged).regions
    assert regions[0].offset == 0x1000 and regions[0].role == "bootloader"
    assert b"".join(r.data for r in regions) == merged.read_bytes()


def test_merged_riscv_image_and_plain_app(real: RealBuild, tmp_path: Path) -> None:
    (tmp_path / "pt.bin").write_bytes(TWO_OTA)
    esptool("--chip", "esp32c3", "merge-bin", "-o", str(tmp_path / "m.bin"),
            "0x0", str(real.bootloader_bin), "0x8000", str(tmp_path / "pt.bin"),
            "0x10000", str(real.app_bin))
    found = builds.detect(tmp_path / "m.bin")
    assert found.chip == "esp32c3" and found.plan.regions[0].role == "bootloader"
    app = builds.detect(real.app_bin)  # a single app image is still just that
    assert app.kind == "image" and [(r.offset, r.role) for r in app.plan.regions] == [
        (0x10000, "app")]
    assert app.elf == real.app_elf


def test_bootloader_without_table_is_not_taken_for_an_app(real: RealBuild, tmp_path: Path
                                                          ) -> None:
    esptool("--chip", "esp32c3", "merge-bin", "-o", str(tmp_path / "m.bin"),
            "0x0", str(real.bootloader_bin), "0x10000", str(real.app_bin))
    with pytest.raises(ImageError, match="no partition table at file offset 0x8000"):
        builds.detect(tmp_path / "m.bin")


def test_unrecognised_directory_says_what_it_looked_for(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ImageError) as err:
        builds.detect(tmp_path)
    assert "no flasher_args.json (ESP-IDF), platformio.ini" in str(err.value)
    assert "found: notes.txt" in str(err.value)
    with pytest.raises(ImageError, match="does not exist"):
        builds.detect(tmp_path / "missing")


# -- on the virtual rack ----------------------------------------------------------------------


def test_merged_image_flashes_like_esptool_write_at_zero(rack, tmp_path: Path) -> None:
    merged = merged_esp32(tmp_path)
    board = board_of(rack, "esp32")
    device = open_device(rack, board, tmp_path / "dut.log")
    try:
        device.flash(builds.plan_for(merged))
        boot = device.boot_info()
        assert (boot.project, boot.app_version) == ("demo", "1.0")
        again = device.flash(builds.plan_for(merged))
        assert again.written == ()  # every part already identical: nothing written
    finally:
        device.console.close()
    size = merged.stat().st_size
    assert read_flash(rack, board, 0, size, tmp_path / "back.bin") == merged.read_bytes()
