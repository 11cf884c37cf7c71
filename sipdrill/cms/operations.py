"""The Central Management Store over HTTP: one active master, its standby on
the partner pool, and a read-only replica in every other pool
(:mod:`sipdrill.cms.store`).

- Changes go through the active master (:func:`cms_update`), which is then
  replicated to the standby and every replica; the Backup Service of the
  master's pool repeats the push every cycle (:func:`replicate_cms`), so a
  pool that was down catches up. While the master is unreachable, service
  goes on from the replicas, but every change fails with ``cms-unavailable``
  (HTTP 503).
- :func:`cms_failover` is Invoke-CsManagementServerFailover and
  :func:`cms_status` Get-CsManagementStoreReplicationStatus.

The pools are reached through anything with a ``pool(fqdn)`` that gives a
client of the pool's ``/cms*`` routes (:class:`CmsPeers`: the lab's clients).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from sipdrill.cms.store import CmsConfigPatch, CmsRole
from sipdrill.errors import OperationError
from sipdrill.topology import Topology

PROBE_TIMEOUT = 3.0


class CmsPeer(Protocol):
    """A pool's ``/cms*`` routes (:class:`~sipdrill.pool.client.PoolClient` has them)."""

    @property
    def pool_fqdn(self) -> str: ...

    async def cms(self, time_limit: float | None = None) -> dict[str, Any]: ...

    async def cms_put_config(self, patch: Mapping[str, Any]) -> dict[str, Any]: ...

    async def cms_replicate(self, document: Mapping[str, Any]) -> dict[str, Any]: ...

    async def cms_role(self, **fields: Any) -> dict[str, Any]: ...


class CmsPeers(Protocol):
    """Every pool of the lab (:class:`~sipdrill.pool.client.PoolClients` and
    :class:`~sipdrill.backup.client.LabClients` are)."""

    def pool(self, fqdn: str) -> CmsPeer: ...


# --- over HTTP: finding the master, changing, replicating -------------------------


@dataclass(frozen=True)
class CmsPoolView:
    pool: str
    reachable: bool
    role: str | None = None
    read_only: bool = False
    version: int | None = None
    generation: int | None = None
    active_master: str | None = None
    document: dict[str, Any] | None = None
    error: str | None = None

    def order(self) -> tuple[int, int]:
        return (self.generation or 0, self.version or 0)


async def _view(client: CmsPeer) -> CmsPoolView:
    try:
        body = await client.cms(time_limit=PROBE_TIMEOUT)
    except (OperationError, OSError) as exc:
        return CmsPoolView(client.pool_fqdn, False, error=str(exc))
    return CmsPoolView(
        client.pool_fqdn,
        True,
        role=body.get("role"),
        read_only=bool(body.get("read_only")),
        version=int(body.get("version", 0)),
        generation=int(body.get("generation", 1)),
        active_master=str(body.get("ActiveMasterFqdn") or body.get("active_master") or ""),
        document=body.get("document"),
    )


async def cms_views(
    topology: Topology, clients: CmsPeers, skip: Collection[str] = ()
) -> dict[str, CmsPoolView]:
    """Every pool's view of the CMS; pools in ``skip`` (known not to answer)
    count as unreachable without a probe."""

    async def view(pool: str) -> CmsPoolView:
        if pool in skip:
            return CmsPoolView(pool, False, error="not asked: known not to answer")
        return await _view(clients.pool(pool))

    views = await asyncio.gather(*(view(p.fqdn) for p in topology.pools))
    return {v.pool: v for v in views}


def active_master_of(topology: Topology, views: Mapping[str, CmsPoolView]) -> str:
    """The master the newest reachable replica names (the topology's when
    none answers)."""
    known = [v for v in views.values() if v.reachable and v.active_master]
    if not known:
        return topology.cms.active
    return max(known, key=CmsPoolView.order).active_master or topology.cms.active


def _unavailable(active: str, why: str) -> OperationError:
    return OperationError(
        "cms-unavailable",
        f"the active CMS master on {active} is {why}: no configuration change is possible "
        "(service goes on); fail the CMS over first (sipdrill admin cms failover [--force])",
        503,
    )


async def require_cms(
    topology: Topology, clients: CmsPeers, skip: Collection[str] = ()
) -> CmsPoolView:
    """The active master's view; ``cms-unavailable`` if it cannot take changes."""
    views = await cms_views(topology, clients, skip)
    active = active_master_of(topology, views)
    view = views.get(active)
    if view is None or not view.reachable:
        raise _unavailable(active, "unreachable")
    if view.role != CmsRole.ACTIVE.value:
        raise _unavailable(active, f"not answering as the master (role {view.role})")
    if view.read_only:
        raise _unavailable(active, "read-only (a CMS failover is under way)")
    return view


async def replicate_cms(
    topology: Topology, clients: CmsPeers, source_pool: str, skip: Collection[str] = ()
) -> dict[str, str]:
    """If ``source_pool`` hosts the writable active master, push its document
    to every pool that is behind; ``{pool: outcome}``."""
    source = clients.pool(source_pool)
    body = await source.cms(time_limit=PROBE_TIMEOUT)
    if body.get("role") != CmsRole.ACTIVE.value or body.get("read_only"):
        return {}
    doc = body.get("document") or {}
    order = (int(doc.get("generation", 1)), int(doc.get("version", 0)))
    outcome: dict[str, str] = {}

    async def push(pool: str) -> None:
        if pool in skip:
            outcome[pool] = "unreachable"
            return
        client = clients.pool(pool)
        try:
            view = await _view(client)
            if not view.reachable:
                outcome[pool] = "unreachable"
                return
            if view.order() >= order:
                outcome[pool] = "up-to-date"
                return
            await client.cms_replicate(doc)
            outcome[pool] = "replicated"
        except (OperationError, OSError) as exc:
            outcome[pool] = f"refused: {exc}"

    await asyncio.gather(*(push(p.fqdn) for p in topology.pools if p.fqdn != source.pool_fqdn))
    return outcome


async def cms_update(
    topology: Topology, clients: CmsPeers, patch: CmsConfigPatch, skip: Collection[str] = ()
) -> dict[str, Any]:
    """Change the configuration through the active master, then replicate it
    to the standby and every replica (best effort: the Backup Service of the
    master's pool retries). Raises ``cms-unavailable`` when the master cannot
    take the change; nothing is changed then. ``skip``: pools known not to
    answer, not probed (a bulk move's batches would each wait for them)."""
    view = await require_cms(topology, clients, skip)
    assert view.active_master is not None
    master = clients.pool(view.pool)
    body = patch.model_dump(mode="json", exclude_none=True)
    try:
        new = await master.cms_put_config(body)
    except OSError as exc:
        raise _unavailable(view.pool, f"unreachable ({exc})") from None
    replicated = await replicate_cms(topology, clients, view.pool, skip)
    return {**new, "replicated": replicated}


# --- Get-CsManagementStoreReplicationStatus ------------------------------------------


@dataclass(frozen=True)
class CmsReplicaStatus:
    pool: str
    role: str | None
    reachable: bool
    version: int | None
    generation: int | None
    up_to_date: bool


@dataclass(frozen=True)
class CmsStatus:
    active_master_fqdn: str
    active_reachable: bool
    standby: str | None
    version: int | None
    generation: int | None
    replication_state: str  # UpToDate | Behind | MasterUnavailable
    replicas: list[CmsReplicaStatus] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ActiveMasterFqdn"] = self.active_master_fqdn
        return out


async def cms_status(topology: Topology, clients: CmsPeers) -> CmsStatus:
    views = await cms_views(topology, clients)
    active = active_master_of(topology, views)
    master = views.get(active)
    reachable = bool(master and master.reachable and master.role == CmsRole.ACTIVE.value)
    newest = max((v for v in views.values() if v.reachable), key=CmsPoolView.order, default=None)
    target = master.order() if reachable and master else (newest.order() if newest else (0, 0))
    replicas = [
        CmsReplicaStatus(
            v.pool, v.role, v.reachable, v.version, v.generation,
            v.reachable and v.order() >= target,
        )
        for v in views.values()
    ]
    if not reachable:
        state = "MasterUnavailable"
    elif all(r.up_to_date for r in replicas if r.reachable) and all(r.reachable for r in replicas):
        state = "UpToDate"
    else:
        state = "Behind"
    standby = topology.backup_of(active)
    return CmsStatus(
        active,
        reachable,
        standby.fqdn if standby else None,
        master.version if master and master.reachable else None,
        master.generation if master and master.reachable else None,
        state,
        replicas,
    )


# --- Invoke-CsManagementServerFailover -------------------------------------------------


@dataclass(frozen=True)
class CmsFailoverReport:
    source: str
    target: str
    forced: bool
    source_reachable: bool
    generation: int
    version: int
    #: Configuration versions the old master had that the new one lacks;
    #: None when the old master could not be asked (forced, unreachable).
    lost_versions: int | None
    seconds: float
    replicated: dict[str, str]
    steps: list[tuple[str, float]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


async def cms_failover(
    topology: Topology,
    force: bool,
    clients: CmsPeers,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> CmsFailoverReport:
    """Move the active master to its standby (the partner pool).

    Without ``force``: the master must answer; it is made read-only, its
    document is replicated to the standby and checked there, then the roles
    swap. With ``force``: the standby takes over even when the master is
    unreachable (changes the master took after its last replication are
    lost); if the master answers, it is still replicated first.
    Refusals change nothing.
    """
    t0 = clock()
    steps: list[tuple[str, float]] = []

    def step(name: str, since: float) -> float:
        now = clock()
        steps.append((name, round(now - since, 6)))
        return now

    views = await cms_views(topology, clients)
    source = active_master_of(topology, views)
    partner = topology.backup_of(source)
    if partner is None:
        raise OperationError(
            "no-cms-standby",
            f"the CMS master's pool {source} has no backup pool, so there is no standby",
            409,
        )
    target = partner.fqdn
    sv, tv = views.get(source), views.get(target)
    if tv is None or not tv.reachable:
        raise OperationError(
            "cms-standby-unreachable",
            f"the CMS standby on {target} is unreachable: there is nowhere to fail over to",
            503,
        )
    source_ok = bool(sv and sv.reachable)
    if not source_ok and not force:
        raise OperationError(
            "cms-unavailable",
            f"the active CMS master on {source} is unreachable; only a forced failover "
            "(--force) can move it, and changes it took after its last replication are lost",
            503,
        )
    t = step("checks", t0)
    src, dst = clients.pool(source), clients.pool(target)
    lost: int | None = None
    if source_ok:
        assert sv is not None
        try:
            await src.cms_role(role=CmsRole.ACTIVE.value, active_master=source, read_only=True)
            doc = (await src.cms())["document"]
            await dst.cms_replicate(doc)
            now_t = await _view(dst)
            if now_t.order() < (int(doc["generation"]), int(doc["version"])):
                raise OperationError(
                    "cms-replication-failed",
                    f"the standby {target} is at version {now_t.version} after replication, "
                    f"the master at {doc['version']}",
                    503,
                )
            lost = 0
        except (OperationError, OSError):
            if not force:
                # Give the master its writes back: nothing changed.
                with contextlib.suppress(OperationError, OSError):
                    await src.cms_role(
                        role=CmsRole.ACTIVE.value, active_master=source, read_only=False
                    )
                raise
            source_ok = False
        t = step("source read-only and replicated", t)
    generations = [v.generation or 1 for v in views.values() if v.reachable]
    generation = max(generations, default=1) + 1
    promoted = await dst.cms_role(
        role=CmsRole.ACTIVE.value, active_master=target, read_only=False, generation=generation
    )
    t = step("standby promoted", t)
    if source_ok:
        try:
            await src.cms_role(
                role=CmsRole.STANDBY.value, active_master=target, read_only=False,
                generation=generation,
            )
        except (OperationError, OSError):
            source_ok = False
        t = step("old master demoted", t)
    replicated = await replicate_cms(topology, clients, target)
    step("replicas updated", t)
    return CmsFailoverReport(
        source=source,
        target=target,
        forced=force,
        source_reachable=source_ok,
        generation=generation,
        version=int(promoted.get("version", 0)),
        lost_versions=lost,
        seconds=round(clock() - t0, 6),
        replicated=replicated,
        steps=steps,
    )
