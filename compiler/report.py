"""The compile report: JSON for machines, one HTML page with a chart for people.

The chart plots every variant by artifact size (x, MB, log scale) against accuracy (%), or the
worst held-out sample's cosine to the fp32 source when there are no labels (y), with ticks on
both axes, the Pareto front and the winner marked, numbered points and a legend table keyed by
number (no label overlaps another: checked in headless Chromium, tests/compiler/test_report.py).
"""

from __future__ import annotations

import html
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2, sort_keys=True, default=str), "utf-8")


def write_html(path: Path, report: dict[str, Any]) -> None:
    rows = report["variants"]
    use_accuracy = any(r["metrics"].get("accuracy") is not None for r in rows)
    body = [
        f"<h1>edgeship compile report: {html.escape(str(report['name']))} v{report['version']}</h1>",
        f"<p>source sha256 {html.escape(str(report['source_sha256']))[:16]}…, "
        f"{report['calibration_samples']} calibration and {report['held_out_samples']} held-out samples.</p>",
        chart(rows, use_accuracy, report.get("winner")),
        _table(rows),
        *(_search(target, found, use_accuracy) for target, found in report.get("search", {}).items()),
    ]
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>edgeship report</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
        "td.l{text-align:left}.bad{color:#b00}"
        + CHART_CSS
        + "</style></head><body>"
        + "\n".join(body)
        + "</body></html>"
    )
    path.write_text(page, "utf-8")


def _table(rows: list[dict[str, Any]]) -> str:
    head = (
        "<tr><th>target</th><th>precision</th><th>backend</th><th>size KiB</th><th>weights KiB</th>"
        "<th>accuracy</th><th>drop (points)</th><th>cosine min</th><th>top-1 agree</th><th>max abs err</th>"
        "<th>latency median ms</th><th>p90 ms</th><th>notes</th></tr>"
    )
    out = [head]
    for r in rows:
        m = r["metrics"]
        notes = "; ".join(r.get("notes", []) + [f"needs hardware: {x}" for x in m.get("needs_hardware", [])])
        out.append(
            "<tr>"
            + f"<td class=l>{html.escape(r['target'])}</td><td class=l>{html.escape(r['precision'])}</td>"
            + f"<td class=l>{html.escape(str(m.get('backend') or '-'))}</td>"
            + f"<td>{m['size_bytes'] / 1024:.1f}</td><td>{m['weight_bytes'] / 1024:.1f}</td>"
            + "".join(
                f"<td>{_fmt(m.get(k), d)}</td>"
                for k, d in (
                    ("accuracy", 4),
                    ("accuracy_drop_points", 2),
                    ("cosine_min", 5),
                    ("top1_agreement", 4),
                    ("max_abs_error", 4),
                    ("latency_median_ms", 3),
                    ("latency_p90_ms", 3),
                )
            )
            + f"<td class=l>{html.escape(notes)}</td></tr>"
        )
    return "<table>" + "".join(out) + "</table>"


def _search(target: str, found: dict[str, Any], use_accuracy: bool) -> str:
    """One budget search: its reason, a chart of every candidate tried (the winner starred, misses
    crossed out) and a table of their figures and verdicts, in the order they were tried."""
    rows = [
        {
            "target": target,
            "precision": t["name"],
            "metrics": t.get("metrics") or {},
            "error": None if t["held"] else t["verdict"],
        }
        for t in found["trials"]
    ]
    winner = {"target": target, "precision": found["winner"]} if found.get("winner") else None
    head = (
        "<tr><th>#</th><th>candidate</th><th>size KiB</th><th>cosine min</th><th>drop (points)</th>"
        "<th>latency median ms</th><th>build s</th><th>budget</th><th>verdict</th></tr>"
    )
    out = [head]
    for i, t in enumerate(found["trials"], 1):
        verdict = "winner" if t["name"] == found.get("winner") else t["verdict"]
        out.append(
            f"<tr><td>{i}</td><td class=l>{html.escape(t['name'])}</td><td>{t['size_bytes'] / 1024:.1f}</td>"
            f"<td>{_fmt(t['cosine'], 5)}</td><td>{_fmt(t['accuracy_drop'], 2)}</td><td>{_fmt(t['latency_ms'], 3)}</td>"
            f"<td>{_fmt(t.get('seconds'), 1)}</td><td class=l>{html.escape(t['budget'])}</td>"
            f"<td class='l{'' if t['held'] else ' bad'}'>{html.escape(verdict)}</td></tr>"
        )
    untried = found.get("not_tried") or []
    rest = f"<p>Not tried (a cheaper candidate held): {html.escape(', '.join(untried))}.</p>" if untried else ""
    return (
        f"<h2>Budget search for {html.escape(target)} ({html.escape(str(found.get('budget')))})</h2>"
        f"<p class='search-reason'>{html.escape(found['reason'])}</p>"
        + chart(rows, use_accuracy, winner)
        + "<table class='search'>"
        + "".join(out)
        + "</table>"
        + rest
    )


def _fmt(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


CHART_CSS = (
    "svg.chart text{font-size:12px;fill:#222}svg.chart .tick{font-size:11px;fill:#555}"
    "svg.chart .grid{stroke:#e4e4e4}svg.chart .axis{stroke:#444}"
    "table.legend td{font-size:13px}table.legend td.n{font-weight:bold}"
)
_W, _H = 760, 420
_LEFT, _RIGHT, _TOP, _BOTTOM = 78, 24, 20, 58
_PAD = 14  # room between the frame and the data range, so a point at cosine 1.0 is not on the frame


@dataclass
class _Point:
    number: int
    target: str
    precision: str
    size_mb: float
    y: float
    latency_ms: float | None
    failed: str | None
    x_px: float = 0.0
    y_px: float = 0.0
    front: bool = False
    winner: bool = False


def chart(rows: list[dict[str, Any]], use_accuracy: bool, winner: dict[str, str] | None = None) -> str:
    """An SVG of every measured variant, size (x, MB, log scale) against accuracy (%) or the worst
    held-out sample's cosine to the fp32 source (y), with ticks on both axes; the Pareto front
    (no other variant is both smaller and better) joined by a dashed line, the winner starred,
    variants that failed the quality gate crossed out. Points carry numbers, placed so that no two
    labels overlap (with a leader line when a label had to move away), keyed by a table below.

    ``winner`` (``{"target", "precision"}``) is the variant a search chose; without one, the
    smallest variant that passed the quality gate is starred.
    """
    points: list[_Point] = []
    for r in rows:
        m = r["metrics"]
        y = m.get("accuracy") if use_accuracy else m.get("cosine_min")
        if y is None or not m.get("size_bytes") or not math.isfinite(y):
            continue
        y = 100.0 * y if use_accuracy else y
        points.append(
            _Point(len(points) + 1, r["target"], r["precision"], m["size_bytes"] / 1e6, float(y),
                   m.get("latency_median_ms"), r.get("error"))
        )  # fmt: skip
    if not points:
        return "<p>No variant could be measured on this host.</p>"
    ylabel = "accuracy on held-out data (%)" if use_accuracy else "worst held-out sample's cosine to fp32 (unitless)"
    _mark(points, winner)
    xs = [math.log10(p.size_mb) for p in points]
    x_ticks, (x0, x1) = _log_ticks(min(xs), max(xs))
    y_ticks, (y0, y1) = _linear_ticks(
        min(p.y for p in points), max(p.y for p in points), 100.0 if use_accuracy else 1.0
    )
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def px(x: float) -> float:
        return _LEFT + _PAD + (x - x0) / (x1 - x0) * (plot_w - 2 * _PAD)

    def py(y: float) -> float:
        return _TOP + _PAD + (y1 - y) / (y1 - y0) * (plot_h - 2 * _PAD)

    for p, x in zip(points, xs):
        p.x_px, p.y_px = px(x), py(p.y)
    out = [
        f"<svg class='chart' width='{_W}' height='{_H}' viewBox='0 0 {_W} {_H}' role='img' "
        f"aria-label='{html.escape(ylabel)} against size in MB'>"
    ]
    for value in x_ticks:
        at = px(math.log10(value))
        out.append(f"<line class='grid' x1='{at:.1f}' y1='{_TOP}' x2='{at:.1f}' y2='{_TOP + plot_h}'/>")
        out.append(
            f"<text class='tick x-tick' x='{at:.1f}' y='{_TOP + plot_h + 16}' text-anchor='middle'>{_mb(value)}</text>"
        )
    for value in y_ticks:
        at = py(value)
        out.append(f"<line class='grid' x1='{_LEFT}' y1='{at:.1f}' x2='{_LEFT + plot_w}' y2='{at:.1f}'/>")
        out.append(
            f"<text class='tick y-tick' x='{_LEFT - 6}' y='{at + 4:.1f}' text-anchor='end'>{_num(value, y_ticks)}</text>"
        )
    out.append(f"<line class='axis' x1='{_LEFT}' y1='{_TOP + plot_h}' x2='{_LEFT + plot_w}' y2='{_TOP + plot_h}'/>")
    out.append(f"<line class='axis' x1='{_LEFT}' y1='{_TOP}' x2='{_LEFT}' y2='{_TOP + plot_h}'/>")
    out.append(
        f"<text class='axis-label' x='{_LEFT + plot_w / 2}' y='{_H - 14}' text-anchor='middle'>"
        "artifact size (MB, log scale)</text>"
    )
    mid = _TOP + plot_h / 2
    out.append(
        f"<text class='axis-label' x='16' y='{mid}' transform='rotate(-90 16 {mid})' text-anchor='middle'>"
        f"{html.escape(ylabel)}</text>"
    )
    front = sorted((p for p in points if p.front), key=lambda p: (p.size_mb, -p.y))
    if len(front) > 1:
        steps = [f"{front[0].x_px:.1f},{front[0].y_px:.1f}"]
        for a, b in itertools.pairwise(front):  # a staircase: nothing smaller reaches higher
            steps += [f"{b.x_px:.1f},{a.y_px:.1f}", f"{b.x_px:.1f},{b.y_px:.1f}"]
        out.append(
            f"<polyline class='front' points='{' '.join(steps)}' fill='none' stroke='#2a9d8f' "
            "stroke-width='1.5' stroke-dasharray='5 3'/>"
        )
    for p in points:
        out.append(_marker(p, ylabel))
    out += _labels(points, plot_w, plot_h)
    out.append("</svg>")
    return "".join(out) + _legend(points, use_accuracy)


def _mark(points: list[_Point], winner: dict[str, str] | None) -> None:
    for p in points:
        p.front = not any(
            q is not p and q.size_mb <= p.size_mb and q.y >= p.y and (q.size_mb < p.size_mb or q.y > p.y)
            for q in points
        )
    if winner is not None:
        chosen = [p for p in points if p.target == winner.get("target") and p.precision == winner.get("precision")]
    else:
        passed = [p for p in points if p.failed is None]
        chosen = sorted(passed, key=lambda p: (p.size_mb, -p.y))[:1]
    for p in chosen:
        p.winner = True


def _marker(p: _Point, ylabel: str) -> str:
    latency = "-" if p.latency_ms is None else f"{p.latency_ms:.3f} ms"
    tip = html.escape(
        f"#{p.number} {p.target} {p.precision}: {p.size_mb:.4g} MB, {ylabel} {p.y:.5g}, latency {latency}"
        + (f"; FAILED: {p.failed}" if p.failed else "")
    )
    x, y = p.x_px, p.y_px
    if p.failed:
        return (
            f"<g class='point failed'><title>{tip}</title><path d='M{x - 5:.1f},{y - 5:.1f}L{x + 5:.1f},{y + 5:.1f}"
            f"M{x - 5:.1f},{y + 5:.1f}L{x + 5:.1f},{y - 5:.1f}' stroke='#c0392b' stroke-width='2.5'/></g>"
        )
    if p.winner:
        star = " ".join(
            f"{x + r * math.sin(k * math.pi / 5):.1f},{y - r * math.cos(k * math.pi / 5):.1f}"
            for k, r in zip(range(10), [10, 4.2] * 5)
        )
        return f"<g class='point winner'><title>{tip}</title><polygon points='{star}' fill='#f4a261' stroke='#7a4a16'/></g>"
    fill = "#2a9d8f" if p.front else "#ffffff"
    return (
        f"<g class='point'><title>{tip}</title><circle cx='{x:.1f}' cy='{y:.1f}' r='5' fill='{fill}' "
        "stroke='#1d6f65' stroke-width='1.5'/></g>"
    )


def _labels(points: list[_Point], plot_w: float, plot_h: float) -> list[str]:
    """Number labels placed greedily: the first free spot on rings around the point, clear of
    other labels and markers and inside the plot; a leader line when the label sits away from it."""
    placed: list[tuple[float, float, float, float]] = []
    markers = [(p.x_px - 6, p.y_px - 6, p.x_px + 6, p.y_px + 6) for p in points]
    bounds = (_LEFT + 2, _TOP, _LEFT + plot_w, _TOP + plot_h - 2)
    out = []
    directions = [(1, -1), (1, 1), (-1, -1), (-1, 1), (1, 0), (-1, 0), (0, -1), (0, 1)]
    for p in sorted(points, key=lambda q: (q.x_px, q.y_px)):
        text = str(p.number)
        w, h = 7.5 * len(text) + 4, 15.0
        spot = None
        for ring in (11, 22, 34, 48, 64, 82, 104):
            for dx, dy in directions:
                cx, cy = p.x_px + dx * ring, p.y_px + dy * ring
                box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
                if _inside(box, bounds) and not any(_overlap(box, b) for b in placed + markers):
                    spot = (cx, cy, box, ring)
                    break
            if spot:
                break
        if spot is None:  # crowded beyond the rings: stack it at the top right, still apart
            cx, cy = _LEFT + plot_w - w, _TOP + h * (1 + len(placed))
            spot = (cx, cy, (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), 999)
        cx, cy, box, ring = spot
        placed.append(box)
        if ring > 11:
            out.append(
                f"<line class='leader' x1='{p.x_px:.1f}' y1='{p.y_px:.1f}' x2='{cx:.1f}' y2='{cy:.1f}' "
                "stroke='#999' stroke-width='0.8'/>"
            )
            out.append(
                f"<rect x='{box[0]:.1f}' y='{box[1]:.1f}' width='{w:.1f}' height='{h:.1f}' fill='white' "
                "fill-opacity='0.85'/>"
            )
        out.append(
            f"<text class='point-label' data-n='{p.number}' x='{cx:.1f}' y='{cy + 4:.1f}' text-anchor='middle' "
            f"font-weight='bold'>{text}</text>"
        )
    return out


def _inside(box: tuple[float, float, float, float], bounds: tuple[float, float, float, float]) -> bool:
    return box[0] >= bounds[0] and box[1] >= bounds[1] and box[2] <= bounds[2] and box[3] <= bounds[3]


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _legend(points: list[_Point], use_accuracy: bool) -> str:
    head = (
        "<table class='legend'><tr><th>#</th><th>target</th><th>precision</th><th>size MB</th>"
        f"<th>{'accuracy %' if use_accuracy else 'cosine (worst sample)'}</th><th>latency ms</th><th>on the chart</th></tr>"
    )
    rows = []
    for p in points:
        what = []
        if p.winner:
            what.append("★ winner")
        if p.front:
            what.append("Pareto front")
        if p.failed:
            what.append("✗ failed: " + p.failed)
        latency = "-" if p.latency_ms is None else f"{p.latency_ms:.3f}"
        rows.append(
            f"<tr><td class='n'>{p.number}</td><td class=l>{html.escape(p.target)}</td>"
            f"<td class=l>{html.escape(p.precision)}</td><td>{p.size_mb:.4g}</td><td>{p.y:.5g}</td>"
            f"<td>{latency}</td><td class=l>{html.escape('; '.join(what))}</td></tr>"
        )
    note = (
        "<p>Dashed line: the Pareto front (no other variant is both smaller and better). ★: the winner "
        "(a search's choice, else the smallest variant that passed the quality gate). ✗: failed.</p>"
    )
    return note + head + "".join(rows) + "</table>"


def _log_ticks(lo: float, hi: float) -> tuple[list[float], tuple[float, float]]:
    """Ticks at 1-2-5 steps (or every digit when the range is narrow) covering log10 range lo..hi."""
    if hi - lo < 0.3:
        lo, hi = lo - 0.15, hi + 0.15
    lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)
    steps = (1, 2, 5) if hi - lo > 1.2 else (1, 2, 3, 4, 5, 6, 7, 8, 9)
    # Reach out to the nearest tick on each side, so both ends of the data carry a value.
    below = max((math.log10(m * 10.0**e) for e in range(math.floor(lo) - 1, math.ceil(lo) + 1) for m in steps
                 if math.log10(m * 10.0**e) <= lo), default=lo)  # fmt: skip
    above = min((math.log10(m * 10.0**e) for e in range(math.floor(hi) - 1, math.ceil(hi) + 2) for m in steps
                 if math.log10(m * 10.0**e) >= hi), default=hi)  # fmt: skip
    lo, hi = max(below, lo - 0.3), min(above, hi + 0.3)
    ticks = [
        m * 10.0**e
        for e in range(math.floor(lo) - 1, math.ceil(hi) + 1)
        for m in steps
        if lo <= math.log10(m * 10.0**e) <= hi
    ]
    if hi - lo > 3:  # a wide range: decades only
        ticks = [t for t in ticks if f"{t:.0e}".startswith("1")]
    return ticks, (lo, hi)


def _linear_ticks(lo: float, hi: float, cap: float) -> tuple[list[float], tuple[float, float]]:
    """About five ticks at a 1-2-5 step covering lo..hi (padded; at most ``cap`` on top)."""
    span = hi - lo
    if span < 1e-9:
        span = max(abs(hi) * 1e-3, 1e-6)
        lo, hi = lo - span, hi + span
        span = hi - lo
    raw = span / 5
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    start, stop = math.floor(lo / step) * step, math.ceil(hi / step) * step
    if stop > cap >= hi:
        stop = cap
    if start == lo:
        start -= step
    if stop == hi and stop < cap:
        stop += step
    count = round((stop - start) / step)
    return [start + i * step for i in range(count + 1)], (start, stop)


def _mb(value: float) -> str:
    return f"{value:g}" if value >= 1e-3 else f"{value:.0e}"


def _num(value: float, ticks: list[float]) -> str:
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    digits = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{value:.{digits}f}"
