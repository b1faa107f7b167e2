from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rollout_helpers import EXAMPLE_MANIFEST, ROOT

from pytest_hilfarm.errors import ConfigError, UsageError
from pytest_hilfarm.rollout.controller import Controller, StartBlocked, decide
from pytest_hilfarm.rollout.gates import RingEvidence
from pytest_hilfarm.rollout.hil import HilSummary
from pytest_hilfarm.rollout.manifest import load_manifest
from pytest_hilfarm.rollout.plan import parse_plan
from pytest_hilfarm.rollout.store import Store

PLAN = """\
name: fw
artifact: {previous_version: 2.3.1}
gates:
  crash_rate: {max: 0.05}
  connectivity: {min: 0.90}
  boot_failures: {max: 0.05}
  max_soak_extensions: 2
rings:
  - {name: canary, percent: 10, min_devices: 100, soak: 1h}
  - {name: fleet, percent: 100, min_devices: 100, soak: 2h}
"""
H = 3600.0
T0 = 1_800_000_000.0
HIL_OK = HilSummary("hil.xml", 10, 0, 0, 0)
GOOD = RingEvidence(devices=1000, crashed=0, connected_ok=1000, connectivity_reported=1000,
                    drain_n=1000, drain_mean=20.0, drain_sd=1.0, baseline_drain_mean=20.0)
MANIFEST = load_manifest(EXAMPLE_MANIFEST)


def ev(e: RingEvidence):
    return lambda row: e


@pytest.fixture
def ctl():
    with Store(":memory:") as store:
        yield Controller(store)


def start(ctl: Controller, text: str = PLAN, **kw):
    kw.setdefault("staging_since", T0 - 24 * H)
    return ctl.start(parse_plan(text), text, MANIFEST, now=T0, hil=HIL_OK, **kw)


def events(ctl: Controller, rid: str = "fw-2.4.0") -> list[str]:
    return [e.event for e in ctl.store.audit(rid)]


def test_good_release_goes_ring_by_ring_to_complete(ctl):
    report, created = start(ctl)
    assert created and report.state == "soaking"
    assert ctl.step("fw-2.4.0", now=T0 + 0.5 * H, evidence=ev(GOOD)).hold.reason.startswith(
        "ring canary soaking until")
    r = ctl.step("fw-2.4.0", now=T0 + H, evidence=ev(GOOD))
    assert [t.event for t in r.transitions] == ["promote", "deploy"]
    r = ctl.step("fw-2.4.0", now=T0 + 3 * H, evidence=ev(GOOD))
    assert r.state == "complete"
    assert events(ctl) == ["start", "deploy", "promote", "deploy", "complete"]
    audit = ctl.store.audit("fw-2.4.0")
    assert audit[2].numbers["gates"][0]["numbers"]["devices"] == 1000
    assert [e.rev for e in audit] == [0, 1, 2, 3, 4]
    assert ctl.store.get("fw-2.4.0").baseline_drain == 20.0


def test_step_is_idempotent(ctl):
    start(ctl)
    ctl.step("fw-2.4.0", now=T0 + H, evidence=ev(GOOD))
    before = events(ctl)
    again = ctl.step("fw-2.4.0", now=T0 + H, evidence=ev(GOOD))
    assert again.transitions == () and events(ctl) == before


def test_no_telemetry_means_no_decision(ctl):
    start(ctl)
    r = ctl.step("fw-2.4.0", now=T0 + 5 * H)
    assert r.transitions == () and "give telemetry" in r.hold.reason


def test_crash_rate_rolls_back_every_deployed_ring(ctl):
    start(ctl)
    bad = RingEvidence(**{**GOOD.__dict__, "crashed": 200})
    r = ctl.step("fw-2.4.0", now=T0 + H, evidence=ev(bad))
    assert r.state == "rolled_back"
    last = ctl.store.audit("fw-2.4.0")[-1]
    assert last.event == "rollback" and last.numbers["trigger"] == ["crash_rate"]
    assert last.numbers["reverted_rings"] == ["canary"] and last.numbers["to_version"] == "2.3.1"
    crash = last.numbers["gates"][0]
    assert crash["verdict"] == "fail" and crash["numbers"]["bad"] == 200


def test_connectivity_pauses_then_resume_soaks_again_and_abort(ctl):
    start(ctl)
    flaky = RingEvidence(**{**GOOD.__dict__, "connected_ok": 800})
    assert ctl.step("fw-2.4.0", now=T0 + H, evidence=ev(flaky)).state == "paused"
    assert "paused" in ctl.step("fw-2.4.0", now=T0 + 9 * H, evidence=ev(GOOD)).hold.reason
    r = ctl.resume("fw-2.4.0", now=T0 + 10 * H, reason="AP firmware bug, not ours")
    assert r.state == "soaking" and ctl.store.get("fw-2.4.0").soak_until == T0 + 11 * H
    assert ctl.pause("fw-2.4.0", now=T0 + 10.5 * H, reason="weekend").state == "paused"
    assert ctl.abort("fw-2.4.0", now=T0 + 12 * H, reason="superseded").state == "aborted"
    assert ctl.abort("fw-2.4.0", now=T0 + 13 * H, reason="again").hold is not None
    last = ctl.store.audit("fw-2.4.0")[-1]
    assert last.numbers["kept_rings"] == ["canary"] and last.actor == "operator"
    # A problem found after an abort can still be rolled back (devices keep the candidate).
    assert ctl.rollback("fw-2.4.0", now=T0 + 14 * H, reason="bug").state == "rolled_back"
    assert ctl.rollback("fw-2.4.0", now=T0 + 15 * H, reason="again").hold is not None


def test_inconclusive_extends_then_pauses(ctl):
    start(ctl)
    few = RingEvidence(**{**GOOD.__dict__, "devices": 50, "connectivity_reported": 50,
                          "connected_ok": 50})
    assert events(ctl)[-1] == "deploy"
    ctl.step("fw-2.4.0", now=T0 + H, evidence=ev(few))
    ctl.step("fw-2.4.0", now=T0 + 2 * H, evidence=ev(few))
    r = ctl.step("fw-2.4.0", now=T0 + 3 * H, evidence=ev(few))
    assert events(ctl)[-3:] == ["extend", "extend", "pause"]
    assert r.state == "paused" and "after 2 extensions" in ctl.store.audit("fw-2.4.0")[-1].reason


def test_staging_soak_holds_the_first_production_ring(ctl):
    r, _ = start(ctl, staging_since=T0 - 10 * H)
    assert r.state == "waiting" and "14.0" not in r.hold.reason
    assert "soaked 10.0 h in staging" in r.hold.reason
    assert ctl.step("fw-2.4.0", now=T0 + 14 * H).state == "soaking"


def test_no_staging_evidence_waits(ctl):
    r, _ = start(ctl, staging_since=None)
    assert r.state == "waiting" and "no staging soak recorded" in r.hold.reason


def test_staging_ring_earns_the_soak():
    text = PLAN.replace("rings:\n", "rings:\n  - {name: lab, production: false, devices: 20, "
                        "min_devices: 10, soak: 24h, gates: {crash_rate: {max: 0.5}, "
                        "connectivity: {min: 0.8}, boot_failures: {max: 0.5}}}\n")
    with Store(":memory:") as store:
        ctl = Controller(store)
        r, _ = start(ctl, text, staging_since=None)
        assert r.transitions[0].ring == "lab"
        assert store.get("fw-2.4.0").staging_since == T0
        lab = RingEvidence(devices=20, connected_ok=20, connectivity_reported=20, drain_n=20,
                           drain_mean=20, drain_sd=1, baseline_drain_mean=20)
        r = ctl.step("fw-2.4.0", now=T0 + 24 * H, evidence=ev(lab))
        assert [t.event for t in r.transitions] == ["promote", "deploy"]


def test_start_is_idempotent_and_refuses_an_edited_plan(ctl):
    start(ctl)
    _, created = start(ctl)
    assert not created and events(ctl) == ["start", "deploy"]
    with pytest.raises(UsageError, match="different plan"):
        start(ctl, PLAN + "# edited\n")


def test_failing_hil_blocks_the_start_and_stores_nothing(ctl):
    plan = parse_plan(PLAN)
    with pytest.raises(StartBlocked) as exc:
        ctl.start(plan, PLAN, MANIFEST, now=T0, hil=HilSummary("hil.xml", 10, 2, 0, 0))
    assert exc.value.result.numbers["failures"] == 2
    assert ctl.store.all() == []


def test_stale_revision_is_not_applied_twice(ctl):
    start(ctl)
    row = ctl.store.get("fw-2.4.0")
    t = decide(parse_plan(PLAN), row, T0 + H, ev(GOOD))
    assert ctl.store.apply(row.id, row.rev, T0 + H, t.changes, t.event, "a", t.reason, {}, None)
    assert not ctl.store.apply(row.id, row.rev, T0 + H, t.changes, t.event, "b", t.reason, {},
                               None)
    assert events(ctl) == ["start", "deploy", "promote"]


def test_newer_schema_is_refused(tmp_path: Path):
    p = tmp_path / "r.sqlite"
    Store(p).close()
    with sqlite3.connect(p) as db:
        db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(ConfigError, match="newer"):
        Store(p)


CRASHER = textwrap.dedent("""
    import os, sys
    from pytest_hilfarm.rollout import store as st
    original = st.Store._audit
    def audit_then_die(self, db, *args, **kwargs):
        original(self, db, *args, **kwargs)
        os._exit(9)  # the process dies after the audit INSERT, before COMMIT
    st.Store._audit = audit_then_die
    from pytest_hilfarm.cli import main
    main(sys.argv[1:])
""")


def _cli(db: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest_hilfarm", *args, "--db", db],
                          capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_killed_mid_transition_leaves_state_intact_and_rerun_continues(tmp_path: Path):
    from rollout_helpers import EXAMPLE_PLAN, write_telemetry

    db = str(tmp_path / "r.sqlite")
    hil = tmp_path / "hil.json"
    hil.write_text(json.dumps({"passed": 3}))
    tele = write_telemetry(tmp_path / "t.jsonl", 50, 200)
    r = _cli(db, "rollout", "start", "--plan", str(EXAMPLE_PLAN), "--hil-results", str(hil),
             "--now", "2026-03-01T00:00:00Z")
    assert r.returncode == 0, r.stderr
    with Store(db) as s:
        before = (s.get("thermostat-2.4.0"), len(s.audit("thermostat-2.4.0")))
    step = ["rollout", "step", "thermostat-2.4.0", "--telemetry", str(tele),
            "--now", "2026-03-02T00:00:00Z"]
    crashed = subprocess.run([sys.executable, "-c", CRASHER, *step, "--db", db], cwd=ROOT,
                             capture_output=True, text=True, timeout=60,
                             env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert crashed.returncode == 9, crashed.stderr
    with Store(db) as s:
        assert s.integrity_ok()
        assert (s.get("thermostat-2.4.0"), len(s.audit("thermostat-2.4.0"))) == before
    r = _cli(db, *step)
    assert r.returncode == 0, r.stderr
    assert "promote" in r.stdout and "canary" in r.stdout
    again = _cli(db, *step)
    assert "promote" not in again.stdout
    with Store(db) as s:
        evs = [e.event for e in s.audit("thermostat-2.4.0")]
    # Staging promoted and, its 24 h soak done, the canary deployed: each exactly once.
    assert evs == ["start", "deploy", "promote", "deploy"]


OPS = st.sampled_from(["step_good", "step_bad", "step_flaky", "step_few", "step_none", "pause",
                       "resume", "abort", "rollback"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(OPS, st.floats(0.1, 30.0)), max_size=25))
def test_any_sequence_of_commands_keeps_the_audit_consistent(ops):
    evidence = {
        "step_good": GOOD,
        "step_bad": RingEvidence(**{**GOOD.__dict__, "crashed": 300}),
        "step_flaky": RingEvidence(**{**GOOD.__dict__, "connected_ok": 700}),
        "step_few": RingEvidence(**{**GOOD.__dict__, "devices": 10}),
    }
    with Store(":memory:") as store:
        ctl = Controller(store)
        start(ctl)
        now = T0
        deployed = [store.get("fw-2.4.0").deployed_index]
        for op, hours in ops:
            now += hours * H
            if op.startswith("step"):
                e = evidence.get(op)
                ctl.step("fw-2.4.0", now=now, evidence=None if e is None else ev(e))
            else:
                getattr(ctl, op)("fw-2.4.0", now=now, reason="property test")
            deployed.append(store.get("fw-2.4.0").deployed_index)
        audit = store.audit("fw-2.4.0")
        row = store.get("fw-2.4.0")
    assert [e.rev for e in audit] == list(range(len(audit)))
    assert row.rev == audit[-1].rev
    assert all(a.to_state == b.from_state for a, b in zip(audit, audit[1:]))
    assert deployed == sorted(deployed)  # a ring, once deployed, stays counted
    terminal = [i for i, e in enumerate(audit) if e.to_state in ("rolled_back", "complete",
                                                                 "aborted")]
    if terminal:
        after = audit[terminal[0] + 1:]
        assert all(e.event == "rollback" for e in after) and len(after) <= 1
