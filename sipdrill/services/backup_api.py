"""The Backup Service's control API (FastAPI) and its process.

======  ========  ==============================================================
GET     /health   ``{"status": "ok", "pool": fqdn}``
GET     /metrics  Prometheus text
GET     /status   both directions: export / import state, last sync, backlog, lag
POST    /sync     sync now (Invoke-CsBackupServiceSync); ``{"final": true}`` is
                  the last sync of a pool failover (the pool must be read-only)
======  ========  ==============================================================

Everything but ``/health`` and ``/metrics`` needs ``Authorization: Bearer
<token>`` when a token is set. Refusals are ``{"code", "message"}`` with the
OperationError's HTTP status.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures.

import asyncio
import contextlib
import logging
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from sipdrill.errors import OperationError
from sipdrill.services.backup import DEFAULT_PAGE_SIZE, BackupService
from sipdrill.services.backup_client import LabClients
from sipdrill.topology import Topology

log = logging.getLogger(__name__)


class SyncIn(BaseModel):
    final: bool = False


def create_backup_app(service: BackupService, token: str | None = None) -> FastAPI:
    app = FastAPI(title=f"sipdrill Backup Service ({service.pool})", version="1")
    bearer = HTTPBearer(auto_error=False)

    async def authorised(
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        if token is None:
            return
        if creds is None or not secrets.compare_digest(creds.credentials.encode(), token.encode()):
            raise HTTPException(
                401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"}
            )

    auth = [Depends(authorised)]

    @app.exception_handler(OperationError)
    async def refused(request: Request, exc: OperationError) -> JSONResponse:
        return JSONResponse({"code": exc.code, "message": exc.message}, status_code=exc.http_status)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "pool": service.pool, "partner": service.partner}

    @app.get("/metrics")
    async def metrics() -> Response:
        service.metrics.update(service.direction.status())
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/status", dependencies=auth)
    async def status() -> dict[str, Any]:
        return await service.status()

    @app.post("/sync", dependencies=auth)
    async def sync(body: SyncIn | None = None) -> dict[str, Any]:
        result = await service.sync(final=bool(body and body.final))
        return result.to_json()

    return app


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: the owner of the loop decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


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
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OperationError(
                "cannot-listen", f"cannot listen on {host}:{port}: {exc.strerror}", 503
            ) from None
        bound = sock.getsockname()
        server = _Uvicorn(
            uvicorn.Config(
                app, lifespan="off", log_config=None, log_level="warning", access_log=False
            )
        )
        serve = asyncio.create_task(server.serve(sockets=[sock]))
        loop_task = asyncio.create_task(service.run(stop))
        try:
            while not server.started:
                if serve.done():
                    serve.result()
                    raise OperationError("cannot-listen", "the control API did not start", 503)
                await asyncio.sleep(0.01)
            if ready is not None:
                ready(f"http://{bound[0]}:{bound[1]}", service)
            await stop.wait()
        finally:
            stop.set()
            server.should_exit = True
            # A cycle cut mid-apply is safe: the partner commits a batch and
            # its position together, or neither.
            loop_task.cancel()
            await asyncio.gather(serve, loop_task, return_exceptions=True)
            sock.close()
