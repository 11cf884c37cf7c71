"""Prometheus metrics of one DNS server (its own registry, so that several
servers can run in one process, as they do in tests).

The two series touched by every query (the query counter and the latency
histogram) are plain Python counts exported at scrape time by a collector:
prometheus_client's ``Counter.inc`` and ``Histogram.observe`` take a lock and
cost 0.45 and 0.67 us, a sixth of a cached answer's whole cost; a dict
increment and a ``bisect`` cost a tenth of that. The exposition (names,
labels, buckets) is the same.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

#: Query types get their own label value; anything else is counted as OTHER,
#: so a fuzzer cannot blow up the label cardinality.
QTYPE_LABELS = frozenset(
    {"A", "AAAA", "ANY", "AXFR", "CAA", "CNAME", "DNSKEY", "DS", "HTTPS", "IXFR", "MX", "NAPTR",
     "NS", "PTR", "SOA", "SRV", "SVCB", "TXT"}
)
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
_QUERIES_HELP = "DNS messages answered, by query type, rcode and transport."
_LATENCY_HELP = (
    "Time from receiving a DNS message to sending its answer (injected latency included)."
)


class _Latency:
    """One transport's histogram: a count per bucket (the last is +Inf) and the sum."""

    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0


class _HotSeries(Collector):
    """Exports the per-query counts of a :class:`DnsMetrics` when scraped."""

    def __init__(self, metrics: DnsMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        queries = CounterMetricFamily(
            "sipdrill_dns_queries", _QUERIES_HELP, labels=["qtype", "rcode", "transport"]
        )
        for key, value in list(self.metrics.query_counts.items()):
            queries.add_metric(list(key), value)
        yield queries
        latency = HistogramMetricFamily(
            "sipdrill_dns_query_duration_seconds", _LATENCY_HELP, labels=["transport"]
        )
        for transport, hist in list(self.metrics.latency.items()):
            cumulative, running = [], 0
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), hist.buckets, strict=True):
                running += count
                cumulative.append((_le(bound), float(running)))
            latency.add_metric([transport], cumulative, sum_value=hist.total)
        yield latency


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class DnsMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        #: (qtype, rcode, transport) -> answers sent
        self.query_counts: dict[tuple[str, str, str], int] = {}
        # The latency series exist from the start (a dashboard shows 0, not "no data").
        self.latency: dict[str, _Latency] = {t: _Latency() for t in ("udp", "tcp")}
        r.register(_HotSeries(self))
        self.updates = Counter(
            "sipdrill_dns_updates", "Zone changes by RFC 2136 UPDATE (via=wire) or the control "
            "API (via=api), by result.", ["via", "rcode"], registry=r,
        )
        self.dropped = Counter(
            "sipdrill_dns_dropped", "DNS messages not answered, by reason.", ["reason"], registry=r,
        )
        self.serial = Gauge("sipdrill_dns_zone_serial", "The zone's SOA serial.", registry=r)
        self.tcp_connections = Gauge(
            "sipdrill_dns_tcp_connections", "Open DNS-over-TCP connections.", registry=r
        )
        self.fault = Gauge(
            "sipdrill_dns_fault_active", "Injected faults (1 active, latency in seconds).",
            ["fault"], registry=r,
        )

    def query(self, qtype: str, rcode: str, transport: str) -> None:
        key = (qtype, rcode, transport)
        counts = self.query_counts
        counts[key] = counts.get(key, 0) + 1

    def observe(self, transport: str, seconds: float, count: int = 1) -> None:
        """``count`` answers that each took ``seconds`` (a batch sent at once)."""
        hist = self.latency.get(transport)
        if hist is None:
            hist = self.latency[transport] = _Latency()
        hist.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += count
        hist.total += seconds * count

    def drop(self, reason: str) -> None:
        self.dropped.labels(reason).inc()
