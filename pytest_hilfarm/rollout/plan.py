"""Rollout plan: YAML -> frozen records, with errors that name the key and the line.

A plan lists the artifact, the rings (cumulative share of the production fleet, a minimum
device count and a soak time), the targeting and the gates. Each rate gate says which definition
it uses (``per``): ``device`` (the original per-device share, judged when the soak ends) or an
exposure definition judged at every ingest (``device_hour``, ``attempt``). This module only
describes; it decides nothing and touches no store. Defaults live here, once.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from pytest_hilfarm.errors import ConfigError

from .manifest import Manifest, load_manifest

# Default ring ladder from the issue: canary 1% -> 5% -> 25% -> 100%, one day of soak each.
DEFAULT_RINGS: tuple[tuple[str, float], ...] = (
    ("canary", 1.0), ("early", 5.0), ("broad", 25.0), ("fleet", 100.0),
)
DEFAULT_SOAK_HOURS = 24.0
DEFAULT_MIN_DEVICES = 100
_ACTIONS = ("pause", "rollback")
# Rate definitions a gate can use. "device" is the original one (share of devices, Wilson bound,
# judged at soak end); the others are sequential and judged at every telemetry ingest.
PER_DEVICE, PER_DEVICE_HOUR, PER_ATTEMPT = "device", "device_hour", "attempt"
SEQUENTIAL = frozenset({PER_DEVICE_HOUR, PER_ATTEMPT})
# Without `detect`, an exposure gate promises to catch a rate this many times its limit.
DEFAULT_DETECT_FACTOR = 5.0


@dataclass(frozen=True)
class RateGate:
    """A rate judged by a confidence bound: ``limit`` is a maximum (bad events) or a minimum.

    ``per`` is the rate definition; ``detect`` (exposure gates only) is the rate the gate
    promises to catch: a release at least that bad is promoted with probability <= 1 - power.
    For a minimum (connectivity) both are connectivity levels, e.g. limit 0.9, detect 0.8.
    """

    limit: float
    on_fail: str  # "pause" or "rollback"
    per: str = PER_DEVICE
    detect: float | None = None

    @property
    def sequential(self) -> bool:
        return self.per in SEQUENTIAL


@dataclass(frozen=True)
class Gates:
    """Gate thresholds. Defaults come from issue 6 section 1; every one can be overridden."""

    confidence: float = 0.95
    # Sequential gates: a release at the `detect` rate is promoted with probability <= 1 - power.
    power: float = 0.95
    crash_rate: RateGate = RateGate(0.001, "rollback")
    connectivity: RateGate = RateGate(0.995, "pause")
    # A device counts as connected when its connected ratio reaches this; below it the device is
    # one failure in the connectivity rate (a per-device trial keeps the Wilson bound honest).
    connectivity_device_min_ratio: float = 0.9
    battery_max_increase: float = 0.10
    battery_on_fail: str = "pause"
    # `battery_drain: false` turns the gate off: a ring of ten devices cannot resolve a 10 %
    # drain change (device-to-device spread is about that large), so it would only stall.
    battery_enabled: bool = True
    boot_failures: RateGate = RateGate(0.005, "rollback")
    hil_required: bool = True
    hil_allow_skipped: bool = True
    staging_soak_hours: float = 24.0
    # How many extra soak periods an inconclusive ring may take before the controller pauses for
    # a person: evidence that never arrives should not block silently forever.
    max_soak_extensions: int = 2

    def rate_gates(self) -> tuple[tuple[str, RateGate], ...]:
        return (("crash_rate", self.crash_rate), ("connectivity", self.connectivity),
                ("boot_failures", self.boot_failures))

    @property
    def sequential(self) -> bool:
        return any(g.sequential for _, g in self.rate_gates())

    @property
    def legacy(self) -> bool:
        """Any gate judged once, when the soak ends (per-device shares, battery)."""
        return any(not g.sequential for _, g in self.rate_gates())


@dataclass(frozen=True)
class Ring:
    """One stage. Production rings hold a cumulative share of the targeted fleet; a non-production
    (staging) ring holds a fixed number of in-house devices outside those percentages.
    """

    name: str
    percent: float | None
    devices: int | None
    min_devices: int
    soak_hours: float
    production: bool
    gates: Gates
    # "evidence": exposure gates must rule out their `detect` rate before the ring grows;
    # "soak": they must only not alarm by the end of the minimum soak (a small ring that cannot
    # gather that much exposure; the risk it takes is stated by `hilfarm advise`).
    promote: str = "evidence"


STRATA_DIMENSIONS = ("hardware_revision", "region", "connectivity_type")


@dataclass(frozen=True)
class Targeting:
    """Which devices the release is for. Named hardware revisions, regions and connectivity
    types are also the strata: staging and canary must cover each with ``min_per_stratum``
    devices (0: not checked), and sequential gates also run per stratum.
    """

    device_group: str | None = None
    hardware_revisions: tuple[str, ...] = ()
    regions: tuple[str, ...] = ()
    connectivity_types: tuple[str, ...] = ()
    min_per_stratum: int = 0

    def strata(self) -> tuple[tuple[str, str], ...]:
        """(dimension, value) of every named stratum."""
        return tuple((dim, v) for dim, values in zip(
            STRATA_DIMENSIONS, (self.hardware_revisions, self.regions, self.connectivity_types))
            for v in values)


@dataclass(frozen=True)
class Plan:
    name: str
    rings: tuple[Ring, ...]
    gates: Gates
    targeting: Targeting
    manifest_path: Path | None
    previous_version: str | None
    source: str
    digest: str  # of the plan text: a re-run `start` with an edited plan is refused, not merged
    exporters: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def production_rings(self) -> tuple[Ring, ...]:
        return tuple(r for r in self.rings if r.production)

    def load_manifest(self) -> Manifest:
        if self.manifest_path is None:
            raise ConfigError("the plan names no artifact manifest",
                              where=f"{self.source}: artifact",
                              hint="set artifact.manifest or pass --manifest")
        return load_manifest(self.manifest_path)


class _Marks:
    """Line numbers of every key path, so an error can say `plan.yaml:14: rings[1].percent`."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: dict[tuple[Any, ...], int] = {}

    def at(self, path: tuple[Any, ...]) -> str:
        probe = path
        while probe and probe not in self.lines:
            probe = probe[:-1]
        line = self.lines.get(probe, 1)
        return f"{self.source}:{line}: {_dotted(path)}" if path else f"{self.source}:{line}"


def _dotted(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _to_python(node: yaml.Node, path: tuple[Any, ...], marks: _Marks) -> Any:
    marks.lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = yaml.safe_load(yaml.serialize(key_node))
            if not isinstance(key, str):
                raise ConfigError(f"key {key!r} must be a string",
                                  where=f"{marks.source}:{key_node.start_mark.line + 1}")
            if key in out:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"duplicate key {key!r}",
                                  where=f"{marks.source}:{line}: {_dotted((*path, key))}",
                                  hint="each key may appear once")
            out[key] = _to_python(value_node, (*path, key), marks)
            marks.lines[(*path, key)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(n, (*path, i), marks) for i, n in enumerate(node.value)]
    return yaml.safe_load(yaml.serialize(node))


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_HOURS = MappingProxyType({"s": 1 / 3600, "m": 1 / 60, "h": 1.0, "d": 24.0, "": 1.0})


def parse_hours(value: Any, where: str) -> float:
    """``24h``, ``90m``, ``2d`` or a bare number of hours -> hours."""
    if isinstance(value, bool):
        raise ConfigError(f"{value!r} is not a duration", where=where, hint="write e.g. 24h or 90m")
    if isinstance(value, (int, float)):
        hours = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ConfigError(f"{value!r} is not a duration", where=where,
                              hint="write a number with s, m, h or d, e.g. 24h")
        hours = float(m.group(1)) * _UNIT_HOURS[m.group(2)]
    if hours < 0:
        raise ConfigError(f"duration {value!r} is negative", where=where)
    return hours


class _Reader:
    """Typed access to one mapping of the plan, rejecting unknown keys (typos fail loudly)."""

    def __init__(self, data: Any, path: tuple[Any, ...], marks: _Marks, allowed: tuple[str, ...]):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError("must be a mapping", where=marks.at(path))
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r}", where=marks.at((*path, unknown[0])),
                              hint=f"allowed here: {', '.join(allowed)}")
        self.data, self.path, self.marks = data, path, marks

    def where(self, key: str) -> str:
        return self.marks.at((*self.path, key))

    def has(self, key: str) -> bool:
        return key in self.data

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        if key not in self.data:
            return default
        v = self.data[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise ConfigError(f"{v!r} must be a number in {lo}..{hi}", where=self.where(key))
        return float(v)

    def integer(self, key: str, default: int, lo: int) -> int:
        if key not in self.data:
            return default
        v = self.data[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"{v!r} must be an integer >= {lo}", where=self.where(key))
        return v

    def boolean(self, key: str, default: bool) -> bool:
        if key not in self.data:
            return default
        v = self.data[key]
        if not isinstance(v, bool):
            raise ConfigError(f"{v!r} must be true or false", where=self.where(key))
        return v

    def text(self, key: str, default: str | None) -> str | None:
        if key not in self.data:
            return default
        v = self.data[key]
        if not isinstance(v, (str, int, float)) or isinstance(v, bool) or str(v) == "":
            raise ConfigError(f"{v!r} must be a non-empty string", where=self.where(key))
        return str(v)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        v = self.text(key, default)
        if v not in choices:
            raise ConfigError(f"{v!r} is not one of {', '.join(choices)}", where=self.where(key))
        return v

    def strings(self, key: str) -> tuple[str, ...]:
        if key not in self.data:
            return ()
        v = self.data[key]
        if isinstance(v, str):
            return (v,)
        if not isinstance(v, list) or not all(isinstance(x, (str, int)) for x in v):
            raise ConfigError(f"{v!r} must be a list of strings", where=self.where(key))
        return tuple(str(x) for x in v)

    def sub(self, key: str, allowed: tuple[str, ...]) -> _Reader:
        return _Reader(self.data.get(key), (*self.path, key), self.marks, allowed)


_RATE_KEYS = ("max", "on_fail", "per", "detect")


def default_detect(gate: str, limit: float) -> float:
    """The rate an exposure gate catches when the plan names none: 5x the limit (crash), or a
    disconnected share 2x the allowed one (connectivity: min 0.9 -> 0.8).
    """
    if gate == "connectivity":
        return max(0.0, 1.0 - 2.0 * (1.0 - limit))
    return limit * DEFAULT_DETECT_FACTOR if limit > 0 else 0.001


def _rate_gate(c: _Reader, gate: str, base: RateGate, bound: str, pers: tuple[str, ...]
               ) -> RateGate:
    limit = c.number(bound, base.limit, 0.0, 1.0)
    per = c.choice("per", base.per, pers)
    detect = None
    if c.has("detect"):
        if per != PER_DEVICE_HOUR:
            raise ConfigError(f"detect applies to per: {PER_DEVICE_HOUR} gates, not per: {per}",
                              where=c.where("detect"),
                              hint="per-device gates are judged by a Wilson bound at soak end; "
                                   "per-attempt gates only alarm")
        detect = c.number("detect", 0.0, 0.0, 1.0)
    elif per == PER_DEVICE_HOUR:
        # A new limit without a new detect gets the default for that limit.
        keep = base.per == per and base.detect is not None and not c.has(bound)
        detect = base.detect if keep else default_detect(gate, limit)
    if detect is not None and (detect <= limit if bound == "max" else detect >= limit):
        worse = "above the max" if bound == "max" else "below the min"
        raise ConfigError(f"detect {detect:g} must be {worse} {limit:g}: it is the bad rate the "
                          "gate promises to catch", where=c.where("detect" if c.has("detect")
                                                                  else bound))
    return RateGate(limit, c.choice("on_fail", base.on_fail, _ACTIONS), per, detect)


def _parse_gates(r: _Reader, base: Gates) -> Gates:
    g = base
    g = replace(g, confidence=r.number("confidence", g.confidence, 0.5, 0.9999))
    g = replace(g, power=r.number("power", g.power, 0.5, 0.9999))
    g = replace(g, max_soak_extensions=r.integer("max_soak_extensions", g.max_soak_extensions, 0))
    if r.has("crash_rate"):
        c = r.sub("crash_rate", _RATE_KEYS)
        g = replace(g, crash_rate=_rate_gate(c, "crash_rate", g.crash_rate, "max",
                                             (PER_DEVICE, PER_DEVICE_HOUR)))
    if r.has("connectivity"):
        c = r.sub("connectivity", ("min", "on_fail", "device_min_ratio", "per", "detect"))
        g = replace(g, connectivity=_rate_gate(c, "connectivity", g.connectivity, "min",
                                               (PER_DEVICE, PER_DEVICE_HOUR)),
                    connectivity_device_min_ratio=c.number(
                        "device_min_ratio", g.connectivity_device_min_ratio, 0.0, 1.0))
    if r.has("battery_drain") and r.data["battery_drain"] is False:
        g = replace(g, battery_enabled=False)
    elif r.has("battery_drain"):
        c = r.sub("battery_drain", ("max_increase", "on_fail"))
        g = replace(g, battery_max_increase=c.number("max_increase", g.battery_max_increase, 0, 10),
                    battery_on_fail=c.choice("on_fail", g.battery_on_fail, _ACTIONS),
                    battery_enabled=True)
    if r.has("boot_failures"):
        c = r.sub("boot_failures", _RATE_KEYS)
        g = replace(g, boot_failures=_rate_gate(c, "boot_failures", g.boot_failures, "max",
                                                (PER_DEVICE, PER_ATTEMPT)))
    if r.has("hil"):
        c = r.sub("hil", ("required", "allow_skipped"))
        g = replace(g, hil_required=c.boolean("required", g.hil_required),
                    hil_allow_skipped=c.boolean("allow_skipped", g.hil_allow_skipped))
    if r.has("staging_soak"):
        c = r.sub("staging_soak", ("min",))
        g = replace(g, staging_soak_hours=parse_hours(c.data.get("min", g.staging_soak_hours),
                                                      c.where("min")))
    return g


_GATE_KEYS = ("confidence", "power", "crash_rate", "connectivity", "battery_drain",
              "boot_failures", "hil", "staging_soak", "max_soak_extensions")
_RING_KEYS = ("name", "percent", "devices", "min_devices", "soak", "production", "gates",
              "promote")
PROMOTE = ("evidence", "soak")


def _parse_rings(raw: Any, marks: _Marks, gates: Gates) -> tuple[Ring, ...]:
    if raw is None:
        return tuple(Ring(n, p, None, DEFAULT_MIN_DEVICES, DEFAULT_SOAK_HOURS, True, gates)
                     for n, p in DEFAULT_RINGS)
    if not isinstance(raw, list) or not raw:
        raise ConfigError("rings must be a non-empty list", where=marks.at(("rings",)))
    rings: list[Ring] = []
    last_percent = 0.0
    names: set[str] = set()
    for i, item in enumerate(raw):
        r = _Reader(item, ("rings", i), marks, _RING_KEYS)
        name = r.text("name", None)
        if name is None:
            raise ConfigError("ring has no name", where=marks.at(("rings", i)),
                              hint="give each ring a unique name, e.g. canary")
        if name in names:
            raise ConfigError(f"ring name {name!r} is used twice", where=r.where("name"))
        names.add(name)
        production = r.boolean("production", True)
        percent = r.number("percent", -1, 0.0001, 100.0) if r.has("percent") else None
        devices = r.integer("devices", 0, 1) if r.has("devices") else None
        if production:
            if percent is None or devices is not None:
                raise ConfigError("a production ring takes `percent` (cumulative share of the "
                                  "fleet), not `devices`", where=marks.at(("rings", i)),
                                  hint="use production: false for a fixed staging group")
            if percent <= last_percent:
                raise ConfigError(f"percent {percent:g} must grow past the previous ring's "
                                  f"{last_percent:g} (percentages are cumulative)",
                                  where=r.where("percent"))
            last_percent = percent
        else:
            if devices is None or percent is not None:
                raise ConfigError("a staging ring (production: false) takes `devices`, a count of "
                                  "in-house devices", where=marks.at(("rings", i)))
            if any(x.production for x in rings):
                raise ConfigError("staging rings must come before production rings",
                                  where=marks.at(("rings", i)))
        soak = parse_hours(item.get("soak", DEFAULT_SOAK_HOURS), r.where("soak"))
        ring_gates = _parse_gates(r.sub("gates", _GATE_KEYS), gates) if r.has("gates") else gates
        rings.append(Ring(name, percent, devices, r.integer("min_devices", DEFAULT_MIN_DEVICES, 1),
                          soak, production, ring_gates, r.choice("promote", "evidence", PROMOTE)))
    prod = [x for x in rings if x.production]
    if not prod:
        raise ConfigError("a plan needs at least one production ring", where=marks.at(("rings",)))
    if prod[-1].percent != 100.0:
        raise ConfigError(f"the last production ring reaches {prod[-1].percent:g}%, not 100%",
                          where=marks.at(("rings", len(rings) - 1, "percent")),
                          hint="end the ladder at percent: 100 (or split the release)")
    return tuple(rings)


def parse_plan(text: str, source: str = "<plan>", base_dir: Path | None = None) -> Plan:
    """Parse plan text; ``source`` names it in errors, ``base_dir`` resolves the manifest path."""
    marks = _Marks(source)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise ConfigError(f"plan is not valid YAML: {getattr(exc, 'problem', exc)}",
                          where=where) from exc
    if node is None:
        raise ConfigError("plan is empty", where=source, hint="see docs/rollouts.md")
    data = _to_python(node, (), marks)
    top = _Reader(data, (), marks, ("version", "name", "artifact", "targeting", "rings", "gates",
                                    "exporters"))
    version = top.integer("version", 1, 1)
    if version != 1:
        raise ConfigError(f"plan version {version} is not supported", where=top.where("version"),
                          hint="this hilfarm reads version 1")
    name = top.text("name", None)
    if name is None or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", name):
        raise ConfigError(f"plan name {name!r} must be set and use letters, digits, . _ -",
                          where=top.where("name") if name else marks.at(()))
    art = top.sub("artifact", ("manifest", "previous_version"))
    manifest_text = art.text("manifest", None)
    manifest_path = None
    if manifest_text is not None:
        manifest_path = Path(manifest_text)
        if not manifest_path.is_absolute() and base_dir is not None:
            manifest_path = base_dir / manifest_path
    tg = top.sub("targeting", ("device_group", "hardware_revisions", "regions",
                               "connectivity_types", "min_per_stratum"))
    targeting = Targeting(tg.text("device_group", None), tg.strings("hardware_revisions"),
                          tg.strings("regions"), tg.strings("connectivity_types"),
                          tg.integer("min_per_stratum", 0, 0))
    gates = _parse_gates(top.sub("gates", _GATE_KEYS), Gates())
    rings = _parse_rings(data.get("rings") if isinstance(data, dict) else None, marks, gates)
    exporters = data.get("exporters") or {}
    if not isinstance(exporters, dict):
        raise ConfigError("exporters must be a mapping", where=top.where("exporters"))
    return Plan(name=name, rings=rings, gates=gates, targeting=targeting,
                manifest_path=manifest_path, previous_version=art.text("previous_version", None),
                source=source, digest=hashlib.sha256(text.encode()).hexdigest(),
                exporters=exporters)


def load_plan(path: str | Path) -> Plan:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read rollout plan: {exc.strerror}", where=str(p),
                          hint="pass --plan with a path to a plan YAML file") from exc
    return parse_plan(text, str(p), p.parent)
