"""Real RISC-V builds for the ESP32-C3, made here with Debian's riscv64-unknown-elf GCC.

``data/riscv/app.c`` + ``app.ld`` (an app with an ``esp_app_desc_t`` and no demo-app marker,
whose ``app_main`` stores to address 0) and ``bootloader.c`` + ``bootloader.ld`` (RAM segments,
no ``esp_bootloader_desc_t``, as an ESP-IDF 5.0 bootloader) are compiled with
``-march=rv32imc -mabi=ilp32`` and converted by ``esptool elf2image --chip esp32c3``. Nothing
here goes through the virtual rack's own image builder.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data" / "riscv"
GCC = "riscv64-unknown-elf-gcc"
CFLAGS = ("-march=rv32imc", "-mabi=ilp32", "-Os", "-nostdlib", "-ffreestanding")


@dataclass(frozen=True)
class RealBuild:
    app_elf: Path
    app_bin: Path
    bootloader_elf: Path
    bootloader_bin: Path
    version: str
    gcc_version: str
    compile_time: str  # the "compile time" literal in the bootloader binary

    @property
    def elf_sha256(self) -> str:
        return hashlib.sha256(self.app_elf.read_bytes()).hexdigest()


def _run(*argv: str, cwd: Path) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(argv)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def build(out: Path, *, version: str = "1.4.2", min_rev_full: int = 3) -> RealBuild:
    """Compile and convert both programs into ``out`` (skips when the toolchain is missing)."""
    if shutil.which(GCC) is None:
        pytest.skip(f"{GCC} is not installed (Debian: gcc-riscv64-unknown-elf)")
    out.mkdir(parents=True, exist_ok=True)
    _run(GCC, *CFLAGS, f'-DAPP_VERSION="{version}"', "-T", str(DATA / "app.ld"), "-o",
         "app.elf", str(DATA / "app.c"), cwd=out)
    _run(GCC, *CFLAGS, "-T", str(DATA / "bootloader.ld"), "-o", "bootloader.elf",
         str(DATA / "bootloader.c"), cwd=out)
    esptool = (sys.executable, "-m", "esptool", "--chip", "esp32c3", "elf2image")
    # ESP-IDF 5 builds for the C3 require v0.3..v1.99 (CONFIG_ESP32C3_REV_MIN_FULL = 3).
    _run(*esptool, "--min-rev-full", str(min_rev_full), "--max-rev-full", "199",
         "--elf-sha256-offset", "0xb0", "-o", "app.bin", "app.elf", cwd=out)
    _run(*esptool, "--min-rev-full", str(min_rev_full), "--max-rev-full", "199",
         "-o", "bootloader.bin", "bootloader.elf", cwd=out)
    gcc_version = _run(GCC, "-dumpversion", cwd=out).strip()
    literal = re.search(rb"compile time ([A-Z][a-z]{2} [ 0-3]\d \d{4} \d\d:\d\d:\d\d)",
                        (out / "bootloader.elf").read_bytes())
    assert literal is not None
    return RealBuild(out / "app.elf", out / "app.bin", out / "bootloader.elf",
                     out / "bootloader.bin", version, gcc_version, literal.group(1).decode())


def write_build_dir(real: RealBuild, root: Path, table: bytes) -> Path:
    """Lay the build out as ``idf.py build`` does (``flasher_args.json`` in esptool 4 spellings,
    bootloader/, partition_table/, the app .bin) so the farm reads it as a user's build dir.
    """
    (root / "bootloader").mkdir(parents=True, exist_ok=True)
    (root / "partition_table").mkdir(exist_ok=True)
    shutil.copy(real.bootloader_bin, root / "bootloader" / "bootloader.bin")
    (root / "partition_table" / "partition-table.bin").write_bytes(table)
    shutil.copy(real.app_bin, root / "riscv_null_store.bin")
    shutil.copy(real.app_elf, root / "riscv_null_store.elf")
    files = {"0x0": "bootloader/bootloader.bin", "0x8000": "partition_table/partition-table.bin",
             "0x10000": "riscv_null_store.bin"}
    args = {
        "write_flash_args": ["--flash_mode", "dio", "--flash_size", "4MB", "--flash_freq",
                             "80m"],
        "flash_settings": {"flash_mode": "dio", "flash_size": "4MB", "flash_freq": "80m"},
        "flash_files": files,
        "bootloader": {"offset": "0x0", "file": files["0x0"], "encrypted": "false"},
        "app": {"offset": "0x10000", "file": files["0x10000"], "encrypted": "false"},
        "partition-table": {"offset": "0x8000", "file": files["0x8000"], "encrypted": "false"},
        "extra_esptool_args": {"after": "hard_reset", "before": "default_reset", "stub": True,
                               "chip": "esp32c3"},
    }
    (root / "flasher_args.json").write_text(json.dumps(args, indent=4) + "\n")
    return root
