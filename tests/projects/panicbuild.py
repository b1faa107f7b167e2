"""A real RISC-V app with debug information and a panic dump of it as ESP-IDF prints one.

``data/panic_app.c`` (store_result <- process_reading <- app_main, the first storing to NULL) is
compiled by Debian's riscv64-unknown-elf GCC with ``-g -O0`` and converted by ``esptool
elf2image --chip esp32c3`` (which patches the ELF's SHA-256 into the app descriptor). The panic
text follows ESP-IDF's RISC-V panic handler (register dump, ``Stack memory:`` eight words a line,
``ELF file SHA256:``); its addresses are read from the compiled code, not written down: MEPC is
the faulting store, RA the return into process_reading, and the dumped stack holds the frames
the prologues built (saved ra/s0 at the offsets ``objdump`` shows).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
GCC = "riscv64-unknown-elf-gcc"
OBJDUMP = "riscv64-unknown-elf-objdump"
LINKER_SCRIPT = Path(__file__).parents[1] / "sim" / "data" / "riscv" / "app.ld"
SP0 = 0x3FC8FE00


@dataclass(frozen=True)
class PanicBuild:
    elf: Path
    app_bin: Path
    source: Path
    mepc: int
    ra: int
    app_main_return: int
    panic: str

    def line_of(self, marker: str) -> int:
        lines = self.source.read_text().splitlines()
        return next(i for i, text in enumerate(lines, 1) if marker in text)


def _run(*argv: str, cwd: Path) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(argv)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _functions(disassembly: str) -> dict[str, list[tuple[int, int, str]]]:
    """name -> [(address, size, instruction text)] from ``objdump -d``."""
    out: dict[str, list[tuple[int, int, str]]] = {}
    current: list[tuple[int, int, str]] | None = None
    for line in disassembly.splitlines():
        head = re.match(r"^([0-9a-f]{8}) <(\w+)>:$", line)
        if head:
            current = out.setdefault(head.group(2), [])
            continue
        insn = re.match(r"^\s*([0-9a-f]+):\s+([0-9a-f]+)\s+(.*)$", line)
        if insn and current is not None:
            current.append((int(insn.group(1), 16), len(insn.group(2)) // 2,
                            insn.group(3).strip()))
    return out


def _frame(insns: list[tuple[int, int, str]]) -> tuple[int, dict[str, int]]:
    """Frame size and the sp offsets where the prologue saves ra / s0."""
    size = int(re.search(r"add\s+sp,sp,(-\d+)", insns[0][2]).group(1))  # type: ignore[union-attr]
    saved = {m.group(1): int(m.group(2)) for _, _, text in insns[:4]
             if (m := re.match(r"sw\s+(ra|s0),(\d+)\(sp\)", text))}
    return -size, saved


def _after_call(insns: list[tuple[int, int, str]], callee: str) -> int:
    addr, size, _ = next(i for i in insns if i[2].startswith("jal") and f"<{callee}>" in i[2])
    return addr + size


def build(out: Path) -> PanicBuild:
    if shutil.which(GCC) is None:
        pytest.skip(f"{GCC} is not installed (Debian: gcc-riscv64-unknown-elf)")
    out.mkdir(parents=True, exist_ok=True)
    source = out / "panic_app.c"
    shutil.copy(DATA / "panic_app.c", source)
    _run(GCC, "-march=rv32imc", "-mabi=ilp32", "-O0", "-g", "-nostdlib", "-ffreestanding",
         "-T", str(LINKER_SCRIPT), "-o", "panic_app.elf", "panic_app.c", cwd=out)
    _run(sys.executable, "-m", "esptool", "--chip", "esp32c3", "elf2image", "--min-rev-full",
         "3", "--max-rev-full", "199", "--elf-sha256-offset", "0xb0", "-o", "panic_app.bin",
         "panic_app.elf", cwd=out)
    funcs = _functions(_run(OBJDUMP, "-d", "panic_app.elf", cwd=out))
    store = funcs["store_result"]
    mepc = next(a for a, _, text in store
                if text.startswith("sw") and "(s0)" not in text and "(sp)" not in text)
    ra = _after_call(funcs["process_reading"], "store_result")
    main_ret = _after_call(funcs["app_main"], "process_reading")
    start_ret = _after_call(funcs["call_start_cpu0"], "app_main")
    size1, _ = _frame(store)
    size2, saved2 = _frame(funcs["process_reading"])
    size3, saved3 = _frame(funcs["app_main"])
    sp1, sp2 = SP0 + size1, SP0 + size1 + size2
    words = {SP0 + size1 - 4: sp2,  # store_result saved s0 (process_reading's frame pointer)
             sp1 + saved2["ra"]: main_ret, sp1 + saved2["s0"]: sp2 + size3,
             sp2 + saved3["ra"]: start_ret, sp2 + saved3["s0"]: 0}
    end = sp2 + size3 + 32
    stack = []
    for base in range(SP0, end, 32):
        row = " ".join(f"0x{words.get(a, 0xA5A5A5A5):08x}" for a in range(base, base + 32, 4))
        stack.append(f"{base:08x}: {row}")
    elf = out / "panic_app.elf"
    sha = hashlib.sha256(elf.read_bytes()).hexdigest()
    regs = {"MEPC": mepc, "RA": ra, "SP": SP0, "GP": 0x3FC8B200, "TP": 0x3FC8B200,
            "T0": 0x4005890E, "T1": 0, "T2": 0, "S0/FP": SP0 + size1, "S1": 0, "A0": 0,
            "A1": 6, "A2": 0, "A3": 0, "A4": 6, "A5": 0, "A6": 0, "A7": 0, "S2": 0, "S3": 0,
            "S4": 0, "S5": 0, "S6": 0, "S7": 0, "S8": 0, "S9": 0, "S10": 0, "S11": 0, "T3": 0,
            "T4": 0, "T5": 0, "T6": 0, "MSTATUS": 0x1881, "MTVEC": 0x40380001, "MCAUSE": 7,
            "MTVAL": 0, "MHARTID": 0}
    names = list(regs)
    dump = ["  ".join(f"{n:<8}: 0x{regs[n]:08x}" for n in names[i : i + 4])
            for i in range(0, len(names), 4)]
    lines = ["Guru Meditation Error: Core  0 panic'ed (Store access fault). Exception was "
             "unhandled.", "", "Core  0 register dump:", *dump, "", "Stack memory:", *stack,
             "", "", f"ELF file SHA256: {sha[:16]}", "", "Rebooting..."]
    return PanicBuild(elf, out / "panic_app.bin", source, mepc, ra, main_ret,
                      "".join(line + "\r\n" for line in lines))
