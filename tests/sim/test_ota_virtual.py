"""OTA on virtual boards: the app's `ota <url>`, the rollback state machine, Secure Boot, eFuses.

Each test runs an in-process daemon in a tmp state dir; flash is prepared by writing the
board's flash file before the daemon starts (what esptool would have written), and the console
is read straight from the board's socket:// port.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pytest_hilfarm.cli import main as cli_main
from pytest_hilfarm.errors import ConfigError
from pytest_hilfarm.esp.image import parse_image
from pytest_hilfarm.esp.otadata import OtaState
from pytest_hilfarm.ota.keys import generate_signing_key, key_digest
from pytest_hilfarm.ota.server import OtaServer
from pytest_hilfarm.ota.signing import load_signing_keys, sign_image
from pytest_hilfarm.sim import boot as boot_chain
from pytest_hilfarm.sim import daemon as sim_daemon
from pytest_hilfarm.sim.appbuild import build_app, build_flash_layout
from pytest_hilfarm.sim.model import Faults

OTADATA = 0xD000
FLASH_SIZE = 4 << 20


# --------------------------------------------------------------------------- fixtures & helpers


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keys")
    return {name: generate_signing_key(root / f"{name}.pem") for name in ("a", "b")}


@pytest.fixture(scope="module")
def signers(keys: dict[str, Path]) -> dict[str, object]:
    return {name: load_signing_keys([path]) for name, path in keys.items()}


def app(chip: str = "esp32c3", version: str = "1.0.0", **kwargs: object) -> bytes:
    return build_app(chip, "ota-demo", version, **kwargs)  # type: ignore[arg-type]


def tamper(signed: bytes) -> bytes:
    """Change one content byte and fix the checksum and SHA-256: only the signature notices."""
    parsed = parse_image(signed, verify=False)
    data = bytearray(signed)
    seg = parsed.segments[-1]
    data[seg.data_offset + 64] ^= 0xFF
    data[parsed.checksum_offset] ^= 0xFF  # XOR checksum of the segment data
    end = parsed.checksum_offset + 1
    data[end : end + 32] = hashlib.sha256(bytes(data[:end])).digest()
    return bytes(data)


def write_flash(state: Path, board: str, parts: list[tuple[int, bytes]]) -> None:
    image = bytearray(b"\xff" * FLASH_SIZE)
    for offset, blob in parts:
        image[offset : offset + len(blob)] = blob
    (state / f"{board}.flash").write_bytes(bytes(image))


class Board:
    """The board's console over its socket:// port, plus its control requests."""

    def __init__(self, daemon: sim_daemon.Daemon, board_id: str) -> None:
        self.daemon = daemon
        self.id = board_id
        slot = daemon._slots[board_id]
        self.virtual = slot.board
        port = slot.serial_sock.getsockname()[1]
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=3)
        self.sock.settimeout(0.2)
        self.buf = ""
        self.pos = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        time.sleep(0.05)

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self.buf += data.decode("utf-8", "replace")

    def close(self) -> None:
        self._stop.set()
        self.sock.close()

    def control(self, op: str, **fields: object) -> dict[str, object]:
        answer = self.daemon.handle({"op": op, "board": self.id, **fields})
        assert answer["ok"], answer
        return answer

    def expect(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                match = regex.search(self.buf, self.pos)
            if match is not None:
                self.pos = match.end()
                return match
            if time.monotonic() > deadline:
                with self._lock:
                    tail = self.buf[-3000:]
                raise AssertionError(f"{pattern!r} not seen within {timeout} s; tail:\n{tail}")
            time.sleep(0.02)

    def text(self) -> str:
        with self._lock:
            return self.buf

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def reset(self) -> None:
        self.control("reset", boot="flash")

    def booted(self, timeout: float = 10.0) -> tuple[str, str]:
        """Wait for the app's ready line; return (partition, ota_state) of that boot."""
        begin = self.pos
        ready = self.expect(r"hilfarm-demo: \S+ \S+ ready\r\n> ", timeout)
        with self._lock:
            text = self.buf[begin : ready.start()]
        runs = re.findall(r"running partition (\S+) at 0x[0-9a-f]+, ota_state (\S+)", text)
        assert runs, text[-2000:]
        return runs[-1]

    def command(self, cmd: str, timeout: float = 5.0) -> str:
        self.send(cmd)
        m = self.expect(re.escape(cmd) + r"\r\n((?:[^\r\n]*\r\n)*?)> ", timeout)
        return m.group(1)

    def version(self) -> str:
        return re.search(r"version: (\S+)", self.command("version")).group(1)  # type: ignore

    def otadata(self) -> tuple[boot_chain.OtaSelectEntry, ...]:
        return boot_chain.read_otadata_entries(self.virtual._flash, OTADATA)


@pytest.fixture
def rack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[
        tuple[Path, object]]:
    """(state dir, start(rack_boards_yaml_extra) -> Board) with teardown."""
    state = tmp_path / "state"
    state.mkdir()
    opened: list[tuple[object, Board]] = []

    def start(sim: dict[str, object] | None = None, chip: str = "esp32c3") -> Board:
        entry: dict[str, object] = {"id": "dut", "chip": chip, "port": "virtual",
                                    "flash": {"size": "4MB"}}
        if sim is not None:
            entry["sim"] = sim
        spec = sim_daemon.parse_rack({"name": "ota", "boards": [entry]}, str(tmp_path / "r.yaml"))
        ctx = sim_daemon.running(spec, state)
        daemon = ctx.__enter__()
        board = Board(daemon, "dut")
        opened.append((ctx, board))
        board.reset()
        return board

    yield state, start
    for ctx, board in reversed(opened):
        board.close()
        ctx.__exit__(None, None, None)  # type: ignore[attr-defined]


@pytest.fixture
def server() -> Iterator[OtaServer]:
    with OtaServer() as srv:
        yield srv


def base_flash(state: Path, factory: bytes, chip: str = "esp32c3") -> None:
    write_flash(state, "dut", build_flash_layout(chip, factory, "two-ota"))


# --------------------------------------------------------------------------- the state machine


def test_update_confirms_and_runs_valid(rack, server) -> None:
    state, start = rack
    base_flash(state, app(version="1.0.0"))
    dut = start()
    assert dut.booted() == ("factory", "none")
    url = server.publish("v2.bin", app(version="2.0.0"))
    assert dut.command(f"ota {url}").strip() == f"ota: downloading {url}"
    dut.expect(r"I \(\d+\) esp_https_ota: Starting OTA\.\.\.")
    dut.expect(r"esp_https_ota: Writing to <ota_0> partition at offset 0x110000")
    dut.expect(r"hilfarm-demo: New firmware version: 2\.0\.0")
    dut.expect(r"hilfarm-demo: OTA progress: \d+/\d+ bytes \(100%\)")
    dut.expect(r"OTA image verified: ota-demo 2\.0\.0 secure_version 0 sha256 [0-9a-f]{16} "
               r"key unchecked")
    dut.expect(r"OTA succeeded: ota-demo 2\.0\.0 in ota_0, rebooting")
    assert dut.booted() == ("ota_0", "PENDING_VERIFY")
    assert "self-test passed, marking app valid" in dut.text()
    assert dut.version() == "2.0.0"
    assert "ota_state: VALID" in dut.command("status")
    # It stays: a reset boots the confirmed slot again.
    dut.reset()
    assert dut.booted() == ("ota_0", "VALID")
    # The next update goes to the other slot.
    url3 = server.publish("v3.bin", app(version="3.0.0"))
    dut.command(f"ota {url3}")
    dut.expect(r"Writing to <ota_1> partition at offset 0x210000")
    assert dut.booted() == ("ota_1", "PENDING_VERIFY")


def test_self_test_failure_rolls_back(rack, server) -> None:
    state, start = rack
    base_flash(state, app(version="1.0.0"))
    dut = start()
    dut.booted()
    url = server.publish("bad.bin", app(version="2.0.0", faults=Faults(fail_self_test=True)))
    dut.command(f"ota {url}")
    dut.expect(r"OTA succeeded")
    assert dut.booted(timeout=10)[0] == "factory"
    assert "E (" in dut.text() and "self-test failed, rolling back" in dut.text()
    assert dut.version() == "1.0.0"
    states = {e.state for e in dut.otadata() if not e.is_erased}
    assert OtaState.INVALID in states


def test_reset_before_confirm_aborts_and_rolls_back(rack, server) -> None:
    state, start = rack
    base_flash(state, app(version="1.0.0"))
    dut = start()
    dut.booted()
    url = server.publish("slow.bin", app(version="2.0.0", faults=Faults(slow_boot=3.0)))
    dut.command(f"ota {url}")
    dut.expect(r"running partition ota_0 at 0x110000, ota_state PENDING_VERIFY")
    dut.reset()  # before the new app confirmed itself
    assert dut.booted()[0] == "factory"
    assert [e.state for e in dut.otadata() if not e.is_erased] == [OtaState.ABORTED]
    assert dut.version() == "1.0.0"


# --------------------------------------------------------------------------- faults


def test_server_drop_resumes_with_range(rack, server) -> None:
    state, start = rack
    base_flash(state, app(version="1.0.0"))
    dut = start()
    dut.booted()
    url = server.publish("v2.bin", app(version="2.0.0"))
    server.drop_after("v2.bin", 20000)
    dut.command(f"ota {url}")
    dut.expect(r"W \(\d+\) esp_https_ota: download interrupted at byte 20000: connection closed "
               r"after 20000 of \d+ bytes; retry 1/8 in 1 s")
    dut.expect(r"esp_https_ota: resuming at byte 20000 \(HTTP Range\)")
    assert dut.booted(timeout=15) == ("ota_0", "PENDING_VERIFY")
    log = server.wait_requests(2, name="v2.bin")
    assert [r.range for r in log] == [None, "bytes=20000-"]
    assert log[0].dropped and log[1].status == 206


def test_resume_from_a_server_without_range_support(rack, server) -> None:
    state, start = rack
    base_flash(state, app(version="1.0.0"))
    dut = start()
    dut.booted()
    url = server.publish("v2.bin", app(version="2.0.0"))
    server.drop_after("v2.bin", 24000)
    server.set_faults("v2.bin", ignore_range=True)
    dut.command(f"ota {url}")
    assert dut.booted(timeout=15) == ("ota_0", "PENDING_VERIFY")
    first, second = server.wait_requests(2, name="v2.bin")
    assert second.range == "bytes=24000-" and second.status == 200  # the whole file again
    assert dut.version() == "2.0.0"


def test_crash_before_confirm_aborts_and_rolls_back(rack, server) -> None:
    state, start = rack
    base_flash(state, app(version="1.0.0"))
    dut = start()
    dut.booted()
    crashing = app(version="2.0.0", faults=Faults(crash_at_boot=True))
    dut.command(f"ota {server.publish('crash.bin', crashing)}")
    dut.expect(r"Guru Meditation Error")
    assert dut.booted()[0] == "factory"
    assert [e.state for e in dut.otadata() if not e.is_erased] == [OtaState.ABORTED]


def test_server_drop_without_retries_is_rejected(rack, server) -> None:
    state, start = rack
    base_flash(state, app(version="1.0.0"))
    dut = start()
    dut.booted()
    url = server.publish("v2.bin", app(version="2.0.0"))
    server.drop_after("v2.bin", 30000)
    dut.command(f"ota {url} 0")
    dut.expect(r"E \(\d+\) hilfarm-demo: OTA failed: ESP_FAIL: download failed: connection "
               r"closed after 30000 of \d+ bytes")
    dut.expect(r"still running factory \(ota-demo 1\.0\.0\)")
    assert dut.version() == "1.0.0"
    assert all(e.is_erased for e in dut.otadata())  # otadata untouched
    dut.reset()
    assert dut.booted()[0] == "factory"


def test_404_is_rejected(rack, server) -> None:
    state, start = rack
    base_flash(state, app())
    dut = start()
    dut.booted()
    dut.command(f"ota {server.url_for('missing.bin')}")
    dut.expect(r"OTA failed: ESP_FAIL: server answered 404 Not Found")
    assert server.wait_requests(1)[-1].status == 404


def test_power_cut_mid_write_keeps_old_app(rack, server) -> None:
    state, start = rack
    base_flash(state, app(version="1.0.0"))
    dut = start()
    dut.booted()
    url = server.publish("big.bin", app(version="2.0.0", pad_to="400K"))
    server.slow("big.bin", 200_000)
    dut.command(f"ota {url}")
    dut.expect(r"OTA progress: \d+/\d+ bytes \(\d0%\)")
    dut.control("power", on=False)
    time.sleep(0.3)
    served = server.bytes_served("big.bin")
    dut.control("power", on=True)
    assert dut.booted() == ("factory", "none")
    assert dut.version() == "1.0.0"
    assert served < 400_000
    # The half-written slot is not bootable and otadata never pointed at it.
    assert all(e.is_erased for e in dut.otadata())


def test_wrong_chip_is_rejected_before_writing(rack, server) -> None:
    state, start = rack
    base_flash(state, app(version="1.0.0"))
    dut = start()
    dut.booted()
    url = server.publish("esp32.bin", app(chip="esp32", version="2.0.0"))
    dut.command(f"ota {url}")
    dut.expect(r"E \(\d+\) esp_https_ota: Mismatch chip id, expected 5, found 0")
    dut.expect(r"OTA failed: ESP_ERR_INVALID_VERSION: the image is for chip id 0, this board is "
               r"esp32c3")
    assert dut.version() == "1.0.0"


def test_too_big_is_rejected(rack, server) -> None:
    state, start = rack
    base_flash(state, app(version="1.0.0"))
    dut = start()
    dut.booted()
    url = server.publish("huge.bin", app(version="2.0.0", pad_to="1100K"))
    dut.command(f"ota {url}")
    dut.expect(r"OTA failed: ESP_ERR_INVALID_SIZE: the image is \d+ bytes but partition ota_0 "
               r"holds 1048576")
    assert dut.version() == "1.0.0"
    # Refused on the Content-Length, before a byte was written: the running slot is untouched.
    assert all(e.is_erased for e in dut.otadata())


def test_not_an_image_is_rejected(rack, server) -> None:
    state, start = rack
    base_flash(state, app())
    dut = start()
    dut.booted()
    dut.command(f"ota {server.publish('junk.bin', b'hello world' * 100)}")
    dut.expect(r"OTA image has invalid magic byte \(expected 0xE9, saw 0x68\)")
    dut.expect(r"OTA failed: ESP_ERR_OTA_VALIDATE_FAILED")


def test_console_usage_errors(rack) -> None:
    state, start = rack
    base_flash(state, app())
    dut = start()
    dut.booted()
    assert dut.command("ota").strip() == "error: usage: ota <url> [retries]"
    dut.command("ota http://example.com/x.bin")
    dut.expect(r"OTA failed: ESP_FAIL: download failed: cannot fetch 'http://example.com/x.bin': "
               r"a virtual board reaches only http://127\.0\.0\.1")


# --------------------------------------------------------------------------- signatures


def test_secure_boot_accepts_signed_and_rejects_tampered_and_unsigned(rack, server, keys,
                                                                      signers) -> None:
    state, start = rack
    digest_a = key_digest(keys["a"]).hex()
    base_flash(state, sign_image(app(version="1.0.0"), signers["a"]))
    dut = start({"secure_boot": True, "key_digests": [digest_a]})
    assert dut.booted()[0] == "factory"
    good = sign_image(app(version="2.0.0"), signers["a"])

    dut.command(f"ota {server.publish('tampered.bin', tamper(good))}")
    dut.expect(r"E \(\d+\) secure_boot_v2: no signature block verifies")
    dut.expect(r"E \(\d+\) esp_image: Secure boot signature verification failed")
    dut.expect(r"OTA failed: ESP_ERR_OTA_VALIDATE_FAILED")

    dut.command(f"ota {server.publish('unsigned.bin', app(version='2.0.1'))}")
    dut.expect(r"OTA failed: ESP_ERR_OTA_VALIDATE_FAILED: the image is not signed")

    other = sign_image(app(version="2.0.2"), signers["b"])
    dut.command(f"ota {server.publish('other-key.bin', other)}")
    dut.expect(r"OTA failed: ESP_ERR_OTA_VALIDATE_FAILED: signed by a key that is not trusted")
    assert dut.version() == "1.0.0"

    dut.command(f"ota {server.publish('good.bin', good)}")
    dut.expect(rf"key {digest_a[:16]}")
    assert dut.booted() == ("ota_0", "PENDING_VERIFY")
    assert dut.version() == "2.0.0"


def test_bootloader_refuses_tampered_slot_and_falls_back(rack, keys, signers) -> None:
    state, start = rack
    digest_a = key_digest(keys["a"]).hex()
    parts = build_flash_layout("esp32c3", sign_image(app(version="1.0.0"), signers["a"]),
                               "two-ota")
    # ota_0 holds a tampered image and otadata selects it (as if flashed by hand).
    from pytest_hilfarm.esp.otadata import OtaSelectEntry
    bad = tamper(sign_image(app(version="2.0.0"), signers["a"]))
    entry = OtaSelectEntry.make(1, OtaState.VALID).encode()
    parts += [(0x110000, bad), (OTADATA, entry)]
    write_flash(state, "dut", parts)
    dut = start({"secure_boot": True, "key_digests": [digest_a]})
    assert dut.booted()[0] == "factory"
    text = dut.text()
    assert "E (" in text and "secure_boot_v2: no signature block verifies with a trusted key" \
        in text
    assert "OTA app partition slot 0 is not bootable" in text


def test_nothing_bootable_boot_loops_with_the_real_error(rack) -> None:
    state, start = rack
    base_flash(state, app(version="1.0.0"))  # unsigned
    dut = start({"secure_boot": True, "key_digests": ["11" * 32]})
    dut.expect(r"E \(\d+\) esp_image: Secure boot signature verification failed")
    dut.expect(r"E \(\d+\) boot: No bootable app partitions in the partition table")
    dut.expect(r"rst:0x10 \(RTCWDT_RTC_RST\)")  # the retry of the boot loop
    status = dut.daemon.handle({"op": "status"})["boards"][0]
    assert status["mode"] == "boot-loop"


def test_signed_apps_mode_trusts_the_running_apps_keys(rack, server, signers) -> None:
    state, start = rack
    base_flash(state, sign_image(app(version="1.0.0"), signers["a"]))
    dut = start({"signed_apps": True})
    dut.booted()
    dut.command(f"ota {server.publish('b.bin', sign_image(app(version='2.0.0'), signers['b']))}")
    dut.expect(r"OTA failed: ESP_ERR_OTA_VALIDATE_FAILED: signed by a key that is not trusted "
               r"\(trusted keys from the running app\)")
    dut.command(f"ota {server.publish('a.bin', sign_image(app(version='2.0.0'), signers['a']))}")
    assert dut.booted() == ("ota_0", "PENDING_VERIFY")


def test_signed_apps_mode_does_not_boot_an_unsigned_app(rack) -> None:
    # CONFIG_SECURE_SIGNED_ON_BOOT_NO_SECURE_BOOT: the bootloader checks the app's signature too.
    state, start = rack
    base_flash(state, app(version="1.0.0"))
    dut = start({"signed_apps": True})
    dut.expect(r"E \(\d+\) secure_boot_v2: no signature block found after the image")
    dut.expect(r"E \(\d+\) boot: No bootable app partitions in the partition table")


# --------------------------------------------------------------------------- anti-rollback


def test_anti_rollback_refuses_downgrade_and_raises_counter(rack, server) -> None:
    state, start = rack
    base_flash(state, app(version="1.0.0", secure_version=1))
    dut = start({"anti_rollback": True, "secure_version": 1})
    dut.booted()
    dut.command(f"ota {server.publish('old.bin', app(version='0.9.0', secure_version=0))}")
    dut.expect(r"esp_ota_ops: The current secure version of the app is less than the one in "
               r"eFuse \(0 < 1\)")
    dut.expect(r"OTA failed: ESP_ERR_OTA_SMALL_SEC_VER")
    assert all(e.is_erased for e in dut.otadata())
    dut.command(f"ota {server.publish('new.bin', app(version='2.0.0', secure_version=3))}")
    assert dut.booted() == ("ota_0", "PENDING_VERIFY")
    assert "Secure version:   3" in dut.text()
    answer = dut.control("efuse")
    assert answer["efuse"]["secure_version"] == 3  # type: ignore[index]
    stored = json.loads((state / "dut.json").read_text())
    assert stored["efuse"]["secure_version"] == 3
    # The factory app (secure_version 1) is now below the counter: the bootloader skips it.
    dut.command(f"ota {server.publish('v4.bin', app(version='4.0.0', secure_version=3))}")
    assert dut.booted() == ("ota_1", "PENDING_VERIFY")


# --------------------------------------------------------------------------- eFuses


def test_efuse_burns_only_upwards(rack, keys) -> None:
    state, start = rack
    base_flash(state, app())
    dut = start()
    digest = key_digest(keys["a"]).hex()
    answer = dut.control("efuse")
    assert answer["efuse"] == {"secure_boot_enabled": False, "key_digests": [],
                               "secure_version": 0, "signed_apps_no_secure_boot": False,
                               "anti_rollback": False}
    assert answer["key_digest_slots"] == 3 and answer["secure_version_bits"] == 16
    refused = dut.daemon.handle({"op": "efuse", "board": "dut", "burn": {"secure_boot": True}})
    assert not refused["ok"] and "key digest" in refused["error"]
    dut.control("efuse", burn={"key_digest": digest})
    dut.control("efuse", burn={"key_digest": digest})  # same digest again: nothing changes
    dut.control("efuse", burn={"secure_version": 4})
    low = dut.daemon.handle({"op": "efuse", "board": "dut", "burn": {"secure_version": 2}})
    assert not low["ok"] and "cannot be lowered to 2" in low["error"]
    off = dut.daemon.handle({"op": "efuse", "board": "dut", "burn": {"secure_boot": False}})
    assert not off["ok"] and "only go from 0 to 1" in off["error"]
    for i in range(2):
        dut.control("efuse", burn={"key_digest": f"{i:02x}" * 32})
    full = dut.daemon.handle({"op": "efuse", "board": "dut", "burn": {"key_digest": "ee" * 32}})
    assert not full["ok"] and "all 3" in full["error"]
    answer = dut.control("efuse", burn={"secure_boot": True})
    assert answer["efuse"]["secure_boot_enabled"] is True  # type: ignore[index]
    stored = json.loads((state / "dut.json").read_text())["efuse"]
    assert stored["key_digests"][0] == digest and stored["secure_version"] == 4
    # Simulator only: a new chip, eFuses as the rack file says (blank here).
    answer = dut.control("efuse", new_chip=True)
    assert answer["efuse"]["key_digests"] == []  # type: ignore[index]


def test_esp32_has_one_key_digest_and_32_bit_counter(rack) -> None:
    state, start = rack
    base_flash(state, app(chip="esp32"), chip="esp32")
    dut = start(chip="esp32")
    dut.control("efuse", burn={"key_digest": "aa" * 32})
    full = dut.daemon.handle({"op": "efuse", "board": "dut", "burn": {"key_digest": "bb" * 32}})
    assert not full["ok"] and "all 1" in full["error"]
    assert dut.control("efuse", burn={"secure_version": 32})["secure_version_bits"] == 32


def test_rack_sim_keys_are_burned_at_start_and_never_lowered(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()

    def spec(sim: dict[str, object]) -> sim_daemon.RackSpec:
        return sim_daemon.parse_rack({"boards": [{"id": "dut", "chip": "esp32c3", "sim": sim}]},
                                     "rack.yaml")

    with sim_daemon.running(spec({"anti_rollback": True, "secure_version": 5,
                                  "key_digests": ["ab" * 32], "rollback": False}), state) as d:
        efuse = d.handle({"op": "efuse", "board": "dut"})["efuse"]
        assert efuse["secure_version"] == 5 and efuse["key_digests"] == ["ab" * 32]
    assert json.loads((state / "dut.json").read_text())["rollback_enabled"] is False
    with sim_daemon.running(spec({"secure_version": 2}), state) as d:
        efuse = d.handle({"op": "efuse", "board": "dut"})["efuse"]
        assert efuse["secure_version"] == 5  # burned bits stay
        assert efuse["anti_rollback"] is True


@pytest.mark.parametrize("sim, message", [
    ({"secure_boot": "yes"}, "secure_boot must be true or false"),
    ({"key_digests": ["xyz"]}, "is not 64 hex digits"),
    ({"secure_boot": True}, "needs at least one key digest"),
    ({"secure_version": -1}, "whole number >= 0"),
    ({"colour": "red"}, "unknown key(s) colour"),
])
def test_rack_sim_key_errors(sim: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        sim_daemon.parse_rack({"boards": [{"id": "dut", "chip": "esp32c3", "sim": sim}]}, "r")


def test_rack_digest_changes_only_with_sim_keys() -> None:
    plain = {"boards": [{"id": "dut", "chip": "esp32c3"}]}
    with_sim = {"boards": [{"id": "dut", "chip": "esp32c3", "sim": {"anti_rollback": True}}]}
    assert sim_daemon.parse_rack(plain, "a").digest != sim_daemon.parse_rack(with_sim, "a").digest
    assert sim_daemon.parse_rack(plain, "a").digest == sim_daemon.parse_rack(
        yaml.safe_load(yaml.safe_dump(plain)), "b").digest


def test_cli_efuse(rack, keys, capsys: pytest.CaptureFixture[str]) -> None:
    state, start = rack
    base_flash(state, app())
    dut = start()
    addr = dut.daemon.control_address
    info = {"pid": __import__("os").getpid(), "control": addr, "rack": "r", "boards": []}
    (state / "daemon.json").write_text(json.dumps(info))
    assert cli_main(["sim", "efuse", "dut", "--state-dir", str(state), "burn-key-digest",
                     "--key", str(keys["a"])]) == 0
    assert cli_main(["sim", "efuse", "dut", "--state-dir", str(state), "burn-secure-version",
                     "2"]) == 0
    assert cli_main(["sim", "efuse", "dut", "--state-dir", str(state), "enable-secure-boot"]) == 0
    out = capsys.readouterr().out
    assert "secure boot         : enabled" in out and "SECURE_BOOT_DIGEST0: " in out
    assert cli_main(["sim", "efuse", "dut", "--state-dir", str(state), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["efuse"]["secure_version"] == 2
    assert data["efuse"]["key_digests"] == [key_digest(keys["a"]).hex()]
    assert cli_main(["sim", "efuse", "dut", "--state-dir", str(state), "burn-secure-version",
                     "1"]) != 0
    assert "cannot be lowered" in capsys.readouterr().err
