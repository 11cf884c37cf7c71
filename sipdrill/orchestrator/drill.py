"""The drill file: a scenario that runs on a topology.

A drill names its topology, the timers it shortens (a drill in CI cannot wait
Microsoft's 120 s twice), how many clients to run, and a list of steps: wait
for clients to reach a mode, inject a fault, run an administrator operation,
write user data, heal. Steps may carry a ``measure`` name: the time the step
took is then a metric of the report. ``expect`` bounds those metrics, the
drill's RTO and RPO, and percentiles of the per-client times
(``reconnect.p95``: see docs/measurements.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sipdrill.errors import DrillFileError, FileIssue, TopologyError
from sipdrill.orchestrator.fault_model import FaultKind
from sipdrill.orchestrator.measure import CLIENT_METRICS, DRILL_METRICS, STATS, is_known_metric
from sipdrill.orchestrator.plan import short_name
from sipdrill.topology import Topology, parse_topology
from sipdrill.yamlfile import dotted, load_model


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


ClientMode = Literal["full", "resiliency", "signed-out", "registered"]
AdminOp = Literal[
    "pool-failover",
    "pool-failback",
    "cms-failover",
    "backup-sync",
    "user-move",
    "dns-repoint",
]


class ClientsSpec(_Model):
    count: int = Field(default=50, ge=0, le=100_000)
    processes: int = Field(default=1, ge=1, le=64)
    workload: list[Literal["im", "presence", "conference"]] = []


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


class WriteStep(_Model):
    """Write user data (contacts added) through the pools, to measure what a
    failover keeps (acknowledged before the last sync) and loses (after)."""

    users: str = "*"
    contacts: int = Field(default=1, ge=1, le=1000)


class Step(_Model):
    name: str | None = None
    wait: WaitStep | None = None
    fault: FaultStep | None = None
    heal: str | None = Field(default=None, description="a fault id, or `all`")
    admin: AdminStep | None = None
    write: WriteStep | None = None
    sleep: float | None = Field(default=None, ge=0, le=86_400)
    timeout: float = Field(default=600, gt=0, le=86_400)
    measure: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9_]{0,40}$")

    @model_validator(mode="after")
    def _one_action(self) -> Step:
        actions = [
            k
            for k in ("wait", "fault", "heal", "admin", "write", "sleep")
            if getattr(self, k) is not None
        ]
        if len(actions) != 1:
            raise ValueError(
                "a step has exactly one of wait, fault, heal, admin, write, sleep "
                f"(this one has {actions or 'none'})"
            )
        return self

    @property
    def action(self) -> str:
        for k in ("wait", "fault", "heal", "admin", "write", "sleep"):
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
    services = {"dns"} | {short_name(p.fqdn) for p in topology.pools}
    services |= {f"backup-{short_name(p.fqdn)}" for p in topology.pools if p.backup}
    fault_ids: set[str] = set()
    measures: set[str] = set()
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
            if a.op in ("pool-failover", "pool-failback", "backup-sync") and a.pool not in pools:
                err(
                    [*base, "admin", "pool"],
                    f"{a.op} needs `pool:`, one of the topology's pools",
                    f"use one of {sorted(pools)}",
                )
            if a.op == "user-move" and (a.user is None or a.to not in pools):
                err([*base, "admin"], "user-move needs `user:` and `to:` (a pool)", "add both")
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
    for name in drill.expect:
        if name not in measures and not is_known_metric(name):
            err(
                ["expect", name],
                f"no step measures {name!r}, and it is not a drill metric",
                "use a step's `measure:` name"
                + (f" ({', '.join(sorted(measures))})" if measures else "")
                + f", one of {', '.join(DRILL_METRICS)}, or `<per-client metric>.<stat>` with a "
                f"metric of {', '.join(CLIENT_METRICS)} and a stat of {', '.join(STATS)} "
                "(e.g. reconnect.p95); see docs/measurements.md",
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
