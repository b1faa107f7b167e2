"""Advice: how much testing a product needs, stage by stage, and a rollout plan that fits.

The rule of thumb from issue 6: include a stage when a field failure costs more than ten times
what the stage costs per release; some stages are required regardless (safety-critical products,
heavy hardware interaction, large fleets). :func:`plan_for_fleet` writes an exposure-based plan
sized for the fleet and states the risk it accepts (what a small fleet cannot rule out before
its bigger rings). Pure: inputs in, reasons and plan text out; nothing is run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pytest_hilfarm.errors import UsageError

from . import stats
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
        notes.append(f"a per-device crash gate ({crash_threshold:.1%} of devices) needs a canary "
                     f"of {need:,} devices ({share:.2g}% of the fleet) to pass with zero crashes "
                     f"at {confidence:.0%} confidence; an exposure gate (per: device_hour) "
                     "gathers its evidence from soak time instead")
    else:
        notes.append(f"the whole fleet ({fleet_size:,}) is smaller than the {need:,} devices a "
                     f"per-device {crash_threshold:.1%} crash gate needs: use exposure gates "
                     "(per: device_hour), which count device-hours, so soaking longer helps; "
                     "`--write-plan` writes such a plan for this fleet")
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


@dataclass(frozen=True)
class PlanAdvice:
    text: str  # the plan YAML
    risks: tuple[str, ...]
    expected_hours: float  # a good release, no crash: start to complete


def _round_up(rate: float) -> float:
    """``rate`` rounded up to two significant digits (0.01348 -> 0.014)."""
    step = 10.0 ** (math.floor(math.log10(rate)) - 1)
    return round(math.ceil(rate / step - 1e-9) * step, 12)


def plan_for_fleet(fleet_size: int, *, name: str = "firmware", crash_max: float = 0.001,
                   crash_detect: float = 0.005, connectivity_min: float = 0.90,
                   confidence: float = 0.95, power: float = 0.95,
                   hardware_revisions: tuple[str, ...] = (), regions: tuple[str, ...] = (),
                   connectivity_types: tuple[str, ...] = (), staging_hours: float = 24.0,
                   min_per_stratum: int = 2, command: str | None = None) -> PlanAdvice:
    """A 1 % -> 5 % -> 25 % -> 100 % plan with a staging ring, exposure gates and the seed's hard
    triggers (any failed boot, connectivity below ``connectivity_min``), sized so that a good
    release finishes for this fleet; ``risks`` says what it accepts to get there.
    """
    if fleet_size < 100:
        raise UsageError(f"fleet size {fleet_size} is below 100: a 1 % canary would hold no "
                         "device", where="--fleet-size",
                         hint="release to a fleet this small by hand, after HIL and staging")
    if not 0 < crash_max < crash_detect < 1:
        raise UsageError("need 0 < --crash-max < --crash-detect < 1", where="--crash-detect")
    alpha, beta = 1 - confidence, 1 - power
    staging = max(10, min(100, round(fleet_size * 0.005)))
    strata = [v for v in (hardware_revisions, regions, connectivity_types) if v]
    if strata:
        staging = max(staging, max(len(v) for v in strata) * min_per_stratum)
    canary = round(fleet_size * 0.01)
    need = stats.poisson_exposure_to_accept(0, crash_max, crash_detect, beta)
    staging_exposure = staging * staging_hours
    small = fleet_size < 10_000
    soaks = {"canary": 6.0, "early": 6.0, "broad": 6.0, "fleet": 12.0} if small else \
        {"canary": 12.0, "early": 12.0, "broad": 24.0, "fleet": 24.0}
    accept_in_canary = max(0.0, (need - staging_exposure) / (staging + canary))
    canary_hours = max(soaks["canary"], math.ceil(accept_in_canary))
    # Room for a few crashes of a good release before the canary's deadline pauses it.
    extensions = max(2, math.ceil(2 * canary_hours / soaks["canary"]) - 1)
    expected = staging_hours + canary_hours + soaks["early"] + soaks["broad"] + soaks["fleet"]
    # A staging ring too small to rule out `crash_detect` still has to rule out the worst rate
    # its own exposure can (what a crash-free soak rules out, rounded up to two digits): a
    # release that crashes there soaks longer, or alarms, instead of reaching the canary.
    staging_detect = None if staging_exposure >= need else _round_up(
        crash_max + math.log(1 / beta) / staging_exposure)
    risks = [
        f"false alarm: each gate stops a release that is within its limits with probability "
        f"<= {alpha:.0%} over the whole rollout, however often telemetry arrives",
        f"crash: a release crashing at {crash_detect:.2%}/h or worse is promoted out of a ring "
        f"with probability <= {beta:.0%}; rates between {crash_max:.2%}/h and "
        f"{crash_detect:.2%}/h may pass (ruling them out needs far more exposure)",
    ]
    if staging_detect is not None:
        # Promoted at the end of the first soak only with no crash-hour, which a release at
        # `crash_detect` shows with probability exp(-crash_detect * exposure); later promotions
        # (after crashes and extensions) are bounded by beta at `staging_detect` only.
        clean = math.exp(-crash_detect * staging_exposure)
        risks.append(
            f"staging ({staging} devices x {staging_hours:g} h = {staging_exposure:,.0f} "
            f"device-hours) cannot rule out {crash_detect:.2%}/h ({need:,.0f} device-hours "
            f"needed); it promotes once it rules out {staging_detect:.2%}/h, which a "
            f"crash-free soak does: a release at {staging_detect:.2%}/h or worse reaches the "
            f"canary ({canary} devices) with probability <= {beta:.0%}; one at "
            f"{crash_detect:.2%}/h has no crash in staging with probability {clean:.0%}, "
            f"reaches the canary and is held there; a crash in staging keeps the release there, "
            f"soaking, until the evidence decides")
    risks.append(f"boot: any failed first boot rolls the release back; a failure hitting a "
                 f"share f of devices passes a ring of n devices with probability (1 - f)^n, "
                 f"e.g. {(1 - 0.01) ** canary:.0%} for f = 1 % and the {canary}-device canary")
    risks.append(f"expected: a good release completes in about {expected:.0f} h "
                 f"({expected / 24:.1f} days): staging {staging_hours:g} h, canary about "
                 f"{canary_hours:g} h (the exposure to rule out {crash_detect:.2%}/h), then "
                 f"{soaks['early']:g} + {soaks['broad']:g} + {soaks['fleet']:g} h of minimum soak")

    def flow(values: tuple[str, ...]) -> str:
        return "[" + ", ".join(values) + "]"

    targeting = [f"  hardware_revisions: {flow(hardware_revisions)}" if hardware_revisions
                 else "", f"  regions: {flow(regions)}" if regions else "",
                 f"  connectivity_types: {flow(connectivity_types)}" if connectivity_types
                 else "", f"  min_per_stratum: {min_per_stratum}" if strata else ""]
    lines = [
        f"# Rollout plan for a fleet of {fleet_size:,} devices, written by",
        f"#   {command or f'hilfarm advise --fleet-size {fleet_size} --write-plan FILE'}",
        "# Risks it accepts (docs/rollouts.md explains each):",
        *(f"#  - {r}" for r in risks),
        "version: 1",
        f"name: {name}",
        "artifact:",
        "  manifest: manifest.json",
    ]
    targeting = [t for t in targeting if t]
    if targeting:
        lines += ["targeting:", *targeting]
    lines += [
        "gates:",
        f"  confidence: {confidence:g}",
        f"  power: {power:g}",
        f"  crash_rate: {{max: {crash_max:g}, per: device_hour, detect: {crash_detect:g}, "
        "on_fail: rollback}",
        f"  connectivity: {{min: {connectivity_min:g}, per: device_hour, on_fail: rollback}}",
        "  boot_failures: {max: 0, per: attempt, on_fail: rollback}",
        "  battery_drain: false" if small else "  battery_drain: {max_increase: 0.10, "
                                               "on_fail: pause}",
        f"  staging_soak: {{min: {staging_hours:g}h}}",
        f"  max_soak_extensions: {extensions}",
        "rings:",
        f"  - {{name: staging, production: false, devices: {staging}, min_devices: {staging}, "
        f"soak: {staging_hours:g}h, promote: evidence"
        + ("}" if staging_detect is None else
           f", gates: {{crash_rate: {{detect: {staging_detect:g}}}}}}}"),
    ]
    for ring, pct in (("canary", 1), ("early", 5), ("broad", 25), ("fleet", 100)):
        lines.append(f"  - {{name: {ring}, percent: {pct}, min_devices: {min(staging, 100)}, "
                     f"soak: {soaks[ring]:g}h}}")
    return PlanAdvice("\n".join(lines) + "\n", tuple(risks), expected)
