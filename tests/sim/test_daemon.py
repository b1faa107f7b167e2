"""The virtual rack daemon: control endpoint, port rules, bad input, manager and CLI."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_hilfarm.cli import main as cli_main
from pytest_hilfarm.errors import ConfigError, UsageError
from pytest_hilfarm.sim import daemon as sim_daemon
from pytest_hilfarm.sim import manager, slip

RACK_YAML = """\
name: test-rack
boards:
  - {id: esp32-1, chip: esp32, port: virtual, flash: {size: 4MB}, features: [mesh-radio]}
  - {id: esp32-2, chip: esp32, port: virtual, flash: {size: 2MB}, features: [mesh-radio]}
  - {id: c3-1, chip: esp32c3, port: virtual, flash: {size: 8MB}}
  - {id: real-1, chip: esp32, port: /dev/ttyUSB0}
"""


def packet(op: int, data: bytes = b"", chk: int = 0) -> bytes:
    return slip.encode(struct.pack("<BBHI", 0, op, len(data), chk) + data)


SYNC = packet(0x08, b"\x07\x07\x12\x20" + b"\x55" * 32)


def checksum(data: bytes) -> int:
    value = 0xEF
    for byte in data:
        value ^= byte
    return value


def read_frames(sock: socket.socket, count: int, timeout: float = 3.0) -> list[bytes]:
    """Read ``count`` SLIP frames (ignoring text such as the ROM banner)."""
    decoder = slip.SlipDecoder()
    frames: list[bytes] = []
    deadline = time.monotonic() + timeout
    sock.settimeout(0.2)
    while len(frames) < count:
        assert time.monotonic() < deadline, f"got {len(frames)} of {count} frames"
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        assert data, "port closed"
        frames += [bytes(f) for f in decoder.feed(data)]
    return frames


def assert_syncs(sock: socket.socket) -> None:
    sock.sendall(SYNC)
    frames = read_frames(sock, 8)
    assert all(f[:2] == b"\x01\x08" for f in frames)


def connect(url: str) -> socket.socket:
    host, port = url.split("//")[1].split(":")
    return socket.create_connection((host, int(port)), timeout=3)


def closed_at_once(url: str) -> bool:
    with connect(url) as sock:
        sock.settimeout(2)
        try:
            return sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


@pytest.fixture(scope="module")
def rack_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rack") / "rack.yaml"
    path.write_text(RACK_YAML)
    return path


@pytest.fixture(scope="module")
def rack(rack_file: Path) -> Iterator[sim_daemon.Daemon]:
    state = rack_file.parent / "state"
    with sim_daemon.running(sim_daemon.load_rack(rack_file), state) as d:
        yield d


def board(rack: sim_daemon.Daemon, board_id: str) -> dict:
    answer = rack.handle({"op": "status"})
    return next(b for b in answer["boards"] if b["id"] == board_id)


def ok(rack: sim_daemon.Daemon, **request: object) -> dict:
    answer = rack.handle(request)
    assert answer["ok"], answer
    return answer


# ---------------------------------------------------------------------------- rack file


def test_rack_file_keeps_only_virtual_boards(rack_file: Path) -> None:
    spec = sim_daemon.load_rack(rack_file)
    assert [b.id for b in spec.boards] == ["esp32-1", "esp32-2", "c3-1"]
    assert [b.flash_size >> 20 for b in spec.boards] == [4, 2, 8]
    assert spec.boards[0].features == ("mesh-radio",)


def test_default_rack_has_the_documented_boards() -> None:
    spec = sim_daemon.load_rack(None)
    chips = [b.chip for b in spec.boards]
    assert chips.count("esp32") >= 3 and "esp32s2" in chips and "esp32c3" in chips


def test_rack_sim_keys_set_revision_mac_and_flash_size(tmp_path: Path) -> None:
    path = tmp_path / "rack.yaml"
    path.write_text("boards:\n"
                    "  - {id: a, chip: esp32c3, flash: {size: 4MB},\n"
                    "     sim: {revision: v1.1, mac: '58-CF-79-00-00-0A', flash_size: 16MB}}\n"
                    "  - {id: b, chip: esp32s3}\n")
    a, b = sim_daemon.load_rack(path).boards
    assert (a.revision, a.mac, a.flash_size) == (101, bytes.fromhex("58cf7900000a"), 16 << 20)
    assert (b.revision, b.mac, b.flash_size) == (None, None, 4 << 20)
    plain = tmp_path / "plain.yaml"
    plain.write_text("boards:\n  - {id: a, chip: esp32c3}\n  - {id: b, chip: esp32s3}\n")
    assert sim_daemon.load_rack(plain).digest != sim_daemon.load_rack(path).digest


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("boards: [{id: a, chip: esp8266}]", "cannot be simulated"),
        ("boards: [{id: a, chip: esp32, flash: {size: 3MB}}]", "not offered"),
        ("boards: [{id: 'a/b', chip: esp32}]", "plain name"),
        ("boards: [{id: a, chip: esp32}, {id: a, chip: esp32}]", "twice"),
        ("name: x", "boards"),
        ("boards: [{id: a, chip: esp32, port: /dev/ttyUSB0}]", "no virtual boards"),
        ("boards: [{id: a, chip: esp32c3, sim: {revision: v0.x}}]", "not a chip revision"),
        ("boards: [{id: a, chip: esp32, sim: {revision: v3.7}}]", "cannot be encoded in ESP32"),
        ("boards: [{id: a, chip: esp32c3, sim: {mac: '58:cf:79'}}]", "not six hex bytes"),
        ("boards: [{id: a, chip: esp32c3, sim: {mac: '01:00:5e:00:00:01'}}]", "multicast"),
        ("boards: [{id: a, chip: esp32, sim: {mac: '24:0a:c4:00:00:01'}}, "
         "{id: b, chip: esp32, sim: {mac: '24:0a:c4:00:00:01'}}]", "also board 'a'"),
        ("boards: [{id: a, chip: esp32, sim: {flash_size: 3MB}}]", "not offered"),
        ("boards: [{id: a, chip: esp32, sim: {revison: v3.1}}]", "unknown key"),
    ],
)
def test_bad_rack_files_say_what_and_where(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        sim_daemon.load_rack(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------- control endpoint


def control_line(rack: sim_daemon.Daemon, raw: bytes) -> dict:
    with connect("tcp://" + rack.control_address) as sock:
        sock.sendall(raw)
        return json.loads(sock.makefile("rb").readline())


def test_status_lists_boards_with_urls(rack: sim_daemon.Daemon) -> None:
    answer = control_line(rack, b'{"op": "status"}\n')
    assert answer["ok"]
    ids = [b["id"] for b in answer["boards"]]
    assert ids == ["esp32-1", "esp32-2", "c3-1"]
    first = answer["boards"][0]
    assert re.fullmatch(r"socket://127\.0\.0\.1:\d+", first["port"])
    assert re.fullmatch(r"rfc2217://127\.0\.0\.1:\d+", first["rfc2217"])
    assert re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", first["mac"])
    assert len({b["mac"] for b in answer["boards"]}) == 3
    assert first["powered"] and first["mode"] in ("boot-loop", "app", "halted")
    assert answer["boards"][1]["flash_size"] == 2 << 20


def test_daemon_json_matches_status(rack: sim_daemon.Daemon) -> None:
    data = json.loads((rack.state_dir / "daemon.json").read_text())
    assert data["pid"] == os.getpid() and data["control"] == rack.control_address
    assert [b["port"] for b in data["boards"]] == [
        b["port"] for b in rack.handle({"op": "status"})["boards"]
    ]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"not json\n", "not JSON"),
        (b"[1, 2]\n", "JSON object"),
        (b'{"op": "fly"}\n', "unknown op"),
        (b'{"op": "power", "board": "nope", "on": true}\n', "unknown board 'nope'"),
        (b'{"op": "power", "board": "esp32-1", "on": "yes"}\n', "'on' must be true or false"),
        (b'{"op": "reset", "board": "esp32-1", "boot": "usb"}\n', "boot must be"),
        (b'{"op": "mesh", "loss": 2}\n', "loss must be"),
        (b'{"op": "mesh", "partitions": [["ghost"]]}\n', "unknown boards"),
    ],
)
def test_bad_control_requests_get_an_error_not_a_crash(
    rack: sim_daemon.Daemon, raw: bytes, message: str
) -> None:
    answer = control_line(rack, raw)
    assert answer["ok"] is False and message in answer["error"]
    assert control_line(rack, b'{"op": "status"}\n')["ok"]


def test_power_reset_and_lines(rack: sim_daemon.Daemon) -> None:
    ok(rack, op="power", board="esp32-2", on=False)
    assert (board(rack, "esp32-2")["powered"], board(rack, "esp32-2")["mode"]) == (False, "off")
    assert rack.handle({"op": "reset", "board": "esp32-2"})["ok"] is False  # powered off
    ok(rack, op="power", board="esp32-2", on=True)
    assert ok(rack, op="reset", board="esp32-2", boot="download")["mode"] == "download"
    assert ok(rack, op="lines", board="esp32-2", en=False)["mode"] == "reset"
    ok(rack, op="lines", board="esp32-2", io0=False)
    ok(rack, op="lines", board="esp32-2", en=True)
    time.sleep(0.3)  # EN's RC delay, then IO0 is sampled
    assert board(rack, "esp32-2")["mode"] == "download"
    ok(rack, op="lines", board="esp32-2", io0=True)
    assert ok(rack, op="reset", board="esp32-2", boot="flash")["mode"] != "download"


def test_mesh_conditions_round_trip(rack: sim_daemon.Daemon) -> None:
    answer = ok(rack, op="mesh", loss=0.25, latency_ms=5, partitions=[["esp32-1"], ["esp32-2"]])
    assert answer["loss"] == 0.25 and answer["latency_ms"] == 5
    assert answer["partitions"] == [["esp32-1"], ["esp32-2"]]
    assert ok(rack, op="mesh")["loss"] == 0.25
    assert ok(rack, op="mesh", loss=0, partitions=[])["partitions"] == []


def test_wire_time_toggle(rack: sim_daemon.Daemon) -> None:
    assert ok(rack, op="wire_time", enabled=True, board="c3-1")["boards"] == ["c3-1"]
    assert board(rack, "c3-1")["wire_time"] and not board(rack, "esp32-1")["wire_time"]
    ok(rack, op="wire_time", enabled=False)
    assert not any(b["wire_time"] for b in rack.handle({"op": "status"})["boards"])


def test_unplug_drops_the_client_and_refuses_connects(rack: sim_daemon.Daemon) -> None:
    url = board(rack, "c3-1")["port"]
    with connect(url) as sock:
        time.sleep(0.1)
        ok(rack, op="unplug", board="c3-1")
        sock.settimeout(2)
        while sock.recv(65536):  # boot log sent before the unplug, then EOF
            pass
    assert not board(rack, "c3-1")["plugged"] and not board(rack, "c3-1")["powered"]
    assert closed_at_once(url)
    assert rack.handle({"op": "power", "board": "c3-1", "on": True})["ok"] is False
    ok(rack, op="plug", board="c3-1")
    ok(rack, op="reset", board="c3-1", boot="download")
    with connect(url) as sock:
        assert_syncs(sock)


# ---------------------------------------------------------------------------- ports


def test_busy_port_refuses_second_client_and_first_keeps_working(rack: sim_daemon.Daemon) -> None:
    b = board(rack, "esp32-1")
    ok(rack, op="reset", board="esp32-1", boot="download")
    with connect(b["port"]) as first:
        assert_syncs(first)
        assert closed_at_once(b["port"])
        assert closed_at_once(b["rfc2217"])  # one UART: busy across both URLs
        assert board(rack, "esp32-1")["client"]
        assert_syncs(first)
    time.sleep(0.2)
    with connect(b["port"]) as again:
        assert_syncs(again)


def test_connect_does_not_change_the_mode(rack: sim_daemon.Daemon) -> None:
    ok(rack, op="reset", board="esp32-1", boot="flash")
    before = board(rack, "esp32-1")["mode"]
    with connect(board(rack, "esp32-1")["port"]):
        time.sleep(0.1)
        assert board(rack, "esp32-1")["mode"] == before != "download"


def test_bad_input_then_correct_answers(rack: sim_daemon.Daemon) -> None:
    ok(rack, op="reset", board="esp32-1", boot="download")
    rng = random.Random(1234)
    with connect(board(rack, "esp32-1")["port"]) as sock:
        for _ in range(200):  # random bytes, some with frame delimiters in them
            sock.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
        sock.sendall(b"\xc0\xdb\x00\xc0" + b"\xc0" + b"\x00" * 70000 + b"\xc0")  # bad escape, huge
        sock.sendall(b"\xc0\xc0\xc0")
        time.sleep(0.3)
        sock.settimeout(0.2)
        try:
            while sock.recv(65536):
                pass
        except TimeoutError:
            pass
        assert_syncs(sock)
        # Unknown command: a ROM error status, not silence.
        sock.sendall(packet(0x55, b"\x00" * 4))
        frame = read_frames(sock, 1)[0]
        assert frame[:2] == b"\x01\x55" and frame[8] == 1
        # A flash command before SPI_ATTACH: the ROM has no flash attached yet.
        sock.sendall(packet(0x02, struct.pack("<IIII", 0x1000, 1, 0x400, 0x40000)))
        assert read_frames(sock, 1)[0][8] == 1
        sock.sendall(packet(0x0D, bytes(8)))  # SPI_ATTACH, as esptool's attach_flash sends it
        assert read_frames(sock, 1)[0][8] == 0
        # FLASH_DATA with a bad checksum (after a valid FLASH_BEGIN): an error status.
        sock.sendall(packet(0x02, struct.pack("<IIII", 0x1000, 1, 0x400, 0x40000)))
        assert read_frames(sock, 1)[0][8] == 0
        block = b"\x11" * 0x400
        data = struct.pack("<IIII", len(block), 0, 0, 0) + block
        sock.sendall(packet(0x03, data, checksum(block) ^ 0x5A))
        assert read_frames(sock, 1)[0][8] == 1
        # A write past the end of the 4 MB flash: an error status.
        sock.sendall(packet(0x02, struct.pack("<IIII", 0x2000, 2, 0x400, 0x3FF000)))
        assert read_frames(sock, 1)[0][8] == 1
        assert_syncs(sock)
    assert control_line(rack, b'{"op": "status"}\n')["ok"]


def test_disconnect_mid_flash_keeps_what_was_written(rack: sim_daemon.Daemon) -> None:
    ok(rack, op="reset", board="esp32-2", boot="download")
    url = board(rack, "esp32-2")["port"]
    blocks = [bytes([0x30 + i]) * 0x400 for i in range(3)]
    with connect(url) as sock:
        assert_syncs(sock)
        sock.sendall(packet(0x0D, bytes(8)))  # SPI_ATTACH
        assert read_frames(sock, 1)[0][8] == 0
        sock.sendall(packet(0x02, struct.pack("<IIII", 0x4000, 16, 0x400, 0x50000)))
        assert read_frames(sock, 1)[0][8] == 0
        for seq, block in enumerate(blocks):
            data = struct.pack("<IIII", len(block), seq, 0, 0) + block
            sock.sendall(packet(0x03, data, checksum(block)))
            assert read_frames(sock, 1)[0][8] == 0
    # Gone mid-write (13 blocks missing). Reconnect and read back with READ_FLASH_SLOW.
    time.sleep(0.2)
    ok(rack, op="reset", board="esp32-2", boot="download")
    with connect(url) as sock:
        assert_syncs(sock)
        sock.sendall(packet(0x0D, bytes(8)))  # SPI_ATTACH
        assert read_frames(sock, 1)[0][8] == 0
        for seq, block in enumerate(blocks):
            sock.sendall(packet(0x0E, struct.pack("<II", 0x50000 + seq * 0x400, 64)))
            frame = read_frames(sock, 1)[0]
            assert frame[8:72] == block[:64]
        sock.sendall(packet(0x0E, struct.pack("<II", 0x50000 + 3 * 0x400, 64)))
        assert read_frames(sock, 1)[0][8:72] == b"\xff" * 64  # erased, never written


def test_burst_of_connects(rack: sim_daemon.Daemon) -> None:
    ok(rack, op="reset", board="esp32-1", boot="download")
    url = board(rack, "esp32-1")["port"]
    socks: list[socket.socket] = []

    def hammer() -> None:
        for _ in range(10):
            try:
                socks.append(connect(url))
            except OSError:
                pass

    threads = [threading.Thread(target=hammer) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in socks:
        s.close()
    # Connects still queued in the listen backlog are admitted (and see EOF) one by one, so
    # the port may stay busy for a moment: retry as a client of a busy serial port would.
    deadline = time.monotonic() + 5
    while True:
        try:
            with connect(url) as sock:
                assert_syncs(sock)
            break
        except (OSError, AssertionError):
            assert time.monotonic() < deadline, "port never became free after the burst"
            time.sleep(0.1)
    assert control_line(rack, b'{"op": "status"}\n')["ok"]


def test_rfc2217_port_negotiates_and_carries_slip(rack: sim_daemon.Daemon) -> None:
    import serial

    ok(rack, op="reset", board="esp32-1", boot="download")
    port = serial.serial_for_url(board(rack, "esp32-1")["rfc2217"], timeout=1)
    try:
        port.write(SYNC)
        decoder = slip.SlipDecoder()
        frames: list[bytes] = []
        deadline = time.monotonic() + 3
        while len(frames) < 8 and time.monotonic() < deadline:
            frames += decoder.feed(port.read(port.in_waiting or 1))
        assert len(frames) == 8
    finally:
        port.close()


# ---------------------------------------------------------------------------- manager & CLI


def test_manager_up_is_idempotent_and_down_stops(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HILFARM_SIM_DIR", str(tmp_path))
    # A stale daemon.json (dead pid) must be replaced.
    (tmp_path / "daemon.json").write_text(json.dumps({"pid": 2**22 + 17, "control": "x:1"}))
    results: list[manager.DaemonInfo] = []
    threads = [threading.Thread(target=lambda: results.append(manager.up())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(results) == 2 and results[0].pid == results[1].pid
        assert manager.ensure_running().pid == results[0].pid
        info = manager.read_info()
        assert info is not None and info.board("esp32-1").port.startswith("socket://")
        assert cli_main(["sim", "status", "--json"]) == 0
        listing = json.loads(capsys.readouterr().out)
        assert {"id", "chip", "mac", "port", "rfc2217", "control"} <= set(listing["boards"][0])
        assert cli_main(["sim", "reset", "esp32c3-1", "--download"]) == 0
        assert "download" in capsys.readouterr().out
        assert cli_main(["sim", "power", "esp32s2-1", "off"]) == 0
        assert cli_main(["sim", "mesh", "--loss", "0.1", "--partition", "esp32-1,esp32-2"]) == 0
        assert "esp32-1,esp32-2" in capsys.readouterr().out
        assert cli_main(["sim", "status"]) == 0
        table = capsys.readouterr().out
        assert re.search(r"esp32s2-1\s+esp32s2\s+\S+\s+socket://\S+\s+rfc2217://\S+\s+off", table)
        assert cli_main(["sim", "power", "ghost", "on"]) == 2
        assert "no board 'ghost'" in capsys.readouterr().err
        assert cli_main(["sim", "reset", "esp32c3-l"]) == 2
        assert "did you mean 'esp32c3-1'?" in capsys.readouterr().err
    finally:
        assert manager.down() is True
    assert manager.status() is None and manager.down() is False
    assert cli_main(["sim", "status"]) == 3


def test_control_parser_survives_random_requests(rack: sim_daemon.Daemon) -> None:
    rng = random.Random(99)
    ops = ["status", "power", "reset", "lines", "mesh", "wire_time", "plug", "fly", "", None, 7]
    keys = ["op", "board", "on", "boot", "en", "io0", "loss", "latency_ms", "partitions",
            "enabled", "x"]
    values: list[object] = [None, True, False, 0, -1, 1.5, 2**70, "", "esp32-1", "c3-1", "ghost",
                            "download", "flash", [], [["esp32-1"]], [[1, 2]], {"a": 1}, "\u0000"]
    answered = 0
    for i in range(10_000):
        if i % 2:
            raw = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
        else:
            request: dict[str, object] = {k: rng.choice(values) for k in rng.sample(keys, 3)}
            request["op"] = rng.choice(ops)
            if request["op"] in ("power", "reset", "lines", "plug", "wire_time"):
                request["board"] = "ghost"  # exercise validation, not 5000 power cycles
            raw = json.dumps(request).encode()
        answer = rack.handle_line(raw)
        assert isinstance(answer.get("ok"), bool)
        assert answer["ok"] or isinstance(answer.get("error"), str)
        answered += 1
    assert answered == 10_000
    assert control_line(rack, b'{"op": "status"}\n')["ok"]


def test_serve_in_the_foreground_stops_on_sigterm(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest_hilfarm", "sim", "serve", "--state-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while manager.read_info(tmp_path) is None:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert manager.status(tmp_path) is not None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert not (tmp_path / "daemon.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_base_port_fixes_the_ports(rack_file: Path, tmp_path: Path) -> None:
    with socket.socket() as probe:  # a free port to start from (the next few are likely free)
        probe.bind(("127.0.0.1", 0))
        base = probe.getsockname()[1]
    if base > 65000:
        pytest.skip("no room above the free port found")
    spec = sim_daemon.load_rack(rack_file)
    try:
        with sim_daemon.running(spec, tmp_path, base_port=base) as d:
            assert d.control_address == f"127.0.0.1:{base}"
            urls = [(b["port"], b["rfc2217"]) for b in d.handle({"op": "status"})["boards"]]
            assert urls[1] == (f"socket://127.0.0.1:{base + 3}", f"rfc2217://127.0.0.1:{base + 4}")
    except UsageError as exc:
        pytest.skip(f"a port next to {base} is taken: {exc}")


def test_control_client_keeps_its_connection_and_survives_a_daemon_restart(
        rack_file: Path, tmp_path: Path) -> None:
    """Requests of one client share a connection; after the daemon restarts on the same port,
    the kept (now closed) connection is replaced and the request still gets its answer."""
    from pytest_hilfarm.drivers.virtual import ControlClient

    spec = sim_daemon.load_rack(rack_file)
    for attempt in range(8):  # a free port whose neighbours (the boards' ports) are free too
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base > 65000:
            continue
        client = None
        try:
            with sim_daemon.running(spec, tmp_path / f"one-{attempt}", base_port=base) as d:
                client = ControlClient(d.control_address)
                client.status()
                kept = client._idle[0].getsockname()
                client.status()
                client.reset(spec.boards[0].id, "flash")
                assert [s.getsockname() for s in client._idle] == [kept]  # one, reused
            with sim_daemon.running(spec, tmp_path / f"two-{attempt}", base_port=base):
                assert {b["id"] for b in client.status()} == {b.id for b in spec.boards}
                assert client._idle[0].getsockname() != kept
        except UsageError:
            continue  # a port next to `base` is taken: try another
        finally:
            if client is not None:
                client.close()
                assert client._idle == []
        return
    pytest.skip("no free run of ports found in 8 tries")
