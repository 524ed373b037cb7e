/* edgechart: SVG line charts from JSON embedded in the page (edgeship fleet dashboard; no dependencies).
 *
 * Every <figure class="chart"> holding <script type="application/json" class="chart-data"> with
 * {"title", "unit", "series": [{"name", "points": [[epoch_s, value], ...]}]} gets an <svg class="edgechart">:
 * one polyline and one circle per point per series, y grid with labels, first/last time (UTC) on x,
 * a legend, and a native tooltip (<title>) on each point.
 */
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706"];
  var W = 480, H = 190, L = 52, R = 10, T = 10, B = 38;

  function el(name, attrs, parent, text) {
    var node = document.createElementNS(NS, name);
    Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }

  function fmt(v) {
    var a = Math.abs(v);
    if (a >= 1000) return v.toFixed(0);
    if (a >= 10) return v.toFixed(1).replace(/\.0$/, "");
    if (a >= 1) return v.toFixed(2).replace(/\.?0+$/, "");
    return a === 0 ? "0" : v.toPrecision(2);
  }

  function clock(t) { return new Date(t * 1000).toISOString().slice(5, 16).replace("T", " "); }

  function draw(figure) {
    var holder = figure.querySelector("script.chart-data");
    if (!holder) return;
    var chart = JSON.parse(holder.textContent);
    var all = [];
    chart.series.forEach(function (s) { s.points.forEach(function (p) { all.push(p); }); });
    if (!all.length) {
      var empty = document.createElement("p");
      empty.className = "muted";
      empty.textContent = "no data";
      figure.appendChild(empty);
      return;
    }
    var xs = all.map(function (p) { return p[0]; }), ys = all.map(function (p) { return p[1]; });
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
    var y0 = Math.min(0, Math.min.apply(null, ys)), y1 = Math.max.apply(null, ys);
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    if (y1 === y0) { y1 = y0 + 1; }
    y1 += (y1 - y0) * 0.08;
    function sx(x) { return L + (x - x0) / (x1 - x0) * (W - L - R); }
    function sy(y) { return H - B - (y - y0) / (y1 - y0) * (H - T - B); }

    var svg = el("svg", { viewBox: "0 0 " + W + " " + H, "class": "edgechart", role: "img",
                          "aria-label": chart.title, "data-points": String(all.length) });
    for (var i = 0; i <= 3; i++) {
      var v = y0 + (y1 - y0) * i / 3, y = sy(v).toFixed(1);
      el("line", { x1: L, x2: W - R, y1: y, y2: y, "class": "grid" }, svg);
      el("text", { x: L - 6, y: y, "class": "ylabel", "text-anchor": "end", "dominant-baseline": "middle" }, svg, fmt(v));
    }
    el("text", { x: L, y: H - B + 14, "class": "xlabel", "text-anchor": "start" }, svg, clock(x0));
    el("text", { x: W - R, y: H - B + 14, "class": "xlabel", "text-anchor": "end" }, svg, clock(x1) + " UTC");

    chart.series.forEach(function (s, k) {
      var color = COLORS[k % COLORS.length];
      var g = el("g", { "class": "series", "data-name": s.name }, svg);
      el("polyline", { points: s.points.map(function (p) { return sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1); }).join(" "),
                       fill: "none", stroke: color, "stroke-width": 1.5 }, g);
      s.points.forEach(function (p) {
        var c = el("circle", { cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: 2, fill: color, "class": "pt" }, g);
        el("title", {}, c, s.name + " " + fmt(p[1]) + (chart.unit ? " " + chart.unit : "") + " at " + clock(p[0]));
      });
      var lx = L + k * 110;
      el("rect", { x: lx, y: H - 14, width: 10, height: 10, fill: color }, svg);
      el("text", { x: lx + 14, y: H - 5, "class": "legend" }, svg, s.name);
    });
    figure.appendChild(svg);
  }

  document.querySelectorAll("figure.chart").forEach(draw);
})();
