"""The asyncio transport adapter on real loopback sockets (UDP, TCP, TLS)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from sipmessage import Request, Response

from sipdrill.sip.message import Limits, make_response, parse_message
from sipdrill.sip.tls import LabCA, client_context, ensure_server_cert, server_context
from sipdrill.sip.transport import (
    Flow,
    Kind,
    Received,
    SipTransport,
    TimerDriver,
    TransportError,
    TransportLimits,
)

HOST = "127.0.0.1"


def request(n: int = 1, *, transport: str = "UDP", port: int = 5999, body: bytes = b"") -> bytes:
    return (
        f"OPTIONS sip:lab.local SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} 10.9.9.9:{port};branch=z9hG4bK-{n};rport\r\n"
        f"Max-Forwards: 70\r\n"
        f"From: <sip:alice@lab.local>;tag=a{n}\r\n"
        f"To: <sip:lab.local>\r\n"
        f"Call-ID: call-{n}\r\n"
        f"CSeq: {n} OPTIONS\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class Echo:
    """A handler that answers every request with 200 on the flow it came from."""

    def __init__(self) -> None:
        self.transport: SipTransport | None = None
        self.received: list[Received] = []

    def __call__(self, rx: Received) -> None:
        self.received.append(rx)
        assert self.transport is not None
        if isinstance(rx.message, Request):
            self.transport.send(rx.flow, make_response(rx.message, 200))


async def make_server(
    limits: TransportLimits | None = None, tls_dir: Path | None = None
) -> tuple[SipTransport, Echo, dict[Kind, int]]:
    echo = Echo()
    transport = SipTransport(echo, limits=limits)
    echo.transport = transport
    ports: dict[Kind, int] = {}
    ports[Kind.UDP] = (await transport.listen(Kind.UDP, HOST, 0))[1]
    ports[Kind.TCP] = (await transport.listen(Kind.TCP, HOST, 0))[1]
    if tls_dir is not None:
        cert = ensure_server_cert(
            tls_dir, "fe", dns_names=["pool1.lab.local", "fe1.lab.local"], ip_addresses=[HOST]
        )
        ports[Kind.TLS] = (
            await transport.listen(Kind.TLS, HOST, 0, ssl_context=server_context(cert))
        )[1]
    return transport, echo, ports


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[SipTransport, Echo, dict[Kind, int]]]:
    transport, echo, ports = await make_server(tls_dir=tmp_path)
    try:
        yield transport, echo, ports
    finally:
        await transport.close()


async def read_message(reader: asyncio.StreamReader) -> Response:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    message = parse_message(head)
    assert isinstance(message, Response)
    length = int(message.headers.get("Content-Length") or 0)
    if length:
        message.body = await reader.readexactly(length)
    return message


async def read_eof(reader: asyncio.StreamReader, within: float) -> bytes:
    """Everything until the server closes; fails if it does not within ``within`` s."""
    return await asyncio.wait_for(reader.read(), within)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


async def eventually(condition: Callable[[], bool], within: float = 3.0) -> None:
    for _ in range(int(within / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def udp_exchange(port: int, data: bytes, within: float = 2.0) -> bytes:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        sock.bind((HOST, 0))
        await loop.sock_sendto(sock, data, (HOST, port))
        return await asyncio.wait_for(loop.sock_recv(sock, 65535), within)
    finally:
        sock.close()


async def test_udp_request_answered_on_its_flow_with_received_and_rport(server) -> None:
    _transport, echo, ports = server
    answer = parse_message(await udp_exchange(ports[Kind.UDP], request(1)))
    assert isinstance(answer, Response) and answer.code == 200
    via = answer.headers.getlist("Via")[0]
    assert ";received=127.0.0.1" in via and ";rport=" in via and "branch=z9hG4bK-1" in via
    (rx,) = echo.received
    assert rx.kind is Kind.UDP and rx.flow.kind is Kind.UDP
    assert rx.remote == rx.flow.remote and rx.remote[0] == HOST
    assert rx.flow.local == (HOST, ports[Kind.UDP])


async def test_udp_garbage_dropped_and_bad_request_answered(server) -> None:
    transport, echo, ports = server
    bad = request(2).replace(b"CSeq: 2 OPTIONS", b"CSeq: 2 REGISTER")
    answer = parse_message(await udp_exchange(ports[Kind.UDP], bad))
    assert isinstance(answer, Response) and answer.code == 400
    with pytest.raises(TimeoutError):
        await udp_exchange(ports[Kind.UDP], b"\x00\xffnot sip at all", within=0.3)
    assert echo.received == []
    assert transport.stats["parse_errors"] == 2
    # The socket still serves.
    good = parse_message(await udp_exchange(ports[Kind.UDP], request(3)))
    assert isinstance(good, Response) and good.code == 200


async def test_udp_oversized_gets_513() -> None:
    transport, _, ports = await make_server(TransportLimits(message=Limits(max_message_size=2000)))
    try:
        answer = parse_message(await udp_exchange(ports[Kind.UDP], request(4, body=b"x" * 3000)))
        assert isinstance(answer, Response) and answer.code == 513
    finally:
        await transport.close()


async def test_tcp_pipelined_messages_and_keepalive_ping(server) -> None:
    _transport, echo, ports = server
    reader, writer = await asyncio.open_connection(HOST, ports[Kind.TCP])
    try:
        writer.write(request(1, transport="TCP") + b"\r\n\r\n" + request(2, transport="TCP"))
        first = await read_message(reader)
        # The pong (CRLF) comes between the two responses.
        assert await reader.readexactly(2) == b"\r\n"
        second = await read_message(reader)
        assert (first.code, first.headers["CSeq"]) == (200, "1 OPTIONS")
        assert (second.code, second.headers["CSeq"]) == (200, "2 OPTIONS")
        assert {rx.flow for rx in echo.received} == {echo.received[0].flow}
        assert echo.received[0].kind is Kind.TCP
    finally:
        await close(writer)


async def test_tcp_garbage_gets_400_then_disconnect(server) -> None:
    _transport, echo, ports = server
    reader, writer = await asyncio.open_connection(HOST, ports[Kind.TCP])
    try:
        bad = request(5, transport="TCP").replace(b"Max-Forwards: 70", b"Max-Forwards: lots")
        writer.write(bad)
        rest = await read_eof(reader, 2.0)
        answer = parse_message(rest)
        assert isinstance(answer, Response) and answer.code == 400
        assert echo.received == []
    finally:
        await close(writer)


async def test_tcp_unframeable_garbage_disconnects_without_answer(server) -> None:
    _transport, _echo, ports = server
    reader, writer = await asyncio.open_connection(HOST, ports[Kind.TCP])
    try:
        writer.write(b"HELLO\r\nthis is not sip\r\n\r\n")
        assert await read_eof(reader, 2.0) == b""
    finally:
        await close(writer)


async def test_tcp_oversized_gets_513_then_disconnect() -> None:
    transport, _, ports = await make_server(TransportLimits(message=Limits(max_message_size=4000)))
    reader, writer = await asyncio.open_connection(HOST, ports[Kind.TCP])
    try:
        head = request(6, transport="TCP").replace(b"Content-Length: 0", b"Content-Length: 100000")
        writer.write(head)
        answer = parse_message(await read_eof(reader, 2.0))
        assert isinstance(answer, Response) and answer.code == 513
    finally:
        await close(writer)
        await transport.close()


async def test_stalled_client_disconnected_while_others_are_served() -> None:
    limits = TransportLimits(partial_timeout=0.4, idle_timeout=30)
    transport, _, ports = await make_server(limits)
    loop = asyncio.get_running_loop()
    staller_r, staller_w = await asyncio.open_connection(HOST, ports[Kind.TCP])
    good_r, good_w = await asyncio.open_connection(HOST, ports[Kind.TCP])
    try:
        started = loop.time()
        staller_w.write(request(7, transport="TCP")[:40])
        # Meanwhile another client is served promptly, several times.
        for n in range(3):
            good_w.write(request(10 + n, transport="TCP"))
            assert (await read_message(good_r)).code == 200
        assert await read_eof(staller_r, 3.0) == b""
        elapsed = loop.time() - started
        assert 0.3 <= elapsed < 2.5
        assert transport.stats["stalled"] == 1
        good_w.write(request(20, transport="TCP"))
        assert (await read_message(good_r)).code == 200
    finally:
        await close(staller_w)
        await close(good_w)
        await transport.close()


async def test_idle_client_disconnected() -> None:
    transport, _, ports = await make_server(TransportLimits(idle_timeout=0.3, partial_timeout=5))
    reader, writer = await asyncio.open_connection(HOST, ports[Kind.TCP])
    try:
        assert await read_eof(reader, 3.0) == b""
        assert transport.stats["idle_closed"] == 1
    finally:
        await close(writer)
        await transport.close()


async def test_connection_cap() -> None:
    transport, _, ports = await make_server(TransportLimits(max_connections=2))
    conns = [await asyncio.open_connection(HOST, ports[Kind.TCP]) for _ in range(3)]
    try:
        # The third is closed by the server at once; the first two are served.
        assert await read_eof(conns[2][0], 2.0) == b""
        for n, (reader, writer) in enumerate(conns[:2]):
            writer.write(request(30 + n, transport="TCP"))
            assert (await read_message(reader)).code == 200
        assert transport.connection_count == 2
        assert transport.stats["refused_connections"] == 1
    finally:
        for _, writer in conns:
            await close(writer)
        await transport.close()


async def open_tls(client: SipTransport, ports: dict[Kind, int], ca_dir: Path) -> Flow:
    """A verified TLS flow to the test server's TLS listener, by the pool's name."""
    ctx = client_context(ca_dir / "ca.pem")
    return await client.open_flow(
        Kind.TLS, HOST, ports[Kind.TLS], ssl_context=ctx, server_hostname="pool1.lab.local"
    )


async def test_tls_client_verifies_and_reuses_flow(server, tmp_path: Path) -> None:
    _, echo, ports = server
    responses: list[Received] = []
    client = SipTransport(responses.append)
    try:
        flow = await open_tls(client, ports, tmp_path)
        again = await open_tls(client, ports, tmp_path)
        assert again == flow and flow.kind is Kind.TLS
        assert client.send(flow, request(40, transport="TLS"))
        assert client.send(flow, request(41, transport="TLS"))
        await eventually(lambda: len(responses) >= 2)
        assert [r.message.code for r in responses] == [200, 200]  # type: ignore[union-attr]
        assert {r.flow for r in responses} == {flow}
        assert len({rx.flow for rx in echo.received}) == 1
        assert echo.received[0].kind is Kind.TLS
    finally:
        await client.close()


async def test_tls_flows_carry_the_certificate_names_each_side_verified(tmp_path: Path) -> None:
    ca = LabCA.ensure(tmp_path / "lab")
    server_cert = ca.issue_server("fe", pool_fqdn="pool1.lab.local", ip_addresses=[HOST])
    peer_cert = ca.issue_server(
        "peer", pool_fqdn="pool2.lab.local", front_end_fqdns=["Fe1.Pool2.Lab.Local"]
    )
    echo = Echo()
    server = SipTransport(echo)
    echo.transport = server
    mtls = server_context(server_cert, client_ca=ca.ca_path, client_cert_required=False)
    tls_port = (await server.listen(Kind.TLS, HOST, 0, ssl_context=mtls))[1]
    tcp_port = (await server.listen(Kind.TCP, HOST, 0))[1]
    client = SipTransport(lambda rx: None)
    try:
        # A peer with a certificate: each side sees the other's verified names.
        flow = await client.open_flow(
            Kind.TLS, HOST, tls_port, ssl_context=client_context(ca, cert=peer_cert),
            server_hostname="pool1.lab.local",
        )
        assert flow.peer_names == ("pool1.lab.local",)
        assert client.send(flow, request(50, transport="TLS"))
        # A client without one (the lab's clients), and plain TCP: no names.
        bare = await client.open_flow(
            Kind.TLS, HOST, tls_port, ssl_context=client_context(ca), reuse=False,
            server_hostname="pool1.lab.local",
        )
        assert client.send(bare, request(51, transport="TLS"))
        tcp = await client.open_flow(Kind.TCP, HOST, tcp_port)
        assert tcp.peer_names == ()
        assert client.send(tcp, request(52, transport="TCP"))
        await eventually(lambda: len(echo.received) == 3)
        names = {rx.message.call_id: rx.flow.peer_names for rx in echo.received}
        assert names == {
            "call-50": ("pool2.lab.local", "fe1.pool2.lab.local"),
            "call-51": (),
            "call-52": (),
        }
    finally:
        await client.close()
        await server.close()


async def test_tls_client_certificate_from_another_ca_fails_the_handshake(
    tmp_path: Path,
) -> None:
    ca = LabCA.ensure(tmp_path / "lab")
    server_cert = ca.issue_server("fe", pool_fqdn="pool1.lab.local")
    forged = LabCA.ensure(tmp_path / "other").issue_server("peer", pool_fqdn="pool2.lab.local")
    echo = Echo()
    server = SipTransport(echo)
    echo.transport = server
    mtls = server_context(server_cert, client_ca=ca.ca_path, client_cert_required=False)
    port = (await server.listen(Kind.TLS, HOST, 0, ssl_context=mtls))[1]
    client = SipTransport(lambda rx: None)
    try:
        # Under TLS 1.3 the client has finished its side of the handshake
        # when the server rejects its certificate: the refusal shows as the
        # connection closing, and nothing it sent is ever delivered.
        try:
            flow = await client.open_flow(
                Kind.TLS, HOST, port, ssl_context=client_context(ca, cert=forged),
                server_hostname="pool1.lab.local",
            )
        except TransportError:
            pass
        else:
            client.send(flow, request(60, transport="TLS"))
            await eventually(lambda: not client.is_open(flow))
        await asyncio.sleep(0.2)
        assert echo.received == []
        assert server.connection_count == 0
    finally:
        await client.close()
        await server.close()


async def test_tls_wrong_name_fails_verification(server, tmp_path: Path) -> None:
    _, _echo, ports = server
    client = SipTransport(lambda rx: None)
    try:
        with pytest.raises(TransportError, match="certificate rejected"):
            await client.open_flow(
                Kind.TLS,
                HOST,
                ports[Kind.TLS],
                ssl_context=client_context(tmp_path / "ca.pem"),
                server_hostname="sip.lab.local",
            )
        assert client.connection_count == 0
    finally:
        await client.close()


async def test_server_reaches_client_back_over_the_accepted_connection(server) -> None:
    transport, echo, ports = server
    got: list[Received] = []
    client = SipTransport(got.append)
    try:
        flow = await client.open_flow(Kind.TCP, HOST, ports[Kind.TCP])
        client.send(flow, request(50, transport="TCP"))
        await eventually(lambda: bool(echo.received and got))
        inbound = echo.received[0].flow
        # A request from the server to the client's address reuses that flow.
        reused = await transport.open_flow(Kind.TCP, *inbound.remote)
        assert reused == inbound
        assert transport.connection_count == 1
    finally:
        await client.close()


async def test_connect_failure_is_a_transport_error() -> None:
    sock = socket.socket()
    sock.bind((HOST, 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    client = SipTransport(lambda rx: None)
    try:
        with pytest.raises(TransportError):
            await client.open_flow(Kind.TCP, HOST, port)
        # Sending on a flow that never existed is False, not an exception.
        assert not client.send(Flow(Kind.TCP, (HOST, 1), (HOST, port), 999), b"x")
    finally:
        await client.close()


async def test_handler_errors_do_not_escape(server) -> None:
    transport, echo, ports = server

    def broken(rx: Received) -> None:
        raise RuntimeError("boom")

    transport.handler = broken
    reader, writer = await asyncio.open_connection(HOST, ports[Kind.TCP])
    try:
        writer.write(request(60, transport="TCP"))
        await asyncio.sleep(0.2)
        transport.handler = echo
        writer.write(request(61, transport="TCP"))
        assert (await read_message(reader)).headers["CSeq"] == "61 OPTIONS"
        assert transport.stats["handler_errors"] == 1
    finally:
        await close(writer)


class FakeCore:
    def __init__(self, deadlines: list[float]) -> None:
        self.deadlines = deadlines
        self.fired: list[float] = []

    def next_deadline(self) -> float | None:
        return self.deadlines[0] if self.deadlines else None

    def handle_timer(self, now: float) -> list[float]:
        due = [d for d in self.deadlines if d <= now]
        self.deadlines = [d for d in self.deadlines if d > now]
        self.fired.append(now)
        return due


async def test_timer_driver_calls_the_core_at_its_deadlines() -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    core = FakeCore([t0 + 0.05, t0 + 0.15])
    outputs: list[object] = []
    driver = TimerDriver(core, outputs.append)
    driver.poke()
    await asyncio.sleep(0.3)
    assert len(core.fired) == 2
    assert core.fired[0] >= t0 + 0.05 and core.fired[1] >= t0 + 0.15
    assert outputs == [[t0 + 0.05], [t0 + 0.15]]
    # An earlier deadline added later is honoured after a poke.
    core.deadlines = [loop.time() + 10, loop.time() + 0.05]
    core.deadlines.sort()
    driver.poke()
    await asyncio.sleep(0.15)
    assert len(core.fired) == 3
    driver.stop()


async def test_tls_reuse_only_for_the_name_the_certificate_was_checked_for(
    server, tmp_path: Path
) -> None:
    _, _, ports = server
    client = SipTransport(lambda rx: None)
    try:
        ctx = client_context(tmp_path / "ca.pem")
        port = ports[Kind.TLS]
        pool = await client.open_flow(
            Kind.TLS, HOST, port, ssl_context=ctx, server_hostname="pool1.lab.local"
        )
        fe = await client.open_flow(
            Kind.TLS, HOST, port, ssl_context=ctx, server_hostname="fe1.lab.local"
        )
        assert pool != fe and client.connection_count == 2
        again = await client.open_flow(
            Kind.TLS, HOST, port, ssl_context=ctx, server_hostname="fe1.lab.local"
        )
        assert again == fe
        # An open connection to the same address does not vouch for another name.
        with pytest.raises(TransportError, match="certificate rejected"):
            await client.open_flow(
                Kind.TLS, HOST, port, ssl_context=ctx, server_hostname="sip.lab.local"
            )
    finally:
        await client.close()


async def test_busy_stream_whose_reads_end_mid_message_is_not_a_stall() -> None:
    limits = TransportLimits(partial_timeout=0.3, idle_timeout=30)
    transport, _echo, ports = await make_server(limits)
    reader, writer = await asyncio.open_connection(HOST, ports[Kind.TCP])
    try:
        loop = asyncio.get_running_loop()
        stream = b"".join(request(100 + n, transport="TCP") for n in range(40))
        # Always a partial message in flight, for 4x the partial timeout,
        # but every write completes the previous message.
        chunk = len(stream) // 40 + 7
        started = loop.time()
        for offset in range(0, len(stream), chunk):
            writer.write(stream[offset : offset + chunk])
            # ~40 writes x 50 ms = 2 s, well past 4x the partial timeout even on
            # an idle machine (30 ms gave 1.19 s: a tie with the 1.2 s bound).
            await asyncio.sleep(0.05)
        assert loop.time() - started > 4 * limits.partial_timeout
        for _ in range(40):
            assert (await read_message(reader)).code == 200
        assert transport.stats["stalled"] == 0
    finally:
        await close(writer)
        await transport.close()


async def test_idle_timeout_applies_to_accepted_flows_only(server) -> None:
    _, _, ports = server
    client = SipTransport(lambda rx: None, limits=TransportLimits(idle_timeout=0.2))
    try:
        flow = await client.open_flow(Kind.TCP, HOST, ports[Kind.TCP])
        await asyncio.sleep(0.6)
        assert client.is_open(flow)
    finally:
        await client.close()


async def test_tls_flows_read_into_16_kib_not_asyncios_256(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """10,000 TLS flows on a pool cost 2.8 GB with asyncio's 256 KiB read buffers."""
    import asyncio.sslproto

    monkeypatch.setattr(asyncio.sslproto.SSLProtocol, "max_size", 256 * 1024)
    transport, echo, ports = await make_server(tls_dir=tmp_path)
    responses: list[Received] = []
    client = SipTransport(responses.append)
    try:
        flow = await open_tls(client, ports, tmp_path)
        body = b"x" * 40_000  # bigger than the buffer: read in several calls
        assert client.send(flow, request(42, transport="TLS", body=body))
        await eventually(lambda: len(responses) >= 1)
        assert echo.received[0].message.body == body
        # asyncio internals, read on purpose: the buffer each side allocated.
        streams = [*transport._streams.values(), *client._streams.values()]
        assert len(streams) == 2
        for stream in streams:
            assert stream.transport is not None
            assert len(stream.transport._ssl_protocol._ssl_buffer) == 16 * 1024
    finally:
        await client.close()
        await transport.close()
