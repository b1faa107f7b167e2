from __future__ import annotations

import json
from pathlib import Path

import pytest
from rollout_helpers import EXAMPLE_MANIFEST, EXAMPLE_PLAN

from pytest_hilfarm.errors import ConfigError
from pytest_hilfarm.rollout.manifest import load_manifest, manifest_from_dict
from pytest_hilfarm.rollout.plan import DEFAULT_RINGS, Gates, load_plan, parse_hours, parse_plan


def test_example_plan_loads_with_staging_and_four_production_rings():
    plan = load_plan(EXAMPLE_PLAN)
    assert [r.name for r in plan.rings] == ["staging", "canary", "early", "broad", "fleet"]
    assert [r.percent for r in plan.production_rings()] == [1, 5, 25, 100]
    assert plan.rings[0].gates.crash_rate.limit == 0.10  # ring override
    assert plan.rings[1].gates.crash_rate.limit == 0.001  # plan-level gate
    assert plan.rings[3].soak_hours == 48
    assert plan.load_manifest().version == "2.4.0"


def test_minimal_plan_gets_the_default_ladder_and_gates():
    plan = parse_plan("name: fw\n")
    assert [(r.name, r.percent) for r in plan.rings] == list(DEFAULT_RINGS)
    assert all(r.soak_hours == 24 for r in plan.rings)
    g = plan.gates
    assert g == Gates()
    assert (g.crash_rate.limit, g.connectivity.limit, g.battery_max_increase,
            g.staging_soak_hours) == (0.001, 0.995, 0.10, 24.0)
    assert g.hil_required


@pytest.mark.parametrize("text, where, what", [
    ("name: fw\nrings:\n  - {name: a, percent: 5}\n  - {name: b, percent: 3}\n"
     "  - {name: c, percent: 100}\n", "<plan>:4: rings[1].percent", "must grow"),
    ("name: fw\ngates:\n  crash_rate: {max: 2}\n", "<plan>:3: gates.crash_rate.max", "0.0..1.0"),
    ("name: fw\ngates:\n  crash_rat: {max: 0.1}\n", "<plan>:3: gates.crash_rat", "unknown key"),
    ("name: fw\nrings:\n  - {name: a, percent: 50}\n", "<plan>:3: rings[0].percent", "not 100%"),
    ("name: fw\nrings:\n  - {name: a, percent: 50, soak: soon}\n  - {name: b, percent: 100}\n",
     "<plan>:3: rings[0].soak", "not a duration"),
    ("name: fw\nrings:\n  - {name: a, devices: 10}\n  - {name: b, percent: 100}\n",
     "<plan>:3: rings[0]", "production ring takes `percent`"),
    ("name: fw\nrings:\n  - {name: a, percent: 10}\n"
     "  - {name: s, production: false, devices: 5}\n  - {name: b, percent: 100}\n",
     "<plan>:4: rings[1]", "before production"),
    ("name: fw\ngates:\n  connectivity: {min: 0.99, on_fail: explode}\n",
     "<plan>:3: gates.connectivity.on_fail", "not one of"),
    ("name: fw\nname: again\n", "<plan>:2: name", "duplicate key"),
    ("name: [fw\n", "<plan>:2", "not valid YAML"),
    ("version: 2\nname: fw\n", "<plan>:1: version", "not supported"),
])
def test_invalid_plans_name_the_key_and_the_line(text, where, what):
    with pytest.raises(ConfigError) as exc:
        parse_plan(text)
    assert exc.value.where == where
    assert what in exc.value.what


@pytest.mark.parametrize("value, hours", [("24h", 24), ("90m", 1.5), ("2d", 48), (12, 12),
                                          ("3600s", 1), ("1.5h", 1.5)])
def test_durations(value, hours):
    assert parse_hours(value, "x") == pytest.approx(hours)


def test_plan_digest_changes_with_the_text():
    assert parse_plan("name: fw\n").digest != parse_plan("name: fw2\n").digest


GOOD = json.loads(EXAMPLE_MANIFEST.read_text())


@pytest.mark.parametrize("patch, key", [
    ({"url": "ftp://x"}, "url"), ({"sha256": "abc"}, "sha256"), ({"size": 0}, "size"),
    ({"size": True}, "size"), ({"chip": "esp8266"}, "chip"), ({"version": ""}, "version"),
    ({"secure_version": 17}, "secure_version"),  # esp32c3: 16-bit eFuse field
    ({"chip": "esp32c2", "secure_version": 5}, "secure_version"),
    ({"signature": ""}, "signature"),
])
def test_manifest_validation_names_the_field(patch, key):
    with pytest.raises(ConfigError) as exc:
        manifest_from_dict({**GOOD, **patch}, "m.json")
    assert exc.value.where == f"m.json: {key}"


def test_manifest_missing_fields_listed():
    with pytest.raises(ConfigError, match="lacks sha256, size"):
        manifest_from_dict({k: v for k, v in GOOD.items() if k not in ("sha256", "size")}, "m")


def test_manifest_esp32_allows_32_bit_secure_version(tmp_path: Path):
    m = manifest_from_dict({**GOOD, "chip": "esp32", "secure_version": 32}, "m")
    assert m.secure_version == 32
    assert load_manifest(EXAMPLE_MANIFEST).job_document()["secure_version"] == 3
    bad = tmp_path / "bad.json"
    bad.write_text("{\n  nope")
    with pytest.raises(ConfigError, match="not JSON") as exc:
        load_manifest(bad)
    assert exc.value.where == f"{bad}:2"
