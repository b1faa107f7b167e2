"""Gate evaluation: pure functions from evidence to a recorded decision.

Every gate returns a :class:`GateResult` carrying the numbers that made it (counts, bound,
threshold), so an audit log can replay why a ring grew or stopped. Rates are judged by a Wilson
score bound, never by the raw ratio: a canary of 20 devices with no crash has an upper bound far
above 0.1 % and cannot pass by luck. Nothing here reads files, clocks or the store.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from statistics import NormalDist
from typing import Any

from .plan import Gates, Ring


class Verdict(str, Enum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"  # enough devices, but the bound straddles the threshold
    INSUFFICIENT = "insufficient"  # too few devices to decide at all: no decision


@dataclass(frozen=True)
class GateResult:
    gate: str
    verdict: Verdict
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)
    on_fail: str = "pause"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["verdict"] = self.verdict.value
        return d


@dataclass(frozen=True)
class RingEvidence:
    """Aggregated telemetry of the devices running the candidate, plus the baseline's drain."""

    devices: int = 0
    crashed: int = 0
    connected_ok: int = 0
    connectivity_reported: int = 0
    boot_failed: int = 0  # boot failures or rollback events (the device went back to the old app)
    drain_n: int = 0
    drain_mean: float = 0.0
    drain_sd: float = 0.0
    baseline_drain_mean: float | None = None
    # Telemetry lines that were malformed and skipped: recorded with the decision so a gate fed
    # half a file says so in the audit log.
    malformed_lines: int = 0


def z_for(confidence: float) -> float:
    """One-sided normal quantile: we only ever ask "is it at least this bad / this good"."""
    return NormalDist().inv_cdf(confidence)


def wilson_bounds(successes: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927).

    Chosen over the normal approximation because it stays inside [0, 1] and behaves at 0 and n
    events, which is exactly where canaries live.
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} outside 0..{n}")
    p = successes / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def min_devices_to_pass(max_rate: float, confidence: float) -> int:
    """Smallest n at which zero bad events puts the Wilson upper bound under ``max_rate``.

    Upper bound with 0 events is z^2 / (n + z^2); solve z^2 / (n + z^2) < t.
    """
    z2 = z_for(confidence) ** 2
    return math.floor(z2 * (1 - max_rate) / max_rate) + 1


def _r(x: float) -> float:
    return round(x, 6)


def rate_ceiling(gate: str, bad: int, n: int, limit: float, min_devices: int, confidence: float,
                 on_fail: str) -> GateResult:
    """A rate of bad events that must stay below ``limit`` (crash rate, boot failures)."""
    numbers: dict[str, Any] = {"bad": bad, "devices": n, "threshold": limit,
                               "min_devices": min_devices, "confidence": confidence}
    if n < min_devices:
        return GateResult(gate, Verdict.INSUFFICIENT,
                          f"{n} devices reported, fewer than the {min_devices} needed to decide",
                          numbers, on_fail)
    lo, hi = wilson_bounds(bad, n, z_for(confidence))
    numbers.update(rate=_r(bad / n), lower=_r(lo), upper=_r(hi))
    if hi < limit:
        return GateResult(gate, Verdict.PASS,
                          f"upper bound {hi:.4%} < {limit:.4%} ({bad}/{n})", numbers, on_fail)
    if lo > limit:
        return GateResult(gate, Verdict.FAIL,
                          f"lower bound {lo:.4%} > {limit:.4%} ({bad}/{n})", numbers, on_fail)
    return GateResult(gate, Verdict.INCONCLUSIVE,
                      f"bounds {lo:.4%}..{hi:.4%} straddle {limit:.4%} ({bad}/{n})",
                      numbers, on_fail)


def rate_floor(gate: str, good: int, n: int, limit: float, min_devices: int, confidence: float,
               on_fail: str) -> GateResult:
    """A success rate that must stay above ``limit`` (connectivity)."""
    numbers: dict[str, Any] = {"good": good, "devices": n, "threshold": limit,
                               "min_devices": min_devices, "confidence": confidence}
    if n < min_devices:
        return GateResult(gate, Verdict.INSUFFICIENT,
                          f"{n} devices reported, fewer than the {min_devices} needed to decide",
                          numbers, on_fail)
    lo, hi = wilson_bounds(good, n, z_for(confidence))
    numbers.update(rate=_r(good / n), lower=_r(lo), upper=_r(hi))
    if lo > limit:
        return GateResult(gate, Verdict.PASS,
                          f"lower bound {lo:.4%} > {limit:.4%} ({good}/{n})", numbers, on_fail)
    if hi < limit:
        return GateResult(gate, Verdict.FAIL,
                          f"upper bound {hi:.4%} < {limit:.4%} ({good}/{n})", numbers, on_fail)
    return GateResult(gate, Verdict.INCONCLUSIVE,
                      f"bounds {lo:.4%}..{hi:.4%} straddle {limit:.4%} ({good}/{n})",
                      numbers, on_fail)


def battery_gate(ev: RingEvidence, max_increase: float, min_devices: int, confidence: float,
                 on_fail: str) -> GateResult:
    """Mean drain of the candidate within ``max_increase`` of the baseline firmware's mean.

    The candidate's mean gets a normal confidence interval; the baseline is treated as known
    because it is measured on the (much larger) rest of the fleet.
    """
    limit_ratio = 1 + max_increase
    numbers: dict[str, Any] = {"devices": ev.drain_n, "mean": _r(ev.drain_mean),
                               "sd": _r(ev.drain_sd), "baseline": ev.baseline_drain_mean,
                               "max_increase": max_increase, "min_devices": min_devices,
                               "confidence": confidence}
    if ev.baseline_drain_mean is None or ev.baseline_drain_mean <= 0:
        return GateResult("battery_drain", Verdict.INSUFFICIENT,
                          "no baseline drain from devices on the previous firmware", numbers,
                          on_fail)
    if ev.drain_n < min_devices:
        return GateResult("battery_drain", Verdict.INSUFFICIENT,
                          f"{ev.drain_n} devices reported drain, fewer than {min_devices}",
                          numbers, on_fail)
    half = z_for(confidence) * ev.drain_sd / math.sqrt(ev.drain_n)
    base = ev.baseline_drain_mean
    limit = base * limit_ratio
    lo, hi = ev.drain_mean - half, ev.drain_mean + half
    numbers.update(threshold=_r(limit), lower=_r(lo), upper=_r(hi),
                   ratio=_r(ev.drain_mean / ev.baseline_drain_mean))
    if hi <= limit:
        return GateResult("battery_drain", Verdict.PASS,
                          f"upper bound {hi:.4g} <= {limit:.4g} (baseline {base:.4g}"
                          f" + {max_increase:.0%})", numbers, on_fail)
    if lo > limit:
        return GateResult("battery_drain", Verdict.FAIL,
                          f"lower bound {lo:.4g} > {limit:.4g} (baseline {base:.4g}"
                          f" + {max_increase:.0%})", numbers, on_fail)
    return GateResult("battery_drain", Verdict.INCONCLUSIVE,
                      f"mean {ev.drain_mean:.4g} +- {half:.3g} straddles {limit:.4g}", numbers,
                      on_fail)


def evaluate_ring(ring: Ring, ev: RingEvidence) -> tuple[GateResult, ...]:
    """All telemetry gates of one ring against its evidence."""
    g: Gates = ring.gates
    n = ring.min_devices
    return (
        rate_ceiling("crash_rate", ev.crashed, ev.devices, g.crash_rate.limit, n, g.confidence,
                     g.crash_rate.on_fail),
        rate_floor("connectivity", ev.connected_ok, ev.connectivity_reported,
                   g.connectivity.limit, n, g.confidence, g.connectivity.on_fail),
        battery_gate(ev, g.battery_max_increase, n, g.confidence, g.battery_on_fail),
        rate_ceiling("boot_failures", ev.boot_failed, ev.devices, g.boot_failures.limit, n,
                     g.confidence, g.boot_failures.on_fail),
    )


def staging_soak_gate(soaked_hours: float | None, min_hours: float) -> GateResult:
    """Production rings wait for the release to have soaked in staging for ``min_hours``."""
    numbers = {"soaked_hours": None if soaked_hours is None else round(soaked_hours, 3),
               "threshold": min_hours}
    if min_hours <= 0:
        return GateResult("staging_soak", Verdict.PASS, "no staging soak required", numbers)
    if soaked_hours is None:
        return GateResult("staging_soak", Verdict.INSUFFICIENT,
                          "no staging soak recorded (no staging ring, no --staging-since)",
                          numbers)
    if soaked_hours >= min_hours:
        return GateResult("staging_soak", Verdict.PASS,
                          f"soaked {soaked_hours:.1f} h in staging >= {min_hours:g} h", numbers)
    return GateResult("staging_soak", Verdict.INCONCLUSIVE,
                      f"soaked {soaked_hours:.1f} h in staging, {min_hours:g} h required", numbers)


def combine(results: tuple[GateResult, ...]) -> tuple[str, tuple[GateResult, ...]]:
    """Reduce gate results to one action: ``rollback`` > ``pause`` > ``wait`` > ``promote``.

    Any failing gate wins over waiting: a clear crash signal must not sit behind a battery gate
    that still lacks evidence.
    """
    failed = tuple(r for r in results if r.verdict is Verdict.FAIL)
    if any(r.on_fail == "rollback" for r in failed):
        return "rollback", failed
    if failed:
        return "pause", failed
    waiting = tuple(r for r in results if r.verdict in (Verdict.INCONCLUSIVE, Verdict.INSUFFICIENT))
    if waiting:
        return "wait", waiting
    return "promote", ()
