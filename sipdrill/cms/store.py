"""The Central Management Store (CMS) as each pool holds it: the versioned
configuration document, a pool's replica of it (:class:`CmsStore`, a JSON
file written atomically) and its routes (:func:`cms_router`, mounted by the
pool process): ``GET /cms``, ``PUT /cms/config`` (active master only),
``POST /cms/replicate`` (a newer document from the master), ``POST
/cms/role`` (CMS failover).

The configuration is one versioned document: topology timers (overrides of
the topology file's), user homing (users whose home pool differs from the
topology's, after Move-CsUser), and the record of pool failovers (which pool
serves whose users, and from which replicated position it took them over).

Split brain after a forced failover is fenced by a generation number: each
failover starts a new generation, a replica refuses documents of an older
generation, and an old master that receives a newer generation steps down.
How the lab changes, replicates and fails over the CMS over HTTP is
:mod:`sipdrill.cms.operations`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field, ValidationError

from sipdrill.control.app import RequestModel, describe_validation, errors
from sipdrill.control.files import write_atomically
from sipdrill.errors import OperationError
from sipdrill.topology import Timers, Topology

CMS_FILE = "cms.json"


class CmsRole(StrEnum):
    ACTIVE = "active"
    STANDBY = "standby"
    REPLICA = "replica"


# --- the document ----------------------------------------------------------------


#: The values of sipdrill.pool.state.FailoverState (the CMS is below the pool).
FailoverStateName = Literal["Active", "FailingOver", "FailedOver", "FailingBack", "FailedBack"]


class PoolFailoverRecord(RequestModel):
    """Who serves a home pool's users, as pool failover / failback recorded it."""

    backup_pool: str
    state: FailoverStateName
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


class CmsConfig(RequestModel):
    timers: dict[str, float] = Field(default_factory=dict)
    user_homing: dict[str, str] = Field(default_factory=dict)
    pool_failover: dict[str, PoolFailoverRecord] = Field(default_factory=dict)


class CmsDocument(RequestModel):
    version: int = 0
    generation: int = 1
    active_master: str
    config: CmsConfig = CmsConfig()
    updated_at: float = 0.0

    def order(self) -> tuple[int, int]:
        return (self.generation, self.version)


class CmsConfigPatch(RequestModel):
    """``PUT /cms/config``: merged into the current configuration; a ``None``
    value removes an entry."""

    timers: dict[str, float | None] | None = None
    user_homing: dict[str, str | None] | None = None
    pool_failover: dict[str, PoolFailoverRecord | None] | None = None
    expected_version: int | None = Field(
        default=None, description="Refuse (409) unless the master is at this version."
    )


class CmsReplicateIn(RequestModel):
    document: CmsDocument


class CmsRoleIn(RequestModel):
    role: CmsRole = Field(strict=False)
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

    def _check_pool(self, where: str, fqdn: str) -> None:
        """Refuse (404) a name that is not a pool of the topology: a document
        naming one would send users, or the CMS master role, nowhere. The
        message names the field, never the value."""
        pools = sorted(p.fqdn for p in self.topology.pools)
        if fqdn.lower() not in pools:
            raise OperationError(
                "unknown-pool", f"{where}: not a pool of this lab (pools: {', '.join(pools)})", 404
            )

    def _check_document(self, doc: CmsDocument) -> None:
        """A replicated document is one this store could have written itself."""
        self._check_pool("document.active_master", doc.active_master)
        config = doc.config
        for pool in config.user_homing.values():
            self._check_pool("document.config.user_homing[<key>]", pool)
        for home, record in config.pool_failover.items():
            self._check_pool("document.config.pool_failover", home)
            self._check_pool("document.config.pool_failover[<key>].backup_pool",
                             record.backup_pool)
        try:
            Timers.model_validate({**self.topology.timers.model_dump(), **config.timers})
        except ValidationError as exc:
            raise OperationError(
                "bad-config",
                describe_validation(
                    exc.errors(), Timers.model_fields, prefix="document.config.timers"
                ),
                422,
            ) from None

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
                    raise OperationError(
                        "bad-config",
                        describe_validation(exc.errors(), Timers.model_fields, prefix="timers"),
                        422,
                    ) from None
                config.timers = timers
            if patch.user_homing is not None:
                homing = dict(config.user_homing)
                for uri, pool in patch.user_homing.items():
                    if pool is None:
                        homing.pop(uri, None)
                    else:
                        self._check_pool("user_homing[<key>]", pool)
                        homing[uri] = pool.lower()
                config.user_homing = homing
            if patch.pool_failover is not None:
                for home, record in patch.pool_failover.items():
                    self._check_pool("pool_failover", home)
                    if record is not None:
                        self._check_pool("pool_failover[<key>].backup_pool", record.backup_pool)
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
        self._check_document(document)
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
        if body.active_master is not None:
            self._check_pool("active_master", body.active_master)
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


def cms_router(
    store_dir: Path,
    pool_fqdn: str,
    topology: Topology,
    *,
    store: CmsStore | None = None,
    clock: Callable[[], float] = time.time,
) -> APIRouter:
    """The pool's CMS replica as routes; the pool process includes the router
    (with its bearer-token dependency; its app answers the refusals the
    store raises). ``router.cms_store`` is the store,
    for the pool's own reads (timers, user homing)."""
    cms = store or CmsStore(store_dir, pool_fqdn, topology, clock=clock)
    router = APIRouter(tags=["cms"])

    @router.get("/cms")
    async def get_cms() -> dict[str, Any]:
        return cms_view(cms.state())

    @router.put("/cms/config", responses=errors(404, 409, 422, 503))
    async def put_config(body: CmsConfigPatch) -> dict[str, Any]:
        return cms_view(cms.put_config(body))

    @router.post("/cms/replicate", responses=errors(404, 409, 422))
    async def replicate(body: CmsReplicateIn) -> dict[str, Any]:
        applied, state = cms.replicate(body.document)
        return {"applied": applied, **cms_view(state)}

    @router.post("/cms/role", responses=errors(404, 409))
    async def set_role(body: CmsRoleIn) -> dict[str, Any]:
        return cms_view(cms.set_role(body))

    router.cms_store = cms  # type: ignore[attr-defined]
    return router
