#!/usr/bin/env python3
"""Render the Vigil Grafana dashboard to a PNG from a live Prometheus, without Grafana.

Reads dashboards/vigil.json, runs every panel target against Prometheus (range targets
through /api/v1/query_range, instant ones through /api/v1/query at the end of the range,
as Grafana does) and draws the panels roughly as Grafana would, on its 24-column grid
(gridPos), in a dark Grafana-like theme:
  * timeseries: lines (fill, dashes, right axis from the panel's overrides) or stacked
    bars, axes formatted with the panel's unit, legend below, threshold lines/areas;
  * stat: big numbers colored by the thresholds, with their names;
  * heatmap: the per-bucket counts of a `le` histogram (cumulative buckets made per-bucket,
    as Grafana's heatmap format does), Oranges, square-root color scale;
  * table: instant results merged on their labels, with the panel's organize/rename;
  * rows: section headers.
Panels whose queries return nothing show "No data", as Grafana does.

Template variables are substituted with tests/promql_exprs.py's own functions: `$namespace`,
`$pod`, `$region` default to the dashboard's current value (All, i.e. the allValue `.*`);
`--var NAME=VALUE` picks values; `--discover` uses the values Prometheus has instead.
`$__rate_interval` is --rate-interval (default 30s: the demo scrapes every second and lasts
minutes, Grafana's 4 x scrape interval would be 4s). Counter `increase(...)` bar panels and
heatmaps are evaluated with a step equal to the rate interval, so that bars do not overlap
and every event is counted once; line panels use --step (default: range / 240).

Example (against the demo, scripts/demo.sh with VIGIL_DEMO_KEEP=1):
  target/pyenv/bin/python scripts/render-dashboard.py --url http://127.0.0.1:9090 \\
      --range 10m --rate-interval 30s -o docs/dashboard.png
"""

import argparse
import datetime as dt
import json
import math
import os
import re
import sys
import time
import types
import urllib.error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import promql_exprs as pq  # noqa: E402  (extraction, variable substitution, the API call)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import colors as mcolors  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import FancyBboxPatch, Rectangle  # noqa: E402
from matplotlib.ticker import Locator, MaxNLocator  # noqa: E402

# ----------------------------------------------------------------------------- theme

BG = "#111217"
PANEL = "#181b1f"
BORDER = "#2a2c33"
TEXT = "#ccccdc"
TEXT_DIM = "#8e8e9c"
GRID = "#26282e"
NAMED = {
    "green": "#73BF69", "light-green": "#96D98D", "dark-green": "#37872D",
    "red": "#F2495C", "light-red": "#FF7383", "dark-red": "#C4162A",
    "orange": "#FF9830", "dark-orange": "#FF780A", "light-orange": "#FFB357",
    "yellow": "#FADE2A", "blue": "#5794F2", "purple": "#B877D9", "text": TEXT,
}
PALETTE = ["#73BF69", "#F2CC0C", "#8AB8FF", "#FF780A", "#F2495C", "#5794F2", "#B877D9",
           "#705DA0", "#37872D", "#FADE2A", "#447EBC", "#C15C17", "#890F02", "#0A437C"]
DPI = 100


def color(c):
    if not c:
        return None
    return NAMED.get(c, c)


def pt(px):
    """Font size in points for a size in pixels at DPI."""
    return px * 72.0 / DPI


# ----------------------------------------------------------------------------- units

SI = [(1e12, " T"), (1e9, " B"), (1e6, " Mil"), (1e3, " K")]


def num(v, decimals=None):
    if decimals is None:
        a = abs(v)
        decimals = 0 if a >= 100 or v == int(v) else 1 if a >= 10 else 2 if a >= 1 else 3
    s = f"{v:.{decimals}f}"
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def scale_for(unit, mag):
    """(divisor, suffix) used to format values of magnitude `mag` in `unit`."""
    mag = abs(mag)
    if unit == "percentunit":
        return 0.01, "%"
    if unit == "percent":
        return 1, "%"
    if unit == "bytes":
        for i, suf in reversed(list(enumerate(["B", "KiB", "MiB", "GiB", "TiB", "PiB"]))):
            if mag >= 1024 ** i:
                return 1024 ** i, " " + suf
        return 1, " B"
    if unit == "s":
        if mag == 0:
            return 1, " s"
        for d, suf in ((3600, " hour"), (60, " min"), (1, " s"), (1e-3, " ms"), (1e-6, " µs")):
            if mag >= d:
                return d, suf
        return 1e-9, " ns"
    suffix = {"ops": " ops/s", "reqps": " req/s"}.get(unit, "")
    for d, suf in SI:
        if mag >= d:
            return d, suf + suffix
    return 1, suffix


def fmt(v, unit, decimals=None):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "NaN" if v is not None else "-"
    if isinstance(v, float) and math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    d, suf = scale_for(unit, v)
    return num(v / d, decimals) + suf


class UnitLocator(Locator):
    """Nice ticks in the unit's scaled space (e.g. whole GiB, whole ms)."""

    def __init__(self, unit, nbins=4):
        self.unit, self.nbins = unit, nbins

    def __call__(self):
        lo, hi = self.axis.get_view_interval()
        return self.tick_values(lo, hi)

    def tick_values(self, lo, hi):
        d, _ = scale_for(self.unit, max(abs(lo), abs(hi)))
        if self.unit == "bytes" and d > 1:
            steps = [1, 2, 4, 5, 8, 10]
        else:
            steps = [1, 2, 2.5, 5, 10]
        loc = MaxNLocator(nbins=self.nbins, steps=steps)
        return [t * d for t in loc.tick_values(lo / d, hi / d)]


def axis_formatter(unit):
    """Each tick formatted on its own, as Grafana does (0 s, 500 ms, 1 s)."""
    return matplotlib.ticker.FuncFormatter(lambda v, _pos: fmt(v, unit, None if v else 0))


# ----------------------------------------------------------------------------- queries


def legend_name(fmt_str, metric, expr):
    if fmt_str and fmt_str != "__auto":
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt_str).strip()
    name = metric.get("__name__", "")
    labels = ", ".join(f'{k}="{v}"' for k, v in sorted(metric.items()) if k != "__name__")
    return f"{name}{{{labels}}}" if labels or name else expr


def to_float(s):
    try:
        return float(s)
    except ValueError:
        return float("nan")


class Fetcher:
    def __init__(self, url, values, start, end):
        self.url, self.values, self.start, self.end = url, values, start, end
        self.errors = []

    def query(self, expr, instant, step):
        q, unknown = pq.substitute(expr, self.values)
        if unknown:
            self.errors.append(f"unresolved variables {unknown} in {expr}")
            return []
        try:
            if instant:
                r = pq.api(self.url, "/api/v1/query", {"query": q, "time": self.end})
            else:
                r = pq.api(self.url, "/api/v1/query_range",
                           {"query": q, "start": self.start, "end": self.end, "step": step})
        except (urllib.error.URLError, OSError) as e:
            raise SystemExit(f"cannot reach Prometheus at {self.url}: {e}")
        if r.get("status") != "success":
            self.errors.append(f"{r.get('errorType')}: {r.get('error')} in {q}")
            return []
        data = r["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "values": [data["result"]]}]
        out = []
        for s in data["result"]:
            vals = s.get("values") or ([s["value"]] if "value" in s else [])
            out.append({"metric": s["metric"], "values": vals})
        return out


def grid_series(raw, start, end, step):
    n = int(round((end - start) / step)) + 1
    xs = start + step * np.arange(n)
    ys = np.full(n, np.nan)
    for t, v in raw["values"]:
        i = int(round((float(t) - start) / step))
        if 0 <= i < n:
            ys[i] = to_float(v)
    return xs, ys


# ----------------------------------------------------------------------------- overrides


def props_for(panel, name):
    """fieldConfig properties for a series name: defaults, then matching overrides."""
    fc = panel.get("fieldConfig") or {}
    d = fc.get("defaults") or {}
    custom = dict(d.get("custom") or {})
    p = {"unit": d.get("unit"), "color": None, "custom": custom}
    for o in fc.get("overrides") or []:
        m = o.get("matcher") or {}
        opt = m.get("options")
        hit = (m.get("id") == "byName" and opt == name) or \
              (m.get("id") == "byRegexp" and opt is not None and re.fullmatch(opt, name) is not None)
        if not hit:
            continue
        for prop in o.get("properties") or []:
            pid, val = prop.get("id"), prop.get("value")
            if pid == "color" and isinstance(val, dict):
                p["color"] = color(val.get("fixedColor"))
            elif pid == "unit":
                p["unit"] = val
            elif pid.startswith("custom."):
                custom[pid[len("custom."):]] = val
    return p


def thresholds(panel):
    steps = (((panel.get("fieldConfig") or {}).get("defaults") or {}).get("thresholds") or {}).get("steps") or []
    return [(s.get("value"), color(s.get("color"))) for s in steps]


def threshold_color(panel, v):
    c = NAMED["green"]
    for val, col in thresholds(panel):
        if val is None or (v is not None and not math.isnan(v) and v >= val):
            c = col
    return c


# ----------------------------------------------------------------------------- canvas


class Canvas:
    """A figure addressed in pixels, origin top-left."""

    def __init__(self, w, h):
        self.w, self.h = w, h
        self.fig = plt.figure(figsize=(w / DPI, h / DPI), dpi=DPI, facecolor=BG)

    def rect(self, x, y, w, h):  # figure fraction rect for add_axes
        return [x / self.w, 1 - (y + h) / self.h, w / self.w, h / self.h]

    def text(self, x, y, s, size=13, c=TEXT, **kw):
        kw.setdefault("va", "center")
        return self.fig.text(x / self.w, 1 - y / self.h, s, fontsize=pt(size), color=c, **kw)

    def box(self, x, y, w, h, fc=PANEL, ec=BORDER, r=3):
        self.fig.patches.append(FancyBboxPatch(
            (x / self.w, 1 - (y + h) / self.h), w / self.w, h / self.h,
            boxstyle=f"round,pad=0,rounding_size={r / self.w}", transform=self.fig.transFigure,
            facecolor=fc, edgecolor=ec, linewidth=1, zorder=-5))

    def line(self, x0, y0, x1, y1, c, lw=1.5, ls="-"):
        self.fig.lines.append(Line2D([x0 / self.w, x1 / self.w], [1 - y0 / self.h, 1 - y1 / self.h],
                                     transform=self.fig.transFigure, color=c, linewidth=lw, linestyle=ls))

    def patch(self, x, y, w, h, fc):
        self.fig.patches.append(Rectangle((x / self.w, 1 - (y + h) / self.h), w / self.w, h / self.h,
                                          transform=self.fig.transFigure, facecolor=fc, edgecolor="none"))

    def no_data(self, x, y, w, h, msg="No data"):
        self.text(x + w / 2, y + h / 2, msg, size=14, c=TEXT_DIM, ha="center")


def text_px(s, size):
    """Rough rendered width of s in pixels (DejaVu Sans)."""
    return len(s) * size * 0.6


def style_axes(ax, unit, xlim, width_px, right=False):
    ax.set_facecolor("none")
    for s in ax.spines.values():
        s.set_visible(False)
    ax.tick_params(colors=TEXT_DIM, labelsize=pt(11), length=0, pad=4)
    ax.set_xlim(*xlim)
    ax.yaxis.set_major_locator(UnitLocator(unit, nbins=4))
    ax.yaxis.set_major_formatter(axis_formatter(unit))
    if right:
        ax.yaxis.tick_right()
        return
    ax.grid(True, color=GRID, linewidth=1)
    span = xlim[1] - xlim[0]
    want = max(2, int(width_px / 95))
    for iv in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400):
        if span / iv <= want:
            break
    first = math.ceil(xlim[0] / iv) * iv
    ticks = np.arange(first, xlim[1] + 1e-9, iv)
    ticks = ticks[(ticks - xlim[0] > 0.04 * span) & (xlim[1] - ticks > 0.02 * span)]  # clear of the y labels
    ax.set_xticks(ticks)
    tf = "%H:%M:%S" if iv < 60 else "%H:%M" if span <= 86400 else "%m/%d %H:%M"
    ax.set_xticklabels([dt.datetime.fromtimestamp(t).strftime(tf) for t in ticks])


def legend(cv, x, y, w, entries, size=11.5):
    """Grafana's list legend: colored dash + name, wrapping. Returns the height used."""
    cx, cy, row_h = x, y + 9, 18
    for name, col, dashed in entries:
        ew = 22 + text_px(name, size) + 16
        if cx > x and cx + ew > x + w:
            cx, cy = x, cy + row_h
        cv.line(cx, cy, cx + 14, cy, col, lw=3 if not dashed else 2, ls="--" if dashed else "-")
        cv.text(cx + 20, cy, name, size=size, c=TEXT)
        cx += ew
    return cy - y + 9


def legend_height(w, entries, size=11.5):
    cx, rows = 0, 1
    for name, _, _ in entries:
        ew = 22 + text_px(name, size) + 16
        if cx > 0 and cx + ew > w:
            cx, rows = 0, rows + 1
        cx += ew
    return rows * 18


# ----------------------------------------------------------------------------- panels


def is_bars(panel):
    return ((panel.get("fieldConfig") or {}).get("defaults") or {}).get("custom", {}).get("drawStyle") == "bars"


def draw_timeseries(cv, panel, box, f, args):
    x, y, w, h = box
    step = args.rate_s if is_bars(panel) else args.step_s
    series = []
    for t in panel.get("targets") or []:
        res = f.query(t["expr"], False, step)
        named = [(legend_name(t.get("legendFormat"), s["metric"], t["expr"]), s) for s in res]
        for name, s in sorted(named, key=lambda ns: ns[0]):
            xs, ys = grid_series(s, f.start, f.end, step)
            series.append((name, xs, ys))
    if not series or all(np.all(np.isnan(s[2])) for s in series):
        cv.no_data(x, y, w, h)
        return
    entries, plotted = [], []
    for i, (name, xs, ys) in enumerate(series):
        p = props_for(panel, name)
        col = p["color"] or PALETTE[i % len(PALETTE)]
        ls = p["custom"].get("lineStyle") or {}
        dashed = ls.get("fill") == "dash"
        right = p["custom"].get("axisPlacement") == "right"
        plotted.append((name, xs, ys, p, col, dashed, right))
        entries.append((name, col, dashed))
    has_right = any(pl[6] for pl in plotted)
    leg_h = legend_height(w - 16, entries)
    left_w = 62
    ax_box = (x + left_w, y + 36, w - left_w - (62 if has_right else 16), h - 36 - 24 - leg_h - 10)
    ax = cv.fig.add_axes(cv.rect(*ax_box))
    unit = ((panel.get("fieldConfig") or {}).get("defaults") or {}).get("unit") or "short"
    xlim = (f.start, f.end)
    ax2 = None
    if has_right:
        ax2 = ax.twinx()
        r_unit = next(pl[3]["unit"] for pl in plotted if pl[6]) or unit
    custom = ((panel.get("fieldConfig") or {}).get("defaults") or {}).get("custom") or {}
    stacking = (custom.get("stacking") or {}).get("mode", "none")
    if is_bars(panel):
        bottom = np.zeros_like(plotted[0][1])
        width = step * 0.72
        fill = custom.get("fillOpacity", 60) / 100
        for name, xs, ys, p, col, dashed, right in plotted:
            v = np.nan_to_num(ys)
            base = bottom if stacking == "normal" else 0
            mask = v > 0
            ax.bar(xs[mask] - step / 2, v[mask], width=width, bottom=(base[mask] if stacking == "normal" else 0),
                   color=mcolors.to_rgba(col, fill), edgecolor=col, linewidth=1, zorder=3)
            if stacking == "normal":
                bottom = bottom + v
        top = float(np.nanmax(bottom)) if stacking == "normal" else max(float(np.nanmax(np.nan_to_num(pl[2]))) for pl in plotted)
    else:
        top = 0.0
        for name, xs, ys, p, col, dashed, right in plotted:
            a = ax2 if right else ax
            lw = p["custom"].get("lineWidth", 1) * 1.4
            fill = p["custom"].get("fillOpacity", 0) / 100
            a.plot(xs, ys, color=col, linewidth=lw, linestyle=(0, (4, 3)) if dashed else "-", zorder=3)
            # Isolated points (a single sample between gaps) would be invisible as a line.
            iso = ~np.isnan(ys) & np.isnan(np.r_[np.nan, ys[:-1]]) & np.isnan(np.r_[ys[1:], np.nan])
            if iso.any():
                a.plot(xs[iso], ys[iso], "o", color=col, markersize=2.5, zorder=3)
            if fill > 0:
                a.fill_between(xs, ys, 0, where=~np.isnan(ys), color=col, alpha=fill, linewidth=0, zorder=2)
            if not right:
                top = max(top, float(np.nanmax(ys)) if not np.all(np.isnan(ys)) else 0)
    lo = 0.0
    vals = [pl[2] for pl in plotted if not pl[6] and not np.all(np.isnan(pl[2]))]
    if vals:
        lo = min(0.0, min(float(np.nanmin(v)) for v in vals))
    ax.set_ylim(lo, top * 1.08 if top > 0 else 1)
    # Thresholds (line+area): a dashed line at each step, the area above tinted.
    tstyle = (custom.get("thresholdsStyle") or {}).get("mode", "off")
    if tstyle != "off":
        steps = [s for s in thresholds(panel) if s[0] is not None]
        ymax = ax.get_ylim()[1]
        for i, (val, col) in enumerate(steps):
            nxt = steps[i + 1][0] if i + 1 < len(steps) else max(ymax, val) * 10
            if "area" in tstyle:
                ax.axhspan(val, nxt, color=col, alpha=0.09, linewidth=0, zorder=1)
            if "line" in tstyle:
                ax.axhline(val, color=col, linewidth=1.2, linestyle=(0, (5, 4)), zorder=2)
        ax.set_ylim(*ax.get_ylim())
    style_axes(ax, unit, xlim, ax_box[2])
    if ax2 is not None:
        rv = [pl[2] for pl in plotted if pl[6] and not np.all(np.isnan(pl[2]))]
        rtop = max((float(np.nanmax(v)) for v in rv), default=0)
        ax2.set_ylim(0, rtop * 1.08 if rtop > 0 else 1)
        style_axes(ax2, r_unit, xlim, ax_box[2], right=True)
    if is_bars(panel) and top <= 0:
        ax.text(0.5, 0.55, "no events in this time range", transform=ax.transAxes, ha="center", va="center",
                fontsize=pt(13), color=TEXT_DIM)
    legend(cv, x + 10, y + h - 8 - leg_h, w - 16, entries)


def draw_heatmap(cv, panel, box, f, args):
    x, y, w, h = box
    step = args.rate_s
    opts = panel.get("options") or {}
    yunit = (opts.get("yAxis") or {}).get("unit") or "short"
    rows = []
    for t in panel.get("targets") or []:
        for s in f.query(t["expr"], False, step):
            le = s["metric"].get("le")
            if le is None:
                continue
            xs, ys = grid_series(s, f.start, f.end, step)
            rows.append((to_float(le), xs, ys))
    if not rows:
        cv.no_data(x, y, w, h)
        return
    rows.sort(key=lambda r: r[0])
    xs = rows[0][1]
    cum = np.array([r[2] for r in rows])
    # Grafana's "heatmap" format: cumulative le buckets become per-bucket counts.
    per = cum.copy()
    per[1:] = cum[1:] - cum[:-1]
    per[per < 0] = 0
    thr = (opts.get("filterValues") or {}).get("le", 1e-9)
    shown = np.where(np.nan_to_num(per) > thr, per, np.nan)
    nz = np.where(np.any(~np.isnan(shown), axis=1))[0]
    if len(nz) == 0:
        cv.no_data(x, y, w, h, "No data (no events in the range)")
        return
    lo_i, hi_i = max(0, nz[0] - 1), min(len(rows) - 1, nz[-1] + 1)
    shown = shown[lo_i:hi_i + 1]
    les = [r[0] for r in rows[lo_i:hi_i + 1]]
    ax_box = (x + 62, y + 36, w - 62 - 16, h - 36 - 24 - 26)
    ax = cv.fig.add_axes(cv.rect(*ax_box))
    vmax = float(np.nanmax(shown))
    col = opts.get("color") or {}
    cmap = matplotlib.colormaps["Oranges_r" if not col.get("reverse") else "Oranges"]
    cmap = mcolors.LinearSegmentedColormap.from_list("g", cmap(np.linspace(0.0, 0.85, 64)))
    norm = mcolors.PowerNorm(gamma=col.get("exponent", 0.5) if col.get("scale") == "exponential" else 1,
                             vmin=0, vmax=vmax)
    xe = np.r_[xs - step, xs[-1]]
    ye = np.arange(len(les) + 1)
    ax.pcolormesh(xe, ye, np.ma.masked_invalid(shown), cmap=cmap, norm=norm,
                  edgecolors=PANEL, linewidth=opts.get("cellGap", 1) * 0.8)
    style_axes(ax, "short", (f.start, f.end), ax_box[2])
    every = max(1, math.ceil(len(les) / 7))
    ax.set_yticks(np.arange(len(les)) + 0.5)
    ax.set_yticklabels([fmt(le, yunit) if i % every == 0 else "" for i, le in enumerate(les)])
    ax.set_ylim(0, len(les))
    ax.grid(False)
    # The color scale, as Grafana's heatmap legend: min, gradient, max.
    lx, ly = x + 62, y + h - 16
    cv.text(lx, ly, "0", size=11, c=TEXT_DIM, ha="right")
    gx = cv.fig.add_axes(cv.rect(lx + 6, ly - 5, 120, 10))
    gx.imshow(np.linspace(0, 1, 128)[None, :], aspect="auto", cmap=cmap,
              norm=mcolors.PowerNorm(gamma=norm.gamma, vmin=0, vmax=1))
    gx.set_axis_off()
    cv.text(lx + 132, ly, num(vmax, 1), size=11, c=TEXT_DIM, ha="left")


def draw_stat(cv, panel, box, f, args):
    x, y, w, h = box
    unit = ((panel.get("fieldConfig") or {}).get("defaults") or {}).get("unit") or "short"
    items = []
    for t in panel.get("targets") or []:
        res = f.query(t["expr"], bool(t.get("instant")), args.step_s)
        for s in res:
            vals = [to_float(v) for _, v in s["values"]]
            nn = [v for v in vals if not math.isnan(v)]
            v = nn[-1] if nn else (vals[-1] if vals else None)  # lastNotNull
            items.append((legend_name(t.get("legendFormat"), s["metric"], t["expr"]), v))
    if not items:
        cv.no_data(x, y, w, h)
        return
    inner = (x + 8, y + 32, w - 16, h - 40)
    n = len(items)
    horizontal = inner[2] > inner[3]
    for i, (name, v) in enumerate(items):
        if horizontal:
            cw, ch = inner[2] / n, inner[3]
            cx, cy = inner[0] + i * cw, inner[1]
        else:
            cw, ch = inner[2], inner[3] / n
            cx, cy = inner[0], inner[1] + i * ch
        text = fmt(v, unit)
        vsize = min(ch * 0.45, (cw - 12) / (max(3, len(text)) * 0.72), 64)  # bold digits ~0.7 em
        nsize = max(11, min(16, vsize * 0.35))
        mid = cy + ch / 2
        cv.text(cx + cw / 2, mid - vsize * 0.5, name, size=nsize, c=TEXT, ha="center")
        cv.text(cx + cw / 2, mid + nsize * 0.4, text, size=vsize, c=threshold_color(panel, v),
                ha="center", weight="bold")


def draw_table(cv, panel, box, f, args):
    x, y, w, h = box
    fc = panel.get("fieldConfig") or {}
    unit = (fc.get("defaults") or {}).get("unit") or "short"
    rows, labels, value_cols = [], set(), []
    for t in panel.get("targets") or []:
        col = f"Value #{t.get('refId')}"
        res = f.query(t["expr"], bool(t.get("instant")), args.step_s)
        if res:
            value_cols.append(col)
        for s in res:
            m = {k: v for k, v in s["metric"].items() if k != "__name__"}
            labels.update(m)
            v = to_float(s["values"][-1][1]) if s["values"] else None
            # Grafana's merge: join rows whose shared label values are equal.
            for r in rows:
                shared = set(r["labels"]) & set(m)
                if col not in r["vals"] and shared and all(r["labels"][k] == m[k] for k in shared):
                    r["labels"].update(m)
                    r["vals"][col] = v
                    break
            else:
                rows.append({"labels": dict(m), "vals": {col: v}})
    if not rows:
        cv.no_data(x, y, w, h)
        return
    exclude, rename = set(), {}
    for tr in panel.get("transformations") or []:
        if tr.get("id") == "organize":
            o = tr.get("options") or {}
            exclude |= {k for k, v in (o.get("excludeByName") or {}).items() if v}
            rename.update(o.get("renameByName") or {})
    cols = [c for c in sorted(labels) + value_cols if c not in exclude]
    headers = [rename.get(c, c) for c in cols]

    def cell(r, c):
        if c in r["labels"]:
            return r["labels"][c], False
        if c in r["vals"]:
            u = props_for(panel, rename.get(c, c))["unit"] or unit
            return fmt(r["vals"][c], u), True
        return "", False

    table = [[cell(r, c) for c in cols] for r in sorted(rows, key=lambda r: [r["labels"].get(c, "") for c in cols])]
    size = 12
    widths = [max([text_px(hd, size)] + [text_px(row[i][0], size) for row in table]) + 24
              for i, hd in enumerate(headers)]
    avail = w - 16
    extra = (avail - sum(widths)) / len(widths) if sum(widths) < avail else 0
    widths = [wd + extra for wd in widths]
    if sum(widths) > avail:
        widths = [wd * avail / sum(widths) for wd in widths]
    row_h = 30
    ty = y + 34
    cx = x + 8
    for i, hd in enumerate(headers):
        num_col = table and table[0][i][1]
        cv.text(cx + (widths[i] - 10 if num_col else 10), ty + row_h / 2, hd, size=size, c="#6e9fff",
                weight="bold", ha="right" if num_col else "left")
        cx += widths[i]
    cv.line(x + 8, ty + row_h, x + w - 8, ty + row_h, BORDER, lw=1)
    max_rows = int((h - 34 - row_h - 6) // row_h)
    for j, row in enumerate(table[:max_rows]):
        ry = ty + row_h * (j + 1)
        cx = x + 8
        for i, (s, is_num) in enumerate(row):
            cv.text(cx + (widths[i] - 10 if is_num else 10), ry + row_h / 2, s, size=size, c=TEXT,
                    ha="right" if is_num else "left")
            cx += widths[i]
        cv.line(x + 8, ry + row_h, x + w - 8, ry + row_h, BORDER, lw=0.8)
    if len(table) > max_rows:
        cv.text(x + w - 12, y + 16, f"{len(table) - max_rows} more rows", size=11, c=TEXT_DIM, ha="right")


DRAW = {"timeseries": draw_timeseries, "heatmap": draw_heatmap, "stat": draw_stat, "table": draw_table}

# ----------------------------------------------------------------------------- main


def parse_time(s, now):
    if s is None or s == "now":
        return now
    m = re.fullmatch(r"now-(\d+(?:ms|s|m|h|d|w))", s)
    if m:
        return now - pq.seconds(m.group(1))
    try:
        return float(s)
    except ValueError:
        return dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url", nargs="?", help="Prometheus base URL (or --url)")
    ap.add_argument("--url", dest="url_opt", help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    ap.add_argument("--dashboard", default=os.path.join(ROOT, "dashboards", "vigil.json"))
    ap.add_argument("-o", "--output", default=os.path.join(ROOT, "docs", "dashboard.png"))
    ap.add_argument("--range", default="10m", help="time range ending at --end (default 10m)")
    ap.add_argument("--start", help="range start (Unix seconds, RFC 3339 or now-10m); overrides --range")
    ap.add_argument("--end", default="now", help="range end (Unix seconds, RFC 3339 or now; default now)")
    ap.add_argument("--rate-interval", default="30s", help="value of $__rate_interval (default 30s), also the "
                    "step of bar and heatmap panels")
    ap.add_argument("--step", help="step of line panels (default: range / 240, at least 1s)")
    ap.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                    help="template variable value (repeatable; default: the dashboard's All)")
    ap.add_argument("--discover", action="store_true",
                    help="use the variable values Prometheus has (as Grafana lists them) instead of All")
    ap.add_argument("--width", type=int, default=1800, help="image width in pixels (default 1800)")
    ap.add_argument("--row-height", type=int, default=30, help="pixels per grid row (Grafana: 30)")
    args = ap.parse_args()
    url = args.url_opt or args.url
    if not url:
        ap.error("a Prometheus URL is required")
    now = time.time()
    end = parse_time(args.end, now)
    start = parse_time(args.start, now) if args.start else end - pq.seconds(args.range)
    if start >= end:
        ap.error("empty time range")
    args.rate_s = pq.seconds(args.rate_interval)
    args.step_s = pq.seconds(args.step) if args.step else max(1, int(round((end - start) / 240)))
    # Align the range on the bar step, so bars cover whole windows.
    end = math.floor(end / args.rate_s) * args.rate_s
    start = end - math.ceil((end - start) / args.rate_s) * args.rate_s

    with open(args.dashboard) as fh:
        dash = json.load(fh)
    _, variables = pq.extract_dashboard(args.dashboard)
    fixed = {}
    for kv in args.var:
        k, _, v = kv.partition("=")
        fixed.setdefault(k, []).append(v)
    rng = f"{int(end - start)}s"
    vargs = types.SimpleNamespace(all=not args.discover, rate_interval=args.rate_interval,
                                  interval=f"{args.step_s}s", range=rng)
    values, notes = pq.discover_variables(url, variables, fixed, vargs, end)
    fetch = Fetcher(url, values, start, end)

    panels = list(pq.walk_panels(dash.get("panels")))
    W = args.width
    margin, gap, header = 14, 8, 74
    colw = (W - 2 * margin + gap) / 24
    unit_h = args.row_height + gap
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels if "gridPos" in p)
    H = int(header + bottom * unit_h + margin)
    cv = Canvas(W, H)

    # Header: title, variables, time range.
    cv.text(margin + 4, 22, dash.get("title", "Dashboard"), size=19, c=TEXT, weight="bold")
    when = f"{dt.datetime.fromtimestamp(start):%Y-%m-%d %H:%M:%S} to {dt.datetime.fromtimestamp(end):%H:%M:%S}"
    cv.text(W - margin - 4, 22, f"{when}   ·   $__rate_interval = {args.rate_interval}", size=13,
            c=TEXT_DIM, ha="right")
    vx = margin + 4
    for v in [{"name": "datasource", "label": "Data source", "shown": "Prometheus"}] + \
            [{"name": v["name"], "label": v["name"].capitalize()} for v in variables]:
        note = notes.get(v["name"], {})
        shown = v.get("shown") or ("All" if note.get("values") == [".*"] or note.get("from", "").startswith("allValue")
                                   else " + ".join(note.get("values", [])) or "?")
        lw, vw = text_px(v["label"], 12.5) + 26, text_px(shown, 12.5) + 30
        cv.box(vx, 44, lw, 26, fc="#22252b", ec=BORDER, r=2)
        cv.text(vx + 9, 57, v["label"], size=12.5, c=TEXT)
        cv.box(vx + lw, 44, vw, 26, fc=BG, ec=BORDER, r=2)
        cv.text(vx + lw + 9, 57, shown + "  ▾", size=12.5, c=TEXT)
        vx += lw + vw + 12

    for p in panels:
        gp = p.get("gridPos")
        if not gp:
            continue
        px = margin + gp["x"] * colw
        py = header + gp["y"] * unit_h
        pw = gp["w"] * colw - gap
        ph = gp["h"] * unit_h - gap
        if p.get("type") == "row":
            cv.text(px + 2, py + ph / 2 + 2, "⌄  " + p.get("title", ""), size=15.5, c=TEXT, weight="bold")
            continue
        cv.box(px, py, pw, ph)
        cv.text(px + 10, py + 17, p.get("title", ""), size=13.5, c=TEXT, weight="bold")
        draw = DRAW.get(p.get("type"))
        if draw is None:
            cv.no_data(px, py, pw, ph, f"(panel type {p.get('type')} not drawn)")
            continue
        draw(cv, p, (px, py, pw, ph), fetch, args)

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    cv.fig.savefig(args.output, dpi=DPI, facecolor=BG)
    try:  # a palette PNG is a third of the size and looks the same on this flat theme
        from PIL import Image
        im = Image.open(args.output).convert("RGB")
        im.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            args.output, optimize=True)
    except ImportError:
        pass
    size = os.path.getsize(args.output)
    print(f"render-dashboard: {len([p for p in panels if p.get('type') != 'row'])} panels, "
          f"{dt.datetime.fromtimestamp(start):%H:%M:%S}-{dt.datetime.fromtimestamp(end):%H:%M:%S}, "
          f"rate interval {args.rate_interval}, step {args.step_s}s -> {args.output} ({W}x{H}, {size // 1024} KiB)",
          file=sys.stderr)
    for e in fetch.errors:
        print(f"  query error: {e}", file=sys.stderr)
    return 1 if fetch.errors else 0


if __name__ == "__main__":
    sys.exit(main())
