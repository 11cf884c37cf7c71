"""The Central Management Store (CMS): the lab's configuration, one active
master, its standby on the partner pool, and a read-only replica in every
other pool.

The configuration is one versioned document: topology timers (overrides of
the topology file's), user homing (users whose home pool differs from the
topology's, after Move-CsUser), and the record of pool failovers (which pool
serves whose users, and from which replicated position it took them over).

- Every pool holds a replica (:class:`CmsStore`, a JSON file written
  atomically) and serves it through :func:`cms_router`, which the pool
  process mounts: ``GET /cms``, ``PUT /cms/config`` (active master only),
  ``POST /cms/replicate`` (a newer document from the master), ``POST
  /cms/role`` (CMS failover).
- Changes go through the active master (:func:`cms_update`), which is then
  replicated to the standby and every replica; the Backup Service of the
  master's pool repeats the push every cycle (:func:`replicate_cms`), so a
  pool that was down catches up. While the master is unreachable, service
  goes on from the replicas, but every change fails with ``cms-unavailable``
  (HTTP 503).
- :func:`cms_failover` is Invoke-CsManagementServerFailover and
  :func:`cms_status` Get-CsManagementStoreReplicationStatus.

Split brain after a forced failover is fenced by a generation number: each
failover starts a new generation, a replica refuses documents of an older
generation, and an old master that receives a newer generation steps down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from sipdrill.control.files import write_atomically
from sipdrill.errors import OperationError
from sipdrill.services.backup_client import LabClients, PoolClient
from sipdrill.topology import Timers, Topology

CMS_FILE = "cms.json"
PROBE_TIMEOUT = 3.0


class CmsRole(StrEnum):
    ACTIVE = "active"
    STANDBY = "standby"
    REPLICA = "replica"


# --- the document ----------------------------------------------------------------


class PoolFailoverRecord(BaseModel):
    """Who serves a home pool's users, as pool failover / failback recorded it."""

    backup_pool: str
    state: str = Field(description="A FailoverState value: FailedOver, FailedBack ...")
    disaster_mode: bool = False
    #: The backup's last applied position of the home pool's feed when it
    #: took the users over: every home change above it is the RPO loss.
    takeover_position: int | None = None
    #: The home pool's high-water mark at takeover, when it was reachable.
    home_high_water_mark: int | None = None
    failed_over_at: float | None = None
    failback_disaster_mode: bool = False
    #: The home's last applied position of the backup's feed when it took
    #: its users back.
    failback_position: int | None = None
    failed_back_at: float | None = None


class CmsConfig(BaseModel):
    timers: dict[str, float] = {}
    user_homing: dict[str, str] = {}
    pool_failover: dict[str, PoolFailoverRecord] = {}


class CmsDocument(BaseModel):
    version: int = 0
    generation: int = 1
    active_master: str
    config: CmsConfig = CmsConfig()
    updated_at: float = 0.0

    def order(self) -> tuple[int, int]:
        return (self.generation, self.version)


class CmsConfigPatch(BaseModel):
    """``PUT /cms/config``: merged into the current configuration; a ``None``
    value removes an entry."""

    timers: dict[str, float | None] | None = None
    user_homing: dict[str, str | None] | None = None
    pool_failover: dict[str, PoolFailoverRecord | None] | None = None
    expected_version: int | None = Field(
        default=None, description="Refuse (409) unless the master is at this version."
    )


class CmsReplicateIn(BaseModel):
    document: CmsDocument


class CmsRoleIn(BaseModel):
    role: CmsRole
    active_master: str | None = None
    read_only: bool = False
    generation: int | None = None


class CmsState(BaseModel):
    """One pool's CMS replica, as ``GET /cms`` shows it."""

    pool: str
    role: CmsRole
    read_only: bool = False
    document: CmsDocument
    last_replicated_at: float | None = None


def _initial_role(topology: Topology, pool: str) -> CmsRole:
    if pool == topology.cms.active:
        return CmsRole.ACTIVE
    if pool == topology.cms_standby:
        return CmsRole.STANDBY
    return CmsRole.REPLICA


class CmsStore:
    """One pool's CMS replica in ``store_dir/cms.json``. Thread-safe; every
    change is written atomically before it is acknowledged."""

    def __init__(
        self,
        store_dir: Path,
        pool_fqdn: str,
        topology: Topology,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pool = pool_fqdn.lower()
        self.topology = topology
        self.path = Path(store_dir) / CMS_FILE
        self.clock = clock
        self._lock = threading.Lock()
        try:
            self._state = CmsState.model_validate_json(self.path.read_text())
        except FileNotFoundError:
            self._state = CmsState(
                pool=self.pool,
                role=_initial_role(topology, self.pool),
                document=CmsDocument(active_master=topology.cms.active),
            )
            self._save()
        except (OSError, ValidationError, ValueError) as exc:
            raise OperationError(
                "cms-store", f"{self.path}: cannot read the CMS replica ({exc})", 503
            ) from None
        if self._state.pool != self.pool:
            raise OperationError(
                "wrong-pool", f"{self.path} is the CMS replica of {self._state.pool}", 409
            )

    def _save(self) -> None:
        data = json.dumps(json.loads(self._state.model_dump_json()), sort_keys=True).encode()
        write_atomically(self.path, data, make_parents=True)

    def state(self) -> CmsState:
        with self._lock:
            return self._state.model_copy(deep=True)

    def effective_timers(self) -> Timers:
        """The topology's timers with the CMS's overrides."""
        with self._lock:
            overrides = dict(self._state.document.config.timers)
        return Timers.model_validate({**self.topology.timers.model_dump(), **overrides})

    def put_config(self, patch: CmsConfigPatch) -> CmsState:
        with self._lock:
            st = self._state
            if st.role is not CmsRole.ACTIVE:
                raise OperationError(
                    "cms-not-active",
                    f"the CMS on {self.pool} is the {st.role.value}; changes go to the active "
                    f"master {st.document.active_master}",
                    409,
                )
            if st.read_only:
                raise OperationError(
                    "cms-unavailable",
                    f"the CMS master on {self.pool} is read-only (a CMS failover is under way)",
                    503,
                )
            doc = st.document
            if patch.expected_version is not None and patch.expected_version != doc.version:
                raise OperationError(
                    "cms-version-conflict",
                    f"the CMS is at version {doc.version}, not {patch.expected_version}",
                    409,
                )
            config = doc.config.model_copy(deep=True)
            if patch.timers is not None:
                timers = dict(config.timers)
                for k, v in patch.timers.items():
                    if v is None:
                        timers.pop(k, None)
                    else:
                        timers[k] = v
                try:
                    Timers.model_validate({**self.topology.timers.model_dump(), **timers})
                except ValidationError as exc:
                    raise OperationError("bad-config", f"invalid timers: {exc}", 422) from None
                config.timers = timers
            if patch.user_homing is not None:
                homing = dict(config.user_homing)
                pools = {p.fqdn for p in self.topology.pools}
                for uri, pool in patch.user_homing.items():
                    if pool is None:
                        homing.pop(uri, None)
                    elif pool.lower() not in pools:
                        raise OperationError("unknown-pool", f"{pool} is not a pool", 404)
                    else:
                        homing[uri] = pool.lower()
                config.user_homing = homing
            if patch.pool_failover is not None:
                records = dict(config.pool_failover)
                for pool, record in patch.pool_failover.items():
                    if record is None:
                        records.pop(pool.lower(), None)
                    else:
                        records[pool.lower()] = record
                config.pool_failover = records
            self._state.document = CmsDocument(
                version=doc.version + 1,
                generation=doc.generation,
                active_master=doc.active_master,
                config=config,
                updated_at=self.clock(),
            )
            self._save()
            return self._state.model_copy(deep=True)

    def replicate(self, document: CmsDocument) -> tuple[bool, CmsState]:
        """Take a newer document from the master; (applied, state)."""
        with self._lock:
            st = self._state
            mine = st.document
            if document.generation < mine.generation:
                raise OperationError(
                    "cms-stale-generation",
                    f"{self.pool} is at CMS generation {mine.generation} (master "
                    f"{mine.active_master}); refusing generation {document.generation} from "
                    f"{document.active_master}",
                    409,
                )
            if (
                document.generation == mine.generation
                and document.active_master != mine.active_master
                and st.role is CmsRole.ACTIVE
            ):
                raise OperationError(
                    "cms-conflict",
                    f"{self.pool} is the master of generation {mine.generation}; "
                    f"{document.active_master} claims it too",
                    409,
                )
            if document.order() <= mine.order():
                return False, st.model_copy(deep=True)
            if st.role is CmsRole.ACTIVE and document.active_master != self.pool:
                # A newer generation has another master: step down.
                partner = self.topology.backup_of(document.active_master)
                st.role = (
                    CmsRole.STANDBY
                    if partner is not None and partner.fqdn == self.pool
                    else CmsRole.REPLICA
                )
                st.read_only = False
            st.document = document
            st.last_replicated_at = self.clock()
            self._save()
            return True, st.model_copy(deep=True)

    def set_role(self, body: CmsRoleIn) -> CmsState:
        with self._lock:
            st = self._state
            doc = st.document
            generation = doc.generation if body.generation is None else body.generation
            if generation < doc.generation:
                raise OperationError(
                    "cms-stale-generation",
                    f"{self.pool} is at CMS generation {doc.generation}, not {generation}",
                    409,
                )
            st.role = body.role
            st.read_only = body.read_only
            st.document = doc.model_copy(
                update={
                    "generation": generation,
                    "active_master": (body.active_master or doc.active_master).lower(),
                }
            )
            self._save()
            return st.model_copy(deep=True)


def cms_view(state: CmsState) -> dict[str, Any]:
    """The JSON of ``GET /cms``."""
    doc = state.document
    return {
        "pool": state.pool,
        "role": state.role.value,
        "read_only": state.read_only,
        "ActiveMasterFqdn": doc.active_master,
        "active_master": doc.active_master,
        "version": doc.version,
        "generation": doc.generation,
        "config": json.loads(doc.config.model_dump_json()),
        "document": json.loads(doc.model_dump_json()),
        "replication": {
            "state": "Master" if state.role is CmsRole.ACTIVE else "Replica",
            "last_replicated_at": state.last_replicated_at,
        },
    }


def _refusal(exc: OperationError) -> JSONResponse:
    return JSONResponse({"code": exc.code, "message": exc.message}, status_code=exc.http_status)


def cms_router(
    store_dir: Path,
    pool_fqdn: str,
    topology: Topology,
    *,
    store: CmsStore | None = None,
    clock: Callable[[], float] = time.time,
) -> APIRouter:
    """The pool's CMS replica as routes; the pool process includes the router
    (with its bearer-token dependency). ``router.cms_store`` is the store,
    for the pool's own reads (timers, user homing)."""
    cms = store or CmsStore(store_dir, pool_fqdn, topology, clock=clock)
    router = APIRouter(tags=["cms"])

    @router.get("/cms")
    async def get_cms() -> dict[str, Any]:
        return cms_view(cms.state())

    @router.put("/cms/config", response_model=None)
    async def put_config(body: CmsConfigPatch) -> dict[str, Any] | JSONResponse:
        try:
            return cms_view(cms.put_config(body))
        except OperationError as exc:
            return _refusal(exc)

    @router.post("/cms/replicate", response_model=None)
    async def replicate(body: CmsReplicateIn) -> dict[str, Any] | JSONResponse:
        try:
            applied, state = cms.replicate(body.document)
        except OperationError as exc:
            return _refusal(exc)
        return {"applied": applied, **cms_view(state)}

    @router.post("/cms/role", response_model=None)
    async def set_role(body: CmsRoleIn) -> dict[str, Any] | JSONResponse:
        try:
            return cms_view(cms.set_role(body))
        except OperationError as exc:
            return _refusal(exc)

    router.cms_store = cms  # type: ignore[attr-defined]
    return router


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


async def _view(client: PoolClient) -> CmsPoolView:
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


async def cms_views(topology: Topology, clients: LabClients) -> dict[str, CmsPoolView]:
    views = await asyncio.gather(*(_view(clients.pool(p.fqdn)) for p in topology.pools))
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


async def require_cms(topology: Topology, clients: LabClients) -> CmsPoolView:
    """The active master's view; ``cms-unavailable`` if it cannot take changes."""
    views = await cms_views(topology, clients)
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
    topology: Topology, clients: LabClients, source_pool: str
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
    topology: Topology, clients: LabClients, patch: CmsConfigPatch
) -> dict[str, Any]:
    """Change the configuration through the active master, then replicate it
    to the standby and every replica (best effort: the Backup Service of the
    master's pool retries). Raises ``cms-unavailable`` when the master cannot
    take the change; nothing is changed then."""
    view = await require_cms(topology, clients)
    assert view.active_master is not None
    master = clients.pool(view.pool)
    body = patch.model_dump(mode="json", exclude_none=True)
    try:
        new = await master.cms_put_config(body)
    except OSError as exc:
        raise _unavailable(view.pool, f"unreachable ({exc})") from None
    replicated = await replicate_cms(topology, clients, view.pool)
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


async def cms_status(topology: Topology, clients: LabClients) -> CmsStatus:
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
    clients: LabClients,
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
