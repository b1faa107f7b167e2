"""Exporters: a plan + manifest -> the request bodies AWS IoT Jobs, hawkBit, Mender and balena
take.

Field names and limits follow notes/esp-ota-and-rollout-facts.md §6. Each exporter is a pure
function returning plain dicts (JSON-ready) and validates the platform's documented limits, so a
bad value fails here with the key's name instead of as an HTTP 400 later. None of them calls a
platform. Only production rings are exported: staging rings are in-house devices that the
controller drives directly (they are not a share of the platform's fleet).
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timedelta, timezone
from typing import Any

from pytest_hilfarm.errors import ConfigError

from .manifest import Manifest
from .plan import Plan, Ring

EXPORTERS = ("aws", "hawkbit", "mender", "balena")


def _opts(plan: Plan, name: str, overrides: dict[str, Any] | None) -> dict[str, Any]:
    base = plan.exporters.get(name) or {}
    if not isinstance(base, dict):
        raise ConfigError(f"exporters.{name} must be a mapping", where=plan.source)
    return {**base, **(overrides or {})}


def _num(opts: dict[str, Any], key: str, default: float, lo: float, hi: float, where: str,
         decimals: int | None = None) -> float:
    v = opts.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ConfigError(f"{key} = {v!r} is outside {lo:g}..{hi:g}", where=where)
    if decimals is not None and round(v, decimals) != v:
        raise ConfigError(f"{key} = {v!r} has more than {decimals} decimal place(s)", where=where)
    return float(v)


def _production(plan: Plan) -> tuple[Ring, ...]:
    return plan.production_rings()


def _increments(rings: tuple[Ring, ...]) -> list[float]:
    """Cumulative ring percentages -> the share each ring adds (1/5/25/100 -> 1/4/20/75)."""
    out, prev = [], 0.0
    for r in rings:
        assert r.percent is not None
        out.append(round(r.percent - prev, 6))
        prev = r.percent
    return out


def _job_id(text: str) -> str:
    # Job ids allow letters, digits, "-" and "_" (AWS CreateJob jobId pattern); dots in versions
    # become "_".
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)[:64]


def aws_iot_jobs(plan: Plan, manifest: Manifest,
                 overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """One CreateJob body per ring thing group (notes §6.1: the ramp is things/minute, not %).

    Ring thing groups are disjoint (ring ``early`` holds the 4 % that ``canary`` does not), and
    each job is created when the controller promotes into its ring. ``abortConfig`` cancels a
    ring's job once its FAILED share exceeds the plan's boot-failure threshold; AWS has no pause.
    """
    where = f"{plan.source}: exporters.aws"
    o = _opts(plan, "aws", overrides)
    prefix = o.get("thing_group_arn_prefix")
    if not isinstance(prefix, str) or not prefix.startswith("arn:"):
        raise ConfigError("thing_group_arn_prefix must be an ARN prefix", where=where,
                          hint='e.g. "arn:aws:iot:eu-west-1:123456789012:thinggroup/fw-"')
    max_per_min = int(_num(o, "maximum_per_minute", 1000, 1, 1000, where, 0))
    base_rate = int(_num(o, "base_rate_per_minute", 10, 1, 1000, where, 0))
    factor = _num(o, "increment_factor", 2.0, 1.1, 5.0, where, 1)
    notified = int(_num(o, "notified_things", 100, 1, 2**31 - 1, where, 0))
    timeout = int(_num(o, "in_progress_timeout_minutes", 60, 1, 10080, where, 0))
    selection = o.get("target_selection", "SNAPSHOT")
    if selection not in ("SNAPSHOT", "CONTINUOUS"):
        raise ConfigError(f"target_selection {selection!r} is not SNAPSHOT or CONTINUOUS",
                          where=where)
    if manifest.url is None:
        raise ConfigError("the release manifest has no url, and an AWS IoT job document tells "
                          "the device where to download the image", where=where,
                          hint="make the manifest with `hilfarm ota release IMAGE --key KEY "
                               "--url URL -o FILE`")
    document = json.dumps(manifest.job_document(), sort_keys=True, separators=(",", ":"))
    jobs = []
    for ring in _production(plan):
        # thresholdPercentage allows two decimals; the boot-failure gate is the closest analogue
        # of a FAILED job execution (the device could not install or boot the image).
        threshold = round(ring.gates.boot_failures.limit * 100, 2)
        jobs.append({
            "jobId": _job_id(f"{plan.name}-{manifest.version}-{ring.name}"),
            "targets": [f"{prefix}{ring.name}"],
            "targetSelection": selection,
            "document": document,
            "description": f"{plan.name} {manifest.version}: ring {ring.name} "
                           f"(cumulative {ring.percent:g}%)",
            "jobExecutionsRolloutConfig": {
                "maximumPerMinute": max_per_min,
                "exponentialRate": {
                    "baseRatePerMinute": base_rate,
                    "incrementFactor": factor,
                    "rateIncreaseCriteria": {"numberOfNotifiedThings": notified},
                },
            },
            "abortConfig": {"criteriaList": [
                {"failureType": "FAILED", "action": "CANCEL", "thresholdPercentage": threshold,
                 "minNumberOfExecutedThings": max(1, ring.min_devices)},
                {"failureType": "TIMED_OUT", "action": "CANCEL",
                 "thresholdPercentage": threshold,
                 "minNumberOfExecutedThings": max(1, ring.min_devices)},
            ]},
            "timeoutConfig": {"inProgressTimeoutInMinutes": timeout},
        })
    return {"jobs": jobs}


def hawkbit_groups(rings: tuple[Ring, ...], style: str) -> list[float]:
    """``targetPercentage`` per group (notes §6.3).

    ``new``: share of all targets in this group (hawkBit >= 0.5.0): 1/5/25/100 -> 1, 4, 20, 75.
    ``legacy``: percent of the targets still remaining: -> 1, 4.04, 21.05, 100.
    """
    inc = _increments(rings)
    if style == "new":
        return inc
    if style != "legacy":
        raise ConfigError(f"hawkBit percentage style {style!r} is not new or legacy",
                          where="--hawkbit-style", hint="new for hawkBit >= 0.5.0")
    out, remaining = [], 100.0
    for step in inc:
        out.append(round(step / remaining * 100, 2) if remaining > 0 else 100.0)
        remaining -= step
    return out


def _fiql(plan: Plan) -> str:
    parts = []
    t = plan.targeting
    if t.device_group:
        parts.append(f"tag=={t.device_group}")
    if t.hardware_revisions:
        parts.append("(" + ",".join(f"attribute.hw_revision=={h}"
                                    for h in t.hardware_revisions) + ")")
    if t.regions:
        parts.append("(" + ",".join(f"attribute.region=={r}" for r in t.regions) + ")")
    return ";".join(parts) or "id==*"


def hawkbit_rollout(plan: Plan, manifest: Manifest, style: str = "new",
                    overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``POST /rest/v1/rollouts`` body: groups, error -> PAUSE, success -> NEXTGROUP."""
    where = f"{plan.source}: exporters.hawkbit"
    o = _opts(plan, "hawkbit", overrides)
    ds = o.get("distribution_set_id")
    if isinstance(ds, bool) or not isinstance(ds, int) or ds < 1:
        raise ConfigError(f"distribution_set_id {ds!r} must be a positive integer", where=where,
                          hint="the id of the distribution set holding this firmware")
    kind = o.get("type", "forced")
    if kind not in ("forced", "soft", "timeforced", "downloadonly"):
        raise ConfigError(f"type {kind!r} is not forced, soft, timeforced or downloadonly",
                          where=where)
    success = int(_num(o, "success_threshold", 95, 0, 100, where, 0))
    rings = _production(plan)
    percents = hawkbit_groups(rings, style)
    groups: list[dict[str, Any]] = []
    for ring, pct in zip(rings, percents):
        # hawkBit parses the expression with Integer.valueOf: whole percents only. Round the
        # plan's threshold down so the platform pauses no later than our gate would.
        error = str(int(math.floor(ring.gates.boot_failures.limit * 100)))
        groups.append({
            "name": ring.name,
            "targetPercentage": pct,
            "successCondition": {"condition": "THRESHOLD", "expression": str(success)},
            "errorCondition": {"condition": "THRESHOLD", "expression": error},
            "confirmationRequired": False,
        })
    first_error = groups[0]["errorCondition"]["expression"] if groups else "0"
    return {
        "name": f"{plan.name}-{manifest.version}",
        "distributionSetId": ds,
        "targetFilterQuery": o.get("target_filter_query", _fiql(plan)),
        "type": kind,
        "successCondition": {"condition": "THRESHOLD", "expression": str(success)},
        "successAction": {"action": "NEXTGROUP", "expression": ""},
        "errorCondition": {"condition": "THRESHOLD", "expression": first_error},
        "errorAction": {"action": "PAUSE", "expression": ""},
        "groups": groups,
    }


def _mender_ts(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}+0000"


def mender_deployment(plan: Plan, manifest: Manifest, start: datetime,
                      overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``POST /api/management/v2/deployments/deployments`` phased body (notes §6.2).

    ``batch_size`` is the percent of devices a phase adds; the last phase has none and takes the
    rest. Phases start one soak apart; Mender will not abort on failures itself, so the
    controller's gates (and an abort via ``PUT …/status``) do that job.
    """
    where = f"{plan.source}: exporters.mender"
    o = _opts(plan, "mender", overrides)
    filter_id = o.get("filter_id")
    if not isinstance(filter_id, str) or not filter_id:
        raise ConfigError("filter_id must name the Mender device filter", where=where)
    retries = int(_num(o, "retries", 0, 0, 100, where, 0))
    rings = _production(plan)
    inc = _increments(rings)
    start = start.astimezone(timezone.utc)
    phases: list[dict[str, Any]] = []
    t = start
    for i, (ring, step) in enumerate(zip(rings, inc)):
        phase: dict[str, Any] = {"start_ts": _mender_ts(t)}
        if i < len(rings) - 1:
            if step != int(step):
                raise ConfigError(f"ring {ring.name} adds {step:g}% but Mender batch_size is a "
                                  "whole percent", where=f"{plan.source}: rings",
                                  hint="use whole-percent ring boundaries for Mender")
            phase = {"batch_size": int(step), **phase}
        phases.append(phase)
        t = t + timedelta(hours=ring.soak_hours)
    return {
        "name": f"{plan.name}-{manifest.version}",
        "artifact_name": o.get("artifact_name", f"{plan.name}-{manifest.version}"),
        "filter_id": filter_id,
        "phases": phases,
        "retries": retries,
    }


def _positive_int(opts: dict[str, Any], key: str, where: str, hint: str) -> int:
    v = opts.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{key} {v!r} must be a positive integer", where=where, hint=hint)
    return v


def _odata(text: str) -> str:
    """An OData string literal: single quotes doubled."""
    return "'" + text.replace("'", "''") + "'"


def balena_pinning(plan: Plan, manifest: Manifest,
                   overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Pin each ring's devices to the release: balena has no percentage rollout, so a ring is
    the devices tagged ``ring_tag=RING``, pinned to the candidate release (notes §6.4; balena
    API v7 resources ``device`` and ``application``).

    * ``prepare``: pin the fleet to the previous release, so that pushing the candidate release
      does not update every device that tracks the latest one;
    * per ring: ``PATCH /v7/device`` filtered by the ring's tag with
      ``{"is_pinned_on__release": <release id>}`` (device pinning; ``should_be_running__release``
      is the device's *computed* target in the current API, not the field to write);
    * last ring: pin the fleet (``should_be_running__release``, ``should_track_latest_release``
      false) and unpin the ring devices so they track it;
    * ``rollback``: pin the fleet back and unpin every device pinned to the candidate.

    Release ids are balena's integer ids (``balena release list``), not the firmware version.
    """
    where = f"{plan.source}: exporters.balena"
    o = _opts(plan, "balena", overrides)
    hint = "ids as shown by `balena fleet` / `balena releases`"
    fleet = _positive_int(o, "fleet_id", where, hint)
    release = _positive_int(o, "release_id", where, hint)
    previous = _positive_int(o, "previous_release_id", where, hint)
    if release == previous:
        raise ConfigError("release_id equals previous_release_id", where=where,
                          hint="a rollout must change the release")
    tag = o.get("ring_tag", "rollout-ring")
    if not isinstance(tag, str) or not re.match(r"^[A-Za-z0-9_.-]+$", tag):
        raise ConfigError(f"ring_tag {tag!r} must be letters, digits, . _ -", where=where)
    api = str(o.get("api_version", "v7"))
    app = f"/{api}/application({fleet})"
    in_fleet = f"belongs_to__application eq {fleet}"

    def pin_fleet(rid: int, why: str) -> dict[str, Any]:
        return {"method": "PATCH", "path": app, "why": why,
                "body": {"should_be_running__release": rid, "should_track_latest_release": False}}

    def pin_devices(flt: str, rid: int | None, why: str) -> dict[str, Any]:
        return {"method": "PATCH", "path": f"/{api}/device", "query": {"$filter": flt},
                "why": why, "body": {"is_pinned_on__release": rid}}

    rings = _production(plan)
    steps = []
    for i, ring in enumerate(rings):
        tagged = (f"{in_fleet} and device_tag/any(dt:dt/tag_key eq {_odata(tag)} and "
                  f"dt/value eq {_odata(ring.name)})")
        if i < len(rings) - 1:
            reqs = [pin_devices(tagged, release, f"ring {ring.name}: cumulative "
                                f"{ring.percent:g}% (devices tagged {tag}={ring.name})")]
        else:
            reqs = [pin_fleet(release, f"ring {ring.name}: the whole fleet"),
                    pin_devices(f"{in_fleet} and is_pinned_on__release eq {release}", None,
                                "earlier rings track the fleet again")]
        steps.append({"ring": ring.name, "requests": reqs})
    return {
        "version": manifest.version,
        "prepare": [pin_fleet(previous, "keep the fleet on the previous release while the "
                                        "candidate is pushed")],
        "rings": steps,
        "rollback": [pin_fleet(previous, "the fleet back to the previous release"),
                     pin_devices(f"{in_fleet} and is_pinned_on__release eq {release}", None,
                                 "every device pinned to the candidate tracks the fleet again")],
    }


def export(kind: str, plan: Plan, manifest: Manifest, *, start: datetime | None = None,
           hawkbit_style: str = "new") -> Any:
    if kind == "aws":
        return aws_iot_jobs(plan, manifest)
    if kind == "hawkbit":
        return hawkbit_rollout(plan, manifest, hawkbit_style)
    if kind == "mender":
        return mender_deployment(plan, manifest, start or datetime.now(timezone.utc))
    if kind == "balena":
        return balena_pinning(plan, manifest)
    raise ConfigError(f"unknown exporter {kind!r}", where="--format",
                      hint=f"one of {', '.join(EXPORTERS)}")
