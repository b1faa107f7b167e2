"""Power drivers: switch a board's supply on and off, by name, from plain parameters.

Each backend is a small class implementing :class:`PowerDriver` and opening with the rack-file
snippet that selects it; ``make_power(name, params)`` builds one from ``POWER_DRIVERS``.
Command-line backends go through an injectable runner so tests assert the exact argv. This
module must not read rack files, reserve boards or touch serial ports (the caller waits for the
port to come back after a cycle).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from pytest_hilfarm.errors import ConfigError, InfrastructureError, UsageError

logger = logging.getLogger(__name__)

Runner = Callable[[Sequence[str]], None]


@runtime_checkable
class PowerDriver(Protocol):
    """Switches one board's power."""

    def on(self) -> None:
        """Switch the board's supply on."""

    def off(self) -> None:
        """Switch the board's supply off."""

    def cycle(self, off_seconds: float = 1.0) -> None:
        """Switch off, wait ``off_seconds`` (capacitors drain), switch on."""


class PowerState(Protocol):
    """A power driver that can also read back the switch state."""

    def state(self) -> bool | None:
        """True (on), False (off) or None (unknown)."""


def run_command(argv: Sequence[str]) -> None:
    """Run a power-switch command; a failure becomes an InfrastructureError with its output."""
    tool = argv[0]
    if shutil.which(tool) is None and "/" not in tool:
        raise InfrastructureError(
            f"the power-switch tool {tool!r} is not installed",
            where=" ".join(argv),
            hint=f"install {tool} on the rig host, or set the full path in the rack file",
        )
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InfrastructureError(
            f"power command failed to run: {exc}",
            where=" ".join(argv),
            hint="run the command by hand on the rig host to see what is wrong",
        ) from exc
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()[-500:]
        raise InfrastructureError(
            f"power command exited with {result.returncode}: {output or 'no output'}",
            where=" ".join(argv),
            hint="run it by hand; uhubctl usually needs root or a udev rule for the hub, "
            "gpioset needs access to /dev/gpiochipN",
        )


class _CycleMixin:
    def on(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def off(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def cycle(self, off_seconds: float = 1.0) -> None:
        self.off()
        time.sleep(off_seconds)
        self.on()


@dataclass(frozen=True)
class UhubctlPower(_CycleMixin):
    """Per-port power switching of a USB hub through uhubctl.

    Rack file::

        power: {driver: uhubctl, hub: "1-1", port: 2}

    Runs ``uhubctl -l HUB -p PORT -a on|off``. Only hubs with real per-port power switching
    work (uhubctl lists them); on others the board never loses power.
    """

    hub: str
    port: int
    uhubctl: str = "uhubctl"
    runner: Runner = field(default=run_command, repr=False, compare=False)

    def argv(self, action: str) -> list[str]:
        return [self.uhubctl, "-l", str(self.hub), "-p", str(self.port), "-a", action]

    def on(self) -> None:
        self.runner(self.argv("on"))

    def off(self) -> None:
        self.runner(self.argv("off"))


@dataclass(frozen=True)
class GpioPower(_CycleMixin):
    """A relay or load switch on a GPIO line, driven with libgpiod v2's ``gpioset``.

    Rack file::

        power: {driver: gpio, chip: gpiochip0, line: 17, active_low: false}

    Uses the libgpiod **v2** command line (``gpioset -c CHIP -t 0 LINE=VALUE``): ``-t 0`` sets
    the line and exits instead of holding it. libgpiod says the value after exit is not
    guaranteed; drivers that keep it (the Raspberry Pi's, most SoC controllers) work, ones that
    revert released lines (gpio-sim) do not. libgpiod v1 spelled this ``gpioset CHIP LINE=VALUE``
    and is not supported: the two command lines are not option-compatible. ``active_low`` inverts
    the value for switches that cut power when the line is high.
    """

    chip: str
    line: int | str
    active_low: bool = False
    gpioset: str = "gpioset"
    runner: Runner = field(default=run_command, repr=False, compare=False)

    def argv(self, on: bool) -> list[str]:
        value = int(on) ^ int(self.active_low)
        return [self.gpioset, "-c", str(self.chip), "-t", "0", f"{self.line}={value}"]

    def on(self) -> None:
        self.runner(self.argv(True))

    def off(self) -> None:
        self.runner(self.argv(False))


@dataclass(frozen=True)
class HttpPower(_CycleMixin):
    """A network power switch or smart plug driven by plain HTTP GETs (Tasmota, Shelly, ...).

    Rack file::

        power:
          driver: http
          on_url: "http://plug-3.lab/cm?cmnd=Power%20On"
          off_url: "http://plug-3.lab/cm?cmnd=Power%20Off"
          status_url: "http://plug-3.lab/cm?cmnd=Power"   # optional

    Any 2xx answer counts as done. ``state()`` reads ``status_url`` and looks for ON / OFF (or
    true / false, 1 / 0) in the body, case-insensitively; anything else is unknown (None).
    """

    on_url: str
    off_url: str
    status_url: str | None = None
    timeout: float = 5.0

    def _get(self, url: str) -> str:
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as response:  # noqa: S310
                body: bytes = response.read(65536)
                return body.decode("utf-8", errors="replace")
        except urllib.error.HTTPError as exc:
            raise InfrastructureError(
                f"the power switch answered HTTP {exc.code} {exc.reason}",
                where=url,
                hint="check the URL in the rack file against the plug's API documentation",
            ) from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise InfrastructureError(
                f"cannot reach the power switch: {reason}",
                where=url,
                hint="check that the plug is on the network and its address is right",
            ) from exc

    def on(self) -> None:
        self._get(self.on_url)

    def off(self) -> None:
        self._get(self.off_url)

    def state(self) -> bool | None:
        if self.status_url is None:
            return None
        body = self._get(self.status_url).lower()
        on_words = ('"on"', ":on", "=on", "true", '"power":1', ">on<")
        off_words = ('"off"', ":off", "=off", "false", '"power":0', ">off<")
        compact = body.replace(" ", "")
        if compact in ("on", "1"):
            return True
        if compact in ("off", "0"):
            return False
        is_on = any(w in compact for w in on_words)
        is_off = any(w in compact for w in off_words)
        if is_on != is_off:
            return is_on
        return None


class VirtualControl(Protocol):
    """The part of the virtual rack control client power needs (virtual.ControlClient)."""

    def power(self, board: str, on: bool) -> None:
        """Switch a virtual board's power."""


@dataclass(frozen=True)
class VirtualPower(_CycleMixin):
    """Power of a virtual rack board, through the rack's control endpoint.

    Rack file::

        power: virtual

    The farm (board wiring) passes the ControlClient of the running daemon and the board id.
    """

    control: VirtualControl
    board: str

    def on(self) -> None:
        self.control.power(self.board, True)

    def off(self) -> None:
        self.control.power(self.board, False)

    def cycle(self, off_seconds: float = 0.05) -> None:
        # A virtual board has no capacitors to drain: a short gap is enough and keeps tests fast.
        self.off()
        time.sleep(off_seconds)
        self.on()


@dataclass(frozen=True)
class NoPower:
    """A board without power control.

    Rack file::

        power: none

    ``on()`` is a no-op (the board is assumed to be powered). ``off()`` and ``cycle()`` raise
    UsageError rather than pretend: a health check that "power-cycled" a board that never lost
    power would report it healthy on false grounds. Callers that can live without a cycle catch
    UsageError and fall back to a reset.
    """

    board: str = "board"

    def on(self) -> None:
        return None

    def off(self) -> None:
        self._refuse("switch off")

    def cycle(self, off_seconds: float = 1.0) -> None:
        self._refuse("power-cycle")

    def state(self) -> bool | None:
        return None

    def _refuse(self, action: str) -> None:
        raise UsageError(
            f"cannot {action}: the board has no power control (power: none)",
            where=self.board,
            hint="configure a power driver for it in the rack file (uhubctl, gpio, http), "
            "or use a reset instead",
        )


def _build_uhubctl(params: Mapping[str, Any]) -> PowerDriver:
    return UhubctlPower(
        hub=str(params["hub"]),
        port=int(params["port"]),
        uhubctl=str(params.get("uhubctl", "uhubctl")),
        **({"runner": params["runner"]} if "runner" in params else {}),
    )


def _build_gpio(params: Mapping[str, Any]) -> PowerDriver:
    return GpioPower(
        chip=str(params["chip"]),
        line=params["line"],
        active_low=bool(params.get("active_low", False)),
        gpioset=str(params.get("gpioset", "gpioset")),
        **({"runner": params["runner"]} if "runner" in params else {}),
    )


def _build_http(params: Mapping[str, Any]) -> PowerDriver:
    return HttpPower(
        on_url=str(params["on_url"]),
        off_url=str(params["off_url"]),
        status_url=params.get("status_url"),
        timeout=float(params.get("timeout", 5.0)),
    )


def _build_virtual(params: Mapping[str, Any]) -> PowerDriver:
    from pytest_hilfarm.drivers.virtual import control_client

    return VirtualPower(control=control_client(params["control"]), board=str(params["board"]))


def _build_none(params: Mapping[str, Any]) -> PowerDriver:
    return NoPower(board=str(params.get("board", "board")))


@dataclass(frozen=True)
class DriverSpec:
    """How to build one backend: its factory and the parameter names it takes."""

    build: Callable[[Mapping[str, Any]], Any]
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()


POWER_DRIVERS: Mapping[str, DriverSpec] = {
    "uhubctl": DriverSpec(_build_uhubctl, ("hub", "port"), ("uhubctl", "runner", "board")),
    "gpio": DriverSpec(
        _build_gpio, ("chip", "line"), ("active_low", "gpioset", "runner", "board")
    ),
    "http": DriverSpec(_build_http, ("on_url", "off_url"), ("status_url", "timeout", "board")),
    "virtual": DriverSpec(_build_virtual, ("control", "board")),
    "none": DriverSpec(_build_none, (), ("board",)),
}


def build_driver(
    kind: str, registry: Mapping[str, DriverSpec], name: str, params: Mapping[str, Any]
) -> Any:
    """Validate ``params`` against the named backend's spec and build it (shared with reset)."""
    board = f" of board {params['board']}" if "board" in params else ""
    where = f"{kind} driver {name!r}{board}"
    spec = registry.get(name)
    if spec is None:
        raise ConfigError(
            f"unknown {kind} driver {name!r}",
            where=where,
            hint=f"use one of: {', '.join(sorted(registry))}",
        )
    missing = [key for key in spec.required if key not in params]
    unknown = [key for key in params if key not in spec.required + spec.optional]
    if missing:
        raise ConfigError(
            f"missing parameter(s) {', '.join(missing)}",
            where=where,
            hint=f"{name} takes {', '.join(spec.required + spec.optional) or 'no parameters'}",
        )
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {', '.join(unknown)}",
            where=where,
            hint=f"{name} takes {', '.join(spec.required + spec.optional) or 'no parameters'}",
        )
    try:
        return spec.build(params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"bad parameter value: {exc}",
            where=where,
            hint=f"check the types: {name} takes {', '.join(spec.required + spec.optional)}",
        ) from exc


def make_power(driver_name: str, params: Mapping[str, Any] | None = None) -> PowerDriver:
    """Build the power driver called ``driver_name`` from plain parameters."""
    driver: PowerDriver = build_driver("power", POWER_DRIVERS, driver_name, dict(params or {}))
    return driver
