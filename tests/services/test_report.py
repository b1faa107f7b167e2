"""The nightly report: a week of seeded results in, the planted faults named out; drift; CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from nightly import BAD_BOARD, DAY, TESTS, generate_week

from pytest_hilfarm.cli import main
from pytest_hilfarm.description.quarantine import parse_quarantine
from pytest_hilfarm.services.report import Thresholds, analyse, from_store, parse_since, to_json
from pytest_hilfarm.services.report.render import page, text
from pytest_hilfarm.store import FarmStore
from pytest_hilfarm.store import TestResult as Result

RACK = """\
version: 1
name: nightly
state_dir: {state}
boards:
{boards}
"""


def _rack(tmp_path: Path) -> Path:
    boards = "".join(f"  - {{id: {b}, chip: {c}, port: virtual, reset: virtual, power: virtual}}\n"
                     for c, bs in (("esp32", ["esp32-1", "esp32-2", "esp32-3"]),
                                   ("esp32c3", ["esp32c3-1", "esp32c3-2"])) for b in bs)
    path = tmp_path / "rack.yaml"
    path.write_text(RACK.format(state=tmp_path / "state", boards=boards))
    return path


@pytest.fixture
def week(tmp_path: Path) -> tuple[FarmStore, object, Path]:
    rack = _rack(tmp_path)
    store = FarmStore(tmp_path / "state" / "farm.db")
    planted = generate_week(store, seed=17)
    return store, planted, rack


def test_a_week_of_nightly_results_names_the_flaky_test_the_sick_board_and_the_broken_firmware(
        week: tuple[FarmStore, object, Path]) -> None:
    store, planted, _ = week
    report = from_store(store, since=planted.since, until=planted.until)
    assert report.results == planted.results > 180
    assert {t.test_id for t in report.tests} == set(TESTS)
    assert [t.test_id for t in report.flaky] == [planted.flaky]
    flaky = report.flaky[0]
    assert 0.5 < flaky.pass_rate < 0.9 and len(flaky.failures_by_board) >= 2  # not one board's
    assert [t.test_id for t in report.broken] == [planted.broken]
    hint = report.broken[0].bisect
    assert hint is not None and hint.first_bad.sha256 == planted.first_bad
    assert hint.last_good is not None and hint.last_good.sha256 == planted.last_good
    assert hint.failing_firmwares == 3 and hint.failed_runs == 9
    assert [b.board for b in report.sick_boards] == [BAD_BOARD]
    bad = next(b for b in report.boards if b.board == BAD_BOARD)
    others = [b for b in report.boards if b.board != BAD_BOARD]
    assert bad.infra_rate > 0.2 and all(b.infra_rate < 0.1 for b in others)
    assert bad.failed_checks >= 2
    # The broken test takes its suite down from 100 % to 75 %: that drift is flagged.
    assert [s.suite for s in report.drifting] == ["examples/test_ota.py"]
    ota = report.drifting[0]
    assert ota.early == 1.0 and ota.late is not None and ota.late < 0.8
    assert [t.test_id for t in report.slower] == [planted.slower]


def test_the_renderings_name_the_same_findings(week: tuple[FarmStore, object, Path]) -> None:
    store, planted, _ = week
    report = from_store(store, since=planted.since, until=planted.until)
    out = text(report)
    assert f"flaky tests: 1\n  {planted.flaky}" in out
    assert f"bisect between {planted.last_good[:12]} and {planted.first_bad[:12]}" in out
    assert re.search(rf"sick boards .*: 1\n  {BAD_BOARD}: \d+ of \d+ leases ended in a rig fault",
                     out)
    html = page(report)
    assert html.count('<figure class="suite') == 3 and 'class="suite drifted"' in html
    assert html.count("<svg") == 3 + 1 + 1  # suites, boards, the slower test
    assert f"<td>{BAD_BOARD}</td>" in html and "sick:" in html
    data = to_json(report)
    json.dumps(data)
    assert data["flaky"] == [planted.flaky] and data["sick_boards"] == [BAD_BOARD]
    assert data["broken"] == [planted.broken]
    assert data["tests"][0]["duration_by_day"]


def _results(per_day: list[tuple[int, int]], suite: str = "tests/test_x.py") -> list[Result]:
    out = []
    for day, (runs, fails) in enumerate(per_day):
        for i in range(runs):
            out.append(Result("b1", f"{suite}::test_{i % 10}",
                                  "failed" if i < fails else "passed", 1.0, "ab" * 32,
                                  day * DAY + i))
    return out


@pytest.mark.parametrize(("per_day", "drifted"), [
    ([(100, 2)] * 3 + [(100, 6)] + [(100, 10)] * 3, True),   # 98 % -> 90 %: debt
    ([(100, 2)] * 7, False),                                  # steady 98 %
    ([(100, 2)] * 4 + [(100, 4)] * 3, False),                 # 98 % -> 96 %: under the threshold
    ([(10, 0)] * 6 + [(10, 1)], False),                       # one failure of ten: chance
    ([(10, 0)] * 3 + [(10, 2)] * 4, True),                    # 100 % -> 80 %, 30 runs a side
    ([(10, 0)] * 5 + [(10, 1)] * 2, False),                   # 100 % -> 93 %: may be chance
])
def test_a_suite_drift_is_flagged_beyond_the_threshold_and_chance(
        per_day: list[tuple[int, int]], drifted: bool) -> None:
    report = analyse(_results(per_day), [], [], since=0, until=len(per_day) * DAY)
    (suite,) = report.suites
    assert suite.drifted is drifted, (suite.early, suite.late, suite.p_value)
    tighter = analyse(_results(per_day), [], [], since=0, until=len(per_day) * DAY,
                      thresholds=Thresholds(drift=0.5))
    assert not tighter.suites[0].drifted


def test_a_single_failure_on_the_newest_firmware_is_not_a_break() -> None:
    rows = [Result("b1", "t.py::a", "passed", 1.0, "aa" * 32, 1.0),
            Result("b1", "t.py::a", "failed", 1.0, "bb" * 32, 2.0)]
    assert analyse(rows, [], [], since=0, until=10).broken == ()
    rows.append(Result("b2", "t.py::a", "failed", 1.0, "bb" * 32, 3.0))
    (broken,) = analyse(rows, [], [], since=0, until=10).broken
    assert broken.bisect is not None and broken.bisect.first_bad.sha256 == "bb" * 32


def test_the_report_shows_the_quarantine_list(week: tuple[FarmStore, object, Path]) -> None:
    store, planted, _ = week
    quarantine = parse_quarantine(
        f"- tests: [{planted.flaky}]\n  comment: heals late under radio loss\n"
        "- examples/test_gone.py::*\n", "q.yaml")
    report = from_store(store, since=planted.since, until=planted.until, quarantine=quarantine)
    assert report.flaky[0].quarantine is not None
    assert report.flaky[0].quarantine.where == "q.yaml:1"
    first, gone = report.quarantine
    assert first.tests == (planted.flaky,) and first.failed > 0 and gone.tests == ()
    out = text(report)
    assert f"{planted.flaky} [quarantined]" in out and "(no runs in the window)" in out
    assert "heals late under radio loss" in page(report)


def test_hilfarm_report_on_the_farm_store(week: tuple[FarmStore, object, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    store, planted, rack = week
    assert main(["report", "--rack", str(rack), "--since", "8d", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["flaky"] == [planted.flaky] and data["sick_boards"] == [BAD_BOARD]
    out_file = tmp_path / "r.html"
    assert main(["report", "--rack", str(rack), "--html", str(out_file), "--check"]) == 1
    assert "1 flaky, 1 broken, 1 sick boards, 1 drifting suites" in capsys.readouterr().out
    assert out_file.read_text().startswith("<!DOCTYPE html>")
    # An empty farm: nothing to report, nothing flagged.
    (tmp_path / "empty").mkdir()
    empty = _rack(tmp_path / "empty")
    assert main(["report", "--rack", str(empty), "--since", "2h", "--check"]) == 0
    assert "0 results of 0 tests on 0 boards" in capsys.readouterr().out


def test_bad_arguments_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    rack = _rack(tmp_path)
    assert main(["report", "--rack", str(rack), "--since", "last tuesday"]) == 2
    assert "neither a span nor a date" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["report", "--drift", "2"])
    assert exited.value.code == 2
    (tmp_path / "q.yaml").write_text("tests: nope\n")
    assert main(["report", "--rack", str(rack), "--quarantine", str(tmp_path / "q.yaml")]) == 2
    assert "q.yaml:1" in capsys.readouterr().err


def test_parse_since() -> None:
    assert parse_since("7d", 1000.0 * DAY) == 993 * DAY
    assert parse_since("36h", 10 * DAY) == 8.5 * DAY
    assert parse_since("1970-01-02", 0) == DAY
