"""What a new user meets in the first hour, end to end: real pytest runs in subprocesses.

Allocation follows the candidate's chips, bad firmware options fail once and early, nothing
unbootable is flashed, a board whose firmware does not start is never handed out GOOD, and
interrupted runs (SIGINT, SIGTERM, SIGKILL on a real process) leave their boards for a check.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_hilfarm.farm import Farm
from pytest_hilfarm.sim.appbuild import write_build_dir
from pytest_hilfarm.sim.model import Faults
from pytest_hilfarm.store import BoardHealth

pytest_plugins = ["pytester"]

# a-c3 sorts first and has no features: without the candidate's chips it is the natural pick.
RACK = """\
version: 1
name: first-hour
boards:
  - {id: a-c3, chip: esp32c3, port: virtual, reset: virtual, power: virtual}
  - {id: b-esp32, chip: esp32, port: virtual, reset: virtual, power: virtual, features: [pin]}
  - {id: c-esp32, chip: esp32, port: virtual, reset: virtual, power: virtual}
  - {id: d-s2, chip: esp32s2, port: virtual, reset: virtual, power: virtual}
"""


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, private_virtual_rack: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rig")
    rack = root / "rack.yaml"
    rack.write_text(RACK)
    builds = {
        "esp32": write_build_dir(root / "esp32", "esp32", "first-hour", "1.0.0").path,
        "esp32s2": write_build_dir(root / "s2", "esp32s2", "first-hour", "1.0.0").path,
        "crash": write_build_dir(root / "crash", "esp32", "first-hour", "6.6.6",
                                 faults=Faults(crash_at_boot=True)).path,
    }
    junk = root / "random.bin"
    junk.write_bytes(os.urandom(100 * 1024))
    return {"rack": rack, "root": root, "junk": junk, **builds}


def run(pytester: pytest.Pytester, rig: dict[str, Path], *args: str,
        timeout: float = 240) -> pytest.RunResult:
    # --hil-rack=PATH: pytest picks its rootdir and ini file before plugins register their
    # options, so a path given as "--hil-rack PATH" counts as a test path for that choice.
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--hil-rack={rig['rack']}", *args, timeout=timeout)


def farm_history(rig: dict[str, Path]) -> int:
    with Farm.open(rig["rack"], start_virtual=False) as farm:
        return len(farm.store.history(limit=100_000))


# --- 1. allocation respects what the candidate can run on ----------------------------------------


def test_one_build_without_chip_in_marker_gets_a_board_of_its_chip(
        pytester: pytest.Pytester, rig: dict[str, Path]) -> None:
    pytester.makepyfile("""
        import pytest
        @pytest.mark.hil(count=1)
        def test_boot(hil_device):
            assert hil_device.chip == "esp32"
            assert hil_device.boot_info().project == "first-hour"
        @pytest.mark.hil(count=2)
        def test_two(hil_devices):
            assert {d.id for d in hil_devices} == {"b-esp32", "c-esp32"}
    """)
    result = run(pytester, rig, "--hil-firmware", str(rig["esp32"]))
    result.assert_outcomes(passed=2)


def test_chip_set_candidate_limits_allocation_to_those_chips(
        pytester: pytest.Pytester, rig: dict[str, Path]) -> None:
    pytester.makepyfile("""
        import pytest
        @pytest.mark.hil(count=1)
        def test_boot(hil_device):
            assert hil_device.id == "d-s2"
    """)
    result = run(pytester, rig, f"--hil-firmware=esp32s2={rig['esp32s2']}")
    result.assert_outcomes(passed=1)


def test_request_the_candidate_cannot_meet_skips_naming_both_chips(
        pytester: pytest.Pytester, rig: dict[str, Path]) -> None:
    pytester.makepyfile("""
        import pytest
        @pytest.mark.hil(count=3)
        def test_three(hil_devices):
            pass
        @pytest.mark.hil(chip="esp32c3")
        def test_c3(hil_device):
            pass
    """)
    result = run(pytester, rig, "-rs", f"--hil-firmware=esp32={rig['esp32']}")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines([
        "*SKIPPED*candidate firmware*built for esp32 only*no board it can run on*"
        "(the rack's chips: esp32, esp32c3, esp32s2)*",
        "*SKIPPED*asks for esp32c3 boards, but the candidate firmware*built for esp32 only*",
    ])


# --- 4 and 5. bad firmware options fail once, early, naming their source --------------------------


@pytest.mark.parametrize("how", ["option", "ini", "env", "marker"])
def test_missing_firmware_is_one_usage_error_naming_its_source(
        pytester: pytest.Pytester, rig: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
        how: str) -> None:
    missing = "/nonexistent/firmware.bin"
    marker = f"firmware={missing!r}" if how == "marker" else ""
    pytester.makepyfile(f"""
        import pytest
        @pytest.mark.hil(count=1, {marker})
        def test_a(hil_device):
            pass
        @pytest.mark.hil(count=1, {marker})
        def test_b(hil_device):
            pass
    """)
    args: list[str] = []
    if how == "option":
        args = ["--hil-firmware", missing]
    elif how == "ini":
        pytester.makeini(f"[pytest]\nhil_firmware = {missing}\n")
    elif how == "env":
        monkeypatch.setenv("HILFARM_FIRMWARE", missing)
    before = farm_history(rig)
    result = run(pytester, rig, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    text = result.stderr.str()
    assert "Traceback" not in text and text.count("does not exist") == 1
    expected = {"option": "option --hil-firmware", "ini": "ini hil_firmware",
                "env": "environment HILFARM_FIRMWARE",
                "marker": "marker @pytest.mark.hil(firmware=...) on test_"}[how]
    assert expected in text and missing in text
    assert farm_history(rig) == before  # no board was reserved, let alone touched


def test_unknown_chip_in_chip_path_is_a_usage_error(pytester: pytest.Pytester,
                                                   rig: dict[str, Path]) -> None:
    pytester.makepyfile("def test_x():\n    pass\n")
    result = run(pytester, rig, f"--hil-firmware=esp33={rig['esp32']}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--hil-firmware*esp33*", "*did you mean*"])


def test_random_bytes_as_firmware_are_refused_before_anything_is_written(
        pytester: pytest.Pytester, rig: dict[str, Path]) -> None:
    pytester.makepyfile("""
        import pytest
        @pytest.mark.hil(count=1)
        def test_boot(hil_device):
            pass
    """)
    before = farm_history(rig)
    result = run(pytester, rig, "--hil-firmware", str(rig["junk"]))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{rig['junk']}*option --hil-firmware*not an ESP image*"])
    assert "Traceback" not in result.stderr.str()
    assert farm_history(rig) == before


def test_board_whose_firmware_crashed_is_checked_before_the_next_user(
        pytester: pytest.Pytester, rig: dict[str, Path]) -> None:
    # Only b-esp32 has the feature "pin": both tests get the same board.
    pytester.makepyfile(f"""
        import pytest
        @pytest.mark.hil(count=1, chip="esp32", features=["pin"], firmware={str(rig['crash'])!r})
        def test_1_crashing_candidate(hil_device):
            hil_device.command("version")
        @pytest.mark.hil(count=1, chip="esp32", features=["pin"])
        def test_2_no_firmware_at_all(hil_device):
            assert "version:" in hil_device.command("version")
    """)
    result = run(pytester, rig, "-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*Guru Meditation Error*",
                                 "FAILED*test_1_crashing_candidate*"])


# --- 6. logs where the user expects them, and what the run is about in the header -----------------


def test_logs_land_in_the_invocation_directory_and_header_says_so(
        pytester: pytest.Pytester, rig: dict[str, Path]) -> None:
    pytester.makepyfile("""
        import pytest
        @pytest.mark.hil(count=1)
        def test_boot(hil_device):
            pass
    """)
    # The space form: the option's value is an absolute path outside the project.
    result = run(pytester, rig, "--hil-firmware", str(rig["esp32"]))
    result.assert_outcomes(passed=1)
    logs = pytester.path / "hilfarm-logs"
    assert list(logs.rglob("*.log")), "no device log under the invocation directory"
    result.stdout.fnmatch_lines([
        f"hilfarm: rack {rig['rack']} (option --hil-rack)",
        f"hilfarm: device logs in {logs}",
        "hilfarm: candidate esp32: first-hour 1.0.0 (*flasher_args.json) from option "
        "--hil-firmware",
    ])


def test_log_dir_option(pytester: pytest.Pytester, rig: dict[str, Path],
                        tmp_path: Path) -> None:
    pytester.makepyfile("""
        import pytest
        @pytest.mark.hil(count=1)
        def test_boot(hil_device):
            pass
    """)
    result = run(pytester, rig, "--hil-firmware", str(rig["esp32"]),
                 "--hil-log-dir", str(tmp_path / "here"))
    result.assert_outcomes(passed=1)
    assert list((tmp_path / "here").rglob("*.log"))


# --- 3. interrupted runs leave boards for a health check, and status says so ----------------------


HOLD_THREE = """
import pathlib, time
import pytest
@pytest.mark.hil(count=3)
def test_hold(hil_devices):
    pathlib.Path({marker!r}).write_text(",".join(d.id for d in hil_devices))
    time.sleep(120)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL],
                         ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_interrupted_run_leaves_its_boards_for_a_health_check(
        pytester: pytest.Pytester, rig: dict[str, Path], sig: signal.Signals) -> None:
    marker = pytester.path / "holding"
    pytester.makepyfile(HOLD_THREE.format(marker=str(marker)))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "--hil-rack", str(rig["rack"]), str(pytester.path)]
    # SIGINT back to its default in the child: a suite run as a background job (`cmd &` in a
    # script) inherits SIGINT ignored, and so would the run, as POSIX wants.
    proc = subprocess.Popen(cmd, cwd=pytester.path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            preexec_fn=functools.partial(signal.signal, signal.SIGINT,
                                                         signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[0].decode(errors="replace")
            assert time.monotonic() < deadline, "the test never got its boards"
            time.sleep(0.1)
        boards = marker.read_text().split(",")
        proc.send_signal(sig)
        out = proc.communicate(timeout=60)[0].decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode != 0, out
    with Farm.open(rig["rack"], log_root=pytester.path / "logs") as farm:
        rows = {r["board"]: r for r in farm.status()}
        for board in boards:
            row = rows[board]
            assert row["holder"] is None, row
            assert row["check_due"] and row["health"] == "UNKNOWN", row
            assert row["reason"].startswith("health check due"), row
            assert f"pid {proc.pid}" in row["reason"] and "test_hold" in row["reason"], row
            why = {signal.SIGINT: "interrupted (SIGINT", signal.SIGTERM: "interrupted (SIGTERM",
                   signal.SIGKILL: "its holder died"}[sig]
            assert why in row["reason"], row
        with farm.reserve(3, only=boards, timeout=30) as lease:
            assert set(lease.needs_check) == set(boards)
            assert all(farm.store.health(b).health is BoardHealth.UNKNOWN for b in boards)


def test_expected_and_quarantined_failures_are_recorded_as_what_they_are(
        pytester: pytest.Pytester, rig: dict[str, Path]) -> None:
    # The nightly report counts an xfail as the suite wanted it (not against the pass rate),
    # while a quarantined test's failure is still a failure in the history (it is flaky debt).
    pytester.makepyfile(test_outcomes="""
        import pytest

        @pytest.mark.xfail(reason="known: no mesh on one board", strict=True)
        @pytest.mark.hil(chip="esp32")
        def test_expected(hil_device):
            assert False

        @pytest.mark.hil(chip="esp32")
        def test_flaky(hil_device):
            assert False, "mesh did not heal"

        @pytest.mark.hil(chip="esp32")
        def test_fine(hil_device):
            pass
    """)
    (pytester.path / "quarantine.yaml").write_text("- test_outcomes.py::test_flaky\n")
    result = run(pytester, rig, f"--hil-firmware={rig['esp32']}",
                 "--hil-quarantine", "quarantine.yaml")
    result.assert_outcomes(passed=1, xfailed=2)
    with Farm.open(rig["rack"], start_virtual=False) as farm:
        recorded = {r.test_id.rsplit("::", 1)[-1]: r.outcome
                    for r in farm.store.results_since(time.time() - 3600)
                    if r.test_id.startswith("test_outcomes.py")}
    assert recorded == {"test_expected": "xfail", "test_flaky": "failed", "test_fine": "passed"}
