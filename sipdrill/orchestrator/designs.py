"""`sipdrill drill compare-designs`: the seeds' three resiliency designs run
one after another on the local runtime and put side by side in one table.

The designs are the shipped drills, each run as a *variant* written beside
its report (``<design>/drill.yaml``), changed only so that every column is
measured the same way in every design:

- the call workload is on (half the users call a random user every ~4 s, a
  1 s call, as ``scenarios/calls-site-loss.yaml``), so "calls during the
  outage" is a measurement, not a claim;
- the steps from the fault to the first recovery (an administrator's
  operation, or the heal) are pinned to the call phase ``outage``
  (docs/measurements.md, "Calls"), which changes no step's timing; ``hold``
  adds a ``sleep`` there (the administrators' reaction time, 0 in the drills);
- a drill that writes no user data gets one contact per user of the failed
  pool before the fault, so the RPO column is counted in every design;
- ``lync_timers``: Lync's default timers and the zone's DNS TTL instead of
  the drills' shortened ones (waits get an hour).

The table (:func:`design_row`) is built from the reports alone, plus the
facts of each design read from its drill (:class:`DesignFacts`): a design
that has no such state says ``n/a (why)``, never 0.
"""

from __future__ import annotations

import copy
import html
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sipdrill.errors import OperationError
from sipdrill.orchestrator.drill import LoadedDrill
from sipdrill.orchestrator.report_html import BOTTOM, CSS, LEFT, RIGHT, TOP, H, Plot, W, svg
from sipdrill.topology import (
    DEFAULT_FAILBACK_INTERVAL,
    DEFAULT_FAILOVER_DETECTION_INTERVAL,
    DEFAULT_KEEPALIVE_INTERVAL,
    DEFAULT_KEEPALIVE_PONG_TIMEOUT,
    DEFAULT_SYNC_INTERVAL,
)

__all__ = [
    "COLUMNS",
    "DESIGNS",
    "Cell",
    "Design",
    "DesignFacts",
    "DesignRow",
    "design_facts",
    "design_row",
    "design_variant",
    "designs_html",
    "designs_markdown",
    "load_results",
]

#: The call phase pinned on the outage's steps.
OUTAGE = "outage"
#: The call workload every design runs (scenarios/calls-site-loss.yaml's).
CALLS = {"fraction": 0.5, "interval": 4, "hold": 1}
#: Lync Server's defaults (REFERENCE.md, "Timers and limits").
LYNC_TIMERS = {
    "failover_detection_interval": DEFAULT_FAILOVER_DETECTION_INTERVAL,
    "failback_interval": DEFAULT_FAILBACK_INTERVAL,
    "sync_interval": DEFAULT_SYNC_INTERVAL,
    "keepalive_interval": DEFAULT_KEEPALIVE_INTERVAL,
    "keepalive_pong_timeout": DEFAULT_KEEPALIVE_PONG_TIMEOUT,
}
#: A wait with Lync's timers may take minutes where the drill allowed one.
LYNC_WAIT_TIMEOUT = 3600.0
#: What is recovering from the outage: its first step ends the outage phase.
RECOVERY_OPS = ("cms-failover", "pool-failover", "user-move", "user-import", "dns-repoint")


@dataclass(frozen=True)
class Design:
    key: str
    title: str
    scenario: str  # relative to the repository
    seeds: str
    #: The seeds' and Microsoft's figures, with where they are written.
    claims: tuple[tuple[str, str], ...]


DESIGNS: tuple[Design, ...] = (
    Design(
        "paired",
        "Paired pools + pool failover (Lync 2013)",
        "scenarios/site-loss.yaml",
        "000, 002-004",
        (
            (
                'limited service: "several minutes" to sign in to the backup pool (30 s timers)',
                "seed 003",
            ),
            ("pool failover cmdlet ~50 s, full service ~1 min later", "seed 003"),
            (
                "pool failover RTO 15-20 min, RPO 5 min (engineering target, 40,000 users, "
                "users signing back in excluded)",
                "REFERENCE.md, Microsoft",
            ),
        ),
    ),
    Design(
        "backup-registrar",
        "Backup registrar only (Lync 2010 voice resiliency)",
        "scenarios/registrar-failover.yaml",
        "001, 003",
        (
            (
                'limited service: "several minutes" to sign in to the backup pool (30 s timers)',
                "seed 003",
            ),
            ('failback "in 30 seconds" ("some clients ... as soon as 10 seconds")', "seed 003"),
            ("no full service until the primary returns", "REFERENCE.md"),
        ),
    ),
    Design(
        "budget-dr",
        "Budget DR pool (Lync 2010 Standard Edition)",
        "scenarios/budget-dr.yaml",
        "001",
        (
            (
                '"completely available again in a 30-60 minute timeframe once the DR '
                'activation plan is initiated"',
                "seed 001",
            ),
            ("contacts since the last nightly dbimpexp export lost", "seed 001"),
        ),
    ),
)


@dataclass(frozen=True)
class DesignFacts:
    """What a design's drill does, read from the drill (not from a run): the
    reasons a column is ``n/a``."""

    key: str
    title: str
    scenario: str
    failed_site: str
    failed_pools: tuple[str, ...]
    #: Every failed pool has a backup registrar (a paired pool).
    backup_registrar: bool
    #: The operation that brings full service back during the outage, if any.
    recovery: str | None
    #: Where the users go for good (a force-move's target), if anywhere.
    moved_to: str | None
    #: How the users get home: "registrar" (automatic), "pool-failback", or None.
    failback: str | None
    heals: bool
    hold: float = 0.0
    lync_timers: bool = False
    timers: dict[str, Any] = field(default_factory=dict)
    dns_ttl: int | None = None
    #: What the variant changed in the shipped drill, in words.
    changes: tuple[str, ...] = ()
    claims: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DesignFacts:
        d = dict(d)
        d["failed_pools"] = tuple(d.get("failed_pools") or ())
        d["changes"] = tuple(d.get("changes") or ())
        d["claims"] = tuple(tuple(c) for c in d.get("claims") or ())
        return cls(**d)


# --- the variant -------------------------------------------------------------


def _failed(loaded: LoadedDrill) -> tuple[int, str, tuple[str, ...]]:
    """The first fault step, its target, and the pools it takes down."""
    steps = loaded.drill.steps
    i = next((i for i, s in enumerate(steps) if s.fault is not None), None)
    if i is None:
        raise OperationError(
            "not-a-design", f"{loaded.path}: no fault step: nothing to compare", 422
        )
    fault = steps[i].fault
    assert fault is not None
    t = loaded.topology
    target = fault.target
    pools = tuple(p.fqdn for p in t.pools if p.site == target)
    if not pools:  # a service: pool1 -> pool1.<domain>
        pools = tuple(p.fqdn for p in t.pools if p.fqdn.split(".")[0] == target)
    return i, target, pools


def _recovery_index(loaded: LoadedDrill, fault: int) -> int:
    """The first step after the fault that recovers (an administrator's
    recovery operation, or the heal): the end of the outage phase."""
    steps = loaded.drill.steps
    for j in range(fault + 1, len(steps)):
        s = steps[j]
        if s.heal is not None or (s.admin is not None and s.admin.op in RECOVERY_OPS):
            return j
    return len(steps)


def design_facts(design: Design, loaded: LoadedDrill, **extra: Any) -> DesignFacts:
    steps = loaded.drill.steps
    _i, site, pools = _failed(loaded)
    t = loaded.topology
    ops = [s.admin for s in steps if s.admin is not None]
    backup = bool(pools) and all(t.pool(p).backup for p in pools)
    recovery = next(
        (a.op for a in ops if a.op == "pool-failover" or (a.op == "user-move" and a.force)), None
    )
    moved_to = next((a.to for a in ops if a.op == "user-move" and a.force), None)
    failback = (
        "pool-failback"
        if any(a.op == "pool-failback" for a in ops)
        else "registrar"
        if backup and moved_to is None
        else None
    )
    return DesignFacts(
        key=design.key,
        title=design.title,
        scenario=design.scenario,
        failed_site=site,
        failed_pools=pools,
        backup_registrar=backup,
        recovery=recovery,
        moved_to=moved_to,
        failback=failback,
        heals=any(s.heal is not None for s in steps),
        timers=t.timers.model_dump(mode="json"),
        dns_ttl=t.dns.ttl,
        claims=design.claims,
        **extra,
    )


def design_variant(
    raw: dict[str, Any],
    loaded: LoadedDrill,
    *,
    hold: float = 0.0,
    lync_timers: bool = False,
    topology: str | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The drill file (as loaded YAML) every design runs in the comparison,
    and what was changed, in words. ``topology``: the path the variant names
    (it lives in another folder than the shipped drill)."""
    out: dict[str, Any] = copy.deepcopy(raw)
    changes: list[str] = []
    out["topology"] = topology or loaded.topology_path
    fault, site, pools = _failed(loaded)
    recovery = _recovery_index(loaded, fault)
    steps: list[dict[str, Any]] = out["steps"]

    clients = out.setdefault("clients", {})
    workload = list(clients.get("workload") or [])
    if "call" not in workload:
        clients["workload"] = [*workload, "call"]
        clients["calls"] = dict(CALLS)
        changes.append(
            "the call workload on: {fraction:g} of the users call a random user every "
            "~{interval:g} s, {hold:g} s calls".format(**CALLS)
        )
    pinned = 0
    for j in range(fault, recovery):
        if "phase" not in steps[j]:
            steps[j]["phase"] = OUTAGE
            pinned += 1
    changes.append(
        f"the call phase `{OUTAGE}` pinned on the {pinned} step(s) from the fault to the "
        "first recovery (no timing changed)"
    )
    if hold > 0:
        steps.insert(
            recovery,
            {
                "name": f"the administrators react ({hold:g} s: the outage held)",
                "sleep": hold,
                "phase": OUTAGE,
            },
        )
        changes.append(f"a {hold:g} s hold before the first recovery (the admins' reaction)")
    if not any("write" in s for s in steps) and pools:
        for pool in reversed(pools):
            steps.insert(
                fault,
                {
                    "name": f"{pool.split('.')[0]} users add a contact (the RPO, counted in "
                    "every design)",
                    "write": {"users": f"{pool}:*", "contacts": 1},
                },
            )
        changes.append(f"one contact written by every user of {', '.join(pools)} before the fault")
    if lync_timers:
        timers = dict(out.get("timers") or {})
        timers.update(LYNC_TIMERS)
        out["timers"] = timers
        out.pop("dns", None)
        for s in steps:
            if "wait" in s:
                s["timeout"] = max(float(s.get("timeout", 600)), LYNC_WAIT_TIMEOUT)
        # The drills' time bounds are for their shortened timers; what is
        # lost is not a time and keeps its bound.
        expect = out.get("expect") or {}
        kept = {k: v for k, v in expect.items() if k.startswith("rpo") or k.endswith(".missing")}
        if len(kept) != len(expect):
            out["expect"] = kept
            changes.append(
                "the drill's time bounds dropped ("
                + ", ".join(sorted(set(expect) - set(kept)))
                + "): they are for its shortened timers"
            )
        changes.append(
            "Lync's default timers ("
            + ", ".join(f"{k} {v:g}" for k, v in LYNC_TIMERS.items())
            + ") and the zone's DNS TTL; waits up to an hour"
        )
    _ = site
    return out, changes


# --- the table -----------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    text: str
    #: What the chart draws (seconds, or a ratio for calls); None: nothing.
    value: float | None = None
    #: Why there is no value (the design has no such state), if so.
    na: str | None = None


#: The table's columns: key, heading.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("limited", "limited service (resiliency), p50 / max"),
    ("full", "full service, p50 / max"),
    ("home", "home (failback), p50 / max"),
    ("rto", "RTO"),
    ("rpo", "RPO: writes lost (oldest write's age)"),
    ("calls", "calls during the outage"),
)


@dataclass(frozen=True)
class DesignRow:
    key: str
    title: str
    status: str
    folder: str
    cells: dict[str, Cell]


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _dist(d: dict[str, Any] | None) -> tuple[str, float | None] | None:
    """``p50 / max s`` and the max, or None when no affected client got there."""
    if not d or not d.get("count"):
        return None
    text = f"{_s(d.get('p50'))} / {_s(d.get('max'))} s"
    if d.get("missing"):
        text += f" ({d['missing']} never)"
        return text, None
    return text, d.get("max")


def _not_reached(d: dict[str, Any] | None, what: str) -> Cell:
    missing = (d or {}).get("missing") or 0
    return Cell(f"not reached ({missing} client(s) never got {what})")


def _heal_at(report: dict[str, Any]) -> tuple[float | None, float | None]:
    """The first fault's injection and heal, in drill seconds."""
    faults = report.get("faults") or []
    if not faults:
        return None, None
    return faults[0].get("injected_at"), faults[0].get("healed_at")


def design_row(report: dict[str, Any], facts: DesignFacts, folder: str = "") -> DesignRow:
    """One design's row of the table, from its report.json and its facts.
    Times are from the fault, but home: from the heal."""
    status = str(report.get("status", "?"))
    m = report.get("measurements") or {}
    if not m or "rto" not in m:
        why = report.get("error") or "no measurements"
        return DesignRow(
            facts.key,
            facts.title,
            status,
            folder,
            {
                k: Cell(f"not run ({why})" if status == "not run" else f"not run ({status}: {why})")
                for k, _ in COLUMNS
            },
        )
    dists = m.get("distributions") or {}
    pools = ", ".join(p.split(".")[0] for p in facts.failed_pools) or facts.failed_site
    cells: dict[str, Cell] = {}

    # Limited service: only with a backup registrar.
    res = _dist(dists.get("resiliency"))
    if not facts.backup_registrar:
        cells["limited"] = Cell(
            f"n/a (no backup registrar: {pools} users have no service until the recovery)",
            na="no backup registrar",
        )
    elif res is None:
        cells["limited"] = _not_reached(dists.get("resiliency"), "resiliency mode")
    else:
        cells["limited"] = Cell(res[0], res[1])

    # Full service and the RTO: a design with no failover waits for the site.
    full = _dist(dists.get("full_service"))
    injected, healed = _heal_at(report)
    rto = m.get("rto")
    if facts.recovery is None:
        back = (
            "never healed"
            if healed is None or injected is None
            else f"here back {healed - injected:.1f} s after the fault"
        )
        measured = "" if full is None else f"; full service {full[0]}"
        why = f"no failover: full service only when {facts.failed_site} returns"
        cells["full"] = Cell(f"n/a ({why}; {back}{measured})", na=why)
        cells["rto"] = Cell(
            f"n/a (as long as {facts.failed_site} is down; here {_s(rto)} s)", na=why
        )
    else:
        cells["full"] = (
            _not_reached(dists.get("full_service"), "full service")
            if full is None
            else Cell(full[0], full[1])
        )
        cells["rto"] = (
            _not_reached(dists.get("full_service"), "full service")
            if rto is None
            else Cell(f"{rto:.1f} s", float(rto))
        )

    # Home: only a design with a failback.
    home = _dist(dists.get("home"))
    if facts.failback is None:
        where = facts.moved_to.split(".")[0] if facts.moved_to else "the recovery pool"
        why = f"no failback: the users were moved to {where} for good"
        cells["home"] = Cell(f"n/a ({why})", na=why)
    elif not facts.heals:
        cells["home"] = Cell("n/a (the drill never heals the site)", na="never healed")
    elif home is None:
        cells["home"] = _not_reached(dists.get("home"), "home")
    else:
        cells["home"] = Cell(home[0], home[1])

    # RPO: the writes lost, and the age of the oldest of them at the fault.
    lost = m.get("rpo_writes")
    acked = ((report.get("data") or {}).get("writes") or {}).get("acknowledged")
    if lost is None:
        cells["rpo"] = Cell(
            "unknown (the failed pool never came back to count what it lost)", na="unknown"
        )
    else:
        of = f" of {acked}" if acked else ""
        age = m.get("rpo_seconds")
        text = f"{lost}{of} writes"
        if lost and age is not None:
            text += f" ({age:.1f} s)"
        elif not lost and facts.recovery is None:
            text += " (no failover: the data waited on the failed pool)"
        cells["rpo"] = Cell(text, float(lost))

    cells["calls"] = _calls_cell(m.get("calls"), facts)
    return DesignRow(facts.key, facts.title, status, folder, cells)


def _calls_cell(calls: dict[str, Any] | None, facts: DesignFacts) -> Cell:
    if calls is None:
        return Cell("not measured (no call was placed in the whole drill)")
    phase = (calls.get("phases") or {}).get(OUTAGE)
    if phase is None:
        return Cell(f"not measured (no `{OUTAGE}` phase in the drill)")
    decided = int(phase["answered"]) + int(phase["failed"])
    if not decided:
        why = (
            "nobody registered to call from"
            if not facts.backup_registrar
            else "no call finished in the outage"
        )
        return Cell(
            f"none ({phase['placed']} placed: {why})", 0.0 if phase["placed"] == 0 else None
        )
    ratio = float(phase["answered"]) / decided
    return Cell(f"{ratio:.0%} ({phase['answered']}/{decided} answered)", ratio)


# --- results on disk -------------------------------------------------------------


def load_results(out: Path) -> list[tuple[dict[str, Any], DesignFacts, Path]]:
    """The reports and facts of a comparison folder, in the designs' order."""
    from sipdrill.orchestrator.compare import load_report

    found = []
    for d in DESIGNS:
        folder = out / d.key
        if not (folder / "design.json").is_file():
            continue
        facts = DesignFacts.from_json(json.loads((folder / "design.json").read_text()))
        if not (folder / "report.json").is_file():
            # Planned, never run (the comparison was interrupted before it): a row that says so.
            skipped = {
                "drill": d.key,
                "steps": [],
                "status": "not run",
                "error": "interrupted before it ran",
            }
            found.append((skipped, facts, folder))
            continue
        found.append((load_report(folder), facts, folder))
    if not found:
        raise OperationError(
            "no-designs",
            f"{out}: no design folder (paired/, backup-registrar/, budget-dr/ with a "
            "design.json): give the folder `compare-designs` wrote",
            404,
        )
    return found


def run_designs(
    repo: Path,
    out: Path,
    run_one: Callable[[LoadedDrill, Path], Any],
    progress: Callable[[str], None],
    *,
    keys: Sequence[str] = (),
    hold: float = 0.0,
    lync_timers: bool = False,
    loopback_network: str | None = None,
) -> list[DesignRow]:
    """Each design's variant, run by ``run_one(loaded, folder)`` one after
    another, then the table (written as designs.md, .html, .json)."""
    from sipdrill.orchestrator.compare import load_report
    from sipdrill.orchestrator.drill import load_drill

    chosen = [d for d in DESIGNS if not keys or d.key in keys]
    unknown = set(keys) - {d.key for d in DESIGNS}
    if unknown:
        raise OperationError(
            "bad-design",
            f"unknown design(s) {', '.join(sorted(unknown))}: use "
            + ", ".join(d.key for d in DESIGNS),
            422,
        )
    planned = []
    for d in chosen:
        source = repo / d.scenario
        shipped = load_drill(source)
        raw = yaml.safe_load(source.read_text(encoding="utf-8"))
        folder = out / d.key
        folder.mkdir(parents=True, exist_ok=True)
        topology = shipped.topology_path
        if loopback_network:
            topo = yaml.safe_load(Path(shipped.topology_path).read_text(encoding="utf-8"))
            topo.setdefault("lab", {})["loopback_network"] = loopback_network
            (folder / "topology.yaml").write_text(yaml.safe_dump(topo, sort_keys=False))
            topology = "topology.yaml"
        variant, changes = design_variant(
            raw, shipped, hold=hold, lync_timers=lync_timers, topology=topology
        )
        if loopback_network:
            changes.append(f"the lab on {loopback_network}")
        path = folder / "drill.yaml"
        path.write_text(yaml.safe_dump(variant, sort_keys=False), encoding="utf-8")
        loaded = load_drill(path)  # a bad variant is named here, before any run
        facts = design_facts(d, loaded, hold=hold, lync_timers=lync_timers, changes=tuple(changes))
        (folder / "design.json").write_text(json.dumps(asdict(facts), indent=2))
        planned.append((d, loaded, folder))
    for n, (d, loaded, folder) in enumerate(planned, 1):
        progress(
            f"design {n}/{len(planned)}: {d.title} ({d.scenario}, variant {folder}/drill.yaml)"
        )
        report = run_one(loaded, folder)
        progress(f"  design {d.key}: {getattr(report, 'status', '?')}")
        if getattr(report, "status", None) == "interrupted":
            break
    results = load_results(out)
    rows = [design_row(r, f, str(folder)) for r, f, folder in results]
    _ = load_report
    write_tables(out, rows, [f for _r, f, _ in results])
    return rows


def write_tables(out: Path, rows: list[DesignRow], facts: list[DesignFacts]) -> None:
    (out / "designs.md").write_text(designs_markdown(rows, facts), encoding="utf-8")
    (out / "designs.html").write_text(designs_html(rows, facts), encoding="utf-8")
    (out / "designs.svg").write_text(designs_svg(rows), encoding="utf-8")
    (out / "designs.json").write_text(
        json.dumps(
            {
                "rows": [asdict(r) for r in rows],
                "facts": [asdict(f) for f in facts],
            },
            indent=2,
        ),
        encoding="utf-8",
    )


# --- rendering -------------------------------------------------------------------


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def timers_line(f: DesignFacts) -> str:
    """The timers that act in this design (a DR pool has no failover
    detection; only a pool failover loses what the sync had not sent)."""
    t = f.timers
    parts = []
    if f.backup_registrar:
        parts += [
            f"failover detection {t.get('failover_detection_interval', 0):g} s",
            f"failback {t.get('failback_interval', 0):g} s",
        ]
    parts.append(f"keep-alive {t.get('keepalive_interval', 0):g} s")
    if f.recovery == "pool-failover":
        parts.append(f"Backup Service sync {t.get('sync_interval', 0):g} s")
    if f.moved_to is not None:
        parts.append(f"DNS TTL {f.dns_ttl} s")
    return ", ".join(parts) + (" (Lync's defaults)" if f.lync_timers else " (the drill's)")


def designs_markdown(rows: list[DesignRow], facts: list[DesignFacts]) -> str:
    out = [
        "# The three designs side by side",
        "",
        "Times in seconds from the site's loss (home: from its return); p50 / max over the "
        "affected clients. `n/a (why)`: the design has no such state.",
        "",
        "| design | status | " + " | ".join(h for _k, h in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        out.append(
            f"| {_md(r.title)} | {r.status} | "
            + " | ".join(_md(r.cells[k].text) for k, _h in COLUMNS)
            + " |"
        )
    out += ["", "## The seeds' claims", "", "| design | claim | where |", "|---|---|---|"]
    for f in facts:
        for claim, where in f.claims:
            out.append(f"| {_md(f.title)} | {_md(claim)} | {where} |")
    out += ["", "## How each design ran", ""]
    for f in facts:
        out.append(f"- **{f.title}** (`{f.scenario}`): {timers_line(f)}.")
        out += [f"  - {c}" for c in f.changes]
    return "\n".join(out) + "\n"


#: The chart's colours, one per design (in DESIGNS' order).
DESIGN_COLOURS = {"paired": "#1f77b4", "backup-registrar": "#ff7f0e", "budget-dr": "#2ca02c"}
#: What the chart draws: the time columns (their max).
CHARTED = (
    ("limited", "limited service"),
    ("full", "full service"),
    ("rto", "RTO"),
    ("home", "home (from the heal)"),
)


def designs_svg(rows: list[DesignRow]) -> str:
    """Grouped bars: each time column's value (the last client) per design;
    a design with no such state gets its ``n/a`` written where its bar would be."""
    values = [c.value for r in rows for k, _ in CHARTED if (c := r.cells[k]).value is not None]
    ymax = max(values, default=1.0)
    p = Plot(0, len(CHARTED), 0, max(ymax * 1.15, 1.0))
    # The groups are named under their bars: no numbered x ticks.
    body = [
        el
        for el in p.axes("", "seconds (the last affected client)")
        if f'y2="{H - BOTTOM + 4}"' not in el and f'y="{H - BOTTOM + 16}"' not in el
    ]
    group_w = (W - LEFT - RIGHT) / len(CHARTED)
    bar_w = group_w * 0.8 / max(len(rows), 1)
    for g, (key, label) in enumerate(CHARTED):
        gx = LEFT + g * group_w + group_w * 0.1
        body.append(
            f'<text x="{LEFT + (g + 0.5) * group_w:.1f}" y="{H - BOTTOM + 16}" '
            f'text-anchor="middle">{html.escape(label)}</text>'
        )
        for i, r in enumerate(rows):
            c = r.cells[key]
            colour = DESIGN_COLOURS.get(r.key, "#7f7f7f")
            x = gx + i * bar_w
            if c.value is None or not math.isfinite(c.value):
                word = "n/a" if c.na else "-"
                body.append(
                    f'<text x="{x + bar_w / 2:.1f}" y="{H - BOTTOM - 6}" text-anchor="middle" '
                    f'fill="{colour}"><title>{html.escape(r.title)}: {html.escape(c.text)}'
                    f"</title>{word}</text>"
                )
                continue
            y = p.y(c.value)
            body.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w - 2:.1f}" '
                f'height="{H - BOTTOM - y:.1f}" fill="{colour}"><title>{html.escape(r.title)}: '
                f"{html.escape(c.text)}</title></rect>"
            )
            body.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{y - 4:.1f}" text-anchor="middle">'
                f"{c.value:.0f}</text>"
            )
    legend_y = TOP + 4
    for i, r in enumerate(rows):
        colour = DESIGN_COLOURS.get(r.key, "#7f7f7f")
        y = legend_y + 14 * i
        body.append(
            f'<rect x="{W - RIGHT - 300}" y="{y}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{W - RIGHT - 285}" y="{y + 9}">{html.escape(r.title)}</text>'
        )
    return svg(body, "the designs' times side by side")


def designs_html(rows: list[DesignRow], facts: list[DesignFacts]) -> str:
    e = html.escape
    out = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'\">",
        f"<title>The three designs side by side</title><style>{CSS}</style></head><body>",
        "<h1>The three designs side by side</h1>",
        "<p>Times in seconds from the site's loss (home: from its return); p50 / max over the "
        "affected clients. <i>n/a (why)</i>: the design has no such state.</p>",
        "<table><tr><th>design</th><th>status</th>"
        + "".join(f'<th class="l">{e(h)}</th>' for _k, h in COLUMNS)
        + "</tr>",
    ]
    for r in rows:
        out.append(
            f'<tr><td class="l">{e(r.title)}<br><a href="{e(Path(r.folder).name)}/report.html">'
            f"its report</a></td><td>{e(r.status)}</td>"
            + "".join(f'<td class="l">{e(r.cells[k].text)}</td>' for k, _h in COLUMNS)
            + "</tr>"
        )
    out.append("</table>")
    out.append("<h2>Times, the last affected client</h2>")
    out.append(designs_svg(rows))
    ratios = [(r, r.cells["calls"]) for r in rows]
    out.append("<h2>Calls during the outage</h2><ul>")
    out += [f"<li>{e(r.title)}: {e(c.text)}</li>" for r, c in ratios]
    out.append(
        "</ul><h2>The seeds' claims</h2><table><tr><th>design</th>"
        '<th class="l">claim</th><th>where</th></tr>'
    )
    for f in facts:
        for claim, where in f.claims:
            out.append(
                f'<tr><td class="l">{e(f.title)}</td><td class="l">{e(claim)}</td>'
                f"<td>{e(where)}</td></tr>"
            )
    out.append("</table><h2>How each design ran</h2><ul>")
    for f in facts:
        out.append(
            f"<li><b>{e(f.title)}</b> (<code>{e(f.scenario)}</code>): {e(timers_line(f))}<ul>"
            + "".join(f"<li>{e(c)}</li>" for c in f.changes)
            + "</ul></li>"
        )
    out.append("</ul></body></html>\n")
    return "\n".join(out)
