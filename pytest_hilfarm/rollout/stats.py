"""Exact bounds and anytime-valid sequential tests for rollout gates. Pure maths, no I/O.

Two kinds of evidence:

* **rates over exposure** (crash-hours or disconnected hours per device-hour): ``k`` events over
  ``E`` units of exposure, judged against a limit ``lam0``. Exact (Garwood) Poisson bounds for
  description; for decisions a mixture of likelihood ratios
  ``M = mean_j r_j**k * exp(-(r_j - 1) * lam0 * E)`` over alternatives ``r_j * lam0``.
* **proportions of attempts** (update attempts that failed to boot): ``k`` of ``n``. Exact
  (Clopper-Pearson) bounds for description; for decisions the binomial analogue of ``M``.

Every component ratio is a non-negative supermartingale whenever the true rate is at most the
limit, so their mean is one too and Ville's inequality bounds the chance that it *ever* reaches
``1/alpha`` by ``alpha``, however often it is looked at (docs/rollouts.md has the derivation).
The same argument with the roles swapped bounds the chance of ever accepting a rate at least
``detect`` by ``beta``. Nothing here knows about plans, rings or devices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

from scipy.special import betaincinv, gammaincinv

# Alternatives of the alarm mixture, as multiples of the limit, equally weighted. A spread of
# effect sizes: a gross failure (30x) is caught from its first few events, a moderate one (3x)
# once exposure builds up. Chosen by computing, for the 2,000-device plan, the chance of an alarm
# at 2 %/h within 300 device-hours and at 0.5 %/h within 3,000 (docs/rollouts.md).
RATIOS: tuple[float, ...] = (3.0, 10.0, 30.0)


def _logmeanexp(values: Sequence[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(v - top) for v in values) / len(values))


@lru_cache(maxsize=256)
def _ratios(limit: float, cap: float | None) -> tuple[float, ...]:
    """Mixture ratios whose alternative rate stays within ``cap`` (a share cannot exceed 1).

    Near the cap (a connectivity gate allows 10 % loss: at most 10x) the fixed grid has no
    room, so three ratios from 1.5x to the headroom (at most 10x) are used instead.
    """
    if cap is None or cap / limit >= RATIOS[-1]:
        return RATIOS
    top = min(10.0, cap / limit)
    if top <= 1.5:
        return (top,) if top > 1.0 else ()
    return (1.5, math.sqrt(1.5 * top), top)


@lru_cache(maxsize=256)
def _terms(limit: float, cap: float | None) -> tuple[tuple[float, float], ...]:
    """(log r, (r - 1) * limit) per mixture component: the per-look work is two multiplies."""
    return tuple((math.log(r), (r - 1.0) * limit) for r in _ratios(limit, cap))


def poisson_log_alarm(k: float, exposure: float, limit: float, cap: float | None = None) -> float:
    """Log of the mixture ratio ``M`` for a rate; ``inf`` when ``limit`` is 0 and ``k > 0``."""
    if limit <= 0:
        return math.inf if k > 0 else 0.0
    terms = _terms(limit, cap)
    if not terms:
        return -math.inf
    return _logmeanexp([k * lr - d * exposure for lr, d in terms])


def poisson_log_accept(k: float, exposure: float, limit: float, detect: float) -> float:
    """Log of ``(detect/limit)**k * exp(-(detect - limit) * E)``: small means "not as bad as
    ``detect``"; at or below ``log(beta)`` a rate of ``detect`` or worse is ruled out.
    """
    if k > 0 and limit <= 0:
        return math.inf
    log_ratio = k * math.log(detect / limit) if k > 0 else 0.0
    return log_ratio - (detect - limit) * exposure


def poisson_exposure_to_accept(k: float, limit: float, detect: float, beta: float) -> float:
    """Exposure at which :func:`poisson_log_accept` reaches ``log(beta)`` with no new events."""
    if k > 0 and limit <= 0:
        return math.inf
    log_ratio = k * math.log(detect / limit) if k > 0 else 0.0
    return (log_ratio - math.log(beta)) / (detect - limit)


def poisson_anytime_lower(k: float, exposure: float, alpha: float,
                          cap: float | None = None) -> float:
    """Lower end of the (1 - alpha) confidence sequence: the smallest limit not yet rejected.

    ``M`` falls as the limit rises, so bisection on the log scale finds the crossing.
    """
    if k <= 0 or exposure <= 0:
        return 0.0
    target = math.log(1.0 / alpha)
    lo, hi = 1e-12, max(k / exposure, 1e-12)
    if cap is not None:
        hi = min(hi, cap)
    if poisson_log_alarm(k, exposure, lo, cap) < target:
        return 0.0
    while poisson_log_alarm(k, exposure, hi, cap) >= target and hi < (cap or math.inf):
        hi *= 2.0
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if poisson_log_alarm(k, exposure, mid, cap) >= target:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1.0 + 1e-6:
            break
    return lo


def garwood(k: float, exposure: float, confidence: float) -> tuple[float, float]:
    """One-sided exact Poisson bounds on a rate (Garwood 1936), each at ``confidence``.

    Descriptive: right for one look at the data, not for repeated looks (the decisions use the
    mixture test). ``k`` may be fractional (disconnected hours); the gamma form takes it.
    """
    if exposure <= 0:
        return 0.0, math.inf
    a = 1.0 - confidence
    lower = float(gammaincinv(k, a)) / exposure if k > 0 else 0.0
    upper = float(gammaincinv(k + 1.0, confidence)) / exposure
    return lower, upper


def binomial_log_alarm(k: int, n: int, limit: float) -> float:
    """Binomial analogue of :func:`poisson_log_alarm`; ``limit`` 0 means any failure alarms."""
    if limit <= 0:
        return math.inf if k > 0 else 0.0
    ratios = _ratios(limit, 1.0)
    vals = []
    for r in ratios:
        p = min(r * limit, 1.0)
        if p >= 1.0:
            vals.append(math.inf if k == n else -math.inf)
            continue
        vals.append(k * math.log(p / limit) + (n - k) * math.log((1 - p) / (1 - limit)))
    return _logmeanexp(vals) if vals else -math.inf


def clopper_pearson(k: int, n: int, confidence: float) -> tuple[float, float]:
    """One-sided exact binomial bounds (Clopper-Pearson 1934), each at ``confidence``."""
    if n <= 0:
        return 0.0, 1.0
    a = 1.0 - confidence
    lower = float(betaincinv(k, n - k + 1, a)) if k > 0 else 0.0
    upper = float(betaincinv(k + 1, n - k, confidence)) if k < n else 1.0
    return lower, upper
