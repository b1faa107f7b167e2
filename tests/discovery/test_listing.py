"""Listing adapters through pyudev and matching them to rack boards, on umockdev's mock devices."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_hilfarm.description.rack import load_rack, parse_rack
from pytest_hilfarm.drivers.discovery.udev import list_adapters, match_rack

pytestmark = pytest.mark.umockdev

EXAMPLE_RACK = Path(__file__).resolve().parents[2] / "rack-configs" / "esp32-mesh-rig.example.yaml"

# node: (kind, vid:pid, usb path, interface, hub, hub port, serial, vendor, product, driver,
#        by-id link, by-path link)
EXPECTED = {
    "/dev/ttyUSB0": ("cp210x", "10c4:ea60", "1-1.1", "1.0", "1-1", 1,
                     "3c0e5a1f6b2aec11b2f0a1b2c3d4e5f6", "Silicon Labs",
                     "CP2102N USB to UART Bridge Controller", "cp210x",
                     "/dev/serial/by-id/usb-Silicon_Labs_CP2102N_USB_to_UART_Bridge_Controller_"
                     "3c0e5a1f6b2aec11b2f0a1b2c3d4e5f6-if00-port0",
                     "/dev/serial/by-path/pci-0000:00:14.0-usb-0:1.1:1.0-port0"),
    "/dev/ttyUSB2": ("ch340", "1a86:7523", "1-1.2", "1.0", "1-1", 2, None,
                     "QinHeng Electronics", "USB Serial", "ch341",
                     "/dev/serial/by-id/usb-1a86_USB_Serial-if00-port0",
                     "/dev/serial/by-path/pci-0000:00:14.0-usb-0:1.2:1.0-port0"),
    "/dev/ttyACM0": ("ch9102", "1a86:55d4", "1-1.3", "1.0", "1-1", 3, "5470011234",
                     "QinHeng Electronics", "USB Single Serial", "cdc_acm",
                     "/dev/serial/by-id/usb-1a86_USB_Single_Serial_5470011234-if00",
                     "/dev/serial/by-path/pci-0000:00:14.0-usb-0:1.3:1.0"),
    "/dev/ttyUSB3": ("ftdi", "0403:6001", "1-1.4", "1.0", "1-1", 4, "A50285BI", "FTDI",
                     "FT232R USB UART", "ftdi_sio",
                     "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0",
                     "/dev/serial/by-path/pci-0000:00:14.0-usb-0:1.4:1.0-port0"),
    "/dev/ttyACM1": ("usb-serial-jtag", "303a:1001", "1-1.5", "1.0", "1-1", 5,
                     "84:F7:03:A1:B2:C3", "Espressif", "USB JTAG/serial debug unit", "cdc_acm",
                     "/dev/serial/by-id/usb-Espressif_USB_JTAG_serial_debug_unit_"
                     "84:F7:03:A1:B2:C3-if00",
                     "/dev/serial/by-path/pci-0000:00:14.0-usb-0:1.5:1.0"),
    "/dev/ttyUSB6": ("other", "12d1:1001", "1-1.6", "1.0", "1-1", 6, None, "HUAWEI", "E169",
                     "option", "/dev/serial/by-id/usb-HUAWEI_E169-if00-port0",
                     "/dev/serial/by-path/pci-0000:00:14.0-usb-0:1.6:1.0-port0"),
    # The FT2232H sits on root hub 1 (uhubctl location "1"), port 2: kernel name 1-2.
    "/dev/ttyUSB4": ("ftdi", "0403:6010", "1-2", "1.0", "1", 2, "FT2232H01", "FTDI",
                     "Dual RS232-HS", "ftdi_sio",
                     "/dev/serial/by-id/usb-FTDI_Dual_RS232-HS_FT2232H01-if00-port0",
                     "/dev/serial/by-path/pci-0000:00:14.0-usb-0:2:1.0-port0"),
    "/dev/ttyUSB5": ("ftdi", "0403:6010", "1-2", "1.1", "1", 2, "FT2232H01", "FTDI",
                     "Dual RS232-HS", "ftdi_sio",
                     "/dev/serial/by-id/usb-FTDI_Dual_RS232-HS_FT2232H01-if01-port0",
                     "/dev/serial/by-path/pci-0000:00:14.0-usb-0:2:1.1-port0"),
}


def test_lists_every_usb_serial_adapter_in_physical_order() -> None:
    nodes = [a.device_node for a in list_adapters()]
    assert nodes == ["/dev/ttyUSB0", "/dev/ttyUSB2", "/dev/ttyACM0", "/dev/ttyUSB3",
                     "/dev/ttyACM1", "/dev/ttyUSB6", "/dev/ttyUSB4", "/dev/ttyUSB5"]


@pytest.mark.parametrize("node", sorted(EXPECTED))
def test_adapter_fields(node: str) -> None:
    adapter = next(a for a in list_adapters() if a.device_node == node)
    (kind, vid_pid, usb_path, interface, hub, hub_port, serial, vendor, product, driver,
     by_id, by_path) = EXPECTED[node]
    assert adapter.kind == kind
    assert adapter.vid_pid == vid_pid
    assert adapter.usb_path == usb_path
    assert adapter.interface == interface
    assert adapter.port_path == f"{usb_path}:{interface}"
    assert (adapter.hub, adapter.hub_port) == (hub, hub_port)
    assert adapter.usb_serial == serial
    assert (adapter.vendor, adapter.product, adapter.driver) == (vendor, product, driver)
    assert adapter.by_id == (by_id,)
    assert adapter.by_path == (by_path,)
    assert adapter.sys_path.startswith("/sys/devices/pci0000:00/0000:00:14.0/usb1/")
    assert adapter.sys_path.endswith("/" + node.rsplit("/", 1)[1])


def test_identity_keys_tell_apart_the_two_ports_of_one_ft2232h() -> None:
    keys = {a.device_node: a.key for a in list_adapters()}
    assert keys["/dev/ttyUSB4"] == "serial:FT2232H01:1.0"
    assert keys["/dev/ttyUSB5"] == "serial:FT2232H01:1.1"
    assert keys["/dev/ttyUSB2"] == "path:1-1.2:1.0"  # the CH340 has no serial number
    assert len(set(keys.values())) == len(keys)


def test_match_rack_by_by_id_link_serial_and_path() -> None:
    rack = parse_rack("""
version: 1
name: matching
boards:
  - id: by-link
    chip: esp32
    port: /dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0
  - id: by-serial
    chip: esp32c3
    usb_serial: "84:F7:03:A1:B2:C3"
    reset: usb-jtag
  - id: by-path
    chip: esp32
    usb_path: 1-1.2
  - id: by-interface
    chip: esp32
    usb_path: "1-2:1.1"
  - id: by-node
    chip: esp32
    port: /dev/ttyACM0
  - id: elsewhere
    chip: esp32
    usb_serial: "not-plugged-in"
""")
    found = {a.device_node: [(m.board_id, m.by) for m in ms]
             for a, ms in match_rack(list_adapters(), rack).items()}
    assert found == {
        "/dev/ttyUSB0": [],
        "/dev/ttyUSB2": [("by-path", "usb_path")],
        "/dev/ttyACM0": [("by-node", "port")],
        "/dev/ttyUSB3": [("by-link", "port")],
        "/dev/ttyACM1": [("by-serial", "usb_serial")],
        "/dev/ttyUSB6": [],
        "/dev/ttyUSB4": [],
        "/dev/ttyUSB5": [("by-interface", "usb_path")],
    }


def test_match_the_example_rack() -> None:
    rack = load_rack(EXAMPLE_RACK)
    matched = {a.device_node: [m.board_id for m in ms]
               for a, ms in match_rack(list_adapters(), rack).items() if ms}
    # devkitc-1 by its by-id path, saola-s2 by its USB path (whatever is on hub 1-1 port 4),
    # c3-usbjtag by its serial number (its MAC).
    assert matched == {"/dev/ttyUSB0": ["devkitc-1"], "/dev/ttyUSB3": ["saola-s2"],
                       "/dev/ttyACM1": ["c3-usbjtag"]}


def test_resolve_usb_from_transports_agrees() -> None:
    from pytest_hilfarm.drivers.transports import resolve_usb

    assert resolve_usb(serial="A50285BI") == "/dev/ttyUSB3"
    assert resolve_usb(path="1-1.3") == "/dev/ttyACM0"
