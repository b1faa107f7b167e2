"""The quarantine list: its file format, and a quarantined test that runs but does not fail
the job (pytest in a subprocess, as CI runs it), with the farm still recording the failure."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pytest_hilfarm.description.quarantine import load_quarantine, parse_quarantine
from pytest_hilfarm.errors import ConfigError

pytest_plugins = ["pytester"]


def test_entries_with_and_without_comments_and_patterns() -> None:
    q = parse_quarantine(textwrap.dedent("""\
        # known-flaky
        - tests:
            - examples/test_mesh.py::test_mesh_heal
            - "examples/test_network.py::test_*_under_loss"
          comment: heals late under radio loss
        - examples/test_ota.py::test_power_cut
    """), "q.yaml")
    assert [(e.pattern, e.comment, e.where) for e in q.entries] == [
        ("examples/test_mesh.py::test_mesh_heal", "heals late under radio loss", "q.yaml:3"),
        ("examples/test_network.py::test_*_under_loss", "heals late under radio loss",
         "q.yaml:4"),
        ("examples/test_ota.py::test_power_cut", "", "q.yaml:6")]
    assert q.match("examples/test_network.py::test_ota_under_loss") is q.entries[1]
    assert q.match("examples/test_network.py::test_outage") is None
    assert not parse_quarantine("", "empty.yaml") and parse_quarantine("", "e").entries == ()


@pytest.mark.parametrize(("text", "words", "line"), [
    ("tests: [a]\n", "must be a YAML list", 1),
    ("- tests: []\n", "'tests' is empty", 1),
    ("- comment: why\n", "needs 'tests'", 1),
    ("- tests: [a]\n  reason: x\n", "unknown key 'reason'", 1),
    ("- a\n- [b]\n", "must be a test id or a mapping", 2),
    ("- tests: [a\n", "not valid YAML", 2),
])
def test_mistakes_name_the_file_and_line(text: str, words: str, line: int) -> None:
    with pytest.raises(ConfigError, match=words) as info:
        parse_quarantine(text, "q.yaml")
    assert info.value.where == f"q.yaml:{line}"


def test_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the quarantine list") as info:
        load_quarantine(tmp_path / "nope.yaml")
    assert "HILFARM_QUARANTINE" in (info.value.hint or "")


TESTS = """
import pytest

def test_flaky_one():
    assert False, "mesh did not heal"

def test_steady():
    assert True

def test_really_broken():
    assert False, "regression"

@pytest.fixture
def rig_fault():
    raise RuntimeError("port vanished")

def test_flaky_with_setup_error(rig_fault):
    pass
"""


def test_a_quarantined_failure_does_not_fail_the_job(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_q=TESTS)
    (pytester.path / "quarantine.yaml").write_text(
        "- tests: ['test_q.py::test_flaky_*']\n  comment: known flaky (issue 42)\n")
    # Without the list: two failures and an error, as before.
    plain = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    plain.assert_outcomes(passed=1, failed=2, errors=1)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider",
                                           "--hil-quarantine", "quarantine.yaml", "-rx")
    # The quarantined test's failure is an expected failure; the unlisted one still fails,
    # and a setup error (a rig fault) is never hidden by the list.
    result.assert_outcomes(passed=1, failed=1, xfailed=1, errors=1)
    result.stdout.fnmatch_lines([
        "*1 quarantined test(s) failed; the job does not fail on them*",
        "  test_q.py::test_flaky_one",
        "XFAIL test_q.py::test_flaky_one - hil quarantine (quarantine.yaml:1: known flaky "
        "(issue 42))",
    ])
    (pytester.path / "quarantine.yaml").write_text(
        "- test_q.py::test_flaky_one\n- test_q.py::test_really_broken\n")
    pytester.makeini("[pytest]\nhil_quarantine = quarantine.yaml\n")
    clean = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "not setup_error")
    clean.assert_outcomes(passed=1, xfailed=2)
    assert clean.ret == 0


def test_a_bad_quarantine_list_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_q="def test_a():\n    pass\n")
    (pytester.path / "q.yaml").write_text("tests: nope\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--hil-quarantine=q.yaml")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*q.yaml:1: quarantine list: the file must be a YAML list "
                                 "(chosen by option --hil-quarantine)"])
