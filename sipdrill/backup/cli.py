"""``sipdrill serve backup``: one pool's Backup Service in the foreground.

The orchestrator's plan starts it as ``sipdrill serve backup --topology FILE
[--loopback] --pool FQDN --state-dir DIR`` with ``SIPDRILL_CONTROL_TOKEN`` set;
it listens at the address plan's place for it (the pool's first front end +
100, port 8080) unless ``--control`` says otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

import typer

from sipdrill.addresses import backup_listen_address
from sipdrill.backup.api import run_backup_process
from sipdrill.control.cli import (
    LOOPBACK_OPTION,
    POOL_URL_OPTION,
    TOPOLOGY_OPTION,
    load_topology,
    parse_urls,
    pool_or_exit,
    refuse,
)
from sipdrill.control.settings import TOKEN_ENV
from sipdrill.errors import OperationError


def serve_backup(
    topology: Path = TOPOLOGY_OPTION,
    pool: str = typer.Option(..., "--pool", help="The pool whose Backup Service this is."),
    state_dir: Path = typer.Option(..., "--state-dir", help="Where it keeps its own view."),
    loopback: bool = LOOPBACK_OPTION,
    token: str | None = typer.Option(
        None, "--token", envvar=TOKEN_ENV, help="Bearer token for every control API."
    ),
    control: str | None = typer.Option(
        None,
        "--control",
        help="HOST:PORT to serve the control API on (default: the pool's first front end "
        "+ 100, port 8080).",
    ),
    pool_url: list[str] | None = POOL_URL_OPTION,
    page_size: int = typer.Option(
        5000,
        "--page-size",
        min=1,
        max=10000,
        help="Changes per read and per apply.",
        hidden=True,
    ),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
) -> None:
    """Run a pool's Backup Service: replicate its user data to the paired pool
    every sync interval, and serve /status and /sync."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    if log_level.lower() != "debug":
        # One line per request, several per cycle: only when debugging.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    topo = load_topology(topology)
    fqdn = pool_or_exit(topo, pool)
    if topo.backup_of(fqdn) is None:
        raise refuse(f"pool {fqdn} has no backup pool: there is nothing to replicate to")
    if control is not None:
        host, sep, port = control.rpartition(":")
        if not sep or not port.isdigit():
            raise refuse("--control is HOST:PORT, e.g. 127.0.0.1:8080", 2)
        listen = (host, int(port))
    else:
        listen = backup_listen_address(topo, fqdn, loopback=loopback)
    urls = parse_urls(pool_url, "--pool-url")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def ready(url: str, service: Any) -> None:
            print(
                f"sipdrill backup: {fqdn} -> {service.partner} every "
                f"{service.direction.sync_interval:g}s, control {url}",
                flush=True,
            )

        await run_backup_process(
            topo,
            fqdn,
            state_dir,
            listen=listen,
            token=token,
            loopback=loopback,
            pool_urls=urls,
            stop=stop,
            ready=ready,
            page_size=page_size,
        )

    try:
        asyncio.run(main())
    except OperationError as exc:
        raise refuse(f"{exc.code}: {exc.message}") from None
