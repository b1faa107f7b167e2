"""Unity unit-test apps: one pytest result and one JUnit testcase per Unity case, end to end.

The candidate is the virtual rack's demo app built as a Unity test app (`hilfarm sim build-app
--unity`): seven cases in groups, one failing, one reporting IGNORE, one panicking (the board
resets), one tagged [ignore]. A test marked ``hil_unity`` runs all of them, a group, or one case.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

RACK = """\
version: 1
name: unity
boards:
  - {id: c3-1, chip: esp32c3, port: virtual, reset: virtual, power: virtual}
"""


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, private_virtual_rack: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rig")
    (root / "rack.yaml").write_text(RACK)
    build = root / "unit-test-app"
    subprocess.run([sys.executable, "-m", "pytest_hilfarm", "sim", "build-app", "--chip",
                    "esp32c3", "--project", "unit_test_app", "--unity", "-o", str(build)],
                   check=True, capture_output=True)
    return {"rack": root / "rack.yaml", "build": build}


def run(pytester: pytest.Pytester, rig: dict[str, Path], *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--hil-rack={rig['rack']}", f"--hil-firmware={rig['build']}",
        "-rA", *args, timeout=240)


def test_every_case_is_its_own_result_and_testcase(pytester: pytest.Pytester,
                                                   rig: dict[str, Path]) -> None:
    pytester.makepyfile("""
        import pytest
        @pytest.mark.hil(count=1)
        @pytest.mark.hil_unity()
        def test_unit(hil_unity):
            pass
    """)
    junit = pytester.path / "junit.xml"
    result = run(pytester, rig, f"--junitxml={junit}")
    # 6 cases run (the [ignore]-tagged one is left out): 3 pass, 1 fails, 1 IGNOREs, 1 panics;
    # the test itself fails because cases failed.
    result.assert_outcomes(passed=3, failed=3, skipped=1)
    result.stdout.fnmatch_lines([
        "PASSED*test_unit[[]sensor values are plausible[]]*",
        "FAILED*test_unit[[]config checksum matches[]]*",
        "FAILED*test_unit[[]null pointer store[]]*",
        "FAILED*::test_unit - Failed*",
    ])
    cases = {c.get("name"): c for c in ET.parse(junit).getroot().iter("testcase")}
    assert "test_unit[mesh node id is stable]" in cases
    failure = cases["test_unit[config checksum matches]"].find("failure")
    assert failure is not None
    assert cases["test_unit[wear levelling on this flash]"].find("skipped") is not None
    assert "sensor soak over an hour" not in " ".join(cases)


def test_a_group_or_one_case(pytester: pytest.Pytester, rig: dict[str, Path]) -> None:
    pytester.makepyfile("""
        import pytest
        @pytest.mark.hil(count=1)
        @pytest.mark.hil_unity(group="[sensor]")
        def test_sensor(hil_unity):
            pass
        @pytest.mark.hil(count=1)
        @pytest.mark.hil_unity(name="mesh node id is stable")
        def test_one(hil_unity):
            pass
    """)
    result = run(pytester, rig)
    # [sensor]: two cases (the soak is [ignore]d) + the test; one named case + the test.
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(["PASSED*test_sensor[[]battery voltage is in range[]]*",
                                 "PASSED*test_one[[]mesh node id is stable[]]*"])


def test_cases_are_reported_under_xdist(pytester: pytest.Pytester, rig: dict[str, Path]) -> None:
    pytester.makepyfile("""
        import pytest
        @pytest.mark.hil(count=1)
        @pytest.mark.hil_unity(group="[sensor]")
        def test_sensor(hil_unity):
            pass
    """)
    junit = pytester.path / "junit.xml"
    result = run(pytester, rig, "-n", "2", f"--junitxml={junit}")
    result.assert_outcomes(passed=3)
    names = {c.get("name") for c in ET.parse(junit).getroot().iter("testcase")}
    assert {"test_sensor[sensor values are plausible]",
            "test_sensor[battery voltage is in range]"} <= names
