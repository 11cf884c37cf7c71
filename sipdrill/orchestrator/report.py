"""A drill's report: what ran, what was measured, and the files it leaves.

``report.json`` (everything but the per-client rows), ``report.md`` (the same
for people), ``clients.csv`` (one row per client and fault), ``report.html``
(one self-contained page with the plots) and ``events.jsonl`` (the timeline,
written while the drill runs) go to one folder.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sipdrill.orchestrator.measure import Measurements

__all__ = ["Report", "StepRecord", "calls_line", "calls_table", "fmt_seconds", "fmt_value"]


@dataclass
class StepRecord:
    index: int
    description: str
    action: str
    started_at: float  # seconds since the drill started
    duration: float | None = None
    status: str = "running"  # passed, failed, skipped, interrupted
    detail: dict[str, Any] = field(default_factory=dict)
    timeout: float | None = None


@dataclass
class Report:
    drill: str
    topology: str
    runtime: str
    started_wall: float
    status: str = "running"  # passed, failed, interrupted, error (the lab could not run)
    error: str | None = None
    steps: list[StepRecord] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    expectations: list[dict[str, Any]] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    healed: bool = False
    duration: float = 0.0
    #: The lab the drill ran on: ``attached`` (a running lab, left running) and
    #: what the drill was told about it (its own timers, its clients).
    lab: dict[str, Any] = field(default_factory=dict)
    #: Measurements.summary(): distributions, RTO, RPO, per fault and per pool.
    measurements: dict[str, Any] = field(default_factory=dict)
    #: The full measurements (per-client rows, curve): written to files, not to JSON.
    measured: Measurements | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("measured", None)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, default=str)

    @property
    def exit_code(self) -> int:
        """0 everything held, 1 a step or an expectation failed, 2 the lab could
        not be run, 130 interrupted (128 + SIGINT, as a shell reports Ctrl-C)."""
        return {"passed": 0, "error": 2, "interrupted": 130}.get(self.status, 1)

    # --- markdown -------------------------------------------------------------

    def to_markdown(self) -> str:
        out = [
            f"# Drill report: {self.drill}",
            "",
            f"- status: **{self.status}**" + (f" ({self.error})" if self.error else ""),
            f"- topology: `{self.topology}`, runtime: {self.runtime}",
            f"- started: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(self.started_wall))}, "
            f"duration {self.duration:.1f} s",
            f"- every fault healed: {'yes' if self.healed else 'NO'}",
            *(
                [f"- lab: already running, left running; {'; '.join(self.lab.get('notes', []))}"]
                if self.lab.get("attached")
                else []
            ),
            "",
            "## Steps",
            "",
            "| # | step | at (s) | took (s) | status |",
            "|---|---|---|---|---|",
        ]
        for s in self.steps:
            took = f"{s.duration:.1f}" if s.duration is not None else "-"
            out.append(
                f"| {s.index + 1} | {_cell(s.description)} | {s.started_at:.1f} | {took} "
                f"| {s.status} |"
            )
        out += self._measurements_markdown()
        out += self._calls_markdown()
        if self.metrics:
            out += ["", "## Step metrics", "", "| metric | seconds |", "|---|---|"]
            out += [f"| {k} | {v:.1f} |" for k, v in self.metrics.items()]
        if self.expectations:
            out += [
                "",
                "## Expectations",
                "",
                "| metric | bound | value | ok |",
                "|---|---|---|---|",
            ]
            for e in self.expectations:
                value = fmt_value(e["value"])
                out.append(
                    f"| {e['metric']} | {_bound(e['bound'])} | {value} "
                    f"| {'yes' if e['ok'] else 'NO'} |"
                )
        if self.faults:
            out += [
                "",
                "## Faults",
                "",
                "| fault | kind | target | injected (s) | healed (s) |",
                "|---|---|---|---|---|",
            ]
            for f in self.faults:
                healed = "-" if f.get("healed_at") is None else f"{f['healed_at']:.1f}"
                out.append(
                    f"| {f['id']} | {f['kind']} | {f['target']} | {f['injected_at']:.1f} "
                    f"| {healed} |"
                )
        out += self._data_markdown()
        out += [
            "",
            "Files beside this one: `report.html` (plots), `clients.csv` (one row per client "
            "and fault), `events.jsonl` (the timeline), `report.json` (all of the above but the "
            "rows, and the lab's raw status).",
        ]
        return "\n".join(out) + "\n"

    def _measurements_markdown(self) -> list[str]:
        m = self.measurements
        if "rto" not in m:  # nothing measured (the lab never ran); maybe a capture note
            fid = m.get("fidelity")
            return [] if not fid else ["", f"- events against the wire: {fidelity_text(fid)}"]
        out = [
            "",
            "## Recovery",
            "",
            f"- RTO (fault to the last affected client in full service): {fmt_seconds(m['rto'])}",
            f"- RPO: {_rpo_text(m)}",
            f"- clients measured: {m['clients']}, events: {m['events']}"
            + (
                f", events lost before they were read: {m['events_lost']}"
                if m["events_lost"]
                else ""
            ),
        ]
        for source, why in (m.get("unread_sources") or {}).items():
            out.append(
                f"- **events of {source} could not be read** ({why}): its clients are missing"
            )
        for f in m["faults"]:
            out.append(
                f"- fault `{f['id']}` ({f['kind']} {f['target']}): {f['affected']} client(s) "
                f"lost service, {f['unaffected']} did not; RTO {fmt_seconds(f['rto'])}"
                + (f"; {f['not_recovered']} never got full service" if f["not_recovered"] else "")
            )
        fid = m.get("fidelity")
        if fid:
            out.append(f"- events against the wire (--capture): {fidelity_text(fid)}")
        out += ["", "## Per-client times (seconds; every affected client)", ""]
        out += distribution_table(m["distributions"])
        for f in m["faults"]:
            if len(f["by_pool"]) > 1 or len(m["faults"]) > 1:
                for pool, dists in f["by_pool"].items():
                    out += ["", f"### `{f['id']}`: clients homed on {pool}", ""]
                    out += distribution_table(dists)
        return out

    def _calls_markdown(self) -> list[str]:
        calls = (self.measurements or {}).get("calls")
        if not calls:
            return []
        return ["", "## Calls (the call workload)", "", f"- {calls_line(calls)}", "",
                *calls_table(calls)]

    def _data_markdown(self) -> list[str]:
        ops = self.data.get("operations") or []
        writes = self.data.get("writes") or {}
        if not (ops or writes):
            return []
        out = ["", "## Data: what was kept and what was lost", ""]
        if writes:
            out.append(
                f"- writes acknowledged by the pools: {writes.get('acknowledged', 0)}, "
                f"refused: {writes.get('refused', 0)}"
            )
        for op in ops:
            lost = op.get("lost_writes")
            earlier = op.get("failover_lost_writes")
            line = (
                f"- pool {op.get('operation')} of {op.get('home_pool')}"
                f"{' (disaster mode)' if op.get('disaster_mode') else ''}: "
                f"{op.get('seconds', 0):.1f} s, "
                f"{op.get('synced_changes', 0)} change(s) synced, "
                f"writes lost: {'unknown until the pool returns' if lost is None else lost}"
            )
            if earlier is not None:
                line += f"; the earlier failover lost {earlier} write(s) taken after the last sync"
            out.append(line)
        return out

    # --- files ------------------------------------------------------------------

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Write report.json, report.md, clients.csv and report.html; returns
        (json, markdown). events.jsonl is already there (written live)."""
        from sipdrill.orchestrator.report_html import render_html

        directory.mkdir(parents=True, exist_ok=True)
        j = directory / "report.json"
        m = directory / "report.md"
        j.write_text(self.to_json())
        m.write_text(self.to_markdown())
        if self.measured is not None:
            with (directory / "clients.csv").open("w", newline="") as fh:
                w = csv.writer(fh)
                rows = self.measured.rows
                if rows:
                    w.writerow(rows[0].csv_fields())
                    w.writerows(r.csv_row() for r in rows)
        (directory / "report.html").write_text(render_html(self))
        return j, m


def fmt_seconds(v: float | None) -> str:
    return "not reached" if v is None else f"{v:.1f} s"


def fmt_value(v: float | None) -> str:
    """A metric's value: seconds to 0.1, but a ratio or a short time with its
    digits (0.97 is not 1.0, a 12 ms call setup is not 0.0)."""
    if v is None:
        return "-"
    return f"{v:.1f}" if abs(v) >= 1 or v == 0 else f"{v:.3g}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _failures(f: dict[str, int]) -> str:
    return ", ".join(f"{k}: {n}" for k, n in f.items()) or "-"


def calls_line(c: dict[str, Any]) -> str:
    """The calls in one line: counts, success ratio, setup times."""
    setup = c["setup"]
    return (
        f"{c['placed']} placed, {c['answered']} answered, {c['failed']} failed"
        + (f" ({_failures(c['failures'])})" if c["failures"] else "")
        + (f", {c['unfinished']} unfinished at the end" if c["unfinished"] else "")
        + (f", {c['dropped']} dropped mid-call" if c["dropped"] else "")
        + f"; success ratio {_ratio(c['success_ratio'])}; setup p50 {_ms(setup['p50'])} ms, "
        f"p95 {_ms(setup['p95'])} ms, max {_ms(setup['max'])} ms"
    )


def calls_table(c: dict[str, Any]) -> list[str]:
    """Per phase: when, how many, how well (setup in milliseconds)."""
    out = [
        "| phase | from (s) | to (s) | placed | in resiliency | answered | failed | success "
        "| setup p50 (ms) | p95 | max | failures |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, p in (c.get("phases") or {}).items():
        windows = p.get("windows") or [[None, None]]
        start, end = windows[0][0], windows[-1][1]
        setup = p["setup"]
        out.append(
            f"| {name}{' (step)' if p.get('pinned') else ''} "
            f"| {'start' if start is None else format(start, '.1f')} "
            f"| {'end' if end is None else format(end, '.1f')} | {p['placed']} "
            f"| {p['placed_in_resiliency']} | {p['answered']} | {p['failed']} "
            f"| {_ratio(p['success_ratio'])} | {_ms(setup['p50'])} | {_ms(setup['p95'])} "
            f"| {_ms(setup['max'])} | {_failures(p['failures'])} |"
        )
    o = c.get("outside")
    if o:
        setup = o["setup"]
        out.append(
            f"| (between the phases) | | | {o['placed']} | {o['placed_in_resiliency']} "
            f"| {o['answered']} | {o['failed']} | {_ratio(o['success_ratio'])} "
            f"| {_ms(setup['p50'])} | {_ms(setup['p95'])} | {_ms(setup['max'])} "
            f"| {_failures(o['failures'])} |"
        )
    return out


def fidelity_text(f: dict[str, Any]) -> str:
    """One line on how the clients' registration events agree with the wire."""
    if "error" in f:
        return f"not checked: {f['error']}"
    if not f.get("matched"):
        return f"no registration seen on the wire ({f.get('unmatched', 0)} in the events)"
    text = (
        f"{f['matched']} registrations matched their 200 OK on the wire"
        + (f", {f['unmatched']} not found" if f["unmatched"] else "")
        + f"; event minus wire p50 {f['p50_ms']:.2f} ms, p99 {f['p99_ms']:.2f} ms, "
        f"max {f['max_ms']:.2f} ms (bound {f['bound_ms']:g} ms: "
        f"{'held' if f['ok'] else 'NOT held'})"
    )
    if f.get("dns_queries_on_wire") is not None:
        text += (
            f"; DNS queries on the wire {f['dns_queries_on_wire']}, uncached lookups in the "
            f"events {f['dns_lookups_in_events']}"
        )
    return text


def _rpo_text(m: dict[str, Any]) -> str:
    writes = m.get("rpo_writes")
    age = m.get("rpo_seconds")
    text = "unknown" if writes is None else f"{writes} acknowledged write(s) lost"
    if writes and age is not None:
        text += f", the oldest {age:.1f} s old at the fault"
    for note in m.get("rpo_notes") or []:
        text += f"; {note}"
    return text


def _bound(b: dict[str, Any]) -> str:
    parts = []
    if "min" in b:
        parts.append(f">= {b['min']:g}")
    if "max" in b:
        parts.append(f"<= {b['max']:g}")
    return ", ".join(parts) or "-"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


#: The per-client metrics shown in tables, in order, with what they measure.
SHOWN = {
    "detect": "fault to the first failure noticed",
    "reconnect": "fault to the first successful REGISTER",
    "resiliency": "fault to resiliency mode",
    "full_service": "fault to full service",
    "full_after_failover": "pool failover started to full service",
    "home": "heal to full service on the home pool",
    "home_after_failback": "pool failback started to full service at home",
    "attempts": "registration attempts (count)",
    "backoff": "seconds of backoff",
}


def distribution_table(dists: dict[str, Any]) -> list[str]:
    out = [
        "| metric | n | missing | min | p50 | p90 | p95 | p99 | max |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in SHOWN:
        d = dists.get(name)
        if not d or (d["count"] == 0 and d["missing"] == 0):
            continue
        cells = [
            "-" if d[k] is None else f"{d[k]:.1f}"
            for k in ("min", "p50", "p90", "p95", "p99", "max")
        ]
        out.append(f"| {name} | {d['count']} | {d['missing']} | " + " | ".join(cells) + " |")
    return out
