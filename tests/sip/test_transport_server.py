"""SipService (server transactions + method dispatch) and the registrar on loopback UDP/TCP."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator

import pytest
from sipmessage import Response

from sipdrill.sip.message import parse_message
from sipdrill.sip.server import (
    ListenSpec,
    RegistrarConfig,
    SipService,
    build_registrar_service,
)
from sipdrill.sip.transport import Kind

HOST = "127.0.0.1"


def sip_request(
    method: str,
    n: int,
    *,
    user: str = "alice",
    cseq: int = 1,
    branch: str | None = None,
    extra: str = "",
    transport: str = "UDP",
) -> bytes:
    return (
        f"{method} sip:lab.local SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} 127.0.0.1:5999;branch={branch or f'z9hG4bK-{method}-{n}'}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:{user}@lab.local>;tag=f{n}\r\n"
        f"To: <sip:{user}@lab.local>\r\n"
        f"Call-ID: c{n}@test\r\n"
        f"CSeq: {cseq} {method}\r\n"
        f"{extra}"
        "Content-Length: 0\r\n\r\n"
    ).encode()


@pytest.fixture
async def service() -> AsyncIterator[tuple[SipService, int]]:
    svc = build_registrar_service(
        RegistrarConfig("lab.local", [], expires_min=60, expires_default=600, expires_max=900)
    )
    bound = await svc.start([ListenSpec(Kind.UDP, HOST, 0), ListenSpec(Kind.TCP, HOST, 0)])
    port = bound[0][1][1]
    try:
        yield svc, port
    finally:
        await svc.close()


class UdpClient:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind((HOST, 0))

    async def ask(self, port: int, data: bytes, within: float = 2.0) -> Response:
        loop = asyncio.get_running_loop()
        await loop.sock_sendto(self.sock, data, (HOST, port))
        while True:  # the final response; an INVITE gets 100 Trying first
            raw = await asyncio.wait_for(loop.sock_recv(self.sock, 65535), within)
            message = parse_message(raw)
            assert isinstance(message, Response)
            if message.code >= 200:
                return message

    async def silent(self, port: int, data: bytes, within: float = 0.3) -> bool:
        try:
            await self.ask(port, data, within)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def udp() -> AsyncIterator[UdpClient]:
    client = UdpClient()
    yield client
    client.close()


async def test_options_answered_with_allow(service, udp) -> None:
    _, port = service
    answer = await udp.ask(port, sip_request("OPTIONS", 1))
    assert answer.code == 200
    assert set(answer.headers["Allow"].replace(" ", "").split(",")) >= {"REGISTER", "OPTIONS"}
    assert answer.headers["Server"] == "sipdrill"


@pytest.mark.parametrize(("method", "status"), [("INVITE", 405), ("SUBSCRIBE", 405), ("FROB", 501)])
async def test_unsupported_methods(service, udp, method: str, status: int) -> None:
    _, port = service
    answer = await udp.ask(port, sip_request(method, 2))
    assert answer.code == status
    assert "REGISTER" in answer.headers["Allow"]


async def test_cancel_without_transaction_and_stray_ack(service, udp) -> None:
    _, port = service
    assert (await udp.ask(port, sip_request("CANCEL", 3))).code == 481
    assert await udp.silent(port, sip_request("ACK", 4))


async def test_register_retransmission_answered_from_the_transaction(service, udp) -> None:
    svc, port = service
    register = sip_request("REGISTER", 5, extra="Contact: <sip:alice@127.0.0.1:5999>\r\n")
    first = await udp.ask(port, register)
    # Re-processing the same Call-ID/CSeq would be answered 500 (out of order);
    # the server transaction answers the retransmission with the same 200.
    again = await udp.ask(port, register)
    assert first.code == again.code == 200
    assert first.headers["To"] == again.headers["To"]
    assert svc.registrar is not None
    (binding,) = svc.registrar.lookup("sip:alice@lab.local")
    assert binding.source.kind is Kind.UDP and binding.source.remote == udp.sock.getsockname()


async def test_register_too_brief_and_query(service, udp) -> None:
    _, port = service
    brief = sip_request(
        "REGISTER", 6, user="bob", extra="Contact: <sip:bob@127.0.0.1:5999>\r\nExpires: 10\r\n"
    )
    answer = await udp.ask(port, brief)
    assert answer.code == 423 and answer.headers["Min-Expires"] == "60"
    ok = sip_request("REGISTER", 7, user="bob", extra="Contact: <sip:bob@127.0.0.1:5999>\r\n")
    assert (await udp.ask(port, ok)).code == 200
    query = await udp.ask(port, sip_request("REGISTER", 8, user="bob"))
    assert query.code == 200 and "sip:bob@127.0.0.1:5999" in query.headers["Contact"]


async def test_register_over_tcp(service) -> None:
    svc, _port = service
    tcp_port = svc.transport.listening[1][1][1]
    reader, writer = await asyncio.open_connection(HOST, tcp_port)
    try:
        writer.write(
            sip_request(
                "REGISTER",
                9,
                user="carol",
                transport="TCP",
                extra="Contact: <sip:carol@127.0.0.1:5999;transport=tcp>\r\n",
            )
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        answer = parse_message(head)
        assert isinstance(answer, Response) and answer.code == 200
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("udp:127.0.0.1:5070", ListenSpec(Kind.UDP, "127.0.0.1", 5070)),
        ("TLS:[::1]:5061", ListenSpec(Kind.TLS, "::1", 5061)),
        ("tcp:fe1.lab.local:0", ListenSpec(Kind.TCP, "fe1.lab.local", 0)),
    ],
)
def test_listen_spec_parse(text: str, spec: ListenSpec) -> None:
    assert ListenSpec.parse(text) == spec
    assert ListenSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("text", ["sctp:1.2.3.4:5", "udp:5060", "udp:[::1]5060", "tcp:h:99999"])
def test_listen_spec_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        ListenSpec.parse(text)


# -- `sipdrill sip registrar` as a process -------------------------------------------------


async def _run_cli(*args: str, within: float = 20.0) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sipdrill",
        "sip",
        "registrar",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), within)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out.decode()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "sctp:127.0.0.1:5070"], "udp, tcp or tls"),
        (["--listen", "tcp:127.0.0.1:0", "--workers", "2"], "fixed TCP/TLS ports"),
        (["--auth", "alice"], "USER:PASSWORD"),
        (["--expires-min", "900", "--expires-max", "300"], "--expires-min"),
    ],
)
async def test_cli_rejects_bad_options(args: list[str], message: str) -> None:
    rc, out = await _run_cli("--domain", "lab.local", *args)
    assert rc == 2 and message in out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_cli_prints_where_it_listens_and_stops_cleanly(tmp_path, sig) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sipdrill",
        "sip",
        "registrar",
        "--domain",
        "lab.local",
        "--listen",
        "udp:127.0.0.1:0",
        "--listen",
        "tls:127.0.0.1:0",
        "--tls-dir",
        str(tmp_path),
        "--tls-name",
        "pool1.lab.local",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    try:
        first = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert "listening on udp:127.0.0.1:" in first and " tls:127.0.0.1:" in first
        second = (await asyncio.wait_for(proc.stdout.readline(), 5)).decode()
        assert str(tmp_path / "ca.pem") in second and "pool1.lab.local" in second
        proc.send_signal(sig)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
