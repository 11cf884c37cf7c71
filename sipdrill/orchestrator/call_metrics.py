"""The call workload's numbers: call success ratio and setup time, per phase.

Pure functions over the timeline's :class:`~.timeline.CallRecord` s and the
orchestrator's marks (docs/measurements.md, "Calls"). A call counts in the
phase in which its INVITE was sent. The phases come from the marks:

- ``before``: until the first fault;
- ``resiliency``: from a fault until a pool failover starts or the fault is
  healed (the users of the failed pool are on their backup registrar, or on
  their way there);
- ``failover``: from the start of a pool failover until the pool failback
  starts (full service on the backup pool);
- ``failback``: from the heal (automatic registrar failback) or the start
  of a pool failback, on.

A drill step can pin a phase instead (``phase: resiliency`` on a step): the
phase is then the time that step ran (the steps naming it, together), so a
drill can measure the steady state it waited for rather than the transition.

Per phase: ``placed``, ``answered`` (a 2xx), ``failed`` (a final 3xx-6xx, or
none: a timeout or the caller's flow lost), ``unfinished`` (no outcome by the
drill's end), ``dropped`` (answered, then the flow went before the BYE),
``success_ratio`` = answered / (answered + failed), and the ``setup`` time
(INVITE to 2xx) distribution.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from sipdrill.orchestrator.timeline import CallRecord, Mark, MarkKind, Timeline

if TYPE_CHECKING:
    from sipdrill.orchestrator.measure import Distribution

__all__ = [
    "AUTO_PHASES",
    "CALL_VALUES",
    "CallMeasurements",
    "CallStats",
    "PhaseWindow",
    "call_phases",
    "is_call_metric",
    "measure_calls",
]

#: The phases the marks give, in the order a drill goes through them.
AUTO_PHASES = ("before", "resiliency", "failover", "failback")
#: What a phase has (and ``setup.<stat>``).
CALL_VALUES = ("placed", "answered", "failed", "unfinished", "dropped", "success_ratio")
_STATS = ("count", "missing", "min", "p50", "p90", "p95", "p99", "max", "mean")


@dataclass(frozen=True)
class PhaseWindow:
    name: str
    start: float
    end: float  # math.inf: to the drill's end
    pinned: bool = False  # a step's window, not the marks'

    def holds(self, t: float) -> bool:
        return self.start <= t < self.end


def _ok_admin(m: Mark, op: str) -> bool:
    return m.kind is MarkKind.ADMIN and m.detail.get("op") == op and bool(m.detail.get("ok"))


def call_phases(
    marks: Sequence[Mark], step_phases: Mapping[int, str] | None = None
) -> list[PhaseWindow]:
    """The phase windows, in time order (pinned ones after the automatic ones)."""
    cuts: list[tuple[float, str]] = []
    for m in marks:
        if m.kind is MarkKind.FAULT:
            cuts.append((m.t, "fault"))
        elif m.kind is MarkKind.HEAL:
            cuts.append((m.t, "heal"))
        elif _ok_admin(m, "pool-failover"):
            cuts.append((float(m.detail.get("start", m.t)), "failover"))
        elif _ok_admin(m, "pool-failback"):
            cuts.append((float(m.detail.get("start", m.t)), "failback"))
    cuts.sort(key=lambda c: c[0])
    windows: list[PhaseWindow] = []
    phase, since = "before", -math.inf
    for t, what in cuts:
        new = phase
        if what == "fault" and phase in ("before", "failback"):
            new = "resiliency"
        elif what == "failover":
            new = "failover"
        elif what == "heal" and phase == "resiliency":
            new = "failback"  # the registrar sends the users home by itself
        elif what == "failback":
            new = "failback"
        if new != phase:
            if t > since:
                windows.append(PhaseWindow(phase, since, t))
            phase, since = new, t
    windows.append(PhaseWindow(phase, since, math.inf))
    pinned = _pinned(marks, step_phases or {})
    names = {w.name for w in pinned}
    return [w for w in windows if w.name not in names] + pinned


def _pinned(marks: Sequence[Mark], step_phases: Mapping[int, str]) -> list[PhaseWindow]:
    steps = sorted(
        (m.t, int(m.detail.get("index", -1))) for m in marks if m.kind is MarkKind.STEP
    )
    out = []
    for i, (t, index) in enumerate(steps):
        name = step_phases.get(index)
        if name:
            end = steps[i + 1][0] if i + 1 < len(steps) else math.inf
            out.append(PhaseWindow(name, t, end, pinned=True))
    return out


def _setup(values: list[float]) -> Distribution:
    # The drill's own distribution (nearest rank), so a call's setup time reads
    # like every other measurement; ``missing`` stays 0 (unanswered calls are
    # the success ratio's).
    from sipdrill.orchestrator.measure import distribution

    return distribution(values)


@dataclass
class CallStats:
    placed: int = 0
    answered: int = 0
    failed: int = 0
    unfinished: int = 0
    dropped: int = 0
    success_ratio: float | None = None
    setup: Distribution = field(default_factory=lambda: _setup([]))
    #: Failed calls by their status ("none": no final answer came).
    failures: dict[str, int] = field(default_factory=dict)
    #: Calls placed in resiliency mode (the caller on its backup registrar).
    placed_in_resiliency: int = 0

    def value(self, key: str) -> float | None:
        if key in CALL_VALUES:
            v = getattr(self, key)
            return None if v is None else float(v)
        stat = key.removeprefix("setup.")
        if key.startswith("setup.") and stat in _STATS:
            if stat == "missing":
                return float(self.failed)
            v = getattr(self.setup, stat)
            return None if v is None else float(v)
        return None


def _stats(records: Iterable[CallRecord]) -> CallStats:
    s = CallStats()
    setups: list[float] = []
    for r in records:
        s.placed += 1
        if r.mode == "ResiliencyMode":
            s.placed_in_resiliency += 1
        if r.outcome == "answered":
            s.answered += 1
            if r.setup is not None:
                setups.append(r.setup)
            if r.dropped:
                s.dropped += 1
        elif r.outcome == "failed":
            s.failed += 1
            key = "none" if r.status is None else str(r.status)
            s.failures[key] = s.failures.get(key, 0) + 1
        else:
            s.unfinished += 1
    decided = s.answered + s.failed
    s.success_ratio = s.answered / decided if decided else None
    s.setup = _setup(setups)
    s.failures = dict(sorted(s.failures.items()))
    return s


@dataclass
class CallMeasurements:
    overall: CallStats
    phases: dict[str, CallStats]
    windows: list[PhaseWindow]
    #: Calls placed in no phase (between pinned steps: the transitions); None if none.
    outside: CallStats | None = None

    def value(self, name: str) -> float | None:
        """``success_ratio``, ``setup.p95``, ``<phase>.success_ratio``, ...
        (the part after ``calls.``)."""
        head, _, rest = name.partition(".")
        if head in self.phases and rest:
            return self.phases[head].value(rest)
        return self.overall.value(name)

    def summary(self) -> dict[str, Any]:
        def one(s: CallStats) -> dict[str, Any]:
            return asdict(s)

        return {
            **one(self.overall),
            "phases": {
                name: {
                    **one(stats),
                    "windows": [
                        [w.start if math.isfinite(w.start) else None,
                         w.end if math.isfinite(w.end) else None]
                        for w in self.windows if w.name == name
                    ],
                    "pinned": any(w.pinned for w in self.windows if w.name == name),
                }
                for name, stats in self.phases.items()
            },
            "outside": None if self.outside is None else one(self.outside),
        }


def measure_calls(
    timeline: Timeline, step_phases: Mapping[int, str] | None = None
) -> CallMeasurements | None:
    """The calls' numbers, overall and per phase; None when no call was placed."""
    records = [r for r in timeline.calls.values() if r.placed is not None]
    if not records:
        return None
    windows = call_phases(timeline.marks, step_phases)
    names = list(dict.fromkeys(w.name for w in windows))
    phases = {}
    for name in names:
        mine = [w for w in windows if w.name == name]
        phases[name] = _stats(
            r for r in records if any(w.holds(r.placed) for w in mine)  # type: ignore[arg-type]
        )
    outside = [r for r in records if not any(w.holds(r.placed) for w in windows)]  # type: ignore[arg-type]
    return CallMeasurements(
        _stats(records), phases, windows, _stats(outside) if outside else None
    )


def is_call_metric(name: str, phases: Iterable[str] = ()) -> bool:
    """``calls.<value>``, ``calls.setup.<stat>`` or the same after ``calls.<phase>.``."""
    head, dot, rest = name.partition(".")
    if head != "calls" or not dot:
        return False
    known = set(AUTO_PHASES) | set(phases)
    first, _, after = rest.partition(".")
    if first in known and after:
        rest = after
    if rest in CALL_VALUES:
        return True
    stat = rest.removeprefix("setup.")
    return rest.startswith("setup.") and stat in _STATS
