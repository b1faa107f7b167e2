"""HIL gate input: pytest's JUnit XML or a JSON results file, reduced to one decision.

Only counts are read; test names of failures are kept (a few) so the decision says what broke.
It never runs tests and never imports the plugin.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from pytest_hilfarm.errors import ConfigError

from .gates import GateResult, Verdict


@dataclass(frozen=True)
class HilSummary:
    source: str
    tests: int
    failures: int
    errors: int
    skipped: int
    failed_names: tuple[str, ...] = ()


def read_junit(path: str | Path) -> HilSummary:
    """Sum every ``<testsuite>`` (pytest writes ``<testsuites><testsuite>``) by its test cases."""
    p = Path(path)
    try:
        root = ET.parse(p).getroot()
    except OSError as exc:
        raise ConfigError(f"cannot read JUnit XML: {exc.strerror}", where=str(p),
                          hint="run pytest with --junitxml=PATH first") from exc
    except ET.ParseError as exc:
        raise ConfigError(f"JUnit XML is malformed: {exc}", where=str(p),
                          hint="pass the file pytest --junitxml wrote") from exc
    if root.tag not in ("testsuites", "testsuite"):
        raise ConfigError(f"root element <{root.tag}> is not <testsuites>/<testsuite>",
                          where=str(p))
    tests = failures = errors = skipped = 0
    names: list[str] = []
    # Count testcases rather than trusting the suite attributes: a truncated file then shows
    # fewer tests instead of claiming counts it no longer contains.
    for case in root.iter("testcase"):
        tests += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        if case.find("failure") is not None:
            failures += 1
            names.append(name)
        elif case.find("error") is not None:
            errors += 1
            names.append(name)
        elif case.find("skipped") is not None:
            skipped += 1
    return HilSummary(str(p), tests, failures, errors, skipped, tuple(names[:10]))


def read_results(path: str | Path) -> HilSummary:
    """A JSON results file: ``{"passed": n, "failed": n, "errors": n, "skipped": n}`` or
    ``{"tests": [{"nodeid": ..., "outcome": "passed|failed|error|skipped"}, ...]}``.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read HIL results: {exc.strerror}", where=str(p)) from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"HIL results are not JSON: {exc.msg}",
                          where=f"{p}:{exc.lineno}") from exc
    if isinstance(data, dict) and isinstance(data.get("tests"), list):
        counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
        names = []
        for i, t in enumerate(data["tests"]):
            outcome = t.get("outcome") if isinstance(t, dict) else None
            if outcome not in counts:
                raise ConfigError(f"outcome {outcome!r} is not passed/failed/error/skipped",
                                  where=f"{p}: tests[{i}]")
            counts[outcome] += 1
            if outcome in ("failed", "error"):
                names.append(str(t.get("nodeid", f"tests[{i}]")))
        return HilSummary(str(p), sum(counts.values()), counts["failed"], counts["error"],
                          counts["skipped"], tuple(names[:10]))
    if isinstance(data, dict) and all(isinstance(data.get(k, 0), int) for k in
                                      ("passed", "failed", "errors", "skipped")):
        passed, failed = data.get("passed", 0), data.get("failed", 0)
        errors, skipped = data.get("errors", 0), data.get("skipped", 0)
        return HilSummary(str(p), passed + failed + errors + skipped, failed, errors, skipped)
    raise ConfigError("HIL results file has neither counts nor a tests list", where=str(p),
                      hint='write {"passed": 12, "failed": 0, "errors": 0, "skipped": 1}')


def hil_gate(summary: HilSummary | None, required: bool, allow_skipped: bool) -> GateResult:
    """Pure: passed only when tests ran and none failed or errored."""
    if summary is None:
        if required:
            return GateResult("hil", Verdict.FAIL,
                              "no HIL results given and the plan requires them",
                              {"required": True}, "pause")
        return GateResult("hil", Verdict.PASS, "HIL results not required", {"required": False})
    numbers = {"source": summary.source, "tests": summary.tests, "failures": summary.failures,
               "errors": summary.errors, "skipped": summary.skipped,
               "failed": list(summary.failed_names)}
    if summary.tests == 0 or summary.tests == summary.skipped:
        return GateResult("hil", Verdict.FAIL, "the HIL suite ran no test", numbers, "pause")
    if summary.failures or summary.errors:
        return GateResult("hil", Verdict.FAIL,
                          f"{summary.failures} failed, {summary.errors} errors of {summary.tests}",
                          numbers, "pause")
    if summary.skipped and not allow_skipped:
        return GateResult("hil", Verdict.FAIL,
                          f"{summary.skipped} skipped and the plan allows none", numbers, "pause")
    return GateResult("hil", Verdict.PASS, f"{summary.tests - summary.skipped} passed, "
                      f"{summary.skipped} skipped", numbers)
