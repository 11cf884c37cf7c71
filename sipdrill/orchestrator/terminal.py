"""What a drill shows in the terminal: a live view while it runs, and a
compact summary at the end (the whole story is in the report files).

On a terminal the live view redraws in place (rich); piped or in CI it
prints one progress line every :data:`QUIET_LINE` seconds of a long step, so
a log never goes silent for a minute and a half.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from sipdrill.orchestrator.report import (
    SHOWN,
    Report,
    calls_line,
    fidelity_text,
    fmt_seconds,
    fmt_value,
)

__all__ = ["DrillDisplay", "print_summary", "summary_console"]

#: Seconds between two progress lines of one step when the output is not a terminal.
QUIET_LINE = 10.0
#: Width used when the output is not a terminal: wide enough that tables never wrap.
PIPE_WIDTH = 160


def summary_console(stderr: bool = False) -> Console:
    probe = Console(stderr=stderr)
    if probe.is_terminal:
        return probe
    return Console(stderr=stderr, width=PIPE_WIDTH, soft_wrap=False)


class DrillDisplay:
    """Progress lines and the live view of a running drill, on stderr."""

    def __init__(self, console: Console | None = None, live: bool | None = None) -> None:
        self.console = console or summary_console(stderr=True)
        self.live_enabled = self.console.is_terminal if live is None else live
        self._live: Live | None = None
        self._last_line: dict[int, float] = {}

    def __enter__(self) -> DrillDisplay:
        if self.live_enabled:
            self._live = Live(
                Text("starting..."), console=self.console, refresh_per_second=4, transient=True
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None

    def log(self, message: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        self.console.print(f"[dim]{stamp}[/dim] {message}", highlight=False, soft_wrap=True)

    def tick(self, info: dict[str, Any]) -> None:
        if self._live is not None:
            self._live.update(live_view(info))
            return
        # Not a terminal: one line now and then while a step takes long.
        step = int(info["step"])
        elapsed = float(info["elapsed"])
        last = self._last_line.get(step, 0.0)
        if elapsed - last < QUIET_LINE:
            return
        self._last_line[step] = elapsed
        self.log(f"  {progress_line(info)}")


def progress_line(info: dict[str, Any]) -> str:
    timeout = info.get("timeout")
    text = f"step {info['step']}: {info['elapsed']:.0f} s" + (
        f" of {timeout:g} s" if timeout else ""
    )
    if "want" in info:
        text += f", {info['matching']} of {info['selected']} clients in {info['want']}"
    if info.get("by_mode"):
        text += " (" + ", ".join(f"{k} {v}" for k, v in sorted(info["by_mode"].items())) + ")"
    return text


def live_view(info: dict[str, Any]) -> Group:
    timeout = info.get("timeout")
    head = Text.assemble(
        (f"step {info['step']}/{info['steps']}: ", "bold"),
        info["description"],
        f"  {info['elapsed']:.1f} s" + (f" of {timeout:g} s" if timeout else ""),
        f"   drill time {info['t']:.1f} s",
    )
    parts: list[Any] = [head]
    if "want" in info:
        parts.append(
            Text(f"waiting for {info['want']}: {info['matching']} of {info['selected']} clients")
        )
    by_home: dict[str, dict[str, int]] = info.get("by_home") or {}
    if by_home:
        states = sorted({k for row in by_home.values() for k in row})
        table = Table(box=None, pad_edge=False, show_edge=False)
        table.add_column("home pool")
        for st in states:
            table.add_column(st, justify="right")
        for home, row in sorted(by_home.items()):
            table.add_row(home, *(str(row.get(st, 0)) for st in states))
        parts.append(table)
    faults = info.get("faults") or []
    parts.append(Text(f"faults active: {', '.join(faults) if faults else 'none'}"))
    parts.append(Text(f"client events read: {info.get('events', 0)}", style="dim"))
    return Group(*parts)


def print_summary(report: Report, out_dir: Path | None, console: Console | None = None) -> None:
    """The compact end of a drill: steps, per-client percentiles, RTO/RPO,
    expectations, and where the report is."""
    c = console or summary_console()
    colour = {"passed": "green", "interrupted": "yellow"}.get(report.status, "red")
    c.print(
        f"[bold]drill {report.drill}[/bold]: [{colour}]{report.status.upper()}[/{colour}] "
        f"in {report.duration:.1f} s ({report.runtime} runtime)"
        + ("" if report.healed else "  [red]NOT every fault was healed[/red]"),
        highlight=False,
    )
    if report.error:
        c.print(f"  {report.error}", highlight=False, soft_wrap=True)
    steps = Table(title=None, box=None, pad_edge=False)
    for col, just in (("#", "right"), ("step", "left"), ("at", "right"), ("took", "right")):
        steps.add_column(col, justify=just, no_wrap=True, overflow="ellipsis")  # type: ignore[arg-type]
    steps.add_column("status")
    for s in report.steps:
        took = "-" if s.duration is None else f"{s.duration:.1f}"
        st = s.status if s.status == "passed" else f"[bold]{s.status}[/bold]"
        steps.add_row(str(s.index + 1), s.description, f"{s.started_at:.1f}", took, st)
    c.print(steps)
    m = report.measurements
    if m and "rto" in m:
        dists = m["distributions"]
        table = Table(box=None, pad_edge=False, title_justify="left")
        table.add_column("per client (s)", no_wrap=True)
        for col in ("n", "missing", "p50", "p95", "max"):
            table.add_column(col, justify="right", no_wrap=True)
        unreached = []
        for name in SHOWN:
            d = dists.get(name)
            if not d or (d["count"] == 0 and d["missing"] == 0):
                continue
            if d["count"] == 0:
                unreached.append(name)
            table.add_row(
                name,
                str(d["count"]),
                str(d["missing"] or ""),
                *("-" if d[k] is None else f"{d[k]:.1f}" for k in ("p50", "p95", "max")),
            )
        c.print(table)
        if unreached:
            # A column of "missing" alone reads as a failure; in budget DR (no
            # backup registrar, no failback) it is the design.
            c.print(
                f"no affected client reached {', '.join(unreached)}: the design has no such "
                "state, or it failed (see the expectations)",
                highlight=False,
            )
        rpo = "unknown" if m["rpo_writes"] is None else f"{m['rpo_writes']} write(s) lost"
        if m["rpo_writes"] and m.get("rpo_seconds") is not None:
            rpo += f", the oldest {m['rpo_seconds']:.1f} s old"
        c.print(
            f"[bold]RTO[/bold] {fmt_seconds(m['rto'])}   [bold]RPO[/bold] {rpo}   "
            f"({m['clients']} clients, {m['events']} events"
            + (f", {m['events_lost']} lost" if m["events_lost"] else "")
            + ")",
            highlight=False,
        )
    for source, why in ((m or {}).get("unread_sources") or {}).items():
        c.print(f"[red]events of {source} could not be read[/red] ({why})", highlight=False)
    if m and m.get("fidelity"):
        c.print(f"wire check: {fidelity_text(m['fidelity'])}", highlight=False, soft_wrap=True)
    if report.metrics:
        c.print(
            "step metrics: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.metrics.items()),
            highlight=False,
        )
    calls = (m or {}).get("calls")
    if calls:
        c.print(f"[bold]calls[/bold] {calls_line(calls)}", highlight=False, soft_wrap=True)
        for name, p in (calls.get("phases") or {}).items():
            ratio = "-" if p["success_ratio"] is None else f"{p['success_ratio']:.3f}"
            c.print(
                f"  {name}: {p['answered']}/{p['answered'] + p['failed']} answered "
                f"(success {ratio})",
                highlight=False,
            )
    for e in report.expectations:
        value = fmt_value(e["value"])
        bound = ", ".join(f"{'<=' if k == 'max' else '>='} {v:g}" for k, v in e["bound"].items())
        ok = "[green]ok[/green]" if e["ok"] else "[red]NOT MET[/red]"
        c.print(f"expect {e['metric']} {bound}: {value} {ok}", highlight=False)
    if out_dir is not None:
        html = out_dir / "report.html"
        c.print(
            f"report: {html} (open it in a browser; it needs no network), "
            f"{out_dir / 'report.md'}, {out_dir / 'clients.csv'}, {out_dir / 'events.jsonl'}",
            highlight=False,
            soft_wrap=True,
        )
