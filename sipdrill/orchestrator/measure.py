"""Per-client reconnect measurements, their distributions, RTO and RPO.

Pure functions over a :class:`~sipdrill.orchestrator.timeline.Timeline`: no
clock, no I/O, so every number is tested on synthetic timelines. The
definitions are in ``docs/measurements.md``; in short, for each fault and each
client that *lost service* after it (was registered, then was not):

- ``detect``: fault to the first failure the client noticed (a failed target
  or the loss of its registration);
- ``reconnect``: fault to the first successful REGISTER anywhere;
- ``resiliency``: fault to resiliency mode (limited service on the backup);
- ``full_service``: fault to full service, wherever it came from;
- ``full_after_failover``: the start of the pool failover of the client's
  home pool to its full service;
- ``home``: the heal to full service on the home pool (0: already home);
- ``home_after_failback``: the start of the pool failback to full service home;
- ``attempts``, ``redirects``, ``backoff`` (seconds of RFC 5626 backoff).

RTO is the fault to the last affected client in full service; RPO the
acknowledged writes a pool failover lost (or, in the budget DR design, writes
after the export the DR pool restored), and the age of the oldest of them
when the fault struck. The call workload's numbers (success ratio, setup
time, per phase) are :mod:`.call_metrics`'s, under ``calls``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from sipdrill.orchestrator.call_metrics import CallMeasurements, is_call_metric, measure_calls
from sipdrill.orchestrator.timeline import CompactEvent, Mark, MarkKind, Timeline

__all__ = [
    "CLIENT_METRICS",
    "DRILL_METRICS",
    "STATS",
    "Distribution",
    "FaultWindow",
    "Measurements",
    "PhaseRow",
    "cdf_points",
    "distribution",
    "is_known_metric",
    "measure",
    "percentile",
]

#: The per-client times (and counts) a drill can bound with ``<metric>.<stat>``.
CLIENT_METRICS = (
    "detect",
    "reconnect",
    "resiliency",
    "full_service",
    "full_after_failover",
    "home",
    "home_after_failback",
    "attempts",
    "redirects",
    "backoff",
)
STATS = ("count", "missing", "min", "p50", "p90", "p95", "p99", "max", "mean")
#: Drill-wide values a drill can bound by name.
DRILL_METRICS = ("rto", "rpo_writes", "rpo_seconds")

_REGISTERED = frozenset({"FullService", "ResiliencyMode"})
_SLOWEST = 10
_CURVE_POINTS = 600


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least ``q`` of the values at or
    below it (p50 of 1..10 is 5, p95 is 10). Exact, and always a measured value."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, math.ceil(q * len(sorted_values) - 1e-9))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(frozen=True)
class Distribution:
    """``count`` clients measured; ``missing`` affected clients that never got there."""

    count: int
    missing: int
    min: float | None = None
    p50: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None
    mean: float | None = None

    def get(self, stat: str) -> float | None:
        value = getattr(self, stat)
        return None if value is None else float(value)


def distribution(values: Iterable[float | None]) -> Distribution:
    """count/min/percentiles/max of the values; ``None`` counts as missing."""
    listed = list(values)
    got = sorted(v for v in listed if v is not None)
    return _dist(got, len(listed) - len(got))


def _dist(got: list[float], missing: int) -> Distribution:
    if not got:
        return Distribution(0, missing)
    return Distribution(
        count=len(got),
        missing=missing,
        min=got[0],
        p50=percentile(got, 0.50),
        p90=percentile(got, 0.90),
        p95=percentile(got, 0.95),
        p99=percentile(got, 0.99),
        max=got[-1],
        mean=sum(got) / len(got),
    )


@dataclass(frozen=True)
class FaultWindow:
    """A fault from its injection to the next fault's (or the drill's end)."""

    id: str
    kind: str
    target: str
    start: float
    healed: float | None
    end: float


@dataclass
class PhaseRow:
    """One client in one fault: the times (seconds) and counts of its recovery."""

    user: str
    home_pool: str
    fault: str
    affected: bool
    mode_before: str
    healed: bool = False  # the fault was healed (``home`` applies)
    lost_at: float | None = None  # t (drill clock) the client lost service
    detect: float | None = None
    reconnect: float | None = None
    resiliency: float | None = None
    full_service: float | None = None
    full_after_failover: float | None = None
    home: float | None = None
    home_after_failback: float | None = None
    attempts: int = 0
    redirects: int = 0
    backoffs: int = 0
    backoff: float = 0.0
    losses: int = 0  # times service was lost in the window (> 1: the client flapped)
    pools_tried: tuple[str, ...] = ()
    first_pool: str | None = None  # where it first registered again
    full_pool: str | None = None  # where it got full service

    @classmethod
    def csv_fields(cls) -> tuple[str, ...]:
        """The columns of clients.csv: every field, in order."""
        return tuple(f.name for f in fields(cls))

    def csv_row(self) -> list[str]:
        out = []
        for name in self.csv_fields():
            v = getattr(self, name)
            if v is None:
                out.append("")
            elif isinstance(v, bool):
                out.append("yes" if v else "no")
            elif isinstance(v, float):
                out.append(f"{v:.3f}")
            elif isinstance(v, tuple):
                out.append(" ".join(v))
            else:
                out.append(str(v))
        return out


@dataclass
class FaultSummary:
    id: str
    kind: str
    target: str
    injected_at: float
    healed_at: float | None
    clients: int
    affected: int
    unaffected: int
    #: Fault to the last affected client in full service; None while any never got there.
    rto: float | None
    not_recovered: int
    distributions: dict[str, Distribution] = field(default_factory=dict)
    by_pool: dict[str, dict[str, Distribution]] = field(default_factory=dict)


@dataclass
class Measurements:
    faults: list[FaultSummary]
    rows: list[PhaseRow]
    distributions: dict[str, Distribution]
    rto: float | None
    rpo_writes: int | None
    rpo_seconds: float | None
    rpo_notes: list[str]
    curve: dict[str, Any]
    slowest: list[dict[str, Any]]
    cdf: dict[str, list[list[float]]]
    clients: int
    events: int
    events_lost: int
    #: The call workload's numbers; None when no call was placed.
    calls: CallMeasurements | None = None

    def value(self, name: str) -> float | None:
        """A drill-wide metric (``rto``), ``<client metric>.<stat>`` or
        ``calls.<...>`` (:mod:`.call_metrics`)."""
        if name.startswith("calls."):
            return None if self.calls is None else self.calls.value(name[len("calls."):])
        if name in DRILL_METRICS:
            v = getattr(self, name)
            return None if v is None else float(v)
        metric, _, stat = name.partition(".")
        d = self.distributions.get(metric)
        if d is None or stat not in STATS:
            return None
        return d.get(stat)

    def summary(self) -> dict[str, Any]:
        """What report.json keeps and `drill compare` reads (no per-client rows)."""
        return {
            "clients": self.clients,
            "events": self.events,
            "events_lost": self.events_lost,
            "rto": self.rto,
            "rpo_writes": self.rpo_writes,
            "rpo_seconds": self.rpo_seconds,
            "rpo_notes": self.rpo_notes,
            "distributions": {k: asdict(v) for k, v in self.distributions.items()},
            "cdf": self.cdf,
            "curve": self.curve,
            "slowest": self.slowest,
            "calls": None if self.calls is None else self.calls.summary(),
            "faults": [
                {
                    **{k: v for k, v in asdict(f).items() if k not in ("distributions", "by_pool")},
                    "distributions": {k: asdict(v) for k, v in f.distributions.items()},
                    "by_pool": {
                        p: {k: asdict(v) for k, v in d.items()} for p, d in f.by_pool.items()
                    },
                }
                for f in self.faults
            ],
        }


def cdf_points(sorted_values: Sequence[float], total: int, points: int = 200) -> list[list[float]]:
    """``[seconds, fraction of total]`` pairs of an empirical CDF, at most ``points``
    of them (a 10,000-client drill stays small); the fraction never reaches 1
    when some of ``total`` never got there."""
    n = len(sorted_values)
    if not n or total <= 0:
        return []
    if n <= points:
        idx = list(range(n))
    else:
        idx = sorted({round(i * (n - 1) / (points - 1)) for i in range(points)})
    return [[round(float(sorted_values[i]), 3), round((i + 1) / total, 5)] for i in idx]


def is_known_metric(name: str, phases: Iterable[str] = ()) -> bool:
    """A drill-wide metric, ``<client metric>.<stat>``, or a call metric
    (``phases``: the call phases the drill's steps name besides the automatic ones)."""
    if name in DRILL_METRICS or is_call_metric(name, phases):
        return True
    metric, dot, stat = name.partition(".")
    return bool(dot) and metric in CLIENT_METRICS and stat in STATS


# --- the computation ----------------------------------------------------------


def fault_windows(marks: Sequence[Mark], end: float) -> list[FaultWindow]:
    faults = [m for m in marks if m.kind is MarkKind.FAULT]
    heals = {m.detail.get("id"): m.t for m in marks if m.kind is MarkKind.HEAL}
    out = []
    for i, m in enumerate(faults):
        # The last window stays open: events read at the very end (after the
        # drill's last clock reading) still belong to it.
        nxt = faults[i + 1].t if i + 1 < len(faults) else math.inf
        fid = str(m.detail.get("id", m.label))
        out.append(
            FaultWindow(
                fid,
                str(m.detail.get("kind", "")),
                str(m.detail.get("target", "")),
                m.t,
                heals.get(fid),
                max(nxt, m.t),
            )
        )
    return out


def _admin_starts(marks: Sequence[Mark], op: str) -> dict[str, list[float]]:
    """Pool -> the t each successful ``op`` on it was started, in order. From the
    start, not the end: clients may get full service before the cmdlet returns
    (the pool tells them as soon as it has taken over)."""
    out: dict[str, list[float]] = {}
    for m in marks:
        if m.kind is MarkKind.ADMIN and m.detail.get("op") == op and m.detail.get("ok"):
            out.setdefault(str(m.detail.get("pool")), []).append(float(m.detail["start"]))
    return out


def _mode_at(events: Sequence[CompactEvent], t: float) -> tuple[str, str | None]:
    """The client's mode (and pool when registered) just before ``t``."""
    mode, pool = "SignedOut", None
    for e in events:
        if e[0] >= t:
            break
        if e[1] == "M":
            mode = e[3] or mode
            pool = e[2] if mode in _REGISTERED else None
    return mode, pool


def _last_before(ends: list[float], lo: float, hi: float) -> float | None:
    best = None
    for t in ends:
        if lo <= t <= hi:
            best = t
    return best


def _client_row(
    user: str,
    home: str,
    events: Sequence[CompactEvent],
    w: FaultWindow,
    failovers: list[float],
    failbacks: list[float],
) -> PhaseRow:
    mode_before, pool_before = _mode_at(events, w.start)
    row = PhaseRow(user, home, w.id, False, mode_before, healed=w.healed is not None)
    in_window = [e for e in events if w.start <= e[0] < w.end]
    registered = mode_before in _REGISTERED
    mode, pool = mode_before, pool_before
    lost_at = first_failure = None
    for e in in_window:
        if e[1] == "F" and first_failure is None:
            first_failure = e[0]
        if e[1] == "M":
            new = e[3] or mode
            if mode in _REGISTERED and new not in _REGISTERED:
                row.losses += 1
                if lost_at is None:
                    lost_at = e[0]
            mode = new
    if lost_at is None or not registered:
        # Did not lose service in this window (or had none to lose): unaffected.
        row.losses = 0
        return row
    row.affected = True
    row.lost_at = lost_at
    start = w.start
    row.detect = (min(lost_at, first_failure) if first_failure is not None else lost_at) - start
    pools: list[str] = []
    full_t = None
    mode, pool = mode_before, pool_before
    home_t = None
    at_heal: tuple[str, str | None] | None = None
    for e in in_window:
        t, kind = e[0], e[1]
        if w.healed is not None and at_heal is None and t >= w.healed:
            at_heal = (mode, pool)
        if t < lost_at:
            if kind == "M":
                mode = e[3] or mode
                pool = e[2] if mode in _REGISTERED else None
            continue
        recovering = full_t is None
        if kind == "M":
            mode = e[3] or mode
            pool = e[2] if mode in _REGISTERED else None
            if mode in _REGISTERED and row.reconnect is None:
                row.reconnect = t - start
                row.first_pool = pool
            if mode == "ResiliencyMode" and row.resiliency is None:
                row.resiliency = t - start
            if mode == "FullService" and full_t is None:
                full_t = t
                row.full_pool = pool
            if (
                mode == "FullService"
                and pool == home
                and home_t is None
                and w.healed is not None
                and t >= max(w.healed, lost_at)
            ):
                home_t = t
        elif recovering and kind in ("F", "D", "R") and not (kind == "R" and e[4]):
            row.attempts += 1
            if e[2] and e[2] not in pools:
                pools.append(e[2])
            if kind == "D":
                row.redirects += 1
        elif recovering and kind == "B":
            row.backoffs += 1
            row.backoff += e[5]
    row.pools_tried = tuple(pools)
    if full_t is not None:
        row.full_service = full_t - start
        fo = _last_before(failovers, start, full_t)
        if fo is not None:
            row.full_after_failover = full_t - fo
    if w.healed is not None:
        if at_heal is None:  # nothing happened after the heal in the window
            at_heal = (mode, pool)
        # Already home at the heal, but only if it had lost service before the heal:
        # a heal that came before the client noticed counts from the heal to home.
        if at_heal == ("FullService", home) and w.healed >= lost_at:
            home_t = w.healed
        if home_t is not None:
            row.home = home_t - w.healed
            fb = _last_before(failbacks, w.healed, home_t)
            if fb is not None:
                row.home_after_failback = home_t - fb
    return row


def measure(
    timeline: Timeline, end: float, step_phases: dict[int, str] | None = None
) -> Measurements:
    """Everything the report shows about the clients, from the timeline
    (``step_phases``: steps that pin a call phase, by index)."""
    marks = list(timeline.marks)
    windows = fault_windows(marks, end)
    failovers = _admin_starts(marks, "pool-failover")
    failbacks = _admin_starts(marks, "pool-failback")
    users = sorted(timeline.users)
    rows: list[PhaseRow] = []
    faults: list[FaultSummary] = []
    for w in windows:
        wrows = []
        for user in users:
            home = timeline.homes.get(user, "")
            row = _client_row(
                user,
                home,
                timeline.users[user],
                w,
                failovers.get(home, []),
                failbacks.get(home, []),
            )
            wrows.append(row)
        rows += wrows
        affected = [r for r in wrows if r.affected]
        not_recovered = sum(1 for r in affected if r.full_service is None)
        fault_rto: float | None = None
        if affected and not not_recovered:
            fault_rto = max(r.full_service or 0.0 for r in affected)
        elif not affected:
            fault_rto = 0.0
        by_pool: dict[str, dict[str, Distribution]] = {}
        for home in sorted({r.home_pool for r in affected}):
            by_pool[home] = _distributions([r for r in affected if r.home_pool == home])
        faults.append(
            FaultSummary(
                w.id,
                w.kind,
                w.target,
                w.start,
                w.healed,
                len(wrows),
                len(affected),
                len(wrows) - len(affected),
                fault_rto,
                not_recovered,
                _distributions(affected),
                by_pool,
            )
        )
    all_affected = [r for r in rows if r.affected]
    overall = _distributions(all_affected)
    rto_values = [f.rto for f in faults]
    rto: float | None = None
    if faults and all(v is not None for v in rto_values):
        rto = max(v for v in rto_values if v is not None)
    rpo_writes, rpo_seconds, notes = _rpo(marks, timeline.writes, windows)
    restored = _rpo_restores(marks, timeline, windows)
    if restored is not None:
        lost, age, more = restored
        rpo_writes = None if rpo_writes is None else rpo_writes + lost
        if age is not None:
            rpo_seconds = max(rpo_seconds or 0.0, age)
        notes += more
    return Measurements(
        faults=faults,
        rows=rows,
        distributions=overall,
        rto=rto,
        rpo_writes=rpo_writes,
        rpo_seconds=rpo_seconds,
        rpo_notes=notes,
        curve=clients_curve(timeline, end),
        slowest=_slowest(all_affected, timeline),
        cdf=_cdfs(all_affected),
        clients=len(users),
        events=timeline.events,
        events_lost=timeline.events_lost,
        calls=measure_calls(timeline, step_phases),
    )


def _cdfs(rows: list[PhaseRow]) -> dict[str, list[list[float]]]:
    out = {}
    for metric in ("detect", "reconnect", "resiliency", "full_service", "home"):
        values = [getattr(r, metric) for r in rows if metric != "home" or r.healed]
        got = sorted(v for v in values if v is not None)
        out[metric] = cdf_points(got, len(values))
    return out


def _distributions(rows: list[PhaseRow]) -> dict[str, Distribution]:
    out: dict[str, Distribution] = {}
    for metric in CLIENT_METRICS:
        if metric in ("attempts", "redirects", "backoff"):
            out[metric] = distribution(float(getattr(r, metric)) for r in rows)
        elif metric == "home":
            # Only where the fault was healed: elsewhere nobody could go home.
            out[metric] = distribution(r.home for r in rows if r.healed)
        elif metric in ("full_after_failover", "home_after_failback"):
            # Only the clients whose recovery went through that operation.
            out[metric] = distribution(v for r in rows if (v := getattr(r, metric)) is not None)
        else:
            out[metric] = distribution(getattr(r, metric) for r in rows)
    return out


def _rpo(
    marks: list[Mark], writes: dict[str, list[float]], windows: list[FaultWindow]
) -> tuple[int | None, float | None, list[str]]:
    """Writes lost by pool failovers, and the age of the oldest of them at the fault."""
    notes: list[str] = []
    total: int | None = 0
    age: float | None = None
    admin = [m for m in marks if m.kind is MarkKind.ADMIN and m.detail.get("ok")]
    for i, m in enumerate(admin):
        if m.detail.get("op") != "pool-failover":
            continue
        pool = str(m.detail.get("pool"))
        result = m.detail.get("result") or {}
        lost = result.get("lost_writes")
        if lost is None:
            # Known only when the pool is back: the failback that follows counts them.
            later = next(
                (
                    (a.detail.get("result") or {}).get("failover_lost_writes")
                    for a in admin[i + 1 :]
                    if a.detail.get("op") == "pool-failback" and a.detail.get("pool") == pool
                ),
                None,
            )
            lost = later
        if lost is None:
            notes.append(
                f"the failover of {pool} lost an unknown number of writes: {pool} never came "
                "back to tell"
            )
            total = None
            continue
        if total is not None:
            total += int(lost)
        ref = max((w.start for w in windows if w.start <= m.t), default=m.t)
        acked = sorted(t for t in writes.get(pool, []) if t <= ref)
        if lost == 0:
            age = max(age or 0.0, 0.0)
            continue
        if len(acked) >= lost:
            oldest = acked[-int(lost)]
        elif acked:
            oldest = acked[0]
            notes.append(
                f"the failover of {pool} lost {lost} change(s), more than the drill's "
                f"{len(acked)} acknowledged write(s): the age is that of the oldest drill write"
            )
        else:
            notes.append(f"the failover of {pool} lost {lost} change(s) the drill did not write")
            continue
        age = max(age or 0.0, ref - oldest)
        notes.append(
            f"the failover of {pool} lost {lost} acknowledged write(s); the oldest was "
            f"{ref - oldest:.1f} s old when the fault struck"
        )
    if not any(m.detail.get("op") == "pool-failover" for m in admin):
        age = 0.0
    return total, age, notes


def _rpo_restores(
    marks: list[Mark], timeline: Timeline, windows: list[FaultWindow]
) -> tuple[int, float | None, list[str]] | None:
    """Writes lost by the budget DR design (seed 001): its users are force-moved
    (their lists gone) and restored from the last export, so what a pool
    acknowledged after that export is lost. Counted exactly by seq: an export
    says up to which seq of its pool's change feed it holds. A forced move of
    a pool's users with no import after it loses every write the drill made
    there. None when the drill did neither."""
    admin = [m for m in marks if m.kind is MarkKind.ADMIN and m.detail.get("ok")]
    imports: dict[str, Mark] = {}  # source pool -> its last import
    for m in admin:
        export = (m.detail.get("result") or {}).get("export") or {}
        if m.detail.get("op") == "user-import" and export.get("pool"):
            imports[str(export["pool"])] = m
    moves = [
        m for m in admin
        if m.detail.get("op") == "user-move"
        and (m.detail.get("result") or {}).get("operation") == "move-all"
        and (m.detail.get("result") or {}).get("force")
    ]
    if not imports and not moves:
        return None
    total, age, notes = 0, None, []
    for pool, m in sorted(imports.items()):
        export = m.detail["result"]["export"]
        seq, start = int(export["seq"]), float(m.detail.get("start", m.t))
        ref = max((w.start for w in windows if w.start <= start), default=start)
        pairs = [(t, s) for t, s in timeline.write_seqs.get(pool, []) if t <= start]
        if pairs or not timeline.writes.get(pool):
            lost = sorted(t for t, s in pairs if s > seq)
            how = f"seq above the export's {seq}"
        else:  # a driver that did not say the seqs: by time, from the export's creation
            created = float(export.get("created", 0.0)) - timeline.t0_wall
            lost = sorted(t for t in timeline.writes[pool] if created < t <= start)
            how = "acknowledged after the export was written (by time: no seqs known)"
        total += len(lost)
        if lost:
            age = max(age or 0.0, ref - lost[0])
        notes.append(
            f"the import of {pool}'s export restored it as of seq {seq}: "
            f"{len(lost)} acknowledged write(s) of the drill lost ({how})"
            + (f"; the oldest was {ref - lost[0]:.1f} s old when the fault struck" if lost else "")
        )
    for m in moves:
        result = m.detail["result"]
        pool, start = str(result["source_pool"]), float(m.detail.get("start", m.t))
        if pool in imports and float(imports[pool].detail.get("start", 0.0)) >= start:
            continue
        ref = max((w.start for w in windows if w.start <= start), default=start)
        lost = sorted(t for t in timeline.writes.get(pool, []) if t <= start)
        total += len(lost)
        if lost:
            age = max(age or 0.0, ref - lost[0])
        notes.append(
            f"{result['moved']} users of {pool} were force-moved to {result['target_pool']} "
            f"and no export of {pool} was imported after it: their contact lists and meetings "
            f"are lost ({result['contacts_lost']} contacts counted by the move), "
            f"with the {len(lost)} write(s) the drill made there"
        )
    return total, 0.0 if age is None else age, notes


def _slowest(rows: list[PhaseRow], timeline: Timeline) -> list[dict[str, Any]]:
    """The clients that took longest to full service (never: first), with their history."""

    def key(r: PhaseRow) -> float:
        return math.inf if r.full_service is None else r.full_service

    picked = sorted(rows, key=key, reverse=True)[:_SLOWEST]
    out = []
    for r in picked:
        history = []
        lo = (r.lost_at or 0.0) - 1.0
        for e in timeline.users.get(r.user, []):
            if e[0] < lo or (e[1] == "R" and e[4]):
                continue
            history.append(_describe(e))
            if len(history) >= 40:
                break
        out.append(
            {
                "user": r.user,
                "home_pool": r.home_pool,
                "fault": r.fault,
                "full_service": r.full_service,
                "attempts": r.attempts,
                "pools_tried": list(r.pools_tried),
                "history": history,
            }
        )
    return out


def _describe(e: CompactEvent) -> dict[str, Any]:
    t, kind, pool, what, _refresh, value = e
    text = {
        "M": f"mode {what}",
        "R": f"registered ({what})",
        "F": f"failed: {what}",
        "D": "redirected",
        "B": f"backing off {value:.1f} s",
    }[kind]
    return {"t": round(t, 3), "what": text, "pool": pool}


# --- the clients-by-mode curve -------------------------------------------------


def _series_key(mode: str, pool: str | None) -> str:
    if mode in _REGISTERED:
        short = "full" if mode == "FullService" else "resiliency"
        return f"{short}@{pool}"
    if mode in ("Discovering", "SigningIn"):
        return "signing-in"
    if mode == "BackingOff":
        return "backing-off"
    return "signed-out"


def clients_curve(timeline: Timeline, end: float, points: int = _CURVE_POINTS) -> dict[str, Any]:
    """Clients by mode (and pool when registered) over time, sampled at most
    ``points`` times from the first event (or 0) to ``end``: readable and small
    at 10,000 clients. Each series is a list of counts, one per sample time."""
    transitions: list[tuple[float, int, str]] = []
    users = list(timeline.users)
    for i, user in enumerate(users):
        for e in timeline.users[user]:
            if e[1] == "M":
                transitions.append((e[0], i, _series_key(e[3] or "SignedOut", e[2])))
    transitions.sort(key=lambda x: x[0])
    start = min(0.0, transitions[0][0]) if transitions else 0.0
    span = max(end - start, 1e-9)
    n = max(2, min(points, int(span / 0.25) + 1))
    step = span / (n - 1)
    times = [round(start + k * step, 3) for k in range(n)]
    state = ["signed-out"] * len(users)
    counts: dict[str, int] = {"signed-out": len(users)}
    series: dict[str, list[int]] = {}
    j = 0
    for k, t in enumerate(times):
        while j < len(transitions) and transitions[j][0] <= t:
            _t, i, key = transitions[j]
            counts[state[i]] -= 1
            counts[key] = counts.get(key, 0) + 1
            state[i] = key
            j += 1
        for key, c in counts.items():
            col = series.get(key)
            if col is None:
                col = series[key] = [0] * n
            col[k] = c
    return {"t": times, "series": dict(sorted(series.items()))}
