from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from rollout_helpers import EXAMPLE_PLAN, SEQ_PLAN, write_telemetry

from pytest_hilfarm.cli import build_parser, main

JUNIT_OK = """<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="2">
<testcase classname="examples.test_ota" name="test_update"/>
<testcase classname="examples.test_ota" name="test_rollback"/></testsuite></testsuites>"""
JUNIT_BAD = JUNIT_OK.replace('name="test_rollback"/>',
                             'name="test_rollback"><failure message="x"/></testcase>')


@pytest.fixture
def junit(tmp_path: Path) -> str:
    p = tmp_path / "hil.xml"
    p.write_text(JUNIT_OK)
    return str(p)


def test_every_subcommand_has_a_handler():
    parser = build_parser()
    for argv in (["rollout", "status"], ["rollout", "step", "x"], ["rollout", "report", "x"],
                 ["rollout", "pause", "x", "--reason", "r"], ["rollout", "resume", "x",
                 "--reason", "r"], ["rollout", "abort", "x", "--reason", "r"],
                 ["rollout", "rollback", "x", "--reason", "r"],
                 ["rollout", "start", "--plan", "p"], ["rollout", "export", "--plan", "p",
                 "--format", "aws"], ["fleet", "simulate", "--devices", "1", "--plan", "p"],
                 ["advise", "--fleet-size", "1"]):
        assert callable(parser.parse_args(argv).handler), argv


def test_rollout_lifecycle_through_the_cli(tmp_path, db, junit, capsys):
    rid = "thermostat-2.4.0"
    assert main(["rollout", "start", "--plan", str(EXAMPLE_PLAN), "--hil-junit", junit,
                 "--db", db, "--now", "2026-03-01T00:00:00Z"]) == 0
    out = capsys.readouterr().out
    assert "started: thermostat-2.4.0" in out and "deploy" in out
    # Re-running start is harmless.
    assert main(["rollout", "start", "--plan", str(EXAMPLE_PLAN), "--hil-junit", junit,
                 "--db", db, "--now", "2026-03-01T01:00:00Z"]) == 0
    assert "already started" in capsys.readouterr().out

    tele = tmp_path / "t.jsonl"
    write_telemetry(tele, 50, 500)
    with tele.open("a") as fh:
        fh.write("{broken\n")
    assert main(["rollout", "step", rid, "--db", db, "--telemetry", str(tele),
                 "--now", "2026-03-02T00:00:00Z"]) == 0
    cap = capsys.readouterr()
    assert re.search(r"t\.jsonl:551: not JSON .*\(line skipped\)", cap.err)
    assert "promote" in cap.out and "crash_rate" in cap.out

    assert main(["rollout", "pause", rid, "--db", db, "--reason", "holiday freeze",
                 "--now", "2026-03-02T01:00:00Z"]) == 0
    assert main(["rollout", "resume", rid, "--db", db, "--reason", "freeze over",
                 "--now", "2026-03-03T00:00:00Z"]) == 0
    assert main(["rollout", "rollback", rid, "--db", db, "--reason", "support tickets",
                 "--now", "2026-03-03T02:00:00Z"]) == 0
    capsys.readouterr()
    assert main(["rollout", "status", rid, "--db", db]) == 11  # rolled back
    out = capsys.readouterr().out
    for word in ("start", "deploy", "promote", "pause", "resume", "rollback", "holiday freeze",
                 "state: rolled_back"):
        assert word in out
    assert main(["rollout", "status", rid, "--db", db, "--json"]) == 11
    status = json.loads(capsys.readouterr().out)
    assert status["exit_code"] == 11
    assert [a["event"] for a in status["audit"]] == [
        "start", "deploy", "promote", "deploy", "pause", "resume", "rollback"]
    assert status["audit"][-1]["numbers"]["reverted_rings"] == ["staging", "canary"]
    assert status["audit"][2]["numbers"]["evidence"]["malformed_lines"] == 1
    assert main(["rollout", "status", "--db", db]) == 0
    assert rid in capsys.readouterr().out

    html = tmp_path / "r.html"
    assert main(["rollout", "report", rid, "--db", db, "--out", str(html)]) == 0
    assert "<svg" in html.read_text()


def test_failing_hil_blocks_start_with_exit_1(tmp_path, db, capsys):
    # The command ran and its result is negative (exit 1); 3 means a rig fault in hilfarm.
    bad = tmp_path / "hil.xml"
    bad.write_text(JUNIT_BAD)
    assert main(["rollout", "start", "--plan", str(EXAMPLE_PLAN), "--hil-junit", str(bad),
                 "--db", db]) == 1
    err = capsys.readouterr().err
    assert "HIL gate failed" in err and "test_rollback" in err


def test_group_without_action_prints_help(capsys):
    assert main(["rollout"]) == 2
    assert "start" in capsys.readouterr().out
    assert main(["fleet"]) == 2


def test_missing_rollout_is_a_clear_error(db, capsys):
    assert main(["rollout", "status", "nope", "--db", db]) == 2  # usage error (README exit codes)
    assert "no rollout 'nope'" in capsys.readouterr().err


def test_invalid_plan_error_names_line(tmp_path, db, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text("name: fw\ngates:\n  crash_rate: {max: 5}\n")
    assert main(["rollout", "start", "--plan", str(plan), "--db", db]) == 2  # configuration error
    assert f"{plan}:3: gates.crash_rate.max" in capsys.readouterr().err


def test_export_each_format(tmp_path, capsys):
    for fmt in ("aws", "hawkbit", "mender"):
        out = tmp_path / f"{fmt}.json"
        assert main(["rollout", "export", "--plan", str(EXAMPLE_PLAN), "--format", fmt,
                     "--start", "2026-03-02T09:30:00Z", "--out", str(out)]) == 0
        assert json.loads(out.read_text())
    capsys.readouterr()
    assert main(["rollout", "export", "--plan", str(EXAMPLE_PLAN), "--format", "hawkbit",
                 "--hawkbit-style", "legacy"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert [g["targetPercentage"] for g in body["groups"]] == [1, 4.04, 21.05, 100]


def test_fleet_simulate_prints_the_timeline(tmp_path, capsys):
    html = tmp_path / "sim.html"
    assert main(["fleet", "simulate", "--devices", "200000", "--plan", str(EXAMPLE_PLAN),
                 "--fault", "crash:0.02", "--seed", "1", "--report", str(html)]) == 11
    out = capsys.readouterr().out
    assert "gate crash_rate" in out and "blast radius:" in out and "result:" in out
    assert html.read_text().count("<svg") == 5
    # 1,000 devices cannot satisfy the example plan's per-device gates: it pauses (exit 10).
    assert main(["fleet", "simulate", "--devices", "1000", "--plan", str(EXAMPLE_PLAN),
                 "--json"]) == 10
    result = json.loads(capsys.readouterr().out)
    assert result["devices"] == 1000 and result["exit_code"] == 10
    assert main(["fleet", "simulate", "--devices", "10", "--plan", str(EXAMPLE_PLAN),
                 "--fault", "bogus"]) == 2


def test_advise(capsys):
    assert main(["advise", "--fleet-size", "50000", "--hardware", "heavy",
                 "--field-failure-cost", "250000"]) == 0
    out = capsys.readouterr().out
    assert "[include] hil" in out and "why:" in out and "pipeline: unit" in out
    assert main(["advise", "--fleet-size", "10"]) == 2
    assert main(["advise", "--fleet-size", "10", "--per-device-cost", "5",
                 "--stage-cost", "hil"]) == 2


DOCS = Path(__file__).resolve().parents[2] / "docs"
CI = Path(__file__).resolve().parents[2] / "examples" / "ci"


def test_cli_examples_in_the_docs_parse():
    import shlex

    parser = build_parser()
    # The CLI table: one example per command.
    text = "\n".join(line for line in (DOCS / "rollouts.md").read_text().splitlines()
                     if line.startswith("| ") and "`hilfarm " in line)
    commands = re.findall(r"`hilfarm ((?:rollout|fleet|advise)[^`]*)`", text)
    assert len(commands) >= 11
    for cmd in commands:
        args = parser.parse_args(shlex.split(cmd.split(" (")[0]))
        assert callable(args.handler), cmd


@pytest.mark.parametrize("name", ["github-actions.yml", "Jenkinsfile"])
def test_ci_examples_run_the_stages_in_order(name):
    text = (CI / name).read_text()
    steps = ["pytest tests/", "pytest examples/ --hil-rack rack.yaml -n 3", "--junitxml=hil.xml",
             "hilfarm ota sign", "hilfarm ota release", "hilfarm rollout start --plan",
             "--release-pubkey release.pub.pem", "--hil-junit hil.xml"]
    positions = [text.find(s) for s in steps]
    assert -1 not in positions and positions == sorted(positions), positions


def test_start_verifies_a_signed_release_manifest(tmp_path, db, junit, capsys):
    from pytest_hilfarm.ota.keys import generate_signing_key, write_public_key
    from pytest_hilfarm.sim.appbuild import build_app

    image = tmp_path / "app.bin"
    image.write_bytes(build_app("esp32", "thermostat", "2.4.0"))
    key = generate_signing_key(tmp_path / "release.pem", "ed25519")
    pub = tmp_path / "release.pub.pem"
    write_public_key(key, pub)
    manifest = tmp_path / "manifest.json"
    assert main(["ota", "release", str(image), "--key", str(key), "--url",
                 "https://fw.example.invalid/app.bin", "-o", str(manifest)]) == 0
    capsys.readouterr()
    assert main(["rollout", "start", "--plan", str(EXAMPLE_PLAN), "--manifest", str(manifest),
                 "--release-pubkey", str(pub), "--hil-junit", junit, "--db", db,
                 "--id", "signed"]) == 0
    assert "started: signed" in capsys.readouterr().out

    tampered = tmp_path / "tampered.json"
    data = json.loads(manifest.read_text())
    data["secure_version"] = int(data["secure_version"]) + 1
    tampered.write_text(json.dumps(data))
    assert main(["rollout", "start", "--plan", str(EXAMPLE_PLAN), "--manifest", str(tampered),
                 "--release-pubkey", str(pub), "--hil-junit", junit, "--db", db,
                 "--id", "tampered"]) == 1
    assert "signature" in capsys.readouterr().err.lower()


def _window(path: Path, devices: int, *, crashes: int = 0, ratio: float = 1.0) -> Path:
    with path.open("a") as fh:
        for i in range(devices):
            fh.write(json.dumps({"device_id": f"d{i}", "firmware": "2.4.0", "hours": 1,
                                 "crashes": 1 if i < crashes else 0,
                                 "connected_ratio": ratio}) + "\n")
    return path


@pytest.fixture
def seq_plan(tmp_path: Path) -> Path:
    from rollout_helpers import EXAMPLE_MANIFEST

    p = tmp_path / "seq.yaml"
    p.write_text(SEQ_PLAN.replace("artifact: {", f"artifact: {{manifest: {EXAMPLE_MANIFEST}, "))
    return p


def _start(seq_plan: Path, db: str, junit: str) -> None:
    assert main(["rollout", "start", "--plan", str(seq_plan), "--hil-junit", junit, "--db", db,
                 "--staging-since", "2026-02-27T00:00:00Z", "--now", "2026-03-01T00:00:00Z"]) == 0


def test_step_exit_codes_and_json(tmp_path, db, junit, seq_plan, capsys):
    _start(seq_plan, db, junit)
    tele = _window(tmp_path / "t.jsonl", 300)
    step = ["rollout", "step", "fw-2.4.0", "--db", db, "--telemetry", str(tele), "--json"]
    capsys.readouterr()
    assert main([*step, "--now", "2026-03-01T01:00:00Z"]) == 0  # soaking: progressing
    out = json.loads(capsys.readouterr().out)
    assert out["state"] == "soaking" and out["exit_code"] == 0
    assert {g["gate"] for g in out["hold"]["gates"]} >= {"crash_rate", "connectivity",
                                                           "boot_failures"}
    _window(tele, 300, crashes=12)  # a second hour with 12 crashing devices
    assert main([*step, "--now", "2026-03-01T01:30:00Z"]) == 11
    out = json.loads(capsys.readouterr().out)
    assert out["state"] == "rolled_back" and out["transitions"][0]["event"] == "rollback"
    assert out["transitions"][0]["numbers"]["trigger"] == ["crash_rate"]
    assert main(["rollout", "status", "fw-2.4.0", "--db", db]) == 11


def test_paused_exits_10(tmp_path, db, junit, seq_plan, capsys):
    _start(seq_plan, db, junit)
    tele = _window(tmp_path / "t.jsonl", 300, ratio=0.5)  # half the time without a mesh link
    assert main(["rollout", "step", "fw-2.4.0", "--db", db, "--telemetry", str(tele),
                 "--now", "2026-03-01T01:00:00Z"]) == 10
    assert "connectivity" in capsys.readouterr().out
    assert main(["rollout", "status", "fw-2.4.0", "--db", db]) == 10
    assert main(["rollout", "status", "--db", db]) == 0  # the list is not a state


def test_step_window_option_gives_exposure_to_records_without_hours(tmp_path, db, junit,
                                                                    seq_plan, capsys):
    _start(seq_plan, db, junit)
    tele = tmp_path / "t.jsonl"
    tele.write_text("".join(json.dumps({"device_id": f"d{i}", "firmware": "2.4.0",
                                        "crashes": int(i < 12)}) + "\n" for i in range(300)))
    step = ["rollout", "step", "fw-2.4.0", "--db", db, "--telemetry", str(tele),
            "--now", "2026-03-01T01:00:00Z"]
    assert main(step) == 0  # no hours, no exposure: no decision
    assert main([*step, "--window", "1h"]) == 11


def test_fleet_simulate_trials_report(capsys):
    plan = str(EXAMPLE_PLAN.parent / "fleet-2000.yaml")
    assert main(["fleet", "simulate", "--devices", "2000", "--plan", plan, "--trials", "3",
                 "--json"]) == 0
    good, bad = json.loads(capsys.readouterr().out)
    assert good["trials"] == bad["trials"] == 3 and bad["faults"] == ["crash:0.005/h"]
    assert good["complete"] == 1.0 and bad["complete"] == 0.0
    assert main(["fleet", "simulate", "--devices", "2000", "--plan", plan, "--trials", "2",
                 "--fault", "crash:2%/h", "--good", "crash:0.1%/h"]) == 0
    out = capsys.readouterr().out
    assert "good firmware (faults: crash:0.001/h)" in out and "blast radius" in out


def test_single_simulation_exit_codes(capsys):
    plan = str(EXAMPLE_PLAN.parent / "fleet-2000.yaml")
    assert main(["fleet", "simulate", "--devices", "2000", "--plan", plan]) == 0
    assert main(["fleet", "simulate", "--devices", "2000", "--plan", plan,
                 "--fault", "crash:2%/h"]) == 11
    assert main(["fleet", "simulate", "--devices", "2000", "--plan", plan, "--fault",
                 "hil:1"]) == 1


def test_advise_writes_the_example_plans(tmp_path, capsys):
    base = EXAMPLE_PLAN.parent
    for size, name in ((2000, "fleet-2000.yaml"), (1_000_000, "fleet-1m.yaml")):
        out = tmp_path / name
        assert main(["advise", "--fleet-size", str(size), "--name", "mesh-sensor",
                     "--hardware-revisions", "A,B,C", "--regions", "eu,us,apac",
                     "--connectivity-types", "wifi,thread", "--write-plan", str(out)]) == 0
        assert out.read_text() == (base / name).read_text(), name
    text = capsys.readouterr().out
    assert "Risks it accepts" in text and "reaches the canary" in text


def test_every_rollout_argument_has_help_and_every_command_ends_with_an_example():
    import argparse

    from pytest_hilfarm.cli import walk_parsers

    seen = 0
    for path, parser in walk_parsers(build_parser()):
        if len(path) < 2 or path[1] not in ("rollout", "fleet", "advise"):
            continue
        seen += 1
        name = " ".join(path)
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"`{name}`: {action.dest} has no help text"
        last = parser.format_help().rstrip().splitlines()[-1].strip()
        assert "example:" in parser.format_help() and last.startswith("hilfarm "), name
    assert seen == 13  # rollout + 9 actions, fleet + simulate, advise
