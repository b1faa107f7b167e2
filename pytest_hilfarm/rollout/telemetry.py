"""Per-device fleet telemetry: JSON-lines or CSV files, or records built in Python.

Malformed lines are reported with their line numbers and skipped, never silently counted: a
gate fed half a file must be able to say so. Aggregation into :class:`RingEvidence` is pure and
streaming (one pass, constant memory), so a million-line file does not need a million objects.
This module does not decide anything; :mod:`.gates` does.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_hilfarm.errors import ConfigError

from .gates import RingEvidence

FIELDS = ("device_id", "firmware", "boots", "crashes", "connected_ratio", "battery_drain",
          "rollbacks", "boot_failures", "rolled_back_from")


@dataclass(frozen=True)
class DeviceTelemetry:
    """One device's report over the current window.

    ``battery_drain`` is in whatever unit the fleet reports (e.g. mAh/day); only ratios against
    the baseline firmware are used. ``rolled_back_from`` names the version a device abandoned
    after a failed boot, so the failure is charged to that version and not to the one it now runs.
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
    return DeviceTelemetry(
        device_id=device_id, firmware=str(firmware), boots=_int(row, "boots"),
        crashes=_int(row, "crashes"),
        connected_ratio=_float(row, "connected_ratio", 0.0, 1.0),
        battery_drain=_float(row, "battery_drain", 0.0, math.inf),
        rollbacks=_int(row, "rollbacks"), boot_failures=_int(row, "boot_failures"),
        rolled_back_from=None if rolled is None else str(rolled),
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


def aggregate(records: Iterable[DeviceTelemetry], candidate: str, device_min_ratio: float,
              baseline_drain: float | None = None) -> RingEvidence:
    """Fold device reports into the evidence the gates judge.

    Devices on ``candidate`` (or that rolled back from it) are the exposed population; every
    other device contributes to the baseline drain. ``baseline_drain`` is used when no device is
    left on the old firmware (the last ring), typically the value recorded at an earlier ring.
    """
    devices = crashed = conn_ok = conn_n = boot_failed = 0
    cand, base = _Running(), _Running()
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
        elif r.battery_drain is not None:
            base.add(r.battery_drain)
    return RingEvidence(
        devices=devices, crashed=crashed, connected_ok=conn_ok, connectivity_reported=conn_n,
        boot_failed=boot_failed, drain_n=cand.n, drain_mean=cand.mean, drain_sd=cand.sd,
        baseline_drain_mean=base.mean if base.n else baseline_drain,
    )
