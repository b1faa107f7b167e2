"""PortWatcher on umockdev uevents: a board vanishes and comes back under another /dev node."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from pytest_hilfarm.drivers.discovery.udev import Adapter, AdapterEvent, PortWatcher, list_adapters
from pytest_hilfarm.drivers.transports import resolve_usb

pytestmark = pytest.mark.umockdev

CP2102N = "serial:3c0e5a1f6b2aec11b2f0a1b2c3d4e5f6:1.0"


def node(adapter: Adapter | None) -> str | None:
    return adapter.device_node if adapter is not None else None


class Recorder:
    def __init__(self) -> None:
        self.events: list[AdapterEvent] = []
        self.changed = threading.Condition()

    def __call__(self, event: AdapterEvent) -> None:
        with self.changed:
            self.events.append(event)
            self.changed.notify_all()

    def wait(self, count: int, timeout: float = 5.0) -> list[AdapterEvent]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.events) >= count, timeout), self.events
            return list(self.events)


def test_watcher_sees_unplug_and_replug_under_a_new_node(testbed) -> None:
    recorder = Recorder()
    with PortWatcher([recorder], poll_interval=0.05) as watcher:
        assert node(watcher.current(CP2102N)) == "/dev/ttyUSB0"

        testbed.unplug("cp210x")
        gone = recorder.wait(1)[0]
        assert gone.action == "gone"
        assert gone.adapter.device_node == "/dev/ttyUSB0"
        # Its identity survives although sysfs is already gone.
        assert gone.adapter.key == CP2102N
        assert gone.adapter.usb_path == "1-1.1"
        assert watcher.current(CP2102N) is None
        assert watcher.is_gone(CP2102N)

        testbed.plug("cp210x-reenumerated")
        back = recorder.wait(2)[1]
        assert back.action == "back"
        assert back.renamed
        assert back.previous is not None and back.previous.device_node == "/dev/ttyUSB0"
        assert back.adapter.device_node == "/dev/ttyUSB1"
        assert back.adapter.key == CP2102N
        assert node(watcher.current(CP2102N)) == "/dev/ttyUSB1"
        assert not watcher.is_gone(CP2102N)
        assert os.path.exists("/dev/ttyUSB1") and not os.path.exists("/dev/ttyUSB0")
        # A holder re-resolves the board by its rack identity and gets the new node.
        assert node(watcher.find("usb_serial", "3c0e5a1f6b2aec11b2f0a1b2c3d4e5f6")) \
            == "/dev/ttyUSB1"
        assert node(watcher.find("usb_path", "1-1.1")) == "/dev/ttyUSB1"
    assert resolve_usb(serial="3c0e5a1f6b2aec11b2f0a1b2c3d4e5f6") == "/dev/ttyUSB1"
    # Other adapters never moved.
    assert [e.adapter.key for e in recorder.events] == [CP2102N, CP2102N]


def test_watcher_reports_an_adapter_it_never_saw_as_new(testbed) -> None:
    testbed.unplug("ftdi-ft232r")
    recorder = Recorder()
    with PortWatcher([recorder], poll_interval=0.05) as watcher:
        assert "/dev/ttyUSB3" not in [a.device_node for a in watcher.adapters()]
        testbed.plug("ftdi-ft232r")
        event = recorder.wait(1)[0]
        assert (event.action, event.previous) == ("new", None)
        assert event.adapter.device_node == "/dev/ttyUSB3"
        assert watcher.wait_for(lambda present: len(present) == 8, timeout=1)


def test_a_failing_listener_does_not_stop_the_watcher(testbed) -> None:
    recorder = Recorder()

    def broken(event: AdapterEvent) -> None:
        raise RuntimeError("listener bug")

    with PortWatcher([broken, recorder], poll_interval=0.05):
        testbed.unplug("ch340")
        testbed.plug("ch340")
        actions = [e.action for e in recorder.wait(2)]
    assert actions == ["gone", "back"]


def test_unplugged_adapters_leave_the_listing(testbed) -> None:
    testbed.unplug("ftdi-ft2232h")
    nodes = [a.device_node for a in list_adapters()]
    assert "/dev/ttyUSB4" not in nodes and "/dev/ttyUSB5" not in nodes
    assert len(nodes) == 6


def test_a_replugged_node_is_a_char_device_again(testbed) -> None:
    testbed.unplug("cp210x")
    assert not os.path.exists("/dev/ttyUSB0")
    testbed.plug("cp210x")
    assert stat.S_ISCHR(os.stat("/dev/ttyUSB0").st_mode)
    assert [a.device_node for a in list_adapters()][0] == "/dev/ttyUSB0"


def test_farm_skips_an_unplugged_board_and_follows_it_to_its_new_node(testbed, tmp_path) -> None:
    from pytest_hilfarm.description.rack import parse_rack
    from pytest_hilfarm.farm import Farm

    rack = parse_rack(
        "version: 1\nname: udev\nboards:\n"
        "  - {id: cp, chip: esp32, usb_serial: '3c0e5a1f6b2aec11b2f0a1b2c3d4e5f6', power: none}\n"
        "  - {id: ft, chip: esp32, usb_path: '1-1.4', power: none}\n",
        "udev.yaml", environ={"HILFARM_STATE_DIR": str(tmp_path)},
    )
    with Farm(rack, log_root=tmp_path / "logs") as farm:
        cp = farm.board("cp")
        assert farm.present(cp) and farm.port_of(cp) == "/dev/ttyUSB0"
        assert farm.port_of(farm.board("ft")) == "/dev/ttyUSB3"

        testbed.unplug("cp210x")
        assert not farm.present(cp)
        with farm.reserve(1, timeout=2) as lease:
            assert lease.boards == ("ft",)  # the unplugged board is never offered

        testbed.plug("cp210x-reenumerated")
        assert farm.present(cp)
        assert farm.port_of(cp) == "/dev/ttyUSB1"  # re-resolved by its USB serial
        with farm.reserve(2, timeout=2) as lease:
            assert set(lease.boards) == {"cp", "ft"}


def test_usb_jtag_board_reenumerating_on_reset_is_followed(testbed, tmp_path) -> None:
    """An ESP32-C3's own USB-Serial/JTAG leaves the bus when the chip resets and may come back
    under another /dev node: the board's handle finds it again by its USB serial number."""
    from pytest_hilfarm.description.rack import parse_rack
    from pytest_hilfarm.farm import Farm

    rack = parse_rack(
        "version: 1\nname: jtag\nboards:\n"
        "  - {id: c3, chip: esp32c3, usb_serial: '84:F7:03:A1:B2:C3', reset: usb-jtag,"
        " power: none}\n",
        "jtag.yaml", environ={"HILFARM_STATE_DIR": str(tmp_path)},
    )

    class UsbSerialJtag:
        """The chip's USB-Serial/JTAG as DTR/RTS see it: EN low takes it off the bus."""

        dtr = False

        def setDTR(self, value: bool = True) -> None:  # noqa: N802 - pyserial's name
            self.dtr = value

        def setRTS(self, value: bool = True) -> None:  # noqa: N802
            if value:  # asserted: EN low, the chip (and its USB device) is in reset
                testbed.unplug("esp-usb-serial-jtag")
            elif not farm.present(board):
                testbed.plug("esp-usb-serial-jtag-reenumerated")

    with Farm(rack, log_root=tmp_path / "logs") as farm:
        board = farm.board("c3")
        wiring = farm.wiring(board)
        assert wiring.port() == "/dev/ttyACM1"
        resolve = wiring.resolver()
        assert resolve is not None
        wiring.reset(lambda: UsbSerialJtag()).reset_to_app()
        assert farm.present(board)
        assert resolve() == "/dev/ttyACM2"  # found again by its serial number
        with farm.reserve(1, timeout=2) as lease:
            assert lease.boards == ("c3",)
