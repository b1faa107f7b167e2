from __future__ import annotations

import pytest
from rollout_helpers import EXAMPLE_PLAN

from pytest_hilfarm.errors import UsageError
from pytest_hilfarm.rollout.fleet import (
    Fault,
    Fleet,
    format_timeline,
    parse_fault,
    simulate,
)
from pytest_hilfarm.rollout.plan import load_plan, parse_plan

PLAN = load_plan(EXAMPLE_PLAN)
TEXT = EXAMPLE_PLAN.read_text()


def run(devices: int, *faults: str, seed: int = 1):
    return simulate(PLAN, TEXT, devices, [parse_fault(f) for f in faults], seed=seed,
                    manifest=PLAN.load_manifest())


LADDER = "name: fw\n"  # the default ladder 1/5/25/100 %, no staging ring, default gates


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_crash_fault_stops_in_the_canary_with_blast_radius_of_that_ring(seed):
    r = simulate(parse_plan(LADDER), LADDER, 200_000, [parse_fault("crash:0.02")], seed=seed)
    canary = round(200_000 * 0.01)
    assert r.final_state == "rolled_back"
    assert r.stopped_ring == "canary"
    assert 0 < r.blast_radius <= canary
    assert r.reached_percent == 1
    assert "crash_rate" in r.stop_reason
    rollback = r.audit[-1]
    assert rollback.numbers["reverted_rings"] == ["canary"]
    assert r.timeline[-1].on_candidate == 0  # devices reverted in the model too


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_with_a_staging_ring_the_crash_never_gets_past_the_canary(seed):
    r = run(200_000, "crash:0.02", seed=seed)
    assert r.final_state in ("rolled_back", "paused")
    assert r.stopped_ring in ("staging", "canary")
    assert r.blast_radius <= round(200_000 * 0.01)


def test_good_firmware_reaches_the_whole_million_device_fleet():
    r = run(1_000_000)
    assert r.final_state == "complete"
    assert r.reached_percent == 100
    assert r.blast_radius == 1_000_000
    assert [e.event for e in r.audit].count("deploy") == 5
    text = format_timeline(r)
    assert "result: complete" in text and "blast radius: 1,000,000" in text


def test_battery_regression_pauses_in_staging():
    r = run(100_000, "battery:0.3")
    assert r.final_state == "paused" and r.stopped_ring == "staging"
    assert r.blast_radius == 0 and r.staging_exposed == 50


def test_hardware_scoped_boot_fault_rolls_back_at_canary():
    r = run(300_000, "boot:0.05@B")
    assert r.final_state == "rolled_back" and r.stopped_ring == "canary"
    assert "boot_failures" in r.stop_reason


def test_failing_hil_blocks_before_any_device():
    r = run(10_000, "hil:2")
    assert r.final_state == "blocked" and r.blast_radius == 0


def test_small_fleet_cannot_decide_and_pauses_instead_of_guessing():
    r = run(20_000)  # canary of 200 devices < min_devices 2000
    assert r.final_state == "paused" and r.stopped_ring == "canary"
    assert "still no decision" in r.stop_reason


def test_simulation_is_deterministic_per_seed():
    a, b = run(50_000, "crash:0.01", seed=5), run(50_000, "crash:0.01", seed=5)
    assert [e.numbers for e in a.audit] == [e.numbers for e in b.audit]


def test_targeting_restricts_the_modelled_fleet():
    plan = parse_plan("name: fw\ntargeting: {hardware_revisions: [C]}\n")
    fleet = Fleet(plan, 10_000, seed=3)
    c = fleet.hw_names.index("C")
    assert all(fleet.cells[i, 0] == c for i in fleet.available.nonzero()[0])
    assert 1500 < fleet.eligible < 2500
    with pytest.raises(UsageError, match="matches no modelled device"):
        Fleet(parse_plan("name: fw\ntargeting: {regions: [mars]}\n"), 100)


def test_cohort_model_draws_the_modelled_rates():
    # 1,000,000 devices on a 1 %/h crash fault for one hour: crash-hours ~ Binomial(n, 0.01).
    plan = parse_plan("name: fw\nrings:\n  - {name: all, percent: 100}\n")
    fleet = Fleet(plan, 1_000_000, [parse_fault("crash:1%/h")], seed=4)
    fleet.deploy(0)
    fleet.advance(1.0)
    assert 9_700 < fleet.events.sum() < 10_300  # 3 sd of the binomial
    assert fleet.crashed.sum() == fleet.events.sum()  # first hour: every crash is new
    assert fleet.hours.sum() == pytest.approx(1_000_000)


@pytest.mark.parametrize("text, fault", [
    ("crash:0.02", Fault("crash", 0.02)), ("boot=0.1@B", Fault("boot", 0.1, "B")),
    ("battery:0.3", Fault("battery", 0.3))])
def test_parse_fault(text, fault):
    assert parse_fault(text) == fault


@pytest.mark.parametrize("text", ["crash", "melt:0.1", "crash:x", "crash:2"])
def test_parse_fault_rejects(text):
    with pytest.raises(UsageError):
        parse_fault(text)
