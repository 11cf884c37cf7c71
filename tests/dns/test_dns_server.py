"""The asyncio adapter on real sockets (127.0.0.1 only)."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator

import dns.flags
import dns.message
import dns.rcode
import pytest
from dns_clients import tcp, udp, udp_query

from sipdrill.dns.core import DnsCore
from sipdrill.dns.errors import ConfigError
from sipdrill.dns.server import BATCH_IO, DnsServer
from sipdrill.dns.zone import RecordChange

SRV = "_sipinternaltls._tcp.lab.local"


@pytest.fixture(params=["batched", "one-by-one"])
async def server(core: DnsCore, request: pytest.FixtureRequest) -> AsyncIterator[DnsServer]:
    """Each test twice: UDP through recvmmsg/sendmmsg (sipdrill_mmsg, when
    installed) and through recvfrom/sendto, the fallback."""
    if request.param == "batched" and not BATCH_IO:
        pytest.skip("sipdrill_mmsg is not installed (pip install ext/mmsg)")
    srv = DnsServer(
        core,
        [("127.0.0.1", 0)],
        tcp_idle_timeout=5.0,
        tcp_read_timeout=0.5,
        tcp_write_timeout=1.0,
        tcp_max_connections=8,
        tcp_max_message=4096,
        batch_io=request.param == "batched",
    )
    await srv.start()
    assert srv._udp[0].batched == (request.param == "batched")
    try:
        yield srv
    finally:
        await srv.close()


def _addr(server: DnsServer) -> tuple[str, int]:
    return server.addresses[0]


async def test_udp_and_tcp_on_the_same_port(server: DnsServer) -> None:
    host, port = _addr(server)
    assert host == "127.0.0.1" and port > 0
    r = await udp_query((host, port), dns.message.make_query(SRV, "SRV"))
    assert r.rcode() == dns.rcode.NOERROR and len(r.answer[0]) == 2
    async with tcp((host, port)) as client:
        r = await client.query(dns.message.make_query(SRV, "SRV"))
        assert r.flags & dns.flags.AA and len(r.answer[0]) == 2


async def test_large_answer_truncated_over_udp_and_whole_over_tcp(
    server: DnsServer, core: DnsCore
) -> None:
    core.zone.apply([RecordChange("add", "big", "A", tuple(f"10.0.{i}.1" for i in range(100)))])
    q = dns.message.make_query("big.lab.local", "A", use_edns=0, payload=1232)
    r = await udp_query(_addr(server), q)
    assert r.flags & dns.flags.TC and r.answer == []
    async with tcp(_addr(server)) as client:
        r = await client.query(q)
    assert not r.flags & dns.flags.TC and len(r.answer[0]) == 100


async def test_tcp_pipelined_queries_are_answered_in_order(server: DnsServer) -> None:
    queries = [
        dns.message.make_query(n, "A")
        for n in ("sip.lab.local", "nope.lab.local", "pool2.lab.local")
    ]
    async with tcp(_addr(server)) as client:
        await client.send(
            b"".join(len(w).to_bytes(2, "big") + w for w in (q.to_wire() for q in queries)),
            prefix=False,
        )
        answers = [dns.message.from_wire(await client.receive()) for _ in queries]
    assert [a.id for a in answers] == [q.id for q in queries]
    assert [a.rcode() for a in answers] == [
        dns.rcode.NOERROR,
        dns.rcode.NXDOMAIN,
        dns.rcode.NOERROR,
    ]


async def test_malformed_datagrams(server: DnsServer) -> None:
    addr = _addr(server)
    header = struct.pack("!6H", 0x1234, 0x0100, 1, 0, 0, 0)
    out = await udp(addr, header + b"\x07garbage")
    assert out is not None and out[:2] == b"\x12\x34" and out[3] & 0xF == dns.rcode.FORMERR
    assert await udp(addr, b"\x01\x02\x03", within=0.3) is None  # no header: nothing to answer
    # The server is still fine.
    assert (await udp_query(addr, dns.message.make_query("sip.lab.local", "A"))).rcode() == 0


async def test_malformed_tcp_message_gets_formerr_and_the_connection_lives(
    server: DnsServer,
) -> None:
    async with tcp(_addr(server)) as client:
        await client.send(struct.pack("!6H", 0xABCD, 0, 1, 0, 0, 0) + b"\xff\xff")
        out = await client.receive()
        assert out[:2] == b"\xab\xcd" and out[3] & 0xF == dns.rcode.FORMERR
        r = await client.query(dns.message.make_query("sip.lab.local", "A"))
        assert r.rcode() == dns.rcode.NOERROR


async def _served_meanwhile(server: DnsServer) -> None:
    """Another client gets answers over UDP and TCP."""
    r = await udp_query(_addr(server), dns.message.make_query(SRV, "SRV"), within=1.0)
    assert r.rcode() == dns.rcode.NOERROR
    async with tcp(_addr(server)) as other:
        r = await other.query(dns.message.make_query(SRV, "SRV"), within=1.0)
        assert r.rcode() == dns.rcode.NOERROR


async def test_oversized_length_prefix_is_cut_off(server: DnsServer) -> None:
    async with tcp(_addr(server)) as client:
        await client.send(b"\xff\xff" + b"\x00" * 100, prefix=False)  # 65535 > 4096
        assert await client.closed_by_server(within=1.0)
        await _served_meanwhile(server)
    assert (
        server.core.metrics.registry.get_sample_value(
            "sipdrill_dns_dropped_total", {"reason": "tcp-length"}
        )
        == 1
    )


async def test_stalled_client_is_cut_off_while_others_are_served(server: DnsServer) -> None:
    async with tcp(_addr(server)) as stalled:
        start = time.monotonic()
        await stalled.send(b"\x00\x40" + b"\x00" * 10, prefix=False)  # 64 announced, 10 sent
        await _served_meanwhile(server)
        assert await stalled.closed_by_server(within=3.0)
        elapsed = time.monotonic() - start
    assert 0.4 <= elapsed <= 3.0  # tcp_read_timeout is 0.5 s
    assert (
        server.core.metrics.registry.get_sample_value(
            "sipdrill_dns_dropped_total", {"reason": "tcp-stalled"}
        )
        == 1
    )


async def test_idle_connections_are_closed(server: DnsServer) -> None:
    server.tcp_idle_timeout = 0.3
    async with tcp(_addr(server)) as client:
        start = time.monotonic()
        assert await client.closed_by_server(within=3.0)
        assert 0.25 <= time.monotonic() - start <= 3.0


async def test_connection_limit(server: DnsServer) -> None:
    addr = _addr(server)
    clients = [tcp(addr) for _ in range(8)]
    opened = [await c.__aenter__() for c in clients]
    try:
        for c in opened:  # make sure the server registered every connection
            assert (await c.query(dns.message.make_query("sip.lab.local", "A"))).rcode() == 0
        assert server.tcp_connections == 8
        async with tcp(addr) as ninth:
            assert await ninth.closed_by_server(within=1.0)
        # The ones that were in still work.
        assert (await opened[0].query(dns.message.make_query("sip.lab.local", "A"))).rcode() == 0
    finally:
        for c in clients:
            await c.__aexit__(None, None, None)
    for _ in range(100):
        if server.tcp_connections == 0:
            break
        await asyncio.sleep(0.01)
    assert server.tcp_connections == 0


async def test_latency_fault_delays_answers(server: DnsServer, core: DnsCore) -> None:
    core.set_faults(latency=0.3)
    q = dns.message.make_query("sip.lab.local", "A")
    start = time.monotonic()
    await udp_query(_addr(server), q)
    assert 0.28 <= time.monotonic() - start <= 2.0
    async with tcp(_addr(server)) as client:
        start = time.monotonic()
        await client.query(q)
        assert 0.28 <= time.monotonic() - start <= 2.0
    core.set_faults()
    start = time.monotonic()
    await udp_query(_addr(server), q)
    assert time.monotonic() - start < 0.25
    assert (
        core.metrics.registry.get_sample_value(
            "sipdrill_dns_query_duration_seconds_count", {"transport": "udp"}
        )
        == 2
    )


async def test_drop_and_servfail_faults(server: DnsServer, core: DnsCore) -> None:
    q = dns.message.make_query("sip.lab.local", "A")
    core.set_faults(drop=True)
    assert await udp(_addr(server), q.to_wire(), within=0.3) is None
    async with tcp(_addr(server)) as client:
        await client.send(q.to_wire())
        with pytest.raises(TimeoutError):
            await client.receive(within=0.3)
    core.set_faults(servfail=True)
    assert (await udp_query(_addr(server), q)).rcode() == dns.rcode.SERVFAIL
    core.set_faults()
    assert (await udp_query(_addr(server), q)).rcode() == dns.rcode.NOERROR


async def test_close_stops_answering_and_ends_connections(core: DnsCore) -> None:
    srv = DnsServer(core, [("127.0.0.1", 0)])
    await srv.start()
    addr = _addr(srv)
    async with tcp(addr) as client:
        assert (await client.query(dns.message.make_query("sip.lab.local", "A"))).rcode() == 0
        await srv.close()
        assert await client.closed_by_server(within=1.0)
    assert await udp(addr, dns.message.make_query("sip.lab.local", "A").to_wire(), 0.2) is None
    assert srv.tcp_connections == 0


async def test_a_taken_port_is_a_config_error(server: DnsServer, core: DnsCore) -> None:
    with pytest.raises(ConfigError):
        await DnsServer(core, [_addr(server)]).start()


async def test_latency_fault_answers_in_flight_are_dropped_on_close(core: DnsCore) -> None:
    srv = DnsServer(core, [("127.0.0.1", 0)])
    await srv.start()
    core.set_faults(latency=5.0)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.sendto(dns.message.make_query("sip.lab.local", "A").to_wire(), _addr(srv))
        await asyncio.sleep(0.1)
    finally:
        sock.close()
    start = time.monotonic()
    await srv.close()  # does not wait for the delayed answer
    assert time.monotonic() - start < 1.0


async def test_a_burst_larger_than_one_read_batch_is_answered_in_full(
    server: DnsServer, core: DnsCore
) -> None:
    """The UDP listener drains BATCH datagrams per wake-up: the rest of a burst
    must wait for the next wake-up, not be left in the socket."""
    from sipdrill.dns.server import _UdpListener

    count = 3 * _UdpListener.BATCH + 5
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        ids = set(range(1000, 1000 + count))
        for qid in ids:
            q = dns.message.make_query(SRV, "SRV")
            q.id = qid
            sock.sendto(q.to_wire(), _addr(server))
        seen: set[int] = set()
        deadline = time.monotonic() + 5
        while seen != ids and time.monotonic() < deadline:
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 4096), 1.0)
            except TimeoutError:
                break
            r = dns.message.from_wire(data)
            assert r.rcode() == dns.rcode.NOERROR and len(r.answer[0]) == 2
            seen.add(r.id)
        assert seen == ids
    finally:
        sock.close()
    latency = core.metrics.registry.get_sample_value(
        "sipdrill_dns_query_duration_seconds_count", {"transport": "udp"}
    )
    assert latency == count
