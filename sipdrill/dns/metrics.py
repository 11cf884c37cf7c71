"""Prometheus metrics of one DNS server (its own registry, so that several
servers can run in one process, as they do in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Query types get their own label value; anything else is counted as OTHER,
#: so a fuzzer cannot blow up the label cardinality.
QTYPE_LABELS = frozenset(
    {"A", "AAAA", "ANY", "AXFR", "CAA", "CNAME", "DNSKEY", "DS", "HTTPS", "IXFR", "MX", "NAPTR",
     "NS", "PTR", "SOA", "SRV", "SVCB", "TXT"}
)
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)


class DnsMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.queries = Counter(
            "sipdrill_dns_queries", "DNS messages answered, by query type, rcode and transport.",
            ["qtype", "rcode", "transport"], registry=r,
        )
        self.updates = Counter(
            "sipdrill_dns_updates", "Zone changes by RFC 2136 UPDATE (via=wire) or the control "
            "API (via=api), by result.", ["via", "rcode"], registry=r,
        )
        self.dropped = Counter(
            "sipdrill_dns_dropped", "DNS messages not answered, by reason.", ["reason"], registry=r,
        )
        self.latency = Histogram(
            "sipdrill_dns_query_duration_seconds",
            "Time from receiving a DNS message to sending its answer (injected latency included).",
            ["transport"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.serial = Gauge("sipdrill_dns_zone_serial", "The zone's SOA serial.", registry=r)
        self.tcp_connections = Gauge(
            "sipdrill_dns_tcp_connections", "Open DNS-over-TCP connections.", registry=r
        )
        self.fault = Gauge(
            "sipdrill_dns_fault_active", "Injected faults (1 active, latency in seconds).",
            ["fault"], registry=r,
        )
        self._query_children: dict[tuple[str, str, str], Counter] = {}
        # The latency series exist from the start (a dashboard shows 0, not "no data").
        self._latency_children: dict[str, Histogram] = {
            t: self.latency.labels(t) for t in ("udp", "tcp")
        }

    def query(self, qtype: str, rcode: str, transport: str) -> None:
        key = (qtype, rcode, transport)
        child = self._query_children.get(key)
        if child is None:
            child = self._query_children[key] = self.queries.labels(*key)
        child.inc()

    def observe(self, transport: str, seconds: float) -> None:
        child = self._latency_children.get(transport)
        if child is None:
            child = self._latency_children[transport] = self.latency.labels(transport)
        child.observe(seconds)

    def drop(self, reason: str) -> None:
        self.dropped.labels(reason).inc()
