"""Exposure-based sequential gates end to end: plans, strata, the controller, the seed's
2,000-device scenario and the small-fleet and slow-rollback problems it replaces."""

from __future__ import annotations

import pytest
from rollout_helpers import EXAMPLE_PLAN, ROOT, SEQ_PLAN

from pytest_hilfarm.errors import ConfigError
from pytest_hilfarm.rollout.advise import plan_for_fleet
from pytest_hilfarm.rollout.controller import Controller
from pytest_hilfarm.rollout.fleet import parse_fault, simulate
from pytest_hilfarm.rollout.gates import (
    RingEvidence,
    StratumEvidence,
    Verdict,
    evaluate_ring,
    sequential_gate,
)
from pytest_hilfarm.rollout.hil import HilSummary
from pytest_hilfarm.rollout.manifest import load_manifest
from pytest_hilfarm.rollout.plan import RateGate, load_plan, parse_plan
from pytest_hilfarm.rollout.store import Store
from pytest_hilfarm.rollout.telemetry import DeviceTelemetry, aggregate

FLEET_2000 = ROOT / "examples" / "rollout" / "fleet-2000.yaml"
CRASH = RateGate(0.001, "rollback", "device_hour", 0.005)

H = 3600.0
T0 = 1_800_000_000.0


def ev(hours: float, crashes: float = 0.0, attempts: int = 100, failed: int = 0,
       disconnected: float = 0.0, strata: tuple[StratumEvidence, ...] = ()) -> RingEvidence:
    return RingEvidence(devices=attempts, device_hours=hours, crash_events=crashes,
                        attempts=attempts, failed_attempts=failed, connectivity_hours=hours,
                        disconnected_hours=disconnected, strata=strata)


# -- plans ---------------------------------------------------------------------------------

def test_plan_says_which_definition_each_gate_uses():
    plan = parse_plan(SEQ_PLAN)
    g = plan.gates
    assert (g.crash_rate.per, g.crash_rate.detect) == ("device_hour", 0.005)
    assert g.connectivity.per == "device_hour"
    assert g.connectivity.detect == pytest.approx(0.8)  # default: twice the allowed loss
    assert (g.boot_failures.per, g.boot_failures.limit) == ("attempt", 0.0)
    assert not g.battery_enabled and g.sequential and not g.legacy
    old = load_plan(EXAMPLE_PLAN)  # no `per`: the original per-device definitions
    assert old.gates.crash_rate.per == "device" and not old.gates.sequential


@pytest.mark.parametrize("text, where, what", [
    ("name: fw\ngates:\n  crash_rate: {max: 0.01, per: device_hour, detect: 0.005}\n",
     "<plan>:3: gates.crash_rate.detect", "must be above the max"),
    ("name: fw\ngates:\n  crash_rate: {max: 0.01, detect: 0.05}\n",
     "<plan>:3: gates.crash_rate.detect", "applies to per: device_hour"),
    ("name: fw\ngates:\n  boot_failures: {max: 0, per: device_hour}\n",
     "<plan>:3: gates.boot_failures.per", "not one of device, attempt"),
    ("name: fw\nrings:\n  - {name: a, percent: 100, promote: maybe}\n",
     "<plan>:3: rings[0].promote", "not one of evidence, soak"),
])
def test_new_plan_keys_are_checked(text, where, what):
    with pytest.raises(ConfigError) as exc:
        parse_plan(text)
    assert exc.value.where == where and what in exc.value.what


def test_a_ring_override_of_the_limit_gets_its_own_detect():
    plan = parse_plan(SEQ_PLAN.replace("  - {name: canary, percent: 10, soak: 2h}",
                                       "  - {name: canary, percent: 10, soak: 2h, gates: "
                                       "{crash_rate: {max: 0.01}}}"))
    assert plan.rings[0].gates.crash_rate.detect == pytest.approx(0.05)
    assert plan.rings[1].gates.crash_rate.detect == 0.005


# -- gates ---------------------------------------------------------------------------------

def test_sequential_gate_verdicts():
    assert sequential_gate("crash_rate", CRASH, 0, 0, 0.95, 0.95).verdict is Verdict.INSUFFICIENT
    assert sequential_gate("crash_rate", CRASH, 0, 300, 0.95, 0.95).verdict is \
        Verdict.INCONCLUSIVE
    r = sequential_gate("crash_rate", CRASH, 0, 800, 0.95, 0.95)
    assert r.verdict is Verdict.PASS and r.numbers["exposure_needed"] == pytest.approx(749, abs=1)
    bad = sequential_gate("crash_rate", CRASH, 6, 300, 0.95, 0.95)
    assert bad.verdict is Verdict.FAIL and bad.on_fail == "rollback"
    assert bad.numbers["lower"] > 0.001 and bad.numbers["anytime_bound"] > 0.001


def test_any_failed_boot_fails_a_max_zero_gate():
    boot = RateGate(0.0, "rollback", "attempt")
    assert sequential_gate("boot_failures", boot, 0, 5000, 0.95, 0.95).verdict is Verdict.PASS
    assert sequential_gate("boot_failures", boot, 1, 5000, 0.95, 0.95).verdict is Verdict.FAIL


def test_connectivity_below_ninety_percent_fails():
    conn = RateGate(0.9, "rollback", "device_hour", 0.8)
    ok = sequential_gate("connectivity", conn, 2, 500, 0.95, 0.95)  # 99.6 % connected
    assert ok.verdict is Verdict.PASS and ok.numbers["rate"] == pytest.approx(0.996)
    low = sequential_gate("connectivity", conn, 150, 1000, 0.95, 0.95)  # 85 % connected
    assert low.verdict is Verdict.FAIL


def test_a_failure_confined_to_one_hardware_revision_is_not_averaged_away():
    strata = (StratumEvidence("hardware_revision", "A", 80, 1600, 0),
              StratumEvidence("hardware_revision", "B", 10, 200, 0),
              StratumEvidence("hardware_revision", "C", 10, 200, 4))
    evidence = ev(2000, crashes=4, strata=strata)
    pooled_only = parse_plan(SEQ_PLAN)
    results = evaluate_ring(pooled_only.rings[0], evidence, pooled_only.targeting)
    assert all(r.verdict is not Verdict.FAIL for r in results)  # 4/2000: pooled is quiet
    with_strata = parse_plan(SEQ_PLAN.replace("gates:", "targeting: {hardware_revisions: "
                                                        "[A, B, C]}\ngates:", 1))
    results = evaluate_ring(with_strata.rings[0], evidence, with_strata.targeting)
    failed = [r.gate for r in results if r.verdict is Verdict.FAIL]
    assert "crash_rate[hardware_revision=C]" in failed


def test_coverage_names_the_missing_stratum():
    plan = parse_plan(SEQ_PLAN.replace("gates:", "targeting: {hardware_revisions: [A, B, Z], "
                                                 "min_per_stratum: 2}\ngates:", 1))
    strata = (StratumEvidence("hardware_revision", "A", 5, 10), StratumEvidence(
        "hardware_revision", "B", 1, 2))
    results = evaluate_ring(plan.rings[0], ev(12, strata=strata), plan.targeting, coverage=True)
    cov = next(r for r in results if r.gate == "coverage")
    assert cov.verdict is Verdict.INSUFFICIENT
    assert "hardware_revision=B (1 of 2)" in cov.reason
    assert "hardware_revision=Z (0 of 2)" in cov.reason


# -- telemetry -----------------------------------------------------------------------------

def test_aggregate_counts_exposure_strata_and_caps_crash_loops():
    recs = [
        DeviceTelemetry("a", "2", crashes=100, hours=1.0, connected_ratio=1.0, hw_revision="C"),
        DeviceTelemetry("a", "2", crashes=0, hours=1.0, connected_ratio=0.5, hw_revision="C"),
        DeviceTelemetry("b", "2", crashes=1, hours=2.0, connected_ratio=1.0, hw_revision="A",
                        region="eu"),
        DeviceTelemetry("c", "1", rolled_back_from="2", hw_revision="A"),
        DeviceTelemetry("d", "1", battery_drain=20.0),
    ]
    e = aggregate(recs, "2", 0.9)
    assert e.device_hours == 4.0 and e.crash_events == 2.0  # the crash loop counts once
    assert e.disconnected_hours == pytest.approx(0.5) and e.connectivity_hours == 4.0
    assert (e.attempts, e.failed_attempts) == (3, 1)  # devices a, b, c; c rolled back
    by = {(s.dimension, s.value): s for s in e.strata}
    assert by[("hardware_revision", "C")].crash_events == 1.0
    assert by[("hardware_revision", "A")].devices == 2
    assert by[("region", "eu")].device_hours == 2.0


def test_records_without_hours_use_the_window():
    recs = [DeviceTelemetry("a", "2"), DeviceTelemetry("b", "2", crashes=1)]
    assert aggregate(recs, "2", 0.9).device_hours == 0.0
    e = aggregate(recs, "2", 0.9, window_hours=1.0)
    assert (e.device_hours, e.crash_events) == (2.0, 1.0)


# -- controller ----------------------------------------------------------------------------

def _start(store: Store, text: str = SEQ_PLAN) -> Controller:
    ctl = Controller(store)
    manifest = load_manifest(ROOT / "examples" / "rollout" / "manifest.json")
    ctl.start(parse_plan(text), text, manifest, now=T0, hil=HilSummary("h", 3, 0, 0, 0),
              staging_since=T0 - 48 * H)
    return ctl


def test_clear_harm_rolls_back_before_the_soak_ends():
    with Store(":memory:") as store:
        ctl = _start(store)
        r = ctl.step("fw-2.4.0", now=T0 + 0.5 * H, evidence=lambda row: ev(50, crashes=5))
        assert r.state == "rolled_back"
        last = store.audit("fw-2.4.0")[-1]
        assert last.numbers["trigger"] == ["crash_rate"] and last.at == T0 + 0.5 * H


def test_promotion_waits_for_the_minimum_soak_and_for_evidence():
    with Store(":memory:") as store:
        ctl = _start(store)
        plenty = ev(5000)
        hold = ctl.step("fw-2.4.0", now=T0 + H, evidence=lambda row: plenty).hold
        assert hold is not None and "minimum soak not over" in hold.reason
        few = ev(100)
        hold = ctl.step("fw-2.4.0", now=T0 + 2 * H, evidence=lambda row: few).hold
        assert hold is None or "monitoring" in hold.reason
        assert store.get("fw-2.4.0").state == "soaking"
        r = ctl.step("fw-2.4.0", now=T0 + 2.5 * H, evidence=lambda row: plenty)
        assert [t.event for t in r.transitions] == ["promote", "deploy"]


def test_a_paused_rollout_still_rolls_back_on_clear_harm():
    with Store(":memory:") as store:
        ctl = _start(store)
        ctl.pause("fw-2.4.0", now=T0 + 0.2 * H, reason="weekend")
        r = ctl.step("fw-2.4.0", now=T0 + 0.5 * H, evidence=lambda row: ev(60, failed=1))
        assert r.state == "rolled_back"
        assert store.audit("fw-2.4.0")[-1].numbers["trigger"] == ["boot_failures"]


# -- the seed's scenario and the problems it replaces --------------------------------------

def _run(plan_path, devices: int, *faults: str, seed: int = 1):
    plan = load_plan(plan_path)
    return simulate(plan, plan_path.read_text(), devices, [parse_fault(f) for f in faults],
                    seed=seed, timeline=False)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_2000_device_plan_completes_a_good_release_in_two_to_three_days(seed):
    r = _run(FLEET_2000, 2000, seed=seed)
    assert r.final_state == "complete" and r.blast_radius == 2000
    assert 48 <= r.hours <= 72, r.hours


def test_the_2000_device_plan_stops_a_two_percent_crash_within_hours():
    runs = [_run(FLEET_2000, 2000, "crash:2%/h", seed=s) for s in range(1, 41)]
    assert all(r.final_state == "rolled_back" for r in runs)
    slow = [(r.hours, r.first_production_hours) for r in runs
            if r.first_production_hours is not None and r.hours - r.first_production_hours > 2.0]
    # A release at 2 %/h has no crash in staging's 240 device-hours with probability 0.8 %:
    # only then can it reach the canary, which cannot tell it apart within 2 h.
    assert len(slow) <= 1, slow
    assert max(r.blast_radius for r in runs) <= 20  # never past the canary


def test_the_small_staging_ring_holds_a_release_that_crashed_there():
    """10 devices x 24 h cannot rule out the plan's 0.5 %/h, but a crash-free soak rules out
    the staging ring's own 1.4 %/h; one crash-hour keeps the release in staging (extended soak)
    instead of sending it to the canary, and more exposure without crashes then promotes it."""
    staging = load_plan(FLEET_2000).rings[0]
    assert staging.promote == "evidence" and staging.gates.crash_rate.detect == 0.014

    def crash(results):
        return next(r for r in results if r.gate == "crash_rate")

    assert crash(evaluate_ring(staging, ev(240.0))).verdict is Verdict.PASS
    held = crash(evaluate_ring(staging, ev(240.0, crashes=1)))
    assert held.verdict is Verdict.INCONCLUSIVE, held.reason
    assert crash(evaluate_ring(staging, ev(480.0, crashes=1))).verdict is Verdict.PASS


def test_a_bad_release_never_reaches_the_whole_2000_device_fleet():
    runs = [_run(FLEET_2000, 2000, "crash:0.5%/h", seed=s) for s in range(1, 16)]
    assert not [r for r in runs if r.final_state == "complete"]


def test_a_small_fleet_now_finishes_where_per_device_gates_could_not():
    old = _run(EXAMPLE_PLAN, 20_000)
    assert old.final_state == "paused" and "still no decision" in old.stop_reason
    plan = plan_for_fleet(20_000)
    result = simulate(parse_plan(plan.text), plan.text, 20_000, seed=1, timeline=False)
    assert result.final_state == "complete"


def test_a_crashing_release_on_300000_devices_is_stopped_within_hours_not_days():
    old = _run(EXAMPLE_PLAN, 300_000, "crash:0.02")
    assert old.final_state == "rolled_back" and old.hours == 48.0  # the issue's +48 h
    assert old.first_production_hours == 24.0  # a day of known-bad firmware on the canary
    # The same limit as the example plan (0.1 % of devices crash per day), as an exposure gate.
    plan = plan_for_fleet(300_000, crash_max=0.001 / 24, crash_detect=0.005 / 24)
    for seed in (1, 2, 3):
        new = simulate(parse_plan(plan.text), plan.text, 300_000, [parse_fault("crash:0.02")],
                       seed=seed, timeline=False)
        assert new.final_state == "rolled_back"
        assert new.first_production_hours is None or \
            new.hours - new.first_production_hours <= 3.0, new.hours
        assert new.blast_radius <= 3_000


def test_the_controller_names_a_stratum_the_staging_ring_cannot_cover():
    text = FLEET_2000.read_text().replace("hardware_revisions: [A, B, C]",
                                          "hardware_revisions: [A, B, C, D]")
    r = simulate(parse_plan(text), text, 2000, seed=1, timeline=False)
    assert r.final_state == "paused" and r.stopped_ring == "staging"
    assert "hardware_revision=D (0 of 2)" in r.stop_reason
    assert r.blast_radius == 0
