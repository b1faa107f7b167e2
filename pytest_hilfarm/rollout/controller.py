"""Rollout controller: a persistent state machine over the store, driven by ``step``.

::

    start --HIL gate--> waiting(ring i) --staging soak ok--> deploy --> soaking(ring i)
    soaking --every ingest--> sequential gates --harm--> paused | rolled_back (at once)
    soaking --min soak over, all gates pass--> promote --> waiting(ring i+1) ... --> complete
            --soak deadline, no decision--> extend soak (up to N times) --> paused
    any non-terminal --abort--> aborted;  --rollback--> rolled_back;  --pause--> paused

Sequential (exposure) gates are evaluated at every step that brings evidence, also while
waiting and while paused (a paused rollout still rolls back on clear harm); per-device gates
only when a soak ends, as they always were.

:func:`decide` is pure (plan, row, now, evidence) -> transition or hold; :class:`Controller`
applies one transition per store transaction, so a crash between two transitions loses nothing
and a re-run continues from the last committed state. The controller never pushes firmware: a
``deploy`` or ``rollback`` entry in the audit log is the instruction an OTA platform (or the fleet
simulator) acts on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from pytest_hilfarm.errors import UsageError

from .gates import (
    GateResult,
    RingEvidence,
    Verdict,
    combine,
    evaluate_ring,
    harm,
    staging_soak_gate,
)
from .hil import HilSummary, hil_gate
from .manifest import Manifest, manifest_from_dict
from .plan import Plan, parse_plan
from .store import RolloutRow, Store


class State(str, Enum):
    WAITING = "waiting"
    SOAKING = "soaking"
    PAUSED = "paused"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"
    COMPLETE = "complete"


TERMINAL = frozenset({State.ROLLED_BACK.value, State.ABORTED.value, State.COMPLETE.value})


def iso(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Transition:
    event: str
    reason: str
    changes: dict[str, Any]
    numbers: dict[str, Any] = field(default_factory=dict)
    ring: str | None = None


@dataclass(frozen=True)
class Hold:
    """No transition now, and why (printed by ``step``; not written to the audit log).

    ``gates`` are the results of the evaluation behind it, if there was one (``step --json``).
    """

    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)
    gates: tuple[GateResult, ...] = ()


class StartBlocked(UsageError):
    """A pre-start gate (the HIL suite) failed; carries the gate result."""

    def __init__(self, result: GateResult) -> None:
        self.result = result
        super().__init__(f"rollout not started: HIL gate failed ({result.reason})",
                         where=str(result.numbers.get("source", "HIL results")),
                         hint="fix the failing tests and re-run the HIL suite")


EvidenceFn = Callable[[RolloutRow], "RingEvidence | None"]


def cumulative_percent(plan: Plan, ring_index: int) -> float:
    """Share of the production fleet on the candidate once ring ``ring_index`` is deployed."""
    best = 0.0
    for r in plan.rings[: ring_index + 1]:
        if r.production and r.percent is not None:
            best = r.percent
    return best


def _deploy(plan: Plan, row: RolloutRow, now: float) -> Transition:
    ring = plan.rings[row.ring_index]
    changes: dict[str, Any] = {"state": State.SOAKING.value, "ring_started_at": now,
                               "soak_until": now + ring.soak_hours * 3600, "extensions": 0,
                               "deployed_index": row.ring_index}
    if not ring.production and row.staging_since is None:
        changes["staging_since"] = now
    numbers = {"action": "deploy", "ring": ring.name, "version": row.candidate,
               "percent": ring.percent, "devices": ring.devices,
               "cumulative_percent": cumulative_percent(plan, row.ring_index),
               "soak_hours": ring.soak_hours}
    where = f"{ring.percent:g}% of the fleet" if ring.production else f"{ring.devices} devices"
    return Transition("deploy", f"deploy {row.candidate} to ring {ring.name} ({where})", changes,
                      numbers, ring.name)


def _first_production(plan: Plan) -> int:
    return next(i for i, r in enumerate(plan.rings) if r.production)


def _evaluate(plan: Plan, index: int, ev: RingEvidence, legacy_due: bool
              ) -> tuple[GateResult, ...]:
    ring = plan.rings[index]
    # Staging and the canary must be representative: every named stratum covered.
    coverage = not ring.production or index == _first_production(plan)
    return evaluate_ring(ring, ev, plan.targeting, legacy_due=legacy_due, coverage=coverage)


def _stop(plan: Plan, row: RolloutRow, ring_name: str, action: str, why: tuple[GateResult, ...],
          numbers: dict[str, Any], base: dict[str, Any]) -> Transition:
    summary = "; ".join(f"{r.gate}: {r.reason}" for r in why)
    numbers = {**numbers, "trigger": [r.gate for r in why]}
    if action == "pause":
        return Transition("pause", f"ring {ring_name} paused: {summary}",
                          {"state": State.PAUSED.value, "paused_from": row.state, **base},
                          numbers, ring_name)
    return _rollback(plan, row, f"ring {ring_name} rolled back: {summary}", numbers, base)


def _watch(plan: Plan, row: RolloutRow, evidence: EvidenceFn | None,
           rollback_only: bool) -> Transition | None:
    """Harm check between soaks (waiting, paused): the deployed rings' sequential gates."""
    if row.deployed_index < 0 or evidence is None:
        return None
    ring = plan.rings[row.deployed_index]
    if not ring.gates.sequential:
        return None
    ev = evidence(row)
    if ev is None:
        return None
    results = _evaluate(plan, row.deployed_index, ev, legacy_due=False)
    hit = harm(tuple(r for r in results if r.verdict is Verdict.FAIL and
                     (not rollback_only or r.on_fail == "rollback")))
    if hit is None:
        return None
    numbers = {"ring": ring.name, "action": hit[0], "evidence": asdict(ev),
               "gates": [r.to_dict() for r in results],
               "cumulative_percent": cumulative_percent(plan, row.deployed_index)}
    return _stop(plan, row, ring.name, hit[0], hit[1], numbers, {})


def decide(plan: Plan, row: RolloutRow, now: float,
           evidence: EvidenceFn | None = None) -> Transition | Hold:
    """The next transition of ``row`` at ``now``, or why there is none. Pure."""
    if row.state in TERMINAL:
        return Hold(f"rollout is {row.state}")
    if row.state == State.PAUSED.value:
        stop = _watch(plan, row, evidence, rollback_only=True)
        return stop or Hold("paused: resume, roll back or abort it")
    ring = plan.rings[row.ring_index]
    if row.state == State.WAITING.value:
        stop = _watch(plan, row, evidence, rollback_only=False)
        if stop is not None:
            return stop
        if row.ring_index == _first_production(plan):
            soaked = None if row.staging_since is None else (now - row.staging_since) / 3600
            gate = staging_soak_gate(soaked, ring.gates.staging_soak_hours)
            if gate.verdict is not Verdict.PASS:
                return Hold(f"ring {ring.name} waits for the staging soak: {gate.reason}",
                            gate.to_dict())
        return _deploy(plan, row, now)
    # SOAKING
    assert row.soak_until is not None
    soaking = f"ring {ring.name} soaking until {iso(row.soak_until)}"
    sequential = ring.gates.sequential
    if now < row.soak_until and not sequential:
        return Hold(soaking, {"soak_until": row.soak_until})
    ev = evidence(row) if evidence is not None else None
    if ev is None:
        if now < row.soak_until:
            return Hold(soaking, {"soak_until": row.soak_until})
        return Hold(f"ring {ring.name} soak is over; give telemetry to evaluate it")
    started = row.ring_started_at if row.ring_started_at is not None else now
    min_soak_over = now >= started + ring.soak_hours * 3600
    legacy_due = now >= row.soak_until if ring.gates.legacy else min_soak_over
    results = _evaluate(plan, row.ring_index, ev, legacy_due)
    action, why = combine(results)
    summary = "; ".join(f"{r.gate}: {r.reason}" for r in why)
    if now < row.soak_until and action not in ("rollback", "pause") and not (
            action == "promote" and legacy_due and min_soak_over):
        # The common case while soaking: nothing to record, so build no audit numbers.
        return Hold(f"{soaking}; {summary or 'gates pass, minimum soak not over'}",
                    {"soak_until": row.soak_until}, results)
    numbers: dict[str, Any] = {"ring": ring.name, "action": action, "evidence": asdict(ev),
                               "gates": [r.to_dict() for r in results],
                               "cumulative_percent": cumulative_percent(plan, row.ring_index)}
    base: dict[str, Any] = {}
    if ev.baseline_drain_mean is not None and ring.production:
        # Remember the old firmware's drain: the last ring leaves no device on it to compare with.
        base["baseline_drain"] = ev.baseline_drain_mean
    if action in ("rollback", "pause"):
        return _stop(plan, row, ring.name, action, why, numbers, base)
    if action == "promote" and legacy_due and min_soak_over:
        if row.ring_index == len(plan.rings) - 1:
            return Transition("complete", f"ring {ring.name} passed every gate; rollout complete",
                              {"state": State.COMPLETE.value, **base}, numbers, ring.name)
        nxt = plan.rings[row.ring_index + 1]
        return Transition("promote", f"ring {ring.name} passed every gate; next: {nxt.name}",
                          {"state": State.WAITING.value, "ring_index": row.ring_index + 1, **base},
                          numbers, ring.name)
    if row.extensions < ring.gates.max_soak_extensions:
        return Transition(
            "extend", f"ring {ring.name}: no decision yet ({summary}); soak extended",
            {"soak_until": now + ring.soak_hours * 3600, "extensions": row.extensions + 1,
             **base}, numbers, ring.name)
    return Transition(
        "pause", f"ring {ring.name}: still no decision after {row.extensions} extensions "
        f"({summary})", {"state": State.PAUSED.value, "paused_from": row.state, **base},
        {**numbers, "trigger": [r.gate for r in why]}, ring.name)


def deployed_rings(plan: Plan, row: RolloutRow) -> list[str]:
    """Rings that have (or had) the candidate."""
    return [r.name for r in plan.rings[: row.deployed_index + 1]]


def _rollback(plan: Plan, row: RolloutRow, reason: str, numbers: dict[str, Any],
              extra: dict[str, Any] | None = None) -> Transition:
    rings = deployed_rings(plan, row)
    return Transition("rollback", reason, {"state": State.ROLLED_BACK.value, **(extra or {})},
                      {**numbers, "action": "rollback", "reverted_rings": rings,
                       "to_version": row.previous}, plan.rings[row.ring_index].name)


@dataclass(frozen=True)
class StepReport:
    rollout_id: str
    transitions: tuple[Transition, ...]
    hold: Hold | None
    state: str


class Controller:
    """Applies :func:`decide` and the manual commands to rollouts in a :class:`Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._plans: dict[str, Plan] = {}

    def plan_of(self, row: RolloutRow) -> Plan:
        # The plan is snapshotted at start: editing the file later cannot change a running rollout.
        # Parsed once per digest: a simulation steps the same rollout hundreds of times.
        plan = self._plans.get(row.plan_digest)
        if plan is None:
            plan = self._plans[row.plan_digest] = parse_plan(row.plan_text, row.plan_source)
        return plan

    @staticmethod
    def manifest_of(row: RolloutRow) -> Manifest:
        return manifest_from_dict(json.loads(row.manifest), f"rollout {row.id} manifest")

    def start(self, plan: Plan, plan_text: str, manifest: Manifest, *, now: float,
              hil: HilSummary | None = None, staging_since: float | None = None,
              rollout_id: str | None = None, actor: str = "cli",
              evidence: EvidenceFn | None = None) -> tuple[StepReport, bool]:
        """Create the rollout (idempotent for the same plan) and take the first steps.

        Returns the step report and whether the rollout was newly created.
        """
        rid = rollout_id or f"{plan.name}-{manifest.version}"
        self._plans.setdefault(plan.digest, plan)
        gate = hil_gate(hil, plan.gates.hil_required, plan.gates.hil_allow_skipped)
        existing = self.store.find(rid)
        if existing is not None:
            if existing.plan_digest != plan.digest:
                raise UsageError(f"rollout {rid} exists with a different plan", where=plan.source,
                                 hint="keep the plan unchanged, or start with a new --id")
            return self.step(rid, now=now, evidence=evidence, actor=actor), False
        if gate.verdict is not Verdict.PASS:
            raise StartBlocked(gate)
        if manifest.version == plan.previous_version:
            raise UsageError(f"candidate {manifest.version} equals artifact.previous_version",
                             where=plan.source, hint="a rollout must change the firmware")
        row = RolloutRow(
            id=rid, plan_name=plan.name, plan_digest=plan.digest, plan_text=plan_text,
            plan_source=plan.source, manifest=json.dumps(asdict(manifest), sort_keys=True),
            candidate=manifest.version, previous=plan.previous_version,
            state=State.WAITING.value, ring_index=0, deployed_index=-1, ring_started_at=None,
            soak_until=None,
            extensions=0, staging_since=staging_since, baseline_drain=None, paused_from=None,
            created_at=now, updated_at=now, rev=0)
        created = self.store.create(row, "start", actor,
                                    f"rollout of {manifest.version} started ({gate.reason})",
                                    {"hil": gate.to_dict(), "version": manifest.version,
                                     "secure_version": manifest.secure_version,
                                     "staging_since": staging_since})
        return self.step(rid, now=now, evidence=evidence, actor=actor), created

    def step(self, rollout_id: str, *, now: float, evidence: EvidenceFn | None = None,
             actor: str = "controller") -> StepReport:
        """Take every transition due at ``now``; each is its own transaction."""
        done: list[Transition] = []
        plan: Plan | None = None
        # Bounded: each ring can deploy, extend a few times and promote once.
        for _ in range(64):
            row = self.store.get(rollout_id)
            plan = plan or self.plan_of(row)
            res = decide(plan, row, now, evidence)
            if isinstance(res, Hold):
                return StepReport(rollout_id, tuple(done), res, row.state)
            if self.store.apply(rollout_id, row.rev, now, res.changes, res.event, actor,
                                res.reason, res.numbers, res.ring):
                done.append(res)
        row = self.store.get(rollout_id)
        return StepReport(rollout_id, tuple(done), Hold("step limit reached"), row.state)

    def _manual(self, rollout_id: str, now: float, actor: str, make: Callable[
            [Plan, RolloutRow], Transition | Hold]) -> StepReport:
        for _ in range(8):
            row = self.store.get(rollout_id)
            res = make(self.plan_of(row), row)
            if isinstance(res, Hold):
                return StepReport(rollout_id, (), res, row.state)
            if self.store.apply(rollout_id, row.rev, now, res.changes, res.event, actor,
                                res.reason, res.numbers, res.ring):
                return StepReport(rollout_id, (res,), None, res.changes.get("state", row.state))
        raise UsageError(f"rollout {rollout_id} keeps changing under this command",
                         hint="another controller is stepping it; retry")

    def pause(self, rollout_id: str, *, now: float, reason: str, actor: str = "operator"
              ) -> StepReport:
        def make(plan: Plan, row: RolloutRow) -> Transition | Hold:
            if row.state in TERMINAL or row.state == State.PAUSED.value:
                return Hold(f"already {row.state}; nothing to pause")
            return Transition("pause", f"paused by {actor}: {reason}",
                              {"state": State.PAUSED.value, "paused_from": row.state},
                              {"manual": True}, plan.rings[row.ring_index].name)
        return self._manual(rollout_id, now, actor, make)

    def resume(self, rollout_id: str, *, now: float, reason: str, actor: str = "operator"
               ) -> StepReport:
        def make(plan: Plan, row: RolloutRow) -> Transition | Hold:
            if row.state != State.PAUSED.value:
                return Hold(f"rollout is {row.state}, not paused; nothing to resume")
            ring = plan.rings[row.ring_index]
            if row.paused_from == State.WAITING.value:
                return Transition("resume", f"resumed by {actor}: {reason}",
                                  {"state": State.WAITING.value, "paused_from": None},
                                  {"manual": True}, ring.name)
            # A fresh soak window: the ring is judged again on new evidence, not waved through.
            return Transition("resume", f"resumed by {actor}: {reason}; ring {ring.name} soaks "
                              f"again for {ring.soak_hours:g} h",
                              {"state": State.SOAKING.value, "paused_from": None, "extensions": 0,
                               "soak_until": now + ring.soak_hours * 3600},
                              {"manual": True}, ring.name)
        return self._manual(rollout_id, now, actor, make)

    def abort(self, rollout_id: str, *, now: float, reason: str, actor: str = "operator"
              ) -> StepReport:
        def make(plan: Plan, row: RolloutRow) -> Transition | Hold:
            if row.state in TERMINAL:
                return Hold(f"already {row.state}; nothing to abort")
            # Like a halted Play release (notes §6.5): no new assignments, updated devices stay.
            return Transition("abort", f"aborted by {actor}: {reason}",
                              {"state": State.ABORTED.value},
                              {"manual": True, "kept_rings": deployed_rings(plan, row)},
                              plan.rings[row.ring_index].name)
        return self._manual(rollout_id, now, actor, make)

    def rollback(self, rollout_id: str, *, now: float, reason: str, actor: str = "operator"
                 ) -> StepReport:
        def make(plan: Plan, row: RolloutRow) -> Transition | Hold:
            # A completed or aborted rollout can still be rolled back: the devices keep the
            # candidate in both cases, and a problem may surface after the last ring.
            if row.state == State.ROLLED_BACK.value:
                return Hold("already rolled_back; nothing to roll back")
            return _rollback(plan, row, f"rolled back by {actor}: {reason}", {"manual": True})
        return self._manual(rollout_id, now, actor, make)
