"""Parts of the pool's SIP side driven through a plain context: no event
loop, no sockets; the clock is a number the test moves."""

from __future__ import annotations

from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from pool_harness import ALICE, BOB, CAROL, DOMAIN, P1, P2, P3
from sipmessage import URI, Request

from sipdrill.pool.metrics import PoolMetrics
from sipdrill.pool.policy import (
    USER_NOT_FOUND,
    Redirect,
    RedirectTarget,
    RegistrarDecision,
    Serve,
    ServiceMode,
)
from sipdrill.pool.settings import PoolSettings
from sipdrill.pool.sip_context import (
    POOL_HEADER,
    SENDER_MODE_HEADER,
    Pretence,
    from_pool,
    strip_pool_claims,
)
from sipdrill.pool.sip_partner import PartnerHeartbeat
from sipdrill.pool.sip_registrar import RegistrarSide
from sipdrill.pool.state import PartnerMonitor, PartnerState
from sipdrill.sip.registrar import Registrar
from sipdrill.sip.transport import Flow, Kind, TimerCore


class NoTimer:
    def poke(self) -> None:
        pass


class PlainContext:
    """What the registrar side and the heartbeat use of their pool
    (:class:`~sipdrill.pool.sip_context.SipContext`); its clock is ``clock``."""

    fqdn = P1
    domain = DOMAIN

    def __init__(self, **settings: Any) -> None:
        self.settings = PoolSettings(pool=P1, state_dir=Path("."), ca_dir=Path("."), **settings)
        self.metrics = PoolMetrics()
        self.clock = 1000.0
        self.decisions: dict[str, RegistrarDecision] = {}
        self.spawned: list[str] = []
        self.closed: list[Flow] = []

    def decide(self, aor: str) -> RegistrarDecision:
        return self.decisions.get(aor, USER_NOT_FOUND)

    def pool_sip_uri(self, pool: str) -> str:
        return f"sip:{pool}:5061;transport=tls"

    def now(self) -> float:
        return self.clock

    def wall(self) -> float:
        return 0.0

    def spawn(self, coro: Awaitable[None], name: str) -> None:
        coro.close()
        self.spawned.append(name)

    def timer(self, core: TimerCore) -> NoTimer:
        return NoTimer()

    def is_open(self, flow: Flow) -> bool:
        return flow not in self.closed

    def close_flow(self, flow: Flow) -> None:
        self.closed.append(flow)

    def is_pool(self, name: str) -> bool:
        return name in (P1, P2, P3)


class Watcher:
    def __init__(self) -> None:
        self.heard: list[tuple[str, object]] = []

    def mode_changed(self, aor: str) -> None:
        self.heard.append(("mode", aor))

    def signed_out(self, aor: str) -> None:
        self.heard.append(("out", aor))

    def flow_closed(self, flow: Flow) -> None:
        self.heard.append(("flow", flow))

    def decisions_changed(self) -> None:
        self.heard.append(("decisions", None))


def flow(n: int, *peer_names: str, kind: Kind = Kind.TLS) -> Flow:
    """Flow ``n``; ``peer_names``: what its peer's verified certificate names."""
    return Flow(kind, ("127.0.0.1", 5061), ("127.0.0.2", 40000 + n), n, peer_names)


def register(aor: str, *, expires: int = 600) -> Request:
    req = Request(method="REGISTER", uri=URI.parse(f"sip:{DOMAIN}"))
    h = req.headers
    h.set("Via", "SIP/2.0/TLS 127.0.0.2:40000;branch=z9hG4bK-1")
    h.set("From", f"<{aor}>;tag=1")
    h.set("To", f"<{aor}>")
    h.set("Call-ID", f"reg-{aor}")
    h.set("CSeq", "1 REGISTER")
    h.set("Contact", f"<sip:{aor[4:].split('@')[0]}@127.0.0.2:40000;transport=tls>")
    h.set("Expires", str(expires))
    return req


def registrar_side(ctx: PlainContext) -> tuple[RegistrarSide, Watcher]:
    watcher = Watcher()
    side = RegistrarSide(ctx, Registrar(DOMAIN, 600, 300, 900), watcher)
    side.start()
    return side, watcher


def test_the_decision_comes_back_with_the_answer() -> None:
    ctx = PlainContext()
    ctx.decisions = {
        ALICE: Serve(ServiceMode.RESILIENCY, P1),
        BOB: Redirect((RedirectTarget(P2, 0.7), RedirectTarget(P1, 0.3))),
    }
    side, watcher = registrar_side(ctx)
    ok = side.register(register(ALICE), flow(1))
    assert (ok.code, ok.headers.get("X-Sipdrill-Mode")) == (200, "resiliency")
    assert side.modes == {ALICE: ServiceMode.RESILIENCY}
    assert watcher.heard == [("mode", ALICE)]
    moved = side.register(register(BOB), flow(2))
    assert moved.code == 301
    assert moved.headers.getlist("Contact") == [
        f"<sip:{P2}:5061;transport=tls>;q=0.7",
        f"<sip:{P1}:5061;transport=tls>;q=0.3",
    ]
    assert ctx.metrics.registry.get_sample_value("sipdrill_pool_redirects_total") == 1
    assert side.register(register(CAROL), flow(3)).code == 404
    assert side.counts() == {"full": 0, "resiliency": 1}


def test_a_changed_decision_unbinds_and_closes_the_flow_without_nudges() -> None:
    ctx = PlainContext(nudge_grace=0)
    ctx.decisions = {ALICE: Serve(ServiceMode.FULL, P1)}
    side, watcher = registrar_side(ctx)
    side.register(register(ALICE), flow(1))
    ctx.decisions[ALICE] = Redirect((RedirectTarget(P2, 1.0),))
    summary = side.reevaluate(f"failover-completed {P1}")
    assert summary["redirected"] == 1 and summary["flows_closed"] == 1
    assert ctx.closed == [flow(1)]
    assert side.registered(ALICE) == [] and side.modes == {}
    assert watcher.heard[1:] == [("out", ALICE), ("decisions", None)]
    assert ctx.spawned == []


def test_nudges_go_out_paced_and_time_out() -> None:
    ctx = PlainContext(nudge_grace=5)
    ctx.decisions = {ALICE: Serve(ServiceMode.FULL, P1)}
    side, _ = registrar_side(ctx)
    side.register(register(ALICE), flow(1))
    ctx.decisions[ALICE] = Serve(ServiceMode.RESILIENCY, P1)
    assert side.reevaluate("partner down")["nudged"] == 1
    assert ctx.spawned == ["nudges"]  # the pacer
    ctx.clock += 60
    side.nudges_due(ctx.clock)
    assert ctx.closed == []  # queued: no deadline until the nudge is sent
    side._nudge(ALICE, "partner down")  # what the pacer does next
    assert ctx.spawned == ["nudges", "nudge"]
    ctx.clock += 5 + ctx.settings.forward_timeout
    side.nudges_due(ctx.clock)
    assert ctx.closed == [flow(1)] and side.modes == {}


class Listener:
    def __init__(self) -> None:
        self.heard: list[str] = []

    def partner_changed(self) -> None:
        self.heard.append("changed")

    def partner_down(self, pool: str) -> None:
        self.heard.append(f"down {pool}")

    def partner_up(self, pool: str) -> None:
        self.heard.append(f"up {pool}")


def test_partner_heartbeats_and_the_monitor_deadlines() -> None:
    ctx = PlainContext()
    monitor = PartnerMonitor(P2, failover_detection_interval=10, failback_interval=5, now=ctx.clock)
    listener = Listener()
    heartbeat = PartnerHeartbeat(ctx, monitor, listener, interval=2.5, timeout=2)
    heartbeat.start()
    ctx.clock += 9
    heartbeat.received()
    assert heartbeat.next_deadline() == ctx.clock + 10
    ctx.clock += 10
    heartbeat.handle_timer(ctx.clock)
    assert monitor.state is PartnerState.DOWN
    assert listener.heard == ["changed", f"down {P2}"]
    heartbeat.received()
    ctx.clock += 5
    heartbeat.handle_timer(ctx.clock)
    assert listener.heard[2:] == ["changed", "changed", f"up {P2}"]
    status = heartbeat.status(ctx.clock)
    assert status["heartbeats"] == {"sent": 0, "answered": 0, "failed": 0, "received": 2}
    assert status["last_event"] == {"event": "PartnerUp", "at": 0.0}


# -- who sent a request: the certificate, never a header -------------------------------
def test_a_pool_is_the_one_lab_pool_its_certificate_names() -> None:
    ctx = PlainContext()
    assert from_pool(ctx, flow(1, P2, f"fe1.{P2}")) == P2
    assert from_pool(ctx, flow(2, P3)) == P3  # a pool of the lab, paired or not
    assert from_pool(ctx, flow(3)) is None  # no certificate: a client
    assert from_pool(ctx, flow(4, "sip.lab.local")) is None  # names no pool
    assert from_pool(ctx, flow(5, P2, P3)) is None  # names two: no such certificate here
    assert from_pool(ctx, flow(6, P1)) is None  # this pool's own name
    # The names are the transport's verified ones; equality stays the connection's.
    assert flow(7, P2) == flow(7)


def request(*headers: tuple[str, str]) -> Request:
    req = register(ALICE)
    for name, value in headers:
        req.headers.add(name, value)
    return req


def test_pool_claims_a_connection_did_not_prove_are_removed() -> None:
    both = ((POOL_HEADER, P2), (SENDER_MODE_HEADER, "full"))
    # A client: both headers go, and it pretended.
    req = request(*both)
    assert strip_pool_claims(req, None) is Pretence.CLIENT
    assert req.headers.get(POOL_HEADER) is None and req.headers.get(SENDER_MODE_HEADER) is None
    req = request((SENDER_MODE_HEADER, "full"))
    assert strip_pool_claims(req, None) is Pretence.CLIENT
    # The pool the certificate names: its sender mode stays; the old header goes.
    req = request(*both)
    assert strip_pool_claims(req, P2) is None
    assert req.headers.get(POOL_HEADER) is None and req.headers.get(SENDER_MODE_HEADER) == "full"
    # Another pool claiming to be P2.
    req = request(*both)
    assert strip_pool_claims(req, P3) is Pretence.WRONG_POOL
    # Nothing claimed.
    assert strip_pool_claims(request(), None) is None


def test_the_sender_mode_is_believed_only_from_a_pool() -> None:
    ctx = PlainContext()
    side, _ = registrar_side(ctx)
    req = request((SENDER_MODE_HEADER, "full"))
    assert side.sender_mode(req, flow(1, P2), ALICE) is ServiceMode.FULL
    # The same header on a client's flow: the pool's own view (not registered
    # here, and USER_NOT_FOUND) is all there is.
    assert side.sender_mode(req, flow(2), ALICE) is None
