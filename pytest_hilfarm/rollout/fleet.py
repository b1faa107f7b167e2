"""Fleet simulator: a whole rollout in simulated time over a modelled fleet.

Every device is modelled (one byte per device per property in ``array`` buffers, one float for
its battery drain), and the real :class:`~.controller.Controller` drives the rollout against an
in-memory store, so a dry run exercises the same decisions a live rollout makes. Rare events
(crashes, boot failures, lost connectivity) are drawn by geometric skipping: the cost is the
number of events, not the number of devices, which keeps a million devices to seconds.
It models rates, not radio or firmware internals, and never touches a real fleet.
"""

from __future__ import annotations

import math
import random
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from pytest_hilfarm.errors import UsageError

from .controller import TERMINAL, Controller, StartBlocked, State, StepReport, Transition, iso
from .gates import RingEvidence
from .hil import HilSummary
from .manifest import Manifest
from .plan import Plan
from .store import AuditEntry, RolloutRow, Store

FAULT_KINDS = MappingProxyType({
    "crash": "extra chance per device per day of at least one crash",
    "boot": "share of devices whose first boot fails (they roll back to the old app)",
    "connectivity": "extra share of devices whose connected ratio drops below the gate's bar",
    "battery": "relative increase of battery drain (0.3 = +30 %)",
    "hil": "the HIL suite fails (value: number of failed tests)",
})
# Simulated clock origin: fixed so timelines and reports are reproducible.
EPOCH = 1_767_225_600.0  # 2026-01-01T00:00:00Z


@dataclass(frozen=True)
class Fault:
    kind: str
    value: float
    hardware: str | None = None  # only devices of this hardware revision are affected

    def __str__(self) -> str:
        return f"{self.kind}:{self.value:g}" + (f"@{self.hardware}" if self.hardware else "")


def parse_fault(text: str) -> Fault:
    """``crash:0.02``, ``boot:0.01@B`` (hardware revision B only), ``battery:0.3``."""
    spec, _, hw = text.partition("@")
    kind, sep, value = spec.partition(":")
    if not sep:
        kind, sep, value = spec.partition("=")
    if kind not in FAULT_KINDS or not sep:
        raise UsageError(f"fault {text!r} is not KIND:VALUE[@HW]", where="--fault",
                         hint="kinds: " + "; ".join(f"{k} ({v})" for k, v in FAULT_KINDS.items()))
    try:
        v = float(value)
    except ValueError:
        raise UsageError(f"fault value {value!r} is not a number", where="--fault") from None
    if v < 0 or (kind in ("crash", "boot", "connectivity") and v > 1):
        raise UsageError(f"fault value {v:g} out of range for {kind}", where="--fault",
                         hint="rates are 0..1; battery is a relative increase >= 0")
    return Fault(kind, v, hw or None)


@dataclass(frozen=True)
class FleetModel:
    """Baseline behaviour of healthy firmware; faults add to it on the candidate only."""

    crash_per_day: float = 0.00002
    disconnected_share: float = 0.001
    boot_failure: float = 0.0
    drain_mean: float = 20.0  # mAh/day
    drain_sd: float = 2.0
    hardware_revisions: tuple[tuple[str, float], ...] = (("A", 0.5), ("B", 0.3), ("C", 0.2))
    regions: tuple[tuple[str, float], ...] = (("eu", 0.4), ("us", 0.4), ("apac", 0.2))


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


def _geometric_positions(rng: random.Random, n: int, p: float) -> Iterator[int]:
    """Positions 0..n-1 each chosen independently with probability p, in O(events)."""
    if p <= 0 or n <= 0:
        return
    if p >= 1:
        yield from range(n)
        return
    log_q = math.log1p(-p)
    pos = -1
    while True:
        # 1 - random() is in (0, 1]: log() never sees zero.
        pos += 1 + int(math.log(1.0 - rng.random()) / log_q)
        if pos >= n:
            return
        yield pos


class Fleet:
    """The modelled devices and what the candidate does to them."""

    def __init__(self, plan: Plan, devices: int, faults: Sequence[Fault] = (),
                 model: FleetModel | None = None, seed: int = 1) -> None:
        if devices < 1:
            raise UsageError(f"--devices {devices} must be at least 1", where="--devices")
        self.plan, self.model, self.rng = plan, model or FleetModel(), random.Random(seed)
        self.faults = tuple(faults)
        self.staging = sum(r.devices or 0 for r in plan.rings if not r.production)
        total = devices + self.staging
        self.devices = devices
        m, rng = self.model, self.rng
        hw_names = [h for h, _ in m.hardware_revisions]
        self.hw_names = hw_names
        self.hw = array("b", rng.choices(range(len(hw_names)),
                                         [w for _, w in m.hardware_revisions], k=total))
        region_names = [r for r, _ in m.regions]
        self.region = array("b", rng.choices(range(len(region_names)),
                                             [w for _, w in m.regions], k=total))
        self.drain = array("f", (max(0.0, rng.gauss(m.drain_mean, m.drain_sd))
                                 for _ in range(total)))
        zeros = bytes(total)
        self.on_candidate = array("b", zeros)
        self.received = array("b", zeros)
        self.crashed = array("b", zeros)
        self.disconnected = array("b", zeros)
        self.boot_failed = array("b", zeros)
        # Targeting: which production devices the plan may reach. Staging devices sit after the
        # production ones and are always targeted by their ring.
        tg = plan.targeting
        want_hw = {hw_names.index(h) for h in tg.hardware_revisions if h in hw_names}
        want_rg = {region_names.index(r) for r in tg.regions if r in region_names}
        if tg.hardware_revisions or tg.regions:
            self.eligible: Sequence[int] = array("i", (
                i for i in range(devices)
                if (not tg.hardware_revisions or self.hw[i] in want_hw)
                and (not tg.regions or self.region[i] in want_rg)))
        else:
            self.eligible = range(devices)
        if not self.eligible:
            raise UsageError("the plan's targeting matches no modelled device", where=plan.source,
                             hint=f"modelled hardware {hw_names}, regions {region_names}")
        self.total_drain = sum(self.drain[i] for i in self.eligible)
        self.segments: list[Sequence[int]] = []  # index sequences that received the candidate
        self.next_eligible = 0
        self.next_staging = devices
        self.n_deployed = self.n_crashed = self.n_disc = self.n_boot = self.n_received = 0
        self.n_on = 0
        self.cand_sum = self.cand_sq = 0.0
        self.cand_n = 0
        self.base_removed = 0.0  # drain of eligible devices now on the candidate

    def _fault(self, kind: str) -> list[Fault]:
        return [f for f in self.faults if f.kind == kind]

    def _rate(self, kind: str, base: float, hw: int | None) -> float:
        extra = sum(f.value for f in self._fault(kind)
                    if f.hardware is None or (hw is not None and self.hw_names[hw] == f.hardware))
        return min(1.0, base + extra)

    def _max_rate(self, kind: str, base: float) -> float:
        return min(1.0, base + sum(f.value for f in self._fault(kind)))

    def _sample(self, seq: Sequence[int], kind: str, base: float, flags: array) -> int:
        """Mark devices of ``seq`` hit by ``kind``; thinning handles hardware-scoped faults."""
        p_max = self._max_rate(kind, base)
        hits = 0
        for pos in _geometric_positions(self.rng, len(seq), p_max):
            i = seq[pos]
            if flags[i]:
                continue
            p = self._rate(kind, base, self.hw[i])
            if p < p_max and self.rng.random() * p_max >= p:
                continue
            flags[i] = 1
            hits += 1
        return hits

    def deploy(self, ring_index: int) -> int:
        """Give the candidate to ring ``ring_index``; returns the number of devices it reached."""
        ring = self.plan.rings[ring_index]
        if ring.production:
            assert ring.percent is not None
            end = round(len(self.eligible) * ring.percent / 100)
            seq = self.eligible[self.next_eligible:end]
            self.next_eligible = max(end, self.next_eligible)
        else:
            assert ring.devices is not None
            seq = range(self.next_staging, self.next_staging + ring.devices)
            self.next_staging += ring.devices
        battery = 1.0 + sum(f.value for f in self._fault("battery") if f.hardware is None)
        battery_hw = {self.hw_names.index(f.hardware): f.value for f in self._fault("battery")
                      if f.hardware in self.hw_names}
        on, received, drain, hw = self.on_candidate, self.received, self.drain, self.hw
        s = sq = 0.0
        for i in seq:
            on[i] = 1
            received[i] = 1
            d = drain[i] * (battery + battery_hw.get(hw[i], 0.0))
            s += d
            sq += d * d
            if i < self.devices:
                self.base_removed += drain[i]
        self.cand_sum += s
        self.cand_sq += sq
        self.cand_n += len(seq)
        self.n_received += len(seq)
        self.n_on += len(seq)
        self.n_deployed += len(seq)
        self.segments.append(seq)
        boot = self._sample(seq, "boot", self.model.boot_failure, self.boot_failed)
        self.n_boot += boot
        if boot:
            # A device that failed to boot the candidate is back on the old app (ESP-IDF rollback,
            # notes §3.3); its drain no longer counts for the candidate.
            for i in seq:
                if self.boot_failed[i] and on[i]:
                    on[i] = 0
                    self.n_on -= 1
        self.n_disc += self._sample(seq, "connectivity", self.model.disconnected_share,
                                    self.disconnected)
        return len(seq)

    def advance(self, hours: float) -> None:
        """Let ``hours`` pass for every device running the candidate."""
        if hours <= 0:
            return
        for seq in self.segments:
            self.n_crashed += self._sample_window(seq, hours)

    def _sample_window(self, seq: Sequence[int], hours: float) -> int:
        def window(p_day: float) -> float:
            # A per-day rate over a window of `hours`: 1 - (1 - p_day)^(hours/24).
            return 1 - (1 - min(p_day, 1.0)) ** (hours / 24)
        p_max = window(self._max_rate("crash", self.model.crash_per_day))
        hits = 0
        for pos in _geometric_positions(self.rng, len(seq), p_max):
            i = seq[pos]
            if self.crashed[i] or not self.on_candidate[i]:
                continue
            p = window(self._rate("crash", self.model.crash_per_day, self.hw[i]))
            if p < p_max and self.rng.random() * p_max >= p:
                continue
            self.crashed[i] = 1
            hits += 1
        return hits

    def revert(self) -> None:
        """Roll every device back to the previous firmware."""
        for seq in self.segments:
            for i in seq:
                self.on_candidate[i] = 0
        self.n_on = 0

    def evidence(self, row: RolloutRow) -> RingEvidence:
        n = self.n_deployed
        mean = self.cand_sum / self.cand_n if self.cand_n else 0.0
        var = (self.cand_sq - self.cand_n * mean * mean) / (self.cand_n - 1) if self.cand_n > 1 \
            else 0.0
        remaining = len(self.eligible) - min(self.next_eligible, len(self.eligible))
        baseline = ((self.total_drain - self.base_removed) / remaining if remaining
                    else row.baseline_drain)
        return RingEvidence(devices=n, crashed=self.n_crashed, connected_ok=n - self.n_disc,
                            connectivity_reported=n, boot_failed=self.n_boot, drain_n=self.cand_n,
                            drain_mean=mean, drain_sd=math.sqrt(max(var, 0.0)),
                            baseline_drain_mean=baseline)


def synthetic_manifest(plan: Plan) -> Manifest:
    """A stand-in artifact when the plan names no manifest (the simulator ships nothing)."""
    return Manifest(url=f"https://example.invalid/{plan.name}.bin", sha256="0" * 64, size=1,
                    chip="esp32", version="candidate", secure_version=0)


def simulate(plan: Plan, plan_text: str, devices: int, faults: Sequence[Fault] = (), *,
             seed: int = 1, model: FleetModel | None = None,
             manifest: Manifest | None = None) -> SimResult:
    """Run the plan's rollout to its end (complete, paused, rolled back) in simulated time."""
    fleet = Fleet(plan, devices, faults, model, seed)
    manifest = manifest or synthetic_manifest(plan)
    hil_fail = int(sum(f.value for f in faults if f.kind == "hil"))
    hil = HilSummary("simulated HIL suite", 40, hil_fail, 0, 0,
                     tuple(f"test_sim_{i}" for i in range(hil_fail)))
    now = EPOCH
    timeline: list[TimelineEntry] = []
    # Without a staging ring, assume the staging soak already happened (the simulator models the
    # production fleet); a plan with a staging ring earns it in simulated time instead.
    has_staging = any(not r.production for r in plan.rings)
    staging_since = None if has_staging else now - plan.gates.staging_soak_hours * 3600

    def record(report: StepReport) -> None:
        for t in report.transitions:
            _apply(fleet, plan, t)
            timeline.append(TimelineEntry(now, (now - EPOCH) / 3600, t.event, t.ring, t.reason,
                                          fleet.n_on, t.numbers))

    with Store(":memory:") as store:
        ctl = Controller(store)
        try:
            report, _ = ctl.start(plan, plan_text, manifest, now=now, hil=hil,
                                  staging_since=staging_since, actor="simulator",
                                  evidence=fleet.evidence)
        except StartBlocked as exc:
            timeline.append(TimelineEntry(now, 0.0, "blocked", None, str(exc.what), 0,
                                          exc.result.to_dict()))
            return SimResult(devices, fleet.staging, "blocked", None, exc.what, 0, 0, 0.0,
                             tuple(timeline), (), "-")
        rid = report.rollout_id
        timeline.append(TimelineEntry(now, 0.0, "start", None, f"rollout {rid} started", 0,
                                      {"hil": "passed"}))
        record(report)
        hold = report.hold
        for _ in range(10_000):
            row = store.get(rid)
            if row.state in TERMINAL or row.state == State.PAUSED.value:
                break
            if row.state == State.SOAKING.value:
                assert row.soak_until is not None
                nxt = row.soak_until
            else:  # waiting for the staging soak
                assert row.staging_since is not None
                nxt = row.staging_since + plan.gates.staging_soak_hours * 3600
            if nxt <= now:
                raise UsageError(f"simulation stalled in {row.state}: {hold}", where=plan.source)
            fleet.advance((nxt - now) / 3600)
            now = nxt
            report = ctl.step(rid, now=now, evidence=fleet.evidence, actor="simulator")
            record(report)
            hold = report.hold
        row = store.get(rid)
        audit = tuple(store.audit(rid))
    last = audit[-1]
    stopped = None if row.state == State.COMPLETE.value else last.ring
    return SimResult(
        devices=devices, staging_devices=fleet.staging, final_state=row.state,
        stopped_ring=stopped, stop_reason=last.reason,
        blast_radius=_production_received(fleet), staging_exposed=fleet.next_staging - devices,
        reached_percent=max((float(e.numbers.get("cumulative_percent") or 0.0) for e in audit
                             if e.event == "deploy"), default=0.0),
        timeline=tuple(timeline), audit=audit, rollout_id=rid)


def _production_received(fleet: Fleet) -> int:
    return min(fleet.next_eligible, len(fleet.eligible))


def _apply(fleet: Fleet, plan: Plan, t: Transition) -> None:
    if t.event == "deploy":
        idx = next(i for i, r in enumerate(plan.rings) if r.name == t.ring)
        fleet.deploy(idx)
    elif t.event == "rollback":
        fleet.revert()


def format_timeline(result: SimResult) -> str:
    """Human-readable timeline: each ring, each gate, where and why it stopped, blast radius."""
    lines = [f"fleet: {result.devices:,} production devices"
             + (f" + {result.staging_devices} staging" if result.staging_devices else "")]
    for e in result.timeline:
        lines.append(f"{iso(e.at)} (+{e.hours:6.1f} h) {e.event:<8} "
                     f"{(e.ring or '-'):<10} on candidate: {e.on_candidate:>9,}  {e.reason}")
        for g in e.numbers.get("gates", []):
            lines.append(f"{'':33}gate {g['gate']:<13} {g['verdict']:<12} {g['reason']}")
    lines.append(f"result: {result.final_state}"
                 + (f" in ring {result.stopped_ring}" if result.stopped_ring else "")
                 + f"; reached {result.reached_percent:g}% of the fleet")
    lines.append(f"why: {result.stop_reason}")
    lines.append(f"blast radius: {result.blast_radius:,} production devices received the "
                 f"candidate ({result.blast_radius / result.devices:.2%})"
                 + (f"; plus {result.staging_exposed} staging devices"
                    if result.staging_exposed else ""))
    return "\n".join(lines)
