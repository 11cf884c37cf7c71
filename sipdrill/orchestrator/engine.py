"""Runs a drill's steps against a running lab and writes its report.

The engine only talks to a :class:`LabDriver`, so it is tested with a fake
lab and a fake clock. Whatever happens (a step fails, a wait times out, the
user presses Ctrl-C, the process gets SIGTERM) every fault the drill injected
is healed before the engine returns or re-raises.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sipdrill.errors import FaultError, OperationError, SipdrillError
from sipdrill.orchestrator.drill import AdminStep, FaultStep, LoadedDrill, Step, WaitStep, WriteStep

#: How often a wait step polls the clients.
POLL_INTERVAL = 0.5


@dataclass(frozen=True)
class ClientCount:
    """How many clients homed on ``home_pool`` are in ``mode`` on ``pool``."""

    home_pool: str
    mode: str  # full, resiliency, signed-out, signing-in, backing-off ...
    pool: str | None
    count: int


class LabDriver(Protocol):
    def clock(self) -> float: ...  # monotonic seconds
    def wall(self) -> float: ...  # Unix time
    def sleep(self, seconds: float) -> None: ...
    def client_counts(self) -> list[ClientCount]: ...
    def inject(self, fault: FaultStep) -> str: ...  # returns a handle for undo
    def undo(self, handle: str) -> None: ...
    def heal_all(self) -> None: ...
    def admin(self, op: AdminStep) -> dict[str, Any]: ...
    def write(self, op: WriteStep) -> dict[str, Any]: ...
    def data_report(self) -> dict[str, Any]: ...


class DrillInterrupted(SipdrillError):
    """The drill was interrupted by a signal; faults have been healed."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


class StepFailed(SipdrillError):
    def __init__(self, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.detail = detail or {}


@dataclass
class StepRecord:
    index: int
    description: str
    action: str
    started_at: float  # seconds since the drill started
    duration: float | None = None
    status: str = "running"  # passed, failed, skipped, interrupted
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    drill: str
    topology: str
    runtime: str
    started_wall: float
    status: str = "running"  # passed, failed, interrupted
    error: str | None = None
    steps: list[StepRecord] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    expectations: list[dict[str, Any]] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    healed: bool = False
    duration: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    def to_markdown(self) -> str:
        out = [
            f"# Drill report: {self.drill}",
            "",
            f"- status: **{self.status}**" + (f" ({self.error})" if self.error else ""),
            f"- topology: `{self.topology}`, runtime: {self.runtime}",
            f"- started: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(self.started_wall))}, "
            f"duration {self.duration:.1f} s",
            f"- every fault healed: {'yes' if self.healed else 'NO'}",
            "",
            "## Steps",
            "",
            "| # | step | at (s) | took (s) | status |",
            "|---|---|---|---|---|",
        ]
        for s in self.steps:
            took = f"{s.duration:.1f}" if s.duration is not None else "-"
            out.append(
                f"| {s.index + 1} | {s.description} | {s.started_at:.1f} | {took} | {s.status} |"
            )
        if self.metrics:
            out += ["", "## Metrics", "", "| metric | seconds |", "|---|---|"]
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
                value = "-" if e["value"] is None else f"{e['value']:.1f}"
                out.append(
                    f"| {e['metric']} | {e['bound']} | {value} | {'yes' if e['ok'] else 'NO'} |"
                )
        if self.faults:
            out += [
                "",
                "## Faults",
                "",
                "| fault | target | injected (s) | healed (s) |",
                "|---|---|---|---|",
            ]
            for f in self.faults:
                healed = "-" if f.get("healed_at") is None else f"{f['healed_at']:.1f}"
                out.append(f"| {f['kind']} | {f['target']} | {f['injected_at']:.1f} | {healed} |")
        ops = self.data.get("operations") or []
        writes = self.data.get("writes") or {}
        if ops or writes:
            out += ["", "## Data: what was kept and what was lost", ""]
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
                    line += (
                        f"; the earlier failover lost {earlier} write(s) taken after the last sync"
                    )
                out.append(line)
        if self.data:
            out += ["", "## Raw data", "", "```json", json.dumps(self.data, indent=2), "```"]
        return "\n".join(out) + "\n"

    def write(self, directory: Path) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        j = directory / "report.json"
        m = directory / "report.md"
        j.write_text(self.to_json())
        m.write_text(self.to_markdown())
        return j, m


Progress = Callable[[str], None]


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Turn SIGTERM (and SIGINT) into DrillInterrupted so `finally` blocks run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        raise DrillInterrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class DrillEngine:
    def __init__(
        self, loaded: LoadedDrill, driver: LabDriver, progress: Progress | None = None
    ) -> None:
        self.loaded = loaded
        self.drill = loaded.drill
        self.driver = driver
        self.progress = progress or (lambda _m: None)
        self._handles: dict[str, str] = {}  # fault id -> driver handle
        self._fault_rows: dict[str, dict[str, Any]] = {}
        self._t0 = 0.0

    def _since(self) -> float:
        return self.driver.clock() - self._t0

    def run(self) -> Report:
        d = self.driver
        report = Report(
            drill=self.drill.name,
            topology=self.loaded.topology_path,
            runtime=self.drill.runtime,
            started_wall=d.wall(),
        )
        self._t0 = d.clock()
        interrupted: DrillInterrupted | KeyboardInterrupt | None = None
        try:
            for i, step in enumerate(self.drill.steps):
                rec = StepRecord(i, step.describe(), step.action, self._since())
                report.steps.append(rec)
                self.progress(f"step {i + 1}/{len(self.drill.steps)}: {rec.description}")
                start = d.clock()
                try:
                    rec.detail = self._execute(step)
                except (DrillInterrupted, KeyboardInterrupt):
                    raise
                except Exception as exc:
                    # Refusals and timeouts are expected outcomes; anything else
                    # (a lab service that vanished mid-request) still ends the
                    # drill with a report, never with a traceback and no report.
                    rec.status = "failed"
                    rec.duration = d.clock() - start
                    expected = isinstance(exc, (StepFailed, OperationError, FaultError))
                    if not expected:
                        exc = StepFailed(f"{type(exc).__name__}: {exc}")
                    rec.detail = getattr(exc, "detail", {}) or {"error": str(exc)}
                    report.status = "failed"
                    report.error = f"step {i + 1} ({rec.description}): {exc}"
                    self.progress(f"[failed] {report.error}")
                    break
                rec.duration = d.clock() - start
                rec.status = "passed"
                if step.measure:
                    report.metrics[step.measure] = rec.duration
                    self.progress(f"{step.measure} = {rec.duration:.1f} s")
        except (DrillInterrupted, KeyboardInterrupt) as exc:
            interrupted = exc
            report.status = "interrupted"
            report.error = str(exc) or "interrupted"
            if report.steps and report.steps[-1].status == "running":
                report.steps[-1].status = "interrupted"
        finally:
            report.healed = self._heal_everything(report)
            with contextlib.suppress(Exception):
                report.data = d.data_report()
            report.duration = self._since()
        for i, _step in enumerate(self.drill.steps[len(report.steps) :], start=len(report.steps)):
            report.steps.append(
                StepRecord(i, _step.describe(), _step.action, report.duration, None, "skipped")
            )
        report.faults = list(self._fault_rows.values())
        report.expectations = self._check_expectations(report.metrics)
        if report.status == "running":
            failed = [e for e in report.expectations if not e["ok"]]
            report.status = "failed" if failed else "passed"
            if failed:
                report.error = "expectations not met: " + ", ".join(e["metric"] for e in failed)
        if interrupted is not None:
            raise interrupted
        return report

    # --- steps ------------------------------------------------------------

    def _execute(self, step: Step) -> dict[str, Any]:
        if step.wait is not None:
            return self._wait(step.wait, step.timeout)
        if step.fault is not None:
            return self._inject(step.fault)
        if step.heal is not None:
            return self._heal(step.heal)
        if step.admin is not None:
            return self.driver.admin(step.admin)
        if step.write is not None:
            return self.driver.write(step.write)
        if step.sleep is not None:
            self.driver.sleep(step.sleep)
            return {}
        raise AssertionError("validated: one action")

    def _wait(self, w: WaitStep, timeout: float) -> dict[str, Any]:
        d = self.driver
        deadline = d.clock() + timeout
        last: dict[str, Any] = {}
        while True:
            counts = d.client_counts()
            selected = [c for c in counts if _selected(c, w.users)]
            total = sum(c.count for c in selected)
            matching = sum(c.count for c in selected if _matches(c, w))
            last = {"matching": matching, "selected": total, "by_mode": _by_mode(selected)}
            if total > 0 and matching >= w.fraction * total:
                return last
            if d.clock() >= deadline:
                raise StepFailed(
                    f"timed out after {timeout:g} s: {matching} of {total} clients "
                    f"{'(' + w.users + ') ' if w.users != '*' else ''}in mode {w.mode}"
                    + (f" on {w.pool}" if w.pool else ""),
                    last,
                )
            d.sleep(POLL_INTERVAL)

    def _inject(self, f: FaultStep) -> dict[str, Any]:
        fid = f.id or f"fault-{len(self._fault_rows) + 1}"
        handle = self.driver.inject(f)
        self._handles[fid] = handle
        self._fault_rows[fid] = {
            "id": fid,
            "kind": f.kind,
            "target": f.target,
            "injected_at": self._since(),
            "healed_at": None,
        }
        return {"fault": fid}

    def _heal(self, which: str) -> dict[str, Any]:
        ids = list(self._handles) if which == "all" else [which]
        for fid in ids:
            handle = self._handles.pop(fid, None)
            if handle is not None:
                self.driver.undo(handle)
                self._fault_rows[fid]["healed_at"] = self._since()
        return {"healed": ids}

    def _heal_everything(self, report: Report) -> bool:
        ok = True
        for fid in list(self._handles):
            try:
                self._heal(fid)
            except Exception as exc:  # keep healing the others; report it
                ok = False
                report.error = (report.error or "") + f"; heal {fid} failed: {exc}"
        try:
            self.driver.heal_all()
        except Exception as exc:
            ok = False
            report.error = (report.error or "") + f"; heal_all failed: {exc}"
        return ok

    def _check_expectations(self, metrics: dict[str, float]) -> list[dict[str, Any]]:
        out = []
        for name, bound in self.drill.expect.items():
            value = metrics.get(name)
            ok = value is not None
            if value is not None and bound.max is not None and value > bound.max:
                ok = False
            if value is not None and bound.min is not None and value < bound.min:
                ok = False
            out.append(
                {
                    "metric": name,
                    "bound": bound.model_dump(exclude_none=True),
                    "value": value,
                    "ok": ok,
                }
            )
        return out


def _selected(c: ClientCount, selector: str) -> bool:
    return selector == "*" or c.home_pool == selector.split(":", 1)[0]


def _matches(c: ClientCount, w: WaitStep) -> bool:
    if w.pool is not None and c.pool != w.pool:
        return False
    if w.mode == "registered":
        return c.mode in ("full", "resiliency")
    return c.mode == w.mode


def _by_mode(counts: list[ClientCount]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        key = c.mode if c.pool is None else f"{c.mode}@{c.pool}"
        out[key] = out.get(key, 0) + c.count
    return out
