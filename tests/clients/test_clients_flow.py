"""StreamFlow (sipdrill.clients.flow) against real loopback servers: TLS over memory BIOs."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from clients_lab import wait_for

from sipdrill.clients.events import Failure
from sipdrill.clients.flow import BIO_CHUNK, StreamFlow, open_stream
from sipdrill.clients.runner import classify_connect_error
from sipdrill.sip.message import Message
from sipdrill.sip.tls import LabCA, client_context, server_context
from sipdrill.sip.transport import Kind, TransportError

HOST = "127.0.0.1"
NAME = "pool1.lab.local"


class Sink:
    def __init__(self) -> None:
        self.stats: Counter[str] = Counter()
        self.messages: list[Message] = []
        self.pongs = 0
        self.closed: list[StreamFlow] = []

    def flow_message(self, flow: StreamFlow, message: Message) -> None:
        self.messages.append(message)

    def flow_pong(self, flow: StreamFlow) -> None:
        self.pongs += 1

    def flow_closed(self, flow: StreamFlow) -> None:
        self.closed.append(flow)


class Peer(asyncio.Protocol):
    """A server side: answers CRLFCRLF with CRLF, records what it got."""

    def __init__(self, peers: list[Peer]) -> None:
        self.peers = peers
        self.data = b""
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peers.append(self)

    def data_received(self, data: bytes) -> None:
        self.data += data
        if data.endswith(b"\r\n\r\n") and self.transport is not None:
            self.transport.write(b"\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


@asynccontextmanager
async def server(
    ctx: ssl.SSLContext | None, factory: Callable[[list[Peer]], asyncio.Protocol] = Peer
) -> AsyncIterator[tuple[int, list[Peer]]]:
    peers: list[Peer] = []
    srv = await asyncio.get_running_loop().create_server(lambda: factory(peers), HOST, 0, ssl=ctx)
    try:
        yield srv.sockets[0].getsockname()[1], peers
    finally:
        srv.close()
        for peer in peers:
            if peer.transport is not None:
                peer.transport.abort()
        await srv.wait_closed()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LabCA:
    return LabCA.ensure(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def server_ctx(ca: LabCA) -> ssl.SSLContext:
    return server_context(ca.issue_server("pool1", pool_fqdn=NAME, ip_addresses=[HOST]))


def response(body: bytes = b"") -> bytes:
    head = (
        "SIP/2.0 200 OK\r\n"
        "Via: SIP/2.0/TLS 127.0.0.1:5061;branch=z9hG4bK1\r\n"
        "From: <sip:alice@lab.local>;tag=a\r\n"
        "To: <sip:alice@lab.local>;tag=b\r\n"
        "Call-ID: c1\r\n"
        "CSeq: 1 REGISTER\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@pytest.mark.parametrize("tls_max", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_tls_handshake_message_ping_pong_and_peer_close(
    ca: LabCA, server_ctx: ssl.SSLContext, tls_max: ssl.TLSVersion
) -> None:
    sink = Sink()
    ctx = client_context(ca)
    ctx.maximum_version = tls_max
    async with server(server_ctx) as (port, peers):
        flow = await open_stream(sink, Kind.TLS, HOST, port, ssl_context=ctx, server_hostname=NAME)
        assert flow.open and flow.remote == (HOST, port) and flow.local[0] == HOST
        await wait_for(lambda: len(peers) == 1, 5, "len(peers) == 1")
        assert flow.ping()
        await wait_for(lambda: sink.pongs == 1, 5, "sink.pongs == 1")
        assert peers[0].data == b"\r\n\r\n"
        # A message larger than one BIO chunk arrives whole.
        body = b"x" * (3 * BIO_CHUNK)
        assert peers[0].transport is not None
        peers[0].transport.write(response(body) + response())
        await wait_for(lambda: len(sink.messages) == 2, 5, "len(sink.messages) == 2")
        assert sink.messages[0].body == body
        assert sink.stats["received"] == 2
        assert flow.send(b"OPTIONS sip:x SIP/2.0\r\n\r\n")
        await wait_for(lambda: peers[0].data.endswith(b"SIP/2.0\r\n\r\n"), 5, "OPTIONS sent")
        # The pool closes the connection (close_notify, then FIN): the flow says so once.
        peers[0].transport.close()
        await wait_for(lambda: sink.closed == [flow], 5, "sink.closed == [flow]")
        assert not flow.open and not flow.send(b"\r\n\r\n") and not flow.ping()


async def test_abrupt_close_is_detected(ca: LabCA, server_ctx: ssl.SSLContext) -> None:
    sink = Sink()
    async with server(server_ctx) as (port, peers):
        flow = await open_stream(
            sink, Kind.TLS, HOST, port, ssl_context=client_context(ca), server_hostname=NAME
        )
        # The server's side of the handshake ends after the client's.
        await wait_for(lambda: len(peers) == 1, 5, "len(peers) == 1")
        assert peers[0].transport is not None
        peers[0].transport.abort()  # RST, no close_notify
        await wait_for(lambda: sink.closed == [flow], 5, "sink.closed == [flow]")


async def test_close_by_the_owner_sends_close_notify_and_reports(
    ca: LabCA, server_ctx: ssl.SSLContext
) -> None:
    sink = Sink()
    async with server(server_ctx) as (port, peers):
        flow = await open_stream(
            sink, Kind.TLS, HOST, port, ssl_context=client_context(ca), server_hostname=NAME
        )
        await wait_for(lambda: len(peers) == 1, 5, "len(peers) == 1")
        flow.close()
        await asyncio.wait_for(peers[0].lost, 5)
        await wait_for(lambda: sink.closed == [flow], 5, "sink.closed == [flow]")


@pytest.mark.parametrize(
    ("trust", "name", "expect"),
    [("other-ca", NAME, "certificate rejected"), ("lab-ca", "pool9.lab.local", "certificate")],
)
async def test_verification_failure_is_a_tls_failure_not_a_crash(
    ca: LabCA,
    server_ctx: ssl.SSLContext,
    tmp_path: Path,
    trust: str,
    name: str,
    expect: str,
) -> None:
    other = LabCA.ensure(tmp_path / "other")
    sink = Sink()
    ctx = client_context(other if trust == "other-ca" else ca)
    async with server(server_ctx) as (port, _peers):
        with pytest.raises(TransportError) as info:
            await open_stream(sink, Kind.TLS, HOST, port, ssl_context=ctx, server_hostname=name)
    assert expect in str(info.value)
    assert classify_connect_error(info.value) is Failure.TLS
    assert sink.closed == []  # never open, so never "closed"


async def test_refused_and_handshake_timeout(ca: LabCA) -> None:
    sink = Sink()
    async with server(None) as (port, _peers):  # plain TCP: accepts, never speaks TLS
        with pytest.raises(TransportError) as info:
            await open_stream(
                sink,
                Kind.TLS,
                HOST,
                port,
                ssl_context=client_context(ca),
                server_hostname=NAME,
                handshake_timeout=0.3,
            )
        assert classify_connect_error(info.value) is Failure.CONNECT_TIMEOUT
    with pytest.raises(TransportError) as info:
        await open_stream(sink, Kind.TLS, HOST, port, ssl_context=client_context(ca))
    assert classify_connect_error(info.value) is Failure.REFUSED


async def test_a_connect_not_done_at_once_sends_its_hello_when_it_is(
    ca: LabCA, server_ctx: ssl.SSLContext
) -> None:
    # A full accept queue drops our SYN, so the connect is still in progress
    # when connect() returns (on loopback it never is otherwise): the ClientHello
    # must wait for the connect, then go exactly once.
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = socket.create_connection((HOST, port))
    sink = Sink()
    connecting = asyncio.create_task(
        open_stream(
            sink, Kind.TLS, HOST, port, ssl_context=client_context(ca), server_hostname=NAME
        )
    )
    peers: list[Peer] = []
    try:
        await asyncio.sleep(0.3)
        assert not connecting.done()
        listener.setblocking(False)
        # create_server listens again with room: the client's SYN retry gets in.
        srv = await asyncio.get_running_loop().create_server(
            lambda: Peer(peers), sock=listener, ssl=server_ctx
        )
        flow = await asyncio.wait_for(connecting, 8)
        assert flow.open and flow.remote == (HOST, port)
        assert flow.ping()
        await wait_for(lambda: sink.pongs == 1, 2, "the pong")
        flow.abort()
        srv.close()
        for peer in peers:
            if peer.transport is not None:
                peer.transport.abort()
        await srv.wait_closed()
    finally:
        connecting.cancel()
        filler.close()
        listener.close()


async def test_a_tls_connect_without_a_context_fails_without_a_socket() -> None:
    with pytest.raises(TransportError) as info:
        await open_stream(Sink(), Kind.TLS, HOST, 5061)  # nothing listens: never dialled
    assert "no TLS context (--ca)" in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)


async def test_tcp_flow_and_framing_error_closes(ca: LabCA) -> None:
    sink = Sink()
    async with server(None) as (port, peers):
        flow = await open_stream(sink, Kind.TCP, HOST, port)
        assert flow.ping()
        await wait_for(lambda: sink.pongs == 1, 5, "sink.pongs == 1")
        assert peers[0].transport is not None
        peers[0].transport.write(response())
        await wait_for(lambda: len(sink.messages) == 1, 5, "len(sink.messages) == 1")
        peers[0].transport.write(b"SIP/2.0 200 OK\r\nContent-Length: nope\r\n\r\n")
        await wait_for(lambda: sink.closed == [flow], 5, "sink.closed == [flow]")
        assert sink.stats["framing_errors"] == 1


async def test_unreadable_request_is_answered_then_closed_and_bad_response_dropped() -> None:
    """The pool's transport rules, on a client flow: 400 back for a request it
    cannot read, then close; a malformed response is dropped and the flow stays."""
    sink = Sink()
    async with server(None) as (port, peers):
        flow = await open_stream(sink, Kind.TCP, HOST, port)
        await wait_for(lambda: bool(peers), 5, "a peer")
        assert peers[0].transport is not None
        peers[0].transport.write(response().replace(b"CSeq: 1 REGISTER\r\n", b""))
        peers[0].transport.write(response())
        await wait_for(lambda: len(sink.messages) == 1, 5, "len(sink.messages) == 1")
        assert sink.stats["parse_errors"] == 1 and flow.open
        notify = (
            b"NOTIFY sip:alice@127.0.0.1 SIP/2.0\r\n"
            b"Via: SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKn1\r\n"
            b"From: <sip:pool@lab.local>;tag=p\r\nTo: <sip:alice@lab.local>;tag=a\r\n"
            b"Call-ID: n1\r\nCSeq: 1 NOTIFY\r\nMax-Forwards: many\r\nContent-Length: 0\r\n\r\n"
        )
        peers[0].transport.write(notify)
        await wait_for(lambda: sink.closed == [flow], 5, "sink.closed == [flow]")
        await wait_for(lambda: b"SIP/2.0 400" in peers[0].data, 5, "a 400 back")
    assert sink.stats["parse_errors"] == 2
    assert b"SIP/2.0 400 Bad Max-Forwards" in peers[0].data


class Slow(Peer):
    """Reads nothing until told to: the client's socket buffer fills up."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.pause_reading()


async def test_unsent_bytes_are_kept_in_order_flushed_on_close_and_bounded() -> None:
    sink = Sink()
    async with server(None, Slow) as (port, peers):
        flow = await open_stream(sink, Kind.TCP, HOST, port, max_write_buffer=1 << 20)
        await wait_for(lambda: len(peers) == 1, 5, "accepted")
        chunk = bytes(range(256)) * 64  # 16 KiB
        sent = 0
        while flow._wbuf is None:  # until the kernel stops taking bytes
            assert flow.send(chunk)
            sent += len(chunk)
        for _ in range(4):
            assert flow.send(chunk)
            sent += len(chunk)
        flow.close()  # with bytes still buffered: they go first
        assert not flow.closed and not flow.send(chunk)
        assert peers[0].transport is not None
        peers[0].transport.resume_reading()
        await asyncio.wait_for(peers[0].lost, 10)
        assert len(peers[0].data) == sent and peers[0].data == chunk * (sent // len(chunk))
        await wait_for(lambda: sink.closed == [flow], 5, "closed")

        # A peer that never reads: past max_write_buffer the flow gives up.
        flow = await open_stream(sink, Kind.TCP, HOST, port, max_write_buffer=64 * 1024)
        while flow.send(chunk):
            pass
        assert flow.closed
        await wait_for(lambda: sink.closed[-1] is flow, 5, "closed")


async def test_flows_share_the_bios_without_crossing(ca: LabCA, server_ctx: ssl.SSLContext) -> None:
    """Every flow of a thread writes into one pair of memory BIOs: a flow whose peer
    sends garbage mid-record, or closes, leaves nothing there for the next flow."""
    sink = Sink()
    ctx = client_context(ca)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    async with server(server_ctx) as (port, peers):
        flows = [
            await open_stream(sink, Kind.TLS, HOST, port, ssl_context=ctx, server_hostname=NAME)
            for _ in range(3)
        ]
        await wait_for(lambda: len(peers) == 3, 5, "three peers")
        # Peer 0 sends a record that does not decrypt and more after it in one write
        # (flow 0 fails with bytes left unread); peers 1 and 2 then send messages
        # larger than a BIO chunk in one write each.
        body = b"y" * (2 * BIO_CHUNK + 7)
        peer_of = {p.transport.get_extra_info("peername"): p for p in peers}  # type: ignore[union-attr]
        by_flow = [peer_of[f.local] for f in flows]
        assert by_flow[0].transport is not None
        by_flow[0].transport.write(response())
        await wait_for(lambda: len(sink.messages) == 1, 5, "the first message")
        raw = by_flow[0].transport.get_extra_info("socket")
        assert raw is not None
        bogus = b"\x17\x03\x03\x00\x40" + b"\x00" * 0x40
        os.write(raw.fileno(), bogus + bogus[:30])
        await wait_for(lambda: flows[0].closed, 5, "flow 0 given up")
        assert sink.stats["tls_errors"] == 1
        for peer in by_flow[1:]:
            assert peer.transport is not None
            peer.transport.write(response(body))
        await wait_for(lambda: len(sink.messages) == 3, 5, "both large messages")
        assert [m.body for m in sink.messages[1:]] == [body, body]
        assert flows[1].send(b"\r\n\r\n") and flows[2].send(b"\r\n\r\n")
        await wait_for(lambda: sink.pongs == 2, 5, "two pongs")
        # Flow 1's peer closes; flow 2 carries on.
        assert by_flow[1].transport is not None
        by_flow[1].transport.close()
        await wait_for(lambda: flows[1] in sink.closed, 5, "flow 1 closed")
        assert by_flow[2].transport is not None
        by_flow[2].transport.write(response(b"z"))
        await wait_for(lambda: len(sink.messages) == 4, 5, "flow 2's message")
        assert sink.messages[3].body == b"z" and sink.stats["tls_errors"] == 1
        for flow in flows:
            flow.abort()


@pytest.mark.parametrize("same_context", [True, False])
async def test_a_session_offered_again_is_resumed_by_the_server_that_issued_it(
    ca: LabCA, server_ctx: ssl.SSLContext, same_context: bool
) -> None:
    """A server with another ticket key (another pool) does a full handshake instead."""
    sink = Sink()
    ctx = client_context(ca)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    other = server_context(ca.issue_server("pool1", pool_fqdn=NAME, ip_addresses=[HOST]))
    async with server(server_ctx) as (port, _peers):
        first = await open_stream(sink, Kind.TLS, HOST, port, ssl_context=ctx, server_hostname=NAME)
        session = first.session
        assert session is not None and not first.session_reused
        assert first.server_hostname == NAME
        first.close()
    async with server(server_ctx if same_context else other) as (port, _peers):
        again = await open_stream(
            sink, Kind.TLS, HOST, port, ssl_context=ctx, server_hostname=NAME, session=session
        )
        assert again.session_reused is same_context
        again.close()
