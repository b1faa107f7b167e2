"""Opening ports by path or URL, waiting for ports to return, resolving USB serial ports."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pytest_hilfarm.drivers.transports import find_usb, open_port, probe, resolve_usb, wait_for_port
from pytest_hilfarm.errors import PortError, UsageError


def free_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"socket://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    return url


@pytest.fixture
def listener():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(sock.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"socket://127.0.0.1:{sock.getsockname()[1]}"
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def test_missing_device_path(tmp_path: Path) -> None:
    path = str(tmp_path / "ttyUSB9")
    with pytest.raises(PortError) as info:
        open_port(path)
    text = str(info.value)
    assert path in text and "does not exist" in text and "/dev/serial/by-id" in text


def test_socket_refused_names_url_and_hint() -> None:
    url = free_url()
    with pytest.raises(PortError) as info:
        open_port(url)
    assert url in str(info.value) and "hilfarm sim up" in str(info.value)


def test_bad_url_and_empty_name() -> None:
    with pytest.raises(PortError, match="URL scheme"):
        open_port("nosuchscheme://x")
    with pytest.raises(UsageError, match="empty port name"):
        open_port("")


def test_socket_port_opens_and_closes_without_pyserial_sleep(listener: str) -> None:
    port = open_port(listener, timeout=0.05)
    assert port.is_open and port.name == listener
    started = time.monotonic()
    port.close()
    assert time.monotonic() - started < 0.1  # pyserial's own socket close sleeps 0.3 s
    assert not port.is_open


def test_busy_port_is_reported(tmp_path: Path) -> None:
    master, slave = os.openpty()
    try:
        path = os.ttyname(slave)
        first = open_port(path)
        try:
            with pytest.raises(PortError) as info:
                open_port(path)
            assert "busy" in str(info.value) and f"fuser -v {path}" in str(info.value)
        finally:
            first.close()
        open_port(path).close()  # free again once the holder closed it
    finally:
        os.close(master)
        os.close(slave)


def test_probe(listener: str, tmp_path: Path) -> None:
    assert probe(listener)
    assert not probe(free_url())
    assert not probe(str(tmp_path / "nope"))
    assert probe("loop://")


def test_wait_for_port_sees_new_name(tmp_path: Path) -> None:
    calls = {"n": 0}
    new = tmp_path / "ttyUSB1"

    def resolve() -> str | None:
        calls["n"] += 1
        if calls["n"] == 3:
            new.touch()  # the board re-enumerated under another name
        return str(new) if calls["n"] >= 2 else None

    assert wait_for_port(resolve, timeout=2, poll=0.01) == str(new)
    assert calls["n"] == 3


def test_wait_for_port_timeout(tmp_path: Path) -> None:
    def resolve() -> str | None:
        raise PortError("no serial port matches usb_serial='X'")

    with pytest.raises(PortError) as info:
        wait_for_port(resolve, timeout=0.1, poll=0.02, what="port of esp32-1")
    text = str(info.value)
    assert "did not come back within 0.1 s" in text and "usb_serial='X'" in text
    assert "port of esp32-1" in text


class FakeUsbParent:
    def __init__(self, sys_name: str) -> None:
        self.sys_name = sys_name


class FakeDevice:
    def __init__(self, node: str, props: dict[str, str], usb: str | None) -> None:
        self.device_node = node
        self.properties = props
        self._usb = usb

    def find_parent(self, subsystem: str, device_type: str | None = None) -> Any:
        assert (subsystem, device_type) == ("usb", "usb_device")
        return FakeUsbParent(self._usb) if self._usb else None


class FakeContext:
    def __init__(self, devices: list[FakeDevice]) -> None:
        self.devices = devices

    def list_devices(self, **filters: str) -> list[FakeDevice]:
        assert filters == {"subsystem": "tty"}
        return self.devices


RIG = FakeContext([
    FakeDevice("/dev/ttyS0", {}, None),
    FakeDevice("/dev/ttyUSB0", {"ID_BUS": "usb", "ID_SERIAL_SHORT": "A1B2C3",
                                "ID_PATH": "pci-0000:00:14.0-usb-0:1.2:1.0"}, "1-1.2"),
    FakeDevice("/dev/ttyUSB1", {"ID_BUS": "usb", "ID_SERIAL_SHORT": "0001",
                                "ID_PATH": "pci-0000:00:14.0-usb-0:1.3:1.0"}, "1-1.3"),
    FakeDevice("/dev/ttyACM0", {"ID_BUS": "usb", "ID_SERIAL_SHORT": "0001",
                                "ID_PATH": "pci-0000:00:14.0-usb-0:1.4:1.0"}, "1-1.4"),
])


def test_resolve_by_serial_and_path() -> None:
    assert resolve_usb(serial="A1B2C3", context=RIG) == "/dev/ttyUSB0"
    assert resolve_usb(path="1-1.3", context=RIG) == "/dev/ttyUSB1"
    assert resolve_usb(path="pci-0000:00:14.0-usb-0:1.4:1.0", context=RIG) == "/dev/ttyACM0"
    assert resolve_usb(path="usb-0:1.2", context=RIG) == "/dev/ttyUSB0"
    assert resolve_usb(serial="0001", path="1-1.4", context=RIG) == "/dev/ttyACM0"


def test_resolve_lists_candidates_when_nothing_matches() -> None:
    with pytest.raises(PortError) as info:
        resolve_usb(serial="ZZZ", context=RIG)
    text = str(info.value)
    assert "usb_serial='ZZZ'" in text
    assert "/dev/ttyUSB0  ID_SERIAL_SHORT=A1B2C3" in text and "usb=1-1.2" in text
    assert "/dev/ttyACM0" in text and "/dev/ttyS0" not in text


def test_shared_serial_is_ambiguous() -> None:
    with pytest.raises(PortError, match=r"(?s)2 serial ports match.*add usb_path"):
        resolve_usb(serial="0001", context=RIG)


def test_find_usb_returns_none_and_needs_criteria() -> None:
    assert find_usb(serial="gone", context=RIG) is None
    with pytest.raises(UsageError):
        resolve_usb(context=RIG)


def test_resolve_with_real_pyudev_context() -> None:
    pyudev = pytest.importorskip("pyudev")
    try:
        context = pyudev.Context()
        list(context.list_devices(subsystem="tty"))
    except Exception as exc:  # no udev database in this container
        pytest.skip(f"udev not usable here: {exc}")
    with pytest.raises(PortError, match="no serial port matches"):
        resolve_usb(serial="no-such-serial-hilfarm", context=context)


UMOCKDEV_RIG = """\
P: /devices/pci0000:00/0000:00:14.0/usb1/1-1/1-1.2
N: bus/usb/001/005
E: SUBSYSTEM=usb
E: DEVTYPE=usb_device
A: serial=A1B2C3

P: /devices/pci0000:00/0000:00:14.0/usb1/1-1/1-1.2/1-1.2:1.0
E: SUBSYSTEM=usb
E: DEVTYPE=usb_interface

P: /devices/pci0000:00/0000:00:14.0/usb1/1-1/1-1.2/1-1.2:1.0/ttyUSB0/tty/ttyUSB0
N: ttyUSB0
E: SUBSYSTEM=tty
E: DEVNAME=/dev/ttyUSB0
E: ID_BUS=usb
E: ID_SERIAL_SHORT=A1B2C3
E: ID_PATH=pci-0000:00:14.0-usb-0:1.2:1.0

P: /devices/pci0000:00/0000:00:14.0/usb1/1-1/1-1.3/1-1.3:1.0/ttyACM0/tty/ttyACM0
N: ttyACM0
E: SUBSYSTEM=tty
E: DEVNAME=/dev/ttyACM0
E: ID_BUS=usb
E: ID_SERIAL_SHORT=58:CF:79:00:00:01
E: ID_PATH=pci-0000:00:14.0-usb-0:1.3:1.0
"""

UMOCKDEV_SCRIPT = """
from pytest_hilfarm.errors import PortError
from pytest_hilfarm.drivers.transports import resolve_usb
print(resolve_usb(serial="A1B2C3"))
print(resolve_usb(path="pci-0000:00:14.0-usb-0:1.3:1.0"))
print(resolve_usb(path="1-1.2"))
try:
    resolve_usb(serial="gone")
except PortError as exc:
    print(str(exc).replace("\\n", " | "))
"""


@pytest.mark.skipif(shutil.which("umockdev-run") is None, reason="umockdev is not installed")
def test_resolve_usb_with_pyudev_under_umockdev(tmp_path: Path) -> None:
    rig = tmp_path / "rig.umockdev"
    rig.write_text(UMOCKDEV_RIG)
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        ["umockdev-run", "-d", str(rig), "--", sys.executable, "-c", UMOCKDEV_SCRIPT],
        capture_output=True, text=True, timeout=60, cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == ["/dev/ttyUSB0", "/dev/ttyACM0", "/dev/ttyUSB0"]
    assert "no serial port matches usb_serial='gone'" in lines[3]
    assert "/dev/ttyACM0  ID_SERIAL_SHORT=58:CF:79:00:00:01" in result.stdout
