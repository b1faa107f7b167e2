"""One board entry of a rack file: its records (port, power, reset, flash, NVS, sim) and checks.

The rack loader (:mod:`pytest_hilfarm.description.rack`) reads the top level and the list of
boards and hands each entry to :func:`parse_board`. Like the loader, this module only describes:
it never opens a port, resolves a USB serial number or checks that an image exists.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal
from urllib.parse import urlsplit

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from pytest_hilfarm.description.simsection import SIM_KEY, SimSpec, parse_sim
from pytest_hilfarm.description.yamlnodes import (
    Ctx,
    Location,
    boolean,
    check_keys,
    choice,
    closest,
    describe,
    fields,
    integer,
    path_value,
    require,
    scalar,
    string,
)
from pytest_hilfarm.esp.chips import CHIPS as CHIP_TABLE
from pytest_hilfarm.esp.chips import FARM_CHIPS

RESETS = ("classic", "usb-jtag", "virtual", "none")
POWER_DRIVERS = ("uhubctl", "gpio", "http", "virtual", "none")
FLASH_MODES = ("qio", "qout", "dio", "dout", "keep")
FLASH_SIZES = ("2MB", "4MB", "8MB", "16MB", "detect", "keep")
# The SPI flash clocks that ESP32, ESP32-S2 and ESP32-C3 all accept (esptool --flash_freq).
FLASH_FREQS = ("80m", "40m", "26m", "20m", "keep")
DEFAULT_BAUD = 921600
PortKind = Literal["path", "url", "usb_serial", "usb_path", "virtual"]

_ID_RE = re.compile(r"[A-Za-z0-9._-]+")
# A board id names its lock, its state and a virtual board's flash file: a plain file name.
_BOARD_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# A USB physical path as the kernel names it: bus-port[.port...], e.g. 1-1.2 (optionally with
# the :config.interface suffix, e.g. 1-1.2:1.0).
_USB_PATH_RE = re.compile(r"\d+-\d+(\.\d+)*(:\d+\.\d+)?")
# Linux limits interface names to 15 bytes (IFNAMSIZ - 1) without '/' or whitespace.
# uhubctl hub locations: a root hub is its bus number ("2"), other hubs a bus-port path.
_HUB_RE = re.compile(r"\d+(-\d+(\.\d+)*)?")
_IFACE_RE = re.compile(r"[A-Za-z0-9._:@-]{1,15}")
_COM_RE = re.compile(r"COM\d+", re.IGNORECASE)
_URL_SCHEMES = ("rfc2217", "socket")
# sim: a virtual board's eFuse / secure boot settings and its chip revision, MAC and flash size
# (description.simsection, docs/virtual-rack.md).
_BOARD_KEYS = ("id", "chip", "port", "usb_serial", "usb_path", "reset", "power", "flash",
               "features", "baseline", "interface", SIM_KEY, "nvs")
_PORT_KEYS = ("port", "usb_serial", "usb_path")
_FLASH_KEYS = ("baud", "mode", "size", "freq")
_POWER_KEYS = {
    "uhubctl": (("hub", "port"), ()),
    "gpio": (("chip", "line"), ("active_low",)),
    "http": (("on", "off"), ("status",)),
}



@dataclass(frozen=True)
class PortSpec:
    """Where a board's serial port is; resolving it to a device is the drivers' job.

    ``kind`` is ``path`` (/dev/serial/by-id/...), ``url`` (``rfc2217://host:port`` or
    ``socket://host:port``), ``usb_serial`` / ``usb_path`` (looked up through pyudev) or
    ``virtual`` (the virtual rack board of the same id; its URL comes from the daemon).
    """

    kind: PortKind
    value: str


@dataclass(frozen=True)
class PowerSpec:
    """How a board's power is switched: a driver name and its checked parameters.

    ``params`` is read-only. It is left out of the hash (a mapping proxy cannot be hashed);
    equality still compares it.
    """

    driver: str
    params: Mapping[str, object] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )


@dataclass(frozen=True)
class FlashSpec:
    """How esptool talks to a board's flash (``keep`` leaves the image header as built)."""

    baud: int = DEFAULT_BAUD
    mode: str = "keep"
    size: str = "keep"
    freq: str = "keep"


@dataclass(frozen=True)
class BaselineSpec:
    """A known-good image (file, ESP-IDF build dir or flasher_args.json) for health checks."""

    path: Path
    where: Location


@dataclass(frozen=True)
class NvsSpec:
    """Per-board NVS data: a CSV template for Espressif's NVS partition generator, the
    partition it fills, and values for its placeholders ({board_id}, {mac}, {chip}, ...).
    """

    csv: Path | None
    partition: str | None
    values: Mapping[str, str] = field(hash=False)
    where: Location

    def over(self, base: NvsSpec | None) -> NvsSpec:
        """A board's spec (this one) on top of the rack-wide ``base``."""
        if base is None:
            return self
        return NvsSpec(self.csv or base.csv, self.partition or base.partition,
                       MappingProxyType({**base.values, **self.values}), self.where)


@dataclass(frozen=True)
class BoardSpec:
    """One board of a rack, as the rack file describes it."""

    id: str
    chip: str
    port: PortSpec
    reset: str
    power: PowerSpec
    flash: FlashSpec
    features: frozenset[str]
    baseline: BaselineSpec | None
    where: Location
    # Kept for the later network-conditions feature; nothing uses it yet.
    interface: str | None = None
    nvs: NvsSpec | None = None  # this board's own NVS data (over the rack-wide one)
    # reset: custom: esptool-syntax DTR/RTS sequences (download, app; app None = hard reset)
    reset_sequences: tuple[str, str | None] | None = None
    sim: SimSpec | None = None  # a virtual board's sim: section (None: not given)

    @property
    def is_virtual(self) -> bool:
        return self.port.kind == "virtual"



_NVS_KEYS = ("csv", "partition", "values")


def parse_nvs(ctx: Ctx, node: Node, path: str) -> NvsSpec:
    entries = fields(ctx, node, path, _NVS_KEYS,
                      "a mapping with csv, partition and values, e.g. {csv: nvs/board.csv}")
    check_keys(ctx, entries, path, _NVS_KEYS)
    csv = (path_value(ctx, entries["csv"][1], f"{path}.csv", "a CSV file path")
           if "csv" in entries else None)
    partition = (string(ctx, entries["partition"][1], f"{path}.partition",
                         "a partition label, e.g. nvs") if "partition" in entries else None)
    values: dict[str, str] = {}
    if "values" in entries:
        value_entries = fields(ctx, entries["values"][1], f"{path}.values", (),
                                "a mapping of placeholder names to values")
        for key, (_k, value_node) in value_entries.items():
            value = scalar(ctx, value_node, f"{path}.values.{key}", "a single value")
            values[key] = str(value)
    return NvsSpec(csv, partition, MappingProxyType(values), ctx.loc(node))



def port_key(port: PortSpec) -> str:
    return port.kind if port.kind in ("usb_serial", "usb_path") else "port"


def port_identity(port: PortSpec) -> tuple[str, str] | None:
    """What makes two ports the same port (virtual boards are told apart by their id)."""
    if port.kind == "virtual":
        return None
    if port.kind == "path":
        return ("path", os.path.normpath(port.value))
    if port.kind == "url":
        parts = urlsplit(port.value)
        return ("url", f"{parts.scheme}://{(parts.hostname or '').lower()}:{parts.port}")
    return (port.kind, port.value)


def parse_board(ctx: Ctx, node: Node, path: str, *, virtual_by_default: bool = False
                ) -> BoardSpec:
    """Check one entry of ``boards:``. A board without a port is refused, or, in the short form
    the virtual rack accepts (``virtual_by_default``), a virtual board.
    """
    entries = fields(ctx, node, path, _BOARD_KEYS, "a board mapping with id, chip and port")
    check_keys(ctx, entries, path, _BOARD_KEYS)
    require(ctx, node, entries, path, ["id", "chip"])
    board_id = string(ctx, entries["id"][1], f"{path}.id",
                      "a board id: a plain name of letters, digits, '.', '_', '-' that starts "
                      "with a letter or digit", _BOARD_ID_RE,
                      hint="e.g. id: esp32-1 (it names the board's lock, state and flash files)")
    chip = _chip(ctx, entries["chip"][1], f"{path}.chip")

    given = [key for key in _PORT_KEYS if key in entries]
    if not given and virtual_by_default:
        port = PortSpec("virtual", "virtual")
    elif not given:
        raise ctx.error(node, path, f"board {board_id!r} has no port",
                        hint="give exactly one of port, usb_serial, usb_path")
    elif len(given) > 1:
        raise ctx.error(entries[given[1]][0], f"{path}.{given[1]}",
                        f"board {board_id!r} gives both {given[0]} and {given[1]}",
                        hint="give exactly one of port, usb_serial, usb_path")
    else:
        port = _parse_port(ctx, given[0], entries[given[0]][1], f"{path}.{given[0]}")

    sequences: tuple[str, str | None] | None = None
    if "reset" in entries:
        reset_node = entries["reset"][1]
        if isinstance(reset_node, MappingNode):
            reset, sequences = "custom", _parse_reset_sequences(ctx, reset_node, f"{path}.reset")
        else:
            reset = choice(ctx, reset_node, f"{path}.reset", RESETS)
        _check_reset(ctx, reset_node, f"{path}.reset", reset, port, chip)
    else:
        reset = _default_reset(port)

    if "power" in entries:
        power = _parse_power(ctx, entries["power"][1], f"{path}.power", port)
    else:
        power = PowerSpec("virtual" if port.kind == "virtual" else "none")

    flash = FlashSpec()
    if "flash" in entries:
        flash = _parse_flash(ctx, entries["flash"][1], f"{path}.flash")

    features: frozenset[str] = frozenset()
    if "features" in entries:
        features = _parse_features(ctx, entries["features"][1], f"{path}.features")

    baseline = None
    if "baseline" in entries:
        value_node = entries["baseline"][1]
        baseline = BaselineSpec(path_value(ctx, value_node, f"{path}.baseline",
                                      "an image path or build directory"), ctx.loc(value_node))

    interface = None
    if "interface" in entries:
        interface = string(ctx, entries["interface"][1], f"{path}.interface",
                            "a network interface name (up to 15 characters)", _IFACE_RE,
                            hint="e.g. interface: enx00e04c680001")

    sim = None
    if SIM_KEY in entries:
        sim_node = entries[SIM_KEY][1]
        if not isinstance(sim_node, MappingNode):
            raise ctx.error(sim_node, f"{path}.{SIM_KEY}",
                            f"expected a mapping, got {describe(ctx, sim_node)}",
                            hint='e.g. sim: {revision: "v0.4", secure_boot: true, '
                                 'key_digests: [...]}')
        if port.kind != "virtual":
            raise ctx.error(sim_node, f"{path}.{SIM_KEY}", "sim: applies to virtual boards only",
                            hint="remove it, or use port: virtual")
        sim = parse_sim(ctx, sim_node, f"{path}.{SIM_KEY}")

    nvs = parse_nvs(ctx, entries["nvs"][1], f"{path}.nvs") if "nvs" in entries else None
    return BoardSpec(id=board_id, chip=chip, port=port, reset=reset, power=power, flash=flash,
                     features=features, baseline=baseline, where=ctx.loc(node),
                     interface=interface, nvs=nvs, reset_sequences=sequences, sim=sim)


def _chip(ctx: Ctx, node: Node, path: str) -> str:
    """A chip the farm flashes and the virtual rack simulates; ``ESP32-C3`` reads as esp32c3."""
    expected = "one of " + ", ".join(FARM_CHIPS)
    value = scalar(ctx, node, path, expected)
    chip = value.lower().replace("-", "") if isinstance(value, str) else None
    if chip in FARM_CHIPS:
        return chip
    guess = closest(str(value), FARM_CHIPS) if value is not None else None
    says = f"did you mean {guess!r}? " if guess else f"use {expected}. "
    raise ctx.error(node, path, f"expected {expected}, got {describe(ctx, node)}",
                    hint=f"{says}Another chip cannot be flashed by the farm, and it cannot be "
                         "simulated by the virtual rack")


def _parse_port(ctx: Ctx, key: str, node: Node, path: str) -> PortSpec:
    if key == "usb_serial":
        value = string(ctx, node, path, "a USB serial number", hint='e.g. usb_serial: "0001"')
        return PortSpec("usb_serial", value)
    if key == "usb_path":
        value = string(ctx, node, path, "a USB physical path like 1-1.2", _USB_PATH_RE,
                        hint="find it with 'udevadm info /dev/ttyUSB0 | grep DEVPATH' "
                             "(the bus-port part, e.g. 1-1.2)")
        return PortSpec("usb_path", value)
    port_hint = ("use a device path (/dev/serial/by-id/...), rfc2217://HOST:PORT, "
                 "socket://HOST:PORT or the word virtual")
    value = string(ctx, node, path, "a port", hint=port_hint)
    if value == "virtual":
        return PortSpec("virtual", value)
    if "://" in value:
        parts = urlsplit(value)
        if parts.scheme not in _URL_SCHEMES:
            guess = closest(parts.scheme, _URL_SCHEMES)
            hint = f"did you mean {guess}://?" if guess else port_hint
            raise ctx.error(node, path, f"unsupported port URL scheme {parts.scheme!r} in "
                            f"{value!r}", hint=hint)
        try:
            port_number = parts.port
        except ValueError:
            port_number = None
        if not parts.hostname or port_number is None or not 0 < port_number < 65536:
            raise ctx.error(node, path, f"expected {parts.scheme}://HOST:PORT, got {value!r}",
                            hint=f"e.g. {parts.scheme}://rig-host.local:4000")
        return PortSpec("url", value)
    if value.startswith("/") or _COM_RE.fullmatch(value):
        return PortSpec("path", value)
    raise ctx.error(node, path, f"expected a port, got {value!r}", hint=port_hint)


def _default_reset(port: PortSpec) -> str:
    if port.kind == "virtual":
        return "virtual"
    if port.kind == "url" and port.value.startswith("socket://"):
        # A raw TCP socket carries no modem lines, so DTR/RTS reset is impossible.
        return "none"
    return "classic"


_SEQUENCE_KEYS = ("download", "app")


def check_sequence(sequence: str) -> str | None:
    """Why ``sequence`` is not a valid reset sequence (esptool's syntax), or None."""
    from esp_pylib.serial_reset import parse_custom_reset_sequence

    try:
        steps = parse_custom_reset_sequence(sequence)
    except ValueError as exc:
        return str(exc)
    return None if steps else "the sequence is empty"


def _parse_reset_sequences(ctx: Ctx, node: Node, path: str) -> tuple[str, str | None]:
    """``reset: {download: SEQ, app: SEQ}`` in esptool's custom reset-sequence syntax."""
    entries = fields(ctx, node, path, _SEQUENCE_KEYS,
                      'a reset name, or DTR/RTS sequences {download: "D0|R1|W0.1|D1|R0|W0.05|D0"'
                      ', app: "..."}')
    check_keys(ctx, entries, path, _SEQUENCE_KEYS)
    require(ctx, node, entries, path, ["download"])
    sequences: dict[str, str] = {}
    for key, (_k, value_node) in entries.items():
        text = string(ctx, value_node, f"{path}.{key}", "a reset sequence",
                       hint='esptool\'s syntax: D<0|1>, R<0|1>, U<dtr>,<rts>, W<seconds>, joined '
                            'by |, e.g. "D0|R1|W0.1|D1|R0|W0.05|D0"')
        problem = check_sequence(text)
        if problem is not None:
            raise ctx.error(value_node, f"{path}.{key}", problem,
                            hint='esptool\'s syntax: D<0|1>, R<0|1>, U<dtr>,<rts>, W<seconds>, '
                                 'joined by |, e.g. "D0|R1|W0.1|D1|R0|W0.05|D0"')
        sequences[key] = text
    return sequences["download"], sequences.get("app")


def _check_reset(ctx: Ctx, node: Node, path: str, reset: str, port: PortSpec,
                 chip: str) -> None:
    if reset in ("classic", "usb-jtag", "custom") and port.kind == "url" \
            and port.value.startswith("socket://"):
        raise ctx.error(node, path, f"reset {reset!r} needs DTR/RTS, which a socket:// port "
                        "cannot carry", hint="use an rfc2217:// URL (it carries DTR/RTS) or "
                        "reset: none")
    if reset in ("classic", "usb-jtag", "custom") and port.kind == "virtual":
        raise ctx.error(node, path, f"reset {reset!r} does not apply to a virtual board",
                        hint="use reset: virtual (or leave reset out)")
    if reset == "virtual" and port.kind != "virtual":
        raise ctx.error(node, path, "reset 'virtual' only works for a board with port: virtual",
                        hint="use classic, usb-jtag or none for a physical board")
    if reset == "usb-jtag" and not CHIP_TABLE[chip].usb_serial_jtag:
        # ESP32/ESP32-S2 have no USB-Serial/JTAG peripheral (esptool's target classes say which
        # chips do): they need a USB-UART bridge.
        raise ctx.error(node, path, f"the {chip} has no USB-Serial/JTAG peripheral",
                        hint="use reset: classic (DTR/RTS through the USB-UART bridge)")


def _parse_power(ctx: Ctx, node: Node, path: str, port: PortSpec) -> PowerSpec:
    if isinstance(node, ScalarNode):
        simple = ("none", "virtual")
        driver = choice(ctx, node, path, simple)
        if driver == "virtual" and port.kind != "virtual":
            raise ctx.error(node, path, "power 'virtual' only works for a board with "
                            "port: virtual", hint="use none, or a uhubctl/gpio/http mapping")
        return PowerSpec(driver)
    entries = fields(ctx, node, path, ("driver",),
                      "none, virtual, or a mapping with driver: uhubctl|gpio|http")
    require(ctx, node, entries, path, ["driver"],
             hint="e.g. power: {driver: uhubctl, hub: 1-1, port: 2}")
    driver = choice(ctx, entries["driver"][1], f"{path}.driver", tuple(_POWER_KEYS))
    required, optional = _POWER_KEYS[driver]
    check_keys(ctx, entries, path, ("driver", *required, *optional))
    require(ctx, node, entries, path, required)
    if port.kind == "virtual":
        raise ctx.error(entries["driver"][1], f"{path}.driver",
                        f"power driver {driver!r} cannot switch a virtual board",
                        hint="use power: virtual (or leave power out)")
    params: dict[str, object] = {}
    if driver == "uhubctl":
        params["hub"] = string(ctx, entries["hub"][1], f"{path}.hub",
                                "a hub location like 1-1", _HUB_RE,
                                hint="run 'uhubctl' to list hubs and their locations")
        params["port"] = integer(ctx, entries["port"][1], f"{path}.port",
                                  "a hub port number >= 1", 1,
                                  hint="uhubctl numbers hub ports from 1")
    elif driver == "gpio":
        params["chip"] = string(ctx, entries["chip"][1], f"{path}.chip",
                                 "a GPIO chip like gpiochip0", hint="list them with 'gpiodetect'")
        line_node = entries["line"][1]
        line_value = scalar(ctx, line_node, f"{path}.line", "a line number or name")
        if isinstance(line_value, str) and line_value.strip():
            params["line"] = line_value
        else:
            params["line"] = integer(ctx, line_node, f"{path}.line",
                                      "a line number >= 0 or a line name", 0,
                                      hint="list lines with 'gpioinfo'")
        params["active_low"] = (boolean(ctx, entries["active_low"][1], f"{path}.active_low")
                                if "active_low" in entries else False)
    else:
        for key in ("on", "off", "status"):
            if key in entries:
                params[key] = _http_url(ctx, entries[key][1], f"{path}.{key}")
    return PowerSpec(driver, MappingProxyType(params))


def _http_url(ctx: Ctx, node: Node, path: str) -> str:
    example = "e.g. http://plug-3.local/cm?cmnd=Power%20On"
    value = string(ctx, node, path, "an http:// or https:// URL", hint=example)
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ctx.error(node, path, f"expected an http:// or https:// URL, got {value!r}",
                        hint=example)
    return value


def _parse_flash(ctx: Ctx, node: Node, path: str) -> FlashSpec:
    entries = fields(ctx, node, path, _FLASH_KEYS, "a mapping with baud, mode, size, freq")
    check_keys(ctx, entries, path, _FLASH_KEYS)
    baud = DEFAULT_BAUD
    if "baud" in entries:
        baud = integer(ctx, entries["baud"][1], f"{path}.baud",
                        "a baud rate from 9600 to 5000000", 9600, 5_000_000,
                        hint="typical: 115200, 460800, 921600")
    mode = choice(ctx, entries["mode"][1], f"{path}.mode", FLASH_MODES) \
        if "mode" in entries else "keep"
    size = choice(ctx, entries["size"][1], f"{path}.size", FLASH_SIZES,
                  hint="flash chips are not offered in other sizes") \
        if "size" in entries else "keep"
    freq = choice(ctx, entries["freq"][1], f"{path}.freq", FLASH_FREQS) \
        if "freq" in entries else "keep"
    return FlashSpec(baud=baud, mode=mode, size=size, freq=freq)


def _parse_features(ctx: Ctx, node: Node, path: str) -> frozenset[str]:
    if not isinstance(node, SequenceNode):
        raise ctx.error(node, path, f"expected a list of feature names, got "
                        f"{describe(ctx, node)}", hint="e.g. features: [mesh-radio, bme280]")
    return frozenset(
        string(ctx, item, f"{path}[{index}]",
                "a feature name of letters, digits, '.', '_', '-'", _ID_RE,
                hint="e.g. features: [mesh-radio, bme280]")
        for index, item in enumerate(node.value)
    )
