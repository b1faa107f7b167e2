"""Benchmark: a whole rollout over a modelled fleet of 10,000,000 devices (target: < 30 s and
< 2 GB on a 2-core machine).

Prints wall time and peak memory for a good release (reaches 100 %) and a crashing one (stops
early), for the original example plan and the exposure-based 1,000,000-device plan. Peak RSS
comes from resource.getrusage (whole process, includes the interpreter and numpy/scipy); the
Python-heap peak from tracemalloc is measured in a separate run because tracing slows
allocation down. Usage: python bench/bench_fleet.py [--devices N] [--plan PLAN ...]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pytest_hilfarm.rollout.fleet import parse_fault, simulate  # noqa: E402
from pytest_hilfarm.rollout.plan import load_plan  # noqa: E402


def rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(plan_path: Path, devices: int, faults: list[str], trace: bool) -> tuple[float, str, float]:
    plan = load_plan(plan_path)
    text = plan_path.read_text()
    if trace:
        tracemalloc.start()
    t = time.perf_counter()
    result = simulate(plan, text, devices, [parse_fault(f) for f in faults], seed=1,
                      manifest=plan.load_manifest())
    elapsed = time.perf_counter() - t
    peak = 0.0
    if trace:
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    summary = (f"{result.final_state}"
               + (f" in {result.stopped_ring}" if result.stopped_ring else "")
               + f" after {result.hours:g} h, reached {result.reached_percent:g}%, "
               f"blast radius {result.blast_radius:,}")
    return elapsed, summary, peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--devices", type=int, default=10_000_000)
    ap.add_argument("--plan", type=Path, action="append",
                    help="default: examples/rollout/plan.yaml and fleet-1m.yaml")
    args = ap.parse_args()
    plans = args.plan or [ROOT / "examples" / "rollout" / "plan.yaml",
                          ROOT / "examples" / "rollout" / "fleet-1m.yaml"]
    print(f"python {sys.version.split()[0]}, {args.devices:,} devices")
    base = rss_mib()
    for plan in plans:
        for label, faults in (("good release", []), ("crash:0.02", ["crash:0.02"]),
                              ("crash:2%/h", ["crash:2%/h"])):
            elapsed, summary, _ = run(plan, args.devices, faults, trace=False)
            print(f"{plan.name:<14} {label:<13} {elapsed:6.2f} s  peak RSS {rss_mib():7.1f} MiB "
                  f"(start {base:.1f} MiB)  -> {summary}")
    elapsed, summary, peak = run(plans[0], args.devices, [], trace=True)
    print(f"{'traced':<28} {elapsed:6.2f} s  tracemalloc peak {peak:7.1f} MiB (Python heap)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
