"""Open serial ports from a device path or a pyserial URL, and find USB serial ports again.

``open_port`` accepts ``/dev/...`` paths, ``socket://host:port`` and ``rfc2217://host:port`` (any
``serial_for_url`` scheme) and turns every failure into a PortError that names the port and says
what to check. ``resolve_usb`` finds a board's tty through pyudev by its USB serial number or its
physical USB path, so a board that re-enumerates as another /dev/ttyUSBn is still found;
``wait_for_port`` waits for it to come back after a power cycle. This module must not know about
rack files or boards: callers pass plain strings.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import termios
import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

import serial
from serial.urlhandler import protocol_socket

from pytest_hilfarm.errors import PortError, UsageError

# A short read timeout keeps reader threads responsive to pause/close requests without spinning.
DEFAULT_READ_TIMEOUT = 0.05


def is_url(url_or_path: str) -> bool:
    """True for ``scheme://...`` names (socket, rfc2217, loop, ...), False for device paths."""
    return "://" in url_or_path


def open_port(
    url_or_path: str,
    baudrate: int = 115200,
    timeout: float | None = DEFAULT_READ_TIMEOUT,
    *,
    exclusive: bool = True,
) -> serial.SerialBase:
    """Open a serial port by device path or pyserial URL and return the open port object.

    ``exclusive`` takes an advisory lock on local device paths, so a second opener (a stray
    esptool, a terminal) fails with a clear "busy" error instead of both reading half the bytes.
    The timeout is set once, here: on ``rfc2217://`` every later change renegotiates all port
    settings (about 100 ms each; notes/esp-rom-protocol.md section 7).
    """
    if not url_or_path:
        raise UsageError(
            "empty port name",
            where="open_port",
            hint="give a device path (/dev/serial/by-id/...) or a URL (socket://HOST:PORT); "
            "an empty port is never taken to mean 'probe every port on the host'",
        )
    kwargs: dict[str, Any] = {"baudrate": baudrate, "timeout": timeout}
    if not is_url(url_or_path):
        kwargs["exclusive"] = exclusive
    try:
        if url_or_path.startswith("socket://"):
            port: serial.SerialBase = _QuickCloseSocket(url_or_path, **kwargs)
        else:
            port = serial.serial_for_url(url_or_path, do_not_open=True, **kwargs)
            port.open()
    except ValueError as exc:
        raise PortError(
            f"cannot open port: {exc}",
            where=url_or_path,
            hint="check the URL scheme and format: socket://HOST:PORT, rfc2217://HOST:PORT "
            "or a device path such as /dev/serial/by-id/usb-...",
        ) from exc
    except (serial.SerialException, OSError) as exc:
        raise _port_error(url_or_path, exc) from exc
    return port


class _QuickCloseSocket(protocol_socket.Serial):
    """pyserial's socket:// port without the fixed 0.3 s sleep in ``close()``.

    pyserial sleeps there "to give the server some time" before a quick reconnect; the virtual
    rack accepts a new connection at once, and the sleep would cost 0.3 s on every console pause,
    flash and test (the anchor's per-test overhead, notes/targets.md). ``in_waiting`` also says
    how many bytes are really waiting (pyserial's says only 0 or 1), so readers can drain a burst
    in one read instead of one byte per system call.
    """

    @property
    def in_waiting(self) -> int:
        sock: socket.socket | None = getattr(self, "_socket", None)
        if sock is None or not getattr(self, "is_open", False):
            return 0
        try:
            raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return 1 if super().in_waiting else 0
        waiting: int = struct.unpack("i", raw)[0]
        return waiting

    def close(self) -> None:
        if getattr(self, "is_open", False):
            sock: socket.socket | None = getattr(self, "_socket", None)
            self._socket = None
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self.is_open = False


def _port_error(name: str, exc: BaseException) -> PortError:
    text = str(exc)
    code = getattr(exc, "errno", None)
    if is_url(name):
        scheme = name.split("://", 1)[0]
        if "refused" in text.lower() or code == errno.ECONNREFUSED:
            return PortError(
                f"nothing accepts connections at this {scheme} address ({text})",
                where=name,
                hint="for a virtual board start the rack with `hilfarm sim up`; for a remote "
                "port check that its RFC 2217/ser2net server runs and the host:port is right",
            )
        return PortError(
            f"cannot connect ({text})",
            where=name,
            hint="check the host and port, and that the server exporting the port is running",
        )
    if code == errno.ENOENT or "No such file" in text or "Errno 2]" in text:
        return PortError(
            "the serial port does not exist",
            where=name,
            hint="check the USB cable and that the board is powered; list ports with "
            "`ls -l /dev/serial/by-id/`; prefer by-id paths or usb_serial in the rack file",
        )
    if code == errno.EACCES or "Permission denied" in text or "Errno 13" in text:
        return PortError(
            "permission denied opening the serial port",
            where=name,
            hint="add the user to the 'dialout' (or 'uucp') group and log in again",
        )
    if code == errno.EBUSY or "exclusively lock" in text or "busy" in text.lower():
        return PortError(
            "the serial port is busy (another process holds it)",
            where=name,
            hint=f"find the holder with `fuser -v {name}` (a stray esptool, a serial terminal, "
            "or ModemManager) and stop it",
        )
    return PortError(
        f"cannot open the serial port ({text})",
        where=name,
        hint="check the cable, the board's power, and that no other process holds the port",
    )


def probe(url_or_path: str, timeout: float = 0.2) -> bool:
    """True when the port looks present: the path exists, or the URL's TCP server accepts.

    Cheap and side-effect free on purpose: opening a real USB-UART would toggle DTR/RTS, which
    the auto-reset circuit of a DevKit may turn into a reset.
    """
    if not is_url(url_or_path):
        return os.path.exists(url_or_path)
    parsed = urllib.parse.urlsplit(url_or_path)
    if parsed.scheme in ("socket", "rfc2217") and parsed.hostname and parsed.port:
        try:
            with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout):
                return True
        except OSError:
            return False
    # Other schemes (loop://, spy://, ...) have nothing to wait for.
    return True


def wait_for_port(
    resolve: Callable[[], str | None],
    timeout: float,
    *,
    poll: float = 0.1,
    what: str = "serial port",
    present: Callable[[str], bool] = probe,
) -> str:
    """Wait until ``resolve()`` names a port that is present, and return that name.

    ``resolve`` is called again on every poll, so a board that comes back under a new
    /dev/ttyUSBn after a power cycle is found by its USB serial number or path. It may return
    None (not there yet) or raise PortError (counted as not there yet; the last error is
    reported on timeout).
    """
    deadline = time.monotonic() + timeout
    last_seen: str | None = None
    last_error: PortError | None = None
    while True:
        try:
            name = resolve()
            last_error = None
        except PortError as exc:
            name, last_error = None, exc
        if name:
            last_seen = name
            if present(name):
                return name
        if time.monotonic() >= deadline:
            break
        time.sleep(poll)
    detail = f" (last resolved to {last_seen}, which is not present)" if last_seen else ""
    if last_error is not None:
        detail += f"; last error: {last_error.what}"
    raise PortError(
        f"the {what} did not come back within {timeout:g} s{detail}",
        where=last_seen or what,
        hint="check that the board is powered and its USB cable and hub port work; "
        "`dmesg -w` shows whether it enumerates at all",
    )


def _props(device: Any) -> dict[str, str]:
    props = getattr(device, "properties", device)
    try:
        return {str(k): str(props[k]) for k in props}
    except (TypeError, KeyError):
        return {}


def _usb_port_path(device: Any) -> str | None:
    """The kernel's USB port path of the device's USB parent (``1-1.2``), if it has one."""
    find_parent = getattr(device, "find_parent", None)
    if find_parent is None:
        return None
    try:
        parent = find_parent("usb", "usb_device")
    except Exception:  # pyudev raises various errors for odd sysfs layouts; treat as no parent
        return None
    return getattr(parent, "sys_name", None) if parent is not None else None


def _matches(device: Any, props: dict[str, str], serial_no: str | None, path: str | None) -> bool:
    if serial_no is not None and props.get("ID_SERIAL_SHORT") != serial_no:
        return False
    if path is not None:
        id_path = props.get("ID_PATH", "")
        usb_path = _usb_port_path(device)
        # Accept the full ID_PATH (pci-0000:00:14.0-usb-0:1.2:1.0), the kernel's USB port path
        # (1-1.2) or the "usb-0:1.2" part of ID_PATH, which is what people copy from udevadm.
        if path not in (id_path, usb_path) and not (
            path.startswith("usb-") and f"-{path}:" in f"-{id_path}:"
        ):
            return False
    return True


def find_usb(
    serial: str | None = None, path: str | None = None, context: Any = None
) -> str | None:
    """Return the tty device node matching the USB serial and/or path, or None if absent.

    Raises PortError when several ttys match (a serial number shared by two boards).
    """
    matches, _ = _scan_usb(serial, path, context)
    if len(matches) > 1:
        listing = ", ".join(node for node, _ in matches)
        raise PortError(
            f"{len(matches)} serial ports match {_criteria(serial, path)}: {listing}",
            where="USB serial ports",
            hint="add usb_path to tell the boards apart (some USB-UART chips share a serial)",
        )
    return matches[0][0] if matches else None


def resolve_usb(serial: str | None = None, path: str | None = None, context: Any = None) -> str:
    """Return the tty device node whose ID_SERIAL_SHORT / USB path matches (PortError if none).

    ``context`` is a ``pyudev.Context`` (or a stand-in with ``list_devices(subsystem=...)``);
    the default creates one. The error lists every USB serial port seen, with its serial number
    and path, so the rack file can be fixed by copying the right value.
    """
    if serial is None and path is None:
        raise UsageError(
            "resolve_usb needs a USB serial number or a USB path",
            where="resolve_usb",
            hint="set usb_serial or usb_path for the board in the rack file",
        )
    found = find_usb(serial, path, context)
    if found is not None:
        return found
    _, candidates = _scan_usb(serial, path, context)
    seen = (
        "\n".join(
            f"    {node}  ID_SERIAL_SHORT={p.get('ID_SERIAL_SHORT', '-')}  "
            f"ID_PATH={p.get('ID_PATH', '-')}  usb={u or '-'}"
            for node, p, u in candidates
        )
        or "    (none)"
    )
    raise PortError(
        f"no serial port matches {_criteria(serial, path)}; USB serial ports seen:\n{seen}",
        where="USB serial ports",
        hint="check that the board is plugged in and powered, then copy its ID_SERIAL_SHORT "
        "or ID_PATH from the list above into the rack file",
    )


def _criteria(serial: str | None, path: str | None) -> str:
    parts = []
    if serial is not None:
        parts.append(f"usb_serial={serial!r}")
    if path is not None:
        parts.append(f"usb_path={path!r}")
    return " and ".join(parts)


def _scan_usb(
    serial: str | None, path: str | None, context: Any
) -> tuple[list[tuple[str, dict[str, str]]], list[tuple[str, dict[str, str], str | None]]]:
    if context is None:
        import pyudev  # imported here so hosts without udev can still use URL ports

        context = pyudev.Context()
    devices: Iterable[Any] = context.list_devices(subsystem="tty")
    matches: list[tuple[str, dict[str, str]]] = []
    candidates: list[tuple[str, dict[str, str], str | None]] = []
    for device in devices:
        node = getattr(device, "device_node", None)
        if not node:
            continue
        props = _props(device)
        usb_path = _usb_port_path(device)
        # Only USB ttys can match: the dozens of legacy /dev/ttyS* would bury the useful lines.
        if props.get("ID_BUS") != "usb" and "ID_SERIAL_SHORT" not in props and usb_path is None:
            continue
        candidates.append((node, props, usb_path))
        if _matches(device, props, serial, path):
            matches.append((node, props))
    return matches, candidates
