"""TLS worker processes in front of a SIP transport (sipdrill.sip.tls_front), on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sipdrill.sip.tls import LabCA, client_context, ensure_server_cert
from sipdrill.sip.tls_front import TlsFront, _pack, _unpack
from sipdrill.sip.transport import Flow, Kind, Received, SipTransport

HOST = "127.0.0.1"
NAME = "registrar.lab.local"
OPTIONS = (
    "OPTIONS sip:lab.local SIP/2.0\r\n"
    "Via: SIP/2.0/TLS 127.0.0.1:5099;branch=z9hG4bK-{n}\r\n"
    "Max-Forwards: 70\r\nFrom: <sip:a@lab.local>;tag=a\r\nTo: <sip:lab.local>\r\n"
    "Call-ID: front-{n}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
)


def test_addresses_and_names_survive_the_control_message() -> None:
    pair = (("127.0.0.5", 40000), ("127.0.0.1", 5061))
    assert _unpack(_pack(*pair)) == (*pair, ())
    v6 = (("::1", 1), ("fe80::1", 65535), ("pool2.lab.local", "fe1.pool2.lab.local"))
    assert _unpack(_pack(*v6)) == v6
    with pytest.raises(ValueError):
        _unpack(b'["h", 1, "l", 2, [3]]')


@dataclass
class Side:
    transport: SipTransport
    front: TlsFront
    ca: Path
    received: list[Received] = field(default_factory=list)
    closed: list[Flow] = field(default_factory=list)


@pytest.fixture
async def side(tmp_path: Path) -> AsyncIterator[Side]:
    cert = ensure_server_cert(tmp_path, "registrar", dns_names=[NAME])
    received: list[Received] = []
    closed: list[Flow] = []
    transport = SipTransport(received.append, on_flow_closed=closed.append)

    def adopt(
        sock: socket.socket, remote: tuple[str, int], local: tuple[str, int], names: tuple[str, ...]
    ) -> None:
        transport.adopt_stream(sock, Kind.TLS, remote, local, names)

    front = TlsFront(
        HOST,
        0,
        cert=cert.cert_path,
        key=cert.key_path,
        workers=2,
        adopt=adopt,
        client_ca=cert.ca_path,
    )
    front.start()
    s = Side(transport, front, cert.ca_path, received, closed)
    try:
        yield s
    finally:
        await front.close()
        await transport.close()


async def _until(check: object, within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_tls_flow_arrives_as_the_clients_own(side: Side) -> None:
    ctx = client_context(side.ca)
    reader, writer = await asyncio.open_connection(
        *side.front.address, ssl=ctx, server_hostname=NAME
    )
    local = writer.get_extra_info("sockname")[:2]
    writer.write(OPTIONS.format(n=1).encode() + b"\r\n\r\n")  # a request, then a ping
    assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\r\n"  # the pong
    await _until(lambda: side.received)
    rx = side.received[0]
    assert rx.kind is Kind.TLS and rx.remote == local and rx.flow.remote == local
    assert rx.flow.local == side.front.address
    # What the SIP process sends on the flow reaches the client through the worker.
    assert side.transport.send(rx.flow, b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == (
        b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"
    )
    # The SIP process closing the flow closes the client's TLS connection.
    side.transport.close_flow(rx.flow)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    await _until(lambda: side.closed)


async def test_the_client_closing_closes_the_flow(side: Side) -> None:
    _reader, writer = await asyncio.open_connection(
        *side.front.address, ssl=client_context(side.ca), server_hostname=NAME
    )
    writer.write(OPTIONS.format(n=2).encode())
    await _until(lambda: side.received)
    writer.close()
    await _until(lambda: side.closed)
    assert side.closed[0] == side.received[0].flow
    assert side.transport.connection_count == 0


def _connect(address: tuple[str, int], ctx: ssl.SSLContext,
             session: ssl.SSLSession | None) -> tuple[ssl.SSLSession | None, bool]:
    with socket.create_connection(address, timeout=5) as raw, ctx.wrap_socket(
        raw, server_hostname=NAME, session=session
    ) as tls:
        return tls.session, tls.session_reused


async def test_sessions_resume_on_any_worker(side: Side) -> None:
    """The workers are forked from one context: a ticket one issued another accepts."""
    ctx = client_context(side.ca)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    session, reused = await asyncio.to_thread(_connect, side.front.address, ctx, None)
    assert session is not None and not reused
    results = [
        await asyncio.to_thread(_connect, side.front.address, ctx, session) for _ in range(8)
    ]
    assert all(reused for _, reused in results)
    await _until(lambda: side.front.adopted == 9)


async def test_a_certificate_for_another_name_is_refused(side: Side) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.open_connection(
            *side.front.address, ssl=client_context(side.ca), server_hostname="other.lab.local"
        )
    assert side.front.adopted == 0


async def test_the_verified_certificate_names_travel_with_the_flow(side: Side) -> None:
    """A peer presenting a certificate from the lab CA (a pool) arrives with its names;
    a client without one arrives with none."""
    peer = LabCA.load(side.ca.parent).issue_server(
        "pool2", pool_fqdn="pool2.lab.local", front_end_fqdns=["fe1.pool2.lab.local"]
    )
    for ctx, names in (
        (client_context(side.ca, cert=peer), ("pool2.lab.local", "fe1.pool2.lab.local")),
        (client_context(side.ca), ()),
    ):
        _reader, writer = await asyncio.open_connection(
            *side.front.address, ssl=ctx, server_hostname=NAME
        )
        writer.write(OPTIONS.format(n=len(side.received)).encode())
        await _until(lambda n=len(side.received): len(side.received) == n + 1)
        assert set(side.received[-1].flow.peer_names) >= set(names)
        assert bool(side.received[-1].flow.peer_names) == bool(names)
        writer.close()


async def test_a_dead_worker_is_replaced(side: Side) -> None:
    """Kill one worker: handshakes go on (on the other), and a new worker appears."""
    await _until(lambda: len(side.front.worker_pids()) == 2)
    before = side.front.worker_pids()
    os.kill(before[0], signal.SIGKILL)
    await _until(
        lambda: len(now := side.front.worker_pids()) == 2 and before[0] not in now, within=10
    )
    ctx = client_context(side.ca)
    for n in range(6):  # both workers, new and old, take connections
        _reader, writer = await asyncio.open_connection(
            *side.front.address, ssl=ctx, server_hostname=NAME
        )
        writer.write(OPTIONS.format(n=100 + n).encode())
        await _until(lambda n=n: len(side.received) == n + 1)
        writer.close()
    assert side.front.adopted == 6
