"""Operating characteristics of a plan: many seeded fleet simulations, summarised.

For a good firmware: how often the rollout wrongly rolls back or pauses, and how long it takes
to complete. For a bad one: how often it is missed (reaches the whole fleet), how soon it is
stopped (from the start, and from the first production deploy) and how many production devices
got it (blast radius). Each trial is :func:`~.fleet.simulate` with its own seed, so any trial
can be replayed alone with ``hilfarm fleet simulate --seed N``. Nothing here decides a gate.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from .fleet import Fault, SimResult, simulate
from .plan import Plan

# The bar for a fast stop: a firmware crashing 2 %/h stopped within 2 h of the canary.
FAST_STOP_HOURS = 2.0


@dataclass(frozen=True)
class Trial:
    seed: int
    state: str
    hours: float
    first_production_hours: float | None
    blast_radius: int
    stopped_ring: str | None

    @classmethod
    def of(cls, seed: int, r: SimResult) -> Trial:
        return cls(seed, r.final_state, r.hours, r.first_production_hours, r.blast_radius,
                   r.stopped_ring)

    @property
    def stopped(self) -> bool:
        return self.state in ("rolled_back", "paused", "aborted", "blocked")

    @property
    def hours_after_production(self) -> float | None:
        """Hours from the first production deploy to the stop; None if it never got there."""
        if self.first_production_hours is None:
            return None
        return self.hours - self.first_production_hours


def _quantile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


@dataclass(frozen=True)
class Outcomes:
    label: str
    faults: tuple[str, ...]
    devices: int
    trials: tuple[Trial, ...]

    def share(self, *states: str) -> float:
        return sum(t.state in states for t in self.trials) / len(self.trials)

    def summary(self) -> dict[str, Any]:
        ts = self.trials
        stopped = [t for t in ts if t.stopped]
        after = [t.hours_after_production for t in stopped]
        fast = sum(1 for a in after if a is None or a <= FAST_STOP_HOURS)
        return {
            "label": self.label, "faults": list(self.faults), "devices": self.devices,
            "trials": len(ts),
            "complete": self.share("complete"), "rolled_back": self.share("rolled_back"),
            "paused": self.share("paused"), "blocked": self.share("blocked"),
            "hours_median": _quantile([t.hours for t in ts], 0.5),
            "hours_p95": _quantile([t.hours for t in ts], 0.95),
            "stopped_before_production": (sum(a is None for a in after) / len(stopped)
                                          if stopped else None),
            "stopped_within_2h_of_production": fast / len(stopped) if stopped else None,
            "stop_hours_after_production_p95": _quantile([a for a in after if a is not None],
                                                         0.95),
            "blast_radius_median": _quantile([t.blast_radius for t in ts], 0.5),
            "blast_radius_p95": _quantile([t.blast_radius for t in ts], 0.95),
            "blast_radius_max": max(t.blast_radius for t in ts),
        }


def _one(args: tuple[Plan, str, int, tuple[Fault, ...], int]) -> Trial:
    plan, text, devices, faults, seed = args
    return Trial.of(seed, simulate(plan, text, devices, faults, seed=seed, timeline=False))


def run_trials(plan: Plan, text: str, devices: int, faults: Sequence[Fault], trials: int,
               seed: int = 1, jobs: int = 1, label: str = "") -> Outcomes:
    """``trials`` simulations with seeds ``seed .. seed + trials - 1``; ``jobs`` processes."""
    work = [(plan, text, devices, tuple(faults), seed + i) for i in range(trials)]
    jobs = max(1, min(jobs, os.cpu_count() or 1, trials))
    if jobs == 1:
        results = [_one(w) for w in work]
    else:
        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(_one, work, chunksize=max(1, trials // (jobs * 8))))
    return Outcomes(label, tuple(str(f) for f in faults), devices, tuple(results))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _h(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f} h"


def format_outcomes(outcomes: Sequence[Outcomes]) -> str:
    lines = []
    for o in outcomes:
        s = o.summary()
        faults = ", ".join(o.faults) or "none"
        lines.append(f"{o.label} (faults: {faults}), {s['trials']:,} trials on "
                     f"{o.devices:,} devices:")
        lines.append(f"  complete {_pct(s['complete'])}, rolled back {_pct(s['rolled_back'])}, "
                     f"paused {_pct(s['paused'])}"
                     + (f", blocked {_pct(s['blocked'])}" if s["blocked"] else ""))
        lines.append(f"  time to decision: median {_h(s['hours_median'])}, "
                     f"95th percentile {_h(s['hours_p95'])}")
        if s["stopped_before_production"] is not None:
            lines.append(f"  stopped: {_pct(s['stopped_before_production'])} before any "
                         f"production device, {_pct(s['stopped_within_2h_of_production'])} "
                         f"before or within {FAST_STOP_HOURS:g} h of the first production "
                         f"deploy (95th percentile after it: "
                         f"{_h(s['stop_hours_after_production_p95'])})")
        lines.append(f"  blast radius (production devices that got it): median "
                     f"{s['blast_radius_median']:,}, 95th percentile {s['blast_radius_p95']:,}, "
                     f"max {s['blast_radius_max']:,}")
    return "\n".join(lines)


def outcomes_json(outcomes: Sequence[Outcomes], per_trial: bool = False) -> list[dict[str, Any]]:
    out = []
    for o in outcomes:
        d = o.summary()
        if per_trial:
            d["per_trial"] = [asdict(t) for t in o.trials]
        out.append(d)
    return out
