"""Exact bounds against independent formulas, and the anytime false-alarm and miss guarantees
checked empirically on seeded Poisson/binomial paths looked at after every ingest."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import beta as beta_dist
from scipy.stats import chi2

from pytest_hilfarm.rollout import stats

LIMIT, DETECT, ALPHA, BETA = 0.001, 0.005, 0.05, 0.05


@pytest.mark.parametrize("k, exposure", [(0, 100.0), (1, 100.0), (3, 2500.0), (10, 4000.0)])
def test_garwood_matches_the_chi_square_form(k, exposure):
    lo, hi = stats.garwood(k, exposure, 0.95)
    assert hi == pytest.approx(chi2.ppf(0.95, 2 * k + 2) / 2 / exposure, rel=1e-9)
    assert lo == (pytest.approx(chi2.ppf(0.05, 2 * k) / 2 / exposure, rel=1e-9) if k else 0.0)


def test_garwood_zero_events_is_minus_log_alpha():
    assert stats.garwood(0, 1000.0, 0.95)[1] == pytest.approx(-math.log(0.05) / 1000.0)


@pytest.mark.parametrize("k, n", [(0, 10), (1, 10), (5, 200), (10, 10)])
def test_clopper_pearson_matches_the_beta_form(k, n):
    lo, hi = stats.clopper_pearson(k, n, 0.95)
    assert lo == (pytest.approx(beta_dist.ppf(0.05, k, n - k + 1)) if k else 0.0)
    assert hi == (pytest.approx(beta_dist.ppf(0.95, k + 1, n - k)) if k < n else 1.0)
    if k == 0:
        assert hi == pytest.approx(1 - 0.05 ** (1 / n))


def test_limit_zero_means_any_event_alarms():
    assert stats.poisson_log_alarm(0, 1e6, 0.0) == 0.0
    assert stats.poisson_log_alarm(1, 1e6, 0.0) == math.inf
    assert stats.binomial_log_alarm(1, 10_000, 0.0) == math.inf


def test_anytime_lower_bound_is_where_the_alarm_starts():
    k, exposure = 6, 300.0
    lower = stats.poisson_anytime_lower(k, exposure, ALPHA, cap=1.0)
    target = math.log(1 / ALPHA)
    assert stats.poisson_log_alarm(k, exposure, lower * 0.999, cap=1.0) >= target
    assert stats.poisson_log_alarm(k, exposure, lower * 1.01, cap=1.0) < target
    assert stats.garwood(k, exposure, 0.95)[0] > lower  # one look is tighter than every look


def test_exposure_to_accept():
    need = stats.poisson_exposure_to_accept(0, LIMIT, DETECT, BETA)
    assert need == pytest.approx(math.log(1 / BETA) / (DETECT - LIMIT))  # 749 device-hours
    assert stats.poisson_log_accept(0, need, LIMIT, DETECT) == pytest.approx(math.log(BETA))


# A rollout-shaped exposure schedule: device-hours added per hourly ingest (10 staging devices
# for a day, then a 30-device canary, then bigger rings), 120 looks.
SCHEDULE = np.array([10.0] * 24 + [30.0] * 48 + [110.0] * 24 + [510.0] * 24)
EXPOSURE = np.cumsum(SCHEDULE)


def _first_k(pred, exposure: float, start: int = 0) -> int:
    k = start
    while not pred(k, exposure):
        k += 1
    return k


def _paths(rate: float, n: int, seed: int) -> np.ndarray:
    """Cumulative event counts at every look for ``n`` seeded Poisson paths."""
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.poisson(rate * SCHEDULE, size=(n, len(SCHEDULE))), axis=1)


def _crossed(counts: np.ndarray, boundary: list[int]) -> float:
    return float((counts >= np.array(boundary)).any(axis=1).mean())


def test_false_alarm_holds_under_continuous_monitoring():
    """At the limit, the mixture test alarms on at most ~alpha of paths over 120 looks; the
    same looks with a fixed-sample exact bound alarm far more often (why it is not used)."""
    target = math.log(1 / ALPHA)
    mixture = [_first_k(lambda k, e: stats.poisson_log_alarm(k, e, LIMIT, cap=1.0) >= target, e)
               for e in EXPOSURE]
    naive = [_first_k(lambda k, e: stats.garwood(k, e, 1 - ALPHA)[0] > LIMIT, e)
             for e in EXPOSURE]
    counts = _paths(LIMIT, 20_000, seed=11)
    fa_mixture = _crossed(counts, mixture)
    fa_naive = _crossed(counts, naive)
    # Standard error at 5 % over 20,000 paths is 0.15 %.
    assert fa_mixture <= ALPHA + 0.005, fa_mixture
    assert fa_naive > 2 * ALPHA, fa_naive


def test_miss_rate_of_acceptance_holds_at_the_detect_rate():
    """At the detect rate, 'ruled out' (the promotion condition) is reached on <= beta of
    paths, however often it is checked."""
    counts = _paths(DETECT, 20_000, seed=12)
    # Largest count at which acceptance holds at each look (-1: none).
    accept = []
    for e in EXPOSURE:
        k = -1
        while stats.poisson_log_accept(k + 1, e, LIMIT, DETECT) <= math.log(BETA):
            k += 1
        accept.append(k)
    ever = float((counts <= np.array(accept)).any(axis=1).mean())
    assert ever <= BETA + 0.005, ever


def test_a_two_percent_per_hour_release_alarms_early():
    target = math.log(1 / (ALPHA * 0.75))
    boundary = [_first_k(lambda k, e: stats.poisson_log_alarm(k, e, LIMIT, cap=1.0) >= target, e)
                for e in EXPOSURE]
    counts = _paths(0.02, 5_000, seed=13)
    by_26h = (counts[:, :26] >= np.array(boundary[:26])).any(axis=1).mean()
    assert by_26h >= 0.9, by_26h


def test_binomial_false_alarm_over_batches():
    """Update attempts arrive ring by ring; at p = limit the alarm rate stays within alpha."""
    rng = np.random.default_rng(14)
    batches = np.array([10, 20, 80, 400, 1500])
    limit = 0.01
    n = np.cumsum(batches)
    target = math.log(1 / ALPHA)
    boundary = [_first_k(lambda k, m: stats.binomial_log_alarm(k, int(m), limit) >= target, m)
                for m in n]
    fails = np.cumsum(rng.binomial(batches, limit, size=(20_000, len(batches))), axis=1)
    rate = float((fails >= np.array(boundary)).any(axis=1).mean())
    assert rate <= ALPHA + 0.005, rate
