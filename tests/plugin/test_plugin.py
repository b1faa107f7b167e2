"""The pytest plugin end to end: pytest runs (in subprocesses) against the virtual rack."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pytest_hilfarm.farm import Farm
from pytest_hilfarm.sim.appbuild import write_build_dir
from pytest_hilfarm.store import BoardHealth

pytest_plugins = ["pytester"]

RACK = """\
version: 1
name: plugin-test
boards:
  - {id: esp32-1, chip: esp32, port: virtual, reset: virtual, power: virtual,
     features: [mesh-radio]}
  - {id: esp32-2, chip: esp32, port: virtual, reset: virtual, power: virtual,
     features: [mesh-radio]}
  - {id: esp32-3, chip: esp32, port: virtual, reset: virtual, power: virtual,
     features: [mesh-radio]}
"""


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, private_virtual_rack: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rig")
    rack = root / "rack.yaml"
    rack.write_text(RACK)
    fw = root / "fw"
    write_build_dir(fw, "esp32", "plugin-demo", "3.1.4")
    return {"rack": rack, "fw": fw, "root": root}


def run_pytest(pytester: pytest.Pytester, rig: dict[str, Path], *args: str,
               timeout: float = 240) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--hil-rack", str(rig["rack"]),
        "--hil-firmware", f"esp32={rig['fw']}", *args, timeout=timeout,
    )


def test_fixtures_are_documented(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--fixtures")
    result.stdout.fnmatch_lines([
        "hil_farm *", "*The session's HIL farm*",
        "hil_devices *", "*Boards the ``hil`` marker asks for*",
        "hil_device *", "*The single board*",
    ])


def test_options_in_help(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--help")
    for opt in ("--hil-rack", "--hil-firmware", "--hil-baseline", "--hil-lock-timeout",
                "--hil-no-flash", "--hil-infra-retries"):
        result.stdout.fnmatch_lines([f"*{opt}*"])


def test_bad_marker_argument_is_a_usage_error(pytester: pytest.Pytester,
                                              rig: dict[str, Path]) -> None:
    pytester.makepyfile("""
        import pytest
        @pytest.mark.hil(cont=2)
        def test_x(hil_devices):
            pass
    """)
    result = run_pytest(pytester, rig)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*cont*", "*@pytest.mark.hil(count=1*"])


def test_bad_environment_value_names_the_variable(pytester: pytest.Pytester,
                                                  rig: dict[str, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile("def test_x():\n    pass\n")
    monkeypatch.setenv("HILFARM_LOCK_TIMEOUT", "soon")
    result = run_pytest(pytester, rig)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*HILFARM_LOCK_TIMEOUT*soon*"])


def test_unsatisfiable_request_is_skipped_with_reason(pytester: pytest.Pytester,
                                                      rig: dict[str, Path]) -> None:
    pytester.makepyfile("""
        import pytest
        @pytest.mark.hil(count=5)
        def test_many(hil_devices):
            pass
        @pytest.mark.hil(chip="esp32c3")
        def test_c3(hil_device):
            pass
    """)
    result = run_pytest(pytester, rig, "-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*SKIPPED*5*", "*SKIPPED*esp32c3*"])


def test_device_boots_candidate_and_junit_has_properties(pytester: pytest.Pytester,
                                                         rig: dict[str, Path]) -> None:
    pytester.makepyfile("""
        import pytest
        @pytest.mark.hil(count=1, chip="esp32")
        def test_boot(hil_device):
            info = hil_device.boot_info()
            assert (info.project, info.app_version) == ("plugin-demo", "3.1.4")
            assert "version: 3.1.4" in hil_device.command("version")
            assert hil_device.mac and hil_device.log_path.exists()
    """)
    junit = pytester.path / "junit.xml"
    result = run_pytest(pytester, rig, f"--junitxml={junit}")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*hilfarm summary*", "boards used: esp32-*"])
    props = {p.get("name"): p.get("value") for p in ET.parse(junit).iter("property")}
    board = next(k.split(".")[1] for k in props if k.endswith(".chip"))
    assert props[f"hil.{board}.chip"] == "esp32"
    assert len(props[f"hil.{board}.firmware_sha256"]) == 64
    assert float(props[f"hil.{board}.flash_seconds"]) >= 0
    assert Path(props[f"hil.{board}.log"]).exists()


def test_failed_test_report_carries_device_log(pytester: pytest.Pytester,
                                               rig: dict[str, Path]) -> None:
    pytester.makepyfile("""
        import pytest
        @pytest.mark.hil(count=1)
        def test_fails(hil_device):
            assert "nope" in hil_device.command("version")
    """)
    result = run_pytest(pytester, rig)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*hil device log esp32-*", "*log file:*", "*app_init*"])


INTERVAL_TEST = """
import json, os, time
import pytest

@pytest.mark.hil(count=1)
@pytest.mark.parametrize("n", range({n}))
def test_hold(hil_device, n):
    start = time.time()
    time.sleep({hold})
    with open(os.environ["INTERVALS"], "a") as f:
        f.write(json.dumps([hil_device.id, start, time.time(), os.getpid()]) + "\\n")
"""


def overlaps(path: Path) -> list[tuple[list, list]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    bad = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            if a[0] == b[0] and a[1] < b[2] and b[1] < a[2]:
                bad.append((a, b))
    return bad


def test_xdist_runs_on_distinct_boards_at_once(pytester: pytest.Pytester, rig: dict[str, Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    intervals = pytester.path / "intervals.jsonl"
    monkeypatch.setenv("INTERVALS", str(intervals))
    pytester.makepyfile(INTERVAL_TEST.format(n=9, hold=0.3))
    result = run_pytest(pytester, rig, "-n", "3")
    result.assert_outcomes(passed=9)
    assert overlaps(intervals) == []
    rows = [json.loads(line) for line in intervals.read_text().splitlines()]
    assert len({r[0] for r in rows}) == 3
    # Parallel for real: some pair of tests on different boards ran at the same time.
    assert any(a[0] != b[0] and a[1] < b[2] and b[1] < a[2] for a in rows for b in rows)


def test_two_pytest_processes_never_share_a_board(pytester: pytest.Pytester,
                                                  rig: dict[str, Path]) -> None:
    intervals = pytester.path / "intervals.jsonl"
    pytester.makepyfile(INTERVAL_TEST.format(n=6, hold=0.15))
    env = dict(os.environ, INTERVALS=str(intervals))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "--hil-rack", str(rig["rack"]), "--hil-firmware", f"esp32={rig['fw']}",
           str(pytester.path)]
    procs = [subprocess.Popen(cmd, cwd=pytester.path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    rows = intervals.read_text().splitlines()
    assert len(rows) == 12
    assert overlaps(intervals) == []


def test_killed_test_leaves_its_board_to_a_health_check(pytester: pytest.Pytester,
                                                        rig: dict[str, Path]) -> None:
    marker = pytester.path / "holding"
    pytester.makepyfile(f"""
        import pathlib, time
        import pytest
        @pytest.mark.hil(count=1)
        def test_hang(hil_device):
            pathlib.Path({str(marker)!r}).write_text(hil_device.id)
            time.sleep(120)
    """)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "--hil-rack", str(rig["rack"]), "--hil-firmware", f"esp32={rig['fw']}",
           str(pytester.path)]
    proc = subprocess.Popen(cmd, cwd=pytester.path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert time.monotonic() < deadline, "the test never got its board"
            time.sleep(0.1)
        board = marker.read_text()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    with Farm.open(rig["rack"], log_root=pytester.path / "logs") as farm:
        lease = farm.reserve(1, only=[board], timeout=30)
        try:
            assert board in lease.needs_check
            assert farm.store.health(board).health == BoardHealth.UNKNOWN
        finally:
            lease.release()


def test_infra_fault_is_a_setup_error_and_retried_elsewhere(pytester: pytest.Pytester,
                                                            rig: dict[str, Path]) -> None:
    farm = Farm.open(rig["rack"], log_root=pytester.path / "logs")
    control = farm.control()
    # Only esp32-1 (unplugged: its port is gone) and esp32-2 are free; both need a check, so
    # the allocator's natural order offers esp32-1 first.
    farm.reserver.hold("esp32-3", "kept out of this test", "tester")
    for board in ("esp32-1", "esp32-2"):
        farm.store.set_health(board, BoardHealth.UNKNOWN, "test set-up")
    control.unplug("esp32-1")
    try:
        pytester.makepyfile("""
            import pytest
            @pytest.mark.hil(count=1)
            def test_any(hil_device):
                assert hil_device.id == "esp32-2"
        """)
        events = pytester.path / "infra-events.txt"
        pytester.makeconftest(f"""
            def pytest_hilfarm_infra_error(item, error, board_ids, will_retry):
                with open({str(events)!r}, "a") as f:
                    f.write(f"{{item.name}} {{','.join(board_ids)}} {{will_retry}}\\n")
        """)
        res = run_pytest(pytester, rig, "--hil-infra-retries", "0", "--hil-lock-timeout", "20")
        res.assert_outcomes(errors=1)  # a setup error, not a failure
        assert farm.store.health("esp32-1").health != BoardHealth.GOOD
        res = run_pytest(pytester, rig, "--hil-infra-retries", "1", "-rA")
        res.assert_outcomes(passed=1)
        res.stdout.fnmatch_lines(["*retrying on another board*esp32-1*"])
        # The hook saw both faults: the first run's (no retry left), the second's (retried).
        assert events.read_text().splitlines() == ["test_any esp32-1 False",
                                                   "test_any esp32-1 True"]
    finally:
        control.plug("esp32-1")
        farm.reserver.unhold("esp32-3")
        farm.close()


def test_devices_ready_hook_runs_before_the_test(pytester: pytest.Pytester,
                                                 rig: dict[str, Path]) -> None:
    pytester.makeconftest("""
        def pytest_hilfarm_devices_ready(item, devices):
            for dev in devices:
                dev.provisioned = dev.command("mesh inbox clear")
    """)
    pytester.makepyfile("""
        import pytest
        @pytest.mark.hil(count=2)
        def test_provisioned(hil_devices):
            assert all(d.provisioned.startswith("cleared:") for d in hil_devices)
    """)
    run_pytest(pytester, rig).assert_outcomes(passed=1)
