"""Prometheus metrics of one Front End pool (its own registry, so that two
pools can run in one process, as they do in tests)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sipdrill.pool.policy import Feature
from sipdrill.pool.sip_context import Pretence

#: Re-registration after a pool failover: seconds to minutes (the clients'
#: RFC 5626 backoff waits 15-30 s after a flow failure).
REREGISTER_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 300, 600)


class PoolMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.registrations = Gauge(
            "sipdrill_pool_registrations",
            "Users registered on this pool, by service mode (full, resiliency).",
            ["mode"],
            registry=r,
        )
        self.bindings = Gauge(
            "sipdrill_pool_bindings", "Registrar bindings (contacts) held.", registry=r
        )
        self.register_requests = Counter(
            "sipdrill_pool_register_requests",
            "REGISTER requests answered, by result (ok, redirect, refused, error); "
            "rate() gives REGISTER/s.",
            ["result"],
            registry=r,
        )
        self.heartbeats = Counter(
            "sipdrill_pool_heartbeats",
            "Heartbeats with the paired pool: sent, answered (a 2xx came back), "
            "failed (no answer in time), received (the partner's OPTIONS).",
            ["direction"],
            registry=r,
        )
        self.partner_state = Gauge(
            "sipdrill_pool_partner_state",
            "The partner monitor's state (1 for the current one).",
            ["state"],
            registry=r,
        )
        self.quorum_stops = Counter(
            "sipdrill_pool_quorum_stops",
            "Times this front end stopped its SIP service because the pool lost its quorum.",
            registry=r,
        )
        self.redirects = Counter(
            "sipdrill_pool_redirects", "301 answers sending a user to their pools.", registry=r
        )
        self.refusals = Counter(
            "sipdrill_pool_refusals",
            "Requests refused in resiliency mode (or because a conference's pool is down), "
            "by feature.",
            ["feature"],
            registry=r,
        )
        self.requests = Counter(
            "sipdrill_pool_requests",
            "Non-REGISTER requests handled, by method and final status class.",
            ["method", "status"],
            registry=r,
        )
        self.forwarded = Counter(
            "sipdrill_pool_forwarded",
            "Requests relayed to another pool, by result (ok, failed).",
            ["result"],
            registry=r,
        )
        self.untrusted_pool_claims = Counter(
            "sipdrill_pool_untrusted_pool_claims",
            "Requests that claimed to come from a pool (or from the partner) while their "
            "TLS connection's certificate did not prove it; answered as their real sender's. "
            "By reason: client (pool-to-pool headers without a lab pool's certificate; "
            "removed), wrong-pool (X-Sipdrill-Pool naming another pool than the "
            "certificate), not-partner (a heartbeat from a pool that is not the partner).",
            ["reason"],
            registry=r,
        )
        self.calls = Counter(
            "sipdrill_pool_calls",
            "Calls (INVITEs to users) this pool proxied, by the final answer it sent "
            "the caller: answered (2xx), cancelled (487), failed (any other); late-2xx: "
            "a callee answered after the caller had its final answer.",
            ["result"],
            registry=r,
        )
        self.flows_closed = Counter(
            "sipdrill_pool_flows_closed",
            "Client flows this pool closed so that their users register again, by reason.",
            ["reason"],
            registry=r,
        )
        self.reregister_seconds = Histogram(
            "sipdrill_pool_reregister_seconds",
            "From a pool failover (or failback) event to the user registering again here "
            "in the new mode.",
            buckets=REREGISTER_BUCKETS,
            registry=r,
        )
        self.failover_events = Counter(
            "sipdrill_pool_failover_events",
            "Pool failover events received, by event.",
            ["event"],
            registry=r,
        )
        self.conferences = Gauge(
            "sipdrill_pool_conferences_active", "Conferences with participants.", registry=r
        )
        self.read_only = Gauge(
            "sipdrill_pool_store_read_only", "1 while the user store is read-only.", registry=r
        )
        for feature in Feature:
            self.refusals.labels(feature.value)
        for pretence in Pretence:
            self.untrusted_pool_claims.labels(pretence.value)
        for result in ("answered", "cancelled", "failed", "late-2xx"):
            self.calls.labels(result)

    def bind_gauges(
        self,
        *,
        registrations: Callable[[str], int],
        bindings: Callable[[], int],
        conferences: Callable[[], int],
        read_only: Callable[[], bool],
        partner_state: Callable[[], str | None],
        partner_states: tuple[str, ...],
    ) -> None:
        """Gauges read live values at scrape time (no bookkeeping on the
        REGISTER path)."""
        def count(mode: str) -> Callable[[], float]:
            return lambda: float(registrations(mode))

        def is_state(state: str) -> Callable[[], float]:
            return lambda: 1.0 if partner_state() == state else 0.0

        for mode in ("full", "resiliency"):
            self.registrations.labels(mode).set_function(count(mode))
        self.bindings.set_function(bindings)
        self.conferences.set_function(conferences)
        self.read_only.set_function(lambda: 1.0 if read_only() else 0.0)
        for state in partner_states:
            self.partner_state.labels(state).set_function(is_state(state))
