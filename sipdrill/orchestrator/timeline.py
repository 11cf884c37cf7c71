"""One timeline for a drill: the clients' events and the orchestrator's own
marks (faults, heals, administrator operations, writes) on one clock.

Every entry has ``t``, seconds since the drill started, and ``wall``, Unix
time. Client events carry only their wall time (each clients process has its
own monotonic clock), so their ``t`` is ``wall - t0_wall``; the orchestrator's
marks take ``t`` from its monotonic clock and ``wall`` from the system clock.

The timeline keeps what the measurements need as compact tuples per user
(:data:`CompactEvent`) and writes every entry, as it arrives, to
``events.jsonl`` when given a stream: nothing is kept only in memory. The
call workload's events (``CallPlaced`` ... ``CallEnded``) become one
:class:`CallRecord` per call.
:class:`EventCollector` pulls the clients' events from their control APIs
(``GET /events.jsonl``) in a thread, so events keep arriving while a step
blocks (a pool failover takes seconds).
"""

from __future__ import annotations

import enum
import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Any

__all__ = [
    "CallRecord",
    "CompactEvent",
    "EventCollector",
    "Mark",
    "MarkKind",
    "Timeline",
]


class MarkKind(enum.Enum):
    """What the orchestrator itself did."""

    STEP = "StepStarted"
    FAULT = "FaultInjected"
    HEAL = "FaultHealed"
    ADMIN = "AdminOperation"
    WRITE = "UserDataWritten"


@dataclass(frozen=True, slots=True)
class Mark:
    kind: MarkKind
    t: float
    wall: float
    label: str
    #: FAULT/HEAL: ``id``, ``kind``, ``target``; ADMIN: ``op``, ``pool``,
    #: ``end`` (t when it returned), ``ok`` and the operation's result.
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "t": round(self.t, 6),
            "wall": self.wall,
            "process": "orchestrator",
            "event": self.kind.value,
            "label": self.label,
            **self.detail,
        }


#: One client event, as the measurements need it:
#: ``(t, kind, pool, mode_or_failure, flag, value)`` where kind is one of
#: ``M`` ModeChanged (mode = the new mode, flag = the old mode was registered),
#: ``R`` Registered (mode, flag = a refresh), ``F`` TargetFailed (the failure),
#: ``D`` Redirected, ``B`` RetryScheduled (value = the backoff delay).
CompactEvent = tuple[float, str, "str | None", "str | None", bool, float]

_REGISTERED = frozenset({"FullService", "ResiliencyMode"})

_CALL_EVENTS = frozenset({"CallPlaced", "CallAnswered", "CallFailed", "CallEnded"})


@dataclass(slots=True)
class CallRecord:
    """One call of the call workload, from its caller's events (``t``: drill clock)."""

    user: str
    call_id: str
    target: str = ""
    #: When the INVITE went (from CallPlaced, else the outcome less its duration).
    placed: float | None = None
    #: The caller's mode then (FullService, ResiliencyMode).
    mode: str | None = None
    #: "answered" (a 2xx) or "failed" (a final 3xx-6xx or none); None: no outcome yet.
    outcome: str | None = None
    #: The INVITE's final status (None: none came, or no outcome yet).
    status: int | None = None
    #: Seconds from the INVITE to its 2xx.
    setup: float | None = None
    ended: bool = False
    #: The flow went during the call (it ended without a BYE).
    dropped: bool = False
    #: The BYE got a 2xx (None: not ended yet, or hung up by the callee).
    bye_ok: bool | None = None


class Timeline:
    """The drill's timeline. ``homes`` maps a user's URI to its home pool."""

    def __init__(
        self,
        t0_wall: float,
        homes: dict[str, str],
        stream: IO[str] | None = None,
    ) -> None:
        self.t0_wall = t0_wall
        self.homes = homes
        self.stream = stream
        self.marks: list[Mark] = []
        self.users: dict[str, list[CompactEvent]] = {}
        #: Events ingested, and events a clients process dropped before we read them.
        self.events = 0
        self.events_lost = 0
        #: Uncached DnsLookup events: the DNS queries the clients say they sent.
        self.dns_queries = 0
        #: Acknowledged writes per home pool: the t of each acknowledgement.
        self.writes: dict[str, list[float]] = {}
        #: The call workload's calls, by (caller, Call-ID), in the order first seen.
        self.calls: dict[tuple[str, str], CallRecord] = {}
        #: ``(t, seq)`` of those writes whose seq in their pool's change feed the
        #: driver knows: an export at seq S holds exactly the writes with seq <= S.
        self.write_seqs: dict[str, list[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    # --- the orchestrator's marks ------------------------------------------

    def mark(self, mark: MarkKind, t: float, wall: float, label: str, /, **detail: Any) -> Mark:
        m = Mark(mark, t, wall, label, detail)
        with self._lock:
            self.marks.append(m)
            if self.stream is not None:
                # Flushed at once: a drill killed now still leaves its timeline.
                self.stream.write(json.dumps(m.to_dict(), default=str) + "\n")
                self.stream.flush()
        return m

    def acknowledged_writes(
        self, pool: str, walls: Iterable[float], seqs: Iterable[int] | None = None
    ) -> None:
        ts = [w - self.t0_wall for w in walls]
        with self._lock:
            self.writes.setdefault(pool, []).extend(ts)
            if seqs is not None:
                self.write_seqs.setdefault(pool, []).extend(zip(ts, seqs, strict=True))

    # --- the clients' events -----------------------------------------------

    def ingest(self, source: str, lines: Iterable[str], lost: int = 0) -> int:
        """Take a clients process's JSON lines; returns how many were read."""
        loads = json.loads
        t0 = self.t0_wall
        users = self.users
        out: list[str] = []
        n = 0
        # "process", not "source": TargetFailed has a field of that name.
        prefix = '{"process":' + json.dumps(source) + ',"t":'
        with self._lock:
            self.events_lost += lost
            for line in lines:
                if not line:
                    continue
                try:
                    e = loads(line)
                    t = e["wall"] - t0
                    user = e["user"]
                    kind = e["event"]
                except (ValueError, KeyError, TypeError):
                    continue  # not an event: nothing to measure, nothing to keep
                n += 1
                out.append(f"{prefix}{t:.6f},{line[1:]}\n")
                if kind == "DnsLookup" and not e.get("cached"):
                    self.dns_queries += 1
                if kind in _CALL_EVENTS:
                    self._call_event(kind, t, user, e)
                    continue
                compact = _compact(kind, t, e)
                if compact is not None:
                    evs = users.get(user)
                    if evs is None:
                        evs = users[user] = []
                    evs.append(compact)
            self.events += n
            if self.stream is not None and out:
                self.stream.write("".join(out))
                self.stream.flush()
        return n

    def _call_event(self, kind: str, t: float, user: str, e: dict[str, Any]) -> None:
        key = (user, str(e.get("call_id") or ""))
        rec = self.calls.get(key)
        if rec is None:
            rec = self.calls[key] = CallRecord(user, key[1], str(e.get("target") or ""))
        if kind == "CallPlaced":
            rec.placed = t
            rec.mode = e.get("mode")
        elif kind == "CallAnswered":
            rec.outcome, rec.status = "answered", e.get("status_code")
            rec.setup = float(e.get("setup") or 0.0)
            if rec.placed is None:  # its CallPlaced was lost: the answer says when
                rec.placed = t - rec.setup
                rec.mode = e.get("mode")
        elif kind == "CallFailed":
            rec.outcome, rec.status = "failed", e.get("status_code")
            if rec.placed is None:
                rec.placed = t - float(e.get("elapsed") or 0.0)
                rec.mode = e.get("mode")
        else:  # CallEnded
            rec.ended = True
            rec.dropped = bool(e.get("dropped"))
            rec.bye_ok = None if e.get("by_remote") else bool(e.get("ok"))

    def flush(self) -> None:
        with self._lock:
            if self.stream is not None:
                self.stream.flush()


def _compact(kind: str, t: float, e: dict[str, Any]) -> CompactEvent | None:
    if kind == "ModeChanged":
        return (t, "M", e.get("pool"), e.get("new"), e.get("old") in _REGISTERED, 0.0)
    if kind == "Registered":
        return (t, "R", e.get("pool"), e.get("mode"), bool(e.get("refresh")), 0.0)
    if kind == "TargetFailed":
        return (t, "F", e.get("pool"), e.get("failure"), False, 0.0)
    if kind == "Redirected":
        return (t, "D", e.get("pool"), None, False, 0.0)
    if kind == "RetryScheduled":
        return (t, "B", e.get("pool"), None, False, float(e.get("delay") or 0.0))
    return None


def _seq(line: str) -> int | None:
    try:
        return int(json.loads(line)["seq"])
    except (ValueError, KeyError, TypeError):
        return None


Fetch = Callable[[str, int], tuple[list[str], int, int]]


class EventCollector:
    """Pulls every clients process's events into a :class:`Timeline`.

    ``fetch(url, after)`` returns ``(lines, first_kept_seq, latest_seq)``; the
    collector remembers the last seq read per process, so a drill reads each
    event once, and counts the events a process dropped from its ring buffer
    before they were read (``first_kept_seq`` past ``after + 1``).
    """

    def __init__(
        self,
        timeline: Timeline,
        sources: dict[str, str],
        fetch: Fetch,
        interval: float = 0.25,
    ) -> None:
        self.timeline = timeline
        self.sources = sources  # name -> control URL
        self.fetch = fetch
        self.interval = interval
        self.after = dict.fromkeys(sources, 0)
        self.errors: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll_lock = threading.Lock()

    def poll(self) -> int:
        """Read what is new from every process (until each says it has no more)."""
        total = 0
        with self._poll_lock:
            for name, url in self.sources.items():
                while True:
                    after = self.after[name]
                    try:
                        lines, _first, latest = self.fetch(url, after)
                    except Exception as exc:  # a process that does not answer: try next time
                        self.errors[name] = f"{type(exc).__name__}: {exc}"
                        break
                    self.errors.pop(name, None)
                    if not lines:
                        if latest < after:  # restarted, and nothing new yet
                            self.after[name] = 0
                        break
                    # Positions from the lines themselves, not the headers: the buffer
                    # may have moved between the two.
                    first_seq, last_seq = _seq(lines[0]), _seq(lines[-1])
                    if first_seq is None or last_seq is None:
                        break  # not our lines: try again next time
                    if first_seq <= after:  # the process restarted: its seqs start again
                        after = 0
                    lost = max(0, first_seq - (after + 1))
                    total += self.timeline.ingest(name, lines, lost)
                    self.after[name] = last_seq
                    if last_seq >= latest:
                        break
        return total

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="event-collector", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def stop(self) -> None:
        """Stop the thread and read what is left, so the report sees every event."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.poll()
        self.timeline.flush()
