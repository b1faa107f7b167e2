from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_hilfarm.errors import ConfigError
from pytest_hilfarm.rollout.hil import read_junit, read_results
from pytest_hilfarm.rollout.telemetry import DeviceTelemetry, aggregate, read_telemetry


def test_jsonl_malformed_lines_reported_with_numbers_and_skipped(tmp_path: Path):
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join([
        json.dumps({"device_id": "a", "firmware": "2", "crashes": 1, "connected_ratio": 1.0}),
        "{not json",
        json.dumps({"device_id": "b", "firmware": "2", "connected_ratio": 1.5}),
        "",
        json.dumps(["a list"]),
        json.dumps({"device_id": "c", "firmware": "1", "battery_drain": 20}),
        json.dumps({"device_id": "d", "firmware": "2", "crashes": -1}),
        json.dumps({"device_id": "e", "firmware": "2", "colour": "red"}),
        json.dumps({"firmware": "2"}),
    ]) + "\n")
    tf = read_telemetry(p)
    assert [r.device_id for r in tf.records] == ["a", "c"]
    assert [(pr.line, pr.what.split(" ")[0]) for pr in tf.problems] == [
        (2, "not"), (3, "connected_ratio"), (5, "not"), (7, "crashes"), (8, "unknown"),
        (9, "device_id")]
    assert str(tf.problems[0]).startswith(f"{p}:2: not JSON")
    assert str(tf.problems[0]).endswith("(line skipped)")


def test_csv_reads_and_reports_bad_rows(tmp_path: Path):
    p = tmp_path / "t.csv"
    p.write_text("device_id,firmware,crashes,connected_ratio,battery_drain\n"
                 "a,2.4.0,0,0.99,20.5\n"
                 "b,2.4.0,x,0.99,20\n"
                 "c,2.4.0,0,0.99\n"
                 "d,2.3.1,,,19.5\n")
    tf = read_telemetry(p)
    assert [r.device_id for r in tf.records] == ["a", "d"]
    assert [pr.line for pr in tf.problems] == [3, 4]
    assert tf.records[1].connected_ratio is None


def test_csv_without_required_columns(tmp_path: Path):
    p = tmp_path / "t.csv"
    p.write_text("id,fw\n1,2\n")
    with pytest.raises(ConfigError, match="lacks device_id, firmware"):
        read_telemetry(p)


def test_unknown_format(tmp_path: Path):
    p = tmp_path / "t.txt"
    p.write_text("")
    with pytest.raises(ConfigError, match="unknown telemetry format"):
        read_telemetry(p)


def test_aggregate_counts_exposed_devices_and_baseline():
    recs = [
        DeviceTelemetry("a", "2", crashes=2, connected_ratio=0.95, battery_drain=22.0),
        DeviceTelemetry("b", "2", connected_ratio=0.5, battery_drain=24.0),
        DeviceTelemetry("c", "1", rolled_back_from="2", battery_drain=18.0),
        DeviceTelemetry("d", "1", battery_drain=20.0),
        DeviceTelemetry("e", "2", boot_failures=1),
    ]
    ev = aggregate(recs, "2", 0.9)
    assert (ev.devices, ev.crashed, ev.connected_ok, ev.connectivity_reported,
            ev.boot_failed) == (4, 1, 1, 2, 2)
    assert ev.drain_n == 2 and ev.drain_mean == pytest.approx(23.0)
    assert ev.drain_sd == pytest.approx(1.41421, rel=1e-4)
    # The rolled-back device runs the old app but its drain is not a clean baseline sample.
    assert ev.baseline_drain_mean == pytest.approx(20.0)


def test_aggregate_falls_back_to_recorded_baseline():
    ev = aggregate([DeviceTelemetry("a", "2", battery_drain=21.0)], "2", 0.9, baseline_drain=20)
    assert ev.baseline_drain_mean == 20


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites name="pytest tests"><testsuite name="pytest" errors="0" failures="1" skipped="1"
 tests="4"><testcase classname="examples.test_ota" name="test_update"/>
<testcase classname="examples.test_ota" name="test_rollback"><failure message="boom"/></testcase>
<testcase classname="examples.test_mesh" name="test_mesh"><skipped message="2 boards"/></testcase>
<testcase classname="examples.test_blink" name="test_blink"/></testsuite></testsuites>
"""


def test_read_junit_counts_cases(tmp_path: Path):
    p = tmp_path / "hil.xml"
    p.write_text(JUNIT)
    s = read_junit(p)
    assert (s.tests, s.failures, s.errors, s.skipped) == (4, 1, 0, 1)
    assert s.failed_names == ("examples.test_ota::test_rollback",)


def test_read_junit_written_by_pytest(tmp_path: Path):
    (tmp_path / "test_x.py").write_text("def test_ok(): pass\ndef test_bad(): assert 0\n")
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    "--junitxml=hil.xml", "test_x.py"], cwd=tmp_path, capture_output=True,
                   check=False, timeout=60)
    s = read_junit(tmp_path / "hil.xml")
    assert (s.tests, s.failures) == (2, 1)


def test_read_junit_errors(tmp_path: Path):
    p = tmp_path / "bad.xml"
    p.write_text("<testsuites><testsuite>")
    with pytest.raises(ConfigError, match="malformed"):
        read_junit(p)
    with pytest.raises(ConfigError, match="cannot read"):
        read_junit(tmp_path / "missing.xml")


def test_read_results_both_forms(tmp_path: Path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"passed": 5, "failed": 0, "errors": 0, "skipped": 1}))
    assert read_results(a).tests == 6
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"tests": [{"nodeid": "t::a", "outcome": "passed"},
                                       {"nodeid": "t::b", "outcome": "failed"}]}))
    s = read_results(b)
    assert (s.tests, s.failures, s.failed_names) == (2, 1, ("t::b",))
    c = tmp_path / "c.json"
    c.write_text(json.dumps({"tests": [{"outcome": "weird"}]}))
    with pytest.raises(ConfigError, match="tests\\[0\\]"):
        read_results(c)
