"""Benchmark: where an esptool command over rfc2217:// spends its time, against a virtual board.

Run: ``python bench/bench_rfc2217.py [--runs 3]`` (about two minutes). Starts its own virtual
rack daemon in a temporary state dir and prints markdown tables:

1. ``esptool --before no-reset read-mac`` (the real CLI, a subprocess) over ``socket://`` and
   over ``rfc2217://`` to the same board in download mode: medians of ``--runs`` runs.
2. Inside one rfc2217 run (esptool in-process under cProfile): how many RFC 2217
   renegotiations the client makes (pyserial's ``Serial._reconfigure_port``: every
   ``port.timeout = x`` esptool sets), how many acknowledgements it waits for
   (``TelnetSubnegotiation.wait``: DTR/RTS, flow control, purge) and the seconds it sleeps.
3. The server side: how long the daemon takes to answer one RFC 2217 request (a raw telnet
   client sends SET_BAUDRATE / SET_CONTROL / PURGE subnegotiations and times the reply), and
   the CPU cost of pyserial's ``PortManager.filter`` on 1 MB of flash data versus the daemon's
   fast path (chunks without a telnet IAC byte skip the per-byte filter).
4. The same read-mac through a client whose timeout changes stay local: pyserial's rfc2217
   ``Serial`` with a ``timeout`` setter that does not renegotiate (the timeout is only used by
   the client's own read loop; the server never needs it). This shows what a client-side change
   would buy; the server cannot remove waits the client imposes on itself.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from serial import rfc2217

from pytest_hilfarm.sim import manager

BOARD = "esp32-1"


def download(state_dir: Path) -> None:
    manager.control({"op": "reset", "board": BOARD, "boot": "download"}, state_dir=state_dir)


def cli_read_mac(state_dir: Path, url: str) -> float:
    download(state_dir)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "esptool", "--port", url, "--before", "no-reset",
                           "read-mac"], capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-1500:]
    return elapsed


def profile_rfc2217(state_dir: Path, url: str) -> dict[str, float]:
    import esptool

    download(state_dir)
    prof = cProfile.Profile()
    with contextlib.redirect_stdout(io.StringIO()):
        prof.enable()
        t0 = time.perf_counter()
        esptool.main(["--port", url, "--before", "no-reset", "read-mac"])
        elapsed = time.perf_counter() - t0
        prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    out = {"wall": elapsed, "reconfigure": 0.0, "waits": 0.0, "sleep_s": 0.0, "sleeps": 0.0,
           "timeout_sets": 0.0}
    for (filename, _line, name), (calls, _prim, _tt, cum, _callers) in stats.items():
        if filename.endswith("rfc2217.py") and name == "_reconfigure_port":
            out["reconfigure"] = calls
        elif filename.endswith("rfc2217.py") and name == "wait":
            out["waits"] = calls
        elif name == "<built-in method time.sleep>":
            out["sleeps"], out["sleep_s"] = calls, cum
        elif filename.endswith("serialutil.py") and name == "timeout":
            out["timeout_sets"] += calls
    return out


def _subneg(option: int, payload: bytes) -> bytes:
    body = bytes([rfc2217.COM_PORT_OPTION[0], option]) + payload.replace(b"\xff", b"\xff\xff")
    return rfc2217.IAC + rfc2217.SB + body + rfc2217.IAC + rfc2217.SE


def server_latency(url: str, rounds: int = 200) -> dict[str, float]:
    """Median microseconds from sending one RFC 2217 request to the daemon's answer."""
    host, port = url.split("//")[1].split(":")
    requests = {
        "SET_BAUDRATE": _subneg(rfc2217.SET_BAUDRATE[0], struct.pack("!I", 115200)),
        "SET_CONTROL (DTR on)": _subneg(rfc2217.SET_CONTROL[0], rfc2217.SET_CONTROL_DTR_ON),
        "PURGE_DATA": _subneg(rfc2217.PURGE_DATA[0], rfc2217.PURGE_RECEIVE_BUFFER),
    }
    out: dict[str, float] = {}
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        time.sleep(0.2)
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.recv(65536)  # the server's own option offers
        sock.setblocking(True)
        for name, request in requests.items():
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                sock.sendall(request)
                data = b""
                while rfc2217.SE not in data:
                    data += sock.recv(4096)
                times.append((time.perf_counter() - t0) * 1e6)
            out[name] = statistics.median(times)
    time.sleep(0.2)
    return out


def filter_cost() -> tuple[float, float]:
    """CPU seconds for 1 MB through PortManager.filter vs the daemon's no-IAC fast path."""

    class _Null:
        def write(self, data: bytes) -> None:
            pass

    class _Port:
        baudrate, bytesize, parity, stopbits = 115200, 8, "N", 1
        rtscts = xonxoff = dtr = rts = break_condition = False
        cts = dsr = ri = cd = False

    pm = rfc2217.PortManager(_Port(), _Null())
    chunk = bytes(range(256)).replace(b"\xff", b"\x00") * 16  # 4 KiB without IAC
    chunks = [chunk] * 256  # 1 MB
    t0 = time.process_time()
    for c in chunks:
        b"".join(pm.filter(c))
    slow = time.process_time() - t0
    t0 = time.process_time()
    for c in chunks:
        if pm.mode == rfc2217.M_NORMAL and pm.suboption is None and b"\xff" not in c:
            continue
        b"".join(pm.filter(c))
    fast = time.process_time() - t0
    return slow, fast


class LocalTimeoutSerial(rfc2217.Serial):  # type: ignore[misc]
    """pyserial's RFC 2217 client, but a timeout change does not renegotiate the port: the read
    timeout is the client's own business (its read loop uses it; the server never sees it).
    """

    @property
    def timeout(self) -> float | None:
        return self._timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        if value is not None and value < 0:
            raise ValueError(f"invalid timeout {value!r}")
        self._timeout = value


def api_read_mac(state_dir: Path, url: str, serial_class: Any) -> float:
    import esptool

    download(state_dir)
    with contextlib.redirect_stdout(io.StringIO()):
        t0 = time.perf_counter()
        port = serial_class(url, baudrate=115200, timeout=3)
        try:
            esp = esptool.cmds.detect_chip(port, connect_mode="no-reset")
            esptool.main(["--before", "no-reset", "read-mac"], esp=esp)
            elapsed = time.perf_counter() - t0
        finally:
            port.close()
    time.sleep(0.2)  # the daemon frees the board's single UART when it sees the hang-up
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-rfc2217-") as tmp:
        state_dir = Path(tmp)
        os.environ["HILFARM_SIM_DIR"] = str(state_dir)
        info = manager.up(state_dir=state_dir)
        sock_url, rfc_url = info.board(BOARD).port, info.board(BOARD).rfc2217
        try:
            sock_t = statistics.median(cli_read_mac(state_dir, sock_url) for _ in range(args.runs))
            rfc_t = statistics.median(cli_read_mac(state_dir, rfc_url) for _ in range(args.runs))
            prof = profile_rfc2217(state_dir, rfc_url)
            latency = server_latency(rfc_url)
            slow, fast = filter_cost()
            local = statistics.median(api_read_mac(state_dir, rfc_url, LocalTimeoutSerial)
                                      for _ in range(args.runs))
            plain = statistics.median(api_read_mac(state_dir, rfc_url, rfc2217.Serial)
                                      for _ in range(args.runs))
        finally:
            manager.down(state_dir)
    print(f"## esptool --before no-reset read-mac, medians of {args.runs} runs\n")
    print("| port | wall (s) | vs socket:// |")
    print("|---|---|---|")
    print(f"| socket:// (CLI) | {sock_t:.2f} | 1.0x |")
    print(f"| rfc2217:// (CLI) | {rfc_t:.2f} | {rfc_t / sock_t:.1f}x |")
    print(f"| rfc2217:// (API, pyserial client as is) | {plain:.2f} | {plain / sock_t:.1f}x |")
    print(f"| rfc2217:// (API, timeout changes kept local) | {local:.2f} | "
          f"{local / sock_t:.1f}x |")
    print("\n## Inside one rfc2217:// read-mac (esptool in-process, cProfile)\n")
    print("| what | count / seconds |")
    print("|---|---|")
    print(f"| wall | {prof['wall']:.2f} s |")
    print(f"| port.timeout assignments | {prof['timeout_sets']:.0f} |")
    print(f"| renegotiations (_reconfigure_port) | {prof['reconfigure']:.0f} |")
    print(f"| acknowledgement waits (DTR/RTS, flow control, purge) | {prof['waits']:.0f} |")
    print(f"| client time.sleep calls / seconds | {prof['sleeps']:.0f} / {prof['sleep_s']:.2f} s |")
    print("\n## Server side (the virtual rack's RFC 2217 port)\n")
    print("| request | median answer time (us) |")
    print("|---|---|")
    for name, us in latency.items():
        print(f"| {name} | {us:.0f} |")
    print(f"\nPortManager.filter on 1 MB: {slow:.3f} s CPU; with the no-IAC fast path: "
          f"{fast:.3f} s CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
