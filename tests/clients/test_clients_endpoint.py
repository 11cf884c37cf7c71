"""The sans-IO endpoint with an injected clock and RNG: no sockets, no sleeping."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from clients_harness import (
    ALICE,
    DOMAIN,
    POOL1,
    POOL2,
    FakeRegistrar,
    World,
    a,
    paired_pools_dns,
    srv,
)
from sipmessage import Request

from sipdrill.clients.dnscache import DnsAnswer, DnsStatus
from sipdrill.clients.endpoint import (
    TRANSITIONS,
    ClientProfile,
    IllegalTransition,
    Target,
    Trigger,
    WorkloadKind,
    lync_lookup_order,
)
from sipdrill.clients.events import (
    DnsLookup,
    Failure,
    Mode,
    ModeChanged,
    Nudged,
    Redirected,
    Registered,
    RetryScheduled,
    TargetFailed,
    WorkloadResult,
)
from sipdrill.sip.keepalive import KeepAliveConfig
from sipdrill.sip.srv import SrvRecord, order_srv
from sipdrill.sip.transport import Kind
from sipdrill.topology import LYNC_LOOKUP_ORDER

# --- discovery --------------------------------------------------------------------


def test_lookup_order_is_lyncs_and_ends_in_backoff_when_nothing_resolves() -> None:
    w = World(dns={})
    w.sign_in()
    expected = [
        (f"{label}.{DOMAIN}", rtype)
        for label, rtype in LYNC_LOOKUP_ORDER
        if label != "_sipinternal._tcp"  # TLS only: no TCP SRV name
    ]
    assert w.resolved == expected
    assert w.mode is Mode.BACKING_OFF
    (retry,) = w.of(RetryScheduled)
    assert 30.0 <= retry.delay <= 60.0  # type: ignore[attr-defined]
    modes = [(e.old, e.new) for e in w.of(ModeChanged)]  # type: ignore[attr-defined]
    assert modes == [
        (Mode.SIGNED_OUT, Mode.DISCOVERING),
        (Mode.DISCOVERING, Mode.BACKING_OFF),
    ]


def test_tcp_allowed_adds_sipinternal_tcp_in_its_place() -> None:
    order = [n.label for n in lync_lookup_order(allow_tcp=True)]
    assert order == [label for label, _ in LYNC_LOOKUP_ORDER]
    w = World(ClientProfile(domain=DOMAIN, allow_tcp=True), dns={})
    w.sign_in()
    assert ("_sipinternal._tcp.lab.local", "SRV") in w.resolved


def test_signs_in_to_the_priority_0_pool_in_full_service() -> None:
    w = World()
    w.sign_in()
    assert w.mode is Mode.FULL_SERVICE
    assert w.pool == "pool1.lab.local"
    assert w.connects[0].target == Target(
        "pool1.lab.local", 5061, Kind.TLS, POOL1[0], "_sipinternaltls._tcp.lab.local", (POOL1[0],)
    )
    # The lyncdiscover names are asked first (the Autodiscover service is not
    # in the lab, so they give no target), then the SRV name, then the target.
    assert w.resolved[:4] == [
        ("lyncdiscoverinternal.lab.local", "A"),
        ("lyncdiscover.lab.local", "A"),
        ("_sipinternaltls._tcp.lab.local", "SRV"),
        ("pool1.lab.local", "A"),
    ]
    (reg,) = w.of(Registered)
    assert reg.mode is Mode.FULL_SERVICE  # type: ignore[attr-defined]
    assert reg.pool == "pool1.lab.local"
    assert reg.address == "10.0.1.11:5061"
    assert reg.since_sign_in == 0.0  # type: ignore[attr-defined]
    assert reg.wall > 0 and reg.monotonic == w.clock.now


def test_autodiscover_a_records_are_not_sip_targets() -> None:
    dns = paired_pools_dns()
    dns[("lyncdiscoverinternal.lab.local", "A")] = a("lyncdiscoverinternal.lab.local", "10.9.9.9")
    w = World(dns=dns)
    w.sign_in()
    assert all(c.target.address != "10.9.9.9" for c in w.connects)
    assert w.pool == "pool1.lab.local"


@pytest.mark.parametrize("seed", range(20))
def test_srv_order_is_rfc2782_with_the_injected_rng(seed: int) -> None:
    records = [
        (0, 10, 5061, "a.lab.local."),
        (0, 30, 5061, "b.lab.local."),
        (0, 0, 5061, "c.lab.local."),
        (10, 10, 5061, "d.lab.local."),
    ]
    dns = {
        ("_sipinternaltls._tcp.lab.local", "SRV"): srv("_sipinternaltls._tcp.lab.local", *records)
    }
    for i, host in enumerate("abcd"):
        dns[(f"{host}.lab.local", "A")] = a(f"{host}.lab.local", f"10.0.3.{i + 1}")
    w = World(dns=dns, seed=seed)
    w.down = {(f"10.0.3.{i + 1}", 5061): Failure.REFUSED for i in range(4)}
    w.sign_in()
    tried = [c.target.host for c in w.connects]
    expected = [r.host for r in order_srv([SrvRecord(*r) for r in records], random.Random(seed))]
    assert tried == expected
    assert tried[-1] == "d.lab.local"  # priority 10 always last


def test_srv_weights_share_the_first_choice() -> None:
    dns = {
        ("_sipinternaltls._tcp.lab.local", "SRV"): srv(
            "_sipinternaltls._tcp.lab.local",
            (0, 10, 5061, "a.lab.local."),
            (0, 30, 5061, "b.lab.local."),
        ),
        ("a.lab.local", "A"): a("a.lab.local", "10.0.3.1"),
        ("b.lab.local", "A"): a("b.lab.local", "10.0.3.2"),
    }
    rng = random.Random(42)
    first: Counter[str] = Counter()
    for _ in range(2000):
        w = World(dns=dns, rng=rng)
        w.registrars = {
            ("10.0.3.1", 5061): FakeRegistrar("a"),
            ("10.0.3.2", 5061): FakeRegistrar("b"),
        }
        w.sign_in()
        first[w.connects[0].target.host] += 1
    # weight 30 of 40: 75 % (+-5 % is > 6 sigma for n=2000)
    assert 0.70 < first["b.lab.local"] / 2000 < 0.80


def test_a_lone_dot_srv_target_means_no_service() -> None:
    dns = paired_pools_dns()
    dns[("_sipinternaltls._tcp.lab.local", "SRV")] = srv(
        "_sipinternaltls._tcp.lab.local", (0, 0, 0, ".")
    )
    dns[("_sip._tls.lab.local", "SRV")] = srv(
        "_sip._tls.lab.local", (0, 0, 5061, "pool2.lab.local.")
    )
    w = World(dns=dns)
    w.sign_in()
    lookups = [e for e in w.of(DnsLookup) if e.qname == "_sipinternaltls._tcp.lab.local"]  # type: ignore[attr-defined]
    assert lookups[0].status == "no-service"  # type: ignore[attr-defined]
    assert w.pool == "pool2.lab.local"


def test_srv_target_outside_the_domain_is_refused() -> None:
    dns = paired_pools_dns()
    dns[("_sipinternaltls._tcp.lab.local", "SRV")] = srv(
        "_sipinternaltls._tcp.lab.local",
        (0, 10, 5061, "evil.example.com."),
        (10, 10, 5061, "pool2.lab.local."),
    )
    w = World(dns=dns)
    w.sign_in()
    bad = [e for e in w.of(TargetFailed) if e.failure is Failure.BAD_TARGET]  # type: ignore[attr-defined]
    assert bad and bad[0].pool == "evil.example.com"
    assert ("evil.example.com", "A") not in w.resolved
    assert w.pool == "pool2.lab.local"


def test_a_target_that_does_not_resolve_is_skipped() -> None:
    dns = paired_pools_dns()
    del dns[("pool1.lab.local", "A")]
    w = World(dns=dns)
    w.sign_in()
    (bad,) = [e for e in w.of(TargetFailed) if e.failure is Failure.BAD_TARGET]  # type: ignore[attr-defined]
    assert bad.pool == "pool1.lab.local"
    assert w.pool == "pool2.lab.local"


def test_a_record_fallback_names_are_used_after_srv() -> None:
    dns = {("sipinternal.lab.local", "A"): a("sipinternal.lab.local", POOL1[0])}
    w = World(dns=dns)
    w.sign_in()
    assert w.mode is Mode.FULL_SERVICE
    assert w.connects[0].target.host == "sipinternal.lab.local"  # the TLS name checked


def test_the_dns_cache_honours_ttls() -> None:
    w = World(dns=paired_pools_dns(ttl=100))
    w.sign_in()
    asked = len(w.resolved)
    w.advance(50)
    w.close_flow()  # re-register: everything is still cached
    assert len(w.resolved) == asked
    assert w.mode is Mode.FULL_SERVICE
    w.advance(60)  # 110 s: the TTLs ran out
    w.close_flow()
    assert ("_sipinternaltls._tcp.lab.local", "SRV") in w.resolved[asked:]
    assert ("pool1.lab.local", "A") in w.resolved[asked:]


def test_a_repointed_srv_record_is_seen_after_its_ttl() -> None:
    w = World(dns=paired_pools_dns(ttl=30))
    w.sign_in()
    w.dns[("_sipinternaltls._tcp.lab.local", "SRV")] = srv(
        "_sipinternaltls._tcp.lab.local", (0, 10, 5061, "pool2.lab.local."), ttl=30
    )
    w.close_flow()
    assert w.pool == "pool1.lab.local"  # cached: still the old answer
    w.advance(31)
    w.close_flow()
    assert w.pool == "pool2.lab.local"


def test_stale_dns_answers_are_ignored() -> None:
    w = World()
    w.hold_dns = True
    w.sign_in()
    assert w.mode is Mode.DISCOVERING
    w.feed(w.ep.dns_result(a("unrelated.lab.local", "10.1.1.1")))
    assert w.mode is Mode.DISCOVERING and not w.connects
    w.hold_dns = False
    w.release_dns()
    assert w.mode is Mode.FULL_SERVICE


# --- failover on each kind of failure ------------------------------------------------


def _registered_on_pool1() -> World:
    w = World(ClientProfile(domain=DOMAIN, keepalive=KeepAliveConfig(default_interval=(30, 30))))
    w.sign_in()
    assert w.pool == "pool1.lab.local"
    return w


def _failures(w: World) -> list[Failure]:
    return [e.failure for e in w.of(TargetFailed)]  # type: ignore[attr-defined]


def test_failover_when_the_pong_is_missing() -> None:
    w = _registered_on_pool1()
    w.registrars[POOL1].silent = True  # site gone: a silent drop
    w.down[POOL1] = Failure.CONNECT_TIMEOUT
    took = w.run_until(lambda: w.pool == "pool2.lab.local", limit=60)
    # ping at 30 s, no pong within 10 s: the flow has failed at ~40 s
    assert 39.0 <= took <= 41.0
    assert _failures(w)[:2] == [Failure.PONG_TIMEOUT, Failure.CONNECT_TIMEOUT]
    reg = w.of(Registered)[-1]
    assert reg.previous_pool == "pool1.lab.local"  # type: ignore[attr-defined]
    assert reg.outage == pytest.approx(0.0)  # type: ignore[attr-defined]


@pytest.mark.parametrize("failure", [Failure.RESET, Failure.REFUSED])
def test_failover_when_the_flow_is_reset(failure: Failure) -> None:
    w = _registered_on_pool1()
    w.down[POOL1] = Failure.REFUSED
    w.close_flow(failure)
    assert w.pool == "pool2.lab.local"
    assert _failures(w) == [failure, Failure.REFUSED]
    modes = [(e.old, e.new) for e in w.of(ModeChanged)][-3:]  # type: ignore[attr-defined]
    assert modes == [
        (Mode.FULL_SERVICE, Mode.DISCOVERING),
        (Mode.DISCOVERING, Mode.SIGNING_IN),
        (Mode.SIGNING_IN, Mode.FULL_SERVICE),
    ]


def test_failover_on_a_transaction_timeout_is_a_new_transaction() -> None:
    w = World()
    w.registrars[POOL1].silent = True  # accepts the connection, never answers
    w.sign_in()
    assert w.mode is Mode.SIGNING_IN
    took = w.run_until(lambda: w.pool == "pool2.lab.local", limit=40)
    assert 31.5 <= took <= 32.5  # Timer F = 64*T1
    assert _failures(w) == [Failure.TRANSACTION_TIMEOUT]
    r1 = w.registrars[POOL1].registers[0]
    r2 = w.registrars[POOL2].registers[0]
    assert r1.via[0].parameters.get("branch") != r2.via[0].parameters.get("branch")
    assert r1.via[0].parameters.get("branch", "").startswith("z9hG4bK")
    # a different registrar: its own Call-ID
    assert r1.headers.get("Call-ID") != r2.headers.get("Call-ID")


def test_failover_on_503() -> None:
    w = World()
    w.registrars[POOL1].status = 503
    w.sign_in()
    assert w.pool == "pool2.lab.local"
    (failed,) = w.of(TargetFailed)
    assert failed.failure is Failure.SERVICE_UNAVAILABLE  # type: ignore[attr-defined]
    assert failed.status_code == 503  # type: ignore[attr-defined]
    assert 1 in w.closed  # the flow to pool1 was closed


def test_a_503_to_a_refresh_fails_over() -> None:
    w = _registered_on_pool1()
    w.registrars[POOL1].status = 503
    w.run_until(lambda: w.pool == "pool2.lab.local", limit=400, step=5)
    assert Failure.SERVICE_UNAVAILABLE in _failures(w)


def test_tls_failure_moves_on() -> None:
    w = World()
    w.down[POOL1] = Failure.TLS
    w.sign_in()
    assert w.pool == "pool2.lab.local"
    assert _failures(w) == [Failure.TLS]


# --- redirects ------------------------------------------------------------------------


def test_301_is_followed_highest_q_first() -> None:
    dns = paired_pools_dns()
    dns[("pool3.lab.local", "A")] = a("pool3.lab.local", "10.0.3.11")
    w = World(dns=dns)
    w.registrars[POOL1].redirect = (
        "<sip:pool3.lab.local:5061;transport=tls>;q=0.3",
        "<sip:pool2.lab.local:5061;transport=tls>;q=0.7",
    )
    w.sign_in()
    assert w.pool == "pool2.lab.local"
    (red,) = w.of(Redirected)
    assert red.targets == ("pool2.lab.local:5061;q=0.7", "pool3.lab.local:5061;q=0.3")  # type: ignore[attr-defined]
    assert [c.target.host for c in w.connects] == ["pool1.lab.local", "pool2.lab.local"]
    assert w.connects[1].target.source == "redirect from pool1.lab.local"


def test_redirect_to_an_unknown_host_tries_the_next_contact() -> None:
    w = World()
    w.registrars[POOL1].redirect = (
        "<sip:nowhere.lab.local:5061;transport=tls>;q=0.7",
        "<sip:pool2.lab.local:5061;transport=tls>;q=0.3",
    )
    w.sign_in()
    assert w.pool == "pool2.lab.local"
    assert Failure.BAD_TARGET in _failures(w)


def test_backup_redirecting_home_while_home_is_down_ends_in_backoff() -> None:
    """Seed 003's 'several minutes': before the backup takes over, it sends the
    users home (301 home q=0.7, itself q=0.3) and home is down."""
    w = World()
    w.down[POOL1] = Failure.CONNECT_TIMEOUT
    w.registrars[POOL2].redirect = (
        "<sip:pool1.lab.local:5061;transport=tls>;q=0.7",
        "<sip:pool2.lab.local:5061;transport=tls>;q=0.3",
    )
    w.sign_in()
    assert w.mode is Mode.BACKING_OFF
    # Then the backup accepts the users in resiliency mode.
    w.registrars[POOL2].redirect = ()
    w.registrars[POOL2].mode = "resiliency"
    w.run_until(lambda: w.mode is Mode.RESILIENCY_MODE, limit=61)
    assert w.pool == "pool2.lab.local"


def test_redirect_loops_are_cut() -> None:
    dns = paired_pools_dns()
    for i in range(3, 9):
        dns[(f"pool{i}.lab.local", "A")] = a(f"pool{i}.lab.local", f"10.0.{i}.11")
    w = World(ClientProfile(domain=DOMAIN, max_redirects=2), dns=dns)
    for i in range(1, 9):
        addr = (f"10.0.{i}.11", 5061)
        reg = w.registrars.setdefault(addr, FakeRegistrar(f"pool{i}"))
        reg.redirect = (f"<sip:pool{i % 8 + 1}.lab.local:5061;transport=tls>",)
    w.sign_in()
    assert w.mode is Mode.BACKING_OFF
    assert Failure.REDIRECT_LOOP in _failures(w)


def test_a_301_to_a_refresh_sends_the_client_home() -> None:
    """Failback: the backup redirects the user home at the next refresh."""
    w = World()
    w.down[POOL1] = Failure.REFUSED
    w.registrars[POOL2].mode = "resiliency"
    w.sign_in()
    assert w.mode is Mode.RESILIENCY_MODE and w.pool == "pool2.lab.local"
    del w.down[POOL1]
    w.registrars[POOL2].redirect = (
        "<sip:pool1.lab.local:5061;transport=tls>;q=0.7",
        "<sip:pool2.lab.local:5061;transport=tls>;q=0.3",
    )
    w.run_until(lambda: w.pool == "pool1.lab.local", limit=301, step=5)
    assert w.mode is Mode.FULL_SERVICE
    assert Failure.REDIRECTED in _failures(w)


# --- resiliency mode and recovery -------------------------------------------------------


def test_resiliency_mode_is_entered_and_left_on_a_refresh() -> None:
    w = World()
    w.down[POOL1] = Failure.REFUSED
    w.registrars[POOL2].mode = "resiliency"
    w.sign_in()
    assert w.mode is Mode.RESILIENCY_MODE
    # Pool failover by the administrator: the same registrar now gives full service.
    w.registrars[POOL2].mode = "full"
    w.run_until(lambda: w.mode is Mode.FULL_SERVICE, limit=301, step=5)
    assert w.pool == "pool2.lab.local"
    change = w.of(ModeChanged)[-1]
    assert (change.old, change.new) == (Mode.RESILIENCY_MODE, Mode.FULL_SERVICE)  # type: ignore[attr-defined]
    assert w.of(Registered)[-1].refresh is True  # type: ignore[attr-defined]


def test_no_mode_header_means_full_service() -> None:
    w = World()
    w.registrars[POOL1].mode = None
    w.sign_in()
    assert w.mode is Mode.FULL_SERVICE


@pytest.mark.parametrize("event", ["registration", "x-sipdrill-reregister"])
def test_a_notify_nudge_re_registers_at_once(event: str) -> None:
    w = World()
    w.down[POOL1] = Failure.REFUSED
    w.registrars[POOL2].mode = "resiliency"
    w.sign_in()
    w.registrars[POOL2].mode = "full"
    notify = Request("NOTIFY", w.registrars[POOL2].registers[0].uri)
    for name, value in (
        ("Via", "SIP/2.0/TLS 10.0.2.11:5061;branch=z9hG4bKnudge1"),
        ("From", "<sip:pool2.lab.local>;tag=p2"),
        ("To", "<sip:alice@lab.local>"),
        ("Call-ID", "nudge-1"),
        ("CSeq", "1 NOTIFY"),
        ("Event", event),
        ("Subscription-State", "terminated;reason=pool-failover"),
    ):
        notify.headers.add(name, value)
    before = len(w.registrars[POOL2].registers)
    w.inject(notify)
    assert w.mode is Mode.FULL_SERVICE
    assert len(w.registrars[POOL2].registers) == before + 1
    assert w.of(Nudged)
    answered = [m for _, m in w.sent if not isinstance(m, Request)]
    assert answered and answered[-1].code == 200


def test_recovery_to_full_service_after_pool_failover_closes_flows() -> None:
    """The seed 003 drill: home pool down, limited mode on the backup, then
    the administrator's pool failover (the pool closes the flows) gives full service."""
    w = World()
    w.sign_in()
    t0 = w.clock.now
    w.down[POOL1] = Failure.CONNECT_TIMEOUT
    w.registrars[POOL2].mode = "resiliency"
    w.close_flow()
    assert w.mode is Mode.RESILIENCY_MODE
    w.advance(120)
    w.registrars[POOL2].mode = "full"
    w.close_flow()
    assert w.mode is Mode.FULL_SERVICE and w.pool == "pool2.lab.local"
    regs = [e for e in w.of(Registered) if not e.refresh]  # type: ignore[attr-defined]
    assert [r.mode for r in regs] == [Mode.FULL_SERVICE, Mode.RESILIENCY_MODE, Mode.FULL_SERVICE]  # type: ignore[attr-defined]
    assert regs[2].outage == pytest.approx(0.0)  # type: ignore[attr-defined]
    assert w.clock.now - t0 == pytest.approx(120)


def test_outage_measures_time_without_service() -> None:
    w = World()
    w.sign_in()
    w.down[POOL1] = Failure.REFUSED
    w.down[POOL2] = Failure.REFUSED
    w.close_flow()
    assert w.mode is Mode.BACKING_OFF
    delay = w.of(RetryScheduled)[-1].delay  # type: ignore[attr-defined]
    w.down.clear()
    w.run_until(lambda: w.mode is Mode.FULL_SERVICE, limit=61)
    reg = w.of(Registered)[-1]
    assert reg.outage == pytest.approx(delay, abs=0.5)  # type: ignore[attr-defined]


# --- backoff --------------------------------------------------------------------------------


def test_backoff_bounds_grow_to_the_maximum_and_reset_on_success() -> None:
    w = World()
    w.down = {POOL1: Failure.REFUSED, POOL2: Failure.REFUSED}
    w.sign_in()
    for _ in range(9):
        retry = w.of(RetryScheduled)[-1]
        n = retry.failures  # type: ignore[attr-defined]
        window = min(1800.0, 30.0 * 2**n)
        assert window / 2 <= retry.delay <= window  # type: ignore[attr-defined]
        count = len(w.of(RetryScheduled))
        w.run_until(lambda c=count: len(w.of(RetryScheduled)) > c, limit=1801, step=10)
    assert w.of(RetryScheduled)[-1].delay >= 900  # type: ignore[attr-defined]
    w.down.clear()
    w.run_until(lambda: w.mode is Mode.FULL_SERVICE, limit=1801, step=10)
    assert w.ep.backoff.failures == 0


def test_backoff_waits_are_spread_by_the_rng() -> None:
    delays = set()
    for seed in range(10):
        w = World(seed=seed)
        w.down = {POOL1: Failure.REFUSED, POOL2: Failure.REFUSED}
        w.sign_in()
        delays.add(round(w.of(RetryScheduled)[0].delay, 3))  # type: ignore[attr-defined]
    assert len(delays) == 10


# --- registration details -----------------------------------------------------


def test_refresh_at_half_the_expiry_same_call_id_increasing_cseq() -> None:
    w = World()
    w.sign_in()
    reg = w.registrars[POOL1]
    w.run_until(lambda: len(reg.registers) == 2, limit=400, step=1)
    first, second = reg.registers
    t = w.of(Registered)[-1].monotonic - w.of(Registered)[0].monotonic
    assert 299 <= t <= 301
    assert first.headers.get("Call-ID") == second.headers.get("Call-ID")
    assert second.cseq.sequence == first.cseq.sequence + 1
    assert first.via[0].parameters.get("branch") != second.via[0].parameters.get("branch")
    assert first.headers.get("Expires") == "600"
    contact = first.headers.get("Contact") or ""
    assert "+sip.instance=" in contact and "reg-id=1" in contact and ";ob" in contact
    assert w.of(Registered)[-1].refresh is True  # type: ignore[attr-defined]


def test_refresh_honours_a_short_grant_with_a_margin() -> None:
    w = World()
    w.registrars[POOL1].granted = 40
    w.sign_in()
    reg = w.registrars[POOL1]
    w.run_until(lambda: len(reg.registers) == 2, limit=60, step=0.5)
    t = w.of(Registered)[-1].monotonic - w.of(Registered)[0].monotonic
    assert 9.5 <= t <= 10.5  # min(40/2, 40-30)


@pytest.mark.parametrize(
    "template",
    [
        "{contact};expires={granted}",  # echoed as sent: read without a parse
        "{contact};expires={granted};x-note=1",
        "{contact};EXPIRES={granted}",
        "<sip:other@192.0.2.1:5061;transport=tls>;expires=900, {contact};expires={granted}",
        "{contact};reg-id=2;expires={granted}",
    ],
)
def test_the_grant_is_read_from_our_own_contact(template: str) -> None:
    w = World()
    reg = w.registrars[POOL1]
    reg.granted = 40
    reg.contact_template = template
    reg.extra_headers = (("Expires", "900"),)
    w.sign_in()
    w.run_until(lambda: len(reg.registers) == 2, limit=60, step=0.5)
    t = w.of(Registered)[-1].monotonic - w.of(Registered)[0].monotonic
    assert 9.5 <= t <= 10.5  # min(40/2, 40-30): the Contact's 40, not the header's 900


def test_same_call_id_per_registrar_across_sign_ins() -> None:
    w = World()
    w.sign_in()
    w.close_flow()
    regs = w.registrars[POOL1].registers
    assert len(regs) == 2
    assert regs[0].headers.get("Call-ID") == regs[1].headers.get("Call-ID")
    assert regs[1].cseq.sequence > regs[0].cseq.sequence


def test_423_is_retried_with_min_expires() -> None:
    w = World(ClientProfile(domain=DOMAIN, expires=300))
    w.registrars[POOL1].min_expires = 600
    w.sign_in()
    assert w.mode is Mode.FULL_SERVICE
    regs = w.registrars[POOL1].registers
    assert [r.headers.get("Expires") for r in regs] == ["300", "600"]


def test_keepalives_follow_the_flow_timer() -> None:
    w = World()
    w.registrars[POOL1].flow_timer = 20
    w.sign_in()
    w.advance(100)
    assert 5 <= w.pings <= 7  # every 16-20 s
    assert w.mode is Mode.FULL_SERVICE


def test_sign_out_unregisters_and_closes() -> None:
    w = World()
    w.sign_in()
    w.feed(w.ep.sign_out())
    assert w.mode is Mode.SIGNED_OUT
    assert w.registrars[POOL1].registers[-1].headers.get("Expires") == "0"
    assert w.ep.next_deadline() is None
    assert w.ep.conn == 0


def test_illegal_transitions_raise_and_change_nothing() -> None:
    w = World()
    with pytest.raises(IllegalTransition):
        w.ep.sign_out()
    assert w.mode is Mode.SIGNED_OUT
    w.sign_in()
    deadline = w.ep.next_deadline()
    with pytest.raises(IllegalTransition) as info:
        w.ep.sign_in()
    assert info.value.mode is Mode.FULL_SERVICE and info.value.trigger is Trigger.SIGN_IN
    assert w.mode is Mode.FULL_SERVICE and w.ep.next_deadline() == deadline


def test_the_table_reaches_every_mode_and_sign_out_from_all() -> None:
    reachable = {new for (_, _), new in TRANSITIONS.items()}
    assert reachable == set(Mode)
    for mode in Mode:
        if mode is not Mode.SIGNED_OUT:
            assert TRANSITIONS[(mode, Trigger.SIGN_OUT)] is Mode.SIGNED_OUT


def test_stale_flow_inputs_are_ignored() -> None:
    w = World()
    w.sign_in()
    mode = w.mode
    w.feed(w.ep.flow_closed(999))
    w.feed(w.ep.connect_failed(999, Failure.REFUSED))
    w.feed(w.ep.pong(999))
    assert w.mode is mode and not w.of(TargetFailed)
    before = len(w.closed)
    w.feed(w.ep.connected(999, ("10.0.0.1", 1)))
    assert w.closed[before:] == [999]  # an unwanted flow is closed


# --- static targets (Kamailio and friends) ----------------------------------------


def test_static_targets_skip_dns() -> None:
    profile = ClientProfile(
        domain=DOMAIN,
        transport=Kind.UDP,
        static_targets=(Target("127.0.0.1", 5060, Kind.UDP, None, "static"),),
    )
    w = World(profile, dns={})
    w.registrars[("127.0.0.1", 5060)] = FakeRegistrar("kamailio")
    w.sign_in()
    assert w.resolved == []
    assert w.mode is Mode.FULL_SERVICE
    assert w.pings == 0  # no CRLF keep-alives on UDP
    reg = w.registrars[("127.0.0.1", 5060)].registers[0]
    assert reg.via[0].transport == "UDP"


# --- workload ---------------------------------------------------------------------


def _workload_world(**kw: object) -> World:
    profile = ClientProfile(
        domain=DOMAIN,
        workload=(WorkloadKind.IM, WorkloadKind.PRESENCE, WorkloadKind.CONFERENCE),
        workload_interval=10.0,
        **kw,  # type: ignore[arg-type]
    )
    return World(profile)


def test_workload_records_each_result_with_its_status() -> None:
    w = _workload_world()
    w.sign_in()
    w.run_until(lambda: len({e.kind for e in w.of(WorkloadResult)}) == 3, limit=60)  # type: ignore[attr-defined]
    results = w.of(WorkloadResult)
    kinds = {e.kind for e in results}  # type: ignore[attr-defined]
    assert kinds == {"im", "presence", "conference"}
    assert all(e.status_code == 200 and e.ok for e in results)  # type: ignore[attr-defined]
    methods = [m.method for _, m in w.sent if isinstance(m, Request)]
    assert {"MESSAGE", "SUBSCRIBE", "INVITE", "ACK", "BYE"} <= set(methods)
    im = next(m for _, m in w.sent if isinstance(m, Request) and m.method == "MESSAGE")
    assert str(im.uri) == "sip:bob@lab.local"


def test_workload_failures_in_resiliency_mode_are_recorded() -> None:
    w = _workload_world()
    w.down[POOL1] = Failure.REFUSED
    w.registrars[POOL2].mode = "resiliency"
    w.registrars[POOL2].work_status = 403
    w.sign_in()
    w.run_until(lambda: len(w.of(WorkloadResult)) >= 3, limit=60)
    results = w.of(WorkloadResult)
    assert all(e.status_code == 403 and not e.ok for e in results)  # type: ignore[attr-defined]
    assert all(e.mode is Mode.RESILIENCY_MODE for e in results)  # type: ignore[attr-defined]


def test_a_workload_timeout_is_recorded_without_a_status() -> None:
    w = _workload_world()
    w.sign_in()
    w.registrars[POOL1].work_status = 200
    w.registrars[POOL1].silent = True
    w.registrars[POOL1].pong = True
    w.run_until(lambda: bool(w.of(WorkloadResult)), limit=60)
    (first,) = w.of(WorkloadResult)[:1]
    assert first.status_code is None  # type: ignore[attr-defined]
    assert "timeout" in first.reason or "flow" in first.reason


def test_a_503_to_a_workload_request_fails_over() -> None:
    w = _workload_world()
    w.sign_in()
    w.registrars[POOL1].work_status = 503
    w.down[POOL1] = Failure.REFUSED
    w.run_until(lambda: w.pool == "pool2.lab.local", limit=60)
    assert Failure.SERVICE_UNAVAILABLE in _failures(w)


def test_no_workload_without_contacts() -> None:
    w = World(
        ClientProfile(domain=DOMAIN, workload=(WorkloadKind.IM,), workload_interval=5),
        user=ALICE.__class__(uri="sip:zed@lab.local"),
    )
    w.sign_in()
    w.advance(60)
    assert not w.of(WorkloadResult)
    assert w.mode is Mode.FULL_SERVICE


def test_dns_timeout_moves_down_the_order() -> None:
    dns = paired_pools_dns()
    dns[("_sipinternaltls._tcp.lab.local", "SRV")] = DnsAnswer(
        "_sipinternaltls._tcp.lab.local", "SRV", DnsStatus.TIMEOUT
    )
    dns[("sipinternal.lab.local", "A")] = a("sipinternal.lab.local", POOL2[0])
    w = World(dns=dns)
    w.sign_in()
    assert w.pool == "sipinternal.lab.local"
