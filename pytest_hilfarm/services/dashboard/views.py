"""The dashboard's HTML: server-rendered pages, escaped, with inline SVG and one tiny script.

Each live page is a frame with a ``<main id="live">`` whose content the server also serves alone
(``?fragment=1``); a dozen lines of script fetch it every ``refresh`` seconds and swap it in
(with a ``<meta refresh>`` fallback when scripts are off). No build chain, no external assets.

Must not: read the farm (views get a :class:`Snapshot` or a report) or emit unescaped text.
"""

from __future__ import annotations

import html
import time
from urllib.parse import quote

from pytest_hilfarm.services.charts import HEALTH_COLOURS, timeline
from pytest_hilfarm.services.dashboard.state import BoardRow, Holder, Snapshot
from pytest_hilfarm.services.report.render import STYLE as REPORT_STYLE

STYLE = REPORT_STYLE + """
.health{padding:.05em .5em;border-radius:.6em;color:#fff;font-size:.85em;white-space:nowrap}
.held{font-weight:600}.small{font-size:.85em}pre.log{background:#111;color:#ddd;padding:.6em;
max-height:22em;overflow:auto;font-size:.8em}.stamp{color:#777;font-size:.8em}
td svg.timeline{display:block}
"""

_SCRIPT = """<script>
(function () {
  var every = %d, busy = false;
  setInterval(function () {
    if (busy) return; busy = true;
    var url = location.pathname + (location.search ? location.search + "&" : "?") + "fragment=1";
    fetch(url, {credentials: "same-origin", cache: "no-store"}).then(function (r) {
      return r.ok ? r.text() : null;
    }).then(function (text) {
      if (text !== null) document.getElementById("live").innerHTML = text;
    }).catch(function () {}).finally(function () { busy = false; });
  }, every);
})();
</script>"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def ago(epoch: float | None, now: float) -> str:
    if epoch is None:
        return "-"
    seconds = max(0.0, now - epoch)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.1f} days ago"


def frame(title: str, live: str, *, refresh: float | None, nav: str = "") -> str:
    """A whole page; ``live`` is refreshed every ``refresh`` seconds when given."""
    script = "" if refresh is None else _SCRIPT % max(int(refresh * 1000), 250)
    fallback = "" if refresh is None else \
        f'<noscript><meta http-equiv="refresh" content="{max(int(refresh), 2)}"></noscript>'
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{_e(title)}</title>{fallback}<style>{STYLE}</style></head><body>"
            f'<nav><a href="/">boards</a><a href="/report">report</a>'
            f'<a href="/api/status.json">status.json</a>{nav}</nav>'
            f'<h1>{_e(title)}</h1><main id="live">{live}</main>{script}</body></html>\n')


def _health(row: BoardRow) -> str:
    colour = HEALTH_COLOURS.get(row.health, "#999")
    due = " (check due)" if row.check_due and row.health != "QUARANTINED" else ""
    return (f'<span class="health {_e(row.health.lower())}" style="background:{colour}" '
            f'title="{_e(row.reason)}">{_e(row.health)}{_e(due)}</span>')


def _holder(holder: Holder | None, now: float) -> str:
    if holder is None:
        return '<span class="muted">free</span>'
    if holder.kind == "bench":
        return (f'<span class="held">{_e(holder.user)}</span> at the bench: '
                f"{_e(holder.reason)} <span class=\"stamp\">since {_e(when(holder.since))}"
                "</span>")
    parts = [f'<span class="held">{_e(holder.user)}</span>'
             f'<span class="small"> (pid {holder.pid} on {_e(holder.host)})</span>']
    if holder.ci_job:
        parts.append(f'<br><span class="small">CI job {_e(holder.ci_job)}</span>')
    if holder.test_id:
        parts.append(f'<br><span class="small">test <code>{_e(holder.test_id)}</code></span>')
    elif holder.reason:
        parts.append(f'<br><span class="small">{_e(holder.reason)}</span>')
    parts.append(f'<br><span class="stamp">since {_e(when(holder.since))} '
                 f"({_e(ago(holder.since, now))})</span>")
    return "".join(parts)


def overview(snap: Snapshot) -> str:
    """The live part of the board overview (also served alone as the fragment)."""
    now = snap.at
    multi = any(r.host for r in snap.boards)
    head = ["board", "chip"] + (["host"] if multi else []) + \
        ["health", "since", "holder", f"health since {when(snap.window_start)[:10]}",
         "firmware"]
    rows = []
    for r in snap.boards:
        host = ""
        if multi:
            host = f"<td>{_e(r.host or '(rack file)')}" + \
                ("" if r.online else ' <span class="flag">offline</span>') + "</td>"
        segments = snap.timelines.get(r.board, ())
        chart = timeline(segments, start=snap.window_start, end=now, width=220, height=16,
                         label=f"health of {r.board}")
        rows.append(
            f'<tr class="board" id="board-{_e(r.board)}" data-board="{_e(r.board)}" '
            f'data-health="{_e(r.health)}" data-held="{"yes" if r.holder else "no"}">'
            f'<td><a href="/boards/{quote(r.board)}">{_e(r.board)}</a></td><td>{_e(r.chip)}</td>'
            f"{host}<td>{_health(r)}</td>"
            f'<td class="stamp" title="{_e(when(r.health_since))}">'
            f"{_e(ago(r.health_since, now))}</td>"
            f'<td class="holder">{_holder(r.holder, now)}</td><td>{chart}</td>'
            f"<td><code>{_e(r.firmware or '-')}</code></td></tr>")
    out = [f'<p class="stamp">rack {_e(snap.rack)} ({_e(snap.backend)}), as of {when(now)}; '
           f"{sum(1 for r in snap.boards if r.holder)} of {len(snap.boards)} boards held</p>",
           '<table class="boards"><tr>' + "".join(f"<th>{_e(h)}</th>" for h in head)
           + "</tr>" + "".join(rows) + "</table>"]
    out.append(f'<h2 id="queue">Waiting for boards ({len(snap.queue)})</h2>')
    if snap.queue:
        out.append('<table class="queue"><tr><th>#</th><th>priority</th><th>waiting</th>'
                   "<th>expected start</th><th>request</th><th>who</th></tr>")
        for q in snap.queue:
            start = q.get("expected_start")
            expected = "unknown (waits on a person or a rig host)" if start is None else (
                "now" if start <= now else f"in {start - now:.0f} s")
            priority = str(q["priority"]) + (f" (aged {q['effective_priority']})"
                                             if q["effective_priority"] != q["priority"] else "")
            out.append(f"<tr><td>{q['position']}</td><td>{_e(priority)}</td>"
                       f"<td>{now - q['since']:.0f} s</td><td>{_e(expected)}</td>"
                       f"<td>{_e(q['request'])}</td><td class=\"small\">{_e(q['owner'])}</td>"
                       "</tr>")
        out.append("</table>")
    else:
        out.append('<p class="muted">nobody is waiting</p>')
    out.append(f'<h2 id="quarantined">Quarantined boards ({len(snap.quarantined)})</h2>')
    if not snap.quarantined:
        out.append('<p class="muted">none</p>')
    for qb in snap.quarantined:
        last = qb.last_failed
        out.append(f'<section class="quarantined" data-board="{_e(qb.board)}">'
                   f"<h3>{_e(qb.board)} <span class=\"stamp\">quarantined since "
                   f"{_e(when(qb.since))}</span></h3><p>{_e(qb.reason)}</p>")
        if last is not None:
            out.append(f"<p>last failed check, {_e(when(last.at))}: "
                       f"<code>{_e(last.reason)}</code></p>")
        if qb.log_path is not None:
            out.append(f'<p class="small">console log of that check: '
                       f"<code>{_e(qb.log_path)}</code></p>"
                       f'<pre class="log">{_e(qb.log_tail) or "(empty)"}</pre>')
        else:
            out.append('<p class="muted small">no health check log on this machine (the '
                       "check ran in a test or on another host: see its job's logs)</p>")
        out.append(f'<p class="small">back in service: <code>hilfarm board restore '
                   f"{_e(qb.board)}</code></p></section>")
    out.append(f'<h2 id="checks">Health checks since {when(snap.window_start)[:10]} '
               f"({len(snap.checks)})</h2>")
    if snap.checks:
        out.append('<table class="checks"><tr><th>when</th><th>board</th><th>result</th>'
                   "<th>detail</th></tr>")
        for e in snap.checks[:40]:
            verdict = '<span class="ok">passed</span>' if e.reason.startswith("check passed") \
                else '<span class="flag">failed</span>'
            out.append(f"<tr><td class=\"stamp\">{_e(when(e.at))}</td><td>{_e(e.board)}</td>"
                       f"<td>{verdict}</td><td class=\"small\">{_e(e.reason)}</td></tr>")
        out.append("</table>")
    else:
        out.append('<p class="muted">no health check in the window; run '
                   "<code>hilfarm health --all</code> (a systemd timer or a CI schedule)</p>")
    return "".join(out)


def board_page(snap: Snapshot, board: str, events: list, leases: list) -> str:
    """The live part of one board's page: its row, timeline, events and recent leases."""
    row = next((r for r in snap.boards if r.board == board), None)
    if row is None:
        return f'<p class="flag">no board {_e(board)} in this farm</p>'
    chart = timeline(snap.timelines.get(board, ()), start=snap.window_start, end=snap.at,
                     label=f"health of {board}")
    out = [f"<p>{_health(row)} since {_e(when(row.health_since))}: {_e(row.reason)}</p>",
           f'<p class="holder">holder: {_holder(row.holder, snap.at)}</p>',
           f"<h2>Health since {when(snap.window_start)[:10]}</h2>{chart}",
           '<table class="events"><tr><th>when</th><th>from</th><th>to</th><th>why</th></tr>']
    for e in events:
        out.append(f'<tr><td class="stamp">{_e(when(e.at))}</td><td>{_e(e.old.value)}</td>'
                   f"<td>{_e(e.new.value)}</td><td class=\"small\">{_e(e.reason)}</td></tr>")
    out.append("</table><h2>Recent leases</h2><table class=\"leases\"><tr><th>requested</th>"
               "<th>held for</th><th>outcome</th><th>owner</th></tr>")
    for lease in leases:
        held = "-" if lease.granted_at is None or lease.released_at is None else \
            f"{lease.released_at - lease.granted_at:.1f} s"
        outcome = lease.board_outcomes.get(board) or lease.outcome or "held now"
        owner = lease.owner
        who = f"{owner.get('user', '?')} {owner.get('test_id') or owner.get('reason') or ''}"
        out.append(f'<tr><td class="stamp">{_e(when(lease.requested_at))}</td><td>{held}</td>'
                   f"<td>{_e(outcome)}</td><td class=\"small\">{_e(who)}</td></tr>")
    out.append("</table>")
    return "".join(out)
