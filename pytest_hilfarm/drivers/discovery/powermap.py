"""Map each board to the uhubctl hub port that powers it, by switching ports and watching udev.

``list_hubs`` reads the hubs and ports ``uhubctl`` reports; ``map_power`` switches each port
that has a USB serial adapter behind it off, sees which adapters disappear, switches it on again
and waits for them to come back (perhaps as another /dev/ttyUSBn). An adapter that vanished when
a port went off is powered by that port: that is the evidence, not the USB topology, because many
hubs report per-port switching and only pretend (their ports never lose VBUS).

Must not: switch a port whose board is reserved (a lease or a bench hold; checked just before
each switch), switch a port with no known adapter behind it (it may feed the rig's own disk or
network), or leave a port off: every port it switched off is switched on again on the way out,
also on an error or Ctrl-C.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pytest_hilfarm.drivers.discovery.udev import Adapter, RackLike, boards_of, list_adapters
from pytest_hilfarm.drivers.power import UhubctlPower
from pytest_hilfarm.errors import InfrastructureError

logger = logging.getLogger(__name__)

# uhubctl's listing (uhubctl.c, hub_info / port status lines), e.g.
#   Current status for hub 1-1 [2109:2817 VIA Labs, Inc. USB2.0 Hub, USB 2.10, 4 ports, ppps]
#     Port 1: 0503 power highspeed enable connect [10c4:ea60 Silicon Labs CP2102N ... 0001]
_HUB_LINE = re.compile(r"^(Current|New) status for hub (\S+) \[(.*)\]\s*$")
_PORT_LINE = re.compile(r"^\s+Port (\d+): ([0-9a-fA-F]{4})((?: [\w.-]+)*)(?: \[(.*)\])?\s*$")
# ppps: per-port power switching; ganged: all ports at once; nops: none (uhubctl README).
Switching = Literal["ppps", "ganged", "nops", "unknown"]

Outcome = Literal["mapped", "reserved", "no-switching", "not-back", "no-adapter"]


@dataclass(frozen=True)
class HubPort:
    number: int
    status: str  # uhubctl's hex port status word, e.g. "0503"
    flags: tuple[str, ...]  # "power", "enable", "connect", "off", ...
    device: str | None = None  # what uhubctl says is attached: "10c4:ea60 Silicon Labs ..."

    @property
    def powered(self) -> bool:
        return "power" in self.flags

    @property
    def connected(self) -> bool:
        return "connect" in self.flags


@dataclass(frozen=True)
class Hub:
    location: str  # uhubctl -l value: "1-1", or a root hub's bus number "1"
    description: str
    switching: Switching
    ports: tuple[HubPort, ...]

    def port_path(self, port: int) -> str:
        """The kernel name of a device on ``port``: ``1-1.3`` (or ``1-3`` on root hub 1)."""
        joiner = "-" if self.location.isdigit() else "."
        return f"{self.location}{joiner}{port}"


def parse_uhubctl(text: str) -> list[Hub]:
    """The hubs of a ``uhubctl`` listing, with each hub's first ("Current status") port list."""
    hubs: dict[str, Hub] = {}
    current: tuple[str, str, Switching] | None = None
    ports: list[HubPort] = []

    def close() -> None:
        if current is not None and current[0] not in hubs:
            hubs[current[0]] = Hub(current[0], current[1], current[2], tuple(ports))

    for line in text.splitlines():
        hub = _HUB_LINE.match(line)
        if hub is not None:
            close()
            ports = []
            if hub.group(1) == "New":
                current = None  # the state after a switch: the first listing is what we map
                continue
            info = hub.group(3)
            last = info.rsplit(",", 1)[-1].strip()
            switching: Switching = last if last in ("ppps", "ganged", "nops") else "unknown"  # type: ignore[assignment]
            current = (hub.group(2), info, switching)
            continue
        port = _PORT_LINE.match(line)
        if port is not None and current is not None:
            ports.append(HubPort(int(port.group(1)), port.group(2).lower(),
                                 tuple(port.group(3).split()), port.group(4)))
    close()
    return list(hubs.values())


def list_hubs(uhubctl: str = "uhubctl", timeout: float = 30.0) -> list[Hub]:
    """Run ``uhubctl`` (no arguments: list only, switches nothing) and parse its listing."""
    if shutil.which(uhubctl) is None:
        raise InfrastructureError(
            f"{uhubctl!r} is not installed", where="power mapping",
            hint="install uhubctl (apt install uhubctl) on the rig host, or map power by hand "
            "in the rack file: power: {driver: uhubctl, hub: 1-1, port: 2}")
    try:
        result = subprocess.run([uhubctl], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InfrastructureError(f"uhubctl failed to run: {exc}", where=uhubctl,
                                  hint="run `uhubctl` by hand to see what is wrong") from exc
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()[-500:]
        raise InfrastructureError(
            f"uhubctl exited with {result.returncode}: {output or 'no output'}", where=uhubctl,
            hint="uhubctl needs root, or a udev rule giving your user write access to the "
            "hubs (see the uhubctl README, 'Linux USB permissions')")
    return parse_uhubctl(result.stdout)


@dataclass(frozen=True)
class PortResult:
    """What switching one hub port showed."""

    hub: str
    port: int
    outcome: Outcome
    gone: tuple[Adapter, ...] = ()  # adapters that vanished while the port was off
    back: tuple[Adapter, ...] = ()  # the same adapters after power came back (new nodes)
    note: str = ""


@dataclass(frozen=True)
class PowerMap:
    results: tuple[PortResult, ...]

    def power_of(self, adapter: Adapter) -> tuple[str, int] | None:
        """The (hub, port) that powers ``adapter`` (matched by identity), or None."""
        for result in self.results:
            if result.outcome == "mapped" and any(a.key == adapter.key for a in result.gone):
                return result.hub, result.port
        return None


Switch = Callable[[str, int, bool], None]


def uhubctl_switch(uhubctl: str = "uhubctl") -> Switch:
    """A switch function that runs ``uhubctl -l HUB -p PORT -a on|off`` through drivers/power.py."""

    def switch(hub: str, port: int, on: bool) -> None:
        driver = UhubctlPower(hub=hub, port=port, uhubctl=uhubctl)
        driver.on() if on else driver.off()

    return switch


def _keys(adapters: Iterable[Adapter]) -> dict[str, Adapter]:
    return {a.key: a for a in adapters}


def _downstream(path: str, adapters: Iterable[Adapter]) -> list[Adapter]:
    # Behind the port itself or behind a hub plugged into it ("1-1.3" and "1-1.3.2"). Only ESP
    # adapters count: a port whose only serial device is a modem or a GPS is not ours to cut.
    return [a for a in adapters if a.kind != "other"
            and (a.usb_path == path or a.usb_path.startswith(path + "."))]


def _boards_on(hub: Hub, port: int, behind: Sequence[Adapter], rack: RackLike | None) -> set[str]:
    """Rack boards this port could cut: those of the adapters behind it, and those the rack
    itself says are powered from it (their adapter may be gone right now).
    """
    boards = {board for adapter in behind for board in boards_of(adapter, rack)}
    for board in (rack.boards if rack is not None else ()):
        power: Any = getattr(board, "power", None)
        params = getattr(power, "params", {}) or {}
        if getattr(power, "driver", None) == "uhubctl" and str(params.get("hub")) == \
                hub.location and params.get("port") == port:
            boards.add(board.id)
    return boards


def _wait(predicate: Callable[[dict[str, Adapter]], bool], adapters: Callable[[], list[Adapter]],
          timeout: float, poll: float) -> dict[str, Adapter]:
    """Re-list until ``predicate(present adapters by key)`` holds or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        present = _keys(adapters())
        if predicate(present) or time.monotonic() >= deadline:
            return present
        time.sleep(poll)


def map_power(
    hubs: Sequence[Hub],
    reserved: Callable[[str], bool],
    *,
    rack: RackLike | None = None,
    adapters: Callable[[], list[Adapter]] = list_adapters,
    switch: Switch | None = None,
    off_timeout: float = 5.0,
    on_timeout: float = 20.0,
    settle: float = 0.5,
    poll: float = 0.1,
    progress: Callable[[str], None] | None = None,
) -> PowerMap:
    """Switch each port with an adapter behind it off and on; say which adapters it powers.

    ``reserved(board_id)`` is asked just before each switch, for every rack board the port could
    cut; a reserved one leaves the port alone (outcome ``reserved``). ``off_timeout`` is how long
    to wait for the adapters to vanish (a hub that only pretends to switch: ``no-switching``),
    ``settle`` how long to keep watching after that for other adapters on the same port,
    ``on_timeout`` how long they may take to enumerate again (``not-back`` otherwise).
    Every port switched off is switched on again before this returns or raises.
    """
    switch = switch or uhubctl_switch()
    say = progress or (lambda text: logger.info("%s", text))
    off_now: list[tuple[str, int]] = []
    results: list[PortResult] = []
    try:
        for hub in hubs:
            if hub.switching != "ppps":
                say(f"hub {hub.location}: no per-port power switching ({hub.switching}); skipped")
                continue
            for hub_port in hub.ports:
                result = _map_port(hub, hub_port, reserved, rack, adapters, switch, off_now,
                                   off_timeout, on_timeout, settle, poll, say)
                if result is not None:
                    results.append(result)
    except BaseException as exc:
        failed = _restore(off_now, switch)
        if failed and isinstance(exc, Exception):
            raise _left_off(failed, f"power mapping failed ({exc}); ") from exc
        if failed:
            # Ctrl-C stays Ctrl-C; the ports still off are in the log.
            logger.error("%s", _left_off(failed, ""))
        raise
    failed = _restore(off_now, switch)
    if failed:
        raise _left_off(failed, "")
    return PowerMap(tuple(results))


def _map_port(hub: Hub, hub_port: HubPort, reserved: Callable[[str], bool],
              rack: RackLike | None, adapters: Callable[[], list[Adapter]], switch: Switch,
              off_now: list[tuple[str, int]], off_timeout: float, on_timeout: float,
              settle: float, poll: float, say: Callable[[str], None]) -> PortResult | None:
    port = hub_port.number
    before = _keys(adapters())
    behind = _downstream(hub.port_path(port), before.values())
    if not behind:
        # Nothing of ours behind it, as far as the USB tree tells: never cut a port blindly.
        return None
    held = sorted(board for board in _boards_on(hub, port, behind, rack) if reserved(board))
    if held:
        say(f"hub {hub.location} port {port}: board {', '.join(held)} is reserved; not switched")
        return PortResult(hub.location, port, "reserved",
                          note=f"reserved: {', '.join(held)}; run again when it is free")
    expected = {a.key for a in behind}
    say(f"hub {hub.location} port {port}: off ({', '.join(a.device_node for a in behind)})")
    off_now.append((hub.location, port))  # before the call: a failed "off" may still cut power
    switch(hub.location, port, False)
    _wait(lambda present: not expected & present.keys(), adapters, off_timeout, poll)
    time.sleep(settle)  # other adapters on the same port (a hub behind it) may go a bit later
    after_off = _keys(adapters())
    gone = tuple(before[k] for k in before if k not in after_off)

    switch(hub.location, port, True)
    off_now.remove((hub.location, port))
    if not gone:
        say(f"hub {hub.location} port {port}: nothing vanished; the hub does not cut power")
        return PortResult(hub.location, port, "no-switching",
                          note="no adapter vanished: this hub port does not switch VBUS")
    wanted = {a.key for a in gone}
    present = _wait(lambda now: wanted <= now.keys(), adapters, on_timeout, poll)
    back = tuple(present[k] for k in wanted if k in present)
    missing = [a for a in gone if a.key not in present]
    if missing:
        say(f"hub {hub.location} port {port}: on, but {len(missing)} adapter(s) did not return")
        return PortResult(hub.location, port, "not-back", gone, back,
                          note="did not come back: " + ", ".join(a.describe() for a in missing))
    unexpected = [a for a in gone if a.key not in expected]
    note = ("also cut: " + ", ".join(a.describe() for a in unexpected)) if unexpected else ""
    say(f"hub {hub.location} port {port}: powers "
        + ", ".join(f"{a.port_path} (now {a.device_node})" for a in back))
    return PortResult(hub.location, port, "mapped", gone, back, note)


def _left_off(failed: Sequence[tuple[str, int]], before: str) -> InfrastructureError:
    return InfrastructureError(
        before + "these hub ports could not be switched on again: "
        + ", ".join(f"hub {h} port {p}" for h, p in failed),
        where="power mapping",
        hint="switch them on by hand: " + "; ".join(f"uhubctl -l {h} -p {p} -a on"
                                                      for h, p in failed))


def _restore(off_now: list[tuple[str, int]], switch: Switch) -> list[tuple[str, int]]:
    """Switch every port in ``off_now`` on; return those that failed (each is tried)."""
    failed = []
    for hub, port in list(off_now):
        try:
            switch(hub, port, True)
            off_now.remove((hub, port))
        except Exception as exc:  # keep going: every other port must still come back
            logger.error("switching hub %s port %s on again failed: %s", hub, port, exc)
            failed.append((hub, port))
    return failed

