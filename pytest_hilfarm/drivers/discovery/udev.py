"""Find the USB serial adapters of a rig through udev, probe their chips, and watch hot-plug.

``list_adapters`` lists every tty with a USB parent (CP210x, CH340, CH9102, FTDI, Espressif's
USB-Serial/JTAG and any other USB-UART) with the identity that survives re-enumeration: the USB
serial number and the physical path (``1-1.3``), never only ``/dev/ttyUSBn``. ``match_rack`` says
which boards of a rack each adapter already is; ``probe`` asks one free adapter for its chip and
MAC through esptool and hard-resets it back to normal boot; ``PortWatcher`` reports adapters that
disappear and come back (perhaps under another node) from a pyudev monitor thread.

Must not: import rack files or the farm (a rack is read through the small ``RackLike`` protocol),
open a port it was not asked to probe, or probe a port whose board is reserved. Listing and
watching never open a port: opening a USB-UART toggles DTR/RTS, which resets a DevKit.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pytest_hilfarm.errors import InfrastructureError, PortError, UsageError
from pytest_hilfarm.esp.chips import FARM_CHIPS, chip_for_esptool_name

logger = logging.getLogger(__name__)

AdapterKind = Literal["cp210x", "ch340", "ch9102", "ftdi", "usb-serial-jtag", "other"]

# VID:PID -> adapter kind, for the bridges ESP32 DevKits carry (vendor datasheets; the PIDs are
# the ones the Linux drivers cp210x, ch341 and ftdi_sio, and cdc_acm for 303a:1001, bind to).
ADAPTER_KINDS: Mapping[tuple[str, str], AdapterKind] = {
    ("10c4", "ea60"): "cp210x",  # Silicon Labs CP2102/CP2102N/CP2104
    ("1a86", "7523"): "ch340",  # WCH CH340
    ("1a86", "55d4"): "ch9102",  # WCH CH9102F (newer DevKitC V4 and many clones)
    ("0403", "6001"): "ftdi",  # FT232R
    ("0403", "6010"): "ftdi",  # FT2232H (two ports: one board per interface)
    ("0403", "6014"): "ftdi",  # FT232H
    ("0403", "6015"): "ftdi",  # FT231X
    ("303a", "1001"): "usb-serial-jtag",  # ESP32-C3/S3/C6 built-in USB-Serial/JTAG
}

# A USB device's kernel name: bus-port[.port...] (``1-1.3``); an interface adds ``:config.iface``.
_USB_DEVICE_RE = re.compile(r"\d+-\d+(?:\.\d+)*")
_USB_INTERFACE_RE = re.compile(r"(\d+-\d+(?:\.\d+)*):(\d+\.\d+)")


@dataclass(frozen=True)
class Adapter:
    """One USB serial port as udev describes it (read-only facts, no open port)."""

    device_node: str  # /dev/ttyUSB0: changes on re-enumeration, so never used as identity
    sys_path: str  # /sys/devices/.../tty/ttyUSB0
    usb_path: str  # the USB device's kernel name, e.g. 1-1.3 (hub 1-1, port 3)
    interface: str | None  # the tty's USB interface ("1.0"); tells FT2232 ports apart
    vendor_id: str  # 4 lowercase hex digits
    product_id: str
    usb_serial: str | None = None
    vendor: str | None = None
    product: str | None = None
    driver: str | None = None
    by_id: tuple[str, ...] = ()
    by_path: tuple[str, ...] = ()

    @property
    def kind(self) -> AdapterKind:
        return ADAPTER_KINDS.get((self.vendor_id, self.product_id), "other")

    @property
    def vid_pid(self) -> str:
        return f"{self.vendor_id}:{self.product_id}"

    @property
    def hub(self) -> str:
        """The uhubctl location of the hub the adapter is plugged into (``1-1``, or ``1``)."""
        head, _, tail = self.usb_path.rpartition(".")
        # A device on a root hub port is "bus-port" ("1-3"); uhubctl names that hub "1".
        return head if head else self.usb_path.split("-", 1)[0]

    @property
    def hub_port(self) -> int:
        """The hub port number the adapter is plugged into (uhubctl ``-p``)."""
        return int(self.usb_path.rsplit(".", 1)[-1].rsplit("-", 1)[-1])

    @property
    def port_path(self) -> str:
        """``usb_path`` with the interface (``1-1.3:1.0``); the rack's ``usb_path`` accepts both."""
        return f"{self.usb_path}:{self.interface}" if self.interface else self.usb_path

    @property
    def key(self) -> str:
        """A stable identity: the USB serial number when there is one, else the physical path.

        The interface is part of it, so both ports of one FT2232 (one serial) stay apart.
        """
        base = f"serial:{self.usb_serial}" if self.usb_serial else f"path:{self.usb_path}"
        return f"{base}:{self.interface}" if self.interface else base

    @property
    def links(self) -> tuple[str, ...]:
        return self.by_id + self.by_path

    def describe(self) -> str:
        name = self.product or self.kind
        serial = f" serial {self.usb_serial}" if self.usb_serial else " (no serial number)"
        return f"{self.device_node} [{self.vid_pid} {name}] at {self.port_path}{serial}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_node": self.device_node, "sys_path": self.sys_path,
            "usb_path": self.usb_path, "interface": self.interface,
            "hub": self.hub, "hub_port": self.hub_port, "kind": self.kind,
            "vendor_id": self.vendor_id, "product_id": self.product_id,
            "vendor": self.vendor, "product": self.product, "usb_serial": self.usb_serial,
            "driver": self.driver, "by_id": list(self.by_id), "by_path": list(self.by_path),
            "key": self.key,
        }


# -- listing ------------------------------------------------------------------------------------


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    text = str(value).strip()
    return text or None


def _attribute(device: Any, name: str) -> str | None:
    if device is None:
        return None
    try:
        return _text(device.attributes.get(name))
    except (KeyError, AttributeError, OSError):
        return None


def usb_location(devpath: str) -> tuple[str, str | None] | None:
    """The USB device name and interface in a sysfs path, e.g. ``("1-1.3", "1.0")``.

    Taken from the path text rather than from sysfs, because on a remove event sysfs is already
    gone and the path is all that is left.
    """
    device: str | None = None
    interface: str | None = None
    for part in devpath.split("/"):
        if _USB_DEVICE_RE.fullmatch(part):
            device, interface = part, None
        elif (found := _USB_INTERFACE_RE.fullmatch(part)) is not None:
            device, interface = found.group(1), found.group(2)
    return (device, interface) if device is not None else None


def _props(device: Any) -> dict[str, str]:
    props = getattr(device, "properties", {})
    try:
        return {str(k): str(props[k]) for k in props}
    except (TypeError, KeyError):
        return {}


def _from_parts(sys_path: str, props: Mapping[str, str], usb_device: Any = None,
                driver: str | None = None) -> Adapter | None:
    node = props.get("DEVNAME")
    devpath = props.get("DEVPATH") or sys_path.removeprefix("/sys")
    location = usb_location(devpath)
    if not node or location is None:
        return None
    usb_path, interface = location
    links = props.get("DEVLINKS", "").split()
    vendor_id = (_attribute(usb_device, "idVendor") or props.get("ID_VENDOR_ID")
                 or props.get("ID_USB_VENDOR_ID") or "0000").lower()
    product_id = (_attribute(usb_device, "idProduct") or props.get("ID_MODEL_ID")
                  or props.get("ID_USB_MODEL_ID") or "0000").lower()
    serial = (_attribute(usb_device, "serial") or props.get("ID_SERIAL_SHORT")
              or props.get("ID_USB_SERIAL_SHORT"))
    vendor = (_attribute(usb_device, "manufacturer") or props.get("ID_VENDOR_FROM_DATABASE")
              or _text(props.get("ID_VENDOR", "").replace("_", " ")))
    product = (_attribute(usb_device, "product") or props.get("ID_MODEL_FROM_DATABASE")
               or _text(props.get("ID_MODEL", "").replace("_", " ")))
    return Adapter(
        device_node=node,
        sys_path=sys_path,
        usb_path=usb_path,
        interface=interface,
        vendor_id=vendor_id,
        product_id=product_id,
        usb_serial=serial,
        vendor=vendor,
        product=product,
        driver=driver or props.get("ID_USB_DRIVER"),
        by_id=tuple(link for link in links if link.startswith("/dev/serial/by-id/")),
        by_path=tuple(link for link in links if link.startswith("/dev/serial/by-path/")),
    )


def adapter_from_device(device: Any) -> Adapter | None:
    """An Adapter from a pyudev tty Device, or None when it has no USB parent."""
    props = _props(device)
    usb_device = None
    driver = None
    with contextlib.suppress(Exception):  # odd sysfs layouts make pyudev raise various errors
        usb_device = device.find_parent("usb", "usb_device")
        interface = device.find_parent("usb", "usb_interface")
        driver = _text(getattr(interface, "driver", None)) if interface is not None else None
    if usb_device is None and "ID_VENDOR_ID" not in props and "ID_BUS" not in props:
        # No USB parent in sysfs and no USB facts from udev: a legacy ttyS or a virtual tty.
        return None
    return _from_parts(str(device.sys_path), props, usb_device, driver)


def _context(context: Any) -> Any:
    if context is not None:
        return context
    try:
        import pyudev
    except ImportError as exc:  # pragma: no cover - pyudev is a dependency
        raise UsageError("pyudev is not installed", where="discovery",
                         hint="pip install 'pyudev>=0.24' (Linux only)") from exc
    try:
        return pyudev.Context()
    except Exception as exc:  # pragma: no cover - no libudev (containers, macOS)
        raise InfrastructureError(f"cannot open udev: {exc}", where="discovery",
                                  hint="discovery needs Linux with libudev (udev or systemd); "
                                  "inside a container, mount /run/udev and /sys") from exc


def list_adapters(context: Any = None) -> list[Adapter]:
    """Every USB serial adapter udev knows, sorted by physical path (ports in hub order).

    ``context`` is a ``pyudev.Context`` (default: a new one) or anything with
    ``list_devices(subsystem=...)``.
    """
    found = []
    for device in _context(context).list_devices(subsystem="tty"):
        adapter = adapter_from_device(device)
        if adapter is not None:
            found.append(adapter)
    return sorted(found, key=_physical_order)


def _physical_order(adapter: Adapter) -> tuple[tuple[int, ...], str]:
    numbers = tuple(int(n) for n in re.split(r"[-.]", adapter.usb_path) if n.isdigit())
    return numbers, adapter.interface or ""


# -- matching against a rack ---------------------------------------------------------------------


class PortLike(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def value(self) -> str: ...


class BoardLike(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def port(self) -> PortLike: ...


class RackLike(Protocol):
    @property
    def boards(self) -> Sequence[BoardLike]: ...


@dataclass(frozen=True)
class RackMatch:
    """Board ``board_id`` of the rack is this adapter, found by its ``by`` key."""

    board_id: str
    by: Literal["usb_serial", "usb_path", "port"]


def board_matches(adapter: Adapter, kind: str, value: str) -> bool:
    """Whether a rack port (``usb_serial`` / ``usb_path`` / ``path``) names this adapter."""
    if kind == "usb_serial":
        return adapter.usb_serial is not None and adapter.usb_serial == value
    if kind == "usb_path":
        # "1-1.3" names the USB device (any interface); "1-1.3:1.0" one interface of it.
        return value in (adapter.usb_path, adapter.port_path)
    if kind == "path":
        wanted = os.path.normpath(value)
        if wanted == adapter.device_node or wanted in adapter.links:
            return True
        # A link udev made after our listing, or a person's own symlink: compare its target.
        with contextlib.suppress(OSError):
            if os.path.exists(wanted) and os.path.realpath(wanted) == adapter.device_node:
                return True
    return False


def match_rack(adapters: Iterable[Adapter],
               rack: RackLike | None) -> dict[Adapter, tuple[RackMatch, ...]]:
    """Which boards of ``rack`` each adapter already is (an empty tuple: a new board).

    Matched by USB serial number, USB path, or a port path/link (``/dev/serial/by-id/...``).
    More than one match means the rack describes one adapter twice: the caller reports it.
    """
    result: dict[Adapter, tuple[RackMatch, ...]] = {}
    boards = list(rack.boards) if rack is not None else []
    for adapter in adapters:
        matches = []
        for board in boards:
            kind = board.port.kind
            if board_matches(adapter, kind, board.port.value):
                by: Literal["usb_serial", "usb_path", "port"] = (
                    "port" if kind == "path" else kind  # type: ignore[assignment]
                )
                matches.append(RackMatch(board.id, by))
        result[adapter] = tuple(matches)
    return result


def boards_of(adapter: Adapter, rack: RackLike | None) -> tuple[str, ...]:
    """The ids of the rack's boards that are this adapter."""
    return tuple(m.board_id for m in match_rack([adapter], rack)[adapter])


# -- probing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeResult:
    """What a probe learned: the chip (rack spelling), its description and base MAC."""

    chip: str | None  # "esp32", "esp32s2", "esp32c3"; None for a chip the rack cannot hold
    chip_name: str  # esptool's name, e.g. "ESP32-C3"
    mac: str  # "84:f7:03:a1:b2:c3"
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"chip": self.chip, "chip_name": self.chip_name, "mac": self.mac,
                "description": self.description}


def _esptool_connect(port: str) -> Any:
    """Open ``port`` exclusively and connect esptool's loader (auto-detecting the chip)."""
    from esptool.cmds import detect_chip

    from pytest_hilfarm.drivers.transports import open_port

    # Opened by us with an exclusive lock, so a port held by a console or another esptool is
    # refused ("busy") instead of both sides reading half the bytes.
    serial_port = open_port(port, 115200, timeout=3.0, exclusive=True)
    try:
        return detect_chip(serial_port, 115200, "default-reset", connect_attempts=3)
    except BaseException:
        serial_port.close()
        raise


def probe(adapter: Adapter, reserved: Callable[[str], bool], *, rack: RackLike | None = None,
          connect: Callable[[str], Any] | None = None, port: str | None = None) -> ProbeResult:
    """Ask a free adapter's chip for its type and MAC, then hard-reset it to normal boot.

    ``reserved(board_id)`` says whether a board is reserved (leased or held at the bench); the
    adapter's boards come from ``rack``. A reserved board is never touched: UsageError. Adapters
    of an unknown kind (a modem, a GPS) are refused too, since the reset pulses esptool sends
    could upset them. ``connect(port)`` (default: esptool's chip auto-detection) and ``port``
    (default: the adapter's node) exist for tests and remote ports.
    """
    held = [board for board in boards_of(adapter, rack) if reserved(board)]
    if held:
        raise UsageError(
            f"not probing {adapter.device_node}: board {', '.join(held)} is reserved",
            where=adapter.describe(),
            hint="wait until the lease ends (`hilfarm status` shows the holder), then probe again",
        )
    if adapter.kind == "other":
        raise UsageError(
            f"not probing {adapter.device_node}: {adapter.vid_pid} is not a known ESP adapter",
            where=adapter.describe(),
            hint="probe only CP210x, CH340/CH9102, FTDI or Espressif USB-Serial/JTAG ports",
        )
    target = port or adapter.device_node
    import serial
    from esptool.util import FatalError

    errors = (FatalError, serial.SerialException, OSError)
    # esptool prints its progress to stdout; keep it out of `--json` output and tables.
    chatter = io.StringIO()
    esp = None
    try:
        with contextlib.redirect_stdout(chatter):
            esp = (connect or _esptool_connect)(target)
            chip_name = str(esp.CHIP_NAME)
            description = str(esp.get_chip_description())
            mac = ":".join(f"{octet:02x}" for octet in esp.read_mac())
    except errors as exc:
        raise PortError(
            f"probing failed: {exc}",
            where=f"{target} ({adapter.describe()})",
            hint="check that nothing else holds the port and that the board's auto-reset "
            "works (hold BOOT while pressing EN if it does not); esptool said: "
            + (chatter.getvalue().strip()[-300:] or "nothing"),
        ) from exc
    finally:
        if esp is not None:
            _restore_normal_boot(esp, target)
    chip = chip_for_esptool_name(chip_name)
    return ProbeResult(chip if chip in FARM_CHIPS else None, chip_name, mac, description)


def _restore_normal_boot(esp: Any, target: str) -> None:
    # The probe left the chip in its ROM download mode; a hard reset (EN pulse with IO0 high)
    # boots the flashed firmware again, as `esptool --after hard-reset` does.
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            esp.hard_reset()
        except Exception as exc:  # the result is still good; the board just stays in ROM
            logger.warning("%s: hard reset after probing failed (%s); press EN to reboot it",
                           target, exc)
        finally:
            with contextlib.suppress(Exception):
                esp._port.close()


# -- hot-plug ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterEvent:
    """An adapter disappeared (``gone``), came back (``back``) or showed up for the first time
    (``new``). ``previous`` is how it looked before it went, so a holder can see the node change.
    """

    action: Literal["gone", "back", "new"]
    adapter: Adapter
    previous: Adapter | None = None

    @property
    def renamed(self) -> bool:
        return self.previous is not None and self.previous.device_node != self.adapter.device_node


Listener = Callable[[AdapterEvent], None]


@dataclass
class _WatchState:
    """The watcher's view, guarded by its lock (local to one watcher, never shared)."""

    present: dict[str, Adapter] = field(default_factory=dict)  # key -> adapter
    gone: dict[str, Adapter] = field(default_factory=dict)  # key -> last seen


class PortWatcher:
    """Follows udev tty add/remove events in a thread and keeps the present adapters by identity.

    Listeners run in the watcher's thread, in event order; they must be quick and must not raise
    (an exception is logged and the watcher goes on). Use as a context manager, or start/stop.
    """

    def __init__(self, listeners: Iterable[Listener] = (), *, context: Any = None,
                 poll_interval: float = 0.2) -> None:
        self._context = _context(context)
        self._listeners = list(listeners)
        self._poll_interval = poll_interval
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._state = _WatchState()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._monitor: Any = None

    def add_listener(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def start(self) -> PortWatcher:
        import pyudev

        if self._thread is not None:
            return self
        # The monitor starts before the first listing, so nothing that changes in between is
        # missed (an event for an adapter already listed is merged by identity).
        self._monitor = pyudev.Monitor.from_netlink(self._context)
        self._monitor.filter_by("tty")
        self._monitor.start()
        with self._lock:
            for adapter in list_adapters(self._context):
                self._state.present[adapter.key] = adapter
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="hilfarm-port-watcher",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self._poll_interval + 1)
            self._thread = None
        # pyudev closes the netlink socket when the monitor is collected.
        self._monitor = None

    def __enter__(self) -> PortWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- queries (thread-safe) --

    def adapters(self) -> list[Adapter]:
        with self._lock:
            return sorted(self._state.present.values(), key=_physical_order)

    def current(self, key: str) -> Adapter | None:
        """The present adapter with this identity key (see Adapter.key), or None if gone."""
        with self._lock:
            return self._state.present.get(key)

    def find(self, kind: str, value: str) -> Adapter | None:
        """The present adapter a rack port names (``usb_serial``/``usb_path``/``path``)."""
        with self._lock:
            hits = [a for a in self._state.present.values() if board_matches(a, kind, value)]
        return hits[0] if len(hits) == 1 else None

    def is_gone(self, key: str) -> bool:
        with self._lock:
            return key in self._state.gone and key not in self._state.present

    def wait_for(self, predicate: Callable[[list[Adapter]], bool], timeout: float) -> bool:
        """Wait until ``predicate(present adapters)`` holds; False on timeout."""
        with self._changed:
            return self._changed.wait_for(
                lambda: predicate(list(self._state.present.values())), timeout)

    # -- the thread --

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                device = self._monitor.poll(timeout=self._poll_interval)
            except Exception as exc:  # a closed socket at shutdown, or a garbled message
                if not self._stop.is_set():
                    logger.warning("udev monitor failed: %s", exc)
                continue
            if device is not None:
                self._handle(device)

    def _handle(self, device: Any) -> None:
        action = getattr(device, "action", None)
        event: AdapterEvent | None = None
        with self._lock:
            if action == "remove":
                event = self._removed(str(device.sys_path), _props(device))
            elif action in ("add", "change", "bind"):
                adapter = adapter_from_device(device)
                if adapter is not None:
                    event = self._added(adapter)
            if event is not None:
                self._changed.notify_all()
            listeners = list(self._listeners)
        if event is None:
            return
        for listener in listeners:
            try:
                listener(event)
            except Exception:
                logger.exception("port watcher listener %r failed on %s", listener, event)

    def _removed(self, sys_path: str, props: Mapping[str, str]) -> AdapterEvent | None:
        state = self._state
        key = next((k for k, a in state.present.items() if a.sys_path == sys_path), None)
        if key is None:
            # Not listed before (it came and went between listings): identify it from the event.
            adapter = _from_parts(sys_path, props)
            if adapter is None:
                return None
            key = adapter.key
        else:
            adapter = state.present[key]
        state.present.pop(key, None)
        state.gone[key] = adapter
        return AdapterEvent("gone", adapter)

    def _added(self, adapter: Adapter) -> AdapterEvent | None:
        state = self._state
        known = state.present.get(adapter.key)
        if known is not None:
            if known == adapter:
                return None  # the duplicate of what the first listing already saw
            state.present[adapter.key] = adapter
            return AdapterEvent("back", adapter, previous=known)
        previous = state.gone.pop(adapter.key, None)
        state.present[adapter.key] = adapter
        return AdapterEvent("back" if previous is not None else "new", adapter, previous)

