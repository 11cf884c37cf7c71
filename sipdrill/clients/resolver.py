"""Asynchronous DNS for the simulated clients: the lab DNS server only, cached by TTL.

:class:`Resolver` wraps ``dns.asyncresolver.Resolver`` built with
``configure=False``: it asks only the nameservers it is given (the lab DNS
server on 127.x), never ``/etc/resolv.conf``. Answers go through a
:class:`~sipdrill.clients.dnscache.TtlCache` (positive answers for the
RRset's TTL, NXDOMAIN/NODATA for the SOA's negative TTL, RFC 2308), and
identical queries in flight are asked once: a storm of 10,000 endpoints
re-resolving the same SRV name costs one query.

:meth:`Resolver.lookup` and :meth:`Resolver.resolve` never raise for DNS
trouble: a timeout or a SERVFAIL comes back as a
:class:`~sipdrill.clients.dnscache.DnsAnswer` with that status, which the
endpoint treats as "try the next name".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from sipdrill.clients.dnscache import DnsAnswer, DnsStatus, TtlCache, normalise_name
from sipdrill.sip.srv import SrvRecord

__all__ = ["Resolver", "parse_nameserver"]

log = logging.getLogger(__name__)


def _retrieved(query: asyncio.Task[DnsAnswer]) -> None:
    # Waiters that gave up must not leave "exception was never retrieved":
    # the resolver logged it already.
    if not query.cancelled():
        query.exception()


def parse_nameserver(text: str, default_port: int = 53) -> tuple[str, int]:
    """``127.0.0.1:5353``, ``127.0.0.1`` or ``[::1]:5353`` to (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if not host:
        raise ValueError(f"{text!r}: no address")
    if port and not port.isdigit():
        raise ValueError(f"{text!r}: bad port")
    number = int(port) if port else default_port
    if not 0 < number < 65536:
        raise ValueError(f"{text!r}: bad port")
    return host, number


def _negative_ttl(response: dns.message.Message | None, default: float) -> float:
    """RFC 2308: min(SOA TTL, SOA MINIMUM) from the authority section."""
    if response is None:
        return default
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return float(min(rrset.ttl, rrset[0].minimum))
    return default


class Resolver:
    """Resolves A and SRV names at the given nameservers, through a TTL cache."""

    def __init__(
        self,
        nameservers: Sequence[tuple[str, int]],
        *,
        cache: TtlCache | None = None,
        timeout: float = 2.0,
        lifetime: float = 5.0,
        negative_ttl: float = 60.0,
        source: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not nameservers:
            raise ValueError("at least one nameserver is needed (the lab DNS server)")
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in nameservers]
        resolver.timeout = timeout
        resolver.lifetime = lifetime
        resolver.cache = None  # ours honours TTLs and is shared with the endpoints
        self._resolver = resolver
        self.cache = cache if cache is not None else TtlCache()
        self.negative_ttl = negative_ttl
        self.source = source
        self.clock = clock
        self._inflight: dict[tuple[str, str], asyncio.Task[DnsAnswer]] = {}
        self.queries = 0

    def lookup_queried(self, qname: str, rtype: str) -> tuple[asyncio.Future[DnsAnswer], bool]:
        """:meth:`lookup`, and whether this call sent the query: False when the
        answer came from the cache or from a query another caller started (a
        storm of endpoints sends one query, and only one of them may say so)."""
        key = TtlCache.key(qname, rtype.upper())
        fresh = (
            key not in self._inflight and self.cache.get(qname, rtype.upper(), self.clock()) is None
        )
        return self.lookup(qname, rtype), fresh

    def lookup(self, qname: str, rtype: str) -> asyncio.Future[DnsAnswer]:
        """The answer for ``qname``/``rtype`` (``A`` or ``SRV``) as a future.

        Done at once from the cache if fresh; otherwise the query in flight for
        the same name (a task: its own future), or a new one. A storm of
        endpoints waits on one future with a callback each instead of a task
        each. Only :meth:`close` cancels a query; a waiter that gives up leaves
        it to the others.
        """
        loop = asyncio.get_running_loop()
        rtype = rtype.upper()
        cached = self.cache.get(qname, rtype, self.clock())
        if cached is not None:
            done: asyncio.Future[DnsAnswer] = loop.create_future()
            done.set_result(cached)
            return done
        key = TtlCache.key(qname, rtype)
        query = self._inflight.get(key)
        if query is None:
            query = self._inflight[key] = loop.create_task(self._fill(key, rtype))
            query.add_done_callback(_retrieved)
        return query

    async def resolve(self, qname: str, rtype: str) -> DnsAnswer:
        """The answer for ``qname``/``rtype`` (``A`` or ``SRV``), from the cache if fresh."""
        return await asyncio.shield(self.lookup(qname, rtype))

    async def close(self) -> None:
        """Cancel the queries in flight; their waiters see the cancellation."""
        queries = list(self._inflight.values())
        for query in queries:
            query.cancel()
        if queries:
            await asyncio.gather(*queries, return_exceptions=True)

    async def _fill(self, key: tuple[str, str], rtype: str) -> DnsAnswer:
        try:
            answer = await self._query(key[0], rtype)
            self.cache.put(answer, self.clock())
        except Exception:  # a resolver bug: logged once, every waiter sees it
            log.exception("resolving %s %s", key[0], rtype)
            raise
        finally:
            del self._inflight[key]
        return answer

    async def _query(self, qname: str, rtype: str) -> DnsAnswer:
        self.queries += 1
        name = dns.name.from_text(normalise_name(qname) + ".")
        try:
            result = await self._resolver.resolve(
                name, rtype, search=False, raise_on_no_answer=False, source=self.source
            )
        except dns.resolver.NXDOMAIN as exc:
            responses = exc.responses()  # type: ignore[no-untyped-call]
            response = next(iter(responses.values()), None) if responses else None
            ttl = _negative_ttl(response, self.negative_ttl)
            return DnsAnswer(qname, rtype, DnsStatus.NXDOMAIN, ttl)
        except (dns.resolver.LifetimeTimeout, dns.exception.Timeout):
            return DnsAnswer(qname, rtype, DnsStatus.TIMEOUT, 0, detail="no answer in time")
        except dns.exception.DNSException as exc:
            return DnsAnswer(qname, rtype, DnsStatus.ERROR, 0, detail=str(exc)[:200])
        except OSError as exc:
            return DnsAnswer(qname, rtype, DnsStatus.ERROR, 0, detail=str(exc)[:200])
        rrset = result.rrset
        if rrset is None or not len(rrset):
            ttl = _negative_ttl(result.response, self.negative_ttl)
            return DnsAnswer(qname, rtype, DnsStatus.NODATA, ttl)
        ttl = float(rrset.ttl)
        if rtype == "SRV":
            records = tuple(
                SrvRecord(
                    int(rd.priority),
                    int(rd.weight),
                    int(rd.port),
                    rd.target.to_text(),
                )
                for rd in rrset
            )
            return DnsAnswer(qname, rtype, DnsStatus.OK, ttl, srv=records)
        addresses = tuple(str(rd.address) for rd in rrset)
        return DnsAnswer(qname, rtype, DnsStatus.OK, ttl, addresses=addresses)
