"""Runs a drill's steps against a running lab and writes its report.

The engine only talks to a :class:`LabDriver`, so it is tested with a fake
lab and a fake clock. Whatever happens (a step fails, a wait times out, the
user presses Ctrl-C, the process gets SIGTERM) every fault the drill injected
is healed before the engine returns or re-raises.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, cast

from sipdrill.errors import FaultError, OperationError, SipdrillError
from sipdrill.orchestrator.drill import (
    AdminStep,
    ChaosStep,
    FaultStep,
    LoadedDrill,
    Step,
    WaitStep,
    WriteStep,
)
from sipdrill.orchestrator.measure import Measurements, measure
from sipdrill.orchestrator.report import Report, StepRecord
from sipdrill.orchestrator.timeline import EventCollector, MarkKind, Timeline

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
    #: Clients processes whose events the drill measures: name -> control URL.
    def event_sources(self) -> dict[str, str]: ...
    #: ``(lines, first kept seq, latest seq)`` of one clients process after ``after``.
    def fetch_events(self, url: str, after: int) -> tuple[list[str], int, int]: ...


class DrillInterrupted(SipdrillError):
    """The drill was interrupted by a signal; faults have been healed."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


class StepFailed(SipdrillError):
    def __init__(self, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.detail = detail or {}


Progress = Callable[[str], None]


#: A live view of the drill, for the terminal: see :meth:`DrillEngine._tick`.
Tick = Callable[[dict[str, Any]], None]


class _Interrupts:
    """What the signal handler does: raise DrillInterrupted, or, while cleanup
    runs (heal, report, stop the lab), only remember the signal: a Ctrl-C must
    never cut a heal short, and the report it asks for is still written."""

    def __init__(self) -> None:
        self.deferring = 0
        self.pending: int | None = None


INTERRUPTS = _Interrupts()


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Cleanup runs in here: a signal is recorded (INTERRUPTS.pending), not raised."""
    INTERRUPTS.deferring += 1
    try:
        yield
    finally:
        INTERRUPTS.deferring -= 1


@contextlib.contextmanager
def signals_interrupt(notice: Callable[[str], None] | None = None) -> Iterator[None]:
    """Turn the first SIGTERM or SIGINT into DrillInterrupted so `finally` blocks
    run; later ones, and any during cleanup, only say that healing is under way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    INTERRUPTS.pending = None

    def handler(signum: int, _frame: Any) -> None:
        if INTERRUPTS.pending is not None or INTERRUPTS.deferring:
            INTERRUPTS.pending = INTERRUPTS.pending or signum
            if notice is not None:
                notice("interrupted: still healing faults and stopping the lab, please wait")
            return
        INTERRUPTS.pending = signum
        raise DrillInterrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        INTERRUPTS.pending = None


class DrillEngine:
    """Runs the steps; measures the clients on one timeline (see
    :mod:`sipdrill.orchestrator.measure`).

    ``events``: where the timeline is written as it grows (``events.jsonl``);
    ``background_events``: read the clients' events in a thread as well as
    between polls (a live lab; tests on a fake clock read them in line);
    ``on_tick``: called on every poll with what a live display shows.
    """

    def __init__(
        self,
        loaded: LoadedDrill,
        driver: LabDriver,
        progress: Progress | None = None,
        *,
        runtime: str | None = None,
        events: IO[str] | None = None,
        background_events: bool = False,
        on_tick: Tick | None = None,
        chaos_dir: Path | None = None,
    ) -> None:
        self.loaded = loaded
        self.drill = loaded.drill
        self.driver = driver
        self.progress = progress or (lambda _m: None)
        self.runtime = runtime or self.drill.runtime
        self.events_stream = events
        self.background_events = background_events
        self.on_tick = on_tick
        #: Where a chaos step writes its history (``chaos-<step>.jsonl``).
        self.chaos_dir = chaos_dir
        self._handles: dict[str, str] = {}  # fault id -> driver handle
        self._fault_rows: dict[str, dict[str, Any]] = {}
        self._t0 = 0.0
        homes = {u.uri: u.home_pool for u in loaded.topology.all_users()}
        self.timeline = Timeline(0.0, homes, events)
        self._collector: EventCollector | None = None
        self._step: tuple[StepRecord, float] | None = None

    def _since(self) -> float:
        return self.driver.clock() - self._t0

    def run(self) -> Report:
        """Run every step and return the report. Whatever happens, every fault is
        healed first; an interrupt (SIGINT, SIGTERM) gives a report with status
        ``interrupted`` (exit code 130), not an exception."""
        d = self.driver
        report = Report(
            drill=self.drill.name,
            topology=self.loaded.topology_path,
            runtime=self.runtime,
            started_wall=d.wall(),
        )
        self._t0 = d.clock()
        self.timeline.t0_wall = report.started_wall
        self._collector = EventCollector(self.timeline, d.event_sources(), d.fetch_events)
        if self.background_events:
            self._collector.start()
        try:
            for i, step in enumerate(self.drill.steps):
                rec = StepRecord(
                    i,
                    step.describe(),
                    step.action,
                    self._since(),
                    timeout=step.timeout if step.wait is not None else None,
                )
                report.steps.append(rec)
                self._mark(MarkKind.STEP, rec.description, index=i, action=step.action)
                self.progress(f"step {i + 1}/{len(self.drill.steps)}: {rec.description}")
                start = d.clock()
                self._step = (rec, start)
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
                self._poll_events()
        except (DrillInterrupted, KeyboardInterrupt) as exc:
            report.status = "interrupted"
            report.error = str(exc) or "interrupted"
            if report.steps and report.steps[-1].status == "running":
                report.steps[-1].status = "interrupted"
                report.steps[-1].duration = d.clock() - self._t0 - report.steps[-1].started_at
            self.progress(f"[interrupted] {report.error}: healing every fault")
        finally:
            with deferred_interrupts():
                self._step = None
                report.healed = self._heal_everything(report)
                with contextlib.suppress(Exception):
                    report.data = d.data_report()
                report.duration = self._since()
                with contextlib.suppress(Exception):
                    self._collector.stop()
        with deferred_interrupts():
            self._finish(report)
        if INTERRUPTS.pending is not None and report.status != "interrupted":
            # Interrupted while healing or measuring: everything above still ran.
            report.status = "interrupted"
            report.error = f"interrupted by signal {INTERRUPTS.pending} while cleaning up"
        return report

    def _finish(self, report: Report) -> None:
        """Skipped steps, the measurements and the expectations: the report's end."""
        for i, _step in enumerate(self.drill.steps[len(report.steps) :], start=len(report.steps)):
            report.steps.append(
                StepRecord(i, _step.describe(), _step.action, report.duration, None, "skipped")
            )
        report.faults = list(self._fault_rows.values())
        step_phases = {i: s.phase for i, s in enumerate(self.drill.steps) if s.phase}
        measured = measure(self.timeline, report.duration, step_phases)
        report.measured = measured
        report.measurements = measured.summary()
        if self._collector is not None and self._collector.errors:
            # A clients process that never answered: its users are in no row.
            report.measurements["unread_sources"] = dict(self._collector.errors)
        report.expectations = self._check_expectations(report.metrics, measured)
        if report.status == "running":
            failed = [e for e in report.expectations if not e["ok"]]
            report.status = "failed" if failed else "passed"
            if failed:
                report.error = "expectations not met: " + ", ".join(e["metric"] for e in failed)
        if not report.healed and report.status == "passed":
            # A fault left in place is a failed drill, whatever the clients did.
            report.status = "failed"
            report.error = ("not every fault was healed" + (report.error or "")).rstrip("; ")

    # --- the timeline -----------------------------------------------------

    def _mark(self, mark: MarkKind, label: str, /, at: float | None = None, **detail: Any) -> float:
        """Record a mark at ``at`` (seconds since the start; default now)."""
        t = self._since() if at is None else at
        wall = self.driver.wall() - (self._since() - t)
        self.timeline.mark(mark, t, wall, label, **detail)
        return t

    def _poll_events(self) -> None:
        # With the collector's thread reading every 0.25 s, reading here as well
        # would only double the requests; stop() reads what is left at the end.
        if self._collector is not None and not self.background_events:
            self._collector.poll()

    def _tick(self, **extra: Any) -> None:
        """Tell the live display where the drill is (called on every poll)."""
        if self.on_tick is None or self._step is None:
            return
        rec, start = self._step
        info: dict[str, Any] = {
            "step": rec.index + 1,
            "steps": len(self.drill.steps),
            "description": rec.description,
            "elapsed": self.driver.clock() - start,
            "timeout": rec.timeout,
            "t": self._since(),
            "faults": [
                f"{r['kind']} {r['target']}"
                for fid, r in self._fault_rows.items()
                if fid in self._handles
            ],
            "events": self.timeline.events,
        }
        info.update(extra)
        with contextlib.suppress(Exception):  # a display bug must not end a drill
            self.on_tick(info)

    # --- steps ------------------------------------------------------------

    def _execute(self, step: Step) -> dict[str, Any]:
        if step.wait is not None:
            return self._wait(step.wait, step.timeout)
        if step.fault is not None:
            return self._inject(step.fault)
        if step.heal is not None:
            return self._heal(step.heal)
        if step.admin is not None:
            return self._admin(step.admin)
        if step.write is not None:
            return self._write(step.write)
        if step.sleep is not None:
            self._sleep(step.sleep)
            return {}
        if step.chaos is not None:
            return self._chaos(step.chaos)
        raise AssertionError("validated: one action")

    def _chaos(self, c: ChaosStep) -> dict[str, Any]:
        """Run the nemesis and the checker (docs/chaos.md); a violation fails
        the step. Every fault is healed at its end, the drill's own too."""
        # The chaos modules use the engine's interrupts: imported here, not above.
        from sipdrill.orchestrator.chaos.history import History
        from sipdrill.orchestrator.chaos.nemesis import NemesisConfig
        from sipdrill.orchestrator.chaos.runner import ChaosLab, ChaosRunner, ChaosSettings
        from sipdrill.orchestrator.plan import RuntimeKind

        if not all(hasattr(self.driver, m) for m in ("add_contact", "user_data", "leftovers")):
            raise StepFailed("this lab cannot run a chaos step (no writes, no leftover probe)")
        index = self._step[0].index + 1 if self._step is not None else 0
        config = NemesisConfig(
            duration=c.duration, max_faults=c.faults, kinds=tuple(c.kinds),
            max_concurrent=c.max_concurrent, gap=c.gap, hold=c.hold,
        )
        settings = ChaosSettings(
            seed=c.seed, nemesis=config, home_bound=c.home_bound, write_interval=c.write_interval
        )
        path = self.chaos_dir / f"chaos-step{index}.jsonl" if self.chaos_dir else None
        with contextlib.ExitStack() as stack:
            stream = stack.enter_context(path.open("w", encoding="utf-8")) if path else None
            history = History(stream, self._since, self.driver.wall)
            runner = ChaosRunner(
                cast(ChaosLab, self.driver), self.loaded.topology, RuntimeKind(self.runtime),
                settings, history, self.progress,
            )
            result = runner.run()
        for fid in list(self._handles):  # the runner's heal-all healed the drill's faults too
            self._handles.pop(fid)
            self._fault_rows[fid]["healed_at"] = self._since()
        if result.status == "interrupted":
            raise DrillInterrupted(INTERRUPTS.pending or signal.SIGINT)
        detail: dict[str, Any] = {"status": result.status, "history": str(path) if path else None}
        if result.verdict is not None:
            detail["verdict"] = result.verdict.to_json()
        if result.status != "valid":
            violations = result.verdict.violations if result.verdict is not None else ()
            what = "; ".join(f"{v.rule.value}: {v.message}" for v in violations[:5])
            raise StepFailed(f"chaos seed {c.seed}: {result.status}: {what or result.error}",
                             detail)
        return detail

    def _sleep(self, seconds: float) -> None:
        d = self.driver
        end = d.clock() + seconds
        while (left := end - d.clock()) > 0:
            d.sleep(min(POLL_INTERVAL * 2, left))
            self._poll_events()
            self._tick()

    def _admin(self, op: AdminStep) -> dict[str, Any]:
        start = self._since()
        outcome: dict[str, Any] = {"ok": False}
        try:
            result = self.driver.admin(op)
            outcome = {"ok": True, "result": result}
            return result
        except Exception as exc:
            outcome["error"] = str(exc)
            raise
        finally:
            self._mark(
                MarkKind.ADMIN,
                op.op,
                op=op.op,
                pool=op.pool,
                start=start,
                end=self._since(),
                **outcome,
            )

    def _write(self, op: WriteStep) -> dict[str, Any]:
        result = dict(self.driver.write(op))
        seqs = result.pop("acked_seqs", None) or {}
        for pool, walls in (result.pop("acked_walls", None) or {}).items():
            self.timeline.acknowledged_writes(pool, walls, seqs.get(pool))
        self._mark(MarkKind.WRITE, "write", users=op.users, **result)
        return result

    def _wait(self, w: WaitStep, timeout: float) -> dict[str, Any]:
        d = self.driver
        deadline = d.clock() + timeout
        last: dict[str, Any] = {}
        while True:
            self._poll_events()
            counts = d.client_counts()
            selected = [c for c in counts if _selected(c, w.users)]
            total = sum(c.count for c in selected)
            matching = sum(c.count for c in selected if _matches(c, w))
            last = {"matching": matching, "selected": total, "by_mode": _by_mode(selected)}
            self._tick(
                matching=matching,
                selected=total,
                want=w.mode + (f"@{w.pool}" if w.pool else ""),
                by_mode=_by_mode(counts),
                by_home=_by_home(counts),
            )
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
        fid = f.id or self._free_fault_id()
        # The fault's window opens when it was asked for, not when inject returned:
        # a restart returns once the service is healthy again, tens of seconds later,
        # and clients lose service meanwhile.
        asked = self._since()
        handle = self.driver.inject(f)
        self._handles[fid] = handle
        row = {"id": fid, "kind": f.kind, "target": f.target, "injected_at": asked}
        self._fault_rows[fid] = {**row, "healed_at": None}
        self._mark(
            MarkKind.FAULT, f"{f.kind} {f.target}", at=asked, returned_at=self._since(), **row
        )
        return {"fault": fid}

    def _free_fault_id(self) -> str:
        """``fault-N``, not taken by an explicit id of the drill file."""
        taken = set(self._fault_rows) | {
            s.fault.id for s in self.drill.steps if s.fault and s.fault.id
        }
        n = len(self._fault_rows) + 1
        while f"fault-{n}" in taken:
            n += 1
        return f"fault-{n}"

    def _heal(self, which: str) -> dict[str, Any]:
        ids = list(self._handles) if which == "all" else [which]
        for fid in ids:
            handle = self._handles.pop(fid, None)
            if handle is not None:
                asked = self._since()  # as for inject: undoing may take a while
                self.driver.undo(handle)
                row = self._fault_rows[fid]
                row["healed_at"] = asked
                self._mark(
                    MarkKind.HEAL,
                    f"heal {fid}",
                    at=asked,
                    returned_at=self._since(),
                    id=fid,
                    kind=row["kind"],
                    target=row["target"],
                )
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

    def _check_expectations(
        self, metrics: dict[str, float], measured: Measurements
    ) -> list[dict[str, Any]]:
        out = []
        for name, bound in self.drill.expect.items():
            value = metrics[name] if name in metrics else measured.value(name)
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
    if w.mode == "unregistered":  # no service anywhere: signed out, signing in, backing off
        return c.mode not in ("full", "resiliency")
    return c.mode == w.mode


def _by_home(counts: list[ClientCount]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for c in counts:
        key = c.mode if c.pool is None else f"{c.mode}@{c.pool}"
        row = out.setdefault(c.home_pool, {})
        row[key] = row.get(key, 0) + c.count
    return out


def _by_mode(counts: list[ClientCount]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        key = c.mode if c.pool is None else f"{c.mode}@{c.pool}"
        out[key] = out.get(key, 0) + c.count
    return out
