"""DNS answers as the clients use them, and a cache that honours their TTLs.

Sans-IO: the cache takes ``now`` (monotonic seconds) on every call. It is
shared by the endpoint core (which only emits a lookup on a miss) and the
asyncio resolver (which coalesces identical queries in flight), so a
re-registration storm of 10,000 endpoints asks the lab DNS server each
name once per TTL, like clients behind one caching resolver would.
"""

from __future__ import annotations

import enum
import sys
from collections import OrderedDict
from dataclasses import dataclass

from sipdrill.sip.srv import SrvRecord

__all__ = ["DnsAnswer", "DnsStatus", "TtlCache"]


class DnsStatus(enum.Enum):
    OK = "ok"
    #: The name does not exist (cached for the negative TTL).
    NXDOMAIN = "nxdomain"
    #: The name exists but has no record of this type (cached for the negative TTL).
    NODATA = "nodata"
    #: No answer in time (not cached).
    TIMEOUT = "timeout"
    #: SERVFAIL, REFUSED or an unusable answer (not cached).
    ERROR = "error"

    @property
    def negative(self) -> bool:
        return self in (DnsStatus.NXDOMAIN, DnsStatus.NODATA)


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    """One answer: ``addresses`` for A, ``srv`` for SRV, in the order received.

    ``ttl`` is the seconds the answer may be cached from when it was received
    (the smallest TTL of the RRset, or the negative TTL); 0 means do not cache.
    """

    qname: str
    rtype: str
    status: DnsStatus
    ttl: float = 0.0
    addresses: tuple[str, ...] = ()
    srv: tuple[SrvRecord, ...] = ()
    detail: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.qname, self.rtype)

    def summary(self) -> tuple[str, ...]:
        if self.rtype == "SRV":
            return tuple(f"{r.priority} {r.weight} {r.port} {r.target}" for r in self.srv)
        return self.addresses


_NORMALISED: dict[str, str] = {}


def normalise_name(name: str) -> str:
    # Interned: 10,000 endpoints keep the same few pool names, once. Remembered:
    # a reconnect normalises the same dozen names again (~14 calls).
    done = _NORMALISED.get(name)
    if done is None:
        done = sys.intern(name.lower().rstrip("."))
        if len(_NORMALISED) < 4096:
            _NORMALISED[name] = done
    return done


class TtlCache:
    """Answers by (name, type), each until its TTL runs out; at most ``max_entries``.

    An expired entry is never returned. When full, the entry used least
    recently is dropped first (expired ones go before it).
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], tuple[float, DnsAnswer]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(qname: str, rtype: str) -> tuple[str, str]:
        return (normalise_name(qname), rtype.upper())

    def get(self, qname: str, rtype: str, now: float) -> DnsAnswer | None:
        key = self.key(qname, rtype)
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        expires, answer = entry
        if now >= expires:
            del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return answer

    def remaining(self, qname: str, rtype: str, now: float) -> float | None:
        """Seconds left on a cached answer (None if not cached)."""
        entry = self._entries.get(self.key(qname, rtype))
        if entry is None or now >= entry[0]:
            return None
        return entry[0] - now

    def put(self, answer: DnsAnswer, now: float) -> None:
        """Cache ``answer`` for its TTL; errors and TTL 0 are not cached."""
        if answer.ttl <= 0 or answer.status in (DnsStatus.TIMEOUT, DnsStatus.ERROR):
            return
        key = self.key(answer.qname, answer.rtype)
        self._entries[key] = (now + answer.ttl, answer)
        self._entries.move_to_end(key)
        if len(self._entries) > self.max_entries:
            self._evict(now)

    def _evict(self, now: float) -> None:
        for key in [k for k, (exp, _) in self._entries.items() if now >= exp]:
            del self._entries[key]
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
