"""Harnesses for the SIP interop tests: SIPp, Kamailio and `sipdrill sip registrar`.

Everything listens on and sends to 127.0.0.1 only. Processes are started
with asyncio subprocesses and always stopped (SIGTERM, then SIGKILL) and
reaped, so no test leaves a process or a pipe behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import os
import shutil
import socket
import ssl
import sys
import textwrap
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from procutil import free_port as _free_port
from procutil import stop_process

HOST = "127.0.0.1"


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (checked, not guaranteed)."""
    return _free_port(HOST, udp_too=True)


SCENARIOS = Path(__file__).parent / "scenarios"


def require_binary(name: str) -> str:
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None
    )
    if path is None:
        pytest.skip(
            f"{name} is not installed (Debian package: "
            f"{'sip-tester' if name == 'sipp' else name}); interop test skipped"
        )
    return path


# -- SIPp ------------------------------------------------------------------------


@dataclass
class SippResult:
    returncode: int
    stats: dict[str, str]
    output: str

    def count(self, name: str) -> int:
        return int(self.stats.get(name, "0") or 0)

    @property
    def successful(self) -> int:
        return self.count("SuccessfulCall(C)")

    @property
    def failed(self) -> int:
        return self.count("FailedCall(C)")

    def __str__(self) -> str:
        return (
            f"sipp exit {self.returncode}: {self.successful} ok, {self.failed} failed\n"
            f"{self.output[-3000:]}"
        )


async def run_sipp(
    scenario: str,
    target: str,
    workdir: Path,
    *,
    transport: str = "u1",
    calls: int = 10,
    rate: float = 10,
    domain: str = "lab.local",
    extra: Sequence[str] = (),
    within: float = 30.0,
) -> SippResult:
    """Run one SIPp client scenario from tests/sip/scenarios; stats from its CSV dump."""
    sipp = require_binary("sipp")
    stf = workdir / f"{Path(scenario).stem}-{transport}-stats.csv"
    args = [
        sipp,
        "-sf",
        str(SCENARIOS / scenario),
        "-key",
        "domain",
        domain,
        "-i",
        HOST,
        "-t",
        transport,
        "-m",
        str(calls),
        "-r",
        str(rate),
        "-nostdin",
        "-trace_stat",
        "-stf",
        str(stf),
        "-fd",
        "1",
        "-timeout",
        f"{int(within)}s",
        "-timeout_error",
        "-max_retrans",
        "3",
        *extra,
        target,
    ]
    proc = await asyncio.create_subprocess_exec(
        *args,
        cwd=workdir,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), within + 10)
    finally:
        await stop_process(proc)
    return SippResult(proc.returncode or 0, read_sipp_stats(stf), out.decode(errors="replace"))


def read_sipp_stats(path: Path) -> dict[str, str]:
    """The last row of a SIPp -trace_stat CSV (';'-separated), by column name."""
    if not path.exists():
        return {}
    with path.open(newline="") as f:
        rows = list(csv.reader(f, delimiter=";"))
    if len(rows) < 2:
        return {}
    return dict(zip(rows[0], rows[-1], strict=False))


# -- Kamailio ----------------------------------------------------------------------

KAMAILIO_CFG = textwrap.dedent(
    """\
    #!KAMAILIO
    # Minimal registrar written by sipdrill's interop tests: no database
    # (usrloc db_mode 0), loopback only, optional digest auth (WITH_AUTH)
    # with one password for every user.
    debug=2
    log_stderror=yes
    children={children}
    tcp_children={children}
    auto_aliases=no
    listen=udp:127.0.0.1:{port}
    listen=tcp:127.0.0.1:{port}
    alias="{domain}"
    dns=no
    rev_dns=no
    use_dns_cache=no

    loadmodule "kex.so"
    loadmodule "corex.so"
    loadmodule "tm.so"
    loadmodule "sl.so"
    loadmodule "pv.so"
    loadmodule "maxfwd.so"
    loadmodule "textops.so"
    loadmodule "siputils.so"
    loadmodule "xlog.so"
    loadmodule "usrloc.so"
    loadmodule "registrar.so"
    loadmodule "auth.so"

    modparam("usrloc", "db_mode", 0)
    modparam("registrar", "default_expires", 600)
    modparam("registrar", "min_expires", {min_expires})
    modparam("registrar", "max_expires", 900)

    request_route {{
        if (!mf_process_maxfwd_header("10")) {{ sl_send_reply("483", "Too Many Hops"); exit; }}
        if (is_method("OPTIONS")) {{ sl_send_reply("200", "OK"); exit; }}
        if (is_method("REGISTER")) {{
    #!ifdef WITH_AUTH
            if (!pv_auth_check("$fd", "{password}", "0", "1")) {{
                auth_challenge("$fd", "0");
                exit;
            }}
            consume_credentials();
    #!endif
            if (!save("location")) {{ sl_reply_error(); }}
            exit;
        }}
        if (is_method("ACK")) {{ exit; }}
        sl_send_reply("405", "Method Not Allowed");
    }}
    """
)


def options_ping(port: int, me: int, host: str = HOST) -> bytes:
    return (
        f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {host}:{me};rport;branch=z9hG4bK-probe{os.getpid()}\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:probe@lab.local>;tag=p\r\nTo: <sip:lab.local>\r\n"
        f"Call-ID: probe-{os.getpid()}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    ).encode()


async def wait_udp_sip(port: int, within: float = 30.0) -> None:
    """Until something answers an OPTIONS on 127.0.0.1:port over UDP."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        sock.bind((HOST, 0))
        me = int(sock.getsockname()[1])
        while loop.time() < deadline:
            await loop.sock_sendto(sock, options_ping(port, me), (HOST, port))
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 65535), 0.3)
            except (TimeoutError, ConnectionRefusedError):
                await asyncio.sleep(0.1)
                continue
            if data.startswith(b"SIP/2.0 "):
                return
        raise TimeoutError(f"nothing answers SIP on udp:{HOST}:{port}")
    finally:
        sock.close()


@dataclass
class Kamailio:
    port: int
    domain: str
    password: str
    proc: asyncio.subprocess.Process
    log: Path


@contextlib.asynccontextmanager
async def kamailio(
    workdir: Path,
    *,
    auth: bool = False,
    domain: str = "lab.local",
    password: str = "secret",
    children: int = 2,
    min_expires: int = 60,
) -> AsyncIterator[Kamailio]:
    binary = require_binary("kamailio")
    port = free_port()
    cfg = workdir / "kamailio.cfg"
    cfg.write_text(
        KAMAILIO_CFG.format(
            port=port,
            domain=domain,
            password=password,
            children=children,
            min_expires=min_expires,
        )
    )
    rundir = workdir / "kamailio-run"
    rundir.mkdir(exist_ok=True)
    log = workdir / "kamailio.log"
    args = [binary, "-DD", "-E", "-f", str(cfg), "-Y", str(rundir), "-m", "64", "-M", "8"]
    if auth:
        args += ["-A", "WITH_AUTH"]
    with log.open("wb") as logf:
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf
        )
    try:
        try:
            await wait_udp_sip(port)
        except TimeoutError:
            pytest.fail(f"kamailio did not start:\n{log.read_text()[-3000:]}")
        yield Kamailio(port, domain, password, proc, log)
    finally:
        await stop_process(proc)


# -- sipdrill's own registrar as a process -------------------------------------------


@dataclass
class RegistrarProcess:
    proc: asyncio.subprocess.Process
    udp: int
    tcp: int
    tls: int
    tls_dir: Path
    output: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def registrar_process(
    workdir: Path,
    *,
    domain: str = "lab.local",
    auth: Sequence[str] = (),
    workers: int = 1,
    extra: Sequence[str] = (),
) -> AsyncIterator[RegistrarProcess]:
    """`sipdrill sip registrar` on UDP+TCP (same port) and TLS, in a subprocess."""
    port, tls_port = free_port(), free_port()
    tls_dir = workdir / "tls"
    args = [
        sys.executable,
        "-m",
        "sipdrill",
        "sip",
        "registrar",
        "--domain",
        domain,
        "--listen",
        f"udp:{HOST}:{port}",
        "--listen",
        f"tcp:{HOST}:{port}",
        "--listen",
        f"tls:{HOST}:{tls_port}",
        "--tls-dir",
        str(tls_dir),
        "--workers",
        str(workers),
        *[a for user in auth for a in ("--auth", user)],
        *extra,
    ]
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    handle = RegistrarProcess(proc, port, port, tls_port, tls_dir)
    assert proc.stdout is not None
    stdout = proc.stdout

    async def drain() -> None:
        while line := await stdout.readline():
            handle.output.append(line.decode(errors="replace").rstrip())

    try:
        try:
            await wait_udp_sip(port)
        except TimeoutError:
            await stop_process(proc)
            rest = (await stdout.read()).decode(errors="replace")
            pytest.fail(f"sipdrill sip registrar did not start:\n{rest[-3000:]}")
        reader = asyncio.create_task(drain())
        try:
            yield handle
        finally:
            rc = await stop_process(proc)
            await reader
            # A clean stop on SIGTERM is part of the contract.
            assert rc == 0, "\n".join(handle.output[-50:])
    finally:
        await stop_process(proc)


# -- a verifying TLS bridge for SIPp builds without OpenSSL ---------------------------


@contextlib.asynccontextmanager
async def tls_bridge(
    target_port: int, ctx: ssl.SSLContext, server_hostname: str
) -> AsyncIterator[int]:
    """A loopback TCP port whose connections are relayed over verified TLS to the target.

    Debian's SIPp is built without OpenSSL (`-t l1` is refused), so SIPp
    speaks TCP to the bridge and the bridge speaks TLS (chain and host name
    verified) to the server under test.
    """
    tasks: set[asyncio.Task[None]] = set()
    writers: list[asyncio.StreamWriter] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def on_client(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        writers.append(cw)
        try:
            sr, sw = await asyncio.open_connection(
                HOST, target_port, ssl=ctx, server_hostname=server_hostname
            )
        except (OSError, ssl.SSLError):
            cw.close()
            return
        writers.append(sw)
        await asyncio.gather(pipe(cr, sw), pipe(sr, cw))

    def spawn(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(on_client(cr, cw))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(spawn, HOST, 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        for w in writers:
            w.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in writers:
            with contextlib.suppress(Exception):
                await w.wait_closed()
        await server.wait_closed()


class Harness:
    """The helpers above, for test modules (tests/ is not a package, so no imports)."""

    HOST = HOST
    free_port = staticmethod(free_port)
    require_binary = staticmethod(require_binary)
    run_sipp = staticmethod(run_sipp)
    read_sipp_stats = staticmethod(read_sipp_stats)
    kamailio = staticmethod(kamailio)
    registrar_process = staticmethod(registrar_process)
    tls_bridge = staticmethod(tls_bridge)
    stop_process = staticmethod(stop_process)


@pytest.fixture
def sip_harness() -> type[Harness]:
    return Harness
