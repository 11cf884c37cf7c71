"""report.html: one self-contained page (inline SVG and CSS, no script, no
fetch), readable at 10,000 clients: the curve is downsampled by the
measurements and the CDFs by :func:`cdf_points`.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sipdrill.orchestrator.report import Report

__all__ = ["cdf_svg", "curve_svg", "render_html"]

W, H = 900, 320
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 16, 40

#: Per-client metrics drawn as CDFs, with their colours.
#: reconnect is drawn after resiliency: without a pool failover they are the same
#: times, and its dashed line must stay visible on top.
CDF_METRICS = {
    "detect": "#7f7f7f",
    "resiliency": "#ff7f0e",
    "reconnect": "#1f77b4",
    "full_service": "#2ca02c",
    "home": "#9467bd",
}

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;
max-width:960px;color:#222;padding:0 12px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:6px 0}td,th{padding:3px 8px;border-bottom:1px solid #eee;
text-align:right;white-space:nowrap}td:first-child,th:first-child{text-align:left}
td.l,th.l{text-align:left;white-space:normal}
.passed{color:#1a7f37}.failed{color:#cf222e}.interrupted{color:#9a6700}
.kpi{display:inline-block;margin:8px 24px 8px 0}.kpi b{display:block;font-size:22px}
svg{background:#fff;border:1px solid #ddd}svg text{font:11px sans-serif;fill:#333}
.legend span{display:inline-block;margin-right:14px}.sw{display:inline-block;width:10px;
height:10px;margin-right:4px}details{margin:4px 0}code{font-size:12px}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _f(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    span = max(hi - lo, 1e-9)
    raw = span / n
    mag = 10 ** len(str(int(raw))) / 10 if raw >= 1 else 0.1
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=raw)
    start = (lo // step) * step
    out = []
    v = start
    while v <= hi + 1e-9:
        if v >= lo - 1e-9:
            out.append(round(v, 6))
        v += step
    return out


class Plot:
    def __init__(self, x0: float, x1: float, y0: float, y1: float) -> None:
        self.x0, self.x1 = x0, max(x1, x0 + 1e-9)
        self.y0, self.y1 = y0, max(y1, y0 + 1e-9)

    def x(self, v: float) -> float:
        return LEFT + (v - self.x0) / (self.x1 - self.x0) * (W - LEFT - RIGHT)

    def y(self, v: float) -> float:
        return H - BOTTOM - (v - self.y0) / (self.y1 - self.y0) * (H - TOP - BOTTOM)

    def axes(self, xlabel: str, ylabel: str, yfmt: str = "{:g}") -> list[str]:
        out = [
            f'<line x1="{LEFT}" y1="{H - BOTTOM}" x2="{W - RIGHT}" y2="{H - BOTTOM}" '
            'stroke="#999"/>',
            f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{H - BOTTOM}" stroke="#999"/>',
        ]
        for t in _ticks(self.x0, self.x1):
            x = self.x(t)
            out.append(
                f'<line x1="{x:.1f}" y1="{H - BOTTOM}" x2="{x:.1f}" y2="{H - BOTTOM + 4}" '
                'stroke="#999"/>'
            )
            out.append(f'<text x="{x:.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">{t:g}</text>')
        for t in _ticks(self.y0, self.y1, 4):
            y = self.y(t)
            out.append(
                f'<line x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}" stroke="#f0f0f0"/>'
            )
            out.append(
                f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
                f"{_e(yfmt.format(t))}</text>"
            )
        out.append(
            f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 6}" text-anchor="middle">'
            f"{_e(xlabel)}</text>"
        )
        out.append(
            f'<text x="12" y="{TOP + 8}" transform="rotate(-90 12 {TOP + 8})" '
            f'text-anchor="end">{_e(ylabel)}</text>'
        )
        return out


def svg(body: list[str], label: str) -> str:
    return (
        f'<svg role="img" aria-label="{_e(label)}" viewBox="0 0 {W} {H}" width="100%" '
        f'xmlns="http://www.w3.org/2000/svg">' + "".join(body) + "</svg>"
    )


def _colour(key: str, index: int) -> str:
    if key == "signed-out":
        return "#c7c7c7"
    if key == "signing-in":
        return "#aec7e8"
    if key == "backing-off":
        return "#d62728"
    if key.startswith("resiliency"):
        return ["#ff7f0e", "#ffbb78", "#e6550d"][index % 3]
    return ["#2ca02c", "#17becf", "#98df8a", "#1f77b4"][index % 4]


def curve_svg(curve: dict[str, Any], markers: Sequence[tuple[float, str, str]]) -> str:
    """Clients by mode and pool over time, stacked, with fault/heal/admin markers."""
    times: list[float] = curve.get("t") or []
    series: dict[str, list[int]] = curve.get("series") or {}
    if not times or not series:
        return "<p>No client events were recorded.</p>"
    order = sorted(
        series,
        key=lambda k: (
            0
            if k.startswith("full")
            else 1
            if k.startswith("resil")
            else 2
            if k == "signing-in"
            else 3
            if k == "backing-off"
            else 4,
            k,
        ),
    )
    total = max((sum(series[k][i] for k in order) for i in range(len(times))), default=1)
    p = Plot(times[0], times[-1], 0, max(total, 1))
    body = p.axes("seconds since the drill started", "clients")
    base = [0] * len(times)
    legend = []
    full_i = res_i = 0
    for key in order:
        vals = series[key]
        top = [b + v for b, v in zip(base, vals, strict=True)]
        if key.startswith("full"):
            colour = _colour(key, full_i)
            full_i += 1
        elif key.startswith("resil"):
            colour = _colour(key, res_i)
            res_i += 1
        else:
            colour = _colour(key, 0)
        pts = [f"{p.x(t):.1f},{p.y(v):.1f}" for t, v in zip(times, top, strict=True)]
        pts += [
            f"{p.x(t):.1f},{p.y(v):.1f}"
            for t, v in zip(reversed(times), reversed(base), strict=True)
        ]
        body.append(
            f'<polygon points="{" ".join(pts)}" fill="{colour}" fill-opacity="0.85" '
            f'stroke="none"><title>{_e(key)}</title></polygon>'
        )
        legend.append(f'<span><i class="sw" style="background:{colour}"></i>{_e(key)}</span>')
        base = top
    # Labels of markers close in time (an import and a DNS repoint 0.1 s
    # apart) go on the next free row instead of over each other.
    row_ends: list[float] = []
    for at, label, colour in sorted(markers):
        if times[0] <= at <= times[-1]:
            x = p.x(at)
            body.append(
                f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{H - BOTTOM}" '
                f'stroke="{colour}" stroke-width="1.5" stroke-dasharray="4 3"/>'
            )
            row = next((i for i, end in enumerate(row_ends) if end < x), len(row_ends))
            if row == len(row_ends):
                row_ends.append(0.0)
            row_ends[row] = x + 3 + 6.5 * len(label)  # ~6.5 px a character at 11 px
            body.append(
                f'<text x="{x + 3:.1f}" y="{TOP + 10 + 12 * row}" fill="{colour}">'
                f"{_e(label)}</text>"
            )
    return (
        svg(body, "clients by mode over time") + '<div class="legend">' + "".join(legend) + "</div>"
    )


def cdf_svg(cdfs: dict[str, list[list[float]]], colours: dict[str, str], label: str) -> str:
    """Each metric's CDF: x seconds, y the fraction of affected clients at or below it."""
    lines = {k: v for k, v in cdfs.items() if v}
    if not lines:
        return "<p>No client lost service, so there is nothing to plot.</p>"
    xmax = max(pt[0] for v in lines.values() for pt in v)
    p = Plot(0, max(xmax, 1.0) * 1.02, 0, 1)
    body = p.axes("seconds", "fraction of affected clients", "{:.0%}")
    legend = []
    for k, pts in lines.items():
        colour = colours.get(k, "#333")
        path = []
        prev_y = 0.0
        for x, y in pts:
            path.append(f"{p.x(x):.1f},{p.y(prev_y):.1f} {p.x(x):.1f},{p.y(y):.1f}")
            prev_y = y
        body.append(
            f'<polyline points="{" ".join(path)}" fill="none" stroke="{colour}" '
            f'stroke-width="2"><title>{_e(k)}</title></polyline>'
        )
        legend.append(f'<span><i class="sw" style="background:{colour}"></i>{_e(k)}</span>')
    return svg(body, label) + '<div class="legend">' + "".join(legend) + "</div>"


def _markers(report: Report) -> list[tuple[float, str, str]]:
    out: list[tuple[float, str, str]] = []
    for f in report.faults:
        out.append((f["injected_at"], f"{f['kind']} {f['target']}", "#cf222e"))
        if f.get("healed_at") is not None:
            out.append((f["healed_at"], f"heal {f['id']}", "#1a7f37"))
    for s in report.steps:
        if s.action == "admin" and s.status == "passed":
            op = s.detail.get("operation") or s.description
            out.append((s.started_at, str(op)[:28], "#0969da"))
    return out


def _dist_table(dists: dict[str, Any]) -> str:
    from sipdrill.orchestrator.report import SHOWN

    rows = []
    for name, what in SHOWN.items():
        d = dists.get(name)
        if not d or (d["count"] == 0 and d["missing"] == 0):
            continue
        cells = "".join(f"<td>{_f(d[k])}</td>" for k in ("min", "p50", "p90", "p95", "p99", "max"))
        rows.append(
            f'<tr><td>{_e(name)}</td><td class="l">{_e(what)}</td><td>{d["count"]}</td>'
            f"<td>{d['missing']}</td>{cells}</tr>"
        )
    if not rows:
        return "<p>No client lost service.</p>"
    return (
        '<table><tr><th>metric</th><th class="l">from - to</th><th>n</th><th>missing</th>'
        "<th>min</th><th>p50</th><th>p90</th><th>p95</th><th>p99</th><th>max</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def render_html(report: Report) -> str:
    from sipdrill.orchestrator.report import fmt_value

    m = report.measurements or {}
    title = f"Drill report: {report.drill}"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(report.started_wall))
    out = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        # Nothing may be fetched: a browser blocks (and logs) any attempt.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; img-src data:\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p>status <b class="{_e(report.status)}">{_e(report.status)}</b>'
        + (f" &mdash; {_e(report.error)}" if report.error else "")
        + f"<br>topology <code>{_e(report.topology)}</code>, runtime {_e(report.runtime)}, "
        f"started {started}, duration {report.duration:.1f} s, every fault healed: "
        f"{'yes' if report.healed else '<b class=failed>NO</b>'}</p>",
    ]
    if m and "rto" in m:
        rpo = "unknown" if m["rpo_writes"] is None else f"{m['rpo_writes']} writes"
        age = m.get("rpo_seconds")
        rt = "not reached" if m["rto"] is None else f"{m['rto']:.1f} s"
        dists = m.get("distributions") or {}
        rec = dists.get("reconnect") or {}
        out.append(
            f'<div class="kpi">RTO<b>{_e(rt)}</b>fault to the last client in full service</div>'
            f'<div class="kpi">RPO<b>{_e(rpo)}</b>'
            + (f"oldest {age:.1f} s old" if m["rpo_writes"] and age is not None else "lost")
            + "</div>"
            f'<div class="kpi">reconnect p50 / p95 / max<b>{_f(rec.get("p50"))} / '
            f"{_f(rec.get('p95'))} / {_f(rec.get('max'))} s</b>first REGISTER after the fault"
            "</div>"
            f'<div class="kpi">clients<b>{m["clients"]}</b>{m["events"]} events'
            + (f", {m['events_lost']} lost" if m["events_lost"] else "")
            + "</div>"
        )
        if m.get("fidelity"):
            from sipdrill.orchestrator.report import fidelity_text

            out.append(
                f"<p>Events against the wire (--capture): {_e(fidelity_text(m['fidelity']))}</p>"
            )
        out.append("<h2>Clients by mode over time</h2>")
        out.append(curve_svg(_curve(report), _markers(report)))
        out.append("<h2>Per-client times</h2>")
        out.append(_dist_table(dists))
        out.append(
            cdf_svg(
                {k: (m.get("cdf") or {}).get(k, []) for k in CDF_METRICS},
                CDF_METRICS,
                "CDF of per-client times",
            )
        )
        for f in m.get("faults", []):
            out.append(
                f"<h2>Fault {_e(f['id'])}: {_e(f['kind'])} {_e(f['target'])}</h2>"
                f"<p>{f['affected']} client(s) lost service, {f['unaffected']} did not; RTO "
                f"{_e('not reached' if f['rto'] is None else format(f['rto'], '.1f') + ' s')}"
                + (f"; {f['not_recovered']} never got full service" if f["not_recovered"] else "")
                + "</p>"
            )
            by_pool = f.get("by_pool") or {}
            if len(by_pool) > 1 or len(m.get("faults", [])) > 1:  # else the table above again
                for pool, pd in by_pool.items():
                    out.append(f"<h3>Clients homed on {_e(pool)}</h3>" + _dist_table(pd))
        calls = m.get("calls")
        if calls:
            out.append(_calls_html(calls))
        if m.get("rpo_notes"):
            out.append(
                "<h2>Data</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in m["rpo_notes"]) + "</ul>"
            )
    out.append(
        '<h2>Steps</h2><table><tr><th>#</th><th class="l">step</th><th>at (s)</th>'
        "<th>took (s)</th><th>status</th></tr>"
    )
    for s in report.steps:
        out.append(
            f'<tr><td>{s.index + 1}</td><td class="l">{_e(s.description)}</td>'
            f"<td>{s.started_at:.1f}</td><td>{_f(s.duration)}</td>"
            f'<td class="{_e(s.status)}">{_e(s.status)}</td></tr>'
        )
    out.append("</table>")
    if report.expectations:
        out.append(
            "<h2>Expectations</h2><table><tr><th>metric</th><th>bound</th><th>value</th>"
            "<th>ok</th></tr>"
        )
        for e in report.expectations:
            bound = ", ".join(f"{k} {v:g}" for k, v in e["bound"].items())
            ok = '<b class="passed">yes</b>' if e["ok"] else '<b class="failed">NO</b>'
            out.append(
                f"<tr><td>{_e(e['metric'])}</td><td>{_e(bound)}</td>"
                f"<td>{_e(fmt_value(e['value']))}</td><td>{ok}</td></tr>"
            )
        out.append("</table>")
    if report.metrics:
        out.append(
            "<h2>Step metrics</h2><table><tr><th>metric</th><th>seconds</th></tr>"
            + "".join(
                f"<tr><td>{_e(k)}</td><td>{v:.1f}</td></tr>" for k, v in report.metrics.items()
            )
            + "</table>"
        )
    slowest = _slowest(report)
    if slowest:
        out.append("<h2>The slowest clients</h2>")
        for c in slowest:
            hist = "".join(
                f'<tr><td>{h["t"]:.3f}</td><td class="l">{_e(h["what"])}</td>'
                f'<td class="l">{_e(h.get("pool") or "")}</td></tr>'
                for h in c["history"]
            )
            full = "never" if c["full_service"] is None else f"{c['full_service']:.1f} s"
            tried = ", ".join(c["pools_tried"]) or "-"
            out.append(
                f"<details><summary><code>{_e(c['user'])}</code> (home {_e(c['home_pool'])}): "
                f"full service {_e(full)}, {c['attempts']} attempt(s), pools tried: {_e(tried)}"
                f'</summary><table><tr><th>t (s)</th><th class="l">what</th><th class="l">pool'
                f"</th></tr>{hist}</table></details>"
            )
    if report.data:
        out.append(
            "<h2>Lab data</h2><details><summary>raw status of the pools and Backup "
            "Services at the end</summary><pre>"
            + _e(json.dumps(report.data, indent=1, default=str)[:200_000])
            + "</pre></details>"
        )
    out.append("</body></html>\n")
    return "\n".join(out)


def _calls_html(calls: dict[str, Any]) -> str:
    """The call workload: one line, then a row per phase (setup in ms)."""
    from sipdrill.orchestrator.report import calls_line

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f}"

    rows = []
    phases = dict(calls.get("phases") or {})
    if calls.get("outside"):
        phases["(between the phases)"] = calls["outside"]
    for name, p in phases.items():
        windows = p.get("windows")
        start, end = (windows[0][0], windows[-1][1]) if windows else (None, None)
        when = (
            ("start" if start is None else format(start, ".1f"),
             "end" if end is None else format(end, ".1f"))
            if windows else ("", "")
        )
        failures = ", ".join(f"{k}: {n}" for k, n in p["failures"].items()) or "-"
        ratio = "-" if p["success_ratio"] is None else f"{p['success_ratio']:.3f}"
        rows.append(
            f"<tr><td>{_e(name)}{' (step)' if p.get('pinned') else ''}</td>"
            f"<td>{when[0]}</td><td>{when[1]}</td>"
            f"<td>{p['placed']}</td><td>{p['placed_in_resiliency']}</td>"
            f"<td>{p['answered']}</td><td>{p['failed']}</td><td>{ratio}</td>"
            f"<td>{ms(p['setup']['p50'])}</td><td>{ms(p['setup']['p95'])}</td>"
            f"<td>{ms(p['setup']['max'])}</td><td class=\"l\">{_e(failures)}</td></tr>"
        )
    return (
        f"<h2>Calls</h2><p>{_e(calls_line(calls))}</p>"
        "<table><tr><th>phase</th><th>from (s)</th><th>to (s)</th><th>placed</th>"
        "<th>in resiliency</th><th>answered</th><th>failed</th><th>success</th>"
        '<th>setup p50 (ms)</th><th>p95</th><th>max</th><th class="l">failures</th></tr>'
        + "".join(rows)
        + "</table>"
    )


def _curve(report: Report) -> dict[str, Any]:
    return dict((report.measurements or {}).get("curve") or {})


def _slowest(report: Report) -> list[dict[str, Any]]:
    return list((report.measurements or {}).get("slowest") or [])
