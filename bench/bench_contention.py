"""Contention benchmark for the file-based reservation backend: strict FIFO vs backfill.

8 processes each run tests drawn at random from a suite of 12 over 3 boards; each test asks for
its own fixed 1-3 boards and holds them its own 5-20 ms (plus or minus 10 %). Each process first
runs 20 tests (warm-up: the store then has real hold times, as a farm that ran the suite before
has; strict FIFO ignores them), then all wait for each other and run 50 measured tests. Each
policy runs ``--runs`` times, interleaved, in the same invocation. From the store's history it
checks that no board was ever granted twice at once (zero overlaps, warm-up included), and
reports, over the measured part, board utilisation (busy time / wall time per board, from the
first grant to the last release), the wait p50 / p99, the longest wait, and the uncontended
reserve/release latency (one process, 1000 cycles).

``--hold-scale K`` multiplies every hold by K: the targets' workload is K = 1 (holds of 5-20 ms,
so the hand-off between processes is a large share of each lease); K = 10 and K = 100 show the
same suite with holds closer to a real test's.

Run: ``python bench/bench_contention.py [--processes 8] [--leases 50] [--runs 3]
[--hold-scale 1]``. Prints markdown tables; exits 1 on any overlap.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_hilfarm.reservation import Owner, Policy, Reserver  # noqa: E402
from pytest_hilfarm.reservation.allocate import BoardInfo, BoardRequest  # noqa: E402
from pytest_hilfarm.store import BoardHealth, FarmStore  # noqa: E402

BOARDS = [BoardInfo(f"esp32-{i}", "esp32") for i in (1, 2, 3)]
POLICIES = {"strict FIFO": Policy(backfill=False), "backfill": Policy()}


@dataclass(frozen=True)
class SuiteTest:
    test_id: str
    count: int
    hold: float  # seconds


def suite(seed: int = 2026, hold_scale: float = 1.0) -> list[SuiteTest]:
    rng = random.Random(seed)
    return [SuiteTest(f"tests/test_rig.py::test_{n}", rng.randint(1, 3),
                      rng.uniform(0.005, 0.020) * hold_scale) for n in range(12)]


def _worker(root: str, policy: str, warmup: int, leases: int, seed: int, start_at: float,
            stagger: float | None, barrier: Any, started: Any, hold_scale: float) -> None:
    store = FarmStore(Path(root) / "farm.sqlite")
    options = {} if stagger is None else {"stagger_step": stagger}
    reserver = Reserver(BOARDS, Path(root) / "locks", store, **options,
                        policy=POLICIES[policy])
    tests = suite(hold_scale=hold_scale)
    rng = random.Random(seed)
    while time.time() < start_at:  # start together, so the first requests really contend
        time.sleep(0.001)
    for n in range(warmup + leases):
        if n == warmup:  # the history now holds real hold times; measure from here, together
            barrier.wait()
            started.put(time.time())
        test = rng.choice(tests)
        lease = reserver.reserve(BoardRequest(count=test.count), Owner.current(test.test_id),
                                 timeout=120)
        time.sleep(test.hold * rng.uniform(0.9, 1.1))
        lease.release()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


@dataclass(frozen=True)
class ContentionResult:
    leases: int
    overlaps: int
    wall_s: float
    utilisation: dict[str, float]  # busy time / wall time, per board
    wait_p50_s: float
    wait_p99_s: float
    longest_wait_s: float
    longest_wait_3_board_s: float

    @property
    def mean_utilisation(self) -> float:
        return statistics.mean(self.utilisation.values())


def contention(root: Path, policy: str, processes: int, warmup: int, leases: int,
               stagger: float | None = None, hold_scale: float = 1.0) -> ContentionResult:
    store = FarmStore(root / "farm.sqlite")
    for board in BOARDS:
        store.set_health(board.id, BoardHealth.GOOD, "bench setup")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes)
    started = ctx.Queue()
    start_at = time.time() + 1.5  # spawn start-up takes a while on 2 cores
    procs = [
        ctx.Process(target=_worker, args=(str(root), policy, warmup, leases, 1000 + i, start_at,
                                          stagger, barrier, started, hold_scale))
        for i in range(processes)
    ]
    for proc in procs:
        proc.start()
    measured_from = min(started.get(timeout=600) for _ in procs)
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"worker {proc.pid} failed with exit code {proc.exitcode}")
    everything = [r for r in store.history(limit=processes * (warmup + leases) * 2 + 1000)
                  if r.granted_at and r.boards]
    # Overlaps over the whole run, warm-up included; the figures over the measured part.
    assert_spans = _overlaps(everything)
    history = [r for r in everything if (r.granted_at or 0.0) >= measured_from]
    # Recorded spans lie inside the real lock holds (granted_at is taken after the locks are
    # taken, released_at before they are dropped), so disjoint real holds give disjoint spans
    # and any double grant shows up as an overlap here.
    utilisation: dict[str, float] = {}
    first = min(r.granted_at or 0.0 for r in history)
    last = max(r.released_at or 0.0 for r in history)
    for board in BOARDS:
        spans = [(r.granted_at or 0.0, r.released_at or 0.0) for r in history
                 if board.id in r.boards]
        utilisation[board.id] = sum(e - b for b, e in spans) / (last - first)
    waits = [r.wait_s for r in history]
    big = [r.wait_s for r in history if r.request.startswith("3 ")]
    return ContentionResult(
        leases=len(history),
        overlaps=assert_spans,
        wall_s=last - first,
        utilisation=utilisation,
        wait_p50_s=statistics.median(waits),
        wait_p99_s=_percentile(waits, 0.99),
        longest_wait_s=max(waits),
        longest_wait_3_board_s=max(big) if big else 0.0,
    )


def _overlaps(history: list[Any]) -> int:
    overlaps = 0
    for board in BOARDS:
        spans = sorted((r.granted_at or 0.0, r.released_at or float("inf")) for r in history
                       if board.id in r.boards)
        overlaps += sum(1 for (_, end), (begin, _) in zip(spans, spans[1:]) if begin < end)
    return overlaps


def uncontended(root: Path, cycles: int) -> dict[str, float]:
    store = FarmStore(root / "farm.sqlite")
    for board in BOARDS:
        store.set_health(board.id, BoardHealth.GOOD, "bench setup")
    reserver = Reserver(BOARDS, root / "locks", store)
    owner = Owner.current(test_id="bench-latency")
    reserve_ms: list[float] = []
    release_ms: list[float] = []
    for _ in range(cycles):
        t0 = time.perf_counter()
        lease = reserver.reserve(BoardRequest(count=1), owner, timeout=5)
        t1 = time.perf_counter()
        lease.release()
        t2 = time.perf_counter()
        reserve_ms.append((t1 - t0) * 1000)
        release_ms.append((t2 - t1) * 1000)
    return {
        "reserve_p50_ms": statistics.median(reserve_ms),
        "reserve_p99_ms": _percentile(reserve_ms, 0.99),
        "release_p50_ms": statistics.median(release_ms),
        "release_p99_ms": _percentile(release_ms, 0.99),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--leases", type=int, default=50, help="measured tests per process")
    parser.add_argument("--warmup", type=int, default=20,
                        help="tests per process first, to give the store real hold times")
    parser.add_argument("--runs", type=int, default=3, help="runs per policy (interleaved)")
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--stagger", type=float, default=None,
                        help="stagger step between waiters, seconds (default: the backend's)")
    parser.add_argument("--hold-scale", type=float, default=1.0,
                        help="multiply every test's hold time (default 1: 5-20 ms)")
    args = parser.parse_args(argv)
    results: dict[str, list[ContentionResult]] = {name: [] for name in POLICIES}
    with tempfile.TemporaryDirectory(prefix="bench-hilfarm-") as tmp:
        root = Path(tmp)
        for run in range(args.runs):
            for name in POLICIES:
                where = root / f"{name.replace(' ', '-')}-{run}"
                where.mkdir()
                results[name].append(contention(where, name, args.processes, args.warmup,
                                                args.leases, args.stagger, args.hold_scale))
        (root / "latency").mkdir()
        latency = uncontended(root / "latency", args.cycles)
    low, high = 5 * args.hold_scale, 20 * args.hold_scale
    print(f"## Contention: {args.processes} processes x {args.leases} tests (12-test suite, "
          f"1-3 boards, {low:g}-{high:g} ms each) over 3 boards, {args.runs} runs per policy\n")
    print("Medians over the runs; utilisation also as min-max.\n")
    print("| metric | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))

    def row(label: str, values: list[str]) -> None:
        print(f"| {label} | " + " | ".join(values) + " |")

    def med(name: str, key: str) -> float:
        return statistics.median(getattr(r, key) for r in results[name])

    row("leases granted (per run)", [f"{med(n, 'leases'):.0f}" for n in results])
    row("overlapping grants (all runs)", [str(sum(r.overlaps for r in results[n]))
                                          for n in results])
    row("mean utilisation", [
        f"**{med(n, 'mean_utilisation') * 100:.1f} %** "
        f"({min(r.mean_utilisation for r in results[n]) * 100:.1f}-"
        f"{max(r.mean_utilisation for r in results[n]) * 100:.1f})" for n in results])
    for board in BOARDS:
        row(f"utilisation {board.id}", [
            f"{statistics.median(r.utilisation[board.id] for r in results[n]) * 100:.1f} %"
            for n in results])
    row("wall time", [f"{med(n, 'wall_s'):.2f} s" for n in results])
    row("wait p50 / p99", [f"{med(n, 'wait_p50_s') * 1000:.1f} ms / "
                           f"{med(n, 'wait_p99_s') * 1000:.1f} ms" for n in results])
    row("longest wait (any, worst run)", [
        f"{max(r.longest_wait_s for r in results[n]) * 1000:.1f} ms" for n in results])
    row("longest wait of a 3-board request (worst run)", [
        f"{max(r.longest_wait_3_board_s for r in results[n]) * 1000:.1f} ms" for n in results])
    print(f"\n## Uncontended latency: 1 process, {args.cycles} x reserve(1 board) + release\n")
    print("| metric | p50 | p99 |")
    print("|---|---|---|")
    print(f"| reserve | {latency['reserve_p50_ms']:.2f} ms | {latency['reserve_p99_ms']:.2f} ms |")
    print(f"| release | {latency['release_p50_ms']:.2f} ms | {latency['release_p99_ms']:.2f} ms |")
    return 1 if any(r.overlaps for rs in results.values() for r in rs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
