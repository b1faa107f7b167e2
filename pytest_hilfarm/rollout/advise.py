"""Advice: how much testing a product needs, stage by stage, and why.

The rule of thumb from issue 6: include a stage when a field failure costs more than ten times
what the stage costs per release; some stages are required regardless (safety-critical products,
heavy hardware interaction, large fleets). Pure: inputs in, reasons out; nothing is run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pytest_hilfarm.errors import UsageError

from .gates import min_devices_to_pass

# Rough per-release costs (engineer time + rig time, in the user's currency); every one can be
# overridden with --stage-cost. Orders of magnitude matter here, not the exact values.
DEFAULT_STAGE_COSTS: tuple[tuple[str, float, str], ...] = (
    ("unit", 50.0, "host-side unit tests of logic and parsers"),
    ("integration", 200.0, "components together on the host (drivers faked)"),
    ("simulation", 500.0, "the virtual rack: real flashing, boot and OTA state machines"),
    ("hil", 2000.0, "the HIL suite on real boards in the rack"),
    ("staging", 5000.0, "a staging fleet of in-house devices soaking the release"),
)
COST_RATIO = 10.0
LARGE_FLEET = 10_000
HARDWARE = ("none", "some", "heavy")


@dataclass(frozen=True)
class StageAdvice:
    stage: str
    included: bool
    cost: float
    reason: str
    what: str


@dataclass(frozen=True)
class Advice:
    stages: tuple[StageAdvice, ...]
    field_failure_cost: float
    notes: tuple[str, ...]


def advise(fleet_size: int, safety_critical: bool, hardware: str, field_failure_cost: float,
           stage_costs: dict[str, float] | None = None, crash_threshold: float = 0.001,
           confidence: float = 0.95) -> Advice:
    """Decide each stage; ``field_failure_cost`` is what one defect reaching the fleet costs."""
    if fleet_size < 1:
        raise UsageError(f"fleet size {fleet_size} must be at least 1", where="--fleet-size")
    if hardware not in HARDWARE:
        raise UsageError(f"hardware interaction {hardware!r} is not one of {', '.join(HARDWARE)}",
                         where="--hardware")
    if field_failure_cost < 0:
        raise UsageError("field failure cost must not be negative", where="--field-failure-cost")
    costs = {name: cost for name, cost, _ in DEFAULT_STAGE_COSTS}
    for name, cost in (stage_costs or {}).items():
        if name not in costs:
            raise UsageError(f"unknown stage {name!r}", where="--stage-cost",
                             hint=f"stages: {', '.join(costs)}")
        costs[name] = cost
    out = []
    for name, _, what in DEFAULT_STAGE_COSTS:
        cost = costs[name]
        worth = field_failure_cost > COST_RATIO * cost
        rule = (f"field failure {field_failure_cost:,.0f} {'>' if worth else '<='} "
                f"{COST_RATIO:g} x stage cost {cost:,.0f}")
        forced = None
        if name == "unit":
            forced = "always: the cheapest place to catch a logic error"
        elif name == "hil" and hardware == "heavy":
            forced = "required: heavy hardware interaction (peripherals, radio, power) is what " \
                     "simulation does not model"
        elif name == "hil" and safety_critical:
            forced = "required: safety-critical firmware must be tested on the real chip, " \
                     "including its rollback path"
        elif name == "simulation" and hardware != "none" and safety_critical:
            forced = "required: fault injection (power loss mid-OTA, bad images) is only " \
                     "repeatable on the virtual rack"
        elif name == "staging" and safety_critical:
            forced = "required: a safety-critical release soaks on in-house devices first"
        elif name == "staging" and fleet_size >= LARGE_FLEET:
            forced = f"required: with {fleet_size:,} devices a 0.1 % escape hits " \
                     f"{math.ceil(fleet_size * 0.001):,} devices"
        if forced:
            out.append(StageAdvice(name, True, cost, f"{forced} ({rule})", what))
        else:
            out.append(StageAdvice(name, worth, cost, rule + ("" if worth else
                                   ": the stage costs more than the failures it prevents"), what))
    notes = []
    need = min_devices_to_pass(crash_threshold, confidence)
    share = need / fleet_size * 100
    if share <= 100:
        notes.append(f"canary: at least {need:,} devices ({share:.2g}% of the fleet) for a "
                     f"{crash_threshold:.1%} crash gate to pass with zero crashes at "
                     f"{confidence:.0%} confidence; smaller canaries can only catch gross "
                     "failures")
    else:
        notes.append(f"the whole fleet ({fleet_size:,}) is smaller than the {need:,} devices a "
                     f"{crash_threshold:.1%} crash gate needs: rely on HIL and staging, loosen "
                     "the gate for early rings, or soak longer")
    if safety_critical:
        notes.append("safety-critical: require manual approval (pause) between rings and set "
                     "crash and boot-failure gates to roll back, not pause")
    if hardware == "heavy":
        notes.append("cover every hardware revision in the HIL rack and in the canary "
                     "(targeting.hardware_revisions)")
    return Advice(tuple(out), field_failure_cost, tuple(notes))


def format_advice(a: Advice) -> str:
    lines = [f"field failure cost: {a.field_failure_cost:,.0f} (include a stage when it exceeds "
             f"{COST_RATIO:g}x the stage's cost)", ""]
    for s in a.stages:
        mark = "include" if s.included else "skip   "
        lines.append(f"  [{mark}] {s.stage:<12} cost {s.cost:>9,.0f}  {s.what}")
        lines.append(f"             why: {s.reason}")
    lines.append("")
    lines.append("pipeline: " + " -> ".join(s.stage for s in a.stages if s.included)
                 + " -> staged rollout")
    lines.extend(f"note: {n}" for n in a.notes)
    return "\n".join(lines)
