"""The nemesis: a seeded schedule of faults and administrator operations.

Sans-IO: :func:`schedule` takes a seed, the lab's shape and a
:class:`NemesisConfig` and returns timed :class:`NemesisOp` s; it touches
no lab, so the same seed gives the same schedule, and the rules it follows
are tested without a lab. The runner (:mod:`.runner`) applies them.

What it does, as an administrator facing random failures would:

* injects a random fault (a kind the runtime can do) on a random target at a
  random time, never on a target an active fault already holds, at most
  ``max_concurrent`` at once, and heals it after a random hold;
* when a fault takes a pool down (cut, crash, stop, pause or disconnect of
  the pool or its site), fails the pool over to its backup pool in disaster
  mode (``Invoke-CsPoolFailOver -DisasterMode``), some of the time, but only
  when the ordering rule allows it (REFERENCE.md): never while the backup
  pool is down, never while the backup pool's own users are failed over to
  the failed pool, never twice; the CMS is failed over first (``-Force``)
  when its active master is on the pool that is down;
* fails the pool back (``Invoke-CsPoolFailBack``, not disaster mode: nothing
  the users wrote on the backup pool is to be lost) once the pool and its
  backup are both up again.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sipdrill.orchestrator.fault_model import RUNTIME_FAULTS, FaultKind
from sipdrill.orchestrator.plan import RuntimeKind, short_name
from sipdrill.topology import Topology


class NemesisOpKind(StrEnum):
    FAULT = "fault"
    HEAL = "heal"
    CMS_FAILOVER = "cms-failover"
    POOL_FAILOVER = "pool-failover"
    POOL_FAILBACK = "pool-failback"


#: Faults that take the pool they hit (or every pool of the site they hit) down.
DOWN_KINDS = frozenset(
    {FaultKind.CUT, FaultKind.CRASH, FaultKind.STOP, FaultKind.PAUSE, FaultKind.DISCONNECT}
)

#: Kinds the local runtime takes on a site (every process of it, as one fault).
LOCAL_SITE_KINDS = frozenset({FaultKind.CUT, FaultKind.CRASH})


@dataclass(frozen=True)
class NemesisOp:
    """One operation of the schedule, ``at`` seconds after the chaos starts."""

    at: float
    op: NemesisOpKind
    fault_id: str | None = None  # fault and heal
    kind: FaultKind | None = None  # fault
    target: str | None = None  # fault
    params: tuple[tuple[str, Any], ...] = ()  # fault: the drill file's parameters
    pool: str | None = None  # failover and failback: the home pool (P1)
    disaster_mode: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"at": round(self.at, 3), "op": self.op.value}
        for key in ("fault_id", "target", "pool"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.kind is not None:
            out["kind"] = self.kind.value
        if self.params:
            out["params"] = dict(self.params)
        if self.op is NemesisOpKind.POOL_FAILOVER:
            out["disaster_mode"] = self.disaster_mode
        return out

    def describe(self) -> str:
        if self.op is NemesisOpKind.FAULT:
            extra = "".join(f" {k}={v}" for k, v in self.params)
            return f"fault {self.fault_id}: {self.kind} {self.target}{extra}"
        if self.op is NemesisOpKind.HEAL:
            return f"heal {self.fault_id}"
        if self.op is NemesisOpKind.POOL_FAILOVER:
            return f"pool failover {self.pool}" + (" (disaster mode)" if self.disaster_mode else "")
        if self.op is NemesisOpKind.POOL_FAILBACK:
            return f"pool failback {self.pool}"
        return "cms failover (force)"


@dataclass(frozen=True)
class LabShape:
    """What the nemesis knows of a lab: its pools, their pairing and sites,
    the services and sites a fault may hit, where the CMS master starts."""

    pools: tuple[str, ...]
    partners: tuple[tuple[str, str], ...]  # (pool, its backup pool)
    pool_sites: tuple[tuple[str, str], ...]  # (pool, site)
    services: tuple[tuple[str, str], ...]  # (service name, its site or "core")
    sites: tuple[str, ...]
    cms_active: str

    @classmethod
    def from_topology(cls, topology: Topology) -> LabShape:
        pools = tuple(p.fqdn for p in topology.pools)
        services: list[tuple[str, str]] = [("dns", "core")]
        for p in topology.pools:
            services.append((short_name(p.fqdn), p.site))
            if p.backup:
                services.append((f"backup-{short_name(p.fqdn)}", p.site))
        return cls(
            pools=pools,
            partners=tuple((p.fqdn, p.backup) for p in topology.pools if p.backup),
            pool_sites=tuple((p.fqdn, p.site) for p in topology.pools),
            services=tuple(services),
            sites=tuple(s.name for s in topology.sites),
            cms_active=topology.cms.active,
        )

    def partner(self, pool: str) -> str | None:
        return dict(self.partners).get(pool)

    def members(self, target: str) -> frozenset[str]:
        """The services a fault on ``target`` (a service or a site) holds."""
        if target in self.sites:
            return frozenset(n for n, site in self.services if site == target)
        return frozenset({target})

    def pools_down(self, kind: FaultKind, target: str) -> frozenset[str]:
        """The pools a fault takes down (their service is among its members)."""
        if kind not in DOWN_KINDS:
            return frozenset()
        held = self.members(target)
        return frozenset(p for p in self.pools if short_name(p) in held)


@dataclass(frozen=True)
class NemesisConfig:
    """How the nemesis behaves. Times in seconds."""

    duration: float = 600.0
    #: Stop injecting after this many faults (None: as many as the duration holds).
    max_faults: int | None = None
    #: The kinds to draw from (empty: every kind the runtime can do).
    kinds: tuple[FaultKind, ...] = ()
    max_concurrent: int = 2
    gap: tuple[float, float] = (3.0, 15.0)  # from one injection to the next
    hold: tuple[float, float] = (5.0, 25.0)  # from an injection to its heal
    failover_probability: float = 0.7
    failover_delay: tuple[float, float] = (1.0, 5.0)  # the administrator reacts
    failback_delay: tuple[float, float] = (1.0, 4.0)  # after the heal
    #: degrade's ranges (docker).
    delay_ms: tuple[int, int] = (50, 400)
    loss_percent: tuple[float, float] = (0.0, 10.0)

    def __post_init__(self) -> None:
        for name in ("gap", "hold", "failover_delay", "failback_delay"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name}: need 0 <= low <= high, not {lo}..{hi}")
        if self.duration <= 0:
            raise ValueError("duration must be positive")
        if self.max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        if not 0 <= self.failover_probability <= 1:
            raise ValueError("failover_probability is a probability (0..1)")

    def to_json(self) -> dict[str, Any]:
        return {
            "duration": self.duration,
            "max_faults": self.max_faults,
            "kinds": [k.value for k in self.kinds],
            "max_concurrent": self.max_concurrent,
            "gap": list(self.gap),
            "hold": list(self.hold),
            "failover_probability": self.failover_probability,
            "failover_delay": list(self.failover_delay),
            "failback_delay": list(self.failback_delay),
        }


def fault_kinds(runtime: RuntimeKind, wanted: Iterable[FaultKind] = ()) -> tuple[FaultKind, ...]:
    """The kinds the nemesis draws from on ``runtime`` (``wanted`` narrows them;
    a kind the runtime cannot do raises ValueError naming the ones it can)."""
    can = tuple(RUNTIME_FAULTS[runtime])
    chosen = tuple(wanted)
    bad = [k for k in chosen if k not in can]
    if bad:
        raise ValueError(
            f"the {runtime} runtime cannot do {', '.join(bad)}; it can do {', '.join(can)}"
        )
    return chosen or can


def targets_for(kind: FaultKind, shape: LabShape, runtime: RuntimeKind) -> tuple[str, ...]:
    """Where a fault of ``kind`` may strike (clients never: they observe)."""
    if kind is FaultKind.DNS_OUTAGE:
        return ("dns",)
    services = tuple(n for n, _site in shape.services)
    if kind is FaultKind.PARTITION:
        return shape.sites if len(shape.sites) > 1 else ()
    if runtime is RuntimeKind.LOCAL and kind not in LOCAL_SITE_KINDS:
        return services
    return services + shape.sites


@dataclass(order=True)
class _Event:
    at: float
    order: int
    what: str = field(compare=False)
    subject: str = field(compare=False)


@dataclass
class _Active:
    kind: FaultKind
    members: frozenset[str]
    down: frozenset[str]


class _Model:
    """The lab as the nemesis believes it is: faults in force, pools failed over,
    where the CMS master is."""

    def __init__(self, shape: LabShape) -> None:
        self.shape = shape
        self.active: dict[str, _Active] = {}
        self.failed_over: set[str] = set()  # home pools whose users are on the backup
        self.cms = shape.cms_active

    def down(self) -> frozenset[str]:
        return frozenset().union(*(a.down for a in self.active.values()))

    def held(self) -> frozenset[str]:
        return frozenset().union(*(a.members for a in self.active.values()))

    def may_fail_over(self, pool: str) -> bool:
        """The ordering rule, and the seeds' facts: a down pool, an up backup pool
        whose own users are not failed over to it, not failed over already."""
        backup = self.shape.partner(pool)
        down = self.down()
        return (
            backup is not None
            and pool in down
            and backup not in down
            and pool not in self.failed_over
            and backup not in self.failed_over
        )

    def may_fail_back(self, pool: str) -> bool:
        backup = self.shape.partner(pool)
        down = self.down()
        return pool in self.failed_over and pool not in down and backup not in down


def schedule(
    seed: int, shape: LabShape, config: NemesisConfig, runtime: RuntimeKind
) -> list[NemesisOp]:
    """The nemesis's operations for ``seed``, in time order. Every fault is
    healed by ``config.duration``; every pool failed over is failed back
    once it and its backup are up (at or after the last heal)."""
    rng = random.Random(seed)
    kinds = fault_kinds(runtime, config.kinds)
    model = _Model(shape)
    ops: list[NemesisOp] = []
    queue: list[_Event] = []
    counter = 0

    def push(at: float, what: str, subject: str = "") -> None:
        nonlocal counter
        counter += 1
        heapq.heappush(queue, _Event(at, counter, what, subject))

    injected = 0
    push(rng.uniform(*config.gap), "inject")
    while queue:
        ev = heapq.heappop(queue)
        t = ev.at
        if ev.what == "inject":
            if config.max_faults is not None and injected >= config.max_faults:
                continue
            if t >= config.duration:
                continue
            push(t + rng.uniform(*config.gap), "inject")
            if len(model.active) >= config.max_concurrent:
                continue
            op = _draw_fault(rng, kinds, shape, runtime, model, f"f{injected + 1:03d}", t, config)
            if op is None:
                continue
            injected += 1
            ops.append(op)
            assert op.fault_id is not None and op.kind is not None and op.target is not None
            peer = dict(op.params).get("peer")
            members = shape.members(op.target) | (shape.members(peer) if peer else frozenset())
            down = shape.pools_down(op.kind, op.target)
            model.active[op.fault_id] = _Active(op.kind, members, down)
            hold = 0.0 if op.kind is FaultKind.RESTART else rng.uniform(*config.hold)
            heal_at = min(t + hold, max(config.duration, t))
            push(heal_at, "heal", op.fault_id)
            for pool in sorted(down):
                if rng.random() < config.failover_probability:
                    at = t + rng.uniform(*config.failover_delay)
                    if at < heal_at:
                        push(at, "failover", pool)
        elif ev.what == "heal":
            model.active.pop(ev.subject)
            ops.append(NemesisOp(t, NemesisOpKind.HEAL, fault_id=ev.subject))
            for pool in sorted(model.failed_over):
                if model.may_fail_back(pool):
                    push(t + rng.uniform(*config.failback_delay), "failback", pool)
        elif ev.what == "failover":
            pool = ev.subject
            if not model.may_fail_over(pool):
                continue
            backup = shape.partner(pool)
            assert backup is not None
            if model.cms in model.down():
                # The CMS master is away: the standby takes over first (-Force), else
                # the pool failover cannot write its record.
                ops.append(NemesisOp(t, NemesisOpKind.CMS_FAILOVER))
                model.cms = shape.partner(model.cms) or model.cms
            ops.append(NemesisOp(t, NemesisOpKind.POOL_FAILOVER, pool=pool, disaster_mode=True))
            model.failed_over.add(pool)
        elif ev.what == "failback":
            pool = ev.subject
            if model.may_fail_back(pool):  # not twice: two heals may both have asked
                ops.append(NemesisOp(t, NemesisOpKind.POOL_FAILBACK, pool=pool))
                model.failed_over.discard(pool)
    return ops


def _draw_fault(
    rng: random.Random,
    kinds: Sequence[FaultKind],
    shape: LabShape,
    runtime: RuntimeKind,
    model: _Model,
    fault_id: str,
    t: float,
    config: NemesisConfig,
) -> NemesisOp | None:
    """A fault whose targets no active fault holds, or None if there is none."""
    held = model.held()
    choices: list[tuple[FaultKind, str]] = []
    for kind in kinds:
        for target in targets_for(kind, shape, runtime):
            members = shape.members(target)
            if kind is FaultKind.PARTITION:
                members = frozenset(n for n, _s in shape.services if _s != "core")
            if not members & held:
                choices.append((kind, target))
    if not choices:
        return None
    kind, target = choices[rng.randrange(len(choices))]
    params: dict[str, Any] = {}
    if kind is FaultKind.PARTITION:
        params["peer"] = rng.choice([s for s in shape.sites if s != target])
    elif kind is FaultKind.DEGRADE:
        delay = rng.randint(*config.delay_ms)
        params["delay_ms"] = delay
        params["jitter_ms"] = rng.randint(0, delay // 4)
        params["loss_percent"] = round(rng.uniform(*config.loss_percent), 1)
    elif kind is FaultKind.DNS_OUTAGE:
        params["mode"] = rng.choice(["drop", "servfail"])
    return NemesisOp(
        t, NemesisOpKind.FAULT, fault_id=fault_id, kind=kind, target=target,
        params=tuple(sorted(params.items())),
    )


def ordering_problems(ops: Sequence[NemesisOp], shape: LabShape) -> list[str]:
    """Replay a schedule and say where it breaks the rules (none for a schedule
    :func:`schedule` made): the tests' and the checker's view of the rule."""
    model = _Model(shape)
    problems: list[str] = []
    for op in ops:
        if op.op is NemesisOpKind.FAULT:
            assert op.fault_id is not None and op.kind is not None and op.target is not None
            peer = dict(op.params).get("peer")
            members = shape.members(op.target) | (shape.members(peer) if peer else frozenset())
            if members & model.held():
                problems.append(f"{op.at:.1f}: {op.describe()} on a target already faulted")
            model.active[op.fault_id] = _Active(
                op.kind, members, shape.pools_down(op.kind, op.target)
            )
        elif op.op is NemesisOpKind.HEAL:
            if op.fault_id not in model.active:
                problems.append(f"{op.at:.1f}: heal of {op.fault_id}, not in force")
            model.active.pop(op.fault_id or "", None)
        elif op.op is NemesisOpKind.CMS_FAILOVER:
            target = shape.partner(model.cms)
            if target in model.down():
                problems.append(f"{op.at:.1f}: CMS failover to {target}, which is down")
            model.cms = target or model.cms
        elif op.op is NemesisOpKind.POOL_FAILOVER:
            assert op.pool is not None
            if not model.may_fail_over(op.pool):
                problems.append(f"{op.at:.1f}: {op.describe()} breaks the ordering rule")
            if model.cms in model.down():
                problems.append(f"{op.at:.1f}: {op.describe()} with the CMS master down")
            model.failed_over.add(op.pool)
        elif op.op is NemesisOpKind.POOL_FAILBACK:
            assert op.pool is not None
            if not model.may_fail_back(op.pool):
                problems.append(f"{op.at:.1f}: {op.describe()} while a pool of the pair is down")
            model.failed_over.discard(op.pool)
    if model.active:
        problems.append(f"faults never healed: {', '.join(sorted(model.active))}")
    if model.failed_over:
        problems.append(f"pools never failed back: {', '.join(sorted(model.failed_over))}")
    return problems
