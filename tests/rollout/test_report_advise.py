from __future__ import annotations

import re
from xml.etree import ElementTree as ET

import pytest
from rollout_helpers import EXAMPLE_PLAN

from pytest_hilfarm.errors import UsageError
from pytest_hilfarm.rollout.advise import advise, format_advice
from pytest_hilfarm.rollout.fleet import parse_fault, simulate
from pytest_hilfarm.rollout.plan import load_plan
from pytest_hilfarm.rollout.report import ReportInput, render_html
from pytest_hilfarm.rollout.store import AuditEntry

PLAN = load_plan(EXAMPLE_PLAN)


def _report(*faults: str, devices: int = 200_000) -> str:
    r = simulate(PLAN, EXAMPLE_PLAN.read_text(), devices, [parse_fault(f) for f in faults])
    return render_html(ReportInput("Sim <report>", r.rollout_id, r.final_state, "2.4.0",
                                   "2.3.1", r.audit))


def test_report_is_self_contained_html_with_svg_charts():
    page = _report("battery:0.3")
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page and not re.search(r'(src|href)="https?:', page)
    assert "Sim &lt;report&gt;" in page  # escaped
    svgs = re.findall(r"<svg .*?</svg>", page, re.S)
    assert len(svgs) == 5  # progression + four gates
    for svg in svgs:
        ET.fromstring(svg)  # each chart is well-formed XML
    assert "threshold" in page and "battery drain vs baseline" in page


def test_report_progression_reaches_100_for_a_good_release():
    page = _report(devices=1_000_000)
    assert page.count("<circle") > 10 and "complete" in page


def test_report_with_no_evaluations():
    audit = (AuditEntry(1, "x", 0, 0.0, None, "waiting", None, "start", "cli", "started", {}),)
    page = render_html(ReportInput("t", "x", "waiting", "2", None, audit))
    assert "no evaluation yet" in page


def test_advise_includes_stages_by_the_ten_times_rule():
    a = advise(fleet_size=500, safety_critical=False, hardware="none", field_failure_cost=5_000)
    picked = {s.stage: s.included for s in a.stages}
    assert picked == {"unit": True, "integration": True, "simulation": False, "hil": False,
                      "staging": False}
    assert "5,000 > 10 x stage cost 200" in a.stages[1].reason
    assert "costs more than the failures it prevents" in a.stages[3].reason


def test_advise_forces_stages_for_safety_and_hardware():
    a = advise(fleet_size=200_000, safety_critical=True, hardware="heavy", field_failure_cost=0)
    assert all(s.included for s in a.stages if s.stage != "integration")
    text = format_advice(a)
    assert "required: heavy hardware interaction" in text
    assert "needs a canary of 2,703 devices" in text


def test_advise_small_fleet_note_and_bad_input():
    a = advise(fleet_size=1000, safety_critical=False, hardware="some", field_failure_cost=1e6)
    assert any("smaller than" in n for n in a.notes)
    with pytest.raises(UsageError):
        advise(10, False, "some", 1.0, {"fuzzing": 1.0})
    with pytest.raises(UsageError):
        advise(10, False, "lots", 1.0)
