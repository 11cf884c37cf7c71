"""A stand-in for the pool process's control API, over a real UserStore:
the ``/replication/*``, ``/failover/state``, ``/users/*`` and ``/cms*`` routes
of docs/control-api.md, and nothing else (no SIP).

Unit tests reach it through ``httpx.ASGITransport`` (wrapped in a
:class:`CuttableTransport`, so a test can make a pool unreachable); tests
that need real sockets (a Backup Service in a child process) serve it with
uvicorn on 127.0.0.1 (:func:`serve`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from sipdrill.addresses import backup_control_url, pool_control_url
from sipdrill.backup.api import create_backup_app
from sipdrill.backup.client import LabClients
from sipdrill.backup.service import BackupService
from sipdrill.cms.store import cms_router
from sipdrill.control.server import AppServer, bind_tcp
from sipdrill.errors import OperationError
from sipdrill.pool.replication import change_json
from sipdrill.pool.state import FailoverEvent, PoolFailoverStates
from sipdrill.pool.store import Change, ChangeOp, Entity, UserStore
from sipdrill.topology import Topology


class ChangeIn(BaseModel):
    seq: int
    op: ChangeOp
    entity: Entity
    key: str
    payload: dict[str, Any]
    origin_pool: str
    timestamp: float


class ApplyIn(BaseModel):
    source_pool: str
    changes: list[ChangeIn]


class ReadOnlyIn(BaseModel):
    read_only: bool


class FailoverIn(BaseModel):
    home_pool: str
    event: str
    disaster_mode: bool = False


class ContactIn(BaseModel):
    contact: str


@dataclass
class FakePool:
    """One fake pool: ``app`` over ``store``; ``applied`` counts every change
    the store really applied (a duplicate would be counted twice)."""

    topology: Topology
    store: UserStore
    cms_dir: Path
    states: PoolFailoverStates = field(init=False)
    applied: dict[str, int] = field(default_factory=dict)
    apply_calls: int = 0

    def __post_init__(self) -> None:
        self.fqdn = self.store.pool_fqdn
        self.states = PoolFailoverStates.from_topology(self.topology)
        self.cms_dir.mkdir(parents=True, exist_ok=True)
        self.router = cms_router(self.cms_dir, self.fqdn, self.topology)
        self.app = self._build()

    def _build(self) -> FastAPI:
        app = FastAPI()
        pool = self

        @app.exception_handler(OperationError)
        async def refused(request: Request, exc: OperationError) -> JSONResponse:
            return JSONResponse(
                {"code": exc.code, "message": exc.message}, status_code=exc.http_status
            )

        @app.get("/health")
        async def health() -> dict[str, Any]:
            return {"status": "ok", "pool": pool.fqdn}

        @app.get("/replication/changes")
        async def changes(since: int = 0, limit: int = 1000) -> dict[str, Any]:
            s = pool.store
            return {
                "pool": pool.fqdn,
                "high_water_mark": s.high_water_mark(),
                "read_only": s.read_only,
                "changes": [change_json(c) for c in s.changes_since(since, limit)],
            }

        @app.post("/replication/apply")
        async def apply(body: ApplyIn) -> dict[str, Any]:
            pool.apply_calls += 1
            changes = [
                Change(c.seq, c.op, c.entity, c.key, c.payload, c.origin_pool, c.timestamp)
                for c in body.changes
            ]
            n = pool.store.apply_changes(changes, body.source_pool)
            src = body.source_pool.lower()
            pool.applied[src] = pool.applied.get(src, 0) + n
            return {"applied": n, "last_applied": pool.store.last_applied(src)}

        @app.get("/replication/positions")
        async def positions() -> dict[str, int]:
            return pool.store.replication_positions()

        @app.put("/replication/read-only")
        async def read_only(body: ReadOnlyIn) -> dict[str, Any]:
            pool.store.set_read_only(body.read_only)
            return {"read_only": pool.store.read_only}

        @app.get("/failover/state")
        async def failover_state() -> dict[str, Any]:
            return {
                "pool": pool.fqdn,
                "states": {p: s.value for p, s in pool.states.snapshot().items()},
            }

        @app.post("/failover/state")
        async def failover_event(body: FailoverIn) -> dict[str, Any]:
            event = FailoverEvent(body.event.replace("_", "-"))
            home = body.home_pool.lower()
            new = pool.states.handle(home, event)
            backup = pool.states.backup_of(home)
            if event is FailoverEvent.FAILOVER_COMPLETED and pool.fqdn == backup:
                pool.store.reassign_serving_pool(home, backup)
            if event is FailoverEvent.FAILBACK_COMPLETED and pool.fqdn == home:
                pool.store.reassign_serving_pool(home, home)
            return {"home_pool": home, "state": new.value}

        @app.post("/users/{uri}/contacts")
        async def add_contact(uri: str, body: ContactIn) -> dict[str, int]:
            return {"seq": pool.store.add_contact(uri, body.contact)}

        @app.get("/users/{uri}")
        async def user(uri: str) -> dict[str, Any]:
            rec = pool.store.get_user(uri)
            if rec is None:
                raise OperationError("unknown-user", f"{uri} has no account here", 404)
            return {
                "uri": rec.uri,
                "home_pool": rec.home_pool,
                "serving_pool": rec.serving_pool,
                "contacts": pool.store.contacts(uri),
            }

        app.include_router(self.router)
        return app


class CuttableTransport(httpx.AsyncBaseTransport):
    """An ASGI transport a test can cut: while ``down``, every request fails
    as a dropped connection does. ``on_request`` runs before each request
    (tests advance a fake clock with it). ``app`` may be set after creation."""

    def __init__(self, app: FastAPI | None = None) -> None:
        self.app = app
        self.down = False
        self.requests = 0
        self.on_request: Callable[[httpx.Request], None] | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.down or self.app is None:
            raise httpx.ConnectError("cut by the test", request=request)
        self.requests += 1
        if self.on_request is not None:
            self.on_request(request)
        return await httpx.ASGITransport(app=self.app).handle_async_request(request)


@contextlib.asynccontextmanager
async def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn in this event loop; yields its base URL."""
    sock = bind_tcp(host, port)
    port = sock.getsockname()[1]
    server = AppServer(app, sock)
    try:
        await server.start(lambda: RuntimeError("uvicorn did not start"))
        yield f"http://{host}:{port}"
    finally:
        await server.stop()


class FakeLab:
    """Every pool of ``topology`` as a :class:`FakePool` and a Backup Service
    per paired pool (in process, behind its own API), all reached over ASGI
    through :attr:`clients`: no socket, no network."""

    def __init__(
        self, topology: Topology, root: Path, clock: Callable[[], float], *, page_size: int = 1000
    ) -> None:
        self.topology = topology
        self.root = root
        self.clock = clock
        self.pools: dict[str, FakePool] = {}
        self.transports: dict[str, CuttableTransport] = {}
        self.pool_transport: dict[str, CuttableTransport] = {}
        self.backup_transport: dict[str, CuttableTransport] = {}
        for p in topology.pools:
            store = UserStore(root / f"{p.fqdn}.db", p.fqdn, clock=clock)
            fake = FakePool(topology, store, root / f"cms-{p.fqdn}")
            self.pools[p.fqdn] = fake
            t = CuttableTransport(fake.app)
            self.transports[pool_control_url(topology, p.fqdn)] = t
            self.pool_transport[p.fqdn] = t
            if p.backup:
                bt = CuttableTransport()
                self.transports[backup_control_url(topology, p.fqdn)] = bt
                self.backup_transport[p.fqdn] = bt
        self.clients = LabClients(topology, transports=self.transports)
        self.backups: dict[str, BackupService] = {}
        for fqdn in self.backup_transport:
            self.start_backup(fqdn, page_size=page_size)

    def start_backup(self, fqdn: str, *, page_size: int = 1000) -> BackupService:
        """(Re)start the pool's Backup Service from its state directory."""
        service = BackupService(
            self.topology,
            fqdn,
            self.root / f"backup-{fqdn}",
            self.clients,
            clock=self.clock,
            page_size=page_size,
        )
        self.backups[fqdn] = service
        self.backup_transport[fqdn].app = create_backup_app(service)
        return service

    def store(self, fqdn: str) -> UserStore:
        return self.pools[fqdn].store

    def cut(self, fqdn: str, down: bool = True) -> None:
        """Make a pool and its Backup Service unreachable (a site loss)."""
        self.pool_transport[fqdn].down = down
        if fqdn in self.backup_transport:
            self.backup_transport[fqdn].down = down

    def heal(self, fqdn: str) -> None:
        self.cut(fqdn, False)

    async def aclose(self) -> None:
        await self.clients.aclose()
        for pool in self.pools.values():
            pool.store.close()
