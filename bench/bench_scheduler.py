"""Pure scheduling simulation: a 500-board farm and 200 CI jobs, strict FIFO vs EASY backfill.

No boards, locks or database: the policy itself (``pytest_hilfarm.reservation.scheduler``) runs
in simulated time through ``pytest_hilfarm.reservation.simulate``, once with ``Policy(backfill=
False)`` (strict arrival order within a priority, the old policy) and once with backfill, on the
same seeded workload:

- 500 boards: 300 esp32, 150 esp32c3, 50 esp32s3 (a tenth of them with a "mesh-radio" feature);
- 200 CI jobs arriving at random (Poisson, one every 30 s on average), each asking for 1-8
  boards (70 %), 16-64 (22 %) or 100-250 (8 %, integration runs) of one chip, holding them for
  a log-normal 2-60 minutes;
- the scheduler's expected hold is the real one times 0.8-1.6 (history is imprecise); a tenth
  of the jobs have no history; PR jobs (70 %) have priority 10, nightly ones -10.

Reports utilisation (busy board-time over boards x time from the first arrival to the last end),
wait p50 / p99 / max, the longest wait of a 100+ board job, and overlaps (boards given to two jobs
at once; must be 0). Run: ``python bench/bench_scheduler.py [--jobs 200 --boards 500 --seed 1]``.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_hilfarm.reservation.allocate import BoardInfo, BoardRequest  # noqa: E402
from pytest_hilfarm.reservation.scheduler import Policy  # noqa: E402
from pytest_hilfarm.reservation.simulate import Job, Run, simulate  # noqa: E402

CHIPS = (("esp32", 0.6), ("esp32c3", 0.3), ("esp32s3", 0.1))


def farm(boards: int, rng: random.Random) -> list[BoardInfo]:
    result = []
    for chip, share in CHIPS:
        for n in range(1, round(boards * share) + 1):
            features = frozenset({"mesh-radio"}) if rng.random() < 0.1 else frozenset()
            result.append(BoardInfo(f"{chip}-{n}", chip, features))
    return result


def workload(jobs: int, boards: list[BoardInfo], rng: random.Random) -> list[Job]:
    per_chip = {chip: sum(b.chip == chip for b in boards) for chip, _ in CHIPS}
    result = []
    at = 0.0
    for n in range(jobs):
        at += rng.expovariate(1 / 30.0)
        chip = rng.choices([c for c, _ in CHIPS], [w for _, w in CHIPS])[0]
        size = rng.random()
        count = (rng.randint(1, 8) if size < 0.70 else rng.randint(16, 64) if size < 0.92
                 else rng.randint(100, 250))
        count = min(count, per_chip[chip])
        hold = min(3600.0, max(120.0, rng.lognormvariate(math.log(600), 0.8)))
        expected = None if rng.random() < 0.1 else hold * rng.uniform(0.8, 1.6)
        priority = 10 if rng.random() < 0.7 else -10
        result.append(Job(f"job{n}", at, BoardRequest(count, chip), hold, expected, priority))
    return result


def overlaps(runs: list[Run]) -> int:
    spans: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        for board in run.boards:
            spans.setdefault(board, []).append((run.start, run.end))
    bad = 0
    for items in spans.values():
        items.sort()
        bad += sum(1 for a, b in zip(items, items[1:]) if a[1] > b[0])
    return bad


def measure(boards: list[BoardInfo], jobs: list[Job], policy: Policy) -> dict[str, float]:
    started = time.perf_counter()
    runs = simulate(boards, jobs, policy)
    cpu = time.perf_counter() - started
    first = min(j.arrival for j in jobs)
    last = max(r.end for r in runs)
    busy = sum((r.end - r.start) * len(r.boards) for r in runs)
    waits = sorted(r.wait for r in runs)
    big = [r.wait for r in runs if r.job.request.count >= 100]
    return {
        "jobs": len(runs),
        "utilisation": busy / (len(boards) * (last - first)),
        "makespan_h": (last - first) / 3600,
        "wait_p50_min": statistics.median(waits) / 60,
        "wait_p99_min": statistics.quantiles(waits, n=100)[98] / 60,
        "wait_max_min": waits[-1] / 60,
        "big_wait_max_min": max(big) / 60 if big else 0.0,
        "backfilled": sum(r.backfilled for r in runs),
        "overlaps": overlaps(runs),
        "cpu_s": cpu,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--boards", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    boards = farm(args.boards, rng)
    jobs = workload(args.jobs, boards, rng)
    results = {name: measure(boards, jobs, policy) for name, policy in
               (("strict FIFO", Policy(backfill=False)), ("backfill", Policy()))}
    print(f"## Scheduling simulation: {len(boards)} boards, {args.jobs} CI jobs "
          f"(seed {args.seed})\n")
    print("| metric | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    rows = [("jobs run", "jobs", "{:.0f}"), ("utilisation", "utilisation", "{:.1%}"),
            ("first arrival to last end", "makespan_h", "{:.2f} h"),
            ("wait p50", "wait_p50_min", "{:.1f} min"), ("wait p99", "wait_p99_min", "{:.1f} min"),
            ("wait max", "wait_max_min", "{:.1f} min"),
            ("longest wait of a 100+ board job", "big_wait_max_min", "{:.1f} min"),
            ("jobs started by backfill", "backfilled", "{:.0f}"),
            ("overlapping grants", "overlaps", "{:.0f}"),
            ("simulation CPU time", "cpu_s", "{:.1f} s")]
    for label, key, fmt in rows:
        print(f"| {label} | " + " | ".join(fmt.format(r[key]) for r in results.values()) + " |")
    return 1 if any(r["overlaps"] for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
