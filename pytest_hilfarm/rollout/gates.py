"""Gate evaluation: pure functions from evidence to a recorded decision.

Every gate returns a :class:`GateResult` carrying the numbers that made it (counts, bound,
threshold), so an audit log can replay why a ring grew or stopped. Two families:

* per-device shares (``per: device``, the original definition): a Wilson score bound, judged
  once when the soak ends; a canary of 20 devices with no crash cannot pass a 0.1 % gate by luck.
* exposure rates (``per: device_hour``, ``per: attempt``): anytime-valid sequential tests from
  :mod:`.stats`, judged at every ingest. Clear harm fails at once; a pass needs enough exposure
  that a release as bad as the gate's ``detect`` rate would have been caught.

Nothing here reads files, clocks or the store.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from statistics import NormalDist
from typing import Any

from . import stats
from .plan import PER_ATTEMPT, Gates, RateGate, Ring, Targeting

# Share of a gate's false-alarm budget (1 - confidence) given to the pooled test when strata
# are named; the strata share the rest. A whole-fleet failure is best seen pooled.
POOLED_SHARE = 0.75


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
class StratumEvidence:
    """The exposure counters of one stratum (a hardware revision, a region or a link type)."""

    dimension: str
    value: str
    devices: int = 0
    device_hours: float = 0.0
    crash_events: float = 0.0
    attempts: int = 0
    failed_attempts: int = 0
    disconnected_hours: float = 0.0
    connectivity_hours: float = 0.0


@dataclass(frozen=True)
class RingEvidence:
    """Aggregated telemetry of the devices running the candidate, plus the baseline's drain.

    The first block is per device (the original gates); the exposure block counts device-hours
    on the candidate, device-hours with at least one crash (one per device-hour at most, so a
    single device in a crash loop adds one per hour, not hundreds), update attempts, attempts
    that failed to boot, and device-hours without a mesh link. ``strata`` repeats the exposure
    block per stratum value.
    """

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
    device_hours: float = 0.0
    crash_events: float = 0.0
    attempts: int = 0
    failed_attempts: int = 0
    disconnected_hours: float = 0.0
    connectivity_hours: float = 0.0  # device-hours that reported a connected ratio
    strata: tuple[StratumEvidence, ...] = ()


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


def _exposure_counts(gate: str, e: RingEvidence | StratumEvidence) -> tuple[float, float]:
    if gate == "crash_rate":
        return e.crash_events, e.device_hours
    if gate == "connectivity":
        return e.disconnected_hours, e.connectivity_hours
    return float(e.failed_attempts), float(e.attempts)


def sequential_gate(gate: str, rg: RateGate, events: float, exposure: float, confidence: float,
                    power: float, alpha: float | None = None, alarm_only: bool = False
                    ) -> GateResult:
    """An exposure gate: FAIL once the mixture test alarms (anytime-valid, false alarm <= alpha
    over the whole rollout), PASS once a rate of ``detect`` or worse is ruled out (<= 1 - power
    chance of passing such a release), INCONCLUSIVE while it monitors.

    Connectivity is tested as its complement (disconnected device-hours per device-hour against
    ``1 - min``) and reported as connectivity. ``per: attempt`` gates only alarm: their evidence
    grows by deploying, not by soaking, so a pass means "no alarm after n attempts".
    """
    a = (1.0 - confidence) if alpha is None else alpha
    beta = 1.0 - power
    is_min = gate == "connectivity"
    limit = 1.0 - rg.limit if is_min else rg.limit
    unit = "attempts" if rg.per == PER_ATTEMPT else "device-hours"
    numbers: dict[str, Any] = {"per": rg.per, "events": _r(events), "exposure": _r(exposure),
                               "threshold": rg.limit, "alpha": _r(a), "confidence": confidence}
    if exposure <= 0:
        return GateResult(gate, Verdict.INSUFFICIENT, f"no {unit} on the candidate reported yet",
                          numbers, rg.on_fail)
    if rg.per == PER_ATTEMPT:
        log_alarm = stats.binomial_log_alarm(int(events), int(exposure), limit)
    else:
        log_alarm = stats.poisson_log_alarm(events, exposure, limit, cap=1.0)
    rate = events / exposure
    alarm_at = math.log(1.0 / a)
    if alarm_only and log_alarm < alarm_at:
        # A quiet per-stratum monitor: the ratio is all it needs to record.
        return GateResult(gate, Verdict.PASS, "no alarm", {
            "events": _r(events), "exposure": _r(exposure), "log_alarm": _r(log_alarm),
            "alarm_at": _r(alarm_at)}, rg.on_fail)
    if rg.per == PER_ATTEMPT:
        lo, hi = stats.clopper_pearson(int(events), int(exposure), confidence)
    else:
        lo, hi = stats.garwood(events, exposure, confidence)
        hi = min(hi, 1.0)
    numbers.update(log_alarm=_r(min(log_alarm, 1e6)), alarm_at=_r(alarm_at))
    if is_min:
        numbers.update(rate=_r(1 - rate), lower=_r(1 - hi), upper=_r(1 - lo))
    else:
        numbers.update(rate=_r(rate), lower=_r(lo), upper=_r(hi))
    shown = (f"connectivity {1 - rate:.3%} over {exposure:,.0f} {unit}" if is_min else
             f"{events:g}/{exposure:,.0f} {unit} = {rate:.4%}")
    if log_alarm >= alarm_at:
        if rg.per != PER_ATTEMPT:
            bound = stats.poisson_anytime_lower(events, exposure, a, cap=1.0)
            numbers["anytime_bound"] = _r(1 - bound if is_min else bound)
        what = "below" if is_min else "above"
        return GateResult(gate, Verdict.FAIL,
                          f"{shown}: sequential test alarms (ratio e^{log_alarm:.1f} >= 1/"
                          f"{a:g}), the rate is {what} {rg.limit:g}", numbers, rg.on_fail)
    if alarm_only or rg.per == PER_ATTEMPT:
        return GateResult(gate, Verdict.PASS, f"{shown}: no alarm", numbers, rg.on_fail)
    assert rg.detect is not None
    detect = 1.0 - rg.detect if is_min else rg.detect
    log_accept = stats.poisson_log_accept(events, exposure, limit, detect)
    need = stats.poisson_exposure_to_accept(events, limit, detect, beta)
    numbers.update(detect=rg.detect, beta=_r(beta), log_accept=_r(log_accept),
                   accept_at=_r(math.log(beta)), exposure_needed=_r(need))
    if log_accept <= math.log(beta):
        return GateResult(gate, Verdict.PASS,
                          f"{shown}: a rate of {rg.detect:g} or worse is ruled out "
                          f"(power {power:g})", numbers, rg.on_fail)
    return GateResult(gate, Verdict.INCONCLUSIVE,
                      f"{shown}: monitoring, {need:,.0f} {unit} needed to rule out "
                      f"{rg.detect:g} at these counts", numbers, rg.on_fail)


def coverage_gate(targeting: Targeting, ev: RingEvidence) -> GateResult:
    """Every named hardware revision, region and link type has ``min_per_stratum`` devices."""
    need = targeting.min_per_stratum
    seen = {(s.dimension, s.value): s.devices for s in ev.strata}
    counts = {f"{d}={v}": seen.get((d, v), 0) for d, v in targeting.strata()}
    missing = [f"{k} ({n} of {need})" for k, n in counts.items() if n < need]
    numbers: dict[str, Any] = {"min_per_stratum": need, "devices": counts}
    if missing:
        return GateResult("coverage", Verdict.INSUFFICIENT,
                          "strata without enough devices on the candidate: " + ", ".join(missing),
                          numbers)
    return GateResult("coverage", Verdict.PASS,
                      f"every one of {len(counts)} strata has >= {need} devices", numbers)


def evaluate_ring(ring: Ring, ev: RingEvidence, targeting: Targeting | None = None, *,
                  legacy_due: bool = True, coverage: bool = False) -> tuple[GateResult, ...]:
    """All telemetry gates of one ring against its evidence.

    Per-device gates are judged only when ``legacy_due`` (the soak is over); sequential ones
    always. With named strata, each sequential gate also runs per stratum (alarm only), the
    false-alarm budget split: ``POOLED_SHARE`` to the pooled test, the rest equally to the
    strata (Bonferroni), so a failure confined to one hardware revision is not averaged away.
    ``coverage`` adds the per-stratum device minimum (staging and canary rings).
    """
    g: Gates = ring.gates
    n = ring.min_devices
    strata = targeting.strata() if targeting is not None else ()
    alpha = 1.0 - g.confidence
    pooled_alpha = alpha * POOLED_SHARE if strata else alpha
    out: list[GateResult] = []

    def later(gate: str, on_fail: str) -> GateResult:
        return GateResult(gate, Verdict.INCONCLUSIVE, "judged when the soak ends", {}, on_fail)

    for gate, rg in g.rate_gates():
        if rg.sequential:
            events, exposure = _exposure_counts(gate, ev)
            out.append(sequential_gate(gate, rg, events, exposure, g.confidence, g.power,
                                       pooled_alpha, alarm_only=ring.promote == "soak"))
        elif not legacy_due:
            out.append(later(gate, rg.on_fail))
        elif gate == "crash_rate":
            out.append(rate_ceiling("crash_rate", ev.crashed, ev.devices, rg.limit, n,
                                    g.confidence, rg.on_fail))
        elif gate == "connectivity":
            out.append(rate_floor("connectivity", ev.connected_ok, ev.connectivity_reported,
                                  rg.limit, n, g.confidence, rg.on_fail))
        else:
            out.append(rate_ceiling("boot_failures", ev.boot_failed, ev.devices, rg.limit, n,
                                    g.confidence, rg.on_fail))
        if gate == "connectivity" and g.battery_enabled:
            # Keep the original order of the audit log: crash, connectivity, battery, boot.
            out.append(battery_gate(ev, g.battery_max_increase, n, g.confidence,
                                    g.battery_on_fail) if legacy_due
                       else later("battery_drain", g.battery_on_fail))
    if strata:
        out.extend(_strata_monitors(g, ev, strata, alpha * (1 - POOLED_SHARE) / len(strata)))
    if coverage and targeting is not None and targeting.min_per_stratum > 0 and strata:
        out.append(coverage_gate(targeting, ev))
    return tuple(out)


def _strata_monitors(g: Gates, ev: RingEvidence, strata: tuple[tuple[str, str], ...],
                     alpha: float) -> list[GateResult]:
    """Per-stratum alarm tests: one summary result per gate while all are quiet, plus a full
    result for each stratum that alarms (they run at every ingest, so they stay cheap).
    """
    by_key = {(s.dimension, s.value): s for s in ev.strata}
    present = [by_key[k] for k in strata if k in by_key]
    out: list[GateResult] = []
    if not present:
        return out
    threshold = math.log(1.0 / alpha)
    for gate, rg in g.rate_gates():
        if not rg.sequential:
            continue
        limit = 1.0 - rg.limit if gate == "connectivity" else rg.limit
        top, top_log = present[0], 0.0
        for s in present:
            events, exposure = _exposure_counts(gate, s)
            if exposure <= 0 or events <= 0:
                continue  # no event: the ratio is at most 1, far below any alarm
            if rg.per == PER_ATTEMPT:
                log = stats.binomial_log_alarm(int(events), int(exposure), limit)
            else:
                log = stats.poisson_log_alarm(events, exposure, limit, cap=1.0)
            if log > top_log:
                top, top_log = s, log
            if log >= threshold:
                out.append(sequential_gate(f"{gate}[{s.dimension}={s.value}]", rg, events,
                                           exposure, g.confidence, g.power, alpha,
                                           alarm_only=True))
        out.append(GateResult(
            f"{gate}[strata]", Verdict.PASS if top_log < threshold else Verdict.FAIL,
            f"{len(present)} strata monitored; highest ratio e^{min(top_log, 1e6):.1f} "
            f"({top.dimension}={top.value}) against e^{threshold:.1f}",
            {"alpha": _r(alpha), "alarm_at": _r(threshold)}, rg.on_fail))
    return out


def harm(results: tuple[GateResult, ...]) -> tuple[str, tuple[GateResult, ...]] | None:
    """The stop action (``rollback`` or ``pause``) when any gate failed, else None."""
    action, why = combine(results)
    return (action, why) if action in ("rollback", "pause") else None


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
