"""The compile report's chart in a real browser (Debian's chromium, headless, driven by Playwright):
ticks and units on both axes, the Pareto front and the winner marked, and no label overlapping
another. ``EDGESHIP_SCREENSHOTS=1`` writes the chart to ``docs/images/compile-report-chart.png``.

The report is synthetic (no compile needed to test drawing): eight variants, three of them at the
same size and nearly the same cosine, as fp32 variants of one model for several targets are.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeship.compiler import report as reports
from edgeship.compiler.validate import Metrics

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "compile-report-chart.png"

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is missing: 'apt-get install chromium' (make test does)"
)


def variant(target: str, precision: str, size: int, cosine: float, latency: float | None, error: str | None = None):
    metrics = Metrics(
        samples=128, backend="test", size_bytes=size, weight_bytes=size, cosine_min=cosine, latency_median_ms=latency
    ).to_json()
    return {"target": target, "precision": precision, "metrics": metrics, "error": error, "notes": []}


def report(variants: list[dict[str, Any]], winner: dict[str, str] | None = None) -> dict[str, Any]:
    out = {"name": "minilm", "version": 3, "source_sha256": "ab" * 32, "calibration_samples": 256}
    out.update(held_out_samples=128, variants=variants)
    if winner:
        out["winner"] = winner
    return out


VARIANTS = [
    variant("android-arm64", "fp32", 90_900_000, 0.99999994, 28.4),
    variant("linux-x86_64", "fp32", 90_950_000, 0.99999990, 34.9),
    variant("jetson-orin-nano", "fp16", 90_960_000, 0.99999980, None),
    variant("android-arm64", "int8-dynamic", 23_700_000, 0.9973, 9.9),
    variant("linux-x86_64", "int8-dynamic", 22_800_000, 0.9913, 15.7),
    variant("android-arm64", "int8-weight-only", 23_900_000, 0.9994, 27.0),
    variant("linux-x86_64", "int8-qdq", 23_100_000, 0.93, 40.1, error="quality gate: held-out cosine 0.9300"),
    variant("ios17", "fp16", 45_500_000, 0.999999, None),
]


@pytest.fixture(scope="module")
def page() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield browser.new_page(viewport={"width": 900, "height": 1100})
        finally:
            browser.close()


def boxes(page: Any, selector: str) -> list[dict[str, float]]:
    return page.evaluate(
        """sel => [...document.querySelectorAll(sel)].map(e => {
            const r = e.getBoundingClientRect();
            return {x: r.left, y: r.top, right: r.right, bottom: r.bottom, text: e.textContent};
        })""",
        selector,
    )


def overlaps(a: dict[str, float], b: dict[str, float]) -> bool:
    return a["x"] < b["right"] and b["x"] < a["right"] and a["y"] < b["bottom"] and b["y"] < a["bottom"]


def render(page: Any, tmp_path: Path, data: dict[str, Any]) -> None:
    path = tmp_path / "report.html"
    reports.write_html(path, data)
    page.goto(path.as_uri())


def test_labels_and_ticks_never_overlap_and_every_point_is_keyed(page, tmp_path):
    render(page, tmp_path, report(VARIANTS))
    labels = boxes(page, "svg.chart text.point-label")
    ticks = boxes(page, "svg.chart text.tick")
    assert sorted(int(b["text"]) for b in labels) == list(range(1, len(VARIANTS) + 1))
    texts = labels + ticks
    clashes = [(a["text"], b["text"]) for i, a in enumerate(texts) for b in texts[i + 1 :] if overlaps(a, b)]
    assert clashes == []
    chart = boxes(page, "svg.chart")[0]
    for b in labels:  # inside the drawing
        assert chart["x"] <= b["x"] and b["right"] <= chart["right"] and chart["y"] <= b["y"]
    legend = page.evaluate("[...document.querySelectorAll('table.legend tr')].map(r => r.innerText)")
    assert len(legend) == len(VARIANTS) + 1 and "Pareto front" in " ".join(legend)
    if os.environ.get("EDGESHIP_SCREENSHOTS"):
        page.locator("svg.chart").screenshot(path=str(SCREENSHOT))


def test_axes_carry_ticks_and_units(page, tmp_path):
    render(page, tmp_path, report(VARIANTS))
    x_ticks = [b["text"] for b in sorted(boxes(page, "svg.chart text.x-tick"), key=lambda b: b["x"])]
    y_ticks = [float(b["text"]) for b in sorted(boxes(page, "svg.chart text.y-tick"), key=lambda b: b["y"])]
    assert len(x_ticks) >= 2 and len(y_ticks) >= 3 and y_ticks == sorted(y_ticks, reverse=True)  # up is better
    assert x_ticks[0] == "20" and x_ticks[-1] == "100"  # MB; the axis reaches a tick beyond each end of 22..91 MB
    assert [float(t) for t in x_ticks] == sorted(float(t) for t in x_ticks)
    axes = " ".join(
        page.evaluate("[...document.querySelectorAll('svg.chart text.axis-label')].map(t => t.textContent)")
    )
    assert "size (MB, log scale)" in axes and "cosine to fp32" in axes
    # A point sits where the ticks say: the 45.5 MB variant between the 40 and 50 MB ticks, log-spaced.
    xs = {b["text"]: (b["x"] + b["right"]) / 2 for b in boxes(page, "svg.chart text.x-tick")}
    point = page.evaluate(
        "(() => { const r = document.querySelectorAll('svg.chart .point')[7].getBoundingClientRect(); return (r.left + r.right) / 2; })()"
    )
    expected = xs["40"] + (xs["50"] - xs["40"]) * (math.log10(45.5) - math.log10(40)) / (
        math.log10(50) - math.log10(40)
    )
    assert point == pytest.approx(expected, abs=2)


def test_front_winner_and_failed_variants_are_marked(page, tmp_path):
    render(page, tmp_path, report(VARIANTS))
    assert page.locator("svg.chart polyline.front").count() == 1
    assert page.locator("svg.chart .point.winner").count() == 1
    assert page.locator("svg.chart .point.failed").count() == 1
    rows = page.evaluate("[...document.querySelectorAll('table.legend tr')].map(r => r.innerText)")
    winner = next(r for r in rows if "winner" in r)
    assert "linux-x86_64" in winner and "int8-dynamic" in winner  # the smallest that passed the gate
    # A search's choice, when the report names one, is the winner instead.
    render(page, tmp_path, report(VARIANTS, winner={"target": "android-arm64", "precision": "int8-weight-only"}))
    rows = page.evaluate("[...document.querySelectorAll('table.legend tr')].map(r => r.innerText)")
    assert "int8-weight-only" in next(r for r in rows if "winner" in r)


def test_many_coinciding_variants_still_get_apart_labels(page, tmp_path):
    crowd = [variant(f"target-{i}", "fp32", 5_000_000 + i, 1.0 - i * 1e-9, 1.0) for i in range(14)]
    render(page, tmp_path, report(crowd))
    labels = boxes(page, "svg.chart text.point-label")
    assert len(labels) == 14
    assert [(a["text"], b["text"]) for i, a in enumerate(labels) for b in labels[i + 1 :] if overlaps(a, b)] == []
