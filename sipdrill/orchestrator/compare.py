"""`sipdrill drill compare`: drill reports side by side, and a regression gate.

The first report is the baseline. Times are compared where lower is better
(RTO, step metrics, p50/p95/max of the per-client times); ``--fail-if-slower
PCT`` fails when any of them grew by more than PCT percent, or was reached in
the baseline and not any more.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sipdrill.errors import OperationError
from sipdrill.orchestrator.report_html import CDF_METRICS, CSS, cdf_svg

__all__ = ["Compared", "compare", "compare_html", "load_report"]

#: The per-client times compared, and the stats of each.
TIMES = ("detect", "reconnect", "resiliency", "full_service", "full_after_failover", "home")
STATS = ("p50", "p95", "max")
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf"]


def load_report(path: Path) -> dict[str, Any]:
    """A report.json, given as the file or its folder."""
    file = path / "report.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise OperationError("no-report", f"{file}: cannot read: {exc.strerror}", 404) from None
    except ValueError as exc:
        raise OperationError("bad-report", f"{file}: not a drill report.json: {exc}", 422) from None
    if not isinstance(data, dict) or "steps" not in data or "drill" not in data:
        raise OperationError("bad-report", f"{file}: not a drill report.json", 422)
    data["_label"] = file.parent.name if file.name == "report.json" else file.stem
    return data


def metrics_of(report: dict[str, Any]) -> dict[str, float | None]:
    """The comparable numbers of one report, by name (``reconnect.p95``...)."""
    out: dict[str, float | None] = {}
    m = report.get("measurements") or {}
    if m:
        out["rto"] = m.get("rto")
        out["rpo_writes"] = m.get("rpo_writes")
        out["rpo_seconds"] = m.get("rpo_seconds")
        dists = m.get("distributions") or {}
        for name in TIMES:
            d = dists.get(name) or {}
            if not d.get("count") and not d.get("missing"):
                continue
            for stat in STATS:
                out[f"{name}.{stat}"] = d.get(stat)
    for name, value in (report.get("metrics") or {}).items():
        out[name] = value
    return out


@dataclass
class Compared:
    labels: list[str]
    rows: list[tuple[str, list[float | None]]]
    regressions: list[str]


def _unique_labels(reports: list[dict[str, Any]]) -> None:
    """Two reports with one folder name (a/run-1, b/run-1) get #2, #3...: the
    table's columns and the plots' lines are keyed by label."""
    seen: dict[str, int] = {}
    for r in reports:
        n = seen[r["_label"]] = seen.get(r["_label"], 0) + 1
        if n > 1:
            r["_label"] = f"{r['_label']} #{n}"


def compare(reports: list[dict[str, Any]], fail_if_slower: float | None = None) -> Compared:
    _unique_labels(reports)
    per = [metrics_of(r) for r in reports]
    names: list[str] = []
    for p in per:
        names += [n for n in p if n not in names]
    rows = [(n, [p.get(n) for p in per]) for n in names]
    regressions: list[str] = []
    if fail_if_slower is not None:
        base = per[0]
        for label, p in zip([r["_label"] for r in reports[1:]], per[1:], strict=True):
            for n in names:
                if n.startswith("rpo"):
                    continue  # data lost is not a time; bound it with `expect:`
                b, v = base.get(n), p.get(n)
                if b is None:
                    continue
                if v is None:
                    regressions.append(f"{label}: {n} not reached (baseline {b:.1f})")
                elif v > b * (1 + fail_if_slower / 100) and v - b > 1e-9:
                    pct = (v - b) / b * 100 if b else float("inf")
                    regressions.append(f"{label}: {n} {v:.1f} vs {b:.1f} (+{pct:.0f} %)")
    return Compared([r["_label"] for r in reports], rows, regressions)


def compare_html(reports: list[dict[str, Any]], result: Compared) -> str:
    e = html.escape
    out = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'\">",
        f"<title>Drill comparison</title><style>{CSS}</style></head><body>",
        "<h1>Drill comparison</h1><p>The first report is the baseline.</p>",
        "<table><tr><th>metric</th>"
        + "".join(f"<th>{e(label)}</th>" for label in result.labels)
        + "</tr>",
    ]
    for name, values in result.rows:
        cells = "".join("<td>-</td>" if v is None else f"<td>{v:.1f}</td>" for v in values)
        out.append(f"<tr><td>{e(name)}</td>{cells}</tr>")
    out.append("</table>")
    if result.regressions:
        out.append(
            "<h2>Slower than the baseline</h2><ul>"
            + "".join(f"<li>{e(r)}</li>" for r in result.regressions)
            + "</ul>"
        )
    colours = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(result.labels)}
    for metric in CDF_METRICS:
        cdfs = {
            r["_label"]: ((r.get("measurements") or {}).get("cdf") or {}).get(metric, [])
            for r in reports
        }
        if any(cdfs.values()):
            out.append(f"<h2>{e(metric)}: CDF of the per-client times</h2>")
            out.append(cdf_svg(cdfs, colours, f"CDF of {metric}"))
    out.append("</body></html>\n")
    return "\n".join(out)
