import argparse
import contextlib
import io
import json
import subprocess
import sys
import zlib

import pytest
from esptool.cmds import image_info
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_hilfarm.cli.sim_build import add_build_app_parser
from pytest_hilfarm.errors import ImageError
from pytest_hilfarm.esp.chips import FARM_CHIPS as CHIPS
from pytest_hilfarm.esp.image import build_app_image, chip_id_of, memory_map, parse_image
from pytest_hilfarm.esp.partitions import PartitionTable, factory_layout, two_ota_layout
from pytest_hilfarm.sim.appbuild import (
    build_app,
    build_bootloader,
    build_flash_layout,
    encode_faults,
    read_faults,
    write_build_dir,
)
from pytest_hilfarm.sim.model import Faults

BOOT_OFFSET = {"esp32": 0x1000, "esp32s2": 0x1000, "esp32c3": 0x0, "esp32s3": 0x0, "esp32c6": 0x0}


def esptool_info(data, chip):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        image_info(data, chip=chip)
    return out.getvalue()


def assert_esptool_accepts(data, chip):
    info = esptool_info(data, chip)
    assert f"Chip ID: {chip_id_of(chip)}" in info
    assert "(valid)" in info.split("Checksum:")[1].splitlines()[0]
    assert "(valid)" in info.split("Validation hash:")[1].splitlines()[0]
    return info


@pytest.mark.parametrize("chip", CHIPS)
def test_app_image_is_real_format(chip):
    data = build_app(chip, "blink", "1.2.3", secure_version=4, idf_ver="v5.2.2")
    img = parse_image(data, chip=chip)
    mm = memory_map(chip)
    assert mm.is_irom(img.header.entry_addr)
    assert img.segments[0].data_offset == 0x20 and mm.is_drom(img.segments[0].load_addr)
    assert any(mm.is_irom(s.load_addr) for s in img.segments)
    desc = img.app_desc
    assert desc is not None
    assert (desc.project_name, desc.version, desc.secure_version, desc.idf_ver) == \
        ("blink", "1.2.3", 4, "v5.2.2")
    info = assert_esptool_accepts(data, chip)
    assert "Project name: blink" in info and "Secure version: 4" in info


@pytest.mark.parametrize("chip", CHIPS)
def test_bootloader_image(chip):
    data = build_bootloader(chip)
    img = parse_image(data, chip=chip)
    assert img.app_desc is None
    assert img.bootloader_desc is not None and img.bootloader_desc.idf_ver == "v5.3.1"
    info = assert_esptool_accepts(data, chip)
    if chip != "esp32c6":
        # esptool image-info reads esp_bootloader_desc_t from the *last* segment it types as
        # DRAM; on the C6 every RAM segment is DRAM (one address space), so it looks at the
        # last one and shows nothing, as for real C6 bootloaders.
        assert "Bootloader Information" in info


@pytest.mark.parametrize("chip", CHIPS)
def test_esptool_cli_image_info(tmp_path, chip):
    path = tmp_path / "app.bin"
    path.write_bytes(build_app(chip, "cli", "9"))
    out = subprocess.run([sys.executable, "-m", "esptool", "--chip", chip, "image-info",
                          str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Project name: cli" in out.stdout and "invalid" not in out.stdout


faults_st = st.builds(
    Faults,
    crash_at_boot=st.booleans(), hang_at_boot=st.booleans(), fail_self_test=st.booleans(),
    slow_boot=st.floats(0, 1e4, allow_nan=False), drop_mesh=st.floats(0, 1, allow_nan=False),
)


@settings(max_examples=25, deadline=None)
@given(faults=faults_st, chip=st.sampled_from(CHIPS))
def test_faults_round_trip(faults, chip):
    assert read_faults(build_app(chip, "f", "1", faults=faults)) == faults


def test_fault_encoding_is_readable_ascii():
    raw = encode_faults(Faults(crash_at_boot=True, slow_boot=2.5))
    assert raw == (b'HILFARM-FAULTS{"crash_at_boot":true,"drop_mesh":0.0,"fail_self_test":false,'
                   b'"hang_at_boot":false,"slow_boot":2.5}\0')
    assert raw in build_app("esp32", "f", "1", faults=Faults(crash_at_boot=True, slow_boot=2.5))


def test_image_without_marker_has_no_faults():
    mm = memory_map("esp32")
    from pytest_hilfarm.esp.image import AppDesc

    data = build_app_image("esp32", [(mm.drom_start + 0x20, b"x" * 16),
                                     (mm.irom_start + 0x20, b"y" * 16)],
                           entry=mm.irom_start + 0x20, app_desc=AppDesc(project_name="p"))
    assert read_faults(data) == Faults()
    with pytest.raises(ImageError, match="not an app image"):
        read_faults(b"\xff" * 400)


@pytest.mark.parametrize("bad", [Faults(drop_mesh=1.5), Faults(slow_boot=-1)])
def test_bad_faults_rejected(bad):
    with pytest.raises(ImageError):
        build_app("esp32", "p", "1", faults=bad)


def test_deterministic_and_distinct():
    a = build_app("esp32c3", "p", "1")
    assert a == build_app("esp32c3", "p", "1")
    assert a != build_app("esp32c3", "p", "2")
    assert a != build_app("esp32c3", "p", "1", faults=Faults(hang_at_boot=True))


def test_bad_project_name():
    with pytest.raises(ImageError, match="project name"):
        build_app("esp32", "no/slashes", "1")


@pytest.mark.parametrize("chip", CHIPS)
def test_pad_to_one_megabyte(chip):
    data = build_app(chip, "bench", "1", pad_to="1MB")
    assert 1024 * 1024 - 64 <= len(data) <= 1024 * 1024
    assert len(zlib.compress(data, 1)) < len(data) // 20
    img = parse_image(data, chip=chip)
    assert img.checksum_ok and img.sha256_ok
    assert read_faults(data) == Faults()


def test_pad_to_too_small():
    with pytest.raises(ImageError, match="smaller than the unpadded image"):
        build_app("esp32", "p", "1", pad_to=1000)


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("layout", ["factory", "two-ota"])
def test_flash_layout(chip, layout):
    app = build_app(chip, "p", "1")
    parts = build_flash_layout(chip, app, layout)
    offsets = [off for off, _ in parts]
    expected = [BOOT_OFFSET[chip], 0x8000] + ([0xD000] if layout == "two-ota" else []) + [0x10000]
    assert offsets == expected
    data = dict(parts)
    assert parse_image(data[BOOT_OFFSET[chip]], chip=chip).bootloader_desc is not None
    table = PartitionTable.decode(data[0x8000])
    assert table.entries == (two_ota_layout() if layout == "two-ota" else factory_layout()).entries
    if layout == "two-ota":
        assert data[0xD000] == b"\xff" * 0x2000
    assert data[0x10000] == app


def test_flash_layout_rejects_wrong_chip_and_big_app():
    with pytest.raises(ImageError, match="for esp32c3, not esp32"):
        build_flash_layout("esp32", build_app("esp32c3", "p", "1"))
    with pytest.raises(ImageError, match="holds"):
        build_flash_layout("esp32", b"\xe9" + bytes(15) + bytes(2 << 20))


def test_write_build_dir_two_ota(tmp_path):
    out = write_build_dir(tmp_path / "build", "esp32", "my_app", "3.0", layout="two-ota",
                          faults=Faults(fail_self_test=True))
    root = tmp_path / "build"
    args = json.loads((root / "flasher_args.json").read_text())
    assert args == {
        "write_flash_args": ["--flash_mode", "dio", "--flash_size", "4MB", "--flash_freq", "40m"],
        "flash_settings": {"flash_mode": "dio", "flash_size": "4MB", "flash_freq": "40m"},
        "flash_files": {"0x1000": "bootloader/bootloader.bin",
                        "0x8000": "partition_table/partition-table.bin",
                        "0xd000": "ota_data_initial.bin", "0x10000": "my_app.bin"},
        "bootloader": {"offset": "0x1000", "file": "bootloader/bootloader.bin",
                       "encrypted": "false"},
        "app": {"offset": "0x10000", "file": "my_app.bin", "encrypted": "false"},
        "partition-table": {"offset": "0x8000", "file": "partition_table/partition-table.bin",
                            "encrypted": "false"},
        "otadata": {"offset": "0xd000", "file": "ota_data_initial.bin", "encrypted": "false"},
        "extra_esptool_args": {"after": "hard_reset", "before": "default_reset", "stub": True,
                               "chip": "esp32"},
    }
    for rel in args["flash_files"].values():
        assert (root / rel).is_file()
    assert out.app_bin == root / "my_app.bin"
    assert read_faults(out.app_bin.read_bytes()) == Faults(fail_self_test=True)
    assert json.loads((root / "config" / "sdkconfig.json").read_text())["IDF_TARGET"] == "esp32"


def test_flash_size_reaches_headers(tmp_path):
    out = write_build_dir(tmp_path, "esp32", "p", "1", layout="two-ota", flash_size="8MB")
    assert parse_image(out.app_bin.read_bytes()).header.spi_size == 3  # 8MB
    boot = (tmp_path / "bootloader" / "bootloader.bin").read_bytes()
    assert parse_image(boot).header.spi_size == 3
    assert json.loads(out.flasher_args.read_text())["flash_settings"]["flash_size"] == "8MB"
    with pytest.raises(ImageError, match="2 MB flash"):
        write_build_dir(tmp_path / "x", "esp32", "p", "1", layout="two-ota", flash_size="2MB")


def test_write_build_dir_factory_c3(tmp_path):
    write_build_dir(tmp_path, "esp32c3", "p", "1")
    args = json.loads((tmp_path / "flasher_args.json").read_text())
    assert args["flash_files"] == {"0x0": "bootloader/bootloader.bin",
                                   "0x8000": "partition_table/partition-table.bin",
                                   "0x10000": "p.bin"}
    assert "otadata" not in args and not (tmp_path / "ota_data_initial.bin").exists()
    assert args["flash_settings"]["flash_freq"] == "80m"


def parser():
    p = argparse.ArgumentParser(prog="hilfarm sim")
    add_build_app_parser(p.add_subparsers())
    return p


def test_cli_build_app(tmp_path, capsys):
    args = parser().parse_args([
        "build-app", "--chip", "esp32s2", "--project", "demo", "--version", "2.0",
        "--secure-version", "1", "--layout", "two-ota", "--crash-at-boot", "--slow-boot", "1.5",
        "--drop-mesh", "0.25", "-o", str(tmp_path / "b")])
    assert args.handler(args) == 0
    data = (tmp_path / "b" / "demo.bin").read_bytes()
    desc = parse_image(data, chip="esp32s2").app_desc
    assert desc is not None and (desc.version, desc.secure_version) == ("2.0", 1)
    assert read_faults(data) == Faults(crash_at_boot=True, slow_boot=1.5, drop_mesh=0.25)
    assert (tmp_path / "b" / "ota_data_initial.bin").exists()
    assert "demo.bin" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--drop-mesh", "2"], ["--slow-boot", "-1"],
                                  ["--pad-to", "huge"], ["--chip", "esp8266"]])
def test_cli_rejects_bad_values(tmp_path, argv, capsys):
    base = ["build-app", "--chip", "esp32", "-o", str(tmp_path)]
    with pytest.raises(SystemExit):
        parser().parse_args(base + argv)
