"""`sipdrill sip ...`: run SIP services standalone.

    sipdrill sip registrar --domain lab.local \\
        --listen udp:127.0.0.1:5070 --listen tcp:127.0.0.1:5070 --listen tls:127.0.0.1:5071 \\
        [--tls-dir DIR] [--auth user:password ...] [--workers N]

Prints where it listens, runs until SIGINT or SIGTERM, then closes every
socket and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import typer

from sipdrill.sip.server import (
    ListenSpec,
    RegistrarConfig,
    SipService,
    build_registrar_service,
    tune_gc,
)
from sipdrill.sip.tls import ServiceCert, TlsSetupError, ensure_server_cert, server_context
from sipdrill.sip.transport import Kind, TransportError

app = typer.Typer(help="SIP services of the lab, standalone.", no_args_is_help=True)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"sipdrill sip: {message}", err=True)
    return typer.Exit(2)


def _tls_cert(config: RegistrarConfig, tls_dir: Path) -> ServiceCert:
    """The registrar's certificate: the domain, extra names, and the TLS listeners' names/IPs."""
    names = [config.domain, *config.tls_names]
    ips: list[str] = []
    for spec in config.listens:
        if spec.kind.value != "tls":
            continue
        try:
            ip = ipaddress.ip_address(spec.host)
        except ValueError:
            names.append(spec.host)
            continue
        if ip.is_unspecified:
            ips.append("::1" if ip.version == 6 else "127.0.0.1")
        else:
            ips.append(str(ip))
    return ensure_server_cert(tls_dir, "registrar", dns_names=names, ip_addresses=ips)


@dataclass
class _Plan:
    config: RegistrarConfig
    cert: ServiceCert | None
    reuse_port: bool
    loop_kind: str


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop  # optional: `pip install uvloop`

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    return asyncio.new_event_loop()


@dataclass
class _Share:
    """One worker's share of one UDP listener (see sipdrill.sip.shard)."""

    shared: socket.socket  # the listening socket every worker reads
    inbox: socket.socket  # where the other workers pass this worker's datagrams
    peers: list[socket.socket]  # peers[w] reaches worker w's inbox
    me: int


_Shards = list[_Share]


async def _serve(
    plan: _Plan, ready: multiprocessing.connection.Connection | None, shards: _Shards
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    service: SipService = build_registrar_service(plan.config)
    ctx = server_context(plan.cert) if plan.cert is not None else None
    listens = plan.config.listens
    if shards:  # the UDP listeners were opened before the workers forked
        listens = [spec for spec in listens if spec.kind is not Kind.UDP]
    try:
        bound = await service.start(listens, ssl_context=ctx, reuse_port=plan.reuse_port)
        for share in shards:
            addr = service.transport.attach_shard(share.shared, share.inbox, share.peers, share.me)
            bound.append((Kind.UDP, addr))
    except TransportError as exc:
        if ready is not None:
            ready.send(("error", str(exc)))
        else:
            typer.echo(f"sipdrill sip registrar: {exc}", err=True)
        return 1
    tune_gc()
    where = " ".join(f"{kind}:{_fmt(addr)}" for kind, addr in bound)
    if ready is not None:
        ready.send(("ok", where))
    else:
        typer.echo(f"sipdrill registrar for {plan.config.domain} listening on {where}")
        if plan.cert is not None:
            typer.echo(
                f"TLS CA: {plan.cert.ca_path} (certificate names: "
                f"{', '.join(plan.cert.dns_names + plan.cert.ip_addresses)})"
            )
        typer.echo("Ctrl-C or SIGTERM stops it.")
    try:
        await stop.wait()
    finally:
        await service.close()
    return 0


def _fmt(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _run_one(
    plan: _Plan, ready: multiprocessing.connection.Connection | None, shards: _Shards
) -> int:
    loop = _new_loop(plan.loop_kind)
    try:
        return loop.run_until_complete(_serve(plan, ready, shards))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _worker(plan: _Plan, ready: multiprocessing.connection.Connection, shards: _Shards) -> None:
    # The parent forwards SIGINT/SIGTERM; a terminal's Ctrl-C also reaches the
    # whole process group, which the serve loop handles the same way.
    rc = 1
    try:
        rc = _run_one(plan, ready, shards)
    except Exception as exc:  # reported to the parent, which exits non-zero
        with contextlib.suppress(Exception):
            ready.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        ready.close()
    sys.exit(rc)


def _bind_udp(specs: list[ListenSpec]) -> list[socket.socket]:
    bound: list[socket.socket] = []
    try:
        for spec in specs:
            family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
            sock.bind((spec.host, spec.port))
    except OSError as exc:
        for sock in bound:
            sock.close()
        raise _fail(f"cannot listen on udp:{spec.host}:{spec.port}: {exc}") from None
    return bound


def _inbox_pair() -> tuple[socket.socket, socket.socket]:
    """(sending end, inbox) of one worker's inbox for one UDP listener."""
    sender, inbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for sock in (sender, inbox):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    return sender, inbox


def _run_workers(plan: _Plan, workers: int) -> int:
    ctx = multiprocessing.get_context("fork")
    procs: list[multiprocessing.process.BaseProcess] = []
    pipes: list[multiprocessing.connection.Connection] = []
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    # Every worker reads each UDP listener and passes on what another worker
    # owns, by AoR (sipdrill.sip.shard); stream listeners are opened by every
    # worker with SO_REUSEPORT. This process only supervises.
    udp_socks = _bind_udp([spec for spec in plan.config.listens if spec.kind is Kind.UDP])
    # inboxes[i][w]: (sending end, inbox) of worker w for listener i
    inboxes = [[_inbox_pair() for _ in range(workers)] for _ in udp_socks]
    opened = [*udp_socks, *(end for row in inboxes for pair in row for end in pair)]
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for w in range(workers):
            parent_end, child_end = ctx.Pipe(duplex=False)
            shards = [
                _Share(udp, row[w][1], [sender for sender, _ in row], w)
                for udp, row in zip(udp_socks, inboxes, strict=True)
            ]
            worker = ctx.Process(target=_worker, args=(plan, child_end, shards), daemon=False)
            worker.start()
            child_end.close()
            procs.append(worker)
            pipes.append(parent_end)
        # The workers hold their own copies now.
        for sock in opened:
            sock.close()
        reports: list[tuple[str, str]] = []
        for pipe in pipes:
            if pipe.poll(30):
                try:
                    reports.append(pipe.recv())
                except EOFError:
                    reports.append(("error", "worker exited during start-up"))
            else:
                reports.append(("error", "worker did not start within 30 s"))
        errors = [msg for status, msg in reports if status != "ok"]
        if errors:
            typer.echo(f"sipdrill sip registrar: {errors[0]}", err=True)
            stopping = True
        else:
            typer.echo(
                f"sipdrill registrar for {plan.config.domain} listening on {reports[0][1]} "
                f"({workers} workers: UDP requests handled by the worker owning the AoR; "
                "TCP/TLS connections spread "
                "with SO_REUSEPORT, their bindings stay in the worker holding the connection)"
            )
            if plan.cert is not None:
                typer.echo(f"TLS CA: {plan.cert.ca_path}")
            typer.echo("Ctrl-C or SIGTERM stops it.")

        def keep_going() -> bool:
            return not stopping and all(p.is_alive() for p in procs)

        while keep_going():
            time.sleep(0.2)
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        codes = []
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
            codes.append(proc.exitcode)
        for pipe in pipes:
            pipe.close()
        return 0 if not errors and all(c == 0 for c in codes) else 1
    finally:
        for sock in opened:  # closing twice is harmless
            sock.close()
        for s, handler in old.items():
            signal.signal(s, handler)


@app.command()
def registrar(
    domain: str = typer.Option(..., "--domain", help="The SIP domain served (To/From host)."),
    listen: list[str] = typer.Option(
        ["udp:127.0.0.1:5060"],
        "--listen",
        help="KIND:HOST:PORT, KIND udp|tcp|tls; repeat for several listeners.",
    ),
    tls_dir: Path | None = typer.Option(
        None, "--tls-dir", help="Lab CA directory (created if needed); default: a new temp dir."
    ),
    tls_name: list[str] = typer.Option(
        [], "--tls-name", help="Extra DNS name for the server certificate (pool/front-end FQDN)."
    ),
    auth: list[str] = typer.Option(
        [], "--auth", help="USER:PASSWORD; with any, every REGISTER needs digest auth."
    ),
    digest_algorithm: list[str] = typer.Option(
        ["MD5", "SHA-256"],
        "--digest-algorithm",
        help="Digest algorithms offered, preferred first (MD5, SHA-256).",
    ),
    workers: int = typer.Option(
        1,
        "--workers",
        min=1,
        max=64,
        help="Worker processes: UDP requests are shared out by AoR (one location service "
        "per AoR), TCP/TLS connections with SO_REUSEPORT.",
    ),
    expires_default: int = typer.Option(
        600, "--expires-default", help="Expires granted when a REGISTER asks for none (s)."
    ),
    expires_min: int = typer.Option(
        300, "--expires-min", help="Shorter requests get 423 with this Min-Expires (s)."
    ),
    expires_max: int = typer.Option(
        900, "--expires-max", help="Longer requests are cut to this (s)."
    ),
    event_loop: str = typer.Option(
        "asyncio", "--loop", help="asyncio, or uvloop if installed (optional)."
    ),
    fast_path: bool = typer.Option(
        True,
        "--fast-path/--no-fast-path",
        help="Answer the common REGISTER over UDP without building messages "
        "(sipdrill.sip.fastpath; same bindings and answers).",
    ),
    batch_io: bool = typer.Option(
        True,
        "--batch-io/--no-batch-io",
        help="With --workers > 1: recvmmsg/sendmmsg on UDP when sipdrill_mmsg is installed.",
    ),
    log_level: str = typer.Option("warning", "--log-level", help="debug, info, warning or error."),
) -> None:
    """Run the generic RFC 3261 registrar on UDP/TCP/TLS until SIGINT/SIGTERM."""
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.WARNING),
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        listens = [ListenSpec.parse(text) for text in listen]
    except ValueError as exc:
        raise _fail(str(exc)) from None
    users: dict[str, str] = {}
    for entry in auth:
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            raise _fail(f"--auth {entry!r}: expected USER:PASSWORD")
        users[user] = password
    if not expires_min <= expires_default <= expires_max:
        raise _fail("expected --expires-min <= --expires-default <= --expires-max")
    if any(a.upper() not in ("MD5", "SHA-256") for a in digest_algorithm):
        raise _fail("--digest-algorithm must be MD5 or SHA-256")
    if workers > 1 and any(spec.port == 0 and spec.kind is not Kind.UDP for spec in listens):
        raise _fail("--workers > 1 needs fixed TCP/TLS ports (SO_REUSEPORT shares one port)")
    if event_loop not in ("asyncio", "uvloop"):
        raise _fail("--loop must be asyncio or uvloop")
    if event_loop == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            raise _fail("--loop uvloop: uvloop is not installed (pip install uvloop)") from None
    config = RegistrarConfig(
        domain=domain,
        listens=listens,
        tls_names=tuple(tls_name),
        users=users or None,
        expires_default=expires_default,
        expires_min=expires_min,
        expires_max=expires_max,
        digest_algorithms=tuple(a.upper() for a in digest_algorithm),
        fast_path=fast_path,
        batch_io=batch_io,
    )
    cert = None
    if any(spec.kind.value == "tls" for spec in listens):
        directory = tls_dir or Path(tempfile.mkdtemp(prefix="sipdrill-tls-"))
        try:
            cert = _tls_cert(config, directory)
        except TlsSetupError as exc:
            raise _fail(str(exc)) from None
    plan = _Plan(config, cert, reuse_port=workers > 1, loop_kind=event_loop)
    rc = _run_one(plan, None, []) if workers == 1 else _run_workers(plan, workers)
    raise typer.Exit(rc)
