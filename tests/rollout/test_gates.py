from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_hilfarm.rollout.gates import (
    GateResult,
    RingEvidence,
    Verdict,
    battery_gate,
    combine,
    evaluate_ring,
    min_devices_to_pass,
    rate_ceiling,
    rate_floor,
    staging_soak_gate,
    wilson_bounds,
    z_for,
)
from pytest_hilfarm.rollout.hil import HilSummary, hil_gate
from pytest_hilfarm.rollout.plan import parse_plan

Z95 = z_for(0.95)


@pytest.mark.parametrize("k, n, z, lo, hi", [
    # Reference values computed by hand from Wilson's formula.
    (0, 20, 1.96, 0.0, 0.16113),
    (0, 10, 1.96, 0.0, 0.27753),
    (5, 10, 1.96, 0.23659, 0.76341),
    (10, 10, 1.96, 0.72247, 1.0),
    (1, 1000, 1.96, 0.00017654, 0.0056512),
])
def test_wilson_reference_values(k, n, z, lo, hi):
    got_lo, got_hi = wilson_bounds(k, n, z)
    assert got_lo == pytest.approx(lo, abs=2e-5)
    assert got_hi == pytest.approx(hi, abs=2e-5)


@given(st.integers(1, 100_000), st.data())
def test_wilson_brackets_the_observed_rate(n, data):
    k = data.draw(st.integers(0, n))
    lo, hi = wilson_bounds(k, n, Z95)
    assert 0.0 <= lo <= k / n + 1e-12
    assert k / n - 1e-12 <= hi <= 1.0


def test_twenty_device_canary_cannot_pass_by_luck():
    r = rate_ceiling("crash_rate", 0, 20, 0.001, 10, 0.95, "rollback")
    assert r.verdict is Verdict.INCONCLUSIVE
    assert r.numbers["upper"] > 0.1


@pytest.mark.parametrize("bad, n, verdict", [
    (0, 99, Verdict.INSUFFICIENT),      # below min_devices: no decision at all
    (50, 99, Verdict.INSUFFICIENT),     # not even an obviously bad one
    (0, 2000, Verdict.INCONCLUSIVE),    # 0/2000: upper 0.135 % still above 0.1 %
    (0, 3000, Verdict.PASS),            # 0/3000: upper 0.090 %
    (1, 10_000, Verdict.PASS),
    (4, 2000, Verdict.INCONCLUSIVE),    # 0.2 % observed, lower bound still under 0.1 %
    (5, 2000, Verdict.FAIL),            # 0.25 %: lower bound 0.12 %
    (20, 2000, Verdict.FAIL),           # 1 %: lower bound well above
])
def test_crash_rate_table(bad, n, verdict):
    r = rate_ceiling("crash_rate", bad, n, 0.001, 100, 0.95, "rollback")
    assert r.verdict is verdict
    assert r.numbers["bad"] == bad and r.numbers["devices"] == n
    assert r.numbers["threshold"] == 0.001
    if verdict is not Verdict.INSUFFICIENT:
        assert r.numbers["lower"] <= r.numbers["rate"] <= r.numbers["upper"]


@pytest.mark.parametrize("good, n, verdict", [
    (50, 50, Verdict.INSUFFICIENT),
    (1000, 1000, Verdict.PASS),
    (995, 1000, Verdict.INCONCLUSIVE),
    (950, 1000, Verdict.FAIL),
])
def test_connectivity_table(good, n, verdict):
    assert rate_floor("connectivity", good, n, 0.995, 100, 0.95, "pause").verdict is verdict


def test_min_devices_to_pass_matches_the_bound():
    n = min_devices_to_pass(0.001, 0.95)
    assert wilson_bounds(0, n, Z95)[1] < 0.001 <= wilson_bounds(0, n - 1, Z95)[1]
    assert n == 2703  # z^2 (1 - t) / t with the one-sided z = 1.645


@pytest.mark.parametrize("mean, sd, n, base, verdict", [
    (20.0, 2.0, 1000, 20.0, Verdict.PASS),
    (26.0, 2.0, 1000, 20.0, Verdict.FAIL),
    (22.0, 2.0, 1000, 20.0, Verdict.INCONCLUSIVE),
    (20.0, 2.0, 10, 20.0, Verdict.INSUFFICIENT),
    (20.0, 2.0, 1000, None, Verdict.INSUFFICIENT),
])
def test_battery_table(mean, sd, n, base, verdict):
    ev = RingEvidence(drain_n=n, drain_mean=mean, drain_sd=sd, baseline_drain_mean=base)
    r = battery_gate(ev, 0.10, 100, 0.95, "pause")
    assert r.verdict is verdict
    if base:
        assert r.numbers["baseline"] == base


@pytest.mark.parametrize("soaked, verdict", [
    (None, Verdict.INSUFFICIENT), (23.9, Verdict.INCONCLUSIVE), (24.0, Verdict.PASS)])
def test_staging_soak(soaked, verdict):
    assert staging_soak_gate(soaked, 24.0).verdict is verdict


def _g(gate: str, verdict: Verdict, on_fail: str = "pause") -> GateResult:
    return GateResult(gate, verdict, "", {}, on_fail)


@pytest.mark.parametrize("results, action", [
    ((_g("a", Verdict.PASS), _g("b", Verdict.PASS)), "promote"),
    ((_g("a", Verdict.PASS), _g("b", Verdict.INCONCLUSIVE)), "wait"),
    ((_g("a", Verdict.INSUFFICIENT), _g("b", Verdict.FAIL)), "pause"),
    ((_g("a", Verdict.FAIL), _g("b", Verdict.FAIL, "rollback")), "rollback"),
])
def test_combine_precedence(results, action):
    assert combine(results)[0] == action


def test_evaluate_ring_records_every_gate():
    ring = parse_plan("name: fw\n").rings[0]
    ev = RingEvidence(devices=5000, crashed=0, connected_ok=5000, connectivity_reported=5000,
                      drain_n=5000, drain_mean=20, drain_sd=1, baseline_drain_mean=20)
    results = evaluate_ring(ring, ev)
    assert [r.gate for r in results] == ["crash_rate", "connectivity", "battery_drain",
                                         "boot_failures"]
    assert all(r.verdict is Verdict.PASS for r in results)
    assert all(r.to_dict()["numbers"] for r in results)


@pytest.mark.parametrize("summary, required, skipped_ok, verdict", [
    (HilSummary("x", 10, 0, 0, 1), True, True, Verdict.PASS),
    (HilSummary("x", 10, 0, 0, 1), True, False, Verdict.FAIL),
    (HilSummary("x", 10, 1, 0, 0), True, True, Verdict.FAIL),
    (HilSummary("x", 10, 0, 2, 0), True, True, Verdict.FAIL),
    (HilSummary("x", 0, 0, 0, 0), True, True, Verdict.FAIL),
    (HilSummary("x", 3, 0, 0, 3), True, True, Verdict.FAIL),
    (None, True, True, Verdict.FAIL),
    (None, False, True, Verdict.PASS),
])
def test_hil_gate_table(summary, required, skipped_ok, verdict):
    assert hil_gate(summary, required, skipped_ok).verdict is verdict


def test_z_is_one_sided():
    assert math.isclose(Z95, 1.6448536, rel_tol=1e-6)
