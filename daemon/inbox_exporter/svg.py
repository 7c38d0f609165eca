"""Inline SVG drawn on the server: the history strip and the latency sparkline of an inbox.

No script and no external asset, so the pages work offline and under a Content-Security-Policy
that allows nothing but their own style. Colours are presentation attributes, not styles.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime

from .history import Entry, Run

OK, FAILED = "#1a7f37", "#cf222e"


def _when(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _what(e: Entry) -> str:
    if e.ok:
        return "ok"
    return f"{e.failing_step.value if e.failing_step else '?'} failed: " \
           f"{e.reason.value if e.reason else '?'}"


def strip(entries: list[Entry], cell: int = 5, height: int = 16) -> str:
    """One cell per check, oldest on the left; hover (title) tells time, step and reason."""
    if not entries:
        return ""
    rects = [f'<rect x="{i * cell}" width="{cell - 1}" height="{height}" '
             f'fill="{OK if e.ok else FAILED}"><title>{html.escape(f"{_when(e.started_at)}: {_what(e)}")}'
             f'</title></rect>' for i, e in enumerate(entries)]
    width = len(entries) * cell
    label = f"last {len(entries)} checks: {sum(e.ok for e in entries)} ok"
    return (f'<svg class=strip role=img aria-label="{label}" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">{"".join(rects)}</svg>')


def run_strip(runs: list[Run], cell: int = 3, height: int = 16) -> str:
    """The status page's strip: one element per run of equal outcomes, its title the span."""
    if not runs:
        return ""
    rects, x = [], 0
    for run in runs:
        e = run.first
        title = (f"{_when(e.started_at)}: {_what(e)}" if run.count == 1 else
                 f"{run.count} checks {_when(e.started_at)} to {_when(run.last_started_at)}: "
                 f"{_what(e)}")
        rects.append(f'<rect x="{x}" width="{run.count * cell - 1}" height="{height}" '
                     f'fill="{OK if e.ok else FAILED}"><title>{html.escape(title)}</title></rect>')
        x += run.count * cell
    total, ok = sum(r.count for r in runs), sum(r.count for r in runs if r.first.ok)
    return (f'<svg class=strip role=img aria-label="last {total} checks: {ok} ok" width="{x}" '
            f'height="{height}" viewBox="0 0 {x} {height}">{"".join(rects)}</svg>')


def sparkline(entries: list[Entry], width: int = 300, height: int = 40) -> str:
    """Total step time per check (ms), oldest on the left, with its maximum."""
    points = [e.total_ms for e in entries]
    if len(points) < 2:
        return ""
    top = max(points) or 1
    step = width / (len(points) - 1)
    coords = " ".join(f"{i * step:.1f},{height - 2 - (p / top) * (height - 4):.1f}"
                      for i, p in enumerate(points))
    return (f'<svg class=spark role=img aria-label="check time, max {top} ms" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}"><polyline points="{coords}" '
            f'fill="none" stroke="#0969da" stroke-width="1.5"/>'
            f'<title>check time (all steps): max {top} ms, last {points[-1]} ms</title></svg>')


def uptime(entries: list[Entry]) -> float | None:
    return None if not entries else sum(e.ok for e in entries) / len(entries)
