"""Decode an ESP-IDF panic in a board's console output against the build's ELF.

The panic handler prints addresses only (Xtensa: ``Backtrace: PC:SP ...``; RISC-V: a register
dump and ``Stack memory:``). Espressif's ``esp-idf-panic-decoder`` turns every address that lies
in the ELF's code into ``function at file:line`` through the toolchain's ``addr2line`` (as
``idf.py monitor`` does), and for RISC-V, when the toolchain's ``gdb`` is there, unwinds the
dumped stack into a backtrace. The toolchain is found from an explicit path (the ``addr2line``
setting), ``PATH`` (ESP-IDF's ``xtensa-*-elf-`` / ``riscv32-esp-elf-`` names), the ESP-IDF tools
directory (``IDF_TOOLS_PATH``, default ``~/.espressif``) or, for RISC-V, Debian's
``riscv64-unknown-elf-`` binutils.

A decoder is made once per build and chip: when it cannot decode (no ELF, no toolchain, an ELF
that is not the image's) it says why once in :attr:`PanicDecoder.reason`. An ELF is used only
when its SHA-256 is the one the image carries (``esp_app_desc_t.app_elf_sha256``) and the one the
panic prints (``ELF file SHA256:``): decoding against another build would print wrong lines.
This module runs addr2line/gdb and reads files; it never touches boards.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pytest_hilfarm.drivers.flashing import Region
from pytest_hilfarm.drivers.flashing.builds import Build
from pytest_hilfarm.errors import HilfarmError
from pytest_hilfarm.esp.chips import CHIPS
from pytest_hilfarm.esp.image import APP_DESC_MAGIC, APP_DESC_OFFSET, AppDesc

# ESP-IDF's toolchain names: before v5.2 one Xtensa GCC per chip (xtensa-esp32-elf-, ...), from
# v5.2 one for all (xtensa-esp-elf-); RISC-V has always been riscv32-esp-elf-.
_ESP_PREFIXES = {"riscv": ("riscv32-esp-elf-",),
                 "xtensa": ("xtensa-esp-elf-", "xtensa-{chip}-elf-")}
DEBIAN_RISCV_PREFIX = "riscv64-unknown-elf-"  # binutils-riscv64-unknown-elf: reads rv32 ELFs too
ADDR2LINE_TIMEOUT = 30.0

# Where a panic starts in ESP-IDF's output (panic_handler.c, esp_system/panic.c, abort()).
_START = re.compile(r"^.*?(Guru Meditation Error:.*|abort\(\) was called at PC.*|"
                    r"\*\*\*ERROR\*\*\* A stack overflow.*|assert failed:.*|"
                    r"Core\s+\d+ register dump:.*)$", re.M)
_END = re.compile(r"^.*?(Rebooting\.\.\.|CPU halted\.).*$", re.M)
_ELF_SHA_LINE = re.compile(r"ELF file SHA256:\s*([0-9a-fA-F]{8,64})")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{8}")


class ToolchainNotFound(HilfarmError):
    """No addr2line for the chip's architecture was found."""


@dataclass(frozen=True)
class Toolchain:
    """The binutils that read the ELF: ``prefix`` + ``addr2line`` / ``gdb``."""

    prefix: str  # e.g. "/usr/bin/riscv64-unknown-elf-"
    gdb: Path | None
    source: str  # where it was found: "setting", "PATH", "ESP-IDF tools", "Debian binutils"

    @property
    def addr2line(self) -> Path:
        return Path(self.prefix + "addr2line")


@dataclass(frozen=True)
class Location:
    """One source location; several for one address mean inlined calls (innermost first)."""

    function: str
    file: str
    line: int | None


@dataclass(frozen=True)
class Frame:
    """One code address found in the panic output and what the ELF says it is."""

    address: int
    locations: tuple[Location, ...]

    def describe(self) -> str:
        first, *inlined = self.locations
        text = f"0x{self.address:08x}: {_where(first)}"
        return text + "".join(f"\n    (inlined by) {_where(loc)}" for loc in inlined)


def _where(loc: Location) -> str:
    return f"{loc.function} at {loc.file}" + (f":{loc.line}" if loc.line is not None else "")


@dataclass(frozen=True)
class DecodedPanic:
    """A decoded panic: ``reason`` (the panic's first line), the code ``frames`` in the order
    the output names them, ``backtrace`` (gdb's unwinding of a RISC-V stack dump, or ""), and
    ``text``, the block a report shows.
    """

    reason: str
    panic: str = field(repr=False)
    frames: tuple[Frame, ...]
    backtrace: str
    text: str


def find_panics(log: str) -> list[str]:
    """The panic blocks in console output (line ends normalised), oldest first."""
    text = log.replace("\r\n", "\n").replace("\r", "\n")
    blocks = []
    pos = 0
    while (start := _START.search(text, pos)) is not None:
        end = _END.search(text, start.end())
        # A dump without its end (the board was cut off) is still worth decoding.
        stop = end.end() if end is not None else len(text)
        blocks.append(text[start.start(1) : stop])
        pos = stop
    return blocks


def find_toolchain(chip: str, *, addr2line: str | Path | None = None,
                   environ: Mapping[str, str] | None = None) -> Toolchain:
    """The addr2line (and gdb, if beside it) for ``chip``; raises :class:`ToolchainNotFound`.

    ``addr2line`` is an explicit path (a setting): it wins and must exist. Then ``PATH`` with
    ESP-IDF's names, the ESP-IDF tools directory, and for RISC-V Debian's
    ``riscv64-unknown-elf-addr2line``.
    """
    env = os.environ if environ is None else environ
    arch = _architecture(chip)
    if addr2line is not None:
        path = Path(addr2line).expanduser()
        if not path.name.endswith("addr2line") or not path.is_file():
            raise ToolchainNotFound(
                f"the addr2line setting {str(addr2line)!r} is not an addr2line executable",
                where="addr2line setting",
                hint="give the full path of the toolchain's addr2line, e.g. "
                "~/.espressif/tools/riscv32-esp-elf/<version>/riscv32-esp-elf/bin/"
                "riscv32-esp-elf-addr2line",
            )
        return _toolchain(str(path)[: -len("addr2line")], "setting", env)
    names = [p.format(chip=chip) for p in _ESP_PREFIXES[arch]]
    search_path = env.get("PATH", os.defpath)
    for prefix in names:
        found = shutil.which(prefix + "addr2line", path=search_path)
        if found:
            return _toolchain(found[: -len("addr2line")], "PATH", env)
    tools = Path(env.get("IDF_TOOLS_PATH") or Path(env.get("HOME", "~")) / ".espressif")
    for prefix in names:
        tool = prefix.rstrip("-")
        # ESP-IDF's layout: tools/<tool>/<version>/<tool>/bin/<tool>-addr2line; the newest wins.
        candidates = sorted(tools.expanduser().glob(f"tools/{tool}/*/{tool}/bin/{prefix}addr2line"))
        if candidates:
            return _toolchain(str(candidates[-1])[: -len("addr2line")], "ESP-IDF tools", env)
    if arch == "riscv":
        found = shutil.which(DEBIAN_RISCV_PREFIX + "addr2line", path=search_path)
        if found:
            return _toolchain(found[: -len("addr2line")], "Debian binutils", env)
    looked = " or ".join(f"{p}addr2line" for p in names)
    debian = (" and Debian's riscv64-unknown-elf-addr2line (apt install "
              "binutils-riscv64-unknown-elf)") if arch == "riscv" else ""
    raise ToolchainNotFound(
        f"no addr2line for {chip} ({arch}): looked for {looked} on PATH and under "
        f"{tools}/tools{debian}",
        where=f"{chip} toolchain",
        hint="run from an ESP-IDF environment (. $IDF_PATH/export.sh), or set the addr2line "
        "setting (hil_addr2line / HILFARM_ADDR2LINE) to the toolchain's addr2line",
    )


def _toolchain(prefix: str, source: str, env: Mapping[str, str]) -> Toolchain:
    # ESP-IDF installs gdb as its own tool, so look on PATH as well as beside addr2line.
    name = Path(prefix).name + "gdb"
    beside = Path(prefix + "gdb")
    gdb = beside if beside.is_file() else None
    if gdb is None:
        found = shutil.which(name, path=env.get("PATH", os.defpath))
        gdb = Path(found) if found else None
    return Toolchain(prefix, gdb, source)


def elf_sha256(elf: Path) -> str:
    return hashlib.sha256(elf.read_bytes()).hexdigest()


def image_elf_sha256(app_image: bytes) -> str | None:
    """``esp_app_desc_t.app_elf_sha256`` of an app image (hex); None without a descriptor or
    when the build did not fill it in (all zeros).
    """
    desc = app_image[APP_DESC_OFFSET : APP_DESC_OFFSET + 256]
    if len(desc) < 256 or int.from_bytes(desc[:4], "little") != APP_DESC_MAGIC:
        return None
    digest = AppDesc.decode(desc).app_elf_sha256
    return digest.hex() if any(digest) else None


class PanicDecoder:
    """Decodes panics of one build on one chip. Make it once; print :attr:`reason` once.

    ``available`` is False (and ``reason`` says why, in one line) when there is no ELF, no
    toolchain, or the ELF does not belong to the image.
    """

    def __init__(self, chip: str, elf: Path | None, toolchain: Toolchain | None,
                 reason: str | None = None) -> None:
        self.chip = chip
        self.elf = elf
        self.toolchain = toolchain
        self.reason = reason
        self._sha = elf_sha256(elf) if elf is not None and reason is None else None

    @property
    def available(self) -> bool:
        return self.reason is None

    @classmethod
    def create(cls, chip: str, elf: str | Path | None, *, app_image: bytes | None = None,
               addr2line: str | Path | None = None,
               environ: Mapping[str, str] | None = None) -> PanicDecoder:
        """A decoder for ``elf`` on ``chip``. ``app_image`` (the flashed app's bytes) makes
        it check that the ELF is the image's; ``addr2line`` is the explicit toolchain setting.
        """
        if elf is None:
            return cls(chip, None, None, "panics are not decoded: the build has no ELF file "
                       "(pass the build directory, not only the .bin)")
        path = Path(elf)
        if not path.is_file():
            return cls(chip, None, None, f"panics are not decoded: the ELF {path} does not exist")
        if app_image is not None:
            expected = image_elf_sha256(app_image)
            actual = elf_sha256(path)
            if expected is not None and expected != actual:
                return cls(chip, path, None,
                           f"panics are not decoded: {path} is not the ELF of the flashed "
                           f"image (the image's app_elf_sha256 is {expected[:16]}..., this "
                           f"ELF's SHA-256 is {actual[:16]}...); rebuild, or point at the "
                           "build that made the image")
        try:
            toolchain = find_toolchain(chip, addr2line=addr2line, environ=environ)
        except ToolchainNotFound as exc:
            return cls(chip, path, None, f"panics are not decoded: {exc}")
        return cls(chip, path, toolchain)

    @classmethod
    def for_build(cls, build: Build, chip: str | None = None, *,
                  addr2line: str | Path | None = None,
                  environ: Mapping[str, str] | None = None) -> PanicDecoder:
        """A decoder for a recognised build (its ELF, checked against its app image)."""
        app = next((r for r in build.plan.regions if _is_app(r)), None)
        return cls.create(chip or build.chip or "", build.elf,
                          app_image=app.data if app is not None else None,
                          addr2line=addr2line, environ=environ)

    def decode(self, log: str) -> DecodedPanic | None:
        """Decode the last panic in ``log``; None when there is none or decoding is off."""
        panics = find_panics(log)
        if not panics or not self.available:
            return None
        return self.decode_panic(panics[-1])

    def decode_panic(self, panic: str) -> DecodedPanic:
        assert self.elf is not None and self.toolchain is not None and self._sha is not None
        reason = panic.split("\n", 1)[0].strip()
        printed = _ELF_SHA_LINE.search(panic)
        if printed is not None and not self._sha.startswith(printed.group(1).lower()):
            note = (f"not decoded: the board ran another build (it prints ELF SHA256 "
                    f"{printed.group(1)}, {self.elf.name} is {self._sha[:16]}...)")
            return DecodedPanic(reason, panic, (), "", note)
        frames = self._frames(panic)
        backtrace = self._gdb_backtrace(panic) if _architecture(self.chip) == "riscv" else ""
        lines = [f"{reason} -- decoded against {self.elf} "
                 f"({self.toolchain.prefix}addr2line)"]
        lines += [frame.describe() for frame in frames] or ["(no address in the output lies in "
                                                            "the ELF's code)"]
        if backtrace:
            lines += ["", "Backtrace (gdb, from the register and stack dump):", backtrace]
        return DecodedPanic(reason, panic, frames, backtrace, "\n".join(lines))

    def _frames(self, panic: str) -> tuple[Frame, ...]:
        from esp_idf_panic_decoder import PcAddressDecoder

        assert self.elf is not None and self.toolchain is not None
        decoder = PcAddressDecoder(self.toolchain.prefix, str(self.elf))
        frames: list[Frame] = []
        seen: set[int] = set()
        for line in panic.split("\n"):
            if not _ADDRESS.search(line):
                continue
            for addr, trace in decoder.translate_addresses(line):
                value = int(addr, 16)
                if value in seen:
                    continue
                seen.add(value)
                frames.append(Frame(value, tuple(
                    Location(t.func, t.path, int(t.line) if t.line.isdigit() else None)
                    for t in trace)))
        return tuple(frames)

    def _gdb_backtrace(self, panic: str) -> str:
        """The ``bt`` of gdb over the dumped registers and stack (RISC-V, when gdb is there)."""
        if self.toolchain is None or self.toolchain.gdb is None or "Stack memory:" not in panic:
            return ""
        from esp_idf_panic_decoder import PanicOutputDecoder

        prefix = str(self.toolchain.gdb)[: -len("gdb")]
        decoder = PanicOutputDecoder(prefix, str(self.elf), self.chip)
        try:
            out = decoder.process_panic_output(panic.encode())
        except (OSError, subprocess.CalledProcessError) as exc:
            return f"(gdb could not unwind the stack: {exc})"
        frames = [line for line in out.decode(errors="replace").splitlines()
                  if re.match(r"#\d+\s", line)]
        return "\n".join(frames)


def _is_app(region: Region) -> bool:
    role = region.role or ""
    return (role in ("app", "factory") or role.startswith("ota_")) and region.data[:1] == b"\xe9"


def _architecture(chip: str) -> str:
    """"riscv" or "xtensa" (a chip esptool does not know is taken for Xtensa, the older family)."""
    known = CHIPS.get(chip)
    return known.architecture if known is not None else "xtensa"
