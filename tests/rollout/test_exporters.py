from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import pytest
from rollout_helpers import EXAMPLE_PLAN

from pytest_hilfarm.errors import ConfigError
from pytest_hilfarm.rollout.exporters import (
    aws_iot_jobs,
    hawkbit_groups,
    hawkbit_rollout,
    mender_deployment,
)
from pytest_hilfarm.rollout.plan import load_plan, parse_plan

GOLDEN = Path(__file__).parent / "golden"
PLAN = load_plan(EXAMPLE_PLAN)
MANIFEST = PLAN.load_manifest()
START = datetime(2026, 3, 2, 9, 30, tzinfo=timezone.utc)


def check_golden(name: str, body: object) -> None:
    """Compare with tests/rollout/golden/NAME; HILFARM_UPDATE_GOLDEN=1 rewrites the file."""
    path = GOLDEN / name
    text = json.dumps(body, indent=2, sort_keys=True) + "\n"
    if os.environ.get("HILFARM_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert json.loads(path.read_text()) == json.loads(text), f"{name} differs from golden"


def test_aws_golden_and_field_names():
    body = aws_iot_jobs(PLAN, MANIFEST)
    check_golden("aws_iot_jobs.json", body)
    jobs = body["jobs"]
    assert [j["targets"][0].rsplit("/", 1)[1] for j in jobs] == [
        "thermostat-canary", "thermostat-early", "thermostat-broad", "thermostat-fleet"]
    job = jobs[0]
    assert set(job) >= {"jobId", "targets", "targetSelection", "document",
                        "jobExecutionsRolloutConfig", "abortConfig", "timeoutConfig"}
    rate = job["jobExecutionsRolloutConfig"]
    assert set(rate) == {"maximumPerMinute", "exponentialRate"}
    assert set(rate["exponentialRate"]) == {"baseRatePerMinute", "incrementFactor",
                                            "rateIncreaseCriteria"}
    assert rate["exponentialRate"]["rateIncreaseCriteria"] == {"numberOfNotifiedThings": 100}
    crit = job["abortConfig"]["criteriaList"][0]
    assert crit == {"failureType": "FAILED", "action": "CANCEL", "thresholdPercentage": 0.5,
                    "minNumberOfExecutedThings": 2000}
    assert job["timeoutConfig"] == {"inProgressTimeoutInMinutes": 60}
    doc = json.loads(job["document"])
    assert {k: doc[k] for k in ("url", "sha256", "signature", "secure_version")} == {
        "url": MANIFEST.url, "sha256": MANIFEST.sha256, "signature": MANIFEST.signature,
        "secure_version": 3}
    assert "." not in job["jobId"]


@pytest.mark.parametrize("key, value", [
    ("maximum_per_minute", 1001), ("base_rate_per_minute", 0), ("increment_factor", 1.0),
    ("increment_factor", 2.25), ("in_progress_timeout_minutes", 10081),
    ("thing_group_arn_prefix", "thermostat-"), ("target_selection", "SOMETIMES")])
def test_aws_limits(key, value):
    with pytest.raises(ConfigError, match=key.split("_")[0]):
        aws_iot_jobs(PLAN, MANIFEST, {key: value})


def test_hawkbit_percentages_both_styles():
    rings = parse_plan("name: fw\n").production_rings()
    assert hawkbit_groups(rings, "new") == [1, 4, 20, 75]
    assert hawkbit_groups(rings, "legacy") == [1, 4.04, 21.05, 100]
    with pytest.raises(ConfigError):
        hawkbit_groups(rings, "sideways")


@pytest.mark.parametrize("style", ["new", "legacy"])
def test_hawkbit_golden(style):
    body = hawkbit_rollout(PLAN, MANIFEST, style)
    check_golden(f"hawkbit_{style}.json", body)
    assert body["errorAction"] == {"action": "PAUSE", "expression": ""}
    assert body["successAction"] == {"action": "NEXTGROUP", "expression": ""}
    assert body["distributionSetId"] == 6
    assert all(g["errorCondition"]["condition"] == "THRESHOLD" for g in body["groups"])
    # hawkBit parses the expression with Integer.valueOf: whole percents only.
    assert all(g["errorCondition"]["expression"].isdigit() for g in body["groups"])
    assert [g["name"] for g in body["groups"]] == ["canary", "early", "broad", "fleet"]


def test_hawkbit_needs_a_distribution_set():
    plan = parse_plan("name: fw\n")
    with pytest.raises(ConfigError, match="distribution_set_id"):
        hawkbit_rollout(plan, MANIFEST)


def test_mender_golden():
    body = mender_deployment(PLAN, MANIFEST, START)
    check_golden("mender_phased.json", body)
    assert [p.get("batch_size") for p in body["phases"]] == [1, 4, 20, None]
    assert body["phases"][0]["start_ts"] == "2026-03-02T09:30:00.000+0000"
    assert body["phases"][3]["start_ts"] == "2026-03-06T09:30:00.000+0000"  # 24+24+48 h later
    assert set(body) == {"name", "artifact_name", "filter_id", "phases", "retries"}


def test_mender_whole_percents_only():
    plan = parse_plan("name: fw\nrings:\n  - {name: a, percent: 0.5}\n  - {name: b, "
                      "percent: 100}\nexporters: {mender: {filter_id: f}}\n")
    with pytest.raises(ConfigError, match="whole percent"):
        mender_deployment(plan, MANIFEST, START)
