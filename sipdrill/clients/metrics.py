"""Prometheus metrics of a client runner, and the event log the API serves.

Each runner has its own :class:`~prometheus_client.CollectorRegistry`, so
two runners in one process (tests) do not collide. Endpoints by mode and
pool are counted when scraped, from the endpoints themselves, so they
cannot drift from the truth.
"""

from __future__ import annotations

import bisect
import collections
import json
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sipdrill.clients.events import (
    CallAnswered,
    CallEnded,
    CallFailed,
    ClientEvent,
    Registered,
    TargetFailed,
    WorkloadResult,
    event_to_json,
)

__all__ = ["RECONNECT_BUCKETS", "ClientMetrics", "EventLog"]

RECONNECT_BUCKETS = (
    0.1,
    0.25,
    0.5,
    1,
    2,
    5,
    10,
    20,
    30,
    45,
    60,
    90,
    120,
    180,
    300,
    600,
    1200,
    1800,
    3600,
)

#: Call setup through one or two pools: milliseconds, seconds when a pool is slow.
CALL_SETUP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 32)

#: (mode, pool) -> endpoints; pool is "" when not registered.
ModeCounts = Callable[[], Iterable[tuple[str, str, int]]]


class _ModeCollector(Collector):
    def __init__(self, counts: ModeCounts) -> None:
        self._counts = counts

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "sipdrill_client_endpoints",
            "Simulated endpoints by mode and registrar pool",
            labels=["mode", "pool"],
        )

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for mode, pool, n in self._counts():
            family.add_metric([mode, pool], n)
        yield family


class ClientMetrics:
    def __init__(self, counts: ModeCounts) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registrations = Counter(
            "sipdrill_client_registrations",
            "2xx answers to REGISTER (kind: initial or refresh)",
            ["pool", "mode", "kind"],
            registry=self.registry,
        )
        self.failovers = Counter(
            "sipdrill_client_failovers",
            "Registrations on a pool other than the one the endpoint was registered with before",
            ["from_pool", "to_pool"],
            registry=self.registry,
        )
        self.reconnect = Histogram(
            "sipdrill_client_time_to_reconnect_seconds",
            "From losing service to being registered again",
            buckets=RECONNECT_BUCKETS,
            registry=self.registry,
        )
        self.target_failures = Counter(
            "sipdrill_client_target_failures",
            "Registrar targets or registered flows that failed, by cause",
            ["failure"],
            registry=self.registry,
        )
        self.workload = Counter(
            "sipdrill_client_workload",
            "Workload requests by kind and final status (none: no answer)",
            ["kind", "status"],
            registry=self.registry,
        )
        self.calls = Counter(
            "sipdrill_client_calls",
            "Calls placed by the call workload, by outcome: answered, failed (a final "
            "3xx-6xx or none), and ended (ok: the BYE was answered; dropped: the flow went)",
            ["outcome"],
            registry=self.registry,
        )
        self.call_setup = Histogram(
            "sipdrill_client_call_setup_seconds",
            "From a call's INVITE to its 2xx",
            buckets=CALL_SETUP_BUCKETS,
            registry=self.registry,
        )
        self.tls_handshakes = Counter(
            "sipdrill_client_tls_handshakes",
            "TLS handshakes completed, by server name and kind: resumed (the session kept "
            "from the last connection to that server) or full",
            ["server", "kind"],
            registry=self.registry,
        )
        self.events = Counter(
            "sipdrill_client_events", "Events emitted, by kind", ["event"], registry=self.registry
        )
        self.registry.register(_ModeCollector(counts))
        self._children: dict[tuple[int, tuple[str, ...]], Counter] = {}

    def _child(self, metric: Counter, *labels: str) -> Counter:
        """``metric.labels(*labels)``, remembered: labels() costs ~5 us a call."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe(self, event: ClientEvent) -> None:
        self._child(self.events, event.KIND).inc()
        if isinstance(event, Registered):
            pool = event.pool or ""
            kind = "refresh" if event.refresh else "initial"
            self._child(self.registrations, pool, event.mode.value, kind).inc()
            if event.previous_pool and event.previous_pool != pool:
                self._child(self.failovers, event.previous_pool, pool).inc()
            if event.outage is not None:
                self.reconnect.observe(event.outage)
        elif isinstance(event, TargetFailed):
            self._child(self.target_failures, event.failure.value).inc()
        elif isinstance(event, WorkloadResult):
            status = "none" if event.status_code is None else str(event.status_code)
            self._child(self.workload, event.kind, status).inc()
        elif isinstance(event, CallAnswered):
            self._child(self.calls, "answered").inc()
            self.call_setup.observe(event.setup)
        elif isinstance(event, CallFailed):
            self._child(self.calls, "failed").inc()
        elif isinstance(event, CallEnded):
            outcome = "dropped" if event.dropped else "ended-ok" if event.ok else "ended-error"
            self._child(self.calls, outcome).inc()

    def tls_handshake(self, server: str, resumed: bool) -> None:
        self._child(self.tls_handshakes, server, "resumed" if resumed else "full").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EventLog:
    """The last ``capacity`` events (for ``GET /events``) and an optional JSONL stream.

    Events are kept as their JSON lines only, and every :data:`BLOCK` lines
    are sealed into one zlib-compressed block: 100,000 events took ~30 MB
    as strings (a 10,000-endpoint process fills the buffer while signing in)
    and take a few MB as blocks. A query decompresses only the blocks it
    reads. Sequence numbers are consecutive, so ``after`` is an index;
    ``since`` is a binary search on the wall clock.
    """

    #: Lines per compressed block.
    BLOCK = 1024

    def __init__(self, capacity: int = 100_000, stream: IO[str] | None = None) -> None:
        self.capacity = capacity
        self.stream = stream
        self.seq = 0
        # Sealed blocks, oldest first: (seq of the first line, its wall clock, zlib of lines).
        self._blocks: collections.deque[tuple[int, float, bytes]] = collections.deque()
        # The open block: lines from seq _tail_seq on.
        self._tail: list[str] = []
        self._tail_seq = 1
        self.listeners: list[Callable[[int, ClientEvent], None]] = []

    def __len__(self) -> int:
        return self.seq - self._first_kept() + 1

    def _first_kept(self) -> int:
        return max(1, self.seq - self.capacity + 1)

    def append(self, event: ClientEvent) -> int:
        self.seq += 1
        seq = self.seq
        line = event_to_json(event, seq)
        self._tail.append(line)
        if len(self._tail) >= self.BLOCK:
            self._seal()
        if self.stream is not None:
            self.stream.write(line + "\n")
        for listener in self.listeners:
            listener(seq, event)
        return seq

    def _seal(self) -> None:
        tail = self._tail
        wall = float(json.loads(tail[0])["wall"])
        self._blocks.append((self._tail_seq, wall, zlib.compress("\n".join(tail).encode(), 1)))
        self._tail_seq += len(tail)
        self._tail = []
        first = self._first_kept()
        while len(self._blocks) > 1 and self._blocks[1][0] <= first:
            self._blocks.popleft()
        if self._blocks and self._tail_seq <= first:
            self._blocks.popleft()

    def flush(self) -> None:
        if self.stream is not None:
            self.stream.flush()

    def _segments(self) -> list[tuple[int, float, bytes | list[str]]]:
        """(first seq, first wall, block or open lines), oldest first."""
        out: list[tuple[int, float, bytes | list[str]]] = list(self._blocks)
        if self._tail:
            out.append((self._tail_seq, float(json.loads(self._tail[0])["wall"]), self._tail))
        return out

    @staticmethod
    def _lines(segment: bytes | list[str]) -> list[str]:
        if isinstance(segment, bytes):
            return zlib.decompress(segment).decode().split("\n")
        return segment

    def _first_since(self, since: float) -> int:
        """The seq of the first event with wall >= since (walls are non-decreasing)."""
        segments = self._segments()
        # The last segment that starts before `since` holds the answer, or it is the next one's.
        j = bisect.bisect_left([wall for _seq, wall, _data in segments], since) - 1
        if j < 0:
            return 1
        first, _wall, data = segments[j]
        lines = self._lines(data)
        lo, hi = 0, len(lines)
        while lo < hi:
            mid = (lo + hi) // 2
            if json.loads(lines[mid])["wall"] < since:
                lo = mid + 1
            else:
                hi = mid
        return first + lo

    def _iter_from(self, start: int) -> Iterator[str]:
        for first, _wall, data in self._segments():
            if start >= first + (len(data) if isinstance(data, list) else self.BLOCK):
                continue
            lines = self._lines(data)
            yield from lines[max(0, start - first) :]

    def first_seq(self) -> int:
        """The oldest sequence number still kept (events before it are gone)."""
        return self._first_kept()

    def lines(self, after: int, limit: int) -> list[str]:
        """The JSON lines of the events with ``seq > after``, oldest first, at most
        ``limit``: what an orchestrator ingests, without a parse and re-encode."""
        start = max(self._first_kept(), after + 1)
        out: list[str] = []
        if start > self.seq or limit <= 0:
            return out
        for line in self._iter_from(start):
            out.append(line)
            if len(out) >= limit:
                break
        return out

    def query(
        self,
        *,
        since: float | None = None,
        after: int | None = None,
        limit: int = 1000,
        user: str | None = None,
        kind: str | None = None,
    ) -> list[dict[str, Any]]:
        """Events with ``wall >= since`` and ``seq > after``, oldest first, at most ``limit``."""
        start = self._first_kept()
        if after is not None:
            start = max(start, after + 1)
        if since is not None:
            start = max(start, self._first_since(since))
        user_key = None if user is None else f'"user":{json.dumps(user)}'
        kind_key = None if kind is None else f'"event":{json.dumps(kind)}'
        out: list[dict[str, Any]] = []
        if start > self.seq:
            return out
        for line in self._iter_from(start):
            if user_key is not None and user_key not in line:
                continue
            if kind_key is not None and kind_key not in line:
                continue
            event = json.loads(line)
            if (user is not None and event["user"] != user) or (
                kind is not None and event["event"] != kind
            ):
                continue
            out.append(event)
            if len(out) >= limit:
                break
        return out
