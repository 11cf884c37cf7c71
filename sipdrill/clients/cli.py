"""``sipdrill serve clients``: thousands of simulated clients in the foreground.

    sipdrill serve clients --topology lab.yaml --users 'pool1.lab.local:*' --count 1000 \\
        --dns 127.0.0.1:5353 --ca /tmp/lab-tls --control 127.0.0.1:8070 --events events.jsonl

Endpoints sign in at ``--ramp`` per second, discover the pools through the
lab DNS server, register over TLS (verified against the lab CA) and keep
going until SIGINT/SIGTERM (or ``--duration``), then sign out. Every state
change and workload result is one JSON line on ``--events`` (``-``: stdout);
the control API (``--control``) serves counts, events, start/stop and
Prometheus metrics (see :mod:`sipdrill.clients.api`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import typer

from sipdrill.clients.api import create_app
from sipdrill.clients.endpoint import Target
from sipdrill.clients.metrics import EventLog
from sipdrill.clients.population import (
    CallSettings,
    PopulationError,
    parse_workload,
    profile_for,
    select_users,
)
from sipdrill.clients.resolver import parse_nameserver
from sipdrill.clients.runner import ClientRunner, RunnerConfig
from sipdrill.clients.slots import Slot, claim_slot, slot_users
from sipdrill.control.server import AppServer, bind_tcp
from sipdrill.control.settings import token_from_env
from sipdrill.sip.fdlimit import raise_fd_limit
from sipdrill.sip.tls import CA_CERT, TlsSetupError, client_context
from sipdrill.sip.transport import Kind, TransportLimits

__all__ = ["serve_clients"]

log = logging.getLogger("sipdrill.clients")


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"sipdrill serve clients: {message}", err=True)
    return typer.Exit(code)


@dataclass
class _Plan:
    config: RunnerConfig
    control: tuple[str, int] | None
    events_path: str | None
    start: bool
    duration: float | None
    #: Which users this process has (a clients replica's slot), for /health.
    note: str | None = None


def _ca_context(ca: Path, tls_max: str) -> ssl.SSLContext:
    ca_file = ca / CA_CERT if ca.is_dir() else ca
    ctx = client_context(ca_file)
    if tls_max == "1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _hostport(text: str, what: str) -> tuple[str, int]:
    try:
        return parse_nameserver(text, default_port=0)
    except ValueError as exc:
        raise _fail(f"{what} {text!r}: {exc}") from None


def serve_clients(
    topology: Path = typer.Option(
        ..., "--topology", "-t", exists=True, dir_okay=False, help="The topology YAML file."
    ),
    users: list[str] = typer.Option(
        ["*:*"],
        "--users",
        "-u",
        help="POOL:GLOB of the users to simulate, e.g. 'pool1.lab.local:*' or '*:p1u00*'; "
        "repeatable.",
    ),
    count: int | None = typer.Option(None, "--count", "-n", min=1, help="Simulate the first N."),
    offset: int = typer.Option(
        0,
        "--offset",
        min=0,
        help="Skip the first N matching users: one block of users per clients process.",
    ),
    slots: Path | None = typer.Option(
        None,
        "--slots",
        file_okay=False,
        help="A directory the replicas of a clients service share: claim its lowest free "
        "slot K (a lock held while this process runs) and simulate the K-th block of --count "
        "users; past the last user, stay up with no users (idle).",
    ),
    dns: str | None = typer.Option(
        None, "--dns", help="HOST:PORT of the lab DNS server (never the system resolver)."
    ),
    ca: Path | None = typer.Option(
        None, "--ca", help="The lab CA: its directory (ca.pem in it) or the PEM file."
    ),
    bind: str | None = typer.Option(
        None, "--bind", help="Source address for DNS and SIP (a 127.x address in the local lab)."
    ),
    control: str | None = typer.Option(
        None, "--control", help="HOST:PORT of the control API, e.g. 127.0.0.1:8070."
    ),
    events: str = typer.Option(
        "-",
        "--events",
        help="Where the JSONL events go: a file (appended), '-' for stdout, "
        "'none' for nowhere (the API still serves the last ones).",
    ),
    workload: str | None = typer.Option(
        None,
        "--workload",
        help="im,presence,conference,call: exercise the service once registered.",
    ),
    workload_interval: float = typer.Option(
        60.0, "--workload-interval", min=0.05, help="Mean seconds between workload actions."
    ),
    call_fraction: float = typer.Option(
        0.25,
        "--call-fraction",
        min=0.0,
        max=1.0,
        help="With --workload call: the share of the users that place calls.",
    ),
    call_interval: float = typer.Option(
        30.0,
        "--call-interval",
        min=0.05,
        help="With --workload call: mean seconds between two calls of one caller (+-50 %).",
    ),
    call_hold: float = typer.Option(
        3.0, "--call-hold", min=0.0, help="With --workload call: seconds a call is held."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the RNG (SRV, backoff, ids)."),
    ramp: float = typer.Option(
        100.0, "--ramp", min=0, help="Sign-ins per second at start (0: all at once)."
    ),
    transport: str = typer.Option(
        "tls", "--transport", help="tls (Lync), or tcp/udp for plain registrars such as Kamailio."
    ),
    registrar: list[str] = typer.Option(
        [], "--registrar", help="HOST:PORT to register with instead of DNS discovery; repeatable."
    ),
    no_start: bool = typer.Option(False, "--no-start", help="Wait for POST /start."),
    duration: float | None = typer.Option(
        None, "--duration", min=0.1, help="Sign out and exit after this many seconds."
    ),
    connect_concurrency: int = typer.Option(
        256,
        "--connect-concurrency",
        min=0,
        help="Connects (TCP + TLS handshake) in progress at once; 0: no limit (a 10,000-endpoint "
        "storm then times out in the simulator's own event loop).",
    ),
    tls_max: str = typer.Option(
        "1.2", "--tls-max", help="Highest TLS version: 1.2 (Lync 2013 era; less memory) or 1.3."
    ),
    log_level: str = typer.Option("warning", "--log-level", help="debug, info, warning or error."),
) -> None:
    """Simulate the topology's users as Lync 2013 clients: discover, register, keep alive,
    fail over, and record every state change."""
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.WARNING),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    from sipdrill.topology_cli import load_or_exit

    topo = load_or_exit(topology).topology
    try:
        kind = Kind(transport.lower())
    except ValueError:
        raise _fail("--transport must be tls, tcp or udp") from None
    if tls_max not in ("1.2", "1.3"):
        raise _fail("--tls-max must be 1.2 or 1.3")
    note = None
    slot: Slot | None = None  # its lock lives as long as this process
    try:
        if slots is not None:
            if count is None:
                raise _fail("--slots needs --count (the users of each replica)")
            slot = _claim(slots)
            chosen = slot_users(select_users(topo, users), slot.number, count, offset)
            specs, note = chosen.users, chosen.note
            print(note, file=sys.stderr, flush=True)
        else:
            specs = select_users(topo, users, None if count is None else count + offset)[offset:]
        kinds = parse_workload(workload)
        calls = CallSettings(call_fraction, call_interval, call_hold)
    except PopulationError as exc:
        raise _fail(str(exc), 1) from None
    if not specs and slot is None:
        raise _fail(f"--offset {offset}: no user is left to simulate; lower it or widen --users", 1)
    profile = profile_for(
        topo,
        transport=kind,
        workload=kinds,
        workload_interval=workload_interval,
        calls=calls,
        # Callers call the users this process simulates: every one of them is
        # registered somewhere, so a failed call is the lab's, not a missing user's.
        call_targets=tuple(s.uri for s in specs),
    )
    if registrar:
        static = []
        for text in registrar:
            host, port = _hostport(text, "--registrar")
            static.append(Target(host, port or profile.port_for(kind), kind, None, "--registrar"))
        profile = dataclasses.replace(profile, static_targets=tuple(static))
    elif dns is None:
        raise _fail("--dns HOST:PORT is needed (or --registrar to skip discovery)")
    nameservers = [_hostport(dns, "--dns")] if dns else []
    nameservers = [(h, p or 53) for h, p in nameservers]
    ctx = None
    if kind is Kind.TLS:
        if ca is None:
            raise _fail("--ca DIR is needed for TLS (the lab CA the pools' certificates chain to)")
        try:
            ctx = _ca_context(ca, tls_max)
        except TlsSetupError as exc:
            raise _fail(str(exc), 1) from None
    control_addr = _hostport(control, "--control") if control else None
    config = RunnerConfig(
        profile=profile,
        users=specs,
        nameservers=nameservers,
        ssl_context=ctx,
        bind=bind,
        ramp=ramp,
        seed=seed,
        connect_concurrency=connect_concurrency,
        negative_ttl=float(topo.dns.negative_ttl),
        tune_gc=True,
        transport_limits=TransportLimits(
            idle_timeout=max(300.0, 3 * topo.timers.keepalive_interval)
        ),
    )
    limit = raise_fd_limit()
    if limit < len(specs) + 64:
        typer.echo(
            f"warning: the file descriptor limit ({limit}) is below the endpoints "
            f"({len(specs)}); some will fail to connect",
            err=True,
        )
    plan = _Plan(
        config,
        control_addr,
        None if events == "none" else events,
        not no_start,
        duration,
        note,
    )
    try:
        rc = asyncio.run(_serve(plan))
    except OSError as exc:
        raise _fail(str(exc), 1) from None
    raise typer.Exit(rc)


def _claim(directory: Path) -> Slot:
    try:
        return claim_slot(directory)
    except OSError as exc:
        raise _fail(f"--slots {directory}: cannot claim a slot: {exc}", 1) from None


def _open_events(path: str | None) -> tuple[IO[str] | None, bool]:
    if path is None:
        return None, False
    if path == "-":
        return sys.stdout, False
    return open(path, "a", encoding="utf-8"), True  # closed by _serve


async def _serve(plan: _Plan) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stream, owned = _open_events(plan.events_path)
    runner = ClientRunner(plan.config, events=EventLog(stream=stream))
    server: AppServer | None = None
    try:
        await runner.open()
        where = ""
        if plan.control is not None:
            host, port = plan.control
            try:
                sock = bind_tcp(host, port)
            except OSError as exc:
                typer.echo(f"sipdrill serve clients: --control {host}:{port}: {exc}", err=True)
                return 1
            port = sock.getsockname()[1]
            server = AppServer(create_app(runner, token_from_env(), note=plan.note), sock)
            try:
                await server.start(lambda: RuntimeError("the control API did not start"))
            except Exception as exc:
                typer.echo(f"sipdrill serve clients: {exc}", err=True)
                return 1
            where = f", control http://{host}:{port}"
        n = len(plan.config.users)
        dns = ", ".join(f"{h}:{p}" for h, p in plan.config.nameservers) or "none (--registrar)"
        print(
            f"sipdrill clients: {n} endpoints, DNS {dns}{where}, "
            f"events {plan.events_path or 'none'}",
            file=sys.stderr,
            flush=True,
        )
        if plan.start:
            runner.start()
        if plan.duration is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), plan.duration)
        else:
            await stop.wait()
    finally:
        await runner.close()
        if server is not None:
            await server.stop()
        if stream is not None and owned:
            stream.close()
    return 0
