"""The TTL cache the endpoints and the resolver share."""

from __future__ import annotations

import pytest

from sipdrill.clients.dnscache import DnsAnswer, DnsStatus, TtlCache
from sipdrill.sip.srv import SrvRecord


def _a(name: str, ttl: float, *addrs: str) -> DnsAnswer:
    return DnsAnswer(name, "A", DnsStatus.OK, ttl, addresses=addrs)


def test_an_answer_lives_exactly_its_ttl() -> None:
    cache = TtlCache()
    cache.put(_a("pool1.lab.local", 30, "10.0.1.11"), now=100.0)
    assert cache.get("pool1.lab.local", "A", 100.0) is not None
    assert cache.get("POOL1.lab.local.", "a", 129.9) is not None  # names are case-blind
    assert cache.remaining("pool1.lab.local", "A", 120.0) == pytest.approx(10.0)
    assert cache.get("pool1.lab.local", "A", 130.0) is None
    assert len(cache) == 0


def test_negative_answers_are_cached_errors_are_not() -> None:
    cache = TtlCache()
    cache.put(DnsAnswer("x.lab.local", "A", DnsStatus.NXDOMAIN, 60), now=0)
    cache.put(DnsAnswer("y.lab.local", "SRV", DnsStatus.NODATA, 60), now=0)
    cache.put(DnsAnswer("z.lab.local", "A", DnsStatus.TIMEOUT, 60), now=0)
    cache.put(DnsAnswer("w.lab.local", "A", DnsStatus.ERROR, 60), now=0)
    cache.put(_a("ttl0.lab.local", 0, "10.0.0.1"), now=0)
    assert cache.get("x.lab.local", "A", 59) is not None
    assert cache.get("y.lab.local", "SRV", 59) is not None
    assert cache.get("z.lab.local", "A", 1) is None
    assert cache.get("w.lab.local", "A", 1) is None
    assert cache.get("ttl0.lab.local", "A", 0) is None


def test_types_are_kept_apart() -> None:
    cache = TtlCache()
    srv = DnsAnswer(
        "_sip._tls.lab.local", "SRV", DnsStatus.OK, 10, srv=(SrvRecord(0, 0, 5061, "p.lab.local."),)
    )
    cache.put(srv, now=0)
    assert cache.get("_sip._tls.lab.local", "A", 1) is None
    hit = cache.get("_sip._tls.lab.local", "SRV", 1)
    assert hit is srv and hit.summary() == ("0 0 5061 p.lab.local.",)


def test_a_full_cache_drops_expired_then_least_recently_used() -> None:
    cache = TtlCache(max_entries=3)
    cache.put(_a("old.lab.local", 1, "10.0.0.1"), now=0)
    cache.put(_a("b.lab.local", 100, "10.0.0.2"), now=0)
    cache.put(_a("c.lab.local", 100, "10.0.0.3"), now=0)
    cache.put(_a("d.lab.local", 100, "10.0.0.4"), now=5)  # "old" has expired: it goes
    assert len(cache) == 3 and cache.get("b.lab.local", "A", 6) is not None
    cache.put(_a("e.lab.local", 100, "10.0.0.5"), now=7)  # c is now the least recently used
    assert cache.get("c.lab.local", "A", 8) is None
    assert cache.get("b.lab.local", "A", 8) is not None


def test_max_entries_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TtlCache(max_entries=0)
