"""The asyncio resolver against the lab DNS server (sipdrill.dns) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from clients_lab import HOST, lab_dns, write_topology

from sipdrill.clients.dnscache import DnsStatus, TtlCache
from sipdrill.clients.resolver import Resolver, parse_nameserver
from sipdrill.dns.zone import RecordChange


async def test_srv_a_nxdomain_nodata_and_the_ttl_cache(tmp_path: Path) -> None:
    topology = write_topology(tmp_path / "lab.yaml", 5061, 5062, ttl=30)
    async with lab_dns(topology) as (port, store):
        store.apply([RecordChange(op="replace", name="_sip._tls", rtype="SRV", data=("0 0 0 .",))])
        now = [100.0]
        cache = TtlCache()
        resolver = Resolver([(HOST, port)], cache=cache, clock=lambda: now[0])

        srv = await resolver.resolve("_sipinternaltls._tcp.lab.local", "SRV")
        assert srv.status is DnsStatus.OK and srv.ttl == 30
        assert sorted((r.priority, r.weight, r.port, r.host) for r in srv.srv) == [
            (0, 10, 5061, "pool1.lab.local"),
            (10, 10, 5062, "pool2.lab.local"),
        ]
        a = await resolver.resolve("pool1.lab.local", "A")
        assert a.addresses == (HOST,)
        dot = await resolver.resolve("_sip._tls.lab.local", "SRV")
        assert [r.target for r in dot.srv] == ["."]
        nx = await resolver.resolve("nowhere.lab.local", "A")
        assert nx.status is DnsStatus.NXDOMAIN and 0 < nx.ttl <= 5  # the SOA's negative TTL
        nodata = await resolver.resolve("pool1.lab.local", "SRV")
        assert nodata.status is DnsStatus.NODATA

        asked = resolver.queries
        await resolver.resolve("pool1.lab.local", "A")
        assert resolver.queries == asked  # cached
        now[0] += 31
        await resolver.resolve("pool1.lab.local", "A")
        assert resolver.queries == asked + 1  # the TTL ran out


async def test_identical_queries_in_flight_are_asked_once(tmp_path: Path) -> None:
    topology = write_topology(tmp_path / "lab.yaml", 5061, 5062)
    async with lab_dns(topology) as (port, _store):
        resolver = Resolver([(HOST, port)])
        answers = await asyncio.gather(
            *[resolver.resolve("_sipinternaltls._tcp.lab.local", "SRV") for _ in range(50)]
        )
    assert resolver.queries == 1
    assert all(x is answers[0] for x in answers)


async def test_a_waiter_that_gives_up_leaves_the_query_to_the_others(tmp_path: Path) -> None:
    topology = write_topology(tmp_path / "lab.yaml", 5061, 5062)
    async with lab_dns(topology) as (port, _store):
        resolver = Resolver([(HOST, port)])
        quitter = asyncio.create_task(resolver.resolve("pool1.lab.local", "A"))
        await asyncio.sleep(0)
        waiter = resolver.lookup("pool1.lab.local", "A")
        quitter.cancel()
        answer = await waiter
        cached = resolver.lookup("pool1.lab.local", "A")
    assert quitter.cancelled()
    assert answer.status is DnsStatus.OK and answer.addresses == (HOST,)
    assert cached.done() and cached.result() is answer  # from the cache, at once
    assert resolver.queries == 1


async def test_close_cancels_the_query_in_flight_for_every_waiter() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((HOST, 0))
        resolver = Resolver([(HOST, silent.getsockname()[1])], timeout=5, lifetime=5)
        waiters = [resolver.lookup("pool1.lab.local", "A") for _ in range(3)]
        await asyncio.sleep(0.05)
        assert not any(w.done() for w in waiters)
        await asyncio.wait_for(resolver.close(), 1)
    assert all(w.cancelled() for w in waiters)
    assert resolver._inflight == {}


async def test_a_resolver_bug_reaches_every_waiter_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    resolver = Resolver([(HOST, 9)])

    async def broken(qname: str, rtype: str) -> object:
        raise RuntimeError("bug")

    resolver._query = broken  # type: ignore[method-assign,assignment]
    waiters = [resolver.lookup("pool1.lab.local", "A") for _ in range(3)]
    await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(w.exception(), RuntimeError) for w in waiters)
    assert [r.message for r in caplog.records] == ["resolving pool1.lab.local A"]
    assert resolver.cache.get("pool1.lab.local", "A", 0) is None


async def test_a_silent_server_is_a_timeout_not_an_exception() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((HOST, 0))
        port = silent.getsockname()[1]
        resolver = Resolver([(HOST, port)], timeout=0.2, lifetime=0.4)
        answer = await resolver.resolve("pool1.lab.local", "A")
    assert answer.status is DnsStatus.TIMEOUT
    assert resolver.cache.get("pool1.lab.local", "A", 0) is None  # not cached


def test_nameserver_syntax() -> None:
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("127.0.0.1") == ("127.0.0.1", 53)
    assert parse_nameserver("[::1]:5353") == ("::1", 5353)
    for bad in ("", ":53", "127.0.0.1:x", "127.0.0.1:70000"):
        with pytest.raises(ValueError):
            parse_nameserver(bad)
    with pytest.raises(ValueError):
        Resolver([])
