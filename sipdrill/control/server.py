"""Serving a control API (any ASGI app) with uvicorn inside the owner's event loop.

The owner binds the socket (so it knows the port before anything answers, and
reports a busy address its own way), starts the server, and stops it when it
decides: uvicorn's own signal handlers stay off.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from sipdrill.control.limits import MAX_BODY, BodyLimit


class QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers: the owner of the loop decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind_tcp(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (IPv6 if ``host`` has a colon),
    with SO_REUSEADDR; raises the OSError of a failed bind (the socket closed)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class AppServer:
    """``app`` served on a bound socket by uvicorn, as a task of the running loop,
    with request bodies limited to ``max_body`` bytes (413 beyond)."""

    def __init__(self, app: Any, sock: socket.socket, max_body: int = MAX_BODY) -> None:
        self.sock = sock
        self.server = QuietServer(
            uvicorn.Config(
                BodyLimit(app, max_body),
                lifespan="off",
                log_config=None,
                log_level="warning",
                access_log=False,
            )
        )
        self.task: asyncio.Task[None] | None = None

    async def start(self, failed: Callable[[], Exception]) -> None:
        """Serve, and return once uvicorn listens. A server that stops before
        that raises its own exception, else ``failed()``."""
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self.task.done():
                self.task.result()
                raise failed()
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop serving (requests in flight finish) and close the socket."""
        if self.task is not None:
            self.server.should_exit = True
            with contextlib.suppress(Exception):
                await self.task
            self.task = None
        self.sock.close()
