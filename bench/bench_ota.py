"""Benchmark: OTA of a 1 MB image to three virtual boards at once (time until all confirmed).

Run: ``python bench/bench_ota.py`` (a few seconds). Starts an in-process virtual rack with three
ESP32-C3 boards in a temporary state dir, a local OtaServer, and sends ``ota <url>`` to the
boards' consoles; a board counts as done when its new app has booted, passed its self-test and
marked its slot VALID (the ``... ready`` line after ``self-test passed``). Prints a markdown
table: one board alone, then three at once, with and without Secure Boot (RSA-3072 signature
checked by the board at ``esp_ota_end`` and by the bootloader at the next boot).
"""

from __future__ import annotations

import argparse
import functools
import re
import tempfile
import time
from pathlib import Path

from pytest_hilfarm.board.console import Console
from pytest_hilfarm.drivers.transports import open_port
from pytest_hilfarm.ota.keys import generate_signing_key, key_digest
from pytest_hilfarm.ota.server import OtaServer
from pytest_hilfarm.ota.signing import load_signing_keys, sign_image
from pytest_hilfarm.sim import daemon as sim_daemon
from pytest_hilfarm.sim.appbuild import build_app, build_flash_layout

CHIP = "esp32c3"
FLASH = 4 << 20
MB = 1 << 20
READY = re.compile(r"running partition ota_0 at 0x110000, ota_state PENDING_VERIFY\r\n"
                   r"(?:.*\r\n)*?.*self-test passed, marking app valid\r\n(?:.*\r\n)*?"
                   r".*ota-bench 2\.0\.0 ready")


def run(boards: int, secure: bool, tmp: Path, signer: object, digest: str,
        image: bytes, base: bytes) -> dict[str, float]:
    state = Path(tempfile.mkdtemp(dir=tmp))
    flash = bytearray(b"\xff" * FLASH)
    for offset, blob in build_flash_layout(CHIP, base, "two-ota"):
        flash[offset : offset + len(blob)] = blob
    entries = []
    for i in range(boards):
        (state / f"c3-{i}.flash").write_bytes(bytes(flash))
        entry: dict[str, object] = {"id": f"c3-{i}", "chip": CHIP}
        if secure:
            entry["sim"] = {"secure_boot": True, "key_digests": [digest]}
        entries.append(entry)
    spec = sim_daemon.parse_rack({"name": "bench", "boards": entries}, "bench.yaml")
    with sim_daemon.running(spec, state) as daemon, OtaServer() as server:
        url = server.publish("app.bin", image)
        # The project's own console (reader thread, log file, expect buffer), as the farm uses.
        consoles = [
            Console(functools.partial(open_port, daemon.board_urls(slot)[0]),
                    state / f"{slot.spec.id}.log", name=slot.spec.id)
            for slot in daemon._slots.values()
        ]
        time.sleep(0.05)
        for slot, con in zip(daemon._slots.values(), consoles):
            daemon.handle({"op": "reset", "board": slot.spec.id, "boot": "flash"})
            con.expect(r"ota-bench 1\.0\.0 ready\r\n> ", timeout=10)
        marks = [con.mark() for con in consoles]
        t0 = time.perf_counter()
        for con in consoles:
            con.write(f"ota {url}\n")
        # Poll every board so each one's own finishing time is taken, whichever ends first.
        finished: dict[int, float] = {}
        while len(finished) < len(consoles):
            if time.perf_counter() - t0 > 60:
                raise TimeoutError(f"OTA not confirmed on every board; tail: {consoles[0].tail()}")
            for i, (con, mark) in enumerate(zip(consoles, marks)):
                if i not in finished and READY.search(con.text_since(mark)):
                    finished[i] = time.perf_counter() - t0
            time.sleep(0.005)
        done = list(finished.values())
        for con in consoles:
            con.close()
        served = server.bytes_served("app.bin")
    return {"boards": boards, "all": max(done), "first": min(done), "served": served}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1MB", help="update image size (default 1MB)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ota-") as tmpdir:
        tmp = Path(tmpdir)
        key = generate_signing_key(tmp / "key.pem")
        signer = load_signing_keys([key])
        digest = key_digest(key).hex()
        base = sign_image(build_app(CHIP, "ota-bench", "1.0.0"), signer)
        # Just under 1 MB (the slot size) with the 4 KB signature sector.
        pad = "1012K" if args.size.upper() in ("1MB", "1M") else args.size
        image = sign_image(build_app(CHIP, "ota-bench", "2.0.0", pad_to=pad), signer)
        rows = []
        for boards, secure in ((1, False), (3, False), (1, True), (3, True)):
            result = run(boards, secure, tmp, signer, digest, image, base)
            rows.append((boards, secure, result))
    print(f"OTA of a {len(image) / MB:.2f} MB image (signed, {len(image)} bytes) over HTTP on "
          "127.0.0.1, until the new app runs and is VALID\n")
    print("| boards | Secure Boot | first confirmed (s) | all confirmed (s) | MB/s (all boards) |")
    print("|---|---|---|---|---|")
    for boards, secure, r in rows:
        rate = r["served"] / MB / r["all"]
        print(f"| {boards} | {'on' if secure else 'off'} | {r['first']:.2f} | {r['all']:.2f} | "
              f"{rate:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
