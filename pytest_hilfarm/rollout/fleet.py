"""Fleet simulator: a whole rollout in simulated time over a modelled fleet.

Devices are modelled per cell (hardware revision x region x link type), every device in a cell
alike whichever ring took it. Counts are drawn from the exact laws of the model (binomial boot
failures and crashes per device-hour, normal drains, hypergeometric picks of which devices a
ring takes), so the evidence has the distribution a device-by-device model would give, at a
cost that does not grow with the fleet: ten million devices take as long as two thousand.
The real :class:`~.controller.Controller` drives the rollout against an in-memory store with
telemetry ingested every hour, so a dry run takes the decisions a live rollout takes.
It models rates, not radio or firmware internals, and never touches a real fleet.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

import numpy as np

from pytest_hilfarm.errors import UsageError

from .controller import TERMINAL, Controller, StartBlocked, State, StepReport, iso
from .gates import RingEvidence, StratumEvidence
from .hil import HilSummary
from .manifest import FORMAT, Manifest
from .plan import STRATA_DIMENSIONS, Plan
from .store import AuditEntry, RolloutRow, Store

FAULT_KINDS = MappingProxyType({
    "crash": "extra chance per device of at least one crash: per day (0.02, 2%), or per hour "
             "with /h (0.5%/h)",
    "boot": "share of update attempts whose first boot fails (they roll back to the old app)",
    "connectivity": "extra share of devices that lose their mesh link half of the time",
    "battery": "relative increase of battery drain (0.3 = +30 %)",
    "hil": "the HIL suite fails (value: number of failed tests)",
})
# Simulated clock origin: fixed so timelines and reports are reproducible.
EPOCH = 1_767_225_600.0  # 2026-01-01T00:00:00Z
INGEST_HOURS = 1.0
_FAULT = re.compile(r"^(?P<kind>[a-z]+)[:=](?P<value>[0-9.eE+-]+)(?P<pct>%)?"
                    r"(?:/(?P<unit>[hd]))?(?:@(?P<hw>.+))?$")


@dataclass(frozen=True)
class Fault:
    kind: str
    value: float
    hardware: str | None = None  # only devices of this hardware revision are affected
    per_hour: bool = False  # crash only: `value` is per hour instead of per day

    def __str__(self) -> str:
        unit = "/h" if self.per_hour else ""
        return f"{self.kind}:{self.value:g}{unit}" + (f"@{self.hardware}" if self.hardware else "")

    def crash_hazard(self) -> float:
        """Crash hazard per device-hour for a crash fault."""
        p = min(self.value, 1.0 - 1e-12)
        return -math.log1p(-p) / (1.0 if self.per_hour else 24.0)


def parse_fault(text: str) -> Fault:
    """``crash:0.02`` (per day), ``crash:2%/h``, ``boot:1%@B`` (revision B only),
    ``battery:0.3``.
    """
    m = _FAULT.match(text.strip())
    if m is None or m["kind"] not in FAULT_KINDS:
        raise UsageError(f"fault {text!r} is not KIND:VALUE[%][/h|/d][@HW]", where="--fault",
                         hint="kinds: " + "; ".join(f"{k} ({v})" for k, v in FAULT_KINDS.items()))
    try:
        v = float(m["value"]) / (100.0 if m["pct"] else 1.0)
    except ValueError:
        raise UsageError(f"fault value {m['value']!r} is not a number", where="--fault") from None
    if m["unit"] and m["kind"] != "crash":
        raise UsageError(f"/{m['unit']} applies to crash faults only", where="--fault")
    if v < 0 or (m["kind"] in ("crash", "boot", "connectivity") and v > 1):
        raise UsageError(f"fault value {v:g} out of range for {m['kind']}", where="--fault",
                         hint="rates are 0..1 (or 0..100%); battery is a relative increase >= 0")
    return Fault(m["kind"], v, m["hw"] or None, m["unit"] == "h")


@dataclass(frozen=True)
class FleetModel:
    """Baseline behaviour of healthy firmware; faults add to it on the candidate only."""

    crash_per_day: float = 0.00002
    disconnected_share: float = 0.001
    degraded_connected_ratio: float = 0.5  # a device that lost its link is connected half the time
    boot_failure: float = 0.0
    drain_mean: float = 20.0  # mAh/day
    drain_sd: float = 2.0
    hardware_revisions: tuple[tuple[str, float], ...] = (("A", 0.5), ("B", 0.3), ("C", 0.2))
    regions: tuple[tuple[str, float], ...] = (("eu", 0.4), ("us", 0.4), ("apac", 0.2))
    connectivity_types: tuple[tuple[str, float], ...] = (("wifi", 0.6), ("thread", 0.4))


@dataclass(frozen=True)
class TimelineEntry:
    at: float
    hours: float
    event: str
    ring: str | None
    reason: str
    on_candidate: int
    numbers: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SimResult:
    devices: int
    staging_devices: int
    final_state: str
    stopped_ring: str | None
    stop_reason: str
    blast_radius: int  # production devices that ever received the candidate
    staging_exposed: int
    reached_percent: float
    timeline: tuple[TimelineEntry, ...]
    audit: tuple[AuditEntry, ...]
    rollout_id: str
    hours: float = 0.0  # simulated hours from start to the final state
    first_production_hours: float | None = None  # when the first production ring deployed


class Fleet:
    """The modelled devices and what the candidate does to them."""

    def __init__(self, plan: Plan, devices: int, faults: Sequence[Fault] = (),
                 model: FleetModel | None = None, seed: int = 1) -> None:
        if devices < 1:
            raise UsageError(f"--devices {devices} must be at least 1", where="--devices")
        self.plan, self.model = plan, model or FleetModel()
        self.rng = np.random.default_rng(seed)
        self.faults = tuple(faults)
        self.devices = devices
        m = self.model
        dims = (m.hardware_revisions, m.regions, m.connectivity_types)
        self.names = [tuple(n for n, _ in d) for d in dims]
        self.hw_names = list(self.names[0])
        cells = list(itertools.product(*(range(len(d)) for d in dims)))
        self.cells = np.array(cells, dtype=np.int64).reshape(len(cells), 3)
        weights = np.array([dims[0][a][1] * dims[1][b][1] * dims[2][c][1] for a, b, c in cells])
        self.weights = weights / weights.sum()
        population = self.rng.multinomial(devices, self.weights)
        tg = plan.targeting
        wanted = (tg.hardware_revisions, tg.regions, tg.connectivity_types)
        ok = np.ones(len(cells), dtype=bool)
        for d, want in enumerate(wanted):
            if want:
                ok &= np.isin(self.cells[:, d], [i for i, n in enumerate(self.names[d])
                                                 if n in want])
        self.available = np.where(ok, population, 0).astype(np.int64)
        self.eligible = int(self.available.sum())
        if self.eligible == 0:
            raise UsageError("the plan's targeting matches no modelled device", where=plan.source,
                             hint=f"modelled hardware {self.names[0]}, regions {self.names[1]}, "
                                  f"link types {self.names[2]}")
        self.staging = sum(r.devices or 0 for r in plan.rings if not r.production)
        self.deployed_index = -1
        self.production_received = 0
        self.staging_received = 0
        self.reverted = False
        # Per-cell state: devices in one cell behave alike whichever ring took them, so the
        # evidence needs only these sums.
        n_cells = len(cells)
        every = np.arange(n_cells)
        self.hazard = (-math.log1p(-min(m.crash_per_day, 1 - 1e-12)) / 24.0
                       + self._extra("crash", every))
        self.p_boot = np.minimum(1.0, m.boot_failure + self._extra("boot", every))
        self.p_degraded = np.minimum(1.0, m.disconnected_share + self._extra("connectivity", every))
        self.drain_factor = 1.0 + self._extra("battery", every)
        self.n = np.zeros(n_cells, dtype=np.int64)
        self.on = np.zeros(n_cells, dtype=np.int64)
        self.crashed = np.zeros(n_cells, dtype=np.int64)
        self.failed = np.zeros(n_cells, dtype=np.int64)
        self.degraded = np.zeros(n_cells, dtype=np.int64)
        self.drain_sum = np.zeros(n_cells)
        self.drain_sq = np.zeros(n_cells)
        self.hours = np.zeros(n_cells)
        self.events = np.zeros(n_cells)
        self.disc = np.zeros(n_cells)
        # One column per named stratum: which cells belong to it.
        named = (tg.hardware_revisions, tg.regions, tg.connectivity_types)
        self.strata = [(STRATA_DIMENSIONS[d], v) for d in range(3) for v in named[d]
                       if v in self.names[d]]
        self.member = np.array([[self.cells[c, d] == self.names[d].index(v)
                                 for d in range(3) for v in named[d] if v in self.names[d]]
                                for c in range(n_cells)], dtype=float).reshape(n_cells, -1)
        self._evidence: RingEvidence | None = None

    # -- the candidate's effect on one cell ------------------------------------------------
    def _extra(self, kind: str, cells: np.ndarray) -> np.ndarray:
        extra = np.zeros(len(cells))
        for flt in self.faults:
            if flt.kind != kind:
                continue
            value = flt.crash_hazard() if kind == "crash" else flt.value
            if flt.hardware is None:
                extra += value
            elif flt.hardware in self.hw_names:
                extra += np.where(self.cells[cells, 0] == self.hw_names.index(flt.hardware),
                                  value, 0.0)
        return extra

    def _stratified(self, n: int, pool: np.ndarray | None) -> np.ndarray:
        """``n`` devices that cover every named stratum with ``min_per_stratum`` first (as a
        representative staging or canary group is picked), the rest at random.
        """
        tg = self.plan.targeting
        need = tg.min_per_stratum
        counts = np.zeros(len(self.cells), dtype=np.int64)
        left = pool.copy() if pool is not None else None
        wanted = (tg.hardware_revisions, tg.regions, tg.connectivity_types)
        deficits = {(d, self.names[d].index(v)): need for d, vals in enumerate(wanted)
                    for v in vals if v in self.names[d]}
        while n - counts.sum() > 0 and any(v > 0 for v in deficits.values()):
            def score(c: int) -> tuple[int, float]:
                covers = sum(1 for (d, i), v in deficits.items() if v > 0 and
                             self.cells[c, d] == i)
                return covers, (left[c] if left is not None else self.weights[c])
            candidates = [c for c in range(len(self.cells)) if left is None or left[c] > 0]
            best = max(candidates, key=score, default=None)
            if best is None or score(best)[0] == 0:
                break
            counts[best] += 1
            if left is not None:
                left[best] -= 1
            for (d, i) in deficits:
                if self.cells[best, d] == i:
                    deficits[(d, i)] -= 1
        rest = n - int(counts.sum())
        if rest > 0:
            counts += self._random(rest, left)
        return counts

    def _random(self, n: int, pool: np.ndarray | None) -> np.ndarray:
        if pool is None:  # in-house staging devices: drawn from the model's mix
            return self.rng.multinomial(n, self.weights).astype(np.int64)
        n = min(n, int(pool.sum()))
        if n <= 0:
            return np.zeros(len(self.cells), dtype=np.int64)
        return self.rng.multivariate_hypergeometric(pool, n).astype(np.int64)

    def deploy(self, ring_index: int) -> int:
        """Give the candidate to ring ``ring_index``; returns the number of devices it reached."""
        ring = self.plan.rings[ring_index]
        first_prod = next(i for i, r in enumerate(self.plan.rings) if r.production)
        representative = self.plan.targeting.min_per_stratum > 0 and (
            not ring.production or ring_index == first_prod)
        if ring.production:
            assert ring.percent is not None
            end = round(self.eligible * ring.percent / 100)
            n = max(0, end - self.production_received)
            counts = (self._stratified(n, self.available) if representative
                      else self._random(n, self.available))
            self.available -= counts
            self.production_received += int(counts.sum())
        else:
            assert ring.devices is not None
            counts = (self._stratified(ring.devices, None) if representative
                      else self._random(ring.devices, None))
            self.staging_received += int(counts.sum())
        failed = self.rng.binomial(counts, self.p_boot)
        on = counts - failed
        degraded = self.rng.binomial(on, self.p_degraded)
        # Sum and sum of squares of `on` normal drains, drawn exactly: the sample mean is normal,
        # the sample variance a scaled chi-square, and the two are independent.
        m = self.model
        mu, sd = m.drain_mean * self.drain_factor, m.drain_sd * self.drain_factor
        safe = np.maximum(on, 1)
        mean = self.rng.normal(mu, sd / np.sqrt(safe))
        dof = np.maximum(safe - 1, 1)
        var = sd ** 2 * self.rng.chisquare(dof) / dof
        self.drain_sum += np.where(on > 0, mean * on, 0.0)
        self.drain_sq += np.where(on > 0, (on - 1) * var + on * mean ** 2, 0.0)
        self.n += counts
        self.on += on
        self.failed += failed
        self.degraded += degraded
        self.deployed_index = ring_index
        self._evidence = None
        return int(counts.sum())

    def advance(self, hours: float) -> None:
        """Let ``hours`` pass for every device running the candidate (one ingest window)."""
        if hours <= 0 or self.reverted or not self.on.any():
            return
        on = self.on
        # Devices with at least one crash in the window: the crash-hours of a window of at most
        # one hour (the simulator ingests hourly), one per device-hour however many crashes.
        crashing = self.rng.binomial(on, -np.expm1(-self.hazard * hours))
        hit = np.nonzero(crashing)[0]
        if len(hit):
            # Which of the crashing devices crash for the first time (per-device gates).
            fresh = on[hit] - self.crashed[hit]
            self.crashed[hit] += self.rng.hypergeometric(fresh, self.crashed[hit], crashing[hit])
        self.events += crashing
        self.hours += on * hours
        lost = 1.0 - self.model.degraded_connected_ratio
        self.disc += self.rng.binomial(np.round(self.degraded * hours).astype(np.int64), lost)
        self._evidence = None

    def revert(self) -> None:
        """Roll every device back to the previous firmware."""
        self.on = np.zeros_like(self.on)
        self.reverted = True
        self._evidence = None

    def sync(self, row: RolloutRow) -> None:
        """Follow the controller: deploy the rings it deployed, revert on rollback."""
        while self.deployed_index < row.deployed_index:
            self.deploy(self.deployed_index + 1)
        if row.state == State.ROLLED_BACK.value and not self.reverted:
            self.revert()

    @property
    def on_candidate(self) -> int:
        return int(self.on.sum())

    def evidence(self, row: RolloutRow) -> RingEvidence:
        self.sync(row)
        if self._evidence is not None:
            return self._evidence
        n = int(self.n.sum())
        on = int(self.on.sum())
        mean = float(self.drain_sum.sum()) / on if on else 0.0
        var = (float(self.drain_sq.sum()) - on * mean * mean) / (on - 1) if on > 1 else 0.0
        remaining = int(self.available.sum())
        baseline = (float(self.rng.normal(self.model.drain_mean, self.model.drain_sd /
                                          math.sqrt(remaining)))
                    if remaining else row.baseline_drain)
        strata: tuple[StratumEvidence, ...] = ()
        if self.strata:
            devs, hours, events, failed_s, disc = (
                np.stack([self.n, self.hours, self.events, self.failed, self.disc])
                @ self.member).tolist()
            strata = tuple(StratumEvidence(dim, v, int(devs[j]), hours[j], events[j],
                                           int(devs[j]), int(failed_s[j]), disc[j], hours[j])
                           for j, (dim, v) in enumerate(self.strata) if devs[j])
        hours_total = float(self.hours.sum())
        failed = int(self.failed.sum())
        self._evidence = RingEvidence(
            devices=n, crashed=int(self.crashed.sum()), connected_ok=n - int(self.degraded.sum()),
            connectivity_reported=n, boot_failed=failed, drain_n=on, drain_mean=mean,
            drain_sd=math.sqrt(max(var, 0.0)), baseline_drain_mean=baseline,
            device_hours=hours_total, crash_events=float(self.events.sum()), attempts=n,
            failed_attempts=failed, disconnected_hours=float(self.disc.sum()),
            connectivity_hours=hours_total, strata=strata)
        return self._evidence


def synthetic_manifest(plan: Plan) -> Manifest:
    """A stand-in artifact when the plan names no manifest (the simulator ships nothing)."""
    stamp = datetime.fromtimestamp(EPOCH, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Manifest(chip="esp32", project=plan.name, version="candidate", secure_version=0,
                    sha256="0" * 64, size=1, created=stamp, expires=stamp, key_id="",
                    sig_scheme="ed25519", url=f"https://example.invalid/{plan.name}.bin",
                    format=FORMAT)


def _horizon_hours(plan: Plan) -> float:
    """Longest a rollout can run without a person: every soak extended to its limit."""
    total = plan.gates.staging_soak_hours + 24.0
    for r in plan.rings:
        total += r.soak_hours * (1 + r.gates.max_soak_extensions) + INGEST_HOURS
    return total


def simulate(plan: Plan, plan_text: str, devices: int, faults: Sequence[Fault] = (), *,
             seed: int = 1, model: FleetModel | None = None,
             manifest: Manifest | None = None, ingest_hours: float = INGEST_HOURS,
             timeline: bool = True) -> SimResult:
    """Run the plan's rollout to its end (complete, paused, rolled back) in simulated time.

    Telemetry is ingested every ``ingest_hours`` (at most one hour: crash-hours are counted per
    window) and at every soak deadline. ``timeline=False`` skips the per-transition record the
    report needs (used by the trial runner).
    """
    if not 0 < ingest_hours <= 1.0:
        raise UsageError(f"ingest interval {ingest_hours:g} h must be in (0, 1]",
                         where="--ingest-minutes")
    fleet = Fleet(plan, devices, faults, model, seed)
    manifest = manifest or synthetic_manifest(plan)
    hil_fail = int(sum(f.value for f in faults if f.kind == "hil"))
    hil = HilSummary("simulated HIL suite", 40, hil_fail, 0, 0,
                     tuple(f"test_sim_{i}" for i in range(hil_fail)))
    now = EPOCH
    entries: list[TimelineEntry] = []
    first_prod = next(i for i, r in enumerate(plan.rings) if r.production)
    first_prod_at: list[float] = []
    # Without a staging ring, assume the staging soak already happened (the simulator models the
    # production fleet); a plan with a staging ring earns it in simulated time instead.
    has_staging = any(not r.production for r in plan.rings)
    staging_since = None if has_staging else now - plan.gates.staging_soak_hours * 3600

    def record(report: StepReport, row: RolloutRow) -> None:
        fleet.sync(row)
        for t in report.transitions:
            if t.event == "deploy" and t.ring == plan.rings[first_prod].name:
                first_prod_at.append(now)
            if timeline:
                entries.append(TimelineEntry(now, (now - EPOCH) / 3600, t.event, t.ring,
                                             t.reason, fleet.on_candidate, t.numbers))

    with Store(":memory:") as store:
        ctl = Controller(store)
        try:
            report, _ = ctl.start(plan, plan_text, manifest, now=now, hil=hil,
                                  staging_since=staging_since, actor="simulator",
                                  evidence=fleet.evidence)
        except StartBlocked as exc:
            entries.append(TimelineEntry(now, 0.0, "blocked", None, str(exc.what), 0,
                                         exc.result.to_dict()))
            return SimResult(devices, fleet.staging, "blocked", None, exc.what, 0, 0, 0.0,
                             tuple(entries), (), "-")
        rid = report.rollout_id
        if timeline:
            entries.append(TimelineEntry(now, 0.0, "start", None, f"rollout {rid} started", 0,
                                         {"hil": "passed"}))
        record(report, store.get(rid))
        end = now + _horizon_hours(plan) * 3600
        while now < end:
            row = store.get(rid)
            if row.state in TERMINAL or row.state == State.PAUSED.value:
                break
            nxt = now + ingest_hours * 3600
            # Land exactly on deadlines, so a soak of 90 minutes is judged at 90 minutes.
            if row.state == State.SOAKING.value and row.soak_until is not None \
                    and now < row.soak_until < nxt:
                nxt = row.soak_until
            elif row.state == State.WAITING.value and row.staging_since is not None:
                due = row.staging_since + plan.gates.staging_soak_hours * 3600
                if now < due < nxt:
                    nxt = due
            fleet.advance((nxt - now) / 3600)
            now = nxt
            report = ctl.step(rid, now=now, evidence=fleet.evidence, actor="simulator")
            record(report, store.get(rid))
        row = store.get(rid)
        audit = tuple(store.audit(rid))
    last = audit[-1]
    stopped = None if row.state == State.COMPLETE.value else last.ring
    return SimResult(
        devices=devices, staging_devices=fleet.staging, final_state=row.state,
        stopped_ring=stopped, stop_reason=last.reason,
        blast_radius=fleet.production_received, staging_exposed=fleet.staging_received,
        reached_percent=max((float(e.numbers.get("cumulative_percent") or 0.0) for e in audit
                             if e.event == "deploy"), default=0.0),
        timeline=tuple(entries), audit=audit, rollout_id=rid, hours=(last.at - EPOCH) / 3600,
        first_production_hours=(first_prod_at[0] - EPOCH) / 3600 if first_prod_at else None)


def format_timeline(result: SimResult) -> str:
    """Human-readable timeline: each ring, each gate, where and why it stopped, blast radius."""
    lines = [f"fleet: {result.devices:,} production devices"
             + (f" + {result.staging_devices} staging" if result.staging_devices else "")]
    for e in result.timeline:
        lines.append(f"{iso(e.at)} (+{e.hours:6.1f} h) {e.event:<8} "
                     f"{(e.ring or '-'):<10} on candidate: {e.on_candidate:>9,}  {e.reason}")
        for g in e.numbers.get("gates", []):
            if "[" in g["gate"] and g["verdict"] == "pass":
                continue  # per-stratum monitors: shown only when they alarm
            lines.append(f"{'':33}gate {g['gate']:<13} {g['verdict']:<12} {g['reason']}")
    lines.append(f"result: {result.final_state}"
                 + (f" in ring {result.stopped_ring}" if result.stopped_ring else "")
                 + f" after {result.hours:.1f} h; reached {result.reached_percent:g}% of the fleet")
    lines.append(f"why: {result.stop_reason}")
    lines.append(f"blast radius: {result.blast_radius:,} production devices received the "
                 f"candidate ({result.blast_radius / result.devices:.2%})"
                 + (f"; plus {result.staging_exposed} staging devices"
                    if result.staging_exposed else ""))
    return "\n".join(lines)
