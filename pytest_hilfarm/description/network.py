"""Network conditions as a rack file and a test describe them: conditions, outages, profiles.

:class:`Conditions` (loss, delay, jitter, rate, outages), :class:`NetworkProfile` (named, may
extend another), the built-in :data:`BUILTIN_PROFILES` merged with a rack file's
``network_profiles:`` section (its YAML read by the rack loader's
:func:`~pytest_hilfarm.description.rack.rack_section`, checked here with file and line), and the
parsers for the values a marker or a profile gives ("1%", "50ms", "1mbit"). It describes only:
applying conditions to an interface is :mod:`pytest_hilfarm.drivers.netem`'s job.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from yaml.constructor import SafeConstructor

from pytest_hilfarm.description.rack import rack_section
from pytest_hilfarm.errors import ConfigError


def _check_conditions(c: Conditions, where: str) -> None:
    def bad(what: str, hint: str) -> ConfigError:
        return ConfigError(what, where=where, hint=hint)

    if not (isinstance(c.loss, (int, float)) and 0.0 <= c.loss <= 1.0):
        raise bad(f"loss {c.loss!r} is not a fraction within 0..1",
                  "write loss as a fraction (0.02) or a percentage string ('2%')")
    for name in ("delay_ms", "jitter_ms"):
        value = getattr(c, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 60_000):
            raise bad(f"{name} {value!r} is not a number of milliseconds within 0..60000",
                      "write e.g. 300 or '300ms' or '0.3s'")
    if c.jitter_ms > 0 and c.delay_ms == 0:
        raise bad("jitter without delay", "give a delay as well (netem needs delay for jitter)")
    if c.rate_kbit is not None and not (isinstance(c.rate_kbit, int) and c.rate_kbit >= 8):
        raise bad(f"rate {c.rate_kbit!r} is not a bandwidth of at least 8 kbit/s",
                  "write e.g. 1000 (kbit/s) or '1mbit' or '256kbit'")


@dataclass(frozen=True)
class Outage:
    """A cut of ``duration_s`` starting ``start_s`` after the conditions were applied."""

    start_s: float
    duration_s: float


@dataclass(frozen=True)
class Conditions:
    """Steady impairment of a link.

    ``loss`` is a fraction (0.02 = 2 %) of packets dropped; ``delay_ms`` is the round-trip time
    *added* (netem applies it on the rig's egress only, so a ping's RTT grows by exactly this);
    ``jitter_ms`` the spread of that delay; ``rate_kbit`` a bandwidth cap (None = none).
    """

    loss: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    rate_kbit: int | None = None

    def __post_init__(self) -> None:
        _check_conditions(self, "conditions")

    @property
    def is_clear(self) -> bool:
        return (self.loss == 0 and self.delay_ms == 0 and self.jitter_ms == 0
                and self.rate_kbit is None)

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "delay_ms": self.delay_ms, "jitter_ms": self.jitter_ms,
                "rate_kbit": self.rate_kbit}


CLEAR = Conditions()
# An outage is total loss: the link stays up, every packet vanishes (see NetemController.outage).
OUTAGE = Conditions(loss=1.0)


@dataclass(frozen=True)
class NetworkProfile:
    """A named set of conditions plus a schedule of outages relative to when it is applied.

    ``address_change`` means each outage ends with the device's network address changing
    (carrier switch): flows open before the outage do not survive it.
    """

    name: str
    conditions: Conditions = CLEAR
    outages: tuple[Outage, ...] = ()
    address_change: bool = False
    description: str = ""
    source: str = "built-in"


BUILTIN_PROFILES: Mapping[str, NetworkProfile] = MappingProxyType({
    p.name: p for p in (
        NetworkProfile("lan", CLEAR, description="no impairment (the rig's own LAN)"),
        # Busy 2.4 GHz Wi-Fi: tens of ms with a wide spread and a little loss.
        NetworkProfile("wifi-congested", Conditions(loss=0.01, delay_ms=40, jitter_ms=20,
                                                    rate_kbit=5000),
                       description="busy 2.4 GHz Wi-Fi"),
        # Issue 9: "cellular (about 300 ms RTT, 2% loss)"; a modest LTE-M/NB-IoT-like uplink.
        NetworkProfile("cellular", Conditions(loss=0.02, delay_ms=300, jitter_ms=30,
                                              rate_kbit=1000),
                       description="cellular IoT link: ~300 ms RTT, 2 % loss"),
        NetworkProfile("lossy-5pct", Conditions(loss=0.05), description="5 % packet loss"),
        NetworkProfile("rtt-500ms", Conditions(delay_ms=500), description="500 ms added RTT"),
        NetworkProfile("outage-30s", CLEAR, outages=(Outage(5.0, 30.0),),
                       description="a 30 s cut starting 5 s after the conditions apply"),
        NetworkProfile("carrier-switch", Conditions(delay_ms=80, jitter_ms=10),
                       outages=(Outage(5.0, 3.0),), address_change=True,
                       description="3 s gap at 5 s, then a new address (flows are cut)"),
    )
})


_UNIT_RE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z%]*)\s*")
_TIME_UNITS = {"": 1.0, "ms": 1.0, "s": 1000.0, "us": 0.001}
_RATE_UNITS = {"": 1.0, "kbit": 1.0, "mbit": 1000.0, "gbit": 1_000_000.0, "bit": 0.001,
               "kbps": 8.0, "mbps": 8000.0}


def _number_with_unit(raw: object, units: Mapping[str, float], what: str, where: str,
                      hint: str) -> float:
    if isinstance(raw, bool):
        raise ConfigError(f"{what} {raw!r} is a boolean, not a number", where=where, hint=hint)
    if isinstance(raw, (int, float)):
        return float(raw)
    if isinstance(raw, str):
        m = _UNIT_RE.fullmatch(raw)
        if m and m.group(2).lower() in units:
            return float(m.group(1)) * units[m.group(2).lower()]
    raise ConfigError(f"{what} {raw!r} is not understood", where=where, hint=hint)


def parse_loss(raw: object, where: str) -> float:
    """0.02 or '2%' -> 0.02."""
    hint = "write loss as a fraction (0.02) or a percentage string ('2%')"
    if isinstance(raw, str) and raw.strip().endswith("%"):
        return _number_with_unit(raw.strip()[:-1], {"": 1.0}, "loss", where, hint) / 100.0
    value = _number_with_unit(raw, {"": 1.0}, "loss", where, hint)
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"loss {raw!r} is not a fraction within 0..1", where=where,
                          hint=hint + "; 5 % is 0.05")
    return value


def parse_ms(raw: object, what: str, where: str) -> float:
    """300, '300ms' or '0.3s' -> 300.0 (milliseconds)."""
    return _number_with_unit(raw, _TIME_UNITS, what, where,
                             f"write {what} in milliseconds (300) or with a unit ('300ms', '0.3s')")


def parse_rate(raw: object, where: str) -> int | None:
    """1000, '1mbit' or '256kbit' -> kbit/s; None stays None (no cap)."""
    if raw is None:
        return None
    kbit = _number_with_unit(raw, _RATE_UNITS, "rate", where,
                             "write rate in kbit/s (1000) or with a unit ('1mbit', '256kbit')")
    return int(round(kbit))


def parse_outages(raw: object, where: str) -> tuple[Outage, ...]:
    """A number (a cut of that many seconds, 5 s after apply), {at, duration}, or a list of them."""
    hint = "write outage: 30, or outage: {at: 5, duration: 30}, or a list of such mappings"
    items = raw if isinstance(raw, list) else [raw]
    out: list[Outage] = []
    for item in items:
        if isinstance(item, Mapping):
            unknown = set(item) - {"at", "duration"}
            if unknown or "duration" not in item:
                raise ConfigError(f"outage {dict(item)!r} needs 'duration' (and optional 'at')",
                                  where=where, hint=hint)
            start = _seconds(item.get("at", 5.0), where, hint)
            duration = _seconds(item["duration"], where, hint)
        else:
            start, duration = 5.0, _seconds(item, where, hint)
        if duration <= 0:
            raise ConfigError(f"outage duration {duration!r} s must be > 0", where=where, hint=hint)
        out.append(Outage(start, duration))
    return tuple(sorted(out, key=lambda o: o.start_s))


def _seconds(raw: object, where: str, hint: str) -> float:
    value = _number_with_unit(raw, {"": 1.0, "s": 1.0, "ms": 0.001, "min": 60.0}, "time",
                              where, hint)
    if not (math.isfinite(value) and 0 <= value <= 3600):
        raise ConfigError(f"time {raw!r} is not within 0..3600 s", where=where, hint=hint)
    return value


_PROFILE_KEYS = ("extends", "description", "loss", "delay", "jitter", "rate", "outage",
                 "address_change")


def profile_from_mapping(name: str, data: Mapping[str, object], base: NetworkProfile | None,
                         where: str) -> NetworkProfile:
    """Build a profile from rack-file style keys, starting from ``base`` (or no impairment)."""
    unknown = sorted(set(data) - set(_PROFILE_KEYS))
    if unknown:
        raise ConfigError(f"profile {name!r} has unknown keys {unknown}", where=where,
                          hint=f"allowed keys: {', '.join(_PROFILE_KEYS)}")
    start = base or NetworkProfile(name)
    cond = start.conditions
    kw: dict[str, Any] = {}
    if "loss" in data:
        kw["loss"] = parse_loss(data["loss"], where)
    if "delay" in data:
        kw["delay_ms"] = parse_ms(data["delay"], "delay", where)
    if "jitter" in data:
        kw["jitter_ms"] = parse_ms(data["jitter"], "jitter", where)
    if "rate" in data:
        kw["rate_kbit"] = parse_rate(data["rate"], where)
    conditions = _conditions(replace_fields=kw, base=cond, where=where)
    outages = parse_outages(data["outage"], where) if data.get("outage") is not None else (
        () if "outage" in data else start.outages)
    address_change = data.get("address_change", start.address_change)
    if not isinstance(address_change, bool):
        raise ConfigError(f"address_change {address_change!r} is not true/false", where=where,
                          hint="write address_change: true")
    return NetworkProfile(name, conditions, outages, address_change,
                          str(data.get("description", start.description)), where)


def _conditions(replace_fields: Mapping[str, Any], base: Conditions, where: str) -> Conditions:
    try:
        return replace(base, **replace_fields)
    except ConfigError as exc:
        raise ConfigError(exc.what, where=where, hint=exc.hint) from None


def load_profiles(rack_file: str | os.PathLike[str] | None) -> Mapping[str, NetworkProfile]:
    """Built-in profiles merged with the rack file's ``network_profiles:`` (by name; a rack
    profile of a built-in name replaces it, ``extends:`` starts from another profile).
    """
    profiles = dict(BUILTIN_PROFILES)
    if rack_file is None:
        return MappingProxyType(profiles)
    path = Path(rack_file)
    node = rack_section(path, "network_profiles")
    section = SafeConstructor().construct_object(node, deep=True) if node is not None else None
    if node is None or section is None:
        return MappingProxyType(profiles)
    lines = _key_lines(node)
    if not isinstance(section, dict):
        raise ConfigError("network_profiles must be a mapping of profile name to settings",
                          where=f"{path}:{lines.get('', 1)}",
                          hint="e.g. network_profiles: {sat: {delay: 600ms, loss: 1%}}")
    for name, body in section.items():
        where = f"{path}:{lines.get(str(name), 1)} network_profiles.{name}"
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise ConfigError(f"profile name {name!r} is not a plain name", where=where,
                              hint="use letters, digits, '.', '_' and '-'")
        body = body or {}
        if not isinstance(body, dict):
            raise ConfigError(f"profile {name!r} must be a mapping", where=where,
                              hint="e.g. {delay: 300ms, loss: 2%}")
        base_name = body.get("extends", name if name in profiles else None)
        if base_name is not None and base_name not in profiles:
            raise ConfigError(f"profile {name!r} extends unknown profile {base_name!r}",
                              where=where, hint=f"known: {', '.join(sorted(profiles))}")
        base = profiles[base_name] if base_name is not None else None
        profiles[name] = profile_from_mapping(name, body, base, where)
    return MappingProxyType(profiles)


def _key_lines(section: yaml.Node) -> dict[str, int]:
    """Line numbers (1-based) of the section and of each key in it, for error messages."""
    out = {"": section.start_mark.line + 1}
    if isinstance(section, yaml.MappingNode):
        for sub, _ in section.value:
            out[str(sub.value)] = sub.start_mark.line + 1
    return out
