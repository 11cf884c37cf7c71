"""``sipdrill serve pool``: one Front End pool in the foreground.

The orchestrator's plan starts it as ``sipdrill serve pool --topology FILE
[--loopback] --pool FQDN --state-dir DIR --ca DIR`` with
``SIPDRILL_CONTROL_TOKEN`` set.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import typer
from pydantic import SecretStr

from sipdrill.control.settings import TOKEN_ENV
from sipdrill.errors import OperationError
from sipdrill.pool.service import PoolService, PoolSettings
from sipdrill.sip.server import tune_gc
from sipdrill.topology_cli import load_or_exit


def serve_pool(
    topology: Path = typer.Option(
        ..., "--topology", "-t", exists=True, dir_okay=False, help="The topology YAML file."
    ),
    pool: str = typer.Option(..., "--pool", help="FQDN of the pool to run."),
    front_end: str | None = typer.Option(
        None, "--front-end",
        help="The front end of the pool this process is (FQDN or first label, e.g. fe2); "
        "default: the first. Every front end of a pool shares its --state-dir.",
    ),
    state_dir: Path = typer.Option(
        ..., "--state-dir", help="Where the pool keeps its user store and failover state."
    ),
    ca: Path = typer.Option(..., "--ca", help="The lab CA directory (created if missing)."),
    loopback: bool = typer.Option(
        False, "--loopback", help="Listen on the topology's 127.x stand-in addresses."
    ),
    token: str | None = typer.Option(
        None, "--token", envvar=TOKEN_ENV, help="Bearer token of the control API."
    ),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
    tls_workers: int = typer.Option(
        0, "--tls-workers", min=0, max=64,
        help="Processes doing the TLS handshakes and records in front of the pool's SIP "
        "process (one per core absorbs a TLS storm faster); 0: the pool's process does it. "
        "A worker that dies is replaced; pools are still recognised by their certificates.",
    ),
) -> None:
    """Run a Front End pool: registrar (home and backup), presence, IM and
    conferences on SIP TLS 5061 / TCP+UDP 5060, and the control API."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    loaded = load_or_exit(topology)
    settings = PoolSettings(
        pool=pool,
        front_end=front_end,
        state_dir=state_dir,
        ca_dir=ca,
        loopback=loopback,
        token=SecretStr(token) if token else None,
        tls_workers=tls_workers,
    )
    try:
        service = PoolService(loaded.topology, settings)
        asyncio.run(_run(service))
    except OperationError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None


async def _run(service: PoolService) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with service:
        # A pool holds thousands of registrations and live transactions (see
        # tune_gc, and "Garbage-collector thresholds in servers" in docs/decisions.md).
        tune_gc()
        sip = ", ".join(f"{k}:{h}:{p}" for k, (h, p) in service.sip_addresses)
        print(f"sipdrill pool {service.fqdn}: sip {sip}, control {service.control_url}", flush=True)
        await stop.wait()
