"""Run an ESP-IDF unit-test app's Unity cases over a console: one result per case.

ESP-IDF's test apps call ``unity_run_menu()`` (components/unity/unity_runner.c): the board
prints ``Press ENTER to see the list of tests.``; an empty line prints the menu
(``(n)<TAB>"name" [group][...]``, sub-cases of multi-stage cases indented) ending in ``Enter
test for running.``; typing a number runs that case (``Running <name>...``, its output, Unity's
``file:line:name:PASS`` / ``:FAIL: message`` / ``:IGNORE``, then the summary ``N Tests F Failures
I Ignored`` / ``OK|FAIL`` and ``Enter next test, or 'enter' to see menu``). As
pytest-embedded-idf does, the runner reads the menu once, then runs the chosen cases one at a
time by number, waiting for one of the ready lines before typing (``unity_gets`` drops input
typed earlier), so a case that crashes or resets the board fails alone and the next one still
runs. Cases tagged ``[ignore]``/``[disable]`` are reported skipped unless named; multi-stage and
multi-device cases are reported skipped (this runner does not drive their stages).

It only writes to and reads from a console (a :class:`~pytest_hilfarm.board.device.Device` or
:class:`~pytest_hilfarm.board.console.Console`); it never resets or flashes boards itself.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pytest_hilfarm.errors import ConsoleTimeout, UsageError

READY_LINES = (
    "Press ENTER to see the list of tests",
    "Enter test for running",
    "Enter next test, or 'enter' to see menu",
)
_READY = re.compile("|".join(re.escape(line) for line in READY_LINES))
_MENU = re.compile(r"Here's the test menu, pick your combo:(?P<menu>[\s\S]*?)Enter test for "
                   r"running\.")
# pytest-embedded's menu regexes: a case line, and the sub-case lines of multi-stage cases.
_CASE_LINE = re.compile(r'^\((\d+)\)\s"(.+)"\s(\[.+\])+\s*$')
_SUBCASE_LINE = re.compile(r'^\t\((\d+)\)\s"(.+)"\s*$')
# Unity's result line (unity.c UnityConcludeTest / UnityTestResultsFailBegin) and summary.
_RESULT = re.compile(r"^(?P<file>[^\r\n]+?):(?P<line>\d+):(?P<name>[^\r\n]+):"
                     r"(?P<result>PASS|FAIL|IGNORE)(?::(?P<message>[^\r\n]*))?\r?$", re.M)
_SUMMARY = r"-+\s*\r?\n\s*(?P<tests>\d+) Tests (?P<failures>\d+) Failures (?P<ignored>\d+) Ignored\s*\r?\n\s*(?:OK|FAIL)"  # noqa: E501
# The board reset or crashed in the middle of a case: the panic handler, a ROM banner, the
# menu's first line again.
_CRASH = (r"Guru Meditation Error|abort\(\) was called|\*\*\*ERROR\*\*\*|Rebooting\.\.\.|"
          r"rst:0x[0-9a-fA-F]+|ESP-ROM:|ets [A-Z][a-z]{2} ")
OUTCOMES = {"PASS": "passed", "FAIL": "failed", "IGNORE": "skipped"}


class UnityConsole(Protocol):
    """What the runner needs of a board's console (Device and Console both fit)."""

    def write(self, data: str) -> None: ...

    def expect(self, pattern: str | re.Pattern[str], timeout: float = 10.0) -> re.Match[str]: ...


@dataclass(frozen=True)
class UnityCase:
    """One case of the menu. ``groups`` are its plain tags (``[gpio]`` -> "gpio"),
    ``attributes`` its ``[key=value]`` tags, ``keywords`` "ignore"/"disable".
    """

    index: int
    name: str
    groups: tuple[str, ...]
    kind: str = "normal"  # or "multi_stage", "multi_device"
    keywords: tuple[str, ...] = ()
    attributes: tuple[tuple[str, str], ...] = ()
    subcases: tuple[str, ...] = ()

    @property
    def ignored(self) -> bool:
        return bool(self.keywords)


@dataclass(frozen=True)
class UnityResult:
    """The result of one case, ready to become one pytest result / JUnit testcase.

    ``outcome``: "passed", "failed", "skipped" (Unity IGNORE, an ``[ignore]`` case, a case kind
    this runner does not drive) or "error" (the case never started: the menu did not take the
    input). ``text`` is the console output of that case alone; ``reset`` says the board crashed
    or reset during it (the panic, if any, is in ``text``).
    """

    case: UnityCase
    outcome: str
    message: str
    duration: float
    text: str
    file: str | None = None
    line: int | None = None
    reset: bool = False

    @property
    def name(self) -> str:
        return self.case.name

    @property
    def group(self) -> str:
        return ",".join(self.case.groups)


def _consumed(match: re.Match[str]) -> str:
    """Everything the expect consumed: from where it started searching to the match's end (a
    console's expect searches its unread output from ``match.pos``).
    """
    return match.string[match.pos : match.end()]


def parse_menu(text: str) -> tuple[UnityCase, ...]:
    """The cases of a printed menu (the text between its header and ``Enter test for running.``).

    Tags follow pytest-embedded-idf's reading: ``multi_stage``/``multi_device`` give the kind,
    ``ignore``/``disable`` are keywords, ``key=value`` are attributes, the rest are groups.
    """
    cases: list[UnityCase] = []
    for raw in text.replace("\r", "").split("\n"):
        if not raw.strip():
            continue
        match = _CASE_LINE.match(raw)
        if match is not None:
            tags = re.findall(r"\[(.+?)\]", match.group(3))
            kind = next((t for t in ("multi_stage", "multi_device") if t in tags), "normal")
            keywords = tuple(t for t in ("ignore", "disable") if t in tags)
            attrs = tuple((k.strip(), v.strip()) for k, _, v in
                          (t.partition("=") for t in tags if "=" in t))
            groups = tuple(t for t in tags if t not in (kind, *keywords) and "=" not in t)
            cases.append(UnityCase(int(match.group(1)), match.group(2), groups, kind, keywords,
                                   attrs))
            continue
        sub = _SUBCASE_LINE.match(raw)
        if sub is not None and cases:
            last = cases[-1]
            cases[-1] = UnityCase(last.index, last.name, last.groups, last.kind, last.keywords,
                                  last.attributes, (*last.subcases, sub.group(2)))
            continue
        raise UsageError(f"unrecognised line in the Unity test menu: {raw!r}",
                         where="Unity menu",
                         hint="the app's menu is not ESP-IDF's unity_run_menu() format")
    return tuple(cases)


def parse_results(text: str) -> list[tuple[str, str, str, str, int]]:
    """(name, outcome, message, file, line) for every Unity result line in ``text``."""
    return [(m.group("name"), OUTCOMES[m.group("result")], (m.group("message") or "").strip(),
             m.group("file"), int(m.group("line"))) for m in _RESULT.finditer(text)]


def select(cases: Sequence[UnityCase], *, group: str | None = None, name: str | None = None,
           include_ignored: bool = False) -> list[UnityCase]:
    """The cases to run: all, those in ``group`` (``"gpio"`` or ``"[gpio]"``), or ``name``.

    ``[ignore]``/``[disable]`` cases are left out unless named or ``include_ignored``.
    """
    if name is not None:
        chosen = [c for c in cases if c.name == name]
        if not chosen:
            raise UsageError(f"no Unity case named {name!r}", where="Unity menu",
                             hint=f"the menu has: {', '.join(repr(c.name) for c in cases)}")
        return chosen
    wanted = group.strip("[]") if group is not None else None
    chosen = [c for c in cases if wanted is None or wanted in c.groups]
    if wanted is not None and not chosen:
        known = sorted({g for c in cases for g in c.groups})
        raise UsageError(f"no Unity case in group [{wanted}]", where="Unity menu",
                         hint=f"groups in the menu: {', '.join(known) or 'none'}")
    return [c for c in chosen if include_ignored or not c.ignored]


class UnityRunner:
    """Drives one board's Unity menu. ``menu()`` reads the cases (once); ``run(cases)`` runs
    each and returns one :class:`UnityResult` per case.

    ``case_timeout`` bounds one case; ``ready_timeout`` the wait for a ready line (a board
    that just reset boots first).
    """

    def __init__(self, console: UnityConsole, *, case_timeout: float = 30.0,
                 ready_timeout: float = 30.0, start_timeout: float = 5.0) -> None:
        self.console = console
        self.case_timeout = case_timeout
        self.ready_timeout = ready_timeout
        self.start_timeout = start_timeout
        self._cases: tuple[UnityCase, ...] | None = None
        self._ready = False  # a ready line was seen and nothing was typed since

    def menu(self) -> tuple[UnityCase, ...]:
        """The app's cases, from its menu (ENTER is typed once a ready line appeared)."""
        if self._cases is None:
            self._wait_ready()
            self.console.write("\n")
            self._ready = False
            match = self.console.expect(_MENU, self.ready_timeout)
            self._cases = parse_menu(match.group("menu"))
            self._ready = True  # "Enter test for running." ends the menu
        return self._cases

    def run_all(self, *, include_ignored: bool = False) -> list[UnityResult]:
        return self.run(select(self.menu(), include_ignored=include_ignored))

    def run_group(self, group: str, *, include_ignored: bool = False) -> list[UnityResult]:
        return self.run(select(self.menu(), group=group, include_ignored=include_ignored))

    def run_case(self, name: str) -> UnityResult:
        return self.run(select(self.menu(), name=name))[0]

    def run(self, cases: Sequence[UnityCase]) -> list[UnityResult]:
        return [self._run_one(case) for case in cases]

    def _wait_ready(self) -> None:
        if not self._ready:
            self.console.expect(_READY, self.ready_timeout)
            self._ready = True

    def _run_one(self, case: UnityCase) -> UnityResult:
        if case.kind != "normal":
            return UnityResult(case, "skipped", f"{case.kind} cases are not run by this runner "
                               "(their stages need a reset or a second board)", 0.0, "")
        started = time.monotonic()
        try:
            self._wait_ready()
            self.console.write(f"{case.index}\n")
            self._ready = False
            self.console.expect(re.compile(rf"Running {re.escape(case.name)}\.\.\.\r?\n"),
                                self.start_timeout)
        except ConsoleTimeout as exc:
            return UnityResult(case, "error", f"the case did not start: {exc.what}",
                               time.monotonic() - started, "")
        started = time.monotonic()
        end = re.compile(rf"(?P<summary>{_SUMMARY})|(?P<crash>{_CRASH})")
        try:
            match = self.console.expect(end, self.case_timeout)
        except ConsoleTimeout as exc:
            return UnityResult(case, "failed", f"no result within {self.case_timeout:g} s",
                               time.monotonic() - started, exc.what)
        text = _consumed(match)
        if match.group("crash") is None:
            self._ready = False  # "Enter next test..." follows the summary
            return self._result(case, text, time.monotonic() - started)
        # The board crashed or reset: collect what it printed until its menu is back.
        try:
            text += _consumed(self.console.expect(_READY, self.ready_timeout))
            self._ready = True
        except ConsoleTimeout as exc:
            text += f"\n(the board did not come back to its menu: {exc.what})"
        duration = time.monotonic() - started
        reason = next((line.strip() for line in text.replace("\r", "").split("\n")
                       if re.search(_CRASH, line)), "reset")
        return UnityResult(case, "failed", f"the board reset during the case: {reason}",
                           duration, text, reset=True)

    def _result(self, case: UnityCase, text: str, duration: float) -> UnityResult:
        results = [r for r in parse_results(text) if r[0] == case.name]
        if not results:
            return UnityResult(case, "failed", "the case printed no Unity result line",
                               duration, text)
        _, outcome, message, file, line = results[-1]
        return UnityResult(case, outcome, message, duration, text, file, line)
