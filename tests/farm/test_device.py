"""Device handle: boot parsing, reset/power-cycle/flash choreography over a real console."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pytest_hilfarm.board.console import Console
from pytest_hilfarm.board.device import Device, parse_boot_info
from pytest_hilfarm.drivers.flashing import FlashPlan, FlashReport, RegionResult
from pytest_hilfarm.drivers.power import VirtualPower
from pytest_hilfarm.drivers.reset import VirtualReset
from pytest_hilfarm.drivers.transports import open_port
from pytest_hilfarm.drivers.virtual import ControlClient
from pytest_hilfarm.errors import BootError, CommandError, ConsoleTimeout

BOOT_LOG = (
    "ets Jun  8 2016 00:22:57\r\n\r\nrst:0x1 (POWERON_RESET),boot:0x13 (SPI_FAST_FLASH_BOOT)\r\n"
    "I (29) boot: ESP-IDF v5.3.1 2nd stage bootloader\r\n"
    "I (56) boot: Partition Table:\r\n"
    "I (59) boot: ## Label            Usage          Type ST Offset   Length\r\n"
    "I (66) boot:  0 nvs              WiFi data        01 02 00009000 00004000\r\n"
    "I (74) boot:  1 otadata          OTA data         01 00 0000d000 00002000\r\n"
    "I (81) boot:  2 ota_0            OTA app          00 10 00010000 00100000\r\n"
    "I (89) boot:  3 ota_1            OTA app          00 11 00110000 00100000\r\n"
    "I (96) boot: End of partition table\r\n"
    "I (101) boot: Loaded app from partition at offset {offset}\r\n"
    "I (120) app_init: Application information:\r\n"
    "I (125) app_init: Project name:     {project}\r\n"
    "I (130) app_init: App version:      {version}\r\n"
    "I (135) app_init: ESP-IDF:          v5.3.1\r\n"
    "I (140) main_task: Calling app_main()\r\n"
    "app ready\r\n"
)


def boot_log(offset: str = "0x10000", project: str = "demo", version: str = "1.0.0") -> str:
    return BOOT_LOG.format(offset=offset, project=project, version=version)


def test_parse_boot_info_last_boot_wins() -> None:
    text = boot_log() + boot_log("0x110000", "demo", "1.1.0")
    info = parse_boot_info(text)
    assert info.partition_label == "ota_1" and info.partition_offset == 0x110000
    assert (info.project, info.app_version, info.idf_version) == ("demo", "1.1.0", "v5.3.1")


def test_parse_boot_info_without_table() -> None:
    info = parse_boot_info("I (1) boot: Loaded app from partition at offset 0x10000\n")
    assert info.partition_offset == 0x10000 and info.partition_label is None
    assert info.project is None


class Board:
    """A TCP 'serial port' plus hooks the fake drivers call, standing in for a board."""

    def __init__(self) -> None:
        self.client: socket.socket | None = None
        self.connections = 0
        self.ready = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.url = f"socket://127.0.0.1:{self.sock.getsockname()[1]}"
        self.on_boot = boot_log()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.client = client
            self.connections += 1
            self.ready.set()

    def send(self, text: str) -> None:
        deadline = time.monotonic() + 2
        while self.client is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.client is not None
        self.client.sendall(text.encode())

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class FakeReset:
    esptool_before = "no-reset"

    def __init__(self, board: Board, console_ref: list[Console]) -> None:
        self.board = board
        self.calls: list[str] = []
        self.console_ref = console_ref
        self.connections_at_download: int | None = None

    def reset_to_app(self) -> None:
        self.calls.append("app")
        assert self.console_ref[0].connected, "reset must happen while the console listens"
        if self.connections_at_download is not None:
            # The console reconnected after flashing; talk to the new connection.
            deadline = time.monotonic() + 2
            while self.board.connections <= self.connections_at_download:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            self.connections_at_download = None
        self.board.send(self.board.on_boot)

    def reset_to_download(self) -> None:
        self.calls.append("download")
        self.connections_at_download = self.board.connections


class FakePower:
    def __init__(self, board: Board) -> None:
        self.board = board
        self.cycles = 0

    def on(self) -> None:
        pass

    def off(self) -> None:
        pass

    def cycle(self, off_seconds: float = 1.0) -> None:
        self.cycles += 1
        self.board.send(self.board.on_boot)


@pytest.fixture
def rig(tmp_path: Path):
    board = Board()
    console = Console(lambda: open_port(board.url), tmp_path / "esp32-1.log", name="esp32-1")
    ref = [console]
    flashes: list[dict[str, Any]] = []

    def flasher(port: str, chip: str, plan: FlashPlan, **kw: Any) -> FlashReport:
        assert not console.connected, "the console must release the port while flashing"
        flashes.append({"port": port, "chip": chip, "plan": plan, **kw})
        if kw.get("enter_download") is not None:
            kw["enter_download"]()
        r = plan.regions[0]
        return FlashReport(port, chip, (RegionResult(r.offset, r.size, r.sha256, r.name, True,
                                                     0.0),), 0.0, 921600)

    reset = FakeReset(board, ref)
    power = FakePower(board)
    device = Device(id="esp32-1", chip="esp32", port=board.url, console=console, reset=reset,
                    power=power, mac="24:0a:c4:00:00:01", flasher=flasher, boot_timeout=2.0)
    yield device, board, reset, power, flashes
    console.close()
    board.close()


def test_reset_waits_for_boot_and_boot_info(rig) -> None:
    device, board, reset, _, _ = rig
    info = device.reset()
    assert reset.calls == ["app"]
    assert info is not None and info.project == "demo" and info.partition_label == "ota_0"
    assert device.boot_info() == info
    # Output after the banner is still there for the test.
    device.expect_exact("app ready", 1)


def test_flash_pauses_console_resets_to_download_and_boots(rig, tmp_path: Path) -> None:
    device, board, reset, _, flashes = rig
    image = tmp_path / "app.bin"
    image.write_bytes(b"\xe9" + bytes(40))
    board.on_boot = boot_log(version="2.0.0")
    report = device.flash(image)
    assert report.regions[0].written
    assert reset.calls == ["download", "app"]
    call = flashes[0]
    assert call["before"] == "no-reset" and call["after"] == "no-reset"
    assert call["chip"] == "esp32" and call["board"] == "esp32-1"
    assert device.boot_info().app_version == "2.0.0"
    assert device.console.connected


def test_power_cycle_boots(rig) -> None:
    device, _, _, power, _ = rig
    info = device.power_cycle(off_seconds=0)
    assert power.cycles == 1 and info is not None and info.app_version == "1.0.0"


def test_no_banner_is_boot_error_with_tail(rig) -> None:
    device, board, _, _, _ = rig
    board.on_boot = "rst:0x10 (RTCWDT_RTC_RESET)\r\nwaiting for download\r\n"
    with pytest.raises(BootError) as info:
        device.reset(timeout=0.3)
    text = str(info.value)
    assert "no app start banner within 0.3 s" in text and "waiting for download" in text
    assert str(device.log_path) in text and "esp32-1" in text


def test_crash_at_boot_fails_fast(rig) -> None:
    device, board, _, _, _ = rig
    board.on_boot = (
        "I (101) boot: Loaded app from partition at offset 0x10000\r\n"
        "Guru Meditation Error: Core  0 panic'ed (LoadProhibited). Exception was unhandled.\r\n"
    )
    started = time.monotonic()
    with pytest.raises(BootError, match="Guru Meditation"):
        device.reset(timeout=5)
    assert time.monotonic() - started < 2


def test_command_and_expect_pass_through(rig) -> None:
    device, board, _, _, _ = rig
    board.send("hello\r\n")
    assert device.expect(r"hel+o", 1).group(0) == "hello"
    assert device.port == board.url and "esp32-1" in repr(device)


def test_command_waits_for_first_prompt_after_boot(rig) -> None:
    device, board, _, _, _ = rig
    device.reset()
    with pytest.raises(ConsoleTimeout, match="prompt .* did not appear within 0.2 s"):
        device.command("version", timeout=0.2)

    def answer() -> None:
        time.sleep(0.1)
        board.send("> ")
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            time.sleep(0.01)
            if device.console.text_since(0).count("> ") >= 1 and board.client is not None:
                break
        time.sleep(0.2)
        board.send("version\r\nversion: 1.0.0\r\n> ")

    threading.Thread(target=answer, daemon=True).start()
    assert device.command("version", timeout=3) == "version: 1.0.0"


# -- end to end: the real virtual rack daemon, reached only through URLs and the control endpoint --


@pytest.fixture(scope="module")
def rack(private_rack_daemon):
    """A private virtual rack daemon (its own state dir): (its info, its state directory)."""
    return private_rack_daemon


def test_virtual_board_end_to_end(rack, tmp_path: Path) -> None:
    appbuild = pytest.importorskip("pytest_hilfarm.sim.appbuild")
    info, _ = rack
    control = ControlClient(info["control"])
    board = info["boards"][0]
    build = appbuild.write_build_dir(tmp_path / "build", board["chip"], "demo", "1.0.0")
    console = Console(lambda: open_port(board["port"]), tmp_path / "dut.log", name=board["id"])
    device = Device(id=board["id"], chip=board["chip"], port=board["port"], mac=board["mac"],
                    console=console, reset=VirtualReset(control, board["id"]),
                    power=VirtualPower(control, board["id"]), boot_timeout=10)
    try:
        first = device.flash(build.path)
        assert [r.offset for r in first.regions] == [0x1000, 0x8000, 0x10000]
        boot = device.boot_info()
        assert (boot.project, boot.app_version, boot.partition_label) == ("demo", "1.0.0",
                                                                          "factory")
        reply = device.command("version")
        assert "project: demo" in reply and "partition: factory" in reply
        with pytest.raises(CommandError, match="unknown command"):
            device.command("nosuch")
        assert device.command("nosuch", check=False).startswith("error: unknown command")
        again = device.flash(build.path)  # unchanged firmware: nothing is written
        assert again.written == ()
        assert device.power_cycle(off_seconds=0.05).project == "demo"  # type: ignore[union-attr]
        assert control.board(board["id"])["mode"] == "app"
    finally:
        console.close()
    log = (tmp_path / "dut.log").read_text()
    assert "Project name:" in log and "--- console paused (port released) ---" in log


# -- command() failures and wait_for() ------------------------------------------------------------


def serve_commands(board: Board, reply: Any) -> list[str]:
    """Answer every line the console sends as an ESP-IDF console does: echo, reply, prompt."""
    seen: list[str] = []

    def loop() -> None:
        buf = b""
        while True:
            try:
                assert board.client is not None
                data = board.client.recv(256)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                cmd = line.decode().strip()
                seen.append(cmd)
                board.send(f"{cmd}\r\n{reply(cmd, len(seen))}\r\n> ")

    board.send("> ")
    threading.Thread(target=loop, daemon=True).start()
    return seen


@pytest.fixture
def talking(rig):
    device, board, _, _, _ = rig
    device.reset()
    return device, board


@pytest.mark.parametrize("reply", [
    "error: mesh not joined",  # the demo app's (sim/app.py) convention
    "Unrecognized command",  # ESP-IDF console REPL, unknown command
    "sent: 3 bytes\r\nCommand returned non-zero error code: 0x1 (ERROR)",  # REPL, command failed
])
def test_command_raises_on_an_error_reply(talking, reply: str) -> None:
    device, board = talking
    serve_commands(board, lambda cmd, n: reply)
    with pytest.raises(CommandError) as info:
        device.command("mesh send esp32-3 hi")
    err = info.value
    assert err.command == "mesh send esp32-3 hi" and err.board == "esp32-1"
    assert err.reply == reply.replace("\r\n", "\n")
    assert reply.split("\r\n")[-1] in str(err) and str(device.log_path) in str(err)
    assert "check=False" in str(err)
    # The opt-out returns the reply as text.
    assert device.command("mesh send esp32-3 hi", check=False) == reply.replace("\r\n", "\n")


def test_command_does_not_mistake_data_for_an_error(talking) -> None:
    device, board = talking
    serve_commands(board, lambda cmd, n: "msg: id=1 src=esp32-1 text=error: none\r\nlast_error: 0")
    assert device.command("mesh inbox").startswith("msg: id=1")


def test_wait_for_polls_until_the_reply_matches(talking) -> None:
    device, board = talking
    seen = serve_commands(board, lambda cmd, n: "error: mesh not joined" if n < 3
                          else f"nodes: {min(n, 5)}")
    match = device.wait_for("mesh nodes", r"nodes: (5)", timeout=10, interval=0.01)
    assert match.group(1) == "5"
    assert seen == ["mesh nodes"] * 5


def test_wait_for_times_out_with_the_last_reply_pattern_and_log(talking) -> None:
    device, board = talking
    seen = serve_commands(board, lambda cmd, n: f"nodes: 2\r\nids: a b {n}")
    started = time.monotonic()
    with pytest.raises(ConsoleTimeout) as info:
        device.wait_for("mesh nodes", r"nodes: 3", timeout=0.5, interval=0.1)
    assert 0.5 <= time.monotonic() - started < 3
    text = str(info.value)
    assert "'nodes: 3'" in text and "within 0.5 s" in text
    assert f"| ids: a b {len(seen)}" in text  # the last reply, not the first
    assert str(device.log_path) in text and "board esp32-1" in text
