"""Console against a local TCP server reached through a socket:// URL."""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

import pytest

from pytest_hilfarm.board.console import Console
from pytest_hilfarm.drivers.transports import open_port
from pytest_hilfarm.errors import ConsoleTimeout, PortError


class FakeBoardServer:
    """A TCP server standing in for a board's serial port; one client at a time."""

    def __init__(self) -> None:
        self.port = 0
        self.received = bytearray()
        self.client: socket.socket | None = None
        self.connected = threading.Event()
        self.connections = 0
        self.echo_commands: dict[str, str] = {}
        self._listener: socket.socket | None = None
        self._stop = False
        self.start()

    @property
    def url(self) -> str:
        return f"socket://127.0.0.1:{self.port}"

    def start(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(4)
        self.port = sock.getsockname()[1]
        self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self.client = client
            self.connections += 1
            self.connected.set()
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        pending = b""
        while True:
            try:
                data = client.recv(4096)
            except OSError:
                return
            if not data:
                return
            self.received += data
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                cmd = line.decode().strip()
                if cmd in self.echo_commands:
                    reply = f"{cmd}\r\n{self.echo_commands[cmd]}\r\nesp32> "
                    client.sendall(reply.encode())

    def send(self, data: bytes | str) -> None:
        assert self.connected.wait(5)
        assert self.client is not None
        self.client.sendall(data.encode() if isinstance(data, str) else data)

    def unplug(self) -> None:
        """Drop the client and refuse new connections."""
        if self._listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone leaves it listening.
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        self.connected.clear()
        if self.client is not None:
            self.client.shutdown(socket.SHUT_RDWR)
            self.client.close()
            self.client = None

    def plug(self) -> None:
        self.start()

    def close(self) -> None:
        self.unplug()


@pytest.fixture
def server():
    srv = FakeBoardServer()
    yield srv
    srv.close()


@pytest.fixture
def console(server: FakeBoardServer, tmp_path: Path):
    con = Console(lambda: open_port(server.url), tmp_path / "dut-1.log", name="esp32-1",
                  backoff=(0.02, 0.1))
    assert server.connected.wait(5)
    yield con
    con.close()


def test_expect_and_timestamped_log(server: FakeBoardServer, console: Console) -> None:
    server.send("rst:0x1 (POWERON_RESET)\r\nI (31) boot: ESP-IDF v5.3.1\r\nhello wor")
    match = console.expect(r"boot: ESP-IDF (v[\d.]+)", timeout=2)
    assert match.group(1) == "v5.3.1"
    server.send("ld\r\n")
    console.expect_exact("hello world", timeout=2)
    time.sleep(0.05)
    log = console.log_path.read_text()
    lines = log.splitlines()
    stamp = re.compile(r"^\[\d\d:\d\d:\d\d\.\d{3}\] ")
    assert all(stamp.match(line) for line in lines), log
    # The log holds the same text as the buffer, once the stamps are removed.
    assert "".join(stamp.sub("", line) + "\n" for line in lines).replace("\r", "") == (
        console.text_since(0).replace("\r", "")
    )
    # A line split across two reads gets one stamp.
    assert sum("hello wor" in line for line in lines) == 1


def test_expect_consumes(server: FakeBoardServer, console: Console) -> None:
    server.send("tick 1\r\ntick 2\r\n")
    assert console.expect(r"tick (\d)", 2).group(1) == "1"
    assert console.expect(r"tick (\d)", 2).group(1) == "2"
    with pytest.raises(ConsoleTimeout):
        console.expect(r"tick (\d)", 0.2)


def test_timeout_shows_tail_and_log_path(server: FakeBoardServer, console: Console) -> None:
    server.send("".join(f"line {i}\r\n" for i in range(40)))
    console.expect_exact("line 39", 2)
    with pytest.raises(ConsoleTimeout) as info:
        console.expect("never", timeout=0.2)
    text = str(info.value)
    assert "'never'" in text and "0.2 s" in text
    assert "line 39" in text and "line 20" in text and "line 19\n" not in text
    assert str(console.log_path) in text
    assert "esp32-1" in text


def test_write_and_command(server: FakeBoardServer, console: Console) -> None:
    server.echo_commands["version"] = "v1.2.3\r\nbuilt today"
    reply = console.command("version", timeout=2)
    assert reply == "v1.2.3\nbuilt today"
    console.write("raw")
    deadline = time.monotonic() + 2
    while b"raw" not in server.received and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.received.endswith(b"version\nraw")


def test_command_timeout_names_prompt(server: FakeBoardServer, console: Console) -> None:
    with pytest.raises(ConsoleTimeout, match="after command 'nothing'"):
        console.command("nothing", timeout=0.2)


def test_clear(server: FakeBoardServer, console: Console) -> None:
    server.send("old banner\r\n")
    console.expect_exact("old banner", 2)
    server.send("old banner again\r\n")
    time.sleep(0.1)
    console.clear()
    with pytest.raises(ConsoleTimeout):
        console.expect_exact("old banner", 0.1)


def test_port_lost_and_back(server: FakeBoardServer, console: Console) -> None:
    server.send("before\r\n")
    console.expect_exact("before", 2)
    server.unplug()
    deadline = time.monotonic() + 2
    while console.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not console.connected
    time.sleep(0.2)  # a few refused reconnects
    server.plug()
    console.wait_connected(timeout=3)
    assert server.connected.wait(3)
    server.send("after\r\n")
    console.expect_exact("after", 2)
    log = console.log_path.read_text()
    assert log.index("--- port lost ---") < log.index("--- port back ---") < log.index("after")
    assert "port lost" not in console.text_since(0)
    assert console.lost_count == 1


def test_pause_releases_port_and_resume_reopens(server: FakeBoardServer, console: Console) -> None:
    first = server.connections
    console.pause()
    assert not console.connected
    with pytest.raises(PortError, match="paused"):
        console.write("x", wait_port=0.1)
    with pytest.raises(PortError):
        console.port  # noqa: B018
    console.resume()
    assert console.connected
    deadline = time.monotonic() + 2
    while server.connections < first + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.connections == first + 1
    server.send("resumed ok\r\n")
    console.expect_exact("resumed ok", 2)
    log = console.log_path.read_text()
    assert "--- console paused (port released) ---" in log and "--- console resumed ---" in log


def test_missing_port_fails_fast(tmp_path: Path) -> None:
    srv = FakeBoardServer()
    url = srv.url
    srv.close()
    with pytest.raises(PortError) as info:
        Console(lambda: open_port(url), tmp_path / "x.log")
    assert url in str(info.value) and "hilfarm sim up" in str(info.value)


def test_close_is_idempotent(server: FakeBoardServer, tmp_path: Path) -> None:
    con = Console(lambda: open_port(server.url), tmp_path / "y.log")
    con.close()
    con.close()
