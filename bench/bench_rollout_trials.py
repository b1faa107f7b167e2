"""Benchmark and operating characteristics: seeded trials of the rollout plans.

Target: 1,000 seeded trials of the 2,000-device plan in < 60 s on a 2-core machine. Also prints
the operating characteristics the docs quote (false rollback, miss, time to decision, blast
radius) for the 2,000- and 1,000,000-device plans, and checks the mixture test's false-alarm
rate on many more seeded Poisson paths than the test suite uses.
Usage: python bench/bench_rollout_trials.py [--trials 1000] [--jobs 1] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pytest_hilfarm.rollout import stats  # noqa: E402
from pytest_hilfarm.rollout.fleet import parse_fault  # noqa: E402
from pytest_hilfarm.rollout.plan import load_plan  # noqa: E402
from pytest_hilfarm.rollout.trials import run_trials  # noqa: E402

PLANS = {"fleet-2000.yaml": 2000, "fleet-1m.yaml": 1_000_000}
SCENARIOS = (("good (no fault)", []), ("at the limit (crash 0.1%/h)", ["crash:0.1%/h"]),
             ("bad (crash 0.5%/h, the detect rate)", ["crash:0.5%/h"]),
             ("bad (crash 2%/h)", ["crash:2%/h"]),
             ("bad (crash 2%/h, hardware C only)", ["crash:2%/h@C"]),
             ("bad (boot failures 1%)", ["boot:1%"]),
             ("bad (40% of devices lose the mesh half the time: 80% connected)",
              ["connectivity:0.4"]))


def cpu() -> float:
    """User + system CPU seconds of this process and its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def row(label: str, s: dict, secs: float, cpu_secs: float) -> str:
    def p(x: float | None) -> str:
        return "-" if x is None else f"{x:.1%}"

    return (f"| {label} | {p(s['complete'])} | {p(s['rolled_back'])} | {p(s['paused'])} | "
            f"{s['hours_median']:.0f} h / {s['hours_p95']:.0f} h | "
            f"{p(s['stopped_within_2h_of_production'])} | {s['blast_radius_median']:,} / "
            f"{s['blast_radius_p95']:,} / {s['blast_radius_max']:,} | {secs:.1f} s "
            f"({cpu_secs:.1f} s CPU) |")


def false_alarm(paths: int, seed: int) -> tuple[float, float]:
    """Share of Poisson paths at the limit that ever alarm over 120 hourly looks."""
    schedule = np.array([10.0] * 24 + [30.0] * 48 + [110.0] * 24 + [510.0] * 24)
    exposure = np.cumsum(schedule)
    target = math.log(20)
    bound = []
    for e in exposure:
        k = 0
        while stats.poisson_log_alarm(k, e, 0.001, cap=1.0) < target:
            k += 1
        bound.append(k)
    rng = np.random.default_rng(seed)
    counts = np.cumsum(rng.poisson(0.001 * schedule, size=(paths, len(schedule))), axis=1)
    rate = float((counts >= np.array(bound)).any(axis=1).mean())
    return rate, math.sqrt(rate * (1 - rate) / paths)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="only the timed 2,000-device run")
    args = ap.parse_args()
    t = time.process_time()
    sum(range(10_000_000))
    calib = time.process_time() - t
    print(f"python {sys.version.split()[0]}, {args.trials:,} trials per scenario, "
          f"{args.jobs} process(es); load average {os.getloadavg()[0]:.1f}; "
          f"calibration sum(range(1e7)) {calib:.2f} s CPU")
    for name, devices in PLANS.items():
        path = ROOT / "examples" / "rollout" / name
        plan, text = load_plan(path), path.read_text()
        trials = args.trials if devices == 2000 else max(1, args.trials // 5)
        print(f"\n{name}: {devices:,} devices, {trials:,} trials each\n")
        print("| firmware | complete | rolled back | paused | decision median / p95 | "
              "stopped <= 2 h after first production deploy | blast radius median / p95 / "
              "max | wall time |")
        print("|---|---|---|---|---|---|---|---|")
        for label, faults in SCENARIOS:
            t, c = time.perf_counter(), cpu()
            o = run_trials(plan, text, devices, [parse_fault(f) for f in faults], trials,
                           seed=1, jobs=args.jobs, label=label)
            print(row(label, o.summary(), time.perf_counter() - t, cpu() - c), flush=True)
            if args.quick:
                return 0
    rate, se = false_alarm(200_000, seed=7)
    print(f"\nmixture test at the limit, 200,000 seeded paths x 120 hourly looks: "
          f"false alarm {rate:.2%} (+- {se:.2%}); budget 5 %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
