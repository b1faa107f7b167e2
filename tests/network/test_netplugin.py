"""The hil_network fixture and marker: strict validation, schedules, virtual rack mesh + proxy."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_hilfarm.description.network import (
    BUILTIN_PROFILES,
    CLEAR,
    Conditions,
    NetworkProfile,
    Outage,
)
from pytest_hilfarm.errors import UsageError
from pytest_hilfarm.plugin.network import MARKER_SIGNATURE, make_network, resolve_request

pytest_plugins = ["pytester"]


class FakeBackend:
    """Records what the fixture asked of the network (timestamped)."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, Any]] = []
        self.lock = threading.Lock()
        self.closed = False

    def _add(self, what: str, arg: Any) -> None:
        with self.lock:
            self.events.append((time.monotonic(), what, arg))

    def set_conditions(self, conditions: Conditions) -> None:
        self._add("set", conditions)

    def begin_outage(self, address_change: bool) -> None:
        self._add("begin", address_change)

    def end_outage(self, address_change: bool) -> None:
        self._add("end", address_change)

    def close(self) -> None:
        self.closed = True

    def describe(self) -> dict[str, Any]:
        return {"backend": "fake"}

    def kinds(self) -> list[str]:
        return [e[1] for e in self.events]


def test_marker_arguments_resolve() -> None:
    profiles = BUILTIN_PROFILES
    p = resolve_request(("cellular",), {"loss": "5%"}, profiles, "t")
    assert p.conditions == Conditions(loss=0.05, delay_ms=300, jitter_ms=30, rate_kbit=1000)
    assert p.name == "cellular+overrides"
    p = resolve_request((), {"delay": "0.5s", "rate": "1mbit", "outage": 30}, profiles, "t")
    assert p.conditions == Conditions(delay_ms=500, rate_kbit=1000)
    assert p.outages == (Outage(5.0, 30.0),)
    assert resolve_request((), {}, profiles, "t").conditions == CLEAR


@pytest.mark.parametrize(("args", "kwargs", "match"), [
    ((), {"los": 0.1}, "unexpected keyword argument 'los'"),
    (("cellular", "wifi"), {}, "too many positional"),
    (("celular",), {}, "unknown network profile 'celular'"),
    ((), {"loss": 5}, "loss 5 is not a fraction"),
    ((), {"delay": "slow"}, "delay 'slow' is not understood"),
    ((), {"jitter": 5}, "jitter without delay"),
])
def test_bad_marker_arguments_quote_the_signature(args: tuple[object, ...],
                                                  kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(UsageError, match=match) as info:
        resolve_request(args, kwargs, BUILTIN_PROFILES, "test_x.py::test_y")
    text = str(info.value)
    assert "test_x.py::test_y" in text
    if "profile" not in match:
        assert MARKER_SIGNATURE in text


def test_profile_outage_schedule_runs_in_background() -> None:
    backend = FakeBackend()
    net = make_network(backend, {"blip": NetworkProfile("blip", Conditions(delay_ms=10),
                                                        outages=(Outage(0.1, 0.2),))})
    start = time.monotonic()
    net.apply("blip")
    assert net.conditions == Conditions(delay_ms=10) and not net.in_outage
    time.sleep(0.5)
    net.close()
    begin = next(t for t, k, _ in backend.events if k == "begin")
    end = next(t for t, k, _ in backend.events if k == "end")
    assert 0.08 <= begin - start <= 0.3 and 0.15 <= end - begin <= 0.4
    assert backend.closed


def test_outage_blocking_and_background() -> None:
    backend = FakeBackend()
    net = make_network(backend)
    start = time.monotonic()
    net.outage(0.2)
    assert 0.18 <= time.monotonic() - start < 1
    handle = net.outage(0.3, background=True, address_change=True)
    assert handle is not None
    time.sleep(0.05)
    assert net.in_outage
    assert handle.wait()
    assert not net.in_outage
    assert backend.kinds() == ["begin", "end", "begin", "end"]
    assert backend.events[-1][2] is True  # the carrier switch was passed on
    net.close()


def test_apply_accepts_a_mapping_and_clear_lifts_everything() -> None:
    backend = FakeBackend()
    net = make_network(backend)
    net.apply({"loss": 0.1, "delay": 50})
    assert net.conditions == Conditions(loss=0.1, delay_ms=50)
    net.clear()
    assert net.conditions == CLEAR and backend.events[-1][2] == CLEAR
    with pytest.raises(UsageError, match="outage of -1"):
        net.outage(-1)
    net.close()


def test_close_ends_a_long_background_outage_quickly() -> None:
    backend = FakeBackend()
    net = make_network(backend)
    net.outage(30, background=True)
    time.sleep(0.05)
    start = time.monotonic()
    net.close()
    assert time.monotonic() - start < 2 and backend.kinds()[-1] == "end"


# --- inside pytest ---------------------------------------------------------------------------


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("HILFARM_STATE_DIR", str(tmp_path / "farm"))
    monkeypatch.setenv("HILFARM_SIM_DIR", str(tmp_path / "sim"))
    monkeypatch.delenv("HILFARM_RACK", raising=False)
    return tmp_path


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p",
                                         "no:cacheprovider", "-p", "no:randomly", *args,
                                         timeout=120)


def test_marker_typo_is_a_usage_error(pytester: pytest.Pytester, isolated: Path) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.hil_network("cellular", lose=0.1)
        def test_one(hil_network):
            pass
    """)
    result = run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unexpected keyword argument 'lose'*",
                                 f"*the signature is {MARKER_SIGNATURE}*"])


def test_marker_is_registered(pytester: pytest.Pytester) -> None:
    result = run(pytester, "--markers")
    result.stdout.fnmatch_lines(["*@pytest.mark.hil_network(profile=None, *"])


def test_fixture_on_virtual_rack_impairs_a_proxied_server(pytester: pytest.Pytester,
                                                           isolated: Path) -> None:
    pytester.makepyfile("""
        import socket, threading, time
        import pytest
        from pytest_hilfarm.drivers.netem import Conditions

        @pytest.mark.hil_network("rtt-500ms")
        def test_proxy(hil_network):
            assert hil_network.conditions == Conditions(delay_ms=500)
            srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
            def serve():
                conn, _ = srv.accept()
                while data := conn.recv(100):
                    conn.sendall(data)
            threading.Thread(target=serve, daemon=True).start()
            proxy = hil_network.proxy(srv.getsockname())
            sock = socket.create_connection(proxy.address, timeout=5)
            start = time.monotonic(); sock.sendall(b"x"); assert sock.recv(10) == b"x"
            assert 0.4 < time.monotonic() - start < 0.7
            hil_network.apply(delay=0)
            start = time.monotonic(); sock.sendall(b"x"); assert sock.recv(10) == b"x"
            assert time.monotonic() - start < 0.1
            hil_network.outage(0.3, background=True)
            time.sleep(0.05)
            start = time.monotonic(); sock.sendall(b"x"); assert sock.recv(10) == b"x"
            assert time.monotonic() - start > 0.2
    """)
    result = run(pytester)
    assert result.ret == 0, result.stdout.str()


@pytest.fixture
def virtual_rack(isolated: Path) -> Iterator[Path]:
    """A running virtual rack daemon with its state in a tmp dir (skips if it will not start)."""
    env = dict(os.environ)
    up = subprocess.run([sys.executable, "-m", "pytest_hilfarm", "sim", "up"], env=env,
                        capture_output=True, text=True, timeout=60, check=False)
    if up.returncode != 0:
        pytest.skip(f"virtual rack daemon unavailable: {up.stderr.strip()[:200]}")
    try:
        yield isolated / "sim"
    finally:
        subprocess.run([sys.executable, "-m", "pytest_hilfarm", "sim", "down"], env=env,
                       capture_output=True, timeout=60, check=False)


def test_mesh_conditions_follow_the_marker(pytester: pytest.Pytester,
                                           virtual_rack: Path) -> None:
    from pytest_hilfarm.drivers.virtual import ControlClient

    control = ControlClient.from_sim_dir(virtual_rack)
    before = control.mesh()
    pytester.makepyfile("""
        import pytest
        from pytest_hilfarm.drivers.virtual import ControlClient

        @pytest.mark.hil_network(loss=0.1, delay=40)
        def test_mesh(hil_network):
            mesh = ControlClient.from_sim_dir().mesh()
            assert mesh["loss"] == pytest.approx(0.1)
            assert mesh["latency_ms"] == pytest.approx(20 + 40 / 2)
            hil_network.outage(0.2, background=True).wait(0.01)
            parts = ControlClient.from_sim_dir().mesh()["partitions"]
            assert sorted(len(p) for p in parts) == [1, 1, 1, 1, 1]
    """)
    result = run(pytester)
    assert result.ret == 0, result.stdout.str()
    assert control.mesh() == before  # restored after the test


# --- real-rig wiring (no hardware: the rack names interfaces, the controllers are checked) ----


class _Dev:
    def __init__(self, board_id: str) -> None:
        self.id = board_id


class _Request:
    def __init__(self, fixturenames: list[str], devices: list[_Dev]) -> None:
        self.fixturenames = fixturenames
        self._devices = devices
        self.node = type("Node", (), {"nodeid": "t.py::test_rig"})()

    def getfixturevalue(self, name: str) -> list[_Dev]:
        assert name == "hil_devices"
        return self._devices


class _Farm:
    def __init__(self, rack: Any) -> None:
        self.rack = rack


def _real_rack(tmp_path: Path, interface_line: str) -> Any:
    from pytest_hilfarm.description.rack import parse_rack

    return parse_rack(
        "version: 1\nname: rig\nstate_dir: state\nboards:\n"
        "  - id: b1\n    chip: esp32\n    port: /dev/ttyUSB0\n" + interface_line,
        "rig.yaml", base_dir=tmp_path)


def test_real_rig_uses_the_held_boards_interfaces(tmp_path: Path) -> None:
    from pytest_hilfarm.plugin.network import NetemBackend, _backend_for

    rack = _real_rack(tmp_path, "    interface: enx001\n")
    backend = _backend_for(_Request(["hil_devices"], [_Dev("b1")]), _Farm(rack))  # type: ignore[arg-type]
    try:
        assert isinstance(backend, NetemBackend)
        (ctl,) = backend.controllers
        assert ctl.interface == "enx001" and ctl.held
        assert ctl.state_dir == tmp_path / "state" / "netem"
    finally:
        backend.close()


def test_real_rig_needs_boards_and_interfaces(tmp_path: Path) -> None:
    from pytest_hilfarm.plugin.network import _backend_for

    with pytest.raises(UsageError, match="holds none"):
        _backend_for(_Request([], []), _Farm(_real_rack(tmp_path, "")))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="no device-facing network interface") as info:
        _backend_for(_Request(["hil_devices"], [_Dev("b1")]),  # type: ignore[arg-type]
                     _Farm(_real_rack(tmp_path, "")))
    assert "interface:" in str(info.value)
