"""Contention benchmark for the file-based reservation backend (issue 3, section 7).

8 processes each take 50 random 1- to 3-board leases over 3 boards, holding each 5-20 ms. From the
store's history it checks that no board was ever granted twice at once (zero overlaps), and reports
board utilisation (busy time / wall time per board), the longest wait, and the uncontended
reserve/release latency (one process, 1000 cycles).

Run: ``python bench/bench_contention.py [--processes 8] [--leases 50]``. Prints a markdown table.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_hilfarm.allocate import BoardInfo, BoardRequest  # noqa: E402
from pytest_hilfarm.reservation import Owner, Reserver  # noqa: E402
from pytest_hilfarm.store import BoardHealth, FarmStore  # noqa: E402

BOARDS = [BoardInfo(f"esp32-{i}", "esp32") for i in (1, 2, 3)]


def _worker(
    root: str, index: int, leases: int, seed: int, start_at: float, stagger: float
) -> None:
    store = FarmStore(Path(root) / "farm.sqlite")
    reserver = Reserver(BOARDS, Path(root) / "locks", store, stagger_step=stagger)
    rng = random.Random(seed)
    while time.time() < start_at:  # start together, so the first requests really contend
        time.sleep(0.001)
    for n in range(leases):
        request = BoardRequest(count=rng.randint(1, 3))
        lease = reserver.reserve(
            request, Owner.current(test_id=f"bench[{index}-{n}]"), timeout=120
        )
        time.sleep(rng.uniform(0.005, 0.020))
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


def contention(
    root: Path, processes: int, leases: int, stagger: float = 0.0005
) -> ContentionResult:
    store = FarmStore(root / "farm.sqlite")
    for board in BOARDS:
        store.set_health(board.id, BoardHealth.GOOD, "bench setup")
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 1.5  # spawn start-up takes a while on 2 cores
    procs = [
        ctx.Process(target=_worker, args=(str(root), i, leases, 1000 + i, start_at, stagger))
        for i in range(processes)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"worker {proc.pid} failed with exit code {proc.exitcode}")
    history = [r for r in store.history(limit=processes * leases * 2) if r.granted_at]
    # Recorded spans lie inside the real lock holds (granted_at is taken after the locks are
    # taken, released_at before they are dropped), so disjoint real holds give disjoint spans
    # and any double grant shows up as an overlap here.
    overlaps = 0
    utilisation: dict[str, float] = {}
    first = min(r.granted_at or 0.0 for r in history)
    last = max(r.released_at or 0.0 for r in history)
    for board in BOARDS:
        spans = sorted(
            (r.granted_at or 0.0, r.released_at or 0.0) for r in history if board.id in r.boards
        )
        for (_, end), (begin, _) in zip(spans, spans[1:]):
            overlaps += begin < end
        utilisation[board.id] = sum(e - b for b, e in spans) / (last - first)
    waits = [r.wait_s for r in history]
    big = [r.wait_s for r in history if r.request.startswith("3 ")]
    return ContentionResult(
        leases=len(history),
        overlaps=overlaps,
        wall_s=last - first,
        utilisation=utilisation,
        wait_p50_s=statistics.median(waits),
        wait_p99_s=_percentile(waits, 0.99),
        longest_wait_s=max(waits),
        longest_wait_3_board_s=max(big) if big else 0.0,
    )


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
    parser.add_argument("--leases", type=int, default=50)
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--stagger", type=float, default=0.0005,
                        help="stagger step between waiters, seconds")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hilfarm-bench-") as tmp:
        root = Path(tmp)
        (root / "contention").mkdir()
        (root / "latency").mkdir()
        result = contention(root / "contention", args.processes, args.leases, args.stagger)
        latency = uncontended(root / "latency", args.cycles)
    util = result.utilisation
    print(f"## Contention: {args.processes} processes x {args.leases} random 1-3 board leases "
          f"over 3 boards, held 5-20 ms\n")
    print("| metric | value |")
    print("|---|---|")
    print(f"| leases granted | {result.leases} |")
    print(f"| overlapping grants (from store history) | {result.overlaps} |")
    print(f"| wall time | {result.wall_s:.2f} s |")
    for board, share in util.items():
        print(f"| utilisation {board} | {share * 100:.1f} % |")
    print(f"| mean utilisation | {statistics.mean(util.values()) * 100:.1f} % |")
    print(f"| wait p50 / p99 | {result.wait_p50_s * 1000:.1f} ms / "
          f"{result.wait_p99_s * 1000:.1f} ms |")
    print(f"| longest wait (any) | {result.longest_wait_s * 1000:.1f} ms |")
    print(f"| longest wait (3-board request) | {result.longest_wait_3_board_s * 1000:.1f} ms |")
    print(f"\n## Uncontended latency: 1 process, {args.cycles} x reserve(1 board) + release\n")
    print("| metric | p50 | p99 |")
    print("|---|---|---|")
    print(f"| reserve | {latency['reserve_p50_ms']:.2f} ms | {latency['reserve_p99_ms']:.2f} ms |")
    print(f"| release | {latency['release_p50_ms']:.2f} ms | {latency['release_p99_ms']:.2f} ms |")
    return 1 if result.overlaps else 0


if __name__ == "__main__":
    raise SystemExit(main())
