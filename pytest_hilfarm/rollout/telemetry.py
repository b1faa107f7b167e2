"""Per-device fleet telemetry: JSON-lines or CSV files, or records built in Python.

Malformed lines are reported with their line numbers and skipped, never silently counted: a
gate fed half a file must be able to say so. Aggregation into :class:`RingEvidence` is pure and
one pass; it keeps one small entry per device on the candidate (to count distinct devices and
update attempts when a device reports several windows), nothing per line.
This module does not decide anything; :mod:`.gates` does.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_hilfarm.errors import ConfigError

from .gates import RingEvidence, StratumEvidence
from .plan import STRATA_DIMENSIONS

FIELDS = ("device_id", "firmware", "boots", "crashes", "connected_ratio", "battery_drain",
          "rollbacks", "boot_failures", "rolled_back_from", "hours", "hw_revision", "region",
          "connectivity_type")


@dataclass(frozen=True)
class DeviceTelemetry:
    """One device's report over the current window.

    ``battery_drain`` is in whatever unit the fleet reports (e.g. mAh/day); only ratios against
    the baseline firmware are used. ``rolled_back_from`` names the version a device abandoned
    after a failed boot, so the failure is charged to that version and not to the one it now runs.
    ``hours`` is the length of the window on that firmware (the exposure); ``hw_revision``,
    ``region`` and ``connectivity_type`` place the device in its strata.
    """

    device_id: str
    firmware: str
    boots: int = 0
    crashes: int = 0
    connected_ratio: float | None = None
    battery_drain: float | None = None
    rollbacks: int = 0
    boot_failures: int = 0
    rolled_back_from: str | None = None
    hours: float | None = None
    hw_revision: str | None = None
    region: str | None = None
    connectivity_type: str | None = None


@dataclass(frozen=True)
class LineProblem:
    source: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.what} (line skipped)"


@dataclass(frozen=True)
class TelemetryFile:
    records: tuple[DeviceTelemetry, ...]
    problems: tuple[LineProblem, ...]


def _int(row: dict[str, Any], key: str) -> int:
    v = row.get(key)
    if v is None or v == "":
        return 0
    if isinstance(v, bool):
        raise ValueError(f"{key} must be a count, not {v!r}")
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a count, not {v!r}") from None
    if n < 0:
        raise ValueError(f"{key} must not be negative ({n})")
    return n


def _float(row: dict[str, Any], key: str, lo: float, hi: float) -> float | None:
    v = row.get(key)
    if v is None or v == "":
        return None
    if isinstance(v, bool):
        raise ValueError(f"{key} must be a number, not {v!r}")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number, not {v!r}") from None
    if not math.isfinite(x) or not lo <= x <= hi:
        raise ValueError(f"{key} {x!r} outside {lo:g}..{hi:g}")
    return x


def record_from_dict(row: dict[str, Any]) -> DeviceTelemetry:
    """Validate one row (from JSON or CSV); raises ValueError saying which field is wrong."""
    unknown = sorted(k for k in row if k not in FIELDS and k not in ("ts", "ring"))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}")
    device_id = row.get("device_id")
    firmware = row.get("firmware")
    if not device_id or not isinstance(device_id, str):
        raise ValueError("device_id is missing")
    if not firmware or not isinstance(firmware, (str, int, float)):
        raise ValueError("firmware is missing")
    rolled = row.get("rolled_back_from") or None
    strata = {}
    for key in ("hw_revision", "region", "connectivity_type"):
        v = row.get(key)
        if v is not None and v != "" and not isinstance(v, (str, int)):
            raise ValueError(f"{key} must be a string, not {v!r}")
        strata[key] = None if v is None or v == "" else str(v)
    return DeviceTelemetry(
        device_id=device_id, firmware=str(firmware), boots=_int(row, "boots"),
        crashes=_int(row, "crashes"),
        connected_ratio=_float(row, "connected_ratio", 0.0, 1.0),
        battery_drain=_float(row, "battery_drain", 0.0, math.inf),
        rollbacks=_int(row, "rollbacks"), boot_failures=_int(row, "boot_failures"),
        rolled_back_from=None if rolled is None else str(rolled),
        hours=_float(row, "hours", 0.0, 24.0 * 366), **strata,
    )


def _jsonl_rows(lines: Iterable[str], source: str,
                problems: list[LineProblem]) -> Iterator[DeviceTelemetry]:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(LineProblem(source, lineno, f"not JSON ({exc.msg})"))
            continue
        if not isinstance(row, dict):
            problems.append(LineProblem(source, lineno, "not a JSON object"))
            continue
        try:
            yield record_from_dict(row)
        except ValueError as exc:
            problems.append(LineProblem(source, lineno, str(exc)))


def _csv_rows(lines: Iterable[str], source: str,
              problems: list[LineProblem]) -> Iterator[DeviceTelemetry]:
    reader = csv.DictReader(lines)
    header = reader.fieldnames or []
    missing = [k for k in ("device_id", "firmware") if k not in header]
    if missing:
        raise ConfigError(f"CSV telemetry header lacks {', '.join(missing)}", where=f"{source}:1",
                          hint=f"columns: {', '.join(FIELDS)}")
    for row in reader:
        # DictReader's line_num counts physical lines read so far: the current row's last line.
        lineno = reader.line_num
        if None in row or any(v is None for v in row.values()):
            problems.append(LineProblem(source, lineno, "wrong number of columns"))
            continue
        try:
            yield record_from_dict({k: v for k, v in row.items() if k is not None})
        except ValueError as exc:
            problems.append(LineProblem(source, lineno, str(exc)))


def read_telemetry(path: str | Path) -> TelemetryFile:
    """Read a ``.jsonl``/``.ndjson`` or ``.csv`` telemetry file."""
    p = Path(path)
    problems: list[LineProblem] = []
    try:
        with p.open(encoding="utf-8", newline="") as fh:
            if p.suffix.lower() == ".csv":
                records = tuple(_csv_rows(fh, str(p), problems))
            elif p.suffix.lower() in (".jsonl", ".ndjson", ".json"):
                records = tuple(_jsonl_rows(fh, str(p), problems))
            else:
                raise ConfigError(f"unknown telemetry format {p.suffix!r}", where=str(p),
                                  hint="use .jsonl (JSON lines) or .csv")
    except OSError as exc:
        raise ConfigError(f"cannot read telemetry: {exc.strerror}", where=str(p)) from exc
    return TelemetryFile(records, tuple(problems))


@dataclass
class _Running:
    """Welford's running mean and variance (numerically stable single pass)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    @property
    def sd(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0


@dataclass
class _Exposure:
    devices: int = 0
    device_hours: float = 0.0
    crash_events: float = 0.0
    connectivity_hours: float = 0.0
    disconnected_hours: float = 0.0
    attempts: int = 0
    failed_attempts: int = 0

    def add_device(self, failed: bool) -> None:
        self.devices += 1
        self.attempts += 1
        self.failed_attempts += failed


@dataclass
class _Device:
    failed: bool = False
    strata: list[tuple[str, str]] = field(default_factory=list)


def crash_events(crashes: int, hours: float) -> float:
    """Device-hours with a crash in a window: at most one per started hour of the window."""
    if crashes <= 0:
        return 0.0
    return float(min(crashes, max(1, math.ceil(hours))))


def aggregate(records: Iterable[DeviceTelemetry], candidate: str, device_min_ratio: float,
              baseline_drain: float | None = None, window_hours: float | None = None
              ) -> RingEvidence:
    """Fold device reports into the evidence the gates judge.

    Devices on ``candidate`` (or that rolled back from it) are the exposed population; every
    other device contributes to the baseline drain. ``baseline_drain`` is used when no device is
    left on the old firmware (the last ring), typically the value recorded at an earlier ring.
    Per-device counts take one record per device (as before); the exposure block sums every
    record, so pass every window since the rollout started. A record without ``hours`` counts
    ``window_hours`` (``rollout step --window``), or no exposure at all.
    """
    devices = crashed = conn_ok = conn_n = boot_failed = 0
    cand, base = _Running(), _Running()
    total = _Exposure()
    strata: dict[tuple[str, str], _Exposure] = {}
    seen: dict[str, _Device] = {}
    for r in records:
        if r.firmware == candidate or r.rolled_back_from == candidate:
            devices += 1
            crashed += r.crashes > 0
            failed_boot = r.rolled_back_from == candidate or r.boot_failures > 0 or r.rollbacks > 0
            boot_failed += failed_boot
            if r.connected_ratio is not None:
                conn_n += 1
                conn_ok += r.connected_ratio >= device_min_ratio
            if r.battery_drain is not None and r.firmware == candidate:
                cand.add(r.battery_drain)
            dev = seen.get(r.device_id)
            if dev is None:
                dev = seen[r.device_id] = _Device()
            dev.failed = dev.failed or failed_boot
            keys = [(dim, v) for dim, v in zip(STRATA_DIMENSIONS, (
                r.hw_revision, r.region, r.connectivity_type)) if v is not None]
            for key in keys:
                if key not in dev.strata:
                    dev.strata.append(key)
            hours = r.hours if r.hours is not None else window_hours
            if r.firmware != candidate or not hours:
                continue
            groups = [total] + [strata.setdefault(k, _Exposure()) for k in keys]
            events = crash_events(r.crashes, hours)
            for g in groups:
                g.device_hours += hours
                g.crash_events += events
                if r.connected_ratio is not None:
                    g.connectivity_hours += hours
                    g.disconnected_hours += (1.0 - r.connected_ratio) * hours
        elif r.battery_drain is not None:
            base.add(r.battery_drain)
    for dev in seen.values():
        total.add_device(dev.failed)
        for key in dev.strata:
            strata.setdefault(key, _Exposure()).add_device(dev.failed)
    return RingEvidence(
        devices=devices, crashed=crashed, connected_ok=conn_ok, connectivity_reported=conn_n,
        boot_failed=boot_failed, drain_n=cand.n, drain_mean=cand.mean, drain_sd=cand.sd,
        baseline_drain_mean=base.mean if base.n else baseline_drain,
        device_hours=total.device_hours, crash_events=total.crash_events,
        connectivity_hours=total.connectivity_hours,
        disconnected_hours=total.disconnected_hours, attempts=total.attempts,
        failed_attempts=total.failed_attempts,
        strata=tuple(StratumEvidence(d, v, e.devices, e.device_hours, e.crash_events,
                                     e.attempts, e.failed_attempts, e.disconnected_hours,
                                     e.connectivity_hours)
                     for (d, v), e in sorted(strata.items())),
    )
