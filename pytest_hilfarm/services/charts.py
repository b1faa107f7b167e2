"""Small, dependency-free SVG charts for the dashboard and the report (as the rollout report does).

Three shapes: a line chart of values per day (pass rates with a threshold line, durations), a
horizontal bar chart (infra-error rate per board) and a state timeline (a board's health over
time). Each returns one ``<svg>`` element with a ``<title>`` per mark, so a person hovering a
point reads its value; no scripts, no external assets.

Must not: read the farm or the store (callers pass the numbers in).
"""

from __future__ import annotations

import html
import time
from collections.abc import Mapping, Sequence

W, H, PAD_L, PAD_R, PAD_T, PAD_B = 560, 180, 48, 24, 12, 30
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22")
HEALTH_COLOURS = {"GOOD": "#2ca02c", "UNKNOWN": "#bdbdbd", "BAD": "#ff7f0e",
                  "QUARANTINED": "#d62728"}


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def day_label(epoch: float) -> str:
    return time.strftime("%m-%d", time.gmtime(epoch))


def line_chart(series: Sequence[tuple[str, Sequence[tuple[float, float]]]], *,
               y_lo: float, y_hi: float, y_fmt: str = "{:.0%}",
               threshold: float | None = None, label: str = "chart") -> str:
    """One polyline per named series of (epoch day, value) points; x is shared."""
    xs = sorted({x for _, pts in series for x, _ in pts})
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    span = (y_hi - y_lo) or 1.0

    def sx(x: float) -> float:
        if len(xs) < 2:
            return PAD_L + pw / 2
        return PAD_L + pw * (x - xs[0]) / (xs[-1] - xs[0])

    def sy(y: float) -> float:
        return PAD_T + ph * (1 - (min(max(y, y_lo), y_hi) - y_lo) / span)

    parts = [f'<rect x="{PAD_L}" y="{PAD_T}" width="{pw}" height="{ph}" fill="none" '
             'stroke="#ccc"/>']
    for i in range(5):
        y = y_lo + span * i / 4
        parts.append(f'<line x1="{PAD_L}" x2="{PAD_L + pw}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
                     'stroke="#eee"/>')
        parts.append(f'<text x="{PAD_L - 4}" y="{sy(y) + 4:.1f}" font-size="10" '
                     f'text-anchor="end">{_e(y_fmt.format(y))}</text>')
    for x in xs:
        parts.append(f'<text x="{sx(x):.1f}" y="{H - 10}" font-size="10" '
                     f'text-anchor="middle">{_e(day_label(x))}</text>')
    if threshold is not None:
        parts.append(f'<line class="threshold" x1="{PAD_L}" x2="{PAD_L + pw}" '
                     f'y1="{sy(threshold):.1f}" y2="{sy(threshold):.1f}" stroke="#d62728" '
                     f'stroke-dasharray="4 3"><title>threshold {_e(y_fmt.format(threshold))}'
                     '</title></line>')
    for index, (name, points) in enumerate(series):
        colour = PALETTE[index % len(PALETTE)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        parts.append(f'<polyline class="series" fill="none" stroke="{colour}" stroke-width="2" '
                     f'points="{coords}"><title>{_e(name)}</title></polyline>')
        for x, y in points:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}">'
                         f'<title>{_e(name)} {_e(day_label(x))}: {_e(y_fmt.format(y))}</title>'
                         '</circle>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{W}" height="{H}" '
            f'role="img" aria-label="{_e(label)}">{"".join(parts)}</svg>')


def bar_chart(bars: Sequence[tuple[str, float, bool]], *, x_hi: float = 1.0,
              x_fmt: str = "{:.0%}", threshold: float | None = None,
              label: str = "chart") -> str:
    """One horizontal bar per (name, value, flagged); flagged bars are red."""
    row, pad_l = 22, 140
    height = PAD_T + PAD_B + row * max(len(bars), 1)
    pw = W - pad_l - PAD_R - 40  # room for the value written after the longest bar
    top = x_hi or 1.0

    def sx(v: float) -> float:
        return pad_l + pw * min(max(v, 0.0), top) / top

    parts = []
    for i, (name, value, flagged) in enumerate(bars):
        y = PAD_T + i * row
        colour = "#d62728" if flagged else "#1f77b4"
        parts.append(f'<text x="{pad_l - 6}" y="{y + 15}" font-size="11" text-anchor="end">'
                     f'{_e(name)}</text>')
        parts.append(f'<rect class="bar" x="{pad_l}" y="{y + 4}" '
                     f'width="{max(sx(value) - pad_l, 1):.1f}" height="{row - 8}" '
                     f'fill="{colour}"><title>{_e(name)}: {_e(x_fmt.format(value))}</title>'
                     '</rect>')
        parts.append(f'<text x="{sx(value) + 4:.1f}" y="{y + 15}" font-size="10">'
                     f'{_e(x_fmt.format(value))}</text>')
    if threshold is not None:
        x = sx(threshold)
        parts.append(f'<line class="threshold" x1="{x:.1f}" x2="{x:.1f}" y1="{PAD_T}" '
                     f'y2="{height - PAD_B}" stroke="#d62728" stroke-dasharray="4 3">'
                     f'<title>threshold {_e(x_fmt.format(threshold))}</title></line>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{W}" '
            f'height="{height}" role="img" aria-label="{_e(label)}">{"".join(parts)}</svg>')


def timeline(segments: Sequence[tuple[float, float, str, str]], *, start: float, end: float,
             colours: Mapping[str, str] = HEALTH_COLOURS, label: str = "timeline",
             width: int = W, height: int = 26) -> str:
    """States over time: (from, to, state, note) segments between ``start`` and ``end``."""
    span = (end - start) or 1.0

    def sx(t: float) -> float:
        return width * (min(max(t, start), end) - start) / span

    parts = [f'<rect x="0" y="0" width="{width}" height="{height}" fill="#f4f4f4"/>']
    for t0, t1, state, note in segments:
        x0, x1 = sx(t0), sx(t1)
        stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime(t0))
        parts.append(f'<rect class="state {_e(state.lower())}" x="{x0:.1f}" y="2" '
                     f'width="{max(x1 - x0, 2):.1f}" height="{height - 4}" '
                     f'fill="{colours.get(state, "#999")}"><title>{_e(state)} from {stamp} UTC'
                     f'{": " + _e(note) if note else ""}</title></rect>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="timeline" width="{width}" '
            f'height="{height}" role="img" aria-label="{_e(label)}">{"".join(parts)}</svg>')
