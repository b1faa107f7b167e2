"""Farm benchmark: esptool floor vs Farm.start_session (full flash, re-prepare, 3 boards) vs pytest.

Firmware: ``write_build_dir(..., "esp32", pad_to="1MB")`` (bootloader at 0x1000, partition table at
0x8000, a 1 MB compressible app at 0x10000), on the built-in virtual rack over socket://.

(a) floor: ``python -m esptool --chip esp32 --port socket://... -b 921600 --before no-reset
    --after no-reset write-flash --flash-mode dio --flash-size 4MB --flash-freq 40m 0x1000 ...
    0x8000 ... 0x10000 ...`` on an erased board in download mode (entered through the control
    endpoint, outside the timing): wall time of the esptool subprocess. For information, the
    same through ``esptool.main()`` in this process.
(b) ``Farm.start_session(1, chip="esp32", firmware=build_dir)`` until it returns (reserve, flash,
    boot, app started) on a GOOD board whose flash was erased and whose store records were
    dropped (a full 3-region flash), vs the same call again with unchanged firmware
    (re-prepare: nothing written). Single-board sessions exclude esp32-2/3, so they always get
    esp32-1. Also, once, the very first session on a fresh rack (board UNKNOWN: a health check
    first: power cycle, then the ROM probe, as the virtual rack has no baseline) for information.
(c) ``start_session(3, ...)`` on three erased ESP32 boards vs ``start_session(1, ...)`` on one;
    again with the rack's wire-time emulation on.
(d) a one-test pytest session (``@pytest.mark.hil(count=1, chip="esp32")``, empty body,
    ``--hil-firmware BUILD``, a one-board rack file naming esp32-1 of the running rack) on an
    erased GOOD board: wall time of the whole ``pytest`` subprocess minus the wall time of a
    no-op ``pytest`` run (same interpreter, options and rootdir, one ``def test_noop(): pass``,
    the plugin loaded but no farm used), i.e. what the farm adds to a pytest session that
    flashes; compared with the floor. Also "each further test": setup + teardown of tests
    2..N of an N-test session (``--further``, default 10), from the pytest reports.
(anchor) with ``--anchor-venv VENV`` (pytest-embedded, pytest-embedded-serial-esp and
    pytest-embedded-idf installed there): the same two pytest measurements with
    ``--embedded-services esp,idf --port socket://... --target esp32 --build-dir BUILD``.

Erasing: the board is put into download mode through the control endpoint and ``esptool
erase-flash`` runs over socket://; the farm store's flash records are dropped
(``FarmStore.forget_flash``), as the farm itself does after an erase. None of that is timed.
Every figure is the median of ``--runs`` (default 3) runs, interleaved (floor, full, re-prepare,
...) so load changes hit all sides alike. Uses HILFARM_SIM_DIR / HILFARM_STATE_DIR if set, else
temporary ones; stops the virtual rack at the end.

Run: ``python bench/bench_farm.py [--runs 3] [--anchor-venv /tmp/pe-venv]``.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ESP32S = ("esp32-1", "esp32-2", "esp32-3")
OTHERS = ("esp32-2", "esp32-3")  # excluded, so single-board sessions always get esp32-1


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _env_dirs() -> None:
    for var in ("HILFARM_SIM_DIR", "HILFARM_STATE_DIR"):
        if not os.environ.get(var):
            os.environ[var] = tempfile.mkdtemp(prefix=f"bench-hilfarm-{var[9:12].lower()}-")


def esptool(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "esptool", *args],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"esptool {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n"
                         f"{proc.stderr[-2000:]}")
    return proc


class Bench:
    def __init__(self, build: Path) -> None:
        from pytest_hilfarm.farm import Farm

        self.build = build
        self.farm = Farm.open(log_root=Path(tempfile.mkdtemp(prefix="bench-hilfarm-logs-")))
        self.info = self.farm.virtual_info()  # starts the daemon
        self.ctl = self.farm.control()
        self.ports = {b["id"]: b["port"] for b in self.info["boards"]}

    def erase(self, board: str) -> None:
        """Erase a board's flash (download mode via the control endpoint) and forget it."""
        for attempt in range(5):  # the last client's socket may still be closing on the rack
            self.ctl.reset(board, "download")
            try:
                esptool("--chip", "esp32", "--port", self.ports[board], "--before", "no-reset",
                        "--after", "no-reset", "erase-flash")
                break
            except SystemExit:
                if attempt == 4:
                    raise
                time.sleep(0.2)
        self.farm.store.forget_flash(board)

    def floor(self, board: str = "esp32-1") -> float:
        self.erase(board)
        self.ctl.reset(board, "download")
        files = [(off, self.build / rel) for off, rel in (
            ("0x1000", "bootloader/bootloader.bin"),
            ("0x8000", "partition_table/partition-table.bin"),
            ("0x10000", "bench.bin"))]
        t0 = time.perf_counter()
        esptool("--chip", "esp32", "--port", self.ports[board], "-b", "921600",
                "--before", "no-reset", "--after", "no-reset", "write-flash",
                "--flash-mode", "dio", "--flash-size", "4MB", "--flash-freq", "40m",
                *[str(x) for pair in files for x in pair])
        wall = time.perf_counter() - t0
        self.ctl.reset(board, "flash")
        return wall

    def floor_in_process(self, board: str = "esp32-1") -> float:
        """The same esptool command through ``esptool.main`` in this process (no start-up)."""
        import contextlib
        import io

        import esptool as _esptool

        self.erase(board)
        self.ctl.reset(board, "download")
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            _esptool.main(["--chip", "esp32", "--port", self.ports[board], "-b", "921600",
                           "--before", "no-reset", "--after", "no-reset", "write-flash",
                           "--flash-mode", "dio", "--flash-size", "4MB", "--flash-freq", "40m",
                           "0x1000", str(self.build / "bootloader/bootloader.bin"),
                           "0x8000", str(self.build / "partition_table/partition-table.bin"),
                           "0x10000", str(self.build / "bench.bin")])
        wall = time.perf_counter() - t0
        self.ctl.reset(board, "flash")
        return wall

    def session(self, count: int, exclude: tuple[str, ...] = ()) -> tuple[float, list[str], int]:
        """Seconds for start_session to return; boards used; regions written."""
        t0 = time.perf_counter()
        s = self.farm.start_session(count, chip="esp32", firmware=self.build,
                                    test_id=f"bench-farm-{count}", exclude=exclude)
        wall = time.perf_counter() - t0
        try:
            if s.firmware_failure:
                raise SystemExit(f"firmware did not boot: {s.firmware_failure}")
            written = sum(1 for r in s.flash_reports for x in r.regions if x.written)
            return wall, [d.id for d in s.devices], written
        finally:
            s.finish("passed")


def pytest_session(workdir: Path, test_file: str, extra: list[str],
                   python: str = sys.executable, timings: Path | None = None) -> float:
    env = dict(os.environ)
    if timings is not None:
        env["BENCH_TIMINGS"] = str(timings)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "--rootdir", str(workdir), "-c", str(workdir / "pytest.ini"), test_file, *extra],
        cwd=workdir, capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"pytest {test_file} failed:\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-2000:]}")
    return wall


# Records per-test setup/teardown durations (controller side) into $BENCH_TIMINGS.
TIMING_CONFTEST = """\
import json, os


def pytest_runtest_logreport(report):
    path = os.environ.get("BENCH_TIMINGS")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"nodeid": report.nodeid, "when": report.when,
                                 "duration": report.duration}) + "\\n")
"""


def further_tests(timings: Path) -> list[float]:
    """Setup + teardown of every test but the first (the first one flashes)."""
    rows = [json.loads(line) for line in timings.read_text().splitlines()]
    per: dict[str, float] = {}
    order: list[str] = []
    for r in rows:
        if r["when"] in ("setup", "teardown"):
            if r["nodeid"] not in per:
                order.append(r["nodeid"])
            per[r["nodeid"]] = per.get(r["nodeid"], 0.0) + r["duration"]
    return [per[k] for k in order[1:]]


def med(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--anchor-venv", type=Path, default=None,
                    help="a venv with pytest-embedded, pytest-embedded-serial-esp and "
                    "pytest-embedded-idf: run the anchor side by side")
    ap.add_argument("--further", type=int, default=10,
                    help="tests per session for the 'each further test' rows")
    args = ap.parse_args()
    _env_dirs()
    from pytest_hilfarm.sim.appbuild import write_build_dir

    tmp = Path(tempfile.mkdtemp(prefix="bench-hilfarm-farm-"))
    build = tmp / "build"
    write_build_dir(build, "esp32", "bench", "1.0", pad_to="1MB")
    work = tmp / "suite"
    work.mkdir()
    (work / "pytest.ini").write_text("[pytest]\n")
    (work / "conftest.py").write_text(TIMING_CONFTEST)
    (work / "test_flash.py").write_text(textwrap.dedent("""\
        import pytest

        @pytest.mark.hil(count=1, chip="esp32")
        def test_flash(hil_device):
            pass
    """))
    (work / "test_further.py").write_text(textwrap.dedent(f"""\
        import pytest

        @pytest.mark.hil(count=1, chip="esp32")
        @pytest.mark.parametrize("i", range({args.further}))
        def test_further(hil_device, i):
            pass
    """))
    (work / "test_noop.py").write_text("def test_noop():\n    pass\n")
    anchor_py = str(args.anchor_venv / "bin" / "python") if args.anchor_venv else None
    if anchor_py:
        (work / "test_pe_flash.py").write_text("def test_flash(dut):\n    pass\n")
        (work / "test_pe_further.py").write_text(textwrap.dedent(f"""\
            import pytest

            @pytest.mark.parametrize("i", range({args.further}))
            def test_further(dut, i):
                pass
        """))
    loads = [loadavg()]
    bench = Bench(build)
    pe_args = ["--embedded-services", "esp,idf", "--port", bench.ports["esp32-1"],
               "--target", "esp32", "--app-path", str(tmp), "--build-dir", str(build)]
    hil_only1 = ["--hil-firmware", str(build), "--hil-rack", str(tmp / "rack1.yaml")]
    # A one-ESP32 rack (esp32-1 of the running virtual rack), so the pytest rows use the same
    # board as the floor and the anchor, and only it needs erasing.
    (tmp / "rack1.yaml").write_text(
        "version: 1\nname: virtual\nboards:\n  - {id: esp32-1, chip: esp32, port: virtual, "
        "reset: virtual, power: virtual, flash: {size: 4MB}, features: [mesh-radio]}\n")
    try:
        # First-ever session on a fresh rack: the board is UNKNOWN, so a health check
        # (power cycle; a baseline flash if the rack has one, else a ROM probe) precedes the
        # candidate's flash.
        first_wall, first_boards, first_written = bench.session(1, OTHERS)
        bench.session(3)  # every ESP32 GOOD (health checks now, not inside the timings)
        floor, floor_ip, full, reprep, one, three = [], [], [], [], [], []
        one_wire, three_wire = [], []
        written_full, written_reprep = [], []
        py_flash, py_noop, py_further = [], [], []
        pe_flash, pe_noop, pe_further = [], [], []
        for run in range(args.runs):
            floor.append(bench.floor("esp32-1"))
            floor_ip.append(bench.floor_in_process("esp32-1"))
            bench.erase("esp32-1")
            w, boards, n = bench.session(1, OTHERS)
            full.append(w)
            written_full.append(n)
            w, boards2, n = bench.session(1, OTHERS)
            reprep.append(w)
            written_reprep.append(n)
            if n != 0:
                raise SystemExit(f"re-prepare wrote {n} regions")
            bench.erase("esp32-1")
            one.append(bench.session(1, OTHERS)[0])
            for b in ESP32S:
                bench.erase(b)
            w, boards3, n = bench.session(3)
            three.append(w)
            if n != 9:
                raise SystemExit(f"3-board session wrote {n} regions, expected 9")
            # (c) again with wire-time emulation (bytes take UART time at the board's baud), which
            # is closer to real boards, where the wire, not the host's CPU, sets the pace.
            bench.ctl.wire_time(True)
            try:
                bench.erase("esp32-1")
                one_wire.append(bench.session(1, OTHERS)[0])
                for b in ESP32S:
                    bench.erase(b)
                three_wire.append(bench.session(3)[0])
            finally:
                bench.ctl.wire_time(False)
            py_noop.append(pytest_session(work, "test_noop.py", []))
            bench.erase("esp32-1")
            py_flash.append(pytest_session(work, "test_flash.py", hil_only1))
            bench.erase("esp32-1")
            t = tmp / f"hil-further-{run}.jsonl"
            pytest_session(work, "test_further.py", hil_only1, timings=t)
            py_further.extend(further_tests(t))
            if anchor_py:
                pe_noop.append(pytest_session(work, "test_noop.py", [], python=anchor_py))
                bench.erase("esp32-1")
                bench.ctl.reset("esp32-1", "download")
                pe_flash.append(pytest_session(work, "test_pe_flash.py", pe_args,
                                               python=anchor_py))
                bench.erase("esp32-1")
                bench.ctl.reset("esp32-1", "download")
                t = tmp / f"pe-further-{run}.jsonl"
                pytest_session(work, "test_pe_further.py", pe_args, python=anchor_py, timings=t)
                pe_further.extend(further_tests(t))
            loads.append(loadavg())
    finally:
        bench.farm.close()
        subprocess.run([sys.executable, "-m", "pytest_hilfarm", "sim", "down"],
                       capture_output=True, check=False)

    f, fi, fu, rp, o, t3 = med(floor), med(floor_ip), med(full), med(reprep), med(one), med(three)
    pf, pn, pfu = med(py_flash), med(py_noop), med(py_further)
    added = pf - pn

    def yes(ok: bool) -> str:
        return "yes" if ok else "NO"

    print(f"esptool 5.6.0, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average "
          f"(1/5/15 min) at start and after each round: {'; '.join(loads)}; medians of "
          f"{args.runs} runs, interleaved\n")
    print("| what | median s | ratio | target | met? |")
    print("|---|---:|---:|---|---|")
    print(f"| (a) `python -m esptool` write-flash, 3-file layout, 921600, socket:// (the floor) "
          f"| {f:.2f} | 1.00x floor | - | - |")
    print(f"| (a) info: the same through `esptool.main()` in-process (no interpreter start-up) "
          f"| {fi:.2f} | {fi / f:.2f}x floor | - | - |")
    print(f"| (b) start_session, full flash (GOOD board, erased; regions written: "
          f"{written_full[0]}) | {fu:.2f} | {fu / f:.2f}x floor | - | - |")
    print(f"| (b) start_session again, firmware unchanged (regions written: "
          f"{written_reprep[0]}) | {rp:.3f} | {rp / fu:.3f}x full flash | <= 0.1x | "
          f"{yes(rp / fu <= 0.1)} |")
    print(f"| (b) info: first session on a fresh rack (UNKNOWN board: health check + flash, "
          f"{first_written} regions written), 1 run | {first_wall:.2f} | "
          f"{first_wall / f:.2f}x floor | - | - |")
    print(f"| (c) start_session(1), erased board | {o:.2f} | 1.00x | - | - |")
    print(f"| (c) start_session(3), 3 erased boards in parallel | {t3:.2f} | {t3 / o:.2f}x one "
          f"board | <= 1.3x | {yes(t3 / o <= 1.3)} |")
    ow, tw = med(one_wire), med(three_wire)
    print(f"| (c) info, wire-time emulation on: start_session(1) {ow:.2f} s, start_session(3) "
          f"{tw:.2f} s | {tw:.2f} | {tw / ow:.2f}x one board | (<= 1.3x) | {yes(tw / ow <= 1.3)} |")
    print(f"| (d) `pytest`, one no-op test (plugin loaded, no board) | {pn:.2f} | - | - | - |")
    print(f"| (d) `pytest`, one hil test that flashes (erased GOOD board) | {pf:.2f} | - | - | - |")
    print(f"| (d) one-test session that flashes, minus the no-op run | {added:.2f} | "
          f"{added / f:.2f}x floor | <= 1.2x floor | {yes(added / f <= 1.2)} |")
    print(f"| each further test in a session, no flashing (setup + teardown, tests "
          f"2..{args.further}) "
          f"| {pfu:.3f} | - | <= 0.1 s | {yes(pfu <= 0.1)} |")
    if anchor_py:
        ef, en, efu = med(pe_flash), med(pe_noop), med(pe_further)
        print(f"| anchor: pytest-embedded, one no-op test | {en:.2f} | - | - | - |")
        print(f"| anchor: pytest-embedded, one test that flashes (`--embedded-services esp,idf "
              f"--port socket://...`) | {ef:.2f} | - | - | - |")
        print(f"| anchor: pytest-embedded one-test session that flashes, minus its no-op run "
              f"| {ef - en:.2f} | {(ef - en) / f:.2f}x floor; hilfarm/anchor "
              f"{added / (ef - en):.2f}x | - | - |")
        print(f"| anchor: pytest-embedded whole session that flashes (no subtraction) | {ef:.2f} "
              f"| {ef / f:.2f}x floor; hilfarm/anchor {pf / ef:.2f}x | - | - |")
        print(f"| anchor: pytest-embedded each further test (setup + teardown) | {efu:.3f} | "
              f"hilfarm/anchor {pfu / efu:.2f}x | - | - |")
    print()
    print("all runs (s): floor " + ", ".join(f"{x:.2f}" for x in floor)
          + "; in-process floor " + ", ".join(f"{x:.2f}" for x in floor_ip)
          + "; full " + ", ".join(f"{x:.2f}" for x in full)
          + "; re-prepare " + ", ".join(f"{x:.3f}" for x in reprep)
          + "; one " + ", ".join(f"{x:.2f}" for x in one)
          + "; three " + ", ".join(f"{x:.2f}" for x in three)
          + "; one (wire time) " + ", ".join(f"{x:.2f}" for x in one_wire)
          + "; three (wire time) " + ", ".join(f"{x:.2f}" for x in three_wire)
          + "; pytest flash " + ", ".join(f"{x:.2f}" for x in py_flash)
          + "; pytest no-op " + ", ".join(f"{x:.2f}" for x in py_noop)
          + ("; pytest-embedded flash " + ", ".join(f"{x:.2f}" for x in pe_flash)
             + "; pytest-embedded no-op " + ", ".join(f"{x:.2f}" for x in pe_noop)
             if anchor_py else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
