"""Release-manager report: one self-contained HTML page with inline SVG charts.

Built only from a rollout's audit log (live or simulated), so the page shows exactly the numbers
the controller decided on: ring progression over time, and each gate's measured rate and
confidence bound against its threshold at every evaluation. No scripts, no external assets.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .controller import iso
from .plan import Plan
from .store import AuditEntry

W, H, PAD_L, PAD_R, PAD_T, PAD_B = 640, 220, 56, 16, 16, 36
EVENT_COLOURS = MappingProxyType({"deploy": "#1f77b4", "promote": "#2ca02c", "complete": "#2ca02c",
                 "pause": "#ff7f0e", "rollback": "#d62728", "abort": "#7f7f7f",
                 "extend": "#9467bd", "resume": "#17becf", "start": "#333333"})
GATES = (("crash_rate", "crash rate", "max"), ("connectivity", "connectivity success", "min"),
         ("boot_failures", "boot failures / rollbacks", "max"),
         ("battery_drain", "battery drain vs baseline", "max"))


@dataclass(frozen=True)
class ReportInput:
    title: str
    rollout_id: str
    state: str
    candidate: str
    previous: str | None
    audit: tuple[AuditEntry, ...]
    rings: tuple[tuple[str, str], ...] = ()  # (name, label) of every ring, in order


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _axes(x_max: float, y_lo: float, y_hi: float, y_fmt: str, x_label: str,
          sqrt_scale: bool = False) -> tuple[str, Any]:
    """Frame, grid and labels; returns the x and y mappings from data to pixels.

    ``sqrt_scale`` spreads small rates: a 0.1 % crash threshold stays visible next to a
    staging ring's 10 % one.
    """
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B

    def f(y: float) -> float:
        return math.sqrt(max(y, 0.0)) if sqrt_scale else y

    lo_t, hi_t = f(y_lo), f(y_hi)
    span = (hi_t - lo_t) or 1.0

    def sx(x: float) -> float:
        return PAD_L + (x / (x_max or 1.0)) * pw

    def sy(y: float) -> float:
        y = min(max(y, y_lo), y_hi)
        return PAD_T + ph - (f(y) - lo_t) / span * ph

    parts = [f'<rect x="{PAD_L}" y="{PAD_T}" width="{pw}" height="{ph}" fill="#fafafa" '
             'stroke="#ccc"/>']
    for k in range(5):
        t = lo_t + span * k / 4
        y = t * t if sqrt_scale else t
        parts.append(f'<line x1="{PAD_L}" x2="{PAD_L + pw}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
                     'stroke="#e5e5e5"/>')
        parts.append(f'<text x="{PAD_L - 4}" y="{sy(y) + 4:.1f}" text-anchor="end" '
                     f'font-size="10">{_e(format(y, y_fmt))}</text>')
    for k in range(5):
        x = x_max * k / 4
        parts.append(f'<text x="{sx(x):.1f}" y="{H - PAD_B + 14}" text-anchor="middle" '
                     f'font-size="10">{x:.0f}</text>')
    parts.append(f'<text x="{PAD_L + pw / 2}" y="{H - 4}" text-anchor="middle" '
                 f'font-size="11">{_e(x_label)}</text>')
    return "".join(parts), (sx, sy)


def progression_svg(audit: Sequence[AuditEntry], rings: Sequence[tuple[str, str]] = ()) -> str:
    """Which ring the candidate has reached over time, with every transition marked.

    The y axis is the ring ladder, equally spaced, not the percentage: a 1 % canary would be an
    invisible sliver on a linear 0-100 % axis.
    """
    if not audit:
        return "<p>No transitions recorded.</p>"
    names = [n for n, _ in rings]
    for e in audit:  # rings missing from the list (e.g. a report without its plan)
        if e.event == "deploy" and e.ring and e.ring not in names:
            names.append(e.ring)
            rings = (*rings, (e.ring, e.ring))
    labels = ["none"] + [label for _, label in rings]
    t0 = audit[0].at
    x_max = max(1.0, (audit[-1].at - t0) / 3600 * 1.05)
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    top = max(1, len(labels) - 1)

    def sx(x: float) -> float:
        return PAD_L + 40 + (x / x_max) * (pw - 40)

    def sy(level: float) -> float:
        return PAD_T + 24 + (ph - 24) * (1 - level / top)

    parts = [f'<rect x="{PAD_L + 40}" y="{PAD_T}" width="{pw - 40}" height="{ph}" '
             'fill="#fafafa" stroke="#ccc"/>']
    for i, label in enumerate(labels):
        parts.append(f'<line x1="{PAD_L + 40}" x2="{PAD_L + pw}" y1="{sy(i):.1f}" '
                     f'y2="{sy(i):.1f}" stroke="#e5e5e5"/><text x="{PAD_L + 36}" '
                     f'y="{sy(i) + 4:.1f}" text-anchor="end" font-size="10">{_e(label)}</text>')
    for k in range(5):
        x = x_max * k / 4
        parts.append(f'<text x="{sx(x):.1f}" y="{H - PAD_B + 14}" text-anchor="middle" '
                     f'font-size="10">{x:.0f}</text>')
    parts.append(f'<text x="{PAD_L + 40 + (pw - 40) / 2}" y="{H - 4}" text-anchor="middle" '
                 'font-size="11">hours since start</text>')

    def level_of(e: AuditEntry, current: int) -> int:
        if e.event == "deploy" and e.ring in names:
            return names.index(e.ring) + 1
        if e.event == "rollback":
            return 0
        return current

    pts: list[tuple[float, int]] = [(0.0, 0)]
    level = 0
    for e in audit:
        new = level_of(e, level)
        if new != level:
            h = (e.at - t0) / 3600
            pts += [(h, level), (h, new)]
            level = new
    pts.append((x_max, level))
    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    parts.append(f'<polyline points="{path}" fill="none" stroke="#1f77b4" stroke-width="2"/>')
    level = 0
    for e in audit:
        level = level_of(e, level)
        colour = EVENT_COLOURS.get(e.event, "#333")
        parts.append(f'<circle cx="{sx((e.at - t0) / 3600):.1f}" cy="{sy(level):.1f}" r="4" '
                     f'fill="{colour}"><title>{_e(iso(e.at))} {_e(e.event)} {_e(e.ring or "")}: '
                     f'{_e(e.reason)}</title></circle>')
    parts += [
        f'<rect x="{PAD_L + 48 + i * 74}" y="{PAD_T + 6}" width="8" height="8" fill="{c}"/>'
        f'<text x="{PAD_L + 60 + i * 74}" y="{PAD_T + 14}" font-size="10">{_e(n)}</text>'
        for i, (n, c) in enumerate(list(EVENT_COLOURS.items())[:7])]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
            f'role="img" aria-label="ring progression">{"".join(parts)}</svg>')


def ring_labels(plan: Plan) -> tuple[tuple[str, str], ...]:
    """(name, axis label) per ring: ``canary 1%``, ``staging (50)``."""
    return tuple((r.name, f"{r.name} {r.percent:g}%" if r.production else
                  f"{r.name} ({r.devices})") for r in plan.rings)


def _gate_points(audit: Sequence[AuditEntry], gate: str) -> list[tuple[float, dict[str, Any]]]:
    t0 = audit[0].at if audit else 0.0
    out = []
    for e in audit:
        for g in e.numbers.get("gates", []) or []:
            if g.get("gate") == gate:
                out.append(((e.at - t0) / 3600, {**g["numbers"], "verdict": g["verdict"],
                                                 "ring": e.ring}))
    return out


def hi_precision(vals: Sequence[tuple[Any, ...]]) -> bool:
    """Two decimals when values are small percentages (crash rates near 0.1 %)."""
    nums = [v for row in vals for v in row[1:5] if isinstance(v, (int, float))]
    return bool(nums) and max(nums) - min(nums) < 0.05


def gate_svg(audit: Sequence[AuditEntry], gate: str, label: str, kind: str) -> str:
    """Measured value, its confidence interval and the threshold at each evaluation."""
    pts = _gate_points(audit, gate)
    if not pts:
        return f"<p>{_e(label)}: no evaluation yet.</p>"
    if gate == "battery_drain":
        vals = [(h, n.get("mean"), n.get("lower"), n.get("upper"), n.get("threshold"), n)
                for h, n in pts]
        fmt = ".3g"
    else:
        vals = [(h, n.get("rate"), n.get("lower"), n.get("upper"), n.get("threshold"), n)
                for h, n in pts]
        fmt = ".2%" if hi_precision(vals) else ".1%"
    nums = [v for row in vals for v in row[1:5] if isinstance(v, (int, float))]
    if not nums:
        return f"<p>{_e(label)}: too few devices at every evaluation (no decision).</p>"
    lo, hi = min(nums), max(nums)
    margin = (hi - lo) * 0.1 or abs(hi) * 0.1 or 0.001
    y_lo, y_hi = max(0.0, lo - margin), hi + margin
    if kind == "min" and gate != "battery_drain":
        y_hi = min(1.0, y_hi)
    x_max = max(1.0, (audit[-1].at - audit[0].at) / 3600 * 1.05)
    sqrt_scale = kind == "max" and gate != "battery_drain"
    if sqrt_scale:
        y_lo = 0.0
    grid, (sx, sy) = _axes(x_max, y_lo, y_hi, fmt, "hours since start", sqrt_scale)
    parts = [grid]
    thr = [(h, t) for h, _, _, _, t, _ in vals if isinstance(t, (int, float))]
    if thr:
        # A step line: a ring's threshold holds until the next evaluation (rings may differ).
        # A step line: each evaluation's threshold applies back to the previous evaluation
        # (the soak it judged); rings may have different thresholds.
        steps = [(0.0, thr[0][1]), (thr[0][0], thr[0][1])]
        for (prev, _), (h, t) in zip(thr, thr[1:]):
            steps += [(prev, t), (h, t)]
        steps.append((x_max, thr[-1][1]))
        path = " ".join(f"{sx(h):.1f},{sy(t):.1f}" for h, t in steps)
        parts.append(f'<polyline points="{path}" fill="none" stroke="#d62728" '
                     'stroke-dasharray="5,4" stroke-width="1.5"><title>threshold</title>'
                     '</polyline>')
    colour = {"pass": "#2ca02c", "fail": "#d62728", "inconclusive": "#ff7f0e",
              "insufficient": "#7f7f7f"}
    for h, v, low, up, _t, n in vals:
        if not isinstance(v, (int, float)):
            continue
        c = colour.get(str(n.get("verdict")), "#333")
        if isinstance(low, (int, float)) and isinstance(up, (int, float)):
            parts.append(f'<line x1="{sx(h):.1f}" x2="{sx(h):.1f}" y1="{sy(low):.1f}" '
                         f'y2="{sy(up):.1f}" stroke="{c}" stroke-width="2"/>')
        parts.append(f'<circle cx="{sx(h):.1f}" cy="{sy(v):.1f}" r="4" fill="{c}"><title>'
                     f'{_e(n.get("ring"))}: {_e(n.get("verdict"))}, value {format(v, fmt)}'
                     f'</title></circle>')
    return (f'<figure><figcaption>{_e(label)} (dot: measured, bar: confidence bound, dashed: '
            f'threshold, {kind}{", square-root scale" if sqrt_scale else ""})</figcaption>'
            '<svg xmlns="http://www.w3.org/2000/svg" '
            f'width="{W}" height="{H}" role="img" aria-label="{_e(label)}">{"".join(parts)}'
            '</svg></figure>')


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:960px;color:#222}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ddd;padding:3px 6px;
text-align:left;vertical-align:top}.state{font-weight:bold;padding:2px 8px;border-radius:4px;
background:#eee}figure{margin:1em 0}figcaption{font-size:13px;margin-bottom:4px}"""


def render_html(r: ReportInput) -> str:
    rows = []
    for e in r.audit:
        gates = "; ".join(f"{g['gate']} {g['verdict']}" for g in e.numbers.get("gates", []))
        rows.append(f"<tr><td>{_e(iso(e.at))}</td><td>{_e(e.event)}</td><td>{_e(e.ring or '')}"
                    f"</td><td>{_e(e.from_state or '')} &rarr; {_e(e.to_state)}</td>"
                    f"<td>{_e(e.actor)}</td><td>{_e(e.reason)}</td><td>{_e(gates)}</td></tr>")
    charts = "".join(gate_svg(r.audit, g, label, kind) for g, label, kind in GATES)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(r.title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{_e(r.title)}</h1>"
        f"<p>Rollout <code>{_e(r.rollout_id)}</code>: {_e(r.previous or '?')} &rarr; "
        f"{_e(r.candidate)}. State: <span class=\"state\">{_e(r.state)}</span></p>"
        f"<h2>Ring progression</h2>{progression_svg(r.audit, r.rings)}"
        f"<h2>Gate metrics against thresholds</h2>{charts}"
        "<h2>Audit log</h2><table><tr><th>time (UTC)</th><th>event</th><th>ring</th>"
        "<th>state</th><th>actor</th><th>reason</th><th>gates</th></tr>"
        f"{''.join(rows)}</table></body></html>\n")
