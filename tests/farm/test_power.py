"""Power drivers: exact argv for command-line backends, HTTP against a local server, registry."""

from __future__ import annotations

import http.server
import json
import os
import socket
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from pytest_hilfarm.drivers.power import (
    POWER_DRIVERS,
    GpioPower,
    HttpPower,
    NoPower,
    PowerDriver,
    UhubctlPower,
    VirtualPower,
    make_power,
)
from pytest_hilfarm.drivers.virtual import ControlClient, read_daemon_info, sim_dir
from pytest_hilfarm.errors import ConfigError, InfrastructureError, PortError, UsageError


class Recorder:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> None:
        self.calls.append(list(argv))


def test_uhubctl_exact_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("time.sleep", lambda s: None)
    rec = Recorder()
    power = UhubctlPower("1-1.4", 2, runner=rec)
    power.on()
    power.off()
    power.cycle(2.0)
    assert rec.calls == [
        ["uhubctl", "-l", "1-1.4", "-p", "2", "-a", "on"],
        ["uhubctl", "-l", "1-1.4", "-p", "2", "-a", "off"],
        ["uhubctl", "-l", "1-1.4", "-p", "2", "-a", "off"],
        ["uhubctl", "-l", "1-1.4", "-p", "2", "-a", "on"],
    ]


def test_gpio_exact_argv_and_active_low() -> None:
    rec = Recorder()
    GpioPower("gpiochip0", 17, runner=rec).on()
    GpioPower("gpiochip0", 17, active_low=True, runner=rec).on()
    GpioPower("gpiochip1", "RELAY3", active_low=True, runner=rec).off()
    assert rec.calls == [
        ["gpioset", "-c", "gpiochip0", "-t", "0", "17=1"],
        ["gpioset", "-c", "gpiochip0", "-t", "0", "17=0"],
        ["gpioset", "-c", "gpiochip1", "-t", "0", "RELAY3=1"],
    ]


def test_missing_tool_is_clear() -> None:
    power = UhubctlPower("1-1", 1, uhubctl="uhubctl-definitely-not-installed")
    with pytest.raises(InfrastructureError, match="not installed"):
        power.on()


def test_failing_tool_reports_output(tmp_path) -> None:
    tool = tmp_path / "fake-uhubctl"
    tool.write_text("#!/bin/sh\necho 'No compatible devices detected!' >&2\nexit 1\n")
    tool.chmod(0o755)
    with pytest.raises(InfrastructureError) as info:
        UhubctlPower("1-1", 1, uhubctl=str(tool)).on()
    assert "No compatible devices detected" in str(info.value) and "-a on" in str(info.value)


class PlugHandler(http.server.BaseHTTPRequestHandler):
    state = {"power": "OFF"}
    paths: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        PlugHandler.paths.append(self.path)
        if self.path == "/cm?cmnd=Power%20On":
            PlugHandler.state["power"] = "ON"
        elif self.path == "/cm?cmnd=Power%20Off":
            PlugHandler.state["power"] = "OFF"
        elif self.path != "/cm?cmnd=Power":
            self.send_error(404)
            return
        body = f'{{"POWER":"{PlugHandler.state["power"]}"}}'.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def plug():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PlugHandler)
    serve = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02})
    serve.daemon = True
    serve.start()
    PlugHandler.paths.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_power_against_local_server(plug: str) -> None:
    power = HttpPower(f"{plug}/cm?cmnd=Power%20On", f"{plug}/cm?cmnd=Power%20Off",
                      f"{plug}/cm?cmnd=Power")
    assert power.state() is False
    power.on()
    assert power.state() is True
    power.cycle(0)
    assert power.state() is True
    assert PlugHandler.paths == ["/cm?cmnd=Power", "/cm?cmnd=Power%20On", "/cm?cmnd=Power",
                                 "/cm?cmnd=Power%20Off", "/cm?cmnd=Power%20On", "/cm?cmnd=Power"]


def test_http_error_names_url(plug: str) -> None:
    power = HttpPower(f"{plug}/wrong", f"{plug}/wrong")
    with pytest.raises(InfrastructureError) as info:
        power.on()
    assert "HTTP 404" in str(info.value) and f"{plug}/wrong" in str(info.value)


def test_http_unreachable() -> None:
    power = HttpPower("http://127.0.0.1:9/on", "http://127.0.0.1:9/off", timeout=1)
    with pytest.raises(InfrastructureError, match="cannot reach the power switch"):
        power.on()
    assert HttpPower("http://x/on", "http://x/off").state() is None


def test_virtual_power_uses_control() -> None:
    calls: list[tuple[str, bool]] = []

    class Control:
        def power(self, board: str, on: bool) -> None:
            calls.append((board, on))

    power = VirtualPower(Control(), "esp32-2")
    power.cycle(0)
    assert calls == [("esp32-2", False), ("esp32-2", True)]


def test_no_power_refuses_cycle() -> None:
    power = NoPower("esp32-1")
    power.on()
    with pytest.raises(UsageError) as info:
        power.cycle()
    assert "esp32-1" in str(info.value) and "no power control" in str(info.value)


def test_registry_and_factory() -> None:
    assert set(POWER_DRIVERS) == {"uhubctl", "gpio", "http", "virtual", "none"}
    rec = Recorder()
    driver = make_power("uhubctl", {"hub": "2-1", "port": 3, "runner": rec})
    assert isinstance(driver, PowerDriver)
    driver.off()
    assert rec.calls == [["uhubctl", "-l", "2-1", "-p", "3", "-a", "off"]]
    assert isinstance(make_power("none"), NoPower)
    virtual = make_power("virtual", {"control": "127.0.0.1:40123", "board": "esp32-1"})
    assert isinstance(virtual, VirtualPower)


def test_factory_errors() -> None:
    with pytest.raises(ConfigError) as info:
        make_power("tasmota", {})
    assert "unknown power driver 'tasmota'" in str(info.value) and "uhubctl" in str(info.value)
    with pytest.raises(ConfigError, match="missing parameter.*port"):
        make_power("uhubctl", {"hub": "1-1", "board": "esp32-1"})
    with pytest.raises(ConfigError, match="unknown parameter.*pin"):
        make_power("gpio", {"chip": "gpiochip0", "line": 1, "pin": 2})
    with pytest.raises(ConfigError, match="bad parameter value"):
        make_power("uhubctl", {"hub": "1-1", "port": "two"})


# -- the virtual rack control client (drivers.virtual), which VirtualPower/VirtualReset speak
# through --


class FakeControl:
    """A JSON-lines control endpoint on 127.0.0.1 recording requests."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as stream:
                request = json.loads(stream.readline())
                self.requests.append(request)
                if request.get("board") == "nope":
                    reply = {"ok": False, "error": "unknown board 'nope'"}
                elif request["op"] == "status":
                    reply = {"ok": True, "boards": [{"id": "esp32-1", "chip": "esp32"}]}
                elif request["op"] == "mesh":
                    reply = {"ok": True, "loss": 0.1, "latency_ms": 0, "partitions": []}
                else:
                    reply = {"ok": True}
                stream.write(json.dumps(reply).encode() + b"\n")
                stream.flush()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@pytest.fixture
def control():
    server = FakeControl()
    yield server
    server.close()


def test_control_client_requests_match_contract(control: FakeControl) -> None:
    client = ControlClient(control.addr)
    power = make_power("virtual", {"control": control.addr, "board": "esp32-1"})
    power.cycle(0)
    client.reset("esp32-1", "download")
    client.lines("esp32-1", en=False)
    client.unplug("esp32-1")
    client.plug("esp32-1")
    assert client.mesh(loss=0.1) == {"loss": 0.1, "latency_ms": 0, "partitions": []}
    client.wire_time(True)
    assert client.status() == [{"id": "esp32-1", "chip": "esp32"}]
    assert control.requests[:8] == [
        {"op": "power", "board": "esp32-1", "on": False},
        {"op": "power", "board": "esp32-1", "on": True},
        {"op": "reset", "board": "esp32-1", "boot": "download"},
        {"op": "lines", "board": "esp32-1", "en": False},
        {"op": "unplug", "board": "esp32-1"},
        {"op": "plug", "board": "esp32-1"},
        {"op": "mesh", "loss": 0.1},
        {"op": "wire_time", "enabled": True},
    ]


def test_control_client_errors(control: FakeControl) -> None:
    client = ControlClient(control.addr)
    with pytest.raises(InfrastructureError) as info:
        client.power("nope", True)
    assert "unknown board 'nope'" in str(info.value) and "board nope" in str(info.value)
    with pytest.raises(UsageError, match="no board 'esp32-9'.*esp32-1"):
        client.board("esp32-9")
    with pytest.raises(UsageError, match="unknown boot mode"):
        client.reset("esp32-1", "uart")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="HOST:PORT"):
        ControlClient("localhost")


def test_control_client_no_daemon() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    addr = f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    with pytest.raises(PortError) as info:
        ControlClient(addr).status()
    assert addr in str(info.value) and "hilfarm sim up" in str(info.value)


def test_sim_dir_rule(tmp_path: Path) -> None:
    assert sim_dir({"HILFARM_SIM_DIR": str(tmp_path)}) == tmp_path
    assert sim_dir({"XDG_STATE_HOME": "/x", "HOME": "/h"}) == Path("/x/hilfarm/virtual-rack")
    assert sim_dir({"HOME": "/h"}) == Path("/h/.local/state/hilfarm/virtual-rack")
    assert sim_dir({"HILFARM_SIM_DIR": "", "XDG_STATE_HOME": "", "HOME": "/h"}) == Path(
        "/h/.local/state/hilfarm/virtual-rack"
    )


def test_read_daemon_info(tmp_path: Path) -> None:
    assert read_daemon_info(tmp_path) is None
    (tmp_path / "daemon.json").write_text(json.dumps({"pid": os.getpid(), "control": "1.2.3.4:5"}))
    assert read_daemon_info(tmp_path) == {"pid": os.getpid(), "control": "1.2.3.4:5"}
    assert ControlClient.from_sim_dir(tmp_path).addr == "1.2.3.4:5"
    (tmp_path / "daemon.json").write_text(json.dumps({"pid": 2**22 + 12345, "control": "x:1"}))
    assert read_daemon_info(tmp_path) is None  # stale: that process is gone
    with pytest.raises(PortError, match="hilfarm sim up"):
        ControlClient.from_sim_dir(tmp_path)
    (tmp_path / "daemon.json").write_text("{half")
    with pytest.raises(InfrastructureError, match="not valid JSON"):
        read_daemon_info(tmp_path)
