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
    balena_pinning,
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


# balena API v7 fields, from docs.balena.io/reference/api/resources/device and .../fleet
# ("Available Fields"), and the device_tag resource (device, tag_key, value).
BALENA_DEVICE_FIELDS = {
    "id", "belongs_to__application", "belongs_to__user", "actor", "device_name",
    "is_of__device_type", "uuid", "is_running__release", "is_pinned_on__release",
    "should_be_running__release", "note", "local_id", "status", "overall_status", "is_online",
    "should_be_operated_by__release", "should_be_managed_by__release", "is_web_accessible",
    "is_locked_until__date", "created_at", "is_active"}
BALENA_FLEET_FIELDS = {
    "id", "uuid", "organization", "actor", "app_name", "slug", "should_be_running__release",
    "application_type", "is_for__device_type", "should_track_latest_release",
    "is_accessible_by_support_until__date", "is_public", "is_host", "is_archived",
    "is_discoverable", "is_stored_at__repository_url", "created_at"}
BALENA = {"fleet_id": 1987213, "release_id": 3072946, "previous_release_id": 3071850}


def _requests(body: dict) -> list[dict]:
    reqs = list(body["prepare"]) + list(body["rollback"])
    for ring in body["rings"]:
        reqs += ring["requests"]
    return reqs


def test_balena_golden_and_field_names():
    body = balena_pinning(PLAN, MANIFEST, BALENA)
    check_golden("balena_pinning.json", body)
    assert [r["ring"] for r in body["rings"]] == ["canary", "early", "broad", "fleet"]
    for req in _requests(body):
        assert req["method"] == "PATCH"
        if req["path"].startswith("/v7/device"):
            assert set(req["body"]) <= BALENA_DEVICE_FIELDS
            # Pinning writes is_pinned_on__release; should_be_running__release is the device's
            # computed target release in API v7, not the field to set.
            assert set(req["body"]) == {"is_pinned_on__release"}
            flt = req["query"]["$filter"]
            assert flt.startswith("belongs_to__application eq 1987213 and ")
        else:
            assert req["path"] == "/v7/application(1987213)"
            assert set(req["body"]) <= BALENA_FLEET_FIELDS
            assert req["body"]["should_track_latest_release"] is False
    canary = body["rings"][0]["requests"][0]
    assert canary["body"] == {"is_pinned_on__release": 3072946}
    assert "device_tag/any(dt:dt/tag_key eq 'rollout-ring' and dt/value eq 'canary')" in \
        canary["query"]["$filter"]
    assert body["prepare"][0]["body"]["should_be_running__release"] == 3071850
    assert body["rollback"][1]["body"] == {"is_pinned_on__release": None}


@pytest.mark.parametrize("patch, what", [
    ({"fleet_id": 0}, "fleet_id"), ({"release_id": "abc"}, "release_id"),
    ({"previous_release_id": 3072946}, "equals previous_release_id"),
    ({"ring_tag": "ring's"}, "ring_tag")])
def test_balena_options_checked(patch, what):
    with pytest.raises(ConfigError, match=what):
        balena_pinning(PLAN, MANIFEST, {**BALENA, **patch})


def test_balena_escapes_ring_names_in_the_filter():
    plan = parse_plan("name: fw\nrings:\n  - {name: \"o'brien\", percent: 10}\n"
                      "  - {name: all, percent: 100}\n")
    body = balena_pinning(plan, MANIFEST, BALENA)
    assert "dt/value eq 'o''brien'" in body["rings"][0]["requests"][0]["query"]["$filter"]


def test_aws_needs_a_download_url():
    from dataclasses import replace

    with pytest.raises(ConfigError, match="no url") as exc:
        aws_iot_jobs(PLAN, replace(MANIFEST, url=None))
    assert "--url" in (exc.value.hint or "")
