"""Decoded panics: a real RISC-V ELF (GCC -g), its elf2image image, a panic dump in ESP-IDF's
format whose addresses come from the compiled code, and the real addr2line / gdb.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from panicbuild import PanicBuild, build

from pytest_hilfarm.drivers.flashing import builds
from pytest_hilfarm.projects.panic import PanicDecoder, find_panics, find_toolchain
from pytest_hilfarm.sim.app import panic_text

DEBIAN_ADDR2LINE = shutil.which("riscv64-unknown-elf-addr2line")
GDB_MULTIARCH = shutil.which("gdb-multiarch")
needs_binutils = pytest.mark.skipif(DEBIAN_ADDR2LINE is None,
                                    reason="Debian's binutils-riscv64-unknown-elf is missing")


@pytest.fixture(scope="module")
def pb(tmp_path_factory: pytest.TempPathFactory) -> PanicBuild:
    return build(tmp_path_factory.mktemp("panic"))


def debian_only(tmp_path: Path) -> dict[str, str]:
    """An environment where only Debian's RISC-V binutils can be found (no ESP-IDF)."""
    assert DEBIAN_ADDR2LINE is not None
    return {"PATH": str(Path(DEBIAN_ADDR2LINE).parent), "HOME": str(tmp_path / "home")}


def esp_idf_like(tmp_path: Path, *, gdb: bool) -> Path:
    """A directory with ESP-IDF's tool names (riscv32-esp-elf-*) for the Debian tools."""
    bin_dir = tmp_path / "esp-bin"
    bin_dir.mkdir()
    assert DEBIAN_ADDR2LINE is not None
    (bin_dir / "riscv32-esp-elf-addr2line").symlink_to(DEBIAN_ADDR2LINE)
    if gdb:
        assert GDB_MULTIARCH is not None
        (bin_dir / "riscv32-esp-elf-gdb").symlink_to(GDB_MULTIARCH)
    return bin_dir


@needs_binutils
def test_panic_shows_function_names_and_lines(pb: PanicBuild, tmp_path: Path) -> None:
    decoder = PanicDecoder.create("esp32c3", pb.elf, app_image=pb.app_bin.read_bytes(),
                                  environ=debian_only(tmp_path))
    assert decoder.available, decoder.reason
    assert decoder.toolchain is not None and decoder.toolchain.source == "Debian binutils"
    log = "I (312) main_task: Calling app_main()\r\n" + pb.panic + "ESP-ROM:esp32c3-api1\r\n"
    decoded = decoder.decode(log)
    assert decoded is not None
    by_address = {f.address: f.locations[0] for f in decoded.frames}
    fault = by_address[pb.mepc]
    assert (fault.function, Path(fault.file).name, fault.line) == (
        "store_result", "panic_app.c", pb.line_of("*slot = value;"))
    assert by_address[pb.ra].function == "process_reading"
    assert by_address[pb.app_main_return].function == "app_main"
    assert decoded.reason.startswith("Guru Meditation Error: Core  0 panic'ed (Store access")
    assert f"0x{pb.mepc:08x}: store_result at {pb.source}:{pb.line_of('*slot = value;')}" \
        in decoded.text
    assert decoded.backtrace == ""  # Debian ships no riscv64-unknown-elf-gdb


@needs_binutils
@pytest.mark.skipif(GDB_MULTIARCH is None, reason="gdb-multiarch is not installed")
def test_gdb_unwinds_the_dumped_stack(pb: PanicBuild, tmp_path: Path) -> None:
    bin_dir = esp_idf_like(tmp_path, gdb=True)
    decoder = PanicDecoder.create("esp32c3", pb.elf, environ={"PATH": str(bin_dir)})
    assert decoder.toolchain is not None and decoder.toolchain.source == "PATH"
    decoded = decoder.decode(pb.panic)
    assert decoded is not None
    frames = decoded.backtrace.splitlines()
    assert [f.split(" in ")[1].split(" ")[0] for f in frames[:3]] == [
        "store_result", "process_reading", "app_main"]
    assert frames[0].endswith(f"panic_app.c:{pb.line_of('*slot = value;')}")
    assert "Backtrace (gdb, from the register and stack dump):" in decoded.text


@needs_binutils
def test_toolchain_from_the_esp_idf_tools_directory(pb: PanicBuild, tmp_path: Path) -> None:
    tools = tmp_path / "espressif"
    bin_dir = tools / "tools/riscv32-esp-elf/esp-13.2.0_20240530/riscv32-esp-elf/bin"
    bin_dir.mkdir(parents=True)
    assert DEBIAN_ADDR2LINE is not None
    (bin_dir / "riscv32-esp-elf-addr2line").symlink_to(DEBIAN_ADDR2LINE)
    chain = find_toolchain("esp32c3", environ={"PATH": str(tmp_path / "empty"),
                                               "IDF_TOOLS_PATH": str(tools)})
    assert chain.source == "ESP-IDF tools" and chain.addr2line == \
        bin_dir / "riscv32-esp-elf-addr2line"
    explicit = find_toolchain("esp32c3", addr2line=DEBIAN_ADDR2LINE,
                              environ={"PATH": str(tmp_path / "empty")})
    assert explicit.source == "setting"


def test_without_a_toolchain_it_says_so_once(pb: PanicBuild, tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path / "empty"), "HOME": str(tmp_path / "home")}
    decoder = PanicDecoder.create("esp32c3", pb.elf, environ=env)
    assert not decoder.available
    assert decoder.reason is not None and decoder.reason.startswith("panics are not decoded: ")
    assert "riscv32-esp-elf-addr2line" in decoder.reason
    assert "binutils-riscv64-unknown-elf" in decoder.reason
    assert "hil_addr2line / HILFARM_ADDR2LINE" in decoder.reason
    assert decoder.decode(pb.panic) is None  # nothing per test: the reason is said once
    xtensa = PanicDecoder.create("esp32s3", pb.elf, environ=env)
    assert "xtensa-esp-elf-addr2line or xtensa-esp32s3-elf-addr2line" in str(xtensa.reason)
    bad = PanicDecoder.create("esp32c3", pb.elf, addr2line=tmp_path / "nope", environ=env)
    assert "is not an addr2line executable" in str(bad.reason)


def test_without_an_elf_it_says_so(tmp_path: Path) -> None:
    assert "the build has no ELF file" in str(PanicDecoder.create("esp32c3", None).reason)
    missing = PanicDecoder.create("esp32c3", tmp_path / "app.elf")
    assert "does not exist" in str(missing.reason)


@needs_binutils
def test_an_elf_of_another_build_is_refused(pb: PanicBuild, tmp_path: Path) -> None:
    other = build(tmp_path / "other")
    # Same source, other path: another ELF (its debug info names another directory).
    assert other.elf.read_bytes() != pb.elf.read_bytes()
    decoder = PanicDecoder.create("esp32c3", other.elf, app_image=pb.app_bin.read_bytes(),
                                  environ=debian_only(tmp_path))
    assert not decoder.available
    assert "is not the ELF of the flashed image" in str(decoder.reason)
    # Without the image, the panic's own "ELF file SHA256" line still tells the builds apart.
    unchecked = PanicDecoder.create("esp32c3", other.elf, environ=debian_only(tmp_path))
    decoded = unchecked.decode(pb.panic)
    assert decoded is not None and decoded.frames == ()
    assert "not decoded: the board ran another build" in decoded.text


@needs_binutils
def test_decoder_for_a_build_directory(pb: PanicBuild, tmp_path: Path) -> None:
    root = tmp_path / "build"
    root.mkdir()
    shutil.copy(pb.app_bin, root / "panic_app.bin")
    shutil.copy(pb.elf, root / "panic_app.elf")
    (root / "flasher_args.json").write_text(json.dumps({
        "flash_files": {"0x10000": "panic_app.bin"},
        "app": {"offset": "0x10000", "file": "panic_app.bin"},
        "extra_esptool_args": {"chip": "esp32c3"}}))
    decoder = PanicDecoder.for_build(builds.detect(root), environ=debian_only(tmp_path))
    assert decoder.available and decoder.elf == root / "panic_app.elf"
    assert decoder.decode(pb.panic) is not None


def test_find_panics_in_xtensa_and_abort_output() -> None:
    xtensa = panic_text("esp32", "00" * 32, store=True, elf_sha256="ab" * 32)
    log = ("I (312) app: start\r\n" + xtensa + "ets Jun  8 2016 00:22:57\r\n"
           "abort() was called at PC 0x400d1234 on core 0\r\n\r\nBacktrace: 0x40081f2a:0x3ffb"
           "1f50 0x40087e01:0x3ffb1f70\r\n\r\nELF file SHA256: 0123456789abcdef\r\n\r\n"
           "Rebooting...\r\n")
    found = find_panics(log)
    assert len(found) == 2
    assert found[0].startswith("Guru Meditation Error: Core  0 panic'ed (StoreProhibited)")
    assert found[0].endswith("Rebooting...") and "Backtrace: 0x" in found[0]
    assert found[1].startswith("abort() was called at PC 0x400d1234 on core 0")
    assert find_panics("I (1) app: all fine\r\n") == []
