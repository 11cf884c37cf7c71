"""``sipdrill serve dns``: run the lab's DNS server in the foreground."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError

from sipdrill.dns.errors import ConfigError
from sipdrill.dns.service import DnsService
from sipdrill.dns.settings import DnsServerSettings


def serve_dns(
    topology: Path = typer.Option(
        ..., "--topology", "-t", exists=True, dir_okay=False, help="The topology YAML file."
    ),
    listen: list[str] | None = typer.Option(
        None,
        "--listen",
        "-l",
        help="host:port to answer on over UDP and TCP; repeatable. Default 127.0.0.1:5353 "
        "(use port 53 in containers).",
    ),
    control: str | None = typer.Option(
        None, "--control", help="host:port of the HTTP control API, e.g. 127.0.0.1:8053."
    ),
    token: str | None = typer.Option(
        None,
        "--token",
        envvar="SIPDRILL_DNS_TOKEN",
        help="Bearer token for the control API (required when it is not on loopback).",
    ),
    tsig_key: list[str] | None = typer.Option(
        None,
        "--tsig-key",
        help="TSIG key allowed to UPDATE the zone: [hmac-sha256:]name:base64secret; repeatable.",
    ),
    loopback: bool = typer.Option(
        False, "--loopback", help="Serve the topology's 127.x stand-in addresses (local runtime)."
    ),
    client_view: list[str] | None = typer.Option(
        None, "--client-view", help="NETWORK=VIEW: queries from NETWORK get VIEW; repeatable."
    ),
    no_cache: bool = typer.Option(False, "--no-cache", help="Disable the answer cache."),
    no_batch_io: bool = typer.Option(
        False, "--no-batch-io", help="One recvfrom/sendto per query even with sipdrill_mmsg."
    ),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
) -> None:
    """Serve the topology's zone: authoritative, UDP and TCP, with live changes
    (control API, RFC 2136 UPDATE with TSIG) and fault hooks."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    overrides: dict[str, Any] = {"topology": topology, "loopback": loopback}
    if listen:
        overrides["listen"] = listen
    if control is not None:
        overrides["control"] = control
    if token is not None:
        overrides["token"] = token
    if tsig_key:
        overrides["tsig_keys"] = tsig_key
    if client_view:
        pairs = [item.split("=", 1) for item in client_view]
        if any(len(p) != 2 for p in pairs):
            _fail("--client-view is NETWORK=VIEW, e.g. 127.0.0.2/32=site1")
        overrides["client_views"] = dict(pairs)
    if no_cache:
        overrides["answer_cache_size"] = 0
    if no_batch_io:
        overrides["udp_batch_io"] = False
    try:
        settings = DnsServerSettings(**overrides)
    except ValidationError as exc:
        _fail(str(exc))
    from sipdrill.topology_cli import load_or_exit

    loaded = load_or_exit(topology)
    try:
        service = DnsService(loaded.topology, settings)
    except ConfigError as exc:
        _fail(exc.reason)
    try:
        asyncio.run(_run(service))
    except ConfigError as exc:
        _fail(exc.reason)


async def _run(service: DnsService) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with service:
        for warning in service.zone.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        where = ", ".join(f"{h}:{p}" for h, p in service.dns_addresses)
        ready = (
            f"sipdrill dns: zone {service.zone.origin} serial {service.zone.serial}, "
            f"views {service.zone.view_names}, udp+tcp {where}"
        )
        if service.control_url:
            ready += f", control {service.control_url}"
        print(ready, flush=True)
        await stop.wait()


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)
