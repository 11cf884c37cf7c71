"""The drill file: a scenario that runs on a topology.

A drill names its topology, the timers it shortens (a drill in CI cannot wait
Microsoft's 120 s twice), how many clients to run, and a list of steps: wait
for clients to reach a mode, inject a fault, run an administrator operation,
write user data, heal. Steps may carry a ``measure`` name: the time the step
took is then a metric of the report. ``expect`` bounds those metrics, the
drill's RTO and RPO, and percentiles of the per-client times
(``reconnect.p95``: see docs/measurements.md), and the call workload's
success ratio and setup time, per phase (``calls.resiliency.success_ratio``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sipdrill.errors import DrillFileError, FileIssue, TopologyError
from sipdrill.orchestrator.call_metrics import AUTO_PHASES, CALL_VALUES
from sipdrill.orchestrator.fault_model import RUNTIME_FAULTS, FaultKind
from sipdrill.orchestrator.measure import CLIENT_METRICS, DRILL_METRICS, STATS, is_known_metric
from sipdrill.orchestrator.plan import RuntimeKind, pool_fault_targets, short_name
from sipdrill.topology import Topology, parse_topology
from sipdrill.yamlfile import dotted, load_model


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


ClientMode = Literal["full", "resiliency", "signed-out", "registered", "unregistered"]
AdminOp = Literal[
    "pool-failover",
    "pool-failback",
    "cms-failover",
    "backup-sync",
    "user-move",
    "user-export",
    "user-import",
    "dns-repoint",
]


class CallsSpec(_Model):
    """The call workload's settings (with ``call`` in ``workload``)."""

    fraction: float = Field(default=0.25, ge=0, le=1, description="share of users that call")
    interval: float = Field(
        default=30.0, gt=0, le=86_400, description="mean seconds between two calls of a caller"
    )
    hold: float = Field(default=3.0, ge=0, le=86_400, description="seconds a call is held")


class ClientsSpec(_Model):
    count: int = Field(default=50, ge=0, le=100_000)
    processes: int = Field(default=1, ge=1, le=64)
    workload: list[Literal["im", "presence", "conference", "call"]] = []
    calls: CallsSpec = CallsSpec()
    seed: int | None = Field(
        default=None, description="The clients' RNG seed (SRV and front-end draws, backoff)."
    )

    @model_validator(mode="after")
    def _calls_need_the_workload(self) -> ClientsSpec:
        if "calls" in self.model_fields_set and "call" not in self.workload:
            raise ValueError("`calls:` sets up the call workload: add `call` to `workload:`")
        return self

    def process_args(self) -> tuple[str, ...]:
        """What ``sipdrill serve clients`` needs for this workload (and seed)."""
        seeded: tuple[str, ...] = () if self.seed is None else ("--seed", str(self.seed))
        if not self.workload:
            return seeded
        args: tuple[str, ...] = (*seeded, "--workload", ",".join(self.workload))
        if "call" in self.workload:
            c = self.calls
            args += (
                "--call-fraction", f"{c.fraction:g}",
                "--call-interval", f"{c.interval:g}",
                "--call-hold", f"{c.hold:g}",
            )
        return args


class WaitStep(_Model):
    """Wait until ``fraction`` of the selected clients are in ``mode``."""

    mode: ClientMode
    users: str = Field(default="*", description="`*` or `<home pool FQDN>:*`: which clients count")
    pool: str | None = Field(default=None, description="registered on this pool")
    fraction: float = Field(default=1.0, gt=0, le=1)


class FaultStep(_Model):
    kind: FaultKind
    target: str = Field(description="a service name (pool1, dns, ...) or a site name")
    id: str | None = Field(default=None, description="name used by a later `heal:` step")
    mode: Literal["drop", "servfail"] | None = None  # dns-outage
    peer: str | None = None  # partition: the other site
    delay_ms: int | None = Field(default=None, ge=0, le=60_000)  # degrade
    jitter_ms: int | None = Field(default=None, ge=0, le=60_000)
    loss_percent: float | None = Field(default=None, ge=0, le=100)


class AdminStep(_Model):
    op: AdminOp
    pool: str | None = None
    disaster_mode: bool = False
    force: bool = False
    user: str | None = None
    to: str | None = None
    from_pool: str | None = Field(
        default=None,
        description="user-move: every user homed there; user-import: the newest export of it",
    )
    rate: float | None = Field(default=None, gt=0, le=10_000, description="user-move: users/s")


class DnsOverrides(_Model):
    """The drill's changes to the topology's DNS: shorter TTLs, so clients see a
    repointed record in a drill's minutes rather than the zone's."""

    ttl: int | None = Field(default=None, ge=0, le=604800)
    negative_ttl: int | None = Field(default=None, ge=0, le=86400)


class WriteStep(_Model):
    """Write user data (contacts added) through the pools, to measure what a
    failover keeps (acknowledged before the last sync) and loses (after)."""

    users: str = "*"
    contacts: int = Field(default=1, ge=1, le=1000)


class ChaosStep(_Model):
    """Randomised chaos as one step (docs/chaos.md): the nemesis of ``seed`` for
    ``duration`` seconds while writers add contacts, then the checker; the step
    fails on any violation. Every fault is healed at its end."""

    seed: int = Field(ge=0)
    duration: float = Field(gt=0, le=86_400)
    faults: int | None = Field(default=None, ge=1, description="stop after this many faults")
    kinds: list[FaultKind] = Field(default=[], description="default: every kind the runtime can do")
    max_concurrent: int = Field(default=2, ge=1, le=10)
    gap: tuple[float, float] = (3.0, 15.0)
    hold: tuple[float, float] = (5.0, 25.0)
    home_bound: float = Field(default=180.0, gt=0, le=86_400)
    write_interval: float = Field(default=0.2, ge=0, le=60)


class Step(_Model):
    name: str | None = None
    wait: WaitStep | None = None
    fault: FaultStep | None = None
    heal: str | None = Field(default=None, description="a fault id, or `all`")
    admin: AdminStep | None = None
    write: WriteStep | None = None
    sleep: float | None = Field(default=None, ge=0, le=86_400)
    chaos: ChaosStep | None = None
    timeout: float = Field(default=600, gt=0, le=86_400)
    measure: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9_]{0,40}$")
    #: The call phase this step's time is (docs/measurements.md, "Calls").
    phase: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9_]{0,40}$")

    @model_validator(mode="after")
    def _one_action(self) -> Step:
        actions = [
            k
            for k in ("wait", "fault", "heal", "admin", "write", "sleep", "chaos")
            if getattr(self, k) is not None
        ]
        if len(actions) != 1:
            raise ValueError(
                "a step has exactly one of wait, fault, heal, admin, write, sleep, chaos "
                f"(this one has {actions or 'none'})"
            )
        return self

    @property
    def action(self) -> str:
        for k in ("wait", "fault", "heal", "admin", "write", "sleep", "chaos"):
            if getattr(self, k) is not None:
                return k
        raise AssertionError("validated: one action")

    def describe(self) -> str:
        if self.name:
            return self.name
        value = getattr(self, self.action)
        if isinstance(value, BaseModel):
            fields = ", ".join(f"{k}={v}" for k, v in value.model_dump(exclude_none=True).items())
            return f"{self.action} {fields}"
        return f"{self.action} {value}"


class Bound(_Model):
    max: float | None = None
    min: float | None = None


class Drill(_Model):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,60}$")
    description: str = ""
    topology: str = Field(description="path of the topology file, relative to the drill file")
    runtime: Literal["docker", "local", "swarm"] = "local"
    timers: dict[str, Any] = Field(
        default_factory=dict, description="overrides of the topology's timers for this drill"
    )
    dns: DnsOverrides = DnsOverrides()
    clients: ClientsSpec = ClientsSpec()
    steps: list[Step] = Field(min_length=1)
    expect: dict[str, Bound] = {}


class LoadedDrill(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    drill: Drill
    path: str
    topology_path: str
    topology: Topology
    topology_yaml: str  # the topology with the drill's timer overrides applied


def load_drill(path: str | Path) -> LoadedDrill:
    fname = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise DrillFileError(
            fname,
            [FileIssue(fname, None, "(file)", f"cannot read: {exc.strerror}", "check the path")],
        ) from None
    drill, lines = load_model(
        text, fname, Drill, DrillFileError, "start the file with `name:`, `topology:`, `steps:`"
    )
    issues: list[FileIssue] = []

    def err(loc: list[str | int], message: str, fix: str) -> None:
        issues.append(FileIssue(fname, lines.line(loc), dotted(loc), message, fix))

    topo_path = (Path(path).parent / drill.topology).resolve()
    try:
        raw = yaml.safe_load(topo_path.read_text(encoding="utf-8"))
    except OSError as exc:
        err(
            ["topology"],
            f"cannot read the topology {topo_path}: {exc.strerror}",
            "give a path relative to the drill file",
        )
        raise DrillFileError(fname, issues) from None
    except yaml.YAMLError:
        raw = None
    if isinstance(raw, dict) and drill.timers:
        raw.setdefault("timers", {})
        if isinstance(raw["timers"], dict):
            raw["timers"].update(drill.timers)
    dns = drill.dns.model_dump(exclude_none=True)
    if isinstance(raw, dict) and dns and isinstance(raw.get("dns"), dict):
        raw["dns"].update(dns)
    topo_yaml = (
        yaml.safe_dump(raw, sort_keys=False) if isinstance(raw, dict) else topo_path.read_text()
    )
    try:
        topology = parse_topology(topo_yaml, f"{topo_path} (with the timers of {fname})").topology
    except TopologyError as exc:
        for issue in exc.issues:
            if issue.severity == "error":
                where: list[str | int] = [
                    "timers" if issue.field.startswith("timers") else "topology"
                ]
                err(where, f"{issue.field}: {issue.message}", issue.fix)
        raise DrillFileError(fname, issues) from None

    pools = {p.fqdn for p in topology.pools}
    sites = {s.name for s in topology.sites}
    services = {"dns"} | set(pool_fault_targets(topology))
    services |= {f"backup-{short_name(p.fqdn)}" for p in topology.pools if p.backup}
    fault_ids: set[str] = set()
    measures: set[str] = set()
    phases = {s.phase for s in drill.steps if s.phase}
    for i, step in enumerate(drill.steps):
        base: list[str | int] = ["steps", i]
        if step.wait is not None:
            if step.wait.pool is not None and step.wait.pool not in pools:
                err(
                    [*base, "wait", "pool"],
                    f"unknown pool {step.wait.pool!r}",
                    f"use one of {sorted(pools)}",
                )
            _check_selector(step.wait.users, pools, [*base, "wait", "users"], err)
        if step.fault is not None:
            f = step.fault
            if f.target not in services | sites:
                err(
                    [*base, "fault", "target"],
                    f"unknown target {f.target!r}",
                    f"use a service ({', '.join(sorted(services))}) "
                    f"or a site ({', '.join(sorted(sites))})",
                )
            if f.kind is FaultKind.PARTITION and f.peer not in sites:
                err(
                    [*base, "fault", "peer"],
                    "a partition needs `peer:`, another site",
                    f"use one of {sorted(sites)}",
                )
            if f.id:
                if f.id in fault_ids:
                    err(
                        [*base, "fault", "id"],
                        f"fault id {f.id!r} is used twice",
                        "give each fault its own id",
                    )
                fault_ids.add(f.id)
        if step.heal is not None and step.heal != "all" and step.heal not in fault_ids:
            err(
                [*base, "heal"],
                f"no earlier fault has id {step.heal!r}",
                f"use `all` or one of {sorted(fault_ids) or '(no fault ids yet)'}",
            )
        if step.admin is not None:
            a = step.admin
            needs_pool = ("pool-failover", "pool-failback", "backup-sync", "user-export",
                          "user-import")
            if a.op in needs_pool and a.pool not in pools:
                err(
                    [*base, "admin", "pool"],
                    f"{a.op} needs `pool:`, one of the topology's pools"
                    + (" (the pool to restore into)" if a.op == "user-import" else ""),
                    f"use one of {sorted(pools)}",
                )
            if a.op == "user-move" and (
                (a.user is None) == (a.from_pool is None) or a.to not in pools
            ):
                err(
                    [*base, "admin"],
                    "user-move needs `to:` (a pool) and either `user:` (one user) or "
                    "`from_pool:` (every user homed on that pool)",
                    f"add them; pools: {sorted(pools)}",
                )
            if a.from_pool is not None and a.from_pool not in pools:
                err(
                    [*base, "admin", "from_pool"],
                    f"unknown pool {a.from_pool!r}",
                    f"use one of {sorted(pools)}",
                )
            exporting = a.op == "user-export" and a.pool in pools
            if exporting and topology.pool(a.pool or "").user_data_export is None:
                err(
                    [*base, "admin", "pool"],
                    f"{a.pool} has no scheduled export (`user_data_export:` in the topology)",
                    "add `user_data_export: {copy_to: <DR pool>}` to the pool",
                )
            repoint = (a.pool, a.to)
            if a.op == "dns-repoint" and (not set(repoint) <= set(pools) or a.pool == a.to):
                err(
                    [*base, "admin"],
                    "dns-repoint needs `pool:` (the failed pool) and `to:` (the pool DNS should "
                    "name instead), two different pools of the topology",
                    f"use two of {sorted(pools)}",
                )
        if step.write is not None:
            _check_selector(step.write.users, pools, [*base, "write", "users"], err)
        if step.chaos is not None:
            for name in ("gap", "hold"):
                lo, hi = getattr(step.chaos, name)
                if not 0 <= lo <= hi:
                    err(
                        [*base, "chaos", name],
                        f"{name} [{lo:g}, {hi:g}] is not a range of seconds",
                        "give [low, high] with 0 <= low <= high",
                    )
            can = RUNTIME_FAULTS[RuntimeKind(drill.runtime)]
            bad = [k for k in step.chaos.kinds if k not in can]
            if bad:
                err(
                    [*base, "chaos", "kinds"],
                    f"the {drill.runtime} runtime cannot do {', '.join(bad)}",
                    f"use kinds of {', '.join(can)}",
                )
        if step.measure:
            if step.measure in DRILL_METRICS:
                err(
                    [*base, "measure"],
                    f"{step.measure!r} is a drill metric the report computes",
                    "give the step's measure another name",
                )
            if step.measure in measures:
                err([*base, "measure"], f"metric {step.measure!r} is measured twice", "rename one")
            measures.add(step.measure)
        if step.phase in (*CALL_VALUES, "setup"):
            err(
                [*base, "phase"],
                f"{step.phase!r} is the name of a call metric, not of a phase",
                f"name the phase otherwise (e.g. one of {', '.join(AUTO_PHASES)})",
            )
    for name in drill.expect:
        if name.startswith("calls.") and "call" not in drill.clients.workload:
            err(
                ["expect", name],
                f"{name} measures the call workload, which this drill does not run",
                "add `call` to `clients.workload` (and tune `clients.calls`)",
            )
            continue
        if name not in measures and not is_known_metric(name, phases):
            err(
                ["expect", name],
                f"no step measures {name!r}, and it is not a drill metric",
                "use a step's `measure:` name"
                + (f" ({', '.join(sorted(measures))})" if measures else "")
                + f", one of {', '.join(DRILL_METRICS)}, or `<per-client metric>.<stat>` with a "
                f"metric of {', '.join(CLIENT_METRICS)} and a stat of {', '.join(STATS)} "
                "(e.g. reconnect.p95), or a call metric: `calls.[<phase>.]<value>` with a "
                f"value of {', '.join(CALL_VALUES)} or setup.<stat> and a phase of "
                f"{', '.join(sorted(set(AUTO_PHASES) | phases))} (e.g. "
                "calls.resiliency.success_ratio); see docs/measurements.md",
            )
    if issues:
        raise DrillFileError(fname, issues)
    return LoadedDrill(
        drill=drill,
        path=fname,
        topology_path=str(topo_path),
        topology=topology,
        topology_yaml=topo_yaml,
    )


def _check_selector(sel: str, pools: set[str], loc: list[str | int], err: Any) -> None:
    if sel == "*":
        return
    pool, _, rest = sel.partition(":")
    if rest != "*" or pool not in pools:
        err(
            loc,
            f"bad user selector {sel!r}",
            f"use `*` or `<pool>:*` with a pool of {sorted(pools)}",
        )
