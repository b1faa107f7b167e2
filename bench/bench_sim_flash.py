"""Benchmark: flash 1 MB images to a virtual board with the real esptool; idle cost of 64 boards.

Run: ``python bench/bench_sim_flash.py`` (about a minute). Starts its own daemon in a temporary
state dir, prints a markdown table. Figures:

* wall seconds of the whole esptool run and esptool's own "Wrote ... in X seconds";
* the daemon's CPU seconds per MB written vs esptool's own CPU seconds (target: <= 5 %);
* with wire-time emulation at 921600 baud: achieved time / pure wire time (target: <= 1.15),
  where the wire time is what the board counted: every byte at the baud it crossed at,
  10 bits per byte;
* a 64-board rack: time to come up and its idle CPU.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from pytest_hilfarm.sim import manager
from pytest_hilfarm.sim.appbuild import build_app

MB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """utime + stime of a process, from /proc (no psutil)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def board_status(state_dir: Path, board_id: str) -> dict:
    boards = manager.control({"op": "status"}, state_dir=state_dir)["boards"]
    return next(b for b in boards if b["id"] == board_id)


def flash_once(state_dir: Path, image: Path, *, baud: int, board_id: str = "esp32-1") -> dict:
    info = manager.read_info(state_dir)
    assert info is not None
    manager.control({"op": "reset", "board": board_id, "boot": "download"}, state_dir=state_dir)
    before = board_status(state_dir, board_id)
    d0, c0, t0 = proc_cpu(info.pid), children_cpu(), time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "esptool", "--chip", "esp32", "--port", info.board(board_id).port,
         "-b", str(baud), "--before", "no-reset", "--after", "no-reset",
         "write-flash", "0x10000", str(image)],
        capture_output=True, text=True, check=False,
    )
    wall = time.perf_counter() - t0
    d1, c1 = proc_cpu(info.pid), children_cpu()
    if proc.returncode != 0:
        raise SystemExit(f"esptool failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    after = board_status(state_dir, board_id)
    m = re.search(r"Wrote (\d+) bytes(?: \((\d+) compressed\))? at \S+ in ([\d.]+) seconds",
                  proc.stdout)
    assert m, proc.stdout[-1000:]
    return {
        "wall": wall,
        "write_s": float(m.group(3)),
        "sent": int(m.group(2) or m.group(1)),
        "daemon_cpu": d1 - d0,
        "esptool_cpu": c1 - c0,
        "wire_s": after["wire_seconds"] - before["wire_seconds"],
        "rx": after["rx_bytes"] - before["rx_bytes"],
        "write_wire_s": write_phase_wire_seconds(image.read_bytes(), baud),
    }


def firmware_like(size: int) -> bytes:
    """A real app image header, then code-like filler that deflates to roughly a quarter.

    (build_app's own padding deflates to 0.5 %, which would not exercise the data path.)
    """
    rng = random.Random(2217)
    snippets = [rng.randbytes(rng.randrange(8, 96)) for _ in range(300)]
    out = bytearray(build_app("esp32", "bench", "1.0"))
    while len(out) < size:
        out += rng.choice(snippets) if rng.random() < 0.8 else rng.randbytes(rng.randrange(1, 12))
    return bytes(out[:size])


def write_phase_wire_seconds(image: bytes, baud: int) -> float:
    """Pure UART time of esptool's write loop: SLIP-framed FLASH_(DEFL_)DATA + 12-byte acks.

    esptool sends zlib level 9 unless that is not smaller than the raw data (then raw).
    """
    packed = zlib.compress(image, 9)
    payload = packed if len(packed) < len(image) else image
    total = 0
    for start in range(0, len(payload), 0x4000):
        block = payload[start:start + 0x4000]
        total += 2 + 8 + 16 + len(block) + block.count(0xC0) + block.count(0xDB) + 12
    return total * 10 / baud


def idle_rack(tmp: Path, boards: int, seconds: float) -> tuple[float, float]:
    rack = tmp / "rack64.yaml"
    lines = ["name: bench-64", "boards:"]
    chips = ("esp32", "esp32s2", "esp32c3")
    for i in range(boards):
        lines.append(f"  - {{id: b{i + 1}, chip: {chips[i % 3]}, port: virtual}}")
    rack.write_text("\n".join(lines) + "\n")
    state = tmp / "state64"
    t0 = time.perf_counter()
    info = manager.up(rack, state)
    up_s = time.perf_counter() - t0
    try:
        # Let every board reach its first boot state (erased flash: two boot attempts, then the
        # loop parks until a client attaches).
        time.sleep(2.0)
        c0 = proc_cpu(info.pid)
        time.sleep(seconds)
        cpu = proc_cpu(info.pid) - c0
    finally:
        manager.down(state)
    return up_s, cpu / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=8, help="runs per image without wire time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-hilfarm-") as tmpname:
        tmp = Path(tmpname)
        compressible = tmp / "compressible.bin"
        compressible.write_bytes(firmware_like(MB))
        random_img = tmp / "incompressible.bin"
        random_img.write_bytes(os.urandom(MB))
        state = tmp / "state"
        manager.up(None, state)
        rows = []
        try:
            for label, image in (("compressible", compressible), ("incompressible", random_img)):
                # Averaged over runs: /proc CPU ticks are 10 ms, the board's share is small.
                runs = [flash_once(state, image, baud=115200) for _ in range(args.repeat)]
                r = {k: sum(run[k] for run in runs) / len(runs) for k in runs[0]}
                rows.append((label, "off", r))
            manager.control({"op": "wire_time", "enabled": True}, state_dir=state)
            for label, image in (("compressible", compressible), ("incompressible", random_img)):
                r = flash_once(state, image, baud=921600)
                rows.append((label, "921600", r))
        finally:
            manager.down(state)
        up_s, idle = idle_rack(tmp, 64, args.idle_seconds)

    print("| image | wire time | bytes sent | esptool wall s | esptool 'Wrote' s | "
          "daemon CPU s/MB | esptool CPU s | daemon/esptool CPU | wall / wire time | "
          "'Wrote' / write-loop wire time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, wire, r in rows:
        ratio = r["daemon_cpu"] / r["esptool_cpu"] if r["esptool_cpu"] else float("nan")
        wire_ratio = f"{r['wall'] / r['wire_s']:.3f}" if wire != "off" else "-"
        loop_ratio = f"{r['write_s'] / r['write_wire_s']:.3f}" if wire != "off" else "-"
        print(f"| {label} 1 MB | {wire} | {r['sent']:.0f} | {r['wall']:.2f} | {r['write_s']:.2f} | "
              f"{r['daemon_cpu']:.3f} | {r['esptool_cpu']:.2f} | {ratio * 100:.1f} % | "
              f"{wire_ratio} | {loop_ratio} |")
    print()
    print("| rack | time to up s | idle CPU (fraction of one core) |")
    print("|---|---|---|")
    print(f"| 64 boards | {up_s:.2f} | {idle * 100:.2f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
