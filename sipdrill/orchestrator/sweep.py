"""`sipdrill drill sweep`: one drill run over a grid of settings, each metric
plotted against the setting.

``--set timers.failover_detection_interval=30,60,120 --set clients.count=20,40``
runs every combination (``--repeat N`` times each), each a whole drill with its
own report folder, then writes ``sweep.json``, ``sweep.md`` and ``sweep.html``
(p50, p95 and max of each per-client time, and the RTO, against the first
setting; one line per value of the others).
"""

from __future__ import annotations

import html
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sipdrill.errors import OperationError
from sipdrill.orchestrator.report import Report
from sipdrill.orchestrator.report_html import CSS, H, Plot, svg

__all__ = ["GridPoint", "Sweep", "apply_settings", "parse_set", "render_sweep"]

#: What the sweep plots: (label, how to read it from a report's measurements).
PLOTTED = ("reconnect", "resiliency", "full_service", "home")
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]


def _value(text: str) -> Any:
    """A --set value as YAML would read it (30 -> int, 0.5 -> float, true...)."""
    return yaml.safe_load(text)


def parse_set(option: str) -> tuple[str, list[Any]]:
    """``timers.x=30,60`` -> (``timers.x``, [30, 60])."""
    key, eq, values = option.partition("=")
    key = key.strip()
    parts = [v.strip() for v in values.split(",")]
    if not eq or not key or not all(parts):
        raise OperationError(
            "bad-set",
            f"--set {option!r}: write FIELD=V1,V2,... (e.g. "
            "timers.failover_detection_interval=30,60,120)",
            422,
        )
    return key, [_value(v) for v in parts]


def apply_settings(raw: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """The drill's YAML with each dotted field set (a copy)."""
    out: dict[str, Any] = json.loads(json.dumps(raw))
    for dotted, value in settings.items():
        node = out
        *path, last = dotted.split(".")
        for part in path:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise OperationError(
                    "bad-set", f"--set {dotted}: {part} is not a section of the drill file", 422
                )
            node = nxt
        node[last] = value
    return out


@dataclass
class GridPoint:
    settings: dict[str, Any]
    repeat: int
    report_dir: str
    status: str
    values: dict[str, float | None] = field(default_factory=dict)


def point_values(report: Report) -> dict[str, float | None]:
    m = report.measurements or {}
    out: dict[str, float | None] = {"rto": m.get("rto")}
    for name in PLOTTED:
        d = (m.get("distributions") or {}).get(name) or {}
        for stat in ("p50", "p95", "max"):
            out[f"{name}.{stat}"] = d.get(stat)
    return out


@dataclass
class Sweep:
    drill: str
    keys: list[str]
    grid: list[dict[str, Any]]
    repeat: int
    points: list[GridPoint] = field(default_factory=list)

    @classmethod
    def plan(cls, drill: str, sets: list[tuple[str, list[Any]]], repeat: int) -> Sweep:
        keys = [k for k, _ in sets]
        grid = [
            dict(zip(keys, combo, strict=True))
            for combo in itertools.product(*(v for _, v in sets))
        ]
        return cls(drill, keys, grid, repeat)

    def run(
        self,
        run_one: Callable[[int, dict[str, Any], int], tuple[Report, Path]],
        progress: Callable[[str], None],
    ) -> None:
        total = len(self.grid) * self.repeat
        n = 0
        for i, settings in enumerate(self.grid):
            for r in range(self.repeat):
                n += 1
                label = ", ".join(f"{k}={v}" for k, v in settings.items())
                progress(
                    f"sweep run {n}/{total}: {label}" + (f" (#{r + 1})" if self.repeat > 1 else "")
                )
                report, folder = run_one(i, settings, r)
                point = GridPoint(settings, r, str(folder), report.status, point_values(report))
                self.points.append(point)
                rto = point.values.get("rto")
                progress(
                    f"  {report.status}: RTO {'-' if rto is None else f'{rto:.1f} s'}, reconnect "
                    f"p95 {_fmt(point.values.get('reconnect.p95'))} s"
                )
                if report.status == "interrupted":
                    return

    def to_json(self) -> dict[str, Any]:
        return {
            "drill": self.drill,
            "keys": self.keys,
            "repeat": self.repeat,
            "points": [p.__dict__ for p in self.points],
        }

    def table(self) -> list[str]:
        cols = [
            *self.keys,
            "status",
            "rto",
            "reconnect.p50",
            "reconnect.p95",
            "reconnect.max",
            "full_service.p95",
        ]
        out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for p in self.points:
            cells = [str(p.settings[k]) for k in self.keys] + [p.status]
            cells += [_fmt(p.values.get(c)) for c in cols[len(self.keys) + 1 :]]
            out.append("| " + " | ".join(cells) + " |")
        return out


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _mean(values: list[float | None]) -> float | None:
    """The mean of the repeats; None (no point) if any repeat never got there:
    a mean of the others would hide that one did not recover."""
    if not values or any(v is None for v in values):
        return None
    got = [v for v in values if v is not None]
    return sum(got) / len(got)


def render_sweep(sweep: Sweep) -> str:
    """sweep.html: for each metric, p50/p95/max (mean of the repeats) against
    the first setting, one line per combination of the others."""
    e = html.escape
    key = sweep.keys[0]
    others = sweep.keys[1:]
    out = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'\">",
        f"<title>Sweep: {e(sweep.drill)}</title><style>{CSS}</style></head><body>",
        f"<h1>Sweep of {e(sweep.drill)} over {e(', '.join(sweep.keys))}</h1>",
        f"<p>{len(sweep.points)} run(s), {sweep.repeat} per setting; each point is the mean of "
        "its repeats (no point where one of them never got there). Every run's own report "
        "is in its folder.</p>",
    ]
    xs = sorted({p.settings[key] for p in sweep.points}, key=_sort_key)
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    groups = sorted({tuple(p.settings[k] for k in others) for p in sweep.points}, key=str)
    for metric in ("rto", *PLOTTED):
        stats = ("",) if metric == "rto" else (".p50", ".p95", ".max")
        lines: dict[str, list[tuple[float, float]]] = {}
        for group in groups:
            for stat in stats:
                pts = []
                for xi, x in enumerate(xs):
                    vals = [
                        p.values.get(metric + stat)
                        for p in sweep.points
                        if p.settings[key] == x and tuple(p.settings[k] for k in others) == group
                    ]
                    v = _mean(vals)
                    if v is not None:
                        pts.append((float(x) if numeric else float(xi), v))
                name = (metric + stat) + (
                    " (" + ", ".join(f"{k}={g}" for k, g in zip(others, group, strict=True)) + ")"
                    if others
                    else ""
                )
                if pts:
                    lines[name] = pts
        if not lines:
            continue
        out.append(f"<h2>{e(metric)} against {e(key)}</h2>")
        out.append(_line_chart(lines, xs, numeric, key))
    out.append(
        "<h2>Runs</h2><table><tr>"
        + "".join(f"<th>{e(k)}</th>" for k in sweep.keys)
        + "<th>status</th><th>RTO</th><th>reconnect p95</th><th>report</th></tr>"
    )
    for p in sweep.points:
        out.append(
            "<tr>"
            + "".join(f"<td>{e(str(p.settings[k]))}</td>" for k in sweep.keys)
            + f"<td>{e(p.status)}</td><td>{_fmt(p.values.get('rto'))}</td>"
            f"<td>{_fmt(p.values.get('reconnect.p95'))}</td>"
            f'<td class="l">{e(Path(p.report_dir).name)}</td></tr>'
        )
    out.append("</table></body></html>\n")
    return "\n".join(out)


def _sort_key(x: Any) -> tuple[int, Any]:
    return (0, x) if isinstance(x, (int, float)) else (1, str(x))


def _line_chart(
    lines: dict[str, list[tuple[float, float]]], xs: list[Any], numeric: bool, xlabel: str
) -> str:
    ymax = max(v for pts in lines.values() for _x, v in pts)
    x0, x1 = (float(min(xs)), float(max(xs))) if numeric else (0.0, float(len(xs) - 1))
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    p = Plot(x0, x1, 0, max(ymax * 1.1, 1.0))
    body = p.axes(xlabel if numeric else f"{xlabel} (as listed)", "seconds")
    if not numeric:
        for i, x in enumerate(xs):
            body.append(
                f'<text x="{p.x(i):.1f}" y="{H - 26}" text-anchor="middle">'
                f"{html.escape(str(x))}</text>"
            )
    legend = []
    for i, (name, pts) in enumerate(lines.items()):
        colour = PALETTE[i % len(PALETTE)]
        dash = ' stroke-dasharray="5 3"' if name.split(" ")[0].endswith(".p50") else ""
        path = " ".join(f"{p.x(x):.1f},{p.y(v):.1f}" for x, v in pts)
        body.append(
            f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>'
        )
        for x, v in pts:
            body.append(
                f'<circle cx="{p.x(x):.1f}" cy="{p.y(v):.1f}" r="3" fill="{colour}">'
                f"<title>{html.escape(name)}: {v:.1f} s</title></circle>"
            )
        legend.append(
            f'<span><i class="sw" style="background:{colour}"></i>{html.escape(name)}</span>'
        )
    return (
        svg(body, f"metrics against {xlabel}") + '<div class="legend">' + "".join(legend) + "</div>"
    )
