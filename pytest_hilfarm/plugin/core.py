"""The pytest plugin: options, the ``hil`` marker, the ``hil_*`` fixtures and reports.

Everything that touches boards goes through :class:`pytest_hilfarm.farm.Farm`; this module only
translates pytest's world (options, ini keys, markers, reports, xdist workers) into farm calls.
Settings are resolved once per test through :mod:`pytest_hilfarm.description.settings` and kept in
``config.stash``, never in private attributes.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_hilfarm.description import settings as hs
from pytest_hilfarm.errors import HilfarmError, InfrastructureError, UsageError

if TYPE_CHECKING:
    from pytest_hilfarm.board.device import Device
    from pytest_hilfarm.farm import Farm
    from pytest_hilfarm.farm.candidate import Candidate


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cancelled CI job) turned into an orderly interruption: fixtures tear down and
    the boards that were held are left for a health check instead of being dropped mid-use.
    """

    signal_name = "SIGTERM (job cancelled)"



@dataclass
class _RunStats:
    """What the terminal summary reports; merged from xdist workers."""

    boards: set[str] = field(default_factory=set)
    flashed: int = 0
    skipped: int = 0
    flash_seconds: float = 0.0
    health_changes: list[str] = field(default_factory=list)
    infra_errors: int = 0
    # Why panics could not be decoded (no ELF, no toolchain...): said once, in the summary.
    panic_notes: set[str] = field(default_factory=set)

    def to_dict(self) -> dict[str, Any]:
        return {
            "panic_notes": sorted(self.panic_notes),
            "boards": sorted(self.boards),
            "flashed": self.flashed,
            "skipped": self.skipped,
            "flash_seconds": self.flash_seconds,
            "health_changes": list(self.health_changes),
            "infra_errors": self.infra_errors,
        }

    def merge(self, data: dict[str, Any]) -> None:
        self.boards.update(data.get("boards", ()))
        self.flashed += int(data.get("flashed", 0))
        self.skipped += int(data.get("skipped", 0))
        self.flash_seconds += float(data.get("flash_seconds", 0.0))
        self.health_changes.extend(data.get("health_changes", ()))
        self.infra_errors += int(data.get("infra_errors", 0))
        self.panic_notes.update(data.get("panic_notes", ()))


_settings_key = pytest.StashKey[hs.Settings]()


def hil_settings(config: pytest.Config) -> hs.Settings:
    """The run's resolved settings (rack, firmware, timeouts...) for other plugins."""
    return config.stash[_settings_key]

_stats_key = pytest.StashKey[_RunStats]()
_candidate_key = pytest.StashKey["Candidate | None"]()
_marker_candidates_key = pytest.StashKey[dict[str, "Candidate | None"]]()
_interrupted_key = pytest.StashKey[str]()
_sigterm_key = pytest.StashKey[Any]()
_report_key = pytest.StashKey[dict[str, pytest.TestReport]]()
_firmware_failure_key = pytest.StashKey[str]()
_quarantine_key = pytest.StashKey[Any]()
QUARANTINED = "hil quarantine"


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from pytest_hilfarm.plugin import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hilfarm", "hardware-in-the-loop farm (pytest-hilfarm)")
    for opt in hs.OPTIONS:
        group.addoption(opt.option, **opt.addoption_kwargs())
        parser.addini(opt.ini, **opt.addini_kwargs())


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", hs.HIL_MARKER_HELP)
    config.addinivalue_line("markers", HIL_UNITY_MARKER_HELP)
    config.stash[_stats_key] = _RunStats()
    config.stash[_marker_candidates_key] = {}
    try:
        settings = hs.resolve_session(
            option_values={o.dest: getattr(config.option, o.dest, None) for o in hs.OPTIONS},
            getini=config.getini,
            environ=os.environ,
            rootdir=Path(str(config.rootpath)),
        )
        config.stash[_settings_key] = settings
        # The candidate is read and checked once, here: a path that does not exist, a file
        # that is not an image or a build for a chip it is not given for is one usage error
        # naming its source, before any board is touched.
        config.stash[_candidate_key] = _resolve(settings.firmware, settings, "firmware",
                                                skip=settings.no_flash)
    except HilfarmError as exc:
        raise pytest.UsageError(str(exc)) from None
    _install_sigterm(config)
    config.pluginmanager.register(_InterruptWatch(config), "hilfarm-interrupt-watch")
    config.pluginmanager.register(_UnityCases(config), "hilfarm-unity-cases")
    if settings.quarantine is not None:
        from pytest_hilfarm.description.quarantine import load_quarantine

        try:
            config.stash[_quarantine_key] = load_quarantine(settings.quarantine)
        except HilfarmError as exc:
            chosen = f"{exc.what} (chosen by {settings.source_of('quarantine')})"
            raise pytest.UsageError(str(type(exc)(chosen, where=exc.where, hint=exc.hint))
                                    ) from None


def _resolve(firmware: object, settings: hs.Settings, key: str, *, skip: bool = False,
             where: str | None = None) -> Candidate | None:
    if firmware is None or skip:
        return None
    from pytest_hilfarm.farm.candidate import resolve_candidate

    source = where or str(settings.source_of(key))
    return resolve_candidate(firmware, source=source)


def _install_sigterm(config: pytest.Config) -> None:
    """Turn SIGTERM into an orderly interruption (Python's default ends the process at once).

    Only in the main thread and only where nobody set a handler before us; restored at exit.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        raise Terminated()

    config.stash[_sigterm_key] = signal.signal(signal.SIGTERM, on_sigterm)


def pytest_unconfigure(config: pytest.Config) -> None:
    previous = config.stash.get(_sigterm_key, None)
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)


class _InterruptWatch:
    """Remembers an interruption in ``config.stash``: the fixtures pytest tears down after it
    leave their boards for a health check (``pytest_keyboard_interrupt`` gets no config).
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_keyboard_interrupt(self, excinfo: pytest.ExceptionInfo[BaseException]) -> None:
        from pytest_hilfarm.farm import interruption_note

        self.config.stash[_interrupted_key] = interruption_note(excinfo.value)


def pytest_report_header(config: pytest.Config) -> list[str]:
    """The rack, the log directory and the candidate, at the top of the run."""
    settings = config.stash.get(_settings_key, None)
    if settings is None:
        return []
    lines = [f"hilfarm: rack {settings.rack} ({settings.source_of('rack')})",
             f"hilfarm: device logs in {_log_base(config)}"]
    candidate = config.stash.get(_candidate_key, None)
    if candidate is not None:
        lines.append(f"hilfarm: candidate {candidate.describe()} from {candidate.source}")
    elif settings.no_flash:
        lines.append("hilfarm: --hil-no-flash: boards run what they have")
    else:
        lines.append("hilfarm: no candidate firmware given (a conftest may provide one; "
                     "otherwise boards run what they have)")
    return lines


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Validate every ``hil`` marker up front: a typo or a bad firmware path is one usage
    error, not 40 test errors.
    """
    settings = config.stash.get(_settings_key, None)
    for item in items:
        for mark in item.iter_markers("hil"):
            try:
                values = hs.parse_hil_marker(mark.args, mark.kwargs, where=item.nodeid)
                if "firmware" in values and settings is not None:
                    _marker_candidate(config, settings, values["firmware"], item.nodeid)
            except HilfarmError as exc:
                raise pytest.UsageError(str(exc)) from None


def _marker_candidate(config: pytest.Config, settings: hs.Settings, firmware: object,
                      nodeid: str) -> Candidate | None:
    """A marker's firmware, resolved once per distinct value (many tests share one build)."""
    cache = config.stash[_marker_candidates_key]
    key = repr(firmware)
    if key not in cache:
        cache[key] = _resolve(firmware, settings, "firmware", skip=settings.no_flash,
                              where=f"marker @pytest.mark.hil(firmware=...) on {nodeid}")
    return cache[key]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    _apply_quarantine(item, report)
    item.stash.setdefault(_report_key, {})[report.when] = report
    logs = item.stash.get(_logs_key, None)
    if logs and report.when == "call" and report.failed:
        for board_id, path in logs.items():
            report.sections.append((f"hil device log {board_id}", _tail(path)))
        session = item.stash.get(_session_key, None)
        if session is not None:
            _add_decoded_panics(item, report, session)
        lost = [b for b in logs if session is not None and session.port_lost(b)]
        if lost:
            report.sections.append((
                "hilfarm",
                f"the port of {', '.join(lost)} vanished during the test: a rig fault; "
                "the board is marked UNKNOWN and gets a health check before its next use",
            ))
    return report


def _apply_quarantine(item: pytest.Item, report: pytest.TestReport) -> None:
    """A quarantined test's failure (in the test, not a rig fault in setup) is an expected one.

    The store still records it as failed: the report counts it, the job does not fail on it.
    """
    quarantine = item.config.stash.get(_quarantine_key, None)
    if quarantine is None or report.when != "call" or not report.failed:
        return
    entry = quarantine.match(item.nodeid)
    if entry is not None:
        report.outcome = "skipped"
        report.wasxfail = (f"{QUARANTINED} ({entry.where}"  # type: ignore[attr-defined]
                           + (f": {entry.comment}" if entry.comment else "") + ")")


_logs_key = pytest.StashKey[dict[str, Path]]()
_session_key = pytest.StashKey[Any]()
_decoders_key = pytest.StashKey[dict[tuple[int, str], Any]]()


def _add_decoded_panics(item: pytest.Item, report: pytest.TestReport, session: Any) -> None:
    """Decode each board's panic against its build's ELF into the report (and JUnit).

    Where it cannot (no ELF, no toolchain, an ELF of another build), the reason goes to the
    terminal summary once per run instead of into every report.
    """
    from pytest_hilfarm.projects.panic import PanicDecoder, find_panics

    config = item.config
    settings = config.stash[_settings_key]
    decoders = config.stash.setdefault(_decoders_key, {})
    candidate = session.candidate
    for dev in session.devices:
        text = dev.console.text_since(0)
        if not find_panics(text):
            continue
        key = (id(candidate), dev.chip)
        if key not in decoders:
            plan = candidate.plan_for(dev.chip) if candidate is not None else None
            app = next((r.data for r in plan.regions if r.role in ("app", "factory")), None) \
                if plan is not None else None
            elf = candidate.elves.get(dev.chip) if candidate is not None else None
            decoders[key] = PanicDecoder.create(dev.chip, elf, app_image=app,
                                                addr2line=settings.addr2line)
        decoder = decoders[key]
        if not decoder.available:
            config.stash[_stats_key].panic_notes.add(f"{dev.chip}: {decoder.reason}")
            continue
        decoded = decoder.decode(text)
        if decoded is None:
            continue
        title = f"decoded panic on {dev.id}"
        addsection = getattr(report.longrepr, "addsection", None)
        if callable(addsection):
            addsection(title, decoded.text)  # shown with the failure, and in JUnit's <failure>
        else:
            report.sections.append((title, decoded.text))


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"
    return f"log file: {path}\n" + "\n".join(text[-lines:])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    item.stash[_in_call_key] = True
    try:
        return (yield)
    finally:
        item.stash[_in_call_key] = False


_in_call_key = pytest.StashKey[bool]()


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """A candidate firmware that did not boot fails the test (it is the firmware's fault);
    a ``hil_unity`` test first runs its Unity cases, one result per case.
    """
    failure = pyfuncitem.stash.get(_firmware_failure_key, None)
    if failure is not None:
        pytest.fail(failure, pytrace=False)
    marker = pyfuncitem.get_closest_marker("hil_unity")
    if marker is not None:
        _run_unity_cases(pyfuncitem, marker)
    return None


HIL_UNITY_MARKER_HELP = (
    "hil_unity(group=None, name=None, include_ignored=False, case_timeout=30): run the Unity "
    "cases of an ESP-IDF unit-test app on the test's board (all, a [group], or one case by "
    "name), one pytest result and JUnit testcase per case; the test fails if any case fails. "
    "Ask for the hil_unity fixture."
)
_UNITY_KEYS = ("group", "name", "include_ignored", "case_timeout")


def _run_unity_cases(item: pytest.Function, marker: pytest.Mark) -> None:
    from pytest_hilfarm.projects.unity import select

    unknown = set(marker.kwargs) - set(_UNITY_KEYS)
    if marker.args or unknown:
        raise pytest.UsageError(
            f"{item.nodeid}: @pytest.mark.hil_unity takes only {', '.join(_UNITY_KEYS)} by "
            f"name, got {sorted(unknown) or list(marker.args)}")
    runner: Any = item.funcargs.get("hil_unity")
    if runner is None:
        raise pytest.UsageError(f"{item.nodeid}: a @pytest.mark.hil_unity test must ask for the "
                                "hil_unity fixture (def test_x(hil_unity): ...)")
    if "case_timeout" in marker.kwargs:
        runner.case_timeout = float(marker.kwargs["case_timeout"])
    cases = select(runner.menu(), group=marker.kwargs.get("group"),
                   name=marker.kwargs.get("name"),
                   include_ignored=bool(marker.kwargs.get("include_ignored", False)))
    failed = []
    results = runner.run(cases)
    # Carried on the test's own report to whoever logs it (this process, or the xdist
    # controller: a worker may only report the item it runs), which then logs each case.
    item.user_properties.append((_UNITY_PROPERTY, json.dumps([
        {"name": r.name, "group": r.group, "outcome": r.outcome, "message": r.message,
         "duration": r.duration, "text": r.text, "file": r.file, "line": r.line,
         "reset": r.reset} for r in results])))
    for result in results:
        if result.outcome in ("failed", "error"):
            failed.append(f"{result.name}: {result.message or result.outcome}")
    if failed:
        pytest.fail(f"{len(failed)} of {len(cases)} Unity case(s) failed:\n  "
                    + "\n  ".join(failed), pytrace=False)


_UNITY_PROPERTY = "hilfarm.unity_cases"


class _UnityCases:
    """Logs each Unity case a ``hil_unity`` test carried as its own result, where the test's
    report is logged (this process, or the xdist controller).
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.session: pytest.Session | None = None

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.session = session

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call" or hasattr(self.config, "workerinput"):
            return  # an xdist worker passes the report on; the controller logs the cases
        carried = [p for p in report.user_properties if p[0] == _UNITY_PROPERTY]
        if not carried:
            return
        report.user_properties = [p for p in report.user_properties if p[0] != _UNITY_PROPERTY]
        cases = json.loads(str(carried[0][1]))
        if self.session is not None:  # the cases are results of their own: progress counts them
            self.session.testscollected += len(cases)
        for case in cases:
            _log_unity_case(report, case, self.config.hook)


def _log_unity_case(parent: pytest.TestReport, case: dict[str, Any], hook: Any) -> None:
    """One Unity case as its own test result: terminal line, stats and JUnit testcase."""
    nodeid = f"{parent.nodeid}[{case['name']}]"
    path, lineno, domain = parent.location
    location = (path, lineno, f"{domain}[{case['name']}]")
    where = f"{case['file']}:{case['line']}" if case["file"] else parent.nodeid
    outcome = {"error": "failed"}.get(case["outcome"], case["outcome"])
    longrepr: Any = None
    if outcome == "failed":
        longrepr = f"{where}: {case['message'] or 'failed'}" + (
            "\n(the board crashed or reset during the case)" if case["reset"] else "")
    elif outcome == "skipped":
        longrepr = (str(case["file"] or path), int(case["line"] or 0),
                    f"Skipped: {case['message'] or 'ignored'}")
    properties = [("unity.group", case["group"]), ("unity.case", case["name"])]
    phases: tuple[tuple[Any, Any, Any, list[tuple[str, str]], float], ...] = (
        ("setup", "passed", None, [], 0.0),
        ("call", outcome, longrepr, [("Captured stdout call", case["text"])], case["duration"]),
        ("teardown", "passed", None, [], 0.0),
    )
    for when, rep_outcome, rep_longrepr, sections, duration in phases:
        report = pytest.TestReport(
            nodeid, location, {case["name"]: 1, "unity": 1}, rep_outcome, rep_longrepr,
            when, sections=sections, duration=duration, user_properties=properties,
        )
        hook.pytest_runtest_logreport(report=report)


@pytest.fixture
def hil_unity(hil_device: Device) -> Any:
    """A Unity test-menu runner on the test's board (ESP-IDF unit-test apps)."""
    from pytest_hilfarm.projects.unity import UnityRunner

    return UnityRunner(hil_device)


@pytest.fixture(scope="session")
def hil_farm(pytestconfig: pytest.Config) -> Iterator[Farm]:
    """The session's HIL farm: reserve boards yourself with ``hil_farm.reserve(...)``."""
    from pytest_hilfarm.farm import Farm

    cfg = pytestconfig.stash[_settings_key]
    try:
        farm = Farm.open(cfg.rack, log_root=_log_root(pytestconfig), baseline=cfg.baseline)
    except HilfarmError as exc:
        raise pytest.UsageError(str(exc)) from exc
    yield farm
    stats = pytestconfig.stash[_stats_key]
    stats.health_changes.extend(farm.health_changes())
    farm.close()


def _log_base(config: pytest.Config) -> Path:
    """``--hil-log-dir``, else hilfarm-logs/ where pytest was started (not pytest's rootdir,
    which a path given as an option value can move to / or /tmp).
    """
    settings = config.stash.get(_settings_key, None)
    if settings is not None and settings.log_dir is not None:
        return settings.log_dir.absolute()
    return Path(config.invocation_params.dir) / "hilfarm-logs"


def _log_root(config: pytest.Config) -> Path:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return _log_base(config) / worker


@pytest.fixture(scope="session")
def hil_firmware(pytestconfig: pytest.Config) -> Candidate | None:
    """The candidate firmware from --hil-firmware / hil_firmware / HILFARM_FIRMWARE (or None)."""
    return pytestconfig.stash[_candidate_key]


@pytest.fixture
def hil_devices(
    request: pytest.FixtureRequest, hil_farm: Farm, hil_firmware: object
) -> Iterator[list[Device]]:
    """Boards the ``hil`` marker asks for: reserved, health-checked, flashed and booted."""
    item = request.node
    marker = item.get_closest_marker("hil")
    per_test = hs.parse_hil_marker(
        marker.args if marker else (), marker.kwargs if marker else {}, where=item.nodeid
    )
    settings = request.config.stash[_settings_key]
    cfg = settings.for_test(per_test, where=item.nodeid)
    if cfg.no_flash:
        candidate = None
    elif "firmware" in per_test:
        candidate = _marker_candidate(request.config, settings, per_test["firmware"],
                                      item.nodeid)
    else:
        candidate = _fixture_candidate(request.config, settings, hil_firmware)
    reason = hil_farm.unsatisfiable(cfg.count, chip=cfg.chip, features=cfg.features,
                                    candidate=candidate)
    if reason:
        pytest.skip(reason)
    stats = request.config.stash[_stats_key]
    excluded: set[str] = set()
    attempts = cfg.infra_retries + 1
    session = None
    for attempt in range(attempts):
        try:
            session = hil_farm.start_session(
                count=cfg.count,
                chip=cfg.chip,
                features=cfg.features,
                firmware=candidate,
                timeout=cfg.lock_timeout,
                boot_timeout=cfg.boot_timeout,
                test_id=item.nodeid,
                exclude=excluded,
                priority=cfg.priority,
            )
            break
        except InfrastructureError as exc:
            stats.infra_errors += 1
            failed = tuple(getattr(exc, "board_ids", ()))
            excluded.update(failed)
            request.config.hook.pytest_hilfarm_infra_error(
                item=item, error=exc, board_ids=failed, will_retry=attempt + 1 < attempts
            )
            if attempt + 1 >= attempts:
                raise
            item.add_report_section(
                "setup", "hilfarm", f"infrastructure error, retrying on another board: {exc}"
            )
    assert session is not None
    for dev, rep in zip(session.devices, session.flash_reports):
        stats.boards.add(dev.id)
        stats.flashed += sum(1 for r in rep.regions if r.written)
        stats.skipped += sum(1 for r in rep.regions if not r.written)
        stats.flash_seconds += rep.seconds
        item.user_properties.extend(
            [
                (f"hil.{dev.id}.chip", dev.chip),
                (f"hil.{dev.id}.mac", dev.mac),
                (f"hil.{dev.id}.firmware_sha256", rep.firmware_sha256 or ""),
                (f"hil.{dev.id}.flash_seconds", f"{rep.seconds:.3f}"),
                (f"hil.{dev.id}.log", str(dev.log_path)),
            ]
        )
    item.stash[_logs_key] = {d.id: d.log_path for d in session.devices}
    if session.firmware_failure:
        if item.stash.get(_in_call_key, False):
            # Requested from inside the test (getfixturevalue): fail right here.
            session.finish("failed")
            pytest.fail(session.firmware_failure, pytrace=False)
        item.stash[_firmware_failure_key] = session.firmware_failure
    item.stash[_session_key] = session
    devices = list(session.devices)
    try:
        request.config.hook.pytest_hilfarm_devices_ready(item=item, devices=devices)
    except BaseException:
        session.finish("not_run")
        raise
    try:
        yield devices
    finally:
        reports = item.stash.get(_report_key, {})
        call = reports.get("call")
        outcome = "passed" if call is not None and call.passed else "failed"
        xfail_reason = getattr(call, "wasxfail", None) if call is not None and call.skipped \
            else None
        if xfail_reason is not None and not str(xfail_reason).startswith(QUARANTINED):
            # An expected failure (pytest.mark.xfail) is what the suite wants: the report must
            # not count it against the pass rate. A quarantined test's failure stays a failure.
            outcome = "xfail"
        note = ""
        interrupted = request.config.stash.get(_interrupted_key, "")
        if interrupted:
            # Ctrl-C or SIGTERM while the boards were held: nobody knows their state.
            outcome, note = "aborted", interrupted
        elif call is None:
            outcome = "not_run"
        session.finish(outcome, note=note)


def _fixture_candidate(config: pytest.Config, settings: hs.Settings, value: object
                       ) -> Candidate | None:
    """The ``hil_firmware`` fixture's value as a Candidate (a conftest may return a path)."""
    from pytest_hilfarm.farm.candidate import Candidate

    if value is None or isinstance(value, Candidate):
        return value
    cache = config.stash[_marker_candidates_key]
    key = "fixture:" + repr(value)
    if key not in cache:
        try:
            cache[key] = _resolve(value, settings, "firmware",
                                  where="the hil_firmware fixture (conftest)")
        except HilfarmError as exc:
            raise UsageError(exc.what, where=exc.where, hint=exc.hint) from None
    return cache[key]


@pytest.fixture
def hil_device(hil_devices: list[Device]) -> Device:
    """The single board of a one-board ``hil`` test (``hil_devices[0]``)."""
    if len(hil_devices) != 1:
        raise UsageError(
            f"hil_device needs exactly one board but the marker asked for {len(hil_devices)}",
            hint="use hil_devices for multi-board tests",
        )
    return hil_devices[0]


def pytest_testnodedown(node: Any, error: Any) -> None:
    data = getattr(node, "workeroutput", {}).get("hilfarm_stats")
    if data:
        node.config.stash[_stats_key].merge(data)


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["hilfarm_stats"] = session.config.stash[_stats_key].to_dict()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if hasattr(config, "workeroutput"):
        return
    quarantined = [r.nodeid for r in terminalreporter.stats.get("xfailed", ())
                   if str(getattr(r, "wasxfail", "")).startswith(QUARANTINED)]
    if quarantined:
        terminalreporter.write_sep("-", "hilfarm quarantine")
        terminalreporter.write_line(f"{len(quarantined)} quarantined test(s) failed; the job "
                                    "does not fail on them (hilfarm report shows their history):")
        for nodeid in quarantined:
            terminalreporter.write_line(f"  {nodeid}")
    stats = config.stash.get(_stats_key, None)
    if stats is None or not stats.boards:
        return
    tr = terminalreporter
    tr.write_sep("-", "hilfarm summary")
    tr.write_line(f"boards used: {', '.join(sorted(stats.boards))}")
    tr.write_line(
        f"flash regions written: {stats.flashed}, skipped as identical: {stats.skipped}, "
        f"flash time: {stats.flash_seconds:.1f} s"
    )
    if stats.infra_errors:
        tr.write_line(f"infrastructure errors: {stats.infra_errors}")
    for change in stats.health_changes:
        tr.write_line(f"health: {change}")
    for note in sorted(stats.panic_notes):
        tr.write_line(f"panics: {note}")
