"""uhubctl parsing and the power-mapping loop with fakes: restore on errors, skip reserved."""

from __future__ import annotations

from typing import Any

import pytest

from pytest_hilfarm.drivers.discovery.powermap import Hub, HubPort, map_power, parse_uhubctl
from pytest_hilfarm.drivers.discovery.udev import Adapter
from pytest_hilfarm.errors import InfrastructureError

LISTING = """\
Current status for hub 2 [1d6b:0003 Linux Foundation 3.0 root hub, USB 3.00, 4 ports, ppps]
  Port 1: 02a0 power 5gbps Rx.Detect
  Port 2: 02a0 power 5gbps Rx.Detect
Current status for hub 1-1 [2109:2817 VIA Labs, Inc. USB2.0 Hub, USB 2.10, 4 ports, ppps]
  Port 1: 0503 power highspeed enable connect [10c4:ea60 Silicon Labs CP2102N USB to UART 3c0e5a1f]
  Port 2: 0100 power
  Port 3: 0000 off
  Port 4: 0103 power enable connect [1a86:7523 USB Serial]
Current status for hub 1 [1d6b:0002 Linux Foundation 2.0 root hub, USB 2.00, 12 ports, ganged]
  Port 1: 0507 power highspeed suspend enable connect [2109:2817 VIA Labs, Inc. USB2.0 Hub]
"""

SWITCH_OUTPUT = """\
Current status for hub 1-1 [2109:2817 VIA Labs, Inc. USB2.0 Hub, USB 2.10, 4 ports, ppps]
  Port 2: 0100 power
Sent power off request
New status for hub 1-1 [2109:2817 VIA Labs, Inc. USB2.0 Hub, USB 2.10, 4 ports, ppps]
  Port 2: 0000 off
"""


def test_parse_uhubctl_listing() -> None:
    hubs = parse_uhubctl(LISTING)
    assert [(h.location, h.switching, len(h.ports)) for h in hubs] == [
        ("2", "ppps", 2), ("1-1", "ppps", 4), ("1", "ganged", 1)]
    hub = hubs[1]
    first = hub.ports[0]
    assert (first.number, first.status, first.powered, first.connected) == (1, "0503", True, True)
    assert first.device == "10c4:ea60 Silicon Labs CP2102N USB to UART 3c0e5a1f"
    assert hub.ports[2].flags == ("off",) and not hub.ports[2].powered
    assert hubs[0].ports[0].flags == ("power", "5gbps", "Rx.Detect")
    assert hub.port_path(3) == "1-1.3"
    assert hubs[2].port_path(1) == "1-1"  # a root hub: bus 1, port 1


def test_parse_keeps_the_state_before_a_switch() -> None:
    hubs = parse_uhubctl(SWITCH_OUTPUT)
    assert [(h.location, [p.flags for p in h.ports]) for h in hubs] == [("1-1", [("power",)])]


class FakeRig:
    """Adapters on hub ports; switching a port off hides its adapters (optionally renamed)."""

    def __init__(self, adapters: list[Adapter], pretend: tuple[int, ...] = ()) -> None:
        self.adapters = adapters
        self.off: set[int] = set()
        self.pretend = pretend
        self.calls: list[tuple[str, int, bool]] = []
        self.fail_on: tuple[int, bool] | None = None
        self.interrupt_on: tuple[int, bool] | None = None

    def switch(self, hub: str, port: int, on: bool) -> None:
        self.calls.append((hub, port, on))
        if (port, on) == self.interrupt_on:
            raise KeyboardInterrupt
        if (port, on) == self.fail_on:
            raise InfrastructureError("uhubctl exited with 1", where="uhubctl")
        if port in self.pretend:
            return
        (self.off.discard if on else self.off.add)(port)

    def listing(self) -> list[Adapter]:
        return [a for a in self.adapters if a.hub_port not in self.off]


def make(node: str, port: int, serial: str | None = None, vid: str = "10c4",
         pid: str = "ea60") -> Adapter:
    return Adapter(device_node=node, sys_path=f"/sys/x/{node}", usb_path=f"1-1.{port}",
                   interface="1.0", vendor_id=vid, product_id=pid, usb_serial=serial)


HUB = Hub("1-1", "VIA hub", "ppps", tuple(
    HubPort(n, "0103", ("power", "enable", "connect")) for n in range(1, 5)))
FAST: dict[str, Any] = {"off_timeout": 0.05, "on_timeout": 0.2, "settle": 0.0, "poll": 0.005}


def rig() -> FakeRig:
    return FakeRig([make("/dev/ttyUSB0", 1, "A"), make("/dev/ttyUSB1", 2, "B"),
                    make("/dev/ttyUSB2", 3, "C"),
                    make("/dev/ttyUSB3", 4, vid="12d1", pid="1001")])  # a modem: not ours


def test_maps_ports_and_leaves_them_on() -> None:
    fake = rig()
    result = map_power([HUB], lambda b: False, adapters=fake.listing, switch=fake.switch, **FAST)
    assert [(r.port, r.outcome) for r in result.results] == [
        (1, "mapped"), (2, "mapped"), (3, "mapped")]
    assert fake.calls == [("1-1", 1, False), ("1-1", 1, True), ("1-1", 2, False),
                          ("1-1", 2, True), ("1-1", 3, False), ("1-1", 3, True)]
    assert fake.off == set()
    assert result.power_of(fake.adapters[1]) == ("1-1", 2)


def test_a_hub_that_only_pretends_is_reported() -> None:
    fake = FakeRig([make("/dev/ttyUSB0", 1, "A")], pretend=(1,))
    result = map_power([HUB], lambda b: False, adapters=fake.listing, switch=fake.switch, **FAST)
    assert [(r.port, r.outcome) for r in result.results] == [(1, "no-switching")]
    assert result.power_of(fake.adapters[0]) is None


@pytest.mark.parametrize("trouble", ["interrupt", "error"])
def test_every_port_is_switched_on_again_after_ctrl_c_or_an_error(trouble: str) -> None:
    fake = rig()
    # Port 2 goes off, then the next step (waiting, or switching port 2 on) is interrupted.
    if trouble == "interrupt":
        fake.interrupt_on = (2, True)
        expected: type[BaseException] = KeyboardInterrupt
    else:
        fake.fail_on = (2, True)
        expected = InfrastructureError
    fake_switch = fake.switch
    first = {"done": False}

    def switch(hub: str, port: int, on: bool) -> None:
        # The restore must get through: only the first "on" for port 2 fails.
        if (port, on) == (2, True) and first["done"]:
            fake.interrupt_on = fake.fail_on = None
        if (port, on) == (2, True):
            first["done"] = True
        fake_switch(hub, port, on)

    with pytest.raises(expected):
        map_power([HUB], lambda b: False, adapters=fake.listing, switch=switch, **FAST)
    assert fake.off == set()
    assert fake.calls[-1] == ("1-1", 2, True)
    assert ("1-1", 3, False) not in fake.calls  # it stopped there


def test_a_port_that_cannot_be_restored_is_named_with_the_command_to_fix_it() -> None:
    fake = rig()
    fake.fail_on = (1, True)
    with pytest.raises(InfrastructureError) as info:
        map_power([HUB], lambda b: False, adapters=fake.listing, switch=fake.switch, **FAST)
    assert "uhubctl -l 1-1 -p 1 -a on" in str(info.value)
    assert fake.calls.count(("1-1", 1, True)) == 2  # tried, and tried again on the way out


def test_reserved_boards_ports_are_never_switched() -> None:
    class Port:
        def __init__(self, kind: str, value: str) -> None:
            self.kind, self.value = kind, value

    class Board:
        def __init__(self, board_id: str, kind: str, value: str) -> None:
            self.id, self.port = board_id, Port(kind, value)

    class Rack:
        boards = [Board("b-held", "usb_serial", "B"), Board("c-free", "usb_path", "1-1.3")]

    fake = rig()
    result = map_power([HUB], lambda b: b == "b-held", rack=Rack(), adapters=fake.listing,
                       switch=fake.switch, **FAST)
    assert [(r.port, r.outcome) for r in result.results] == [
        (1, "mapped"), (2, "reserved"), (3, "mapped")]
    assert all(port != 2 for _hub, port, _on in fake.calls)


def test_ganged_hubs_are_skipped() -> None:
    fake = rig()
    ganged = Hub("1-1", "hub", "ganged", HUB.ports)
    result = map_power([ganged], lambda b: False, adapters=fake.listing, switch=fake.switch,
                       **FAST)
    assert result.results == () and fake.calls == []
