"""The Front End pool's SIP side: registrar, backup registrar, presence, IM and
conferences, on TLS 5061 (and TCP/UDP 5060) of the pool's front-end address.

What clients see (the client engineer codes against these):

- ``200`` to REGISTER carries ``X-Sipdrill-Mode: full`` or
  ``X-Sipdrill-Mode: resiliency`` (limited functionality: the user's home
  pool is down and this is its backup registrar);
- a registrar that does not serve the user answers ``301`` with two
  Contacts, ``<sip:HOME:5061;transport=tls>;q=0.7`` and the home pool's
  backup at ``q=0.3`` (:mod:`sipdrill.pool.policy`);
- when a user's mode or serving pool changes under a registration (pool
  failover or failback, the home pool back for the failback interval), the
  pool removes the binding and closes the flow: the client treats that as a
  flow failure and registers again, and learns its new mode or pool;
- refusals in resiliency mode use :func:`~sipdrill.pool.policy.check_feature`'s
  status and reason (403 for contact list and presence, 488 for ad-hoc
  conferences, 480 for a conference whose pool is down).

Between pools (real SIP over TLS, so a network cut stops it): OPTIONS
heartbeats every few seconds with the paired pool (they feed the
:class:`~sipdrill.pool.state.PartnerMonitor`), relayed MESSAGE,
INVITE and BYE, and back-end presence subscriptions. A pool marks what it
sends to another pool with ``X-Sipdrill-Pool: <its FQDN>`` and never relays
a request it got from a pool (one pool-to-pool hop, so no loops). The lab
trusts that header, as pools trust each other's MTLS identity in Lync; the
lab's clients do not forge it.

Methods: REGISTER, OPTIONS, MESSAGE, SUBSCRIBE (``presence``, and Lync's
``vnd-microsoft-roaming-contacts`` as a fetch), NOTIFY (pool to pool),
PUBLISH (``presence``), SERVICE (add a contact: body is the contact's URI,
``Content-Type: application/vnd.sipdrill.add-contact``), INVITE/ACK/BYE to a
conference focus URI (:mod:`sipdrill.pool.conference`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sipmessage import URI, Request, Response

from sipdrill.errors import OperationError, SipError
from sipdrill.pool.conference import (
    ConferenceRef,
    ConferenceTable,
    Participant,
    parse_conference_uri,
)
from sipdrill.pool.policy import (
    CONFERENCE_POOL_DOWN,
    Feature,
    Redirect,
    Refusal,
    RegistrarDecision,
    Serve,
    ServiceMode,
    check_feature,
)
from sipdrill.pool.presence import (
    CONTACTS_CONTENT_TYPE,
    CONTACTS_EVENT,
    PIDF_CONTENT_TYPE,
    PRESENCE_EVENT,
    Availability,
    PresenceState,
    Subscription,
    SubscriptionTable,
    parse_pidf,
    render_contact_list,
    render_pidf,
    subscription_expires,
)
from sipdrill.pool.sip_endpoint import RequestFailed, SipEndpoint
from sipdrill.pool.state import (
    PartnerDown,
    PartnerEvent,
    PartnerMonitor,
    PartnerReturnAborted,
    PartnerReturning,
    PartnerUp,
)
from sipdrill.sip.message import make_response
from sipdrill.sip.registrar import (
    Accept,
    Binding,
    BindingAdded,
    BindingExpired,
    BindingRefreshed,
    BindingRemoved,
    Decision,
    Registrar,
    RegistrarEvent,
    Reject,
    aor_of,
    format_contact,
)
from sipdrill.sip.registrar import Redirect as SipRedirect
from sipdrill.sip.transaction import TimerConfig
from sipdrill.sip.transport import Flow, Kind, Received, TimerDriver, TransportLimits

if TYPE_CHECKING:
    from sipdrill.pool.service import PoolService

log = logging.getLogger("sipdrill.pool")

MODE_HEADER = "X-Sipdrill-Mode"
POOL_HEADER = "X-Sipdrill-Pool"
#: The sender's service mode, on requests one pool relays to another.
SENDER_MODE_HEADER = "X-Sipdrill-Sender-Mode"
ADD_CONTACT_TYPE = "application/vnd.sipdrill.add-contact"
#: The NOTIFY event that asks a client to send a REGISTER refresh now.
NUDGE_EVENT = "x-sipdrill-reregister"
ALLOW = "REGISTER, OPTIONS, MESSAGE, SUBSCRIBE, NOTIFY, PUBLISH, SERVICE, INVITE, ACK, BYE, CANCEL"


@dataclass
class BackendSub:
    """This pool's subscription to a remote user's presence, on behalf of
    its own watchers."""

    presentity: str
    call_id: str
    tag: str
    pool: str | None = None
    cseq: int = 0
    refresh_at: float = 0.0
    #: When the last NOTIFY arrived: a refresh's 200 sent before it is older.
    notified_at: float = float("-inf")


@dataclass
class Reregistration:
    """Users this pool made register again (failover or failback event), and
    how long each took to come back here in its new mode."""

    reason: str
    started_at: float  # loop time
    started_wall: float
    users: set[str]
    done: dict[str, float] = field(default_factory=dict)
    logged: bool = False

    @property
    def complete(self) -> bool:
        return len(self.done) >= len(self.users)

    def summary(self, now: float) -> dict[str, object]:
        times = sorted(self.done.values())

        def pct(p: float) -> float | None:
            if not times:
                return None
            return round(times[min(len(times) - 1, int(p * len(times)))], 3)

        return {
            "reason": self.reason,
            "started_at": self.started_wall,
            "users": len(self.users),
            "reregistered": len(self.done),
            "complete": self.complete,
            "elapsed": round(now - self.started_at, 3),
            "p50": round(statistics.median(times), 3) if times else None,
            "p95": pct(0.95),
            "max": round(times[-1], 3) if times else None,
        }


class _Core:
    """A sans-IO deadline source as a :class:`TimerCore` for TimerDriver."""

    def __init__(
        self, deadline: Callable[[], float | None], fire: Callable[[float], object]
    ) -> None:
        self._deadline = deadline
        self._fire = fire

    def next_deadline(self) -> float | None:
        return self._deadline()

    def handle_timer(self, now: float) -> object:
        return self._fire(now)


class PoolSip:
    def __init__(self, svc: PoolService) -> None:
        self.svc = svc
        topo = svc.topology
        expiry = topo.timers.registration_expiry
        self.domain = topo.domain
        self.registrar = Registrar(
            topo.domain,
            expiry.default,
            expiry.min,
            expiry.max,
            policy=self._policy,
            flow_timer=int(topo.timers.keepalive_interval),
        )
        #: The service mode of every registered AoR (absent: not registered).
        self.modes: dict[str, ServiceMode] = {}
        self._flow_bindings: dict[Flow, set[tuple[str, str]]] = {}
        self._decision: RegistrarDecision | None = None
        #: Users asked to register again: (deadline for a REGISTER, reason).
        self._nudged: dict[str, tuple[float, str]] = {}
        self._nudge_queue: collections.deque[tuple[str, str]] = collections.deque()
        self._nudge_task: asyncio.Task[None] | None = None
        #: Nudged users whose REGISTER has not come yet (the pacing window).
        self._nudge_inflight: set[str] = set()
        self._internal = False
        self.subs = SubscriptionTable()
        self._notify_pending: dict[tuple[str, str], tuple[Subscription, PresenceState]] = {}
        self._notify_running: set[tuple[str, str]] = set()
        self.backend: dict[str, BackendSub] = {}
        self.remote_views: dict[str, PresenceState] = {}
        self.published: dict[str, PresenceState] = {}
        self.conferences = ConferenceTable()
        self.reregistration: Reregistration | None = None
        self.heartbeats = {"sent": 0, "answered": 0, "failed": 0, "received": 0}
        self.last_partner_event: dict[str, object] | None = None
        self._hb_call_id = f"heartbeat-{secrets.token_hex(6)}@{svc.fqdn}"
        self._hb_tag = secrets.token_hex(4)
        self._hb_cseq = 0
        self._partner_flow: Flow | None = None
        self._endpoint: SipEndpoint | None = None
        self._drivers: list[TimerDriver] = []
        self._loops: list[asyncio.Task[None]] = []

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def endpoint(self) -> SipEndpoint:
        if self._endpoint is None:
            raise RuntimeError("the pool's SIP side is not started")
        return self._endpoint

    @property
    def monitor(self) -> PartnerMonitor | None:
        return self.svc.monitor

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def start(self) -> list[tuple[Kind, tuple[str, int]]]:
        svc = self.svc
        limits = TransportLimits(max_connections=svc.settings.max_connections)
        self._endpoint = SipEndpoint(
            self._handle,
            limits=limits,
            timers=TimerConfig(t1=svc.settings.sip_t1),
            server_name=f"sipdrill-pool/{svc.fqdn}",
            on_flow_closed=self._flow_closed,
        )
        pool = svc.pool
        host = svc.address
        listens = [(Kind.TLS, host, pool.sip_tls_port), (Kind.TCP, host, pool.sip_tcp_port)]
        listens.append((Kind.UDP, host, pool.sip_udp_port))
        bound = await self.endpoint.listen(listens, ssl_context=svc.server_ssl)
        self._expiry = TimerDriver(_Core(self.registrar.next_deadline, self._expire))
        self._drivers.append(self._expiry)
        if self.monitor is not None:
            self._monitor_driver = TimerDriver(
                _Core(self.monitor.next_deadline, self._monitor_timer)
            )
            self._drivers.append(self._monitor_driver)
            self._monitor_driver.poke()
            self._loops.append(
                asyncio.get_running_loop().create_task(self._heartbeat_loop(), name="heartbeat")
            )
        self._loops.append(
            asyncio.get_running_loop().create_task(self._housekeeping(), name="housekeeping")
        )
        return bound

    async def close(self) -> None:
        for driver in self._drivers:
            driver.stop()
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops.clear()
        if self._endpoint is not None:
            await self._endpoint.close()

    # -- decisions ----------------------------------------------------------------------
    def registered(self, aor: str) -> list[Binding]:
        return self.registrar.lookup(aor, self._now())

    def counts(self) -> dict[str, int]:
        out = {"full": 0, "resiliency": 0}
        for mode in self.modes.values():
            out[mode.value] += 1
        return out

    def _policy(self, aor: str, request: Request) -> Decision | None:
        if self._internal:
            return Accept()
        decision = self.svc.decide(aor)
        self._decision = decision
        if isinstance(decision, Serve):
            return None
        if isinstance(decision, Redirect):
            self.svc.metrics.redirects.inc()
            return SipRedirect(
                tuple((self.svc.pool_sip_uri(t.pool), t.q) for t in decision.targets),
                decision.status_code,
            )
        return Reject(decision.status_code, decision.reason)

    def _sender_mode(self, request: Request, sender: str) -> ServiceMode | None:
        if self._from_pool(request) is not None:
            text = request.headers.get(SENDER_MODE_HEADER)
            try:
                return ServiceMode(text) if text else None
            except ValueError:
                return None
        mode = self.modes.get(sender)
        if mode is not None:
            return mode
        decision = self.svc.decide(sender)
        return decision.mode if isinstance(decision, Serve) else None

    def _from_pool(self, request: Request) -> str | None:
        value = request.headers.get(POOL_HEADER)
        if value is None:
            return None
        pool = value.strip().lower()
        return pool if pool in self.svc.pool_names and pool != self.svc.fqdn else None

    def _refuse(self, request: Request, refusal: Refusal) -> Response:
        if refusal.feature is not None:
            self.svc.metrics.refusals.labels(refusal.feature.value).inc()
        return make_response(request, refusal.status_code, refusal.reason)

    # -- dispatch -------------------------------------------------------------------------
    def _handle(self, request: Request, rx: Received) -> Response | Awaitable[Response] | None:
        method = request.method.upper()
        if method == "REGISTER":
            return self._register(request, rx)
        if method == "ACK":
            return None  # the 2xx of a conference join needs nothing more (see conference.py)
        handlers = {
            "OPTIONS": self._options,
            "MESSAGE": self._message,
            "SUBSCRIBE": self._subscribe,
            "NOTIFY": self._notify_in,
            "PUBLISH": self._publish,
            "SERVICE": self._service,
            "INVITE": self._invite,
            "BYE": self._bye,
        }
        handler = handlers.get(method)
        if handler is None:
            status = 481 if method == "CANCEL" else 405
            return self._count(method, make_response(request, status, headers=[("Allow", ALLOW)]))
        try:
            answer = handler(request, rx)
        except SipError as exc:
            answer = make_response(request, exc.status_code, exc.reason, exc.headers)
        if isinstance(answer, Response):
            return self._count(method, answer)
        return self._count_later(method, answer)

    def _count(self, method: str, response: Response) -> Response:
        self.svc.metrics.requests.labels(method, f"{response.code // 100}xx").inc()
        return response

    async def _count_later(self, method: str, answer: Awaitable[Response]) -> Response:
        return self._count(method, await answer)

    # -- REGISTER -------------------------------------------------------------------------
    def _register(self, request: Request, rx: Received) -> Response:
        now = self._now()
        self._decision = None
        result = self.registrar.handle(request, now, rx.flow)
        if result.aor is not None:
            self._nudged.pop(result.aor, None)
            self._nudge_inflight.discard(result.aor)
        metrics = self.svc.metrics.register_requests
        self._apply(result.events)
        code = result.status
        if code == 200 and isinstance(self._decision, Serve) and result.aor:
            aor, mode = result.aor, self._decision.mode
            result.response.headers.add(MODE_HEADER, mode.value)
            previous = self.modes.get(aor)
            if self.registrar.lookup(aor):
                self.modes[aor] = mode
                self._came_back(aor, now)
            if previous is not self.modes.get(aor):
                self._presence_changed(aor)
            metrics.labels("ok").inc()
        elif 300 <= code < 400:
            metrics.labels("redirect").inc()
            if result.aor and self.registrar.lookup(result.aor):
                # A registered user sent elsewhere (the answer to a nudge or a
                # refresh): its bindings here are over. The flow stays open
                # so the 301 reaches the client, which leaves it.
                for b in self.registrar.lookup(result.aor):
                    self.unbind(b)
        elif code >= 400:
            metrics.labels("refused" if code < 500 else "error").inc()
        else:
            metrics.labels("ok").inc()
        self._expiry.poke()
        return result.response

    def _came_back(self, aor: str, now: float) -> None:
        rr = self.reregistration
        if rr is None or aor not in rr.users or aor in rr.done:
            return
        took = now - rr.started_at
        rr.done[aor] = took
        self.svc.metrics.reregister_seconds.observe(took)
        if rr.complete and not rr.logged:
            rr.logged = True
            s = rr.summary(now)
            log.info(
                "all %d users registered again after %s: p50 %.2fs p95 %.2fs max %.2fs",
                s["users"], rr.reason, s["p50"], s["p95"], s["max"],
            )

    def _apply(self, events: Iterable[RegistrarEvent]) -> None:
        touched: set[str] = set()
        for ev in events:
            b = ev.binding
            if isinstance(ev, BindingAdded):
                self._index(b)
            elif isinstance(ev, BindingRefreshed):
                if ev.previous.source != b.source:
                    self._unindex(ev.previous)
                    self._index(b)
            elif isinstance(ev, BindingRemoved | BindingExpired):
                self._unindex(b)
            touched.add(b.aor)
        for aor in touched:
            if not self.registrar.lookup(aor) and aor in self.modes:
                del self.modes[aor]
                self.published.pop(aor, None)
                self._presence_changed(aor)

    def _index(self, b: Binding) -> None:
        if isinstance(b.source, Flow) and b.source.reliable:
            self._flow_bindings.setdefault(b.source, set()).add((b.aor, b.key))

    def _unindex(self, b: Binding) -> None:
        if isinstance(b.source, Flow):
            keys = self._flow_bindings.get(b.source)
            if keys is not None:
                keys.discard((b.aor, b.key))
                if not keys:
                    del self._flow_bindings[b.source]

    def _expire(self, now: float) -> object:
        self._apply(self.registrar.expire(now))
        return None

    def unbind(self, binding: Binding) -> None:
        """Remove one binding through the registrar's public path: an
        internal REGISTER with Expires 0 for that contact, as if the UA had
        unregistered (the policy hook is bypassed)."""
        req = Request(method="REGISTER", uri=URI.parse(f"sip:{self.domain}"))
        h = req.headers
        h.set("Via", f"SIP/2.0/TLS 127.0.0.1:0;branch=z9hG4bK{secrets.token_hex(8)}")
        h.set("From", f"<{binding.aor}>;tag=unbind")
        h.set("To", f"<{binding.aor}>")
        h.set("Call-ID", binding.call_id)
        h.set("CSeq", f"{binding.cseq + 1} REGISTER")
        h.set("Contact", format_contact(binding.contact, expires="0"))
        self._internal = True
        try:
            result = self.registrar.handle(req, self._now())
        finally:
            self._internal = False
        if result.status != 200:
            log.warning("could not remove binding %s of %s: %s", binding.key, binding.aor,
                        result.status)
        self._apply(result.events)

    def unbind_aor(self, aor: str) -> set[Flow]:
        flows: set[Flow] = set()
        for b in self.registrar.lookup(aor):
            if isinstance(b.source, Flow):
                flows.add(b.source)
            self.unbind(b)
        return flows

    def _flow_closed(self, flow: Flow) -> None:
        # RFC 5626: a registration is reachable only through its flow; once
        # the flow is gone, so is the binding (and the user's presence).
        keys = self._flow_bindings.pop(flow, set())
        for aor, key in keys:
            for b in self.registrar.lookup(aor):
                if b.key == key and b.source == flow:
                    self.unbind(b)
        for sub in self.subs:
            if sub.route == flow:
                self.subs.remove(sub.key)

    def close_flows(self, flows: Iterable[Flow], reason: str) -> int:
        n = 0
        for flow in flows:
            if flow.reliable:
                self.endpoint.transport.close_flow(flow)
                self.svc.metrics.flows_closed.labels(reason).inc()
                n += 1
        return n

    def reevaluate(self, reason: str) -> dict[str, object]:
        """After a pool failover event or a partner change: every registered
        user whose mode or pool changed must register again, to learn its
        new mode (200 with the new ``X-Sipdrill-Mode``) or its pool (301).

        First a nudge: a NOTIFY with ``Event: x-sipdrill-reregister`` on the
        flow, which the lab's clients answer with an immediate REGISTER
        refresh. A client that has not registered again after
        ``nudge_grace`` seconds (or that the NOTIFY cannot reach) loses its
        binding and its flow: every SIP client treats that as a flow failure
        and signs in again, after its RFC 5626 backoff. Users expected back
        here are timed (:class:`Reregistration`, ``/status``, a histogram).
        """
        now = self._now()
        back_here: set[str] = set()
        moved_away: list[str] = []
        for aor, mode in list(self.modes.items()):
            decision = self.svc.decide(aor)
            if isinstance(decision, Serve):
                if decision.mode is not mode:
                    back_here.add(aor)
            else:
                moved_away.append(aor)
        affected = [*back_here, *moved_away]
        if back_here:
            self.reregistration = Reregistration(reason, now, time.time(), back_here)
        grace = self.svc.settings.nudge_grace
        closed = 0
        if grace > 0:
            for aor in affected:
                # No deadline until the nudge is sent: they go out paced.
                self._nudged[aor] = (float("inf"), reason)
                self._nudge_queue.append((aor, reason))
            if affected and self._nudge_task is None:
                self._nudge_task = self.endpoint.spawn(self._nudge_pacer(), name="nudges")
        else:
            closed = self.force_reregister(affected, reason)
        self._end_orphaned_conferences()
        self.refresh_presence()
        summary: dict[str, object] = {
            "reason": reason,
            "mode_changed": len(back_here),
            "redirected": len(moved_away),
            "nudged": len(affected) if grace > 0 else 0,
            "flows_closed": closed,
        }
        if affected:
            log.info(
                "%s: %d users change mode here, %d go to another pool; %s",
                reason, len(back_here), len(moved_away),
                f"nudged (flows closed after {grace:g}s without a REGISTER)" if grace > 0
                else f"{closed} flows closed",
            )
        return summary

    def force_reregister(self, aors: Iterable[str], reason: str) -> int:
        """Unbind ``aors`` and close their flows; the number of flows closed."""
        flows: set[Flow] = set()
        for aor in aors:
            self._nudged.pop(aor, None)
            self._nudge_inflight.discard(aor)
            flows |= self.unbind_aor(aor)
        return self.close_flows(flows, reason.split(" ", 1)[0])

    async def _nudge_pacer(self) -> None:
        """Send queued nudges at most ``nudge_rate`` per second and with at
        most ``nudge_window`` users nudged but not yet registered again: ten
        thousand NOTIFYs (and the REGISTERs they bring back) at once would
        stall both ends, and a grace period would run out in the queue."""
        settings = self.svc.settings
        tick = 0.05
        per_tick = max(1, int(settings.nudge_rate * tick))
        try:
            while self._nudge_queue:
                room = settings.nudge_window - len(self._nudge_inflight)
                for _ in range(min(per_tick, room, len(self._nudge_queue))):
                    aor, reason = self._nudge_queue.popleft()
                    if aor in self._nudged:  # not registered again meanwhile
                        self._nudge(aor, reason)
                await asyncio.sleep(tick)
        finally:
            self._nudge_task = None

    def _nudge(self, aor: str, reason: str) -> None:
        settings = self.svc.settings
        now = self._now()
        sent = False
        for b in self.registrar.lookup(aor):
            if isinstance(b.source, Flow) and self.endpoint.transport.is_open(b.source):
                self.endpoint.spawn(self._send_nudge(b, b.source, reason), name="nudge")
                sent = True
        if sent:
            self._nudged[aor] = (now + settings.nudge_grace + settings.forward_timeout, reason)
            self._nudge_inflight.add(aor)
        else:
            self.force_reregister([aor], reason)

    async def _send_nudge(self, b: Binding, flow: Flow, reason: str) -> None:
        req = self._pool_request(
            "NOTIFY", b.contact.uri, flow,
            from_=f"<sip:{self.svc.fqdn}>;tag={secrets.token_hex(4)}", to=f"<{b.aor}>",
            call_id=f"nudge-{secrets.token_hex(8)}@{self.svc.fqdn}", cseq=1,
            headers=[("Event", NUDGE_EVENT), ("Subscription-State", "terminated;reason=" +
                      reason.split(" ", 1)[0])],
            to_pool=False,
        )
        try:
            response = await self.endpoint.request(
                req, flow, give_up_after=self.svc.settings.forward_timeout
            )
        except RequestFailed as exc:
            log.info("nudge to %s failed (%s): closing its flow", b.aor, exc)
            self.force_reregister([b.aor], reason)
            return
        if b.aor not in self._nudged:
            return
        if response.code >= 300:
            self.force_reregister([b.aor], reason)
        else:
            # The client is there and heard us: its REGISTER is due within
            # the grace period from now.
            self._nudged[b.aor] = (self._now() + self.svc.settings.nudge_grace, reason)

    def _nudges_due(self, now: float) -> None:
        due = [aor for aor, (deadline, _) in self._nudged.items() if deadline <= now]
        by_reason: dict[str, list[str]] = {}
        for aor in due:
            by_reason.setdefault(self._nudged[aor][1], []).append(aor)
        for reason, aors in by_reason.items():
            n = self.force_reregister(aors, reason)
            log.info("%s: %d users did not register again when nudged; %d flows closed",
                     reason, len(aors), n)

    # -- heartbeats ---------------------------------------------------------------------
    def _heartbeat_request(self, flow: Flow) -> Request:
        partner = self.svc.partner
        assert partner is not None
        port = self.svc.topology.pool(partner).sip_tls_port
        req = Request(method="OPTIONS", uri=URI.parse(f"sip:{partner}:{port};transport=tls"))
        self._hb_cseq += 1
        h = req.headers
        h.set("Via", self.endpoint.via_for(flow, self.endpoint.new_branch()))
        h.set("Max-Forwards", "70")
        h.set("From", f"<sip:{self.svc.fqdn}>;tag={self._hb_tag}")
        h.set("To", f"<sip:{partner}>")
        h.set("Call-ID", self._hb_call_id)
        h.set("CSeq", f"{self._hb_cseq} OPTIONS")
        h.set(POOL_HEADER, self.svc.fqdn)
        return req

    async def _heartbeat_loop(self) -> None:
        interval, timeout = self.svc.heartbeat_interval, self.svc.heartbeat_timeout
        metrics = self.svc.metrics.heartbeats
        loop = asyncio.get_running_loop()
        partner = self.svc.partner
        assert partner is not None
        failures = 0
        while True:
            started = loop.time()
            flow: Flow | None = None
            try:
                async with asyncio.timeout(timeout):
                    flow = await self.pool_flow(partner)
                self._partner_flow = flow
                self.heartbeats["sent"] += 1
                metrics.labels("sent").inc()
                response = await self.endpoint.request(
                    self._heartbeat_request(flow), flow, give_up_after=timeout
                )
                if not 200 <= response.code < 300:
                    raise RequestFailed("status", str(response.code))
                failures = 0
                self.heartbeats["answered"] += 1
                metrics.labels("answered").inc()
                self._heartbeat(loop.time())
            except (RequestFailed, TimeoutError) as exc:
                failures += 1
                self.heartbeats["failed"] += 1
                metrics.labels("failed").inc()
                log.debug("heartbeat to %s failed: %s", partner, exc)
                # A half-dead connection (the peer stopped, the path cut)
                # would swallow every later heartbeat: start afresh. Not at
                # the first miss, though: on a loaded host a reconnect (a TLS
                # handshake) costs more than waiting for one late answer.
                if flow is not None and failures >= 2:
                    self.endpoint.transport.close_flow(flow)
            await asyncio.sleep(max(0.0, started + interval - loop.time()))

    def _heartbeat(self, now: float) -> None:
        monitor = self.monitor
        if monitor is None:
            return
        self._partner_events(monitor.on_heartbeat(now))
        self._monitor_driver.poke()

    def _monitor_timer(self, now: float) -> object:
        if self.monitor is not None:
            self._partner_events(self.monitor.on_timer(now))
        return None

    def _partner_events(self, events: list[PartnerEvent]) -> None:
        if events:
            self.endpoint.loop.call_soon(self.refresh_presence)
        for ev in events:
            self.last_partner_event = {"event": type(ev).__name__, "at": time.time()}
            if isinstance(ev, PartnerDown):
                log.warning(
                    "partner pool %s down: no heartbeat for %.1fs; taking its users in "
                    "resiliency mode",
                    ev.partner, ev.at - ev.last_heartbeat,
                )
                self._remote_pool_down(ev.partner)
            elif isinstance(ev, PartnerReturning):
                log.info("partner pool %s is back; its users stay here until it has been "
                         "back for the failback interval", ev.partner)
            elif isinstance(ev, PartnerUp):
                log.info("partner pool %s back for the failback interval: sending its "
                         "users home", ev.partner)
                self.reevaluate(f"failback {ev.partner}")
            elif isinstance(ev, PartnerReturnAborted):
                log.warning("partner pool %s went silent again before the failback interval",
                            ev.partner)

    # -- pool-to-pool plumbing ----------------------------------------------------------
    async def pool_flow(self, pool: str) -> Flow:
        host, port = self.svc.pool_sip_address(pool)
        return await self.endpoint.open_flow(
            Kind.TLS, host, port, ssl_context=self.svc.client_ssl, server_hostname=pool
        )

    def candidates(self, home: str) -> list[str]:
        """Where a user homed on ``home`` may be: the pool that serves them,
        their home, the home's backup (resiliency mode); this pool excluded."""
        failover = self.svc.failover
        out: list[str] = []
        for pool in (failover.serving_pool(home), home, self.svc.backups.get(home)):
            if pool and pool not in out and pool != self.svc.fqdn:
                out.append(pool)
        return out

    async def forward(
        self, request: Request, pools: list[str], sender_mode: ServiceMode | None
    ) -> Response | None:
        """Relay to the first of ``pools`` that takes it (RFC 3263-style: a
        transport failure, a timeout, 503, 480 or 404 moves on to the next;
        a 301 adds the pool it names, once). None when no pool answered."""
        headers = [(POOL_HEADER, self.svc.fqdn)]
        if sender_mode is not None:
            headers.append((SENDER_MODE_HEADER, sender_mode.value))
        todo = list(pools)
        seen = set(todo)
        last: Response | None = None
        metrics = self.svc.metrics.forwarded
        while todo:
            pool = todo.pop(0)
            try:
                flow = await self.pool_flow(pool)
                response = await self.endpoint.proxy(
                    request, flow, headers=headers, give_up_after=self.svc.settings.forward_timeout
                )
            except RequestFailed as exc:
                metrics.labels("failed").inc()
                log.info("%s to %s via %s failed: %s", request.method, request.uri, pool, exc)
                continue
            metrics.labels("ok").inc()
            if response.code == 301:
                for target in self._redirect_pools(response):
                    if target not in seen and target != self.svc.fqdn:
                        seen.add(target)
                        todo.append(target)
                last = response
                continue
            if response.code in (404, 480, 503) and todo:
                last = response
                continue
            return response
        return last if last is not None and last.code != 301 else None

    def _redirect_pools(self, response: Response) -> list[str]:
        pools = []
        try:
            contacts = response.contact
        except ValueError:
            return []
        for c in contacts:
            host = c.uri.host.lower()
            if host in self.svc.pool_names:
                pools.append(host)
        return pools

    async def deliver_local(self, request: Request, aor: str) -> Response | None:
        """Relay ``request`` to ``aor``'s client(s) registered here: the
        binding whose contact is the Request-URI first (an in-dialog
        request), then the others, best q first. None if none took it."""
        bindings = self.registered(aor)
        if not bindings:
            return None
        target = str(request.uri)
        bindings.sort(key=lambda b: str(b.contact.uri) != target)
        for b in bindings:
            flow = b.source
            if not isinstance(flow, Flow) or not self.endpoint.transport.is_open(flow):
                continue
            try:
                return await self.endpoint.proxy(
                    request, flow, uri=b.contact.uri,
                    give_up_after=self.svc.settings.forward_timeout,
                )
            except RequestFailed as exc:
                log.info("%s to %s on %s failed: %s", request.method, aor, flow.remote, exc)
        return None

    def _target_aor(self, request: Request) -> str:
        # A request a pool relays inside a dialog (a BYE ending a conference)
        # names the client's contact, not the AoR: the To header has it.
        to = request.to_address
        if self._from_pool(request) is not None and "tag" in to.parameters:
            return aor_of(to.uri)
        return aor_of(request.uri)

    async def route_to_user(self, request: Request, target: str) -> Response:
        response = await self.deliver_local(request, target)
        if response is not None:
            return response
        if self._from_pool(request) is not None:
            return make_response(request, 480, "Temporarily Unavailable: not registered here")
        home = self.svc.home_of(target)
        if home is None:
            return make_response(request, 404, "Not Found: no such user")
        sender = aor_of(request.from_address.uri)
        forwarded = await self.forward(
            request, self.candidates(home), self._sender_mode(request, sender)
        )
        return forwarded or make_response(request, 480, "Temporarily Unavailable")

    # -- OPTIONS, MESSAGE -----------------------------------------------------------------
    def _options(self, request: Request, rx: Received) -> Response:
        if self._from_pool(request) == self.svc.partner and self.monitor is not None:
            self.heartbeats["received"] += 1
            self.svc.metrics.heartbeats.labels("received").inc()
            self._heartbeat(self._now())
        return make_response(
            request, 200, headers=[("Allow", ALLOW), ("Supported", "path, outbound")]
        )

    def _in_domain(self, uri: URI) -> bool:
        return uri.host.lower() == self.domain

    def _message(self, request: Request, rx: Received) -> Awaitable[Response] | Response:
        if not self._in_domain(request.uri):
            return make_response(request, 404, "Not Found: not a user of this lab")
        # Peer-to-peer IM works in every mode (docs/reference.md).
        return self.route_to_user(request, self._target_aor(request))

    # -- presence -----------------------------------------------------------------------
    def presence_of(self, aor: str) -> PresenceState | None:
        """This pool's own view of ``aor``: None when another pool holds it."""
        if self.registered(aor):
            if self.modes.get(aor) is ServiceMode.RESILIENCY:
                return PresenceState(aor, Availability.UNKNOWN)
            return self.published.get(aor) or PresenceState(aor, Availability.AVAILABLE)
        decision = self.svc.decide(aor)
        if isinstance(decision, Serve) and decision.mode is ServiceMode.FULL:
            return PresenceState(aor, Availability.OFFLINE)
        # A partner's user this backup registrar would take in resiliency
        # mode, but who is not here: the home pool knows (or, unreachable,
        # makes the back-end subscription say unknown).
        return None

    def view_of(self, aor: str) -> PresenceState:
        local = self.presence_of(aor)
        if local is not None:
            return local
        return self.remote_views.get(aor) or PresenceState(aor, Availability.UNKNOWN)

    def _presence_changed(self, aor: str) -> None:
        if not self.subs.watching(aor):
            return
        state = self.view_of(aor)
        for sub in self.subs.watching(aor):
            if sub.last_sent != state:
                self._queue_notify(sub, state)

    def _subscribe(self, request: Request, rx: Received) -> Response | Awaitable[Response]:
        event = (request.headers.get("Event") or "").split(";", 1)[0].strip().lower()
        if event == CONTACTS_EVENT:
            return self._fetch_contacts(request, rx)
        if event != PRESENCE_EVENT:
            return make_response(request, 489, "Bad Event", [("Allow-Events", "presence")])
        presentity = aor_of(request.uri)
        pool = self._from_pool(request)
        if pool is not None:
            return self._pool_subscribe(request, pool, presentity)
        sender = aor_of(request.from_address.uri)
        mode = self._sender_mode(request, sender)
        if mode is None:
            return make_response(request, 403, "Forbidden: register with this pool first")
        refusal = check_feature(Feature.PRESENCE_SUBSCRIBE, mode)
        if refusal is not None:
            return self._refuse(request, refusal)
        return self._client_subscribe(request, rx, sender, presentity)

    def _expires(self, request: Request) -> int:
        text = request.headers.get("Expires")
        try:
            return subscription_expires(int(text) if text is not None else None)
        except ValueError:
            raise SipError("Bad Expires", 400) from None

    async def _client_subscribe(
        self, request: Request, rx: Received, watcher: str, presentity: str
    ) -> Response:
        expires = self._expires(request)
        key = (request.call_id, request.from_address.parameters.get("tag") or "")
        existing = self.subs.get(key)
        if expires == 0:
            if existing is not None:
                self.subs.remove(key)
            response = make_response(request, 200, headers=[("Expires", "0")],
                                     to_tag=existing.local_tag if existing else None)
            return response
        if self.presence_of(presentity) is None:
            await self._ensure_backend(presentity)
        try:
            contact = request.contact[0].uri
        except (ValueError, IndexError):
            raise SipError("Bad Request: SUBSCRIBE needs a Contact", 400) from None
        sub = existing or Subscription(
            call_id=key[0],
            watcher_tag=key[1],
            watcher=watcher,
            presentity=presentity,
            local_tag=secrets.token_hex(6),
            remote_target=str(contact),
            expires_at=0.0,
            route=rx.flow,
        )
        sub.expires_at = self._now() + expires
        sub.route = rx.flow
        self.subs.put(sub)
        self._queue_notify(sub, self.view_of(presentity))
        return make_response(
            request, 200, headers=[("Expires", str(expires)), ("Contact", self._contact())],
            to_tag=sub.local_tag,
        )

    def _contact(self) -> str:
        return f"<sip:{self.svc.fqdn}:{self.svc.pool.sip_tls_port};transport=tls>"

    def _pool_subscribe(self, request: Request, pool: str, presentity: str) -> Response:
        state = self.presence_of(presentity)
        if state is None:
            return make_response(request, 404, "Not Found: presence not held here")
        expires = self._expires(request)
        key = (request.call_id, request.from_address.parameters.get("tag") or "")
        existing = self.subs.get(key)
        if expires == 0:
            self.subs.remove(key)
            return make_response(request, 200, headers=[("Expires", "0")])
        sub = existing or Subscription(
            call_id=key[0],
            watcher_tag=key[1],
            watcher=pool,
            presentity=presentity,
            local_tag=secrets.token_hex(6),
            remote_target=f"sip:{pool}",
            expires_at=0.0,
            pool=pool,
        )
        sub.expires_at = self._now() + expires
        sub.last_sent = state
        self.subs.put(sub)
        # The state rides on the 200 (pool to pool only), so the watcher's
        # pool can answer its client without waiting for a NOTIFY.
        return make_response(
            request, 200,
            headers=[("Expires", str(expires)), ("Content-Type", PIDF_CONTENT_TYPE)],
            to_tag=sub.local_tag, body=render_pidf(state),
        )

    async def _ensure_backend(self, presentity: str) -> None:
        sub = self.backend.get(presentity)
        if sub is not None and sub.pool is not None and sub.refresh_at > self._now():
            return
        await self._backend_subscribe(presentity)

    async def _backend_subscribe(self, presentity: str) -> None:
        sub = self.backend.get(presentity)
        if sub is None:
            sub = self.backend[presentity] = BackendSub(
                presentity, f"presence-{secrets.token_hex(8)}@{self.svc.fqdn}",
                secrets.token_hex(4),
            )
        home = self.svc.home_of(presentity)
        pools = self.candidates(home) if home else []
        if sub.pool in pools:  # where it worked last time first
            pools.remove(sub.pool)
            pools.insert(0, sub.pool)
        refresh = self.svc.settings.presence_refresh
        state: PresenceState | None = None
        asked_at = self._now()
        for pool in pools:
            try:
                flow = await self.pool_flow(pool)
                sub.cseq += 1
                req = self._pool_request(
                    "SUBSCRIBE", URI.parse(presentity), flow,
                    from_=f"<sip:{self.svc.fqdn}>;tag={sub.tag}", to=f"<{presentity}>",
                    call_id=sub.call_id, cseq=sub.cseq,
                    headers=[("Event", PRESENCE_EVENT), ("Expires", str(int(refresh * 3))),
                             ("Contact", self._contact())],
                )
                response = await self.endpoint.request(
                    req, flow, give_up_after=self.svc.settings.forward_timeout
                )
            except RequestFailed as exc:
                log.info("presence of %s from %s: %s", presentity, pool, exc)
                continue
            if response.code == 200:
                try:
                    state = parse_pidf(response.body)
                except ValueError:
                    state = PresenceState(presentity, Availability.UNKNOWN)
                sub.pool = pool
                break
        if state is None:
            sub.pool = None
            state = PresenceState(presentity, Availability.UNKNOWN)
            # Unreachable: try again sooner than a normal refresh.
            sub.refresh_at = self._now() + min(refresh, 5.0)
        else:
            sub.refresh_at = self._now() + refresh
            if sub.notified_at > asked_at:
                return  # a NOTIFY overtook this answer: it is newer
        self._set_remote_view(presentity, state)

    def _set_remote_view(self, presentity: str, state: PresenceState) -> None:
        previous = self.remote_views.get(presentity)
        self.remote_views[presentity] = state
        if previous != state:
            self._presence_changed(presentity)

    def refresh_presence(self) -> None:
        """Tell watchers whatever changed: after a partner or failover event
        this pool's own view of many users changes at once."""
        for presentity in self.subs.presentities():
            self._presence_changed(presentity)

    def _remote_pool_down(self, pool: str) -> None:
        for sub in list(self.backend.values()):
            if sub.pool == pool:
                sub.pool = None
                sub.refresh_at = 0.0
                self._set_remote_view(
                    sub.presentity, PresenceState(sub.presentity, Availability.UNKNOWN)
                )

    def _notify_in(self, request: Request, rx: Received) -> Response:
        pool = self._from_pool(request)
        if pool is None:
            return make_response(request, 403, "Forbidden: this pool accepts NOTIFY from pools")
        presentity = aor_of(request.from_address.uri)
        sub = self.backend.get(presentity)
        if sub is None or sub.call_id != request.call_id:
            return make_response(request, 481)
        try:
            state = parse_pidf(request.body)
        except ValueError:
            return make_response(request, 400, "Bad Request: not PIDF")
        sub.notified_at = self._now()
        self._set_remote_view(presentity, state)
        return make_response(request, 200)

    def _pool_request(
        self,
        method: str,
        uri: URI,
        flow: Flow,
        *,
        from_: str,
        to: str,
        call_id: str,
        cseq: int,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        to_pool: bool = True,
    ) -> Request:
        req = Request(method=method, uri=uri, body=body)
        h = req.headers
        h.set("Via", self.endpoint.via_for(flow, self.endpoint.new_branch()))
        h.set("Max-Forwards", "70")
        h.set("From", from_)
        h.set("To", to)
        h.set("Call-ID", call_id)
        h.set("CSeq", f"{cseq} {method}")
        if to_pool:
            h.set(POOL_HEADER, self.svc.fqdn)
        for name, value in headers:
            h.add(name, value)
        return req

    def _queue_notify(self, sub: Subscription, state: PresenceState) -> None:
        """NOTIFY ``state`` to ``sub``'s watcher. One sender per subscription,
        so NOTIFYs arrive in order, and a state superseded before it was sent
        is skipped; ``last_sent`` is what the watcher will end up with."""
        sub.last_sent = state
        self._notify_pending[sub.key] = (sub, state)
        if sub.key not in self._notify_running:
            self._notify_running.add(sub.key)
            self.endpoint.spawn(self._notify_worker(sub.key), name="notify")

    async def _notify_worker(self, key: tuple[str, str]) -> None:
        try:
            while key in self._notify_pending:
                sub, state = self._notify_pending.pop(key)
                if self.subs.get(key) is sub:
                    await self._notify(sub, state)
        finally:
            self._notify_running.discard(key)

    async def _notify(
        self, sub: Subscription, state: PresenceState, *, final: bool = False
    ) -> None:
        remaining = max(0, int(sub.expires_at - self._now()))
        substate = "terminated;reason=timeout" if final else f"active;expires={remaining}"
        headers = [
            ("Event", PRESENCE_EVENT),
            ("Subscription-State", substate),
            ("Content-Type", PIDF_CONTENT_TYPE),
        ]
        try:
            if sub.pool is not None:
                flow = await self.pool_flow(sub.pool)
            elif isinstance(sub.route, Flow) and self.endpoint.transport.is_open(sub.route):
                flow = sub.route
            else:
                self.subs.remove(sub.key)
                return
            req = self._pool_request(
                "NOTIFY", URI.parse(sub.remote_target), flow,
                from_=f"<{sub.presentity}>;tag={sub.local_tag}",
                to=f"<{sub.remote_target if sub.pool else sub.watcher}>;tag={sub.watcher_tag}",
                call_id=sub.call_id, cseq=sub.next_cseq(), headers=headers,
                body=render_pidf(state), to_pool=sub.pool is not None,
            )
            response = await self.endpoint.request(
                req, flow, give_up_after=self.svc.settings.forward_timeout
            )
        except RequestFailed as exc:
            log.info("NOTIFY to %s failed: %s; subscription dropped", sub.watcher, exc)
            self.subs.remove(sub.key)
            return
        if response.code == 481 or response.code >= 500:
            self.subs.remove(sub.key)

    def _publish(self, request: Request, rx: Received) -> Response:
        event = (request.headers.get("Event") or "").split(";", 1)[0].strip().lower()
        if event != PRESENCE_EVENT:
            return make_response(request, 489, "Bad Event", [("Allow-Events", "presence")])
        aor = aor_of(request.uri)
        mode = self.modes.get(aor)
        if mode is None or aor != aor_of(request.from_address.uri):
            return make_response(request, 403, "Forbidden: publish your own presence, registered")
        refusal = check_feature(Feature.PRESENCE_PUBLISH, mode)
        if refusal is not None:
            return self._refuse(request, refusal)
        expires = self._expires(request)
        if expires == 0 or not request.body:
            self.published.pop(aor, None)
        else:
            try:
                state = parse_pidf(request.body)
            except ValueError as exc:
                return make_response(request, 400, f"Bad Request: {exc}")
            self.published[aor] = PresenceState(aor, state.availability, state.note)
        self._presence_changed(aor)
        return make_response(
            request, 200,
            headers=[("SIP-ETag", secrets.token_hex(6)), ("Expires", str(expires))],
        )

    # -- contact list ---------------------------------------------------------------------
    def _own_mode(self, request: Request) -> tuple[str, ServiceMode | None]:
        sender = aor_of(request.from_address.uri)
        return sender, self._sender_mode(request, sender)

    async def _fetch_contacts(self, request: Request, rx: Received) -> Response:
        owner, mode = self._own_mode(request)
        if mode is None:
            return make_response(request, 403, "Forbidden: register with this pool first")
        refusal = check_feature(Feature.CONTACT_LIST_READ, mode)
        if refusal is not None:
            return self._refuse(request, refusal)
        contacts = await asyncio.to_thread(self.svc.store.contacts, owner)
        tag = secrets.token_hex(6)
        try:
            target = request.contact[0].uri
        except (ValueError, IndexError):
            raise SipError("Bad Request: SUBSCRIBE needs a Contact", 400) from None
        watcher_tag = request.from_address.parameters.get("tag") or ""

        async def notify() -> None:
            flow = rx.flow
            req = self._pool_request(
                "NOTIFY", target, flow, from_=f"<{owner}>;tag={tag}",
                to=f"<{owner}>;tag={watcher_tag}", call_id=request.call_id, cseq=1,
                headers=[("Event", CONTACTS_EVENT),
                         ("Subscription-State", "terminated;reason=timeout"),
                         ("Content-Type", CONTACTS_CONTENT_TYPE)],
                body=render_contact_list(owner, contacts), to_pool=False,
            )
            try:
                await self.endpoint.request(
                    req, flow, give_up_after=self.svc.settings.forward_timeout
                )
            except RequestFailed as exc:
                log.info("contact list NOTIFY to %s failed: %s", owner, exc)

        self.endpoint.spawn(notify(), name="contacts notify")
        # A fetch (RFC 6665 4.4.3): one NOTIFY, then the subscription is over.
        return make_response(request, 200, headers=[("Expires", "0")], to_tag=tag)

    async def _service(self, request: Request, rx: Received) -> Response:
        ctype = (request.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if ctype != ADD_CONTACT_TYPE:
            return make_response(request, 415, "Unsupported Media Type",
                                 [("Accept", ADD_CONTACT_TYPE)])
        owner, mode = self._own_mode(request)
        if mode is None:
            return make_response(request, 403, "Forbidden: register with this pool first")
        refusal = check_feature(Feature.ADD_CONTACT, mode)
        if refusal is not None:
            return self._refuse(request, refusal)
        contact = request.body.decode("utf-8", "replace").strip()
        try:
            contact = aor_of(URI.parse(contact))
        except ValueError:
            return make_response(request, 400, "Bad Request: the body must be a SIP URI")
        try:
            seq = await self.svc.add_contact(owner, contact)
        except OperationError as exc:
            status = 404 if exc.http_status == 404 else 403
            return make_response(request, status, f"{exc.code}: {exc.message}"[:200])
        return make_response(request, 200, headers=[("X-Sipdrill-Seq", str(seq))])

    # -- conferences --------------------------------------------------------------------
    def _invite(self, request: Request, rx: Received) -> Response | Awaitable[Response]:
        ref = parse_conference_uri(request.uri)
        if ref is None:
            return make_response(
                request, 488, "Not Acceptable Here: this lab's pools host conferences only"
            )
        return self._join(request, rx, ref)

    async def _join(self, request: Request, rx: Received, ref: ConferenceRef) -> Response:
        sender = aor_of(request.from_address.uri)
        mode = self._sender_mode(request, sender)
        via_pool = self._from_pool(request)
        decision = self.svc.decide(ref.organiser)
        if via_pool is not None or (
            isinstance(decision, Serve) and self.svc.fqdn == self._serving(ref.organiser)
        ):
            return await self._host(request, rx, ref, sender, mode, via_pool)
        if sender == ref.organiser and mode is ServiceMode.RESILIENCY:
            # The organiser's own conferences live on their home pool, which
            # is down: scheduled ones have ended, new ones cannot start.
            scheduled = await self._scheduled(ref)
            if scheduled:
                return self._refuse(request, CONFERENCE_POOL_DOWN)
            refusal = check_feature(Feature.ADHOC_CONFERENCE, mode)
            assert refusal is not None
            return self._refuse(request, refusal)
        home = self.svc.home_of(ref.organiser)
        if home is None:
            return make_response(request, 404, "Not Found: no such organiser")
        response = await self.forward(request, self.candidates(home), mode)
        if response is None:
            return self._refuse(request, CONFERENCE_POOL_DOWN)
        return response

    def _serving(self, aor: str) -> str | None:
        home = self.svc.home_of(aor)
        return self.svc.failover.serving_pool(home) if home else None

    async def _scheduled(self, ref: ConferenceRef) -> bool:
        confs = await asyncio.to_thread(self.svc.store.conferences, ref.organiser)
        return any(c.conf_id == ref.conf_id for c in confs)

    async def _host(
        self,
        request: Request,
        rx: Received,
        ref: ConferenceRef,
        sender: str,
        mode: ServiceMode | None,
        via_pool: str | None,
    ) -> Response:
        decision = self.svc.decide(ref.organiser)
        if not isinstance(decision, Serve):
            return make_response(request, 404, "Not Found: the conference is not hosted here")
        if decision.mode is ServiceMode.RESILIENCY:
            return self._refuse(request, CONFERENCE_POOL_DOWN)
        active = self.conferences.active.get(ref)
        adhoc = active.adhoc if active is not None else False
        if active is None and not await self._scheduled(ref):
            if sender != ref.organiser:
                return make_response(request, 404, "Not Found: no such conference")
            refusal = check_feature(Feature.ADHOC_CONFERENCE, mode or ServiceMode.FULL)
            if refusal is not None:
                return self._refuse(request, refusal)
            adhoc = True
        refusal = check_feature(Feature.JOIN_CONFERENCE, mode or ServiceMode.FULL)
        if refusal is not None:
            return self._refuse(request, refusal)
        try:
            contact = str(request.contact[0].uri)
        except (ValueError, IndexError):
            return make_response(request, 400, "Bad Request: INVITE needs a Contact")
        local_tag = secrets.token_hex(6)
        participant = Participant(
            aor=sender,
            call_id=request.call_id,
            remote_tag=request.from_address.parameters.get("tag") or "",
            local_tag=local_tag,
            remote_target=contact,
            joined_at=self._now(),
            route=rx.flow if via_pool is None else None,
            via_pool=via_pool,
        )
        started = self.conferences.join(ref, participant, adhoc=adhoc)
        if started:
            log.info("conference %s started (%s)", ref.uri, "ad-hoc" if adhoc else "scheduled")
        return make_response(
            request, 200,
            headers=[("Contact", f"<{ref.uri}>;isfocus"), ("Allow", ALLOW)],
            to_tag=local_tag,
        )

    async def _bye(self, request: Request, rx: Received) -> Response:
        ref = parse_conference_uri(request.uri)
        if ref is None:
            if self._from_pool(request) is not None:
                # A hosting pool ending a conference: relay to the participant.
                response = await self.deliver_local(request, self._target_aor(request))
                return response or make_response(request, 481)
            return make_response(request, 481)
        conf = self.conferences.active.get(ref)
        if conf is not None and request.call_id in conf.participants:
            self.conferences.leave(ref, request.call_id)
            return make_response(request, 200)
        if self._from_pool(request) is not None:
            return make_response(request, 481)
        home = self.svc.home_of(ref.organiser)
        if home is None:
            return make_response(request, 481)
        sender = aor_of(request.from_address.uri)
        response = await self.forward(
            request, self.candidates(home), self._sender_mode(request, sender)
        )
        return response or make_response(request, 481)

    def _end_orphaned_conferences(self) -> None:
        """A conference lives on its organiser's serving pool, with full
        service: one whose organiser this pool no longer serves that way
        (failover, or the organiser now in resiliency mode) ends."""
        for ref in list(self.conferences.active):
            decision = self.svc.decide(ref.organiser)
            if isinstance(decision, Serve) and decision.mode is ServiceMode.FULL:
                continue
            self.end_conference(ref, "the organiser's pool changed")

    def end_conference(self, ref: ConferenceRef, why: str) -> int:
        participants = self.conferences.end(ref)
        log.info("conference %s ended (%s): BYE to %d participants", ref.uri, why,
                 len(participants))
        for p in participants:
            self.endpoint.spawn(self._bye_participant(ref, p, why), name="conference bye")
        return len(participants)

    async def _bye_participant(self, ref: ConferenceRef, p: Participant, why: str) -> None:
        try:
            if p.via_pool is not None:
                flow = await self.pool_flow(p.via_pool)
            elif isinstance(p.route, Flow) and self.endpoint.transport.is_open(p.route):
                flow = p.route
            else:
                return
            req = self._pool_request(
                "BYE", URI.parse(p.remote_target), flow,
                from_=f"<{ref.uri}>;tag={p.local_tag}", to=f"<{p.aor}>;tag={p.remote_tag}",
                call_id=p.call_id, cseq=p.next_cseq(),
                headers=[("Reason", f'SIP;cause=480;text="{why}"')],
                to_pool=p.via_pool is not None,
            )
            await self.endpoint.request(req, flow, give_up_after=self.svc.settings.forward_timeout)
        except RequestFailed as exc:
            log.info("BYE to %s failed: %s", p.aor, exc)

    # -- housekeeping -------------------------------------------------------------------
    async def _housekeeping(self) -> None:
        interval = self.svc.settings.housekeeping_interval
        while True:
            await asyncio.sleep(interval)
            now = self._now()
            self.svc.refresh_cms()
            self._nudges_due(now)
            self.subs.expire(now)
            watched = {s.presentity for s in self.subs if s.pool is None}
            for presentity in list(self.backend):
                if presentity not in watched:
                    del self.backend[presentity]
                    self.remote_views.pop(presentity, None)
                elif self.backend[presentity].refresh_at <= now:
                    await self._backend_subscribe(presentity)
            await self.svc.retry_pending()

    def status(self) -> dict[str, object]:
        now = self._now()
        monitor = self.monitor
        partner: dict[str, object] | None = None
        if monitor is not None:
            partner = {
                "pool": monitor.partner,
                "state": monitor.state.value,
                "accepts_partner_users": monitor.accepts_partner_users,
                "last_heartbeat_age": round(now - monitor.last_heartbeat, 3),
                "heartbeat_interval": self.svc.heartbeat_interval,
                "failover_detection_interval": monitor.failover_detection_interval,
                "failback_interval": monitor.failback_interval,
                "heartbeats": dict(self.heartbeats),
                "last_event": self.last_partner_event,
            }
        return {
            "partner": partner,
            "registrations": {**self.counts(), "bindings": len(self.registrar)},
            "subscriptions": len(self.subs),
            "conferences": {
                "active": len(self.conferences.active),
                "participants": self.conferences.participants(),
            },
            "reregistration": self.reregistration.summary(now) if self.reregistration else None,
        }
