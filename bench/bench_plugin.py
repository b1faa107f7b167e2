"""Plugin benchmark (issue 4, section 6): xdist speedup, second-run setup, per-test overhead.

All runs are real ``pytest`` subprocesses on the built-in virtual rack, with the candidate
firmware ``write_build_dir(..., "esp32", pad_to="1MB")`` passed as ``--hil-firmware``. A small
conftest plugin in the generated suite records each test's setup / call / teardown durations,
start and stop times and the ``hil.*.flash_seconds`` property (from the controller's reports, so
xdist runs are covered) into a JSON-lines file.

(a) 30 single-board tests (``@pytest.mark.hil(count=1, chip="esp32")``; the rack has three
    ESP32). Each test holds its board for 0.5 s: one ``command("status")`` round trip, then
    ``time.sleep`` until 0.5 s after the test body started (a sleep, so the "work" costs no CPU
    on a shared 2-core machine). ``-n 1`` vs ``-n 3`` with unchanged firmware (a warm-up run
    flashed it), interleaved, ``--runs`` each. Speedup from the wall time of the whole pytest
    subprocess, and from the test span (first setup start to last teardown end, which leaves
    out interpreter and xdist start-up).
(b) six single-board tests with ``-n 1``; run 1 is the first run of a new firmware build (a
    new app version; the boards hold the previous build, so each board's first test flashes),
    run 2 is the same command again (unchanged firmware: nothing is flashed). Ratio of the
    median setup time of the tests that flashed in run 1 to the median setup time in run 2, and
    of the median setup over all tests.
(c) twenty tests that do nothing (``def test(hil_device): pass``), ``-n 1``, with
    ``--hil-no-flash`` and with unchanged firmware: per-test setup + teardown (reserve, health
    lookup, console open, reset + boot wait, flash skip check, release, result record, log
    attach), median over all tests of all runs. A plain test without the fixture is shown for
    pytest's own per-test cost.

Uses HILFARM_SIM_DIR / HILFARM_STATE_DIR if set, else temporary ones; stops the virtual rack at
the end. Run: ``python bench/bench_plugin.py [--runs 3]``. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFTEST = '''\
import json, os, time

import pytest

_worker = None


def pytest_configure(config):
    global _worker
    _worker = hasattr(config, "workerinput")


def pytest_runtest_logreport(report):
    if _worker:
        return
    path = os.environ.get("BENCH_TIMINGS")
    if not path:
        return
    flash = sum(float(v) for k, v in report.user_properties
                if k.startswith("hil.") and k.endswith(".flash_seconds"))
    with open(path, "a") as fh:
        fh.write(json.dumps({"nodeid": report.nodeid, "when": report.when,
                             "outcome": report.outcome, "duration": report.duration,
                             "start": report.start, "stop": report.stop,
                             "flash_seconds": flash}) + "\\n")
'''

SUITE = '''\
import time

import pytest


@pytest.mark.hil(count=1, chip="esp32")
@pytest.mark.parametrize("i", range(30))
def test_busy(hil_device, i):
    t0 = time.monotonic()
    assert "uptime_s:" in hil_device.command("status")
    time.sleep(max(0.0, 0.5 - (time.monotonic() - t0)))


@pytest.mark.hil(count=1, chip="esp32")
@pytest.mark.parametrize("i", range(6))
def test_six(hil_device, i):
    assert "uptime_s:" in hil_device.command("status")


@pytest.mark.hil(count=1, chip="esp32")
@pytest.mark.parametrize("i", range(20))
def test_nothing(hil_device, i):
    pass


@pytest.mark.parametrize("i", range(20))
def test_plain(i):
    pass
'''


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _env_dirs() -> None:
    for var in ("HILFARM_SIM_DIR", "HILFARM_STATE_DIR"):
        if not os.environ.get(var):
            os.environ[var] = tempfile.mkdtemp(prefix=f"bench-hilfarm-{var[9:12].lower()}-")


class Suite:
    def __init__(self, root: Path, extra: list[str]) -> None:
        self.root = root
        self.extra = extra
        (root / "pytest.ini").write_text("[pytest]\n")
        (root / "conftest.py").write_text(CONFTEST)
        (root / "test_bench.py").write_text(SUITE)
        self.n = 0

    def run(self, select: str, firmware: Path, *extra: str) -> tuple[float, list[dict]]:
        self.n += 1
        timings = self.root / f"timings-{self.n}.jsonl"
        env = dict(os.environ, BENCH_TIMINGS=str(timings))
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
             "--rootdir", str(self.root), "-c", str(self.root / "pytest.ini"),
             "-k", select, "test_bench.py", "--hil-firmware", str(firmware), *self.extra, *extra],
            cwd=self.root, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"pytest -k {select} {' '.join(extra)} failed:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
        rows = [json.loads(line) for line in timings.read_text().splitlines()]
        return wall, rows


def phase(rows: list[dict], when: str) -> dict[str, dict]:
    return {r["nodeid"]: r for r in rows if r["when"] == when}


def span(rows: list[dict]) -> float:
    return max(r["stop"] for r in rows) - min(r["start"] for r in rows)


def per_test_overhead(rows: list[dict]) -> list[float]:
    setup, teardown = phase(rows, "setup"), phase(rows, "teardown")
    return [setup[k]["duration"] + teardown[k]["duration"] for k in setup]


def med(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--pytest-arg", action="append", default=[],
                    help="extra pytest argument for every run (repeat), e.g. "
                    "--pytest-arg=-pno:hypothesispytest")
    ap.add_argument("--only-xdist", action="store_true", help="run part (a) only")
    args = ap.parse_args()
    _env_dirs()
    from pytest_hilfarm.sim.appbuild import write_build_dir

    tmp = Path(tempfile.mkdtemp(prefix="bench-hilfarm-plugin-"))
    builds = [tmp / f"build-{i}" for i in range(args.runs + 1)]
    for i, b in enumerate(builds):
        write_build_dir(b, "esp32", "bench", f"1.{i}", pad_to="1MB")
    suite_dir = tmp / "suite"
    suite_dir.mkdir()
    suite = Suite(suite_dir, args.pytest_arg)
    loads = [loadavg()]
    fw = builds[0]
    try:
        # Warm-up: starts the rack, health-checks and flashes all three ESP32 boards.
        suite.run("test_busy", fw, "-n", "3")
        loads.append(loadavg())
        # (a) -n 1 vs -n 3, firmware unchanged, interleaved.
        wall1, wall3, span1, span3 = [], [], [], []
        for _ in range(args.runs):
            w, rows = suite.run("test_busy", fw, "-n", "1")
            wall1.append(w)
            span1.append(span(rows))
            w, rows = suite.run("test_busy", fw, "-n", "3")
            wall3.append(w)
            span3.append(span(rows))
            assert not any(r["flash_seconds"] for r in rows), "unexpected flash"
        loads.append(loadavg())
        # (b) first run of a new build vs the second run.
        first_flashing, first_all, second_all, flashed_counts = [], [], [], []
        for i in range(0 if args.only_xdist else args.runs):
            new = builds[i + 1]
            _, rows = suite.run("test_six", new, "-n", "1")
            setup = phase(rows, "setup")
            flashing = [r["duration"] for r in setup.values() if r["flash_seconds"] > 0]
            flashed_counts.append(len(flashing))
            first_flashing.extend(flashing)
            first_all.extend(r["duration"] for r in setup.values())
            _, rows = suite.run("test_six", new, "-n", "1")
            setup = phase(rows, "setup")
            assert not any(r["flash_seconds"] for r in setup.values()), "second run flashed"
            second_all.extend(r["duration"] for r in setup.values())
        fw = builds[-1]
        loads.append(loadavg())
        # (c) per-test overhead with flashing skipped.
        noflash, unchanged, plain = [], [], []
        for _ in range(0 if args.only_xdist else args.runs):
            _, rows = suite.run("test_nothing", fw, "-n", "1", "--hil-no-flash")
            noflash.extend(per_test_overhead(rows))
            _, rows = suite.run("test_nothing", fw, "-n", "1")
            unchanged.extend(per_test_overhead(rows))
            _, rows = suite.run("test_plain", fw, "-n", "1")
            plain.extend(per_test_overhead(rows))
        loads.append(loadavg())
    finally:
        subprocess.run([sys.executable, "-m", "pytest_hilfarm", "sim", "down"],
                       capture_output=True, check=False)

    w1, w3, s1, s3 = med(wall1), med(wall3), med(span1), med(span3)
    print(f"pytest-xdist via `pytest -n`, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"load average at each stage: {', '.join(loads)}; medians of {args.runs} runs"
          + (f"; extra pytest args: {' '.join(args.pytest_arg)}" if args.pytest_arg else "")
          + "\n")
    if args.only_xdist:
        print("| what | figure | ratio | target | met? |")
        print("|---|---:|---:|---|---|")
        print(f"| (a) `-n 1` wall {w1:.2f} s, `-n 3` wall {w3:.2f} s | {w3:.2f} s | "
              f"{w1 / w3:.2f}x speedup | >= 2.7x | {'yes' if w1 / w3 >= 2.7 else 'NO'} |")
        print(f"| (a) test span: `-n 1` {s1:.2f} s, `-n 3` {s3:.2f} s | {s3:.2f} s | "
              f"{s1 / s3:.2f}x speedup | (info) | - |")
        print("\nall runs (s): -n 1 wall " + ", ".join(f"{x:.2f}" for x in wall1)
              + "; -n 3 wall " + ", ".join(f"{x:.2f}" for x in wall3))
        return 0
    ff, fa, sa = med(first_flashing), med(first_all), med(second_all)
    nf, uc, pl = med(noflash), med(unchanged), med(plain)
    print("| what | figure | ratio | target | met? |")
    print("|---|---:|---:|---|---|")
    print(f"| (a) 30 x 0.5 s tests, `-n 1`, pytest wall | {w1:.2f} s | - | - | - |")
    print(f"| (a) 30 x 0.5 s tests, `-n 3`, pytest wall | {w3:.2f} s | {w1 / w3:.2f}x speedup "
          f"| >= 2.7x | {'yes' if w1 / w3 >= 2.7 else 'NO'} |")
    print(f"| (a) same, test span only (first setup start to last teardown end): "
          f"`-n 1` {s1:.2f} s, `-n 3` {s3:.2f} s | - | {s1 / s3:.2f}x speedup | (info) | - |")
    print(f"| (b) run 1 (new build), setup of the tests that flashed "
          f"({'/'.join(map(str, flashed_counts))} per run) | {ff:.3f} s | 1.00x | - | - |")
    print(f"| (b) run 1, median setup over all 6 tests | {fa:.3f} s | - | - | - |")
    print(f"| (b) run 2 (firmware unchanged), median setup | {sa:.3f} s | {sa / ff:.3f}x of a "
          f"flashing setup ({sa / fa:.2f}x of run 1's median) | <= 0.1x (targets.md: new run, "
          f"firmware unchanged) | {'yes' if sa / ff <= 0.1 else 'NO'} |")
    print(f"| (c) per-test setup+teardown, `--hil-no-flash` | {nf * 1000:.0f} ms | - | <= 0.1 s | "
          f"{'yes' if nf <= 0.1 else 'NO'} |")
    print(f"| (c) per-test setup+teardown, firmware unchanged | {uc * 1000:.0f} ms | - | <= 0.1 s "
          f"| {'yes' if uc <= 0.1 else 'NO'} |")
    print(f"| (c) info: plain test without hil fixtures | {pl * 1000:.1f} ms | - | - | - |")
    print()
    print("all runs (s): -n 1 wall " + ", ".join(f"{x:.2f}" for x in wall1)
          + "; -n 3 wall " + ", ".join(f"{x:.2f}" for x in wall3)
          + "; -n 1 span " + ", ".join(f"{x:.2f}" for x in span1)
          + "; -n 3 span " + ", ".join(f"{x:.2f}" for x in span3))
    print(f"(c) max per-test overhead: no-flash {max(noflash) * 1000:.0f} ms, unchanged "
          f"{max(unchanged) * 1000:.0f} ms; (b) run-2 max setup {max(second_all) * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
