"""The Backup Service's control API (FastAPI) and its process.

======  ========  ==============================================================
GET     /health   ``{"status": "ok", "pool": fqdn}``
GET     /metrics  Prometheus text
GET     /status   both directions: export / import state, last sync, backlog, lag
POST    /sync     sync now (Invoke-CsBackupServiceSync); ``{"final": true}`` is
                  the last sync of a pool failover (the pool must be read-only)
======  ========  ==============================================================

Everything but ``/health`` and ``/metrics`` needs ``Authorization: Bearer
<token>`` when a token is set. Errors are ``{"code", "message"}``
(:class:`~sipdrill.control.app.ControlApp`), refusals with the
OperationError's HTTP status.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures.

import asyncio
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sipdrill.backup.client import LabClients
from sipdrill.backup.service import DEFAULT_PAGE_SIZE, BackupService
from sipdrill.control.app import ControlApp, RequestModel, errors
from sipdrill.control.auth import bearer_auth
from sipdrill.control.server import AppServer, bind_tcp
from sipdrill.errors import OperationError
from sipdrill.topology import Topology

log = logging.getLogger(__name__)


class SyncIn(RequestModel):
    final: bool = False


def create_backup_app(service: BackupService, token: str | None = None) -> FastAPI:
    app = ControlApp(f"sipdrill Backup Service ({service.pool})", token)
    auth = [bearer_auth(token)]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "pool": service.pool, "partner": service.partner}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        service.metrics.update(service.direction.status())
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/status", dependencies=auth)
    async def status() -> dict[str, Any]:
        return await service.status()

    @app.post("/sync", dependencies=auth, responses=errors(409, 503))
    async def sync(body: SyncIn | None = None) -> dict[str, Any]:
        result = await service.sync(final=bool(body and body.final))
        return result.to_json()

    return app


async def run_backup_process(
    topology: Topology,
    pool: str,
    state_dir: Path,
    *,
    listen: tuple[str, int],
    token: str | None,
    loopback: bool,
    pool_urls: dict[str, str] | None = None,
    stop: asyncio.Event,
    ready: Any = None,
    page_size: int = DEFAULT_PAGE_SIZE,
) -> None:
    """The Backup Service process: control API on ``listen``, the sync loop,
    until ``stop`` is set. ``ready(url)`` is called once it listens."""
    async with LabClients(topology, token=token, loopback=loopback, pool_urls=pool_urls) as clients:
        service = BackupService(topology, pool, state_dir, clients, page_size=page_size)
        app = create_backup_app(service, token)
        host, port = listen
        try:
            sock = bind_tcp(host, port)
        except OSError as exc:
            raise OperationError(
                "cannot-listen", f"cannot listen on {host}:{port}: {exc.strerror}", 503
            ) from None
        bound = sock.getsockname()
        server = AppServer(app, sock)
        loop_task = asyncio.create_task(service.run(stop))
        try:
            await server.start(
                lambda: OperationError("cannot-listen", "the control API did not start", 503)
            )
            if ready is not None:
                ready(f"http://{bound[0]}:{bound[1]}", service)
            await stop.wait()
        finally:
            stop.set()
            # A cycle cut mid-apply is safe: the partner commits a batch and
            # its position together, or neither.
            loop_task.cancel()
            await asyncio.gather(server.stop(), loop_task, return_exceptions=True)
