"""The nightly report as text (a terminal, a CI log) and as one self-contained HTML page.

The HTML has inline SVG charts (pass rate per suite and day against the drift threshold,
infra-error rate per board, duration per day of the tests that got slower) and no scripts or
external assets, so it can be archived as a CI artifact or served by the dashboard.

Must not: compute anything the analysis did not (it only lays the numbers out).
"""

from __future__ import annotations

import html
import time

from pytest_hilfarm.services.charts import bar_chart, line_chart
from pytest_hilfarm.services.report.analysis import BisectHint, Report, TestSummary

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:72em}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:.2em .6em;border-bottom:1px solid #eee;
text-align:left;vertical-align:top}th{background:#f6f6f6}.num{text-align:right}
.flag{color:#b00;font-weight:600}.ok{color:#2a7a2a}.muted{color:#777}
.charts{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0}figcaption{font-size:.85em;color:#555}
code{font-size:.9em}nav a{margin-right:1em}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def bisect_words(hint: BisectHint) -> str:
    bad = hint.first_bad
    text = (f"fails on every run since firmware {bad.short} (first run {_when(bad.first_seen)}; "
            f"{hint.failed_runs} failed runs on {hint.failing_firmwares} firmware(s))")
    if hint.last_good is None:
        return text + "; it failed on every firmware of the window: look further back"
    good = hint.last_good
    return (text + f"; last passed on {good.short} ({good.passed} of "
            f"{good.passed + good.failed} runs): bisect between {good.short} and {bad.short}")


def _flaky_words(test: TestSummary) -> str:
    fws = ", ".join(f"{fw.short} ({fw.passed} passed, {fw.failed} failed)"
                    for fw in test.flaky_on)
    boards = ", ".join(f"{b} {n}" for b, n in test.failures_by_board.items())
    return f"passed and failed on the same firmware: {fws}; failures by board: {boards}"


def text(report: Report) -> str:
    """The report for a terminal or a CI log."""
    th = report.thresholds
    lines = [f"hilfarm report {_when(report.since)} .. {_when(report.until)}: "
             f"{report.results} results of {len(report.tests)} tests on "
             f"{len(report.boards)} boards"]

    def section(title: str, rows: list[str]) -> None:
        lines.append("")
        lines.append(f"{title}: {len(rows) if rows else 'none'}")
        lines.extend(f"  {row}" for row in rows)

    section("flaky tests", [
        f"{t.test_id}{' [quarantined]' if t.quarantine else ''}: pass rate "
        f"{_pct(t.pass_rate)} of {t.runs}; {_flaky_words(t)}" for t in report.flaky])
    section("broken tests (bisect hints)", [
        f"{t.test_id}: {bisect_words(t.bisect)}" for t in report.broken if t.bisect])
    section(f"sick boards (infra-error rate >= {th.sick_infra_rate:.0%} and >= "
            f"{th.sick_min_errors} errors, or failed health checks)", [
        f"{b.board}: {'; '.join(b.reasons)}" for b in report.sick_boards])
    section(f"suites whose pass rate drifted down by >= {th.drift:.0%}", [
        f"{s.suite}: {_pct(s.early)} -> {_pct(s.late)}" for s in report.drifting])
    section(f"tests that got slower by >= {th.slower:.0%}", [
        f"{t.test_id}: median {t.duration_by_day[0][1]:.1f} s -> {t.duration_by_day[-1][1]:.1f} s"
        for t in report.slower])
    if report.quarantine:
        section(f"quarantine list {report.quarantine_source}", [
            f"{q.entry.pattern} ({q.entry.where}"
            f"{': ' + q.entry.comment if q.entry.comment else ''}): "
            f"{q.passed} passed, {q.failed} failed"
            + ("" if q.tests else " (no runs in the window)") for q in report.quarantine])
    lines.append("")
    lines.append("per test: pass rate, runs, median duration")
    for t in report.tests:
        lines.append(f"  {_pct(t.pass_rate):>7} {t.runs:>5} {t.duration_median:>8.1f} s  "
                     f"{t.test_id}")
    lines.append("")
    lines.append("per board: leases, infra errors (rate), failed checks, test failures")
    for b in report.boards:
        lines.append(f"  {b.board:<16} {b.leases:>5} {b.infra_errors:>4} ({b.infra_rate:>5.1%})"
                     f" {b.failed_checks:>3} {b.failed:>5}")
    return "\n".join(lines) + "\n"


def body(report: Report) -> str:
    """The report's HTML without the page around it (the dashboard embeds it)."""
    th = report.thresholds
    parts = [f'<p class="muted">{_when(report.since)} .. {_when(report.until)}: '
             f"{report.results} results of {len(report.tests)} tests on "
             f"{len(report.boards)} boards.</p>"]
    parts.append('<h2 id="suites">Pass rate per suite and day</h2><div class="charts">')
    for s in report.suites:
        points = [(d.day, d.rate) for d in s.by_day if d.total]
        lo = min([p[1] for p in points] + [0.8])
        threshold = None if s.early is None else s.early - th.drift
        if s.drifted:
            flag = f' <span class="flag">drifted {_pct(s.early)} -> {_pct(s.late)}</span>'
        elif s.early is None:
            flag = " (one day of results: no trend yet)"
        else:
            flag = f" {_pct(s.early)} -> {_pct(s.late)}"
        chart = line_chart([(s.suite, points)], y_lo=max(0.0, lo - 0.05), y_hi=1.0,
                           threshold=threshold, label="pass rate " + s.suite)
        parts.append(f'<figure class="suite{" drifted" if s.drifted else ""}">{chart}'
                     f"<figcaption><code>{_e(s.suite)}</code>{flag}; dashed: the first days' "
                     f"rate minus {th.drift:.0%}</figcaption></figure>")
    parts.append("</div>")
    parts.append('<h2 id="flaky">Flaky tests</h2>')
    parts.append(_table(["test", "pass rate", "runs", "passed and failed on", "failures by board",
                         "quarantine"],
                        [[f"<code>{_e(t.test_id)}</code>", _pct(t.pass_rate), str(t.runs),
                          _e(", ".join(f"{fw.short} ({fw.passed}/{fw.passed + fw.failed})"
                                       for fw in t.flaky_on)),
                          _e(", ".join(f"{b}: {n}" for b, n in t.failures_by_board.items())),
                          _e(t.quarantine.comment or t.quarantine.where) if t.quarantine
                          else '<span class="flag">not quarantined</span>']
                         for t in report.flaky], "flaky"))
    parts.append('<h2 id="broken">Broken tests: where to bisect</h2>')
    parts.append(_table(["test", "last passed on", "first failing firmware", "hint"],
                        [[f"<code>{_e(t.test_id)}</code>",
                          _e(t.bisect.last_good.short) if t.bisect.last_good else "-",
                          f'<span class="flag">{_e(t.bisect.first_bad.short)}</span>',
                          _e(bisect_words(t.bisect))]
                         for t in report.broken if t.bisect], "broken"))
    parts.append('<h2 id="boards">Boards: infrastructure errors</h2>')
    bars = [(b.board, b.infra_rate, b.sick) for b in report.boards]
    parts.append(bar_chart(bars, x_hi=max([b[1] for b in bars] + [th.sick_infra_rate * 2]),
                           threshold=th.sick_infra_rate, label="infra-error rate per board"))
    parts.append(_table(["board", "leases", "infra errors", "rate", "failed checks",
                         "test failures", "verdict"],
                        [[_e(b.board), str(b.leases), str(b.infra_errors), _pct(b.infra_rate),
                          str(b.failed_checks), str(b.failed),
                          f'<span class="flag">sick: {_e("; ".join(b.reasons))}</span>'
                          if b.sick else '<span class="ok">ok</span>']
                         for b in report.boards], "boards"))
    if report.slower:
        parts.append('<h2 id="slower">Tests that got slower</h2><div class="charts">')
        for t in report.slower:
            hi = max(s for _, s in t.duration_by_day) * 1.1
            chart = line_chart([(t.test_id, t.duration_by_day)], y_lo=0.0, y_hi=hi,
                               y_fmt="{:.0f} s", label="duration " + t.test_id)
            parts.append(f"<figure>{chart}<figcaption><code>{_e(t.test_id)}</code>: median "
                         f"{t.duration_by_day[0][1]:.1f} s -> {t.duration_by_day[-1][1]:.1f} s"
                         "</figcaption></figure>")
        parts.append("</div>")
    parts.append(f'<h2 id="quarantine">Quarantine list</h2><p class="muted">'
                 f"{_e(report.quarantine_source or 'none given (--quarantine FILE)')}</p>")
    parts.append(_table(["pattern", "comment", "tests in the window", "passed", "failed"],
                        [[f"<code>{_e(q.entry.pattern)}</code>",
                          _e(q.entry.comment or q.entry.where),
                          _e(", ".join(q.tests) or "no runs"), str(q.passed), str(q.failed)]
                         for q in report.quarantine], "quarantine"))
    parts.append('<h2 id="tests">Every test</h2>')
    parts.append(_table(["test", "pass rate", "runs", "median s", "duration change"],
                        [[f"<code>{_e(t.test_id)}</code>", _pct(t.pass_rate), str(t.runs),
                          f"{t.duration_median:.1f}",
                          "-" if t.duration_change is None else f"{t.duration_change:+.0%}"]
                         for t in report.tests], "tests"))
    return "".join(parts)


def _table(headers: list[str], rows: list[list[str]], name: str) -> str:
    if not rows:
        return f'<p class="muted" id="{name}-none">none</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    rows_html = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>"
                        for row in rows)
    return f'<table class="{name}"><tr>{head}</tr>{rows_html}</table>'


def page(report: Report, title: str = "hilfarm nightly report") -> str:
    """A whole, self-contained HTML page (``hilfarm report --html FILE``)."""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}'
            f"</title><style>{STYLE}</style></head><body><h1>{_e(title)}</h1>"
            f"{body(report)}</body></html>\n")
