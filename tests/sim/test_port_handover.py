"""A reset right after a board's port is (re)opened is heard, whoever had the port before.

The console hands the port to esptool and takes it back (pause/resume) around every flash and
probe; the farm resets the board the moment ``resume()`` returns. A real tty is open when
open() returns, so the whole boot log is always read. On the virtual rack a connection is only
queued when connect() returns, and while the previous client's hang-up is in flight the daemon
holds the new one back: a reset in that window used to go unheard ("no app start banner ...
(no output at all)"). These tests interleave hand-overs, other clients and resets on three
boards at once and require every boot's log from its first ROM line on.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from pathlib import Path

import pytest

from pytest_hilfarm.board.device import Device
from pytest_hilfarm.farm import Farm
from pytest_hilfarm.sim.appbuild import write_build_dir

RACK = """\
version: 1
name: handover
boards:
  - {id: h1, chip: esp32, port: virtual, reset: virtual, power: virtual}
  - {id: h2, chip: esp32, port: virtual, reset: virtual, power: virtual}
  - {id: h3, chip: esp32c3, port: virtual, reset: virtual, power: virtual}
"""
ROUNDS = 70  # per board; 3 boards: 210 hand-overs with a reset right behind each


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory, private_virtual_rack: Path) -> Farm:
    root = tmp_path_factory.mktemp("handover")
    (root / "rack.yaml").write_text(RACK)
    f = Farm.open(root / "rack.yaml", log_root=root / "logs")
    builds = {chip: write_build_dir(root / chip, chip, "handover", "1.0.0").path
              for chip in ("esp32", "esp32c3")}
    for board in ("h1", "h2", "h3"):
        dev = f.open_device(board)
        try:
            dev.flash(builds[dev.chip])
        finally:
            dev.console.close()
    yield f
    f.close()


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].split(":")
    return host, int(port)


def _hand_over_and_reset(dev: Device, rounds: int, seed: int, failures: list[str]) -> None:
    rng = random.Random(seed)
    rom_first_line = "rst:0x1 (POWERON_RESET)" if dev.chip == "esp32" else "ESP-ROM:"
    for i in range(rounds):
        dev.console.pause()
        other = rng.random()
        late: threading.Thread | None = None
        if other < 0.8:
            # Another client (esptool, say) has the port and hangs up just as the console takes
            # it back: the console's connection lands in the daemon's hand-over window. Under
            # load the hang-up takes a while to be noticed; half the rounds make that explicit.
            sock = socket.create_connection(_host_port(dev.port), timeout=5)
            sock.sendall(b"\xc0\x00\x08\x24\x00" + bytes(36) + b"\xc0")  # a SYNC frame
            time.sleep(0.005)
            if other < 0.4:
                late = threading.Timer(rng.uniform(0.02, 0.06), sock.close)
                late.start()
            else:
                sock.close()
        mark = dev.console.mark()
        dev.console.resume()
        try:
            dev.reset(timeout=5)
        except Exception as exc:  # noqa: BLE001 - collected: the test reports every failure
            failures.append(f"{dev.id} round {i}: {str(exc).splitlines()[0]}")
            continue
        finally:
            if late is not None:
                late.join()
        seen = dev.console.text_since(mark)
        if rom_first_line.split(" ")[0] not in seen:
            failures.append(f"{dev.id} round {i}: boot log starts late: {seen[:80]!r}")


def test_reset_after_port_handover_is_always_heard(farm: Farm) -> None:
    devices = [farm.open_device(b, log_path=farm.log_root / f"{b}.log", boot_timeout=5)
               for b in ("h1", "h2", "h3")]
    failures: list[str] = []
    try:
        threads = [threading.Thread(target=_hand_over_and_reset,
                                    args=(dev, ROUNDS, n, failures)) for n, dev in
                   enumerate(devices)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
    finally:
        for dev in devices:
            dev.console.close()
    assert failures == [], f"{len(failures)} of {3 * ROUNDS} resets went (partly) unheard: " \
        + "; ".join(failures[:5])
