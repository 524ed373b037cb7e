"""The compile report: JSON for machines, one HTML page with a chart for people.

The chart plots every variant by size (x, log scale) against accuracy, or cosine to the fp32
source when there are no labels (y); the bubble area grows with host latency.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2, sort_keys=True, default=str), "utf-8")


def write_html(path: Path, report: dict[str, Any]) -> None:
    rows = report["variants"]
    use_accuracy = any(r["metrics"].get("accuracy") is not None for r in rows)
    ylabel = "accuracy" if use_accuracy else "cosine vs fp32"
    points = []
    for r in rows:
        m = r["metrics"]
        y = m.get("accuracy") if use_accuracy else m.get("cosine_mean")
        if y is None or not m.get("size_bytes"):
            continue
        points.append((r["target"], r["precision"], m["size_bytes"], float(y), m.get("latency_median_ms")))
    body = [
        f"<h1>edgeship compile report: {html.escape(str(report['name']))} v{report['version']}</h1>",
        f"<p>source sha256 {html.escape(str(report['source_sha256']))[:16]}…, "
        f"{report['calibration_samples']} calibration and {report['held_out_samples']} held-out samples.</p>",
        _chart(points, ylabel),
        _table(rows),
    ]
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>edgeship report</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
        "td.l{text-align:left}.bad{color:#b00}</style></head><body>" + "\n".join(body) + "</body></html>"
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


def _fmt(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _chart(points: list[tuple[str, str, int, float, float | None]], ylabel: str) -> str:
    if not points:
        return "<p>No variant could be measured on this host.</p>"
    w, h, pad = 720, 360, 60
    xs = [math.log10(p[2]) for p in points]
    ys = [p[3] for p in points]
    x0, x1 = min(xs) - 0.1, max(xs) + 0.1
    y0, y1 = min(ys) - 0.01, max(ys) + 0.01
    lat = [p[4] or 0.0 for p in points]
    top = max(lat) or 1.0
    parts = [f"<svg width='{w}' height='{h}' role='img' aria-label='{html.escape(ylabel)} against size'>"]
    parts.append(f"<line x1='{pad}' y1='{h - pad}' x2='{w - 10}' y2='{h - pad}' stroke='#444'/>")
    parts.append(f"<line x1='{pad}' y1='10' x2='{pad}' y2='{h - pad}' stroke='#444'/>")
    parts.append(f"<text x='{w / 2}' y='{h - 15}' text-anchor='middle'>size (bytes, log scale)</text>")
    parts.append(
        f"<text x='15' y='{h / 2}' transform='rotate(-90 15 {h / 2})' text-anchor='middle'>{html.escape(ylabel)}</text>"
    )
    for (target, precision, size, y, latency), x in zip(points, xs):
        cx = pad + (x - x0) / (x1 - x0) * (w - pad - 20)
        cy = h - pad - (y - y0) / (y1 - y0) * (h - pad - 20)
        r = 5 + 15 * math.sqrt((latency or 0.0) / top)
        label = f"{target} {precision}"
        tip = f"{label}: {size} bytes, {ylabel} {y:.4f}, latency {latency if latency is not None else '-'} ms"
        parts.append(
            f"<circle cx='{cx:.1f}' cy='{cy:.1f}' r='{r:.1f}' fill='#3a7bd5' fill-opacity='0.5'><title>{html.escape(tip)}</title></circle>"
        )
        parts.append(f"<text x='{cx + r + 3:.1f}' y='{cy + 4:.1f}' font-size='11'>{html.escape(label)}</text>")
    parts.append("</svg><p>Bubble area grows with host latency (median).</p>")
    return "".join(parts)
