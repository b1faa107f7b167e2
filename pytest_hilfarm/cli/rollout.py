"""``hilfarm rollout …``, ``hilfarm fleet simulate`` and ``hilfarm advise``.

Thin argument handling over :mod:`pytest_hilfarm.rollout`: parse, call, print. Decisions live in
the library so tests and the simulator use the same code; this module never decides a gate.
Exit codes follow the hilfarm table: 0 complete or progressing, 1 a negative result (the HIL gate
blocked ``start``, a signature did not verify), 2 a usage or configuration error (bad plan,
manifest, telemetry file, argument, unknown rollout), 10 paused (waits for a person), 11 rolled
back or aborted. ``rollout step``, ``rollout status ID`` and ``fleet simulate`` report the state.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pytest_hilfarm.cli.common import NEGATIVE, OK, PAUSED, ROLLED_BACK, example
from pytest_hilfarm.errors import ConfigError, UsageError

BLOCKED = NEGATIVE  # the command ran and its result is negative: the HIL gate refused the start


def state_exit_code(state: str) -> int:
    """A rollout's state as an exit code: 0 complete or progressing, 10 paused, 11 rolled back
    or aborted; a simulated start blocked by the HIL gate is a negative result (1).
    """
    if state == "paused":
        return PAUSED
    if state in ("rolled_back", "aborted"):
        return ROLLED_BACK
    if state == "blocked":
        return NEGATIVE
    return OK


def _now(args: argparse.Namespace) -> float:
    if getattr(args, "now", None):
        return _parse_time(args.now, "--now")
    return datetime.now(timezone.utc).timestamp()


def _parse_time(text: str, where: str) -> float:
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{text!r} is not an ISO 8601 time", where=where,
                         hint="e.g. 2026-03-01T12:00:00Z") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.timestamp()


def _store(args: argparse.Namespace) -> Any:
    from pytest_hilfarm.rollout.store import Store, default_db_path

    return Store(args.db or default_db_path())


def _print_report(report: Any) -> None:
    for t in report.transitions:
        print(f"{t.event:<9} {t.ring or '-':<10} {t.reason}")
        for g in t.numbers.get("gates", []):
            print(f"{'':20}{g['gate']:<14} {g['verdict']:<12} {g['reason']}")
    if report.hold is not None:
        print(f"hold: {report.hold.reason}")
    print(f"state: {report.state} ({report.rollout_id})")


def _cmd_start(args: argparse.Namespace) -> int:
    from pytest_hilfarm.rollout.controller import Controller, StartBlocked
    from pytest_hilfarm.rollout.hil import read_junit, read_results
    from pytest_hilfarm.rollout.manifest import load_manifest
    from pytest_hilfarm.rollout.plan import load_plan

    plan = load_plan(args.plan)
    text = Path(args.plan).read_text(encoding="utf-8")
    manifest = load_manifest(args.manifest) if args.manifest else plan.load_manifest()
    if args.release_pubkey:
        # Refuse an unsigned, tampered, expired or foreign-key manifest before any ring starts.
        from pytest_hilfarm.ota.manifest import verify_release

        path = args.manifest or plan.manifest_path
        if path is None:
            raise UsageError("--release-pubkey needs a manifest", where="command line",
                             hint="pass --manifest or set artifact.manifest in the plan")
        verify_release(path, None, args.release_pubkey)
    if args.hil_junit and args.hil_results:
        raise UsageError("give --hil-junit or --hil-results, not both", where="command line")
    hil = (read_junit(args.hil_junit) if args.hil_junit else
           read_results(args.hil_results) if args.hil_results else None)
    staging = _parse_time(args.staging_since, "--staging-since") if args.staging_since else None
    with _store(args) as store:
        try:
            report, created = Controller(store).start(
                plan, text, manifest, now=_now(args), hil=hil, staging_since=staging,
                rollout_id=args.id, actor=args.actor)
        except StartBlocked as exc:
            print(f"hilfarm: {exc}", file=sys.stderr)
            print(json.dumps(exc.result.to_dict(), indent=2, sort_keys=True), file=sys.stderr)
            return BLOCKED
    print(("started" if created else "already started (no change)") + f": {report.rollout_id}")
    _print_report(report)
    return state_exit_code(report.state)


def _evidence_from_files(paths: list[str], candidate: str, min_ratio: float,
                         baseline: float | None, window: float | None = None) -> Any:
    from dataclasses import replace

    from pytest_hilfarm.rollout.telemetry import aggregate, read_telemetry

    records: list[Any] = []
    malformed = 0
    for p in paths:
        tf = read_telemetry(p)
        for problem in tf.problems:
            print(f"warning: {problem}", file=sys.stderr)
        if tf.problems:
            print(f"warning: {p}: {len(tf.problems)} malformed line(s) skipped, "
                  f"{len(tf.records)} used", file=sys.stderr)
        records.extend(tf.records)
        malformed += len(tf.problems)
    return replace(aggregate(records, candidate, min_ratio, baseline, window),
                   malformed_lines=malformed)


def _report_json(report: Any) -> dict[str, Any]:
    hold = report.hold
    return {
        "id": report.rollout_id, "state": report.state, "exit_code": state_exit_code(report.state),
        "transitions": [{"event": t.event, "ring": t.ring, "reason": t.reason,
                         "numbers": t.numbers} for t in report.transitions],
        "hold": None if hold is None else {
            "reason": hold.reason, "numbers": hold.numbers,
            "gates": [g.to_dict() for g in hold.gates]},
    }


def _cmd_step(args: argparse.Namespace) -> int:
    from pytest_hilfarm.rollout.controller import Controller
    from pytest_hilfarm.rollout.plan import parse_hours

    window = parse_hours(args.window, "--window") if args.window else None
    with _store(args) as store:
        ctl = Controller(store)
        row = store.get(args.id)
        plan = ctl.plan_of(row)
        evidence_fn = None
        if args.telemetry:
            cache: dict[tuple[str, float | None, float], Any] = {}

            def evidence_fn(r: Any) -> Any:
                # Read the files once per step, however often the controller asks.
                ring = plan.rings[max(r.deployed_index, 0)]
                key = (r.candidate, r.baseline_drain, ring.gates.connectivity_device_min_ratio)
                if key not in cache:
                    cache[key] = _evidence_from_files(
                        args.telemetry, r.candidate, ring.gates.connectivity_device_min_ratio,
                        r.baseline_drain, window)
                return cache[key]
        report = ctl.step(args.id, now=_now(args), evidence=evidence_fn, actor=args.actor)
    if args.json:
        print(json.dumps(_report_json(report), indent=2, sort_keys=True, default=str))
    else:
        _print_report(report)
    return state_exit_code(report.state)


def _manual(name: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        from pytest_hilfarm.rollout.controller import Controller

        with _store(args) as store:
            method = getattr(Controller(store), name)
            report = method(args.id, now=_now(args), reason=args.reason, actor=args.actor)
        _print_report(report)
        return 0
    return run


def _cmd_status(args: argparse.Namespace) -> int:
    from pytest_hilfarm.rollout.controller import Controller, deployed_rings, iso

    with _store(args) as store:
        if not args.id:
            rows = store.all()
            if args.json:
                print(json.dumps([{"id": r.id, "state": r.state, "candidate": r.candidate,
                                   "updated_at": iso(r.updated_at)} for r in rows], indent=2))
            elif not rows:
                print("no rollouts in " + store.path)
            for r in rows if not args.json else ():
                print(f"{r.id:<32} {r.state:<12} {r.candidate:<12} updated {iso(r.updated_at)}")
            return 0
        row = store.get(args.id)
        plan = Controller(store).plan_of(row)
        audit = store.audit(args.id)
    ring = plan.rings[row.ring_index]
    if args.json:
        print(json.dumps({
            "id": row.id, "state": row.state, "exit_code": state_exit_code(row.state),
            "ring": ring.name, "candidate": row.candidate,
            "previous": row.previous, "soak_until": iso(row.soak_until),
            "deployed_rings": deployed_rings(plan, row),
            "audit": [{"at": iso(e.at), "event": e.event, "from": e.from_state,
                       "to": e.to_state, "ring": e.ring, "actor": e.actor, "reason": e.reason,
                       "numbers": e.numbers} for e in audit]}, indent=2, sort_keys=True))
        return state_exit_code(row.state)
    print(f"rollout {row.id}: {row.previous or '?'} -> {row.candidate}")
    print(f"state: {row.state}; ring {row.ring_index + 1}/{len(plan.rings)} ({ring.name}); "
          f"deployed: {', '.join(deployed_rings(plan, row)) or 'none'}")
    if row.state == "soaking":
        print(f"soaking until {iso(row.soak_until)} (extensions: {row.extensions})")
    print("audit log:")
    for e in audit:
        print(f"  {iso(e.at)} {e.event:<9} {e.from_state or '-':>11} -> {e.to_state:<11} "
              f"{e.ring or '-':<10} [{e.actor}] {e.reason}")
    return state_exit_code(row.state)


def _cmd_report(args: argparse.Namespace) -> int:
    from pytest_hilfarm.rollout.controller import Controller
    from pytest_hilfarm.rollout.report import ReportInput, render_html, ring_labels

    with _store(args) as store:
        row = store.get(args.id)
        audit = tuple(store.audit(args.id))
        rings = ring_labels(Controller(store).plan_of(row))
    page = render_html(ReportInput(f"Rollout report: {row.id}", row.id, row.state, row.candidate,
                                   row.previous, audit, rings))
    out = Path(args.out or f"{row.id}-report.html")
    out.write_text(page, encoding="utf-8")
    print(f"wrote {out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pytest_hilfarm.rollout.exporters import export
    from pytest_hilfarm.rollout.manifest import load_manifest
    from pytest_hilfarm.rollout.plan import load_plan

    plan = load_plan(args.plan)
    manifest = load_manifest(args.manifest) if args.manifest else plan.load_manifest()
    start = (datetime.fromtimestamp(_parse_time(args.start, "--start"), timezone.utc)
             if args.start else None)
    body = export(args.format, plan, manifest, start=start, hawkbit_style=args.hawkbit_style)
    text = json.dumps(body, indent=2, sort_keys=True) + "\n"
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from pytest_hilfarm.rollout.fleet import format_timeline, parse_fault, simulate
    from pytest_hilfarm.rollout.plan import load_plan
    from pytest_hilfarm.rollout.report import ReportInput, render_html, ring_labels

    plan = load_plan(args.plan)
    text = Path(args.plan).read_text(encoding="utf-8")
    faults = [parse_fault(f) for f in args.fault or ()]
    if args.trials is not None:
        return _simulate_trials(args, plan, text, faults)
    manifest = plan.load_manifest() if plan.manifest_path else None
    result = simulate(plan, text, args.devices, faults, seed=args.seed, manifest=manifest,
                      ingest_hours=args.ingest_minutes / 60)
    if args.json:
        d = asdict(result)
        d.pop("audit")
        d["exit_code"] = state_exit_code(result.final_state)
        print(json.dumps(d, indent=2, sort_keys=True, default=str))
    else:
        print(format_timeline(result))
    if args.report:
        page = render_html(ReportInput(
            f"Fleet simulation: {plan.name}, {args.devices:,} devices"
            + (f", faults {', '.join(map(str, faults))}" if faults else ""),
            result.rollout_id, result.final_state, manifest.version if manifest else "candidate",
            plan.previous_version, result.audit, ring_labels(plan)))
        Path(args.report).write_text(page, encoding="utf-8")
        print(f"wrote {args.report}")
    return state_exit_code(result.final_state)


def _simulate_trials(args: argparse.Namespace, plan: Any, text: str, faults: list[Any]) -> int:
    from pytest_hilfarm.rollout.fleet import parse_fault
    from pytest_hilfarm.rollout.trials import format_outcomes, outcomes_json, run_trials

    if args.trials < 1:
        raise UsageError(f"--trials {args.trials} must be at least 1", where="--trials")
    if args.report:
        raise UsageError("--report draws one rollout; drop it with --trials", where="--report")
    good = [parse_fault(f) for f in args.good or ()]
    if not faults:
        crash = plan.gates.crash_rate
        if crash.sequential and crash.detect:
            # The bad release the plan promises to catch.
            faults = [parse_fault(f"crash:{crash.detect}/h")]
    scenarios = [("good firmware", good)] + ([("bad firmware", faults)] if faults else [])
    outcomes = [run_trials(plan, text, args.devices, fs, args.trials, args.seed, args.jobs,
                           label) for label, fs in scenarios]
    if args.json:
        print(json.dumps(outcomes_json(outcomes), indent=2, sort_keys=True))
    else:
        print(format_outcomes(outcomes))
    return 0


def _cmd_advise(args: argparse.Namespace) -> int:
    from pytest_hilfarm.rollout.advise import advise, format_advice

    costs: dict[str, float] = {}
    for item in args.stage_cost or ():
        name, sep, value = item.partition("=")
        try:
            costs[name] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise UsageError(f"--stage-cost {item!r} is not STAGE=COST", where="--stage-cost",
                             hint="e.g. --stage-cost hil=3000")
    if args.write_plan:
        _write_plan(args)
        if args.field_failure_cost is None and args.per_device_cost is None:
            return 0
    if args.field_failure_cost is None and args.per_device_cost is None:
        raise ConfigError("give --field-failure-cost or --per-device-cost", where="command line",
                          hint="what one defect reaching the fleet costs (recalls, truck rolls)")
    cost = (args.field_failure_cost if args.field_failure_cost is not None
            else args.per_device_cost * args.fleet_size)
    print(format_advice(advise(args.fleet_size, args.safety_critical, args.hardware, cost,
                               costs)))
    return 0


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in (text or "").split(",") if x.strip())


def _advise_command(args: argparse.Namespace) -> str:
    """The command line that reproduces the plan, recorded in its header."""
    parts = ["hilfarm advise", f"--fleet-size {args.fleet_size}"]
    if args.name != "firmware":
        parts.append(f"--name {args.name}")
    for opt in ("hardware_revisions", "regions", "connectivity_types"):
        if getattr(args, opt):
            parts.append(f"--{opt.replace('_', '-')} {getattr(args, opt)}")
    if args.crash_max != 0.001:
        parts.append(f"--crash-max {args.crash_max:g}")
    if args.crash_detect != 0.005:
        parts.append(f"--crash-detect {args.crash_detect:g}")
    return " ".join(parts + [f"--write-plan {Path(args.write_plan).name}"])


def _write_plan(args: argparse.Namespace) -> None:
    from pytest_hilfarm.rollout.advise import plan_for_fleet
    from pytest_hilfarm.rollout.plan import parse_plan

    advice = plan_for_fleet(
        args.fleet_size, name=args.name, crash_max=args.crash_max,
        crash_detect=args.crash_detect, hardware_revisions=_names(args.hardware_revisions),
        regions=_names(args.regions), connectivity_types=_names(args.connectivity_types),
        command=_advise_command(args))
    parse_plan(advice.text, args.write_plan)  # what we write must load
    Path(args.write_plan).write_text(advice.text, encoding="utf-8")
    print(f"wrote {args.write_plan}: a plan for {args.fleet_size:,} devices that completes a "
          f"good release in about {advice.expected_hours:.0f} h. Risks it accepts:")
    for r in advice.risks:
        print(f"  - {r}")


def _common(p: argparse.ArgumentParser, now: bool = True) -> None:
    p.add_argument("--db", help="rollout store (default: $HILFARM_ROLLOUT_DB, else "
                                "$XDG_STATE_HOME/hilfarm/rollouts.sqlite)")
    p.add_argument("--actor", default="cli", help="who to record in the audit log")
    if now:
        p.add_argument("--now", help="act as if it were this ISO time (replays, tests)")


def register(subparsers: Any) -> None:
    """Add the ``rollout``, ``fleet`` and ``advise`` command groups."""
    ro = subparsers.add_parser(
        "rollout", help="staged rollouts gated on HIL and telemetry",
        epilog=example("hilfarm rollout start --plan plan.yaml --hil-junit hil.xml",
                       "hilfarm rollout step mesh-sensor-2.4.0 --telemetry windows.jsonl"))
    rs = ro.add_subparsers(dest="rollout_command", metavar="ACTION")
    ro.set_defaults(handler=lambda a: (ro.print_help(), 2)[1])
    rid = "rollout id (PLAN-NAME-VERSION unless started with --id)"

    p = rs.add_parser(
        "start", help="create a rollout from a plan and deploy its first ring",
        description="Create a rollout from a plan and take its first steps. Exit 1 when the HIL "
                    "gate blocks the start, 2 for a bad plan or manifest.",
        epilog=example("hilfarm rollout start --plan plan.yaml --manifest manifest.json "
                       "--release-pubkey release.pub.pem --hil-junit hil.xml"))
    p.add_argument("--plan", required=True, help="rollout plan YAML (docs/rollouts.md)")
    p.add_argument("--manifest", help="signed release manifest JSON (default: plan's artifact)")
    p.add_argument("--release-pubkey", metavar="PEM",
                   help="verify the manifest's signature and expiry with this release public key "
                        "(from `hilfarm ota pubkey`) before starting")
    p.add_argument("--hil-junit", help="JUnit XML written by pytest --junitxml")
    p.add_argument("--hil-results", help="JSON HIL results file (counts or a tests list)")
    p.add_argument("--staging-since", help="ISO time the release entered staging (when the "
                                           "plan has no staging ring)")
    p.add_argument("--id", help="rollout id (default: PLAN-NAME-VERSION)")
    _common(p)
    p.set_defaults(handler=_cmd_start)

    p = rs.add_parser(
        "status", help="list rollouts, or one rollout's state and audit log",
        description="One rollout's state and audit log (exit 0 progressing or complete, 10 "
                    "paused, 11 rolled back or aborted), or the list of rollouts (exit 0).",
        epilog=example("hilfarm rollout status mesh-sensor-2.4.0 --json"))
    p.add_argument("id", nargs="?", help=rid + "; none: list every rollout")
    p.add_argument("--json", action="store_true", help="machine-readable state and audit log")
    _common(p, now=False)
    p.set_defaults(handler=_cmd_status)

    p = rs.add_parser(
        "step", help="take every transition that is due (safe to re-run)",
        description="Ingest telemetry and take every transition that is due; safe to run as "
                    "often as you like. Exit 0 progressing or complete, 10 paused, 11 rolled "
                    "back or aborted, 2 a bad telemetry file or unknown rollout.",
        epilog=example("hilfarm rollout step mesh-sensor-2.4.0 --telemetry windows.jsonl --json"))
    p.add_argument("id", help=rid)
    p.add_argument("--telemetry", action="append", metavar="FILE",
                   help="telemetry .jsonl or .csv (repeatable): every window since the start")
    p.add_argument("--window", metavar="DURATION",
                   help="window length for records without an `hours` field (e.g. 1h)")
    p.add_argument("--json", action="store_true",
                   help="machine-readable result: state, exit code, transitions, gate verdicts")
    _common(p)
    p.set_defaults(handler=_cmd_step)

    for name, what in (("pause", "stop promoting (devices keep what they have)"),
                       ("resume", "resume a paused rollout (its ring soaks again)"),
                       ("abort", "end the rollout; updated devices keep the candidate"),
                       ("rollback", "end the rollout and revert every deployed ring")):
        p = rs.add_parser(name, help=what, epilog=example(
            f'hilfarm rollout {name} mesh-sensor-2.4.0 --reason "support tickets"'))
        p.add_argument("id", help=rid)
        p.add_argument("--reason", required=True, help="recorded in the audit log")
        _common(p)
        p.set_defaults(handler=_manual(name))

    p = rs.add_parser("report", help="write an HTML report with SVG charts",
                      epilog=example("hilfarm rollout report mesh-sensor-2.4.0 --out report.html"))
    p.add_argument("id", help=rid)
    p.add_argument("--out", help="output file (default: ID-report.html)")
    _common(p, now=False)
    p.set_defaults(handler=_cmd_report)

    p = rs.add_parser("export", help="emit AWS IoT Jobs, hawkBit, Mender or balena requests",
                      epilog=example("hilfarm rollout export --plan plan.yaml --format balena "
                                     "--out balena.json"))
    p.add_argument("--plan", required=True, help="rollout plan YAML with an exporters section")
    p.add_argument("--manifest", help="release manifest (default: the plan's artifact)")
    p.add_argument("--format", required=True, choices=("aws", "hawkbit", "mender", "balena"),
                   help="which platform's request bodies")
    p.add_argument("--hawkbit-style", default="new", choices=("new", "legacy"),
                   help="targetPercentage semantics: new (hawkBit >= 0.5.0) or legacy")
    p.add_argument("--start", help="Mender: ISO start time of the first phase (default: now)")
    p.add_argument("--out", help="write the JSON here instead of standard output")
    p.set_defaults(handler=_cmd_export)

    fl = subparsers.add_parser(
        "fleet", help="fleet model: dry-run a rollout",
        epilog=example("hilfarm fleet simulate --devices 2000 --plan plan.yaml --trials 1000"))
    fs = fl.add_subparsers(dest="fleet_command", metavar="ACTION")
    fl.set_defaults(handler=lambda a: (fl.print_help(), 2)[1])
    p = fs.add_parser(
        "simulate", help="run a plan's rollout in simulated time",
        description="Run a plan's rollout over a modelled fleet in simulated time. One run exits "
                    "with its result (0 complete, 10 paused, 11 rolled back, 1 blocked by the "
                    "HIL gate); --trials reports operating characteristics and exits 0.",
        epilog=example("hilfarm fleet simulate --devices 2000 --plan plan.yaml --fault crash:2%/h",
                       "hilfarm fleet simulate --devices 2000 --plan plan.yaml --trials 1000 "
                       "--jobs 2"))
    p.add_argument("--devices", type=int, required=True, help="production devices to model")
    p.add_argument("--plan", required=True, help="rollout plan YAML")
    p.add_argument("--fault", action="append", metavar="KIND:VALUE[%][/h][@HW]",
                   help="crash:0.02 (per day), crash:2%%/h, boot:1%%@B, connectivity:0.02, "
                        "battery:0.3, hil:1")
    p.add_argument("--seed", type=int, default=1, help="random seed (the first, with --trials)")
    p.add_argument("--trials", type=int, metavar="K",
                   help="run K seeded simulations of a good firmware (--good) and of a bad one "
                        "(--fault; default: crash at the plan's detect rate) and report false "
                        "rollbacks, misses, time to decision and blast radius")
    p.add_argument("--good", action="append", metavar="KIND:VALUE",
                   help="with --trials: faults of the 'good' firmware (e.g. crash:0.1%%/h, "
                        "at the limit)")
    p.add_argument("--jobs", type=int, default=1, help="with --trials: processes to use")
    p.add_argument("--ingest-minutes", type=float, default=60.0,
                   help="telemetry ingest interval, at most 60")
    p.add_argument("--json", action="store_true", help="machine-readable result")
    p.add_argument("--report", metavar="HTML", help="also write the HTML report")
    p.set_defaults(handler=_cmd_simulate)

    p = subparsers.add_parser(
        "advise", help="which test stages a product needs, and a rollout plan that fits",
        epilog=example("hilfarm advise --fleet-size 50000 --hardware heavy "
                       "--field-failure-cost 250000",
                       "hilfarm advise --fleet-size 2000 --write-plan plan.yaml"))
    p.add_argument("--fleet-size", type=int, required=True, help="devices in the fleet")
    p.add_argument("--safety-critical", action="store_true",
                   help="the firmware acts on the physical world (heating, locks, medical)")
    p.add_argument("--hardware", default="some", choices=("none", "some", "heavy"),
                   help="how much the firmware interacts with hardware")
    p.add_argument("--field-failure-cost", type=float,
                   help="cost of one defect reaching the fleet")
    p.add_argument("--per-device-cost", type=float,
                   help="or: cost per affected device (times --fleet-size)")
    p.add_argument("--stage-cost", action="append", metavar="STAGE=COST",
                   help="override a stage's cost per release (unit, integration, simulation, "
                        "hil, staging)")
    p.add_argument("--write-plan", metavar="PLAN.yaml",
                   help="write an exposure-based rollout plan sized for this fleet (and print "
                        "the risks it accepts)")
    p.add_argument("--name", default="firmware", help="with --write-plan: the plan's name")
    p.add_argument("--hardware-revisions", metavar="A,B,C",
                   help="with --write-plan: strata the staging and canary rings must cover")
    p.add_argument("--regions", metavar="eu,us", help="with --write-plan: region strata")
    p.add_argument("--connectivity-types", metavar="wifi,thread",
                   help="with --write-plan: link-type strata")
    p.add_argument("--crash-max", type=float, default=0.001,
                   help="with --write-plan: crash-hours per device-hour allowed (0.001 = 0.1%%/h)")
    p.add_argument("--crash-detect", type=float, default=0.005,
                   help="with --write-plan: crash rate the plan must catch (0.005 = 0.5%%/h)")
    p.set_defaults(handler=_cmd_advise)
