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

Between pools (real SIP over mutual TLS, so a network cut stops it): OPTIONS
heartbeats every few seconds with the paired pool (they feed the
:class:`~sipdrill.pool.state.PartnerMonitor`), relayed MESSAGE,
INVITE and BYE, and back-end presence subscriptions. A pool connects to
another presenting its own certificate from the lab CA (it names the pool),
and knows a request came from a pool only by the certificate its connection
verified (:func:`~.sip_context.from_pool`), as Lync pools trust each other's
MTLS identity. Two levels of trust follow from it:

- any pool of the lab (its certificate): one pool-to-pool hop (a pool never
  relays a request it got from a pool, so no loops), its word for its
  user's mode (``X-Sipdrill-Sender-Mode``), back-end presence;
- the paired pool only: heartbeats, which decide when this pool takes the
  partner's users in resiliency mode. An OPTIONS from another pool is
  answered as anyone's and is no heartbeat.

Anyone else is a client, whatever headers it sends: ``X-Sipdrill-Pool`` and
``X-Sipdrill-Sender-Mode`` are removed from its request on arrival, which is
then answered as any client's (a NOTIFY 403, a SUBSCRIBE or MESSAGE as the
client's own, an OPTIONS 200 that counts for nothing), and counted in
``sipdrill_pool_untrusted_pool_claims_total`` (:class:`~.sip_context.Pretence`).

Methods: REGISTER, OPTIONS, MESSAGE, SUBSCRIBE (``presence``, and Lync's
``vnd-microsoft-roaming-contacts`` as a fetch), NOTIFY (pool to pool),
PUBLISH (``presence``), SERVICE (add a contact: body is the contact's URI,
``Content-Type: application/vnd.sipdrill.add-contact``), INVITE/ACK/BYE to a
conference focus URI (:mod:`sipdrill.pool.conference`), and calls between
users: INVITE/ACK/BYE/CANCEL proxied with Record-Route and forking
(:mod:`.sip_proxy`).

:class:`PoolSip` owns the SIP endpoint and hands each request to the part
that answers it: :mod:`.sip_registrar` (REGISTER, bindings, modes, nudges),
:mod:`.sip_partner` (heartbeats, the partner's state), :mod:`.sip_presence`,
:mod:`.sip_contacts` (contact list), :mod:`.sip_relay` (IM and routing
between pools), :mod:`.sip_focus` (conferences) and :mod:`.sip_proxy` (calls:
a request whose top Route names this pool goes there first). The parts see their pool
through :class:`~.sip_context.SipContext`, which :class:`PoolSip` implements
over the pool service; it also passes on what one part tells the others.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from sipmessage import URI, Request, Response

from sipdrill import addresses
from sipdrill.errors import SipError
from sipdrill.pool.conference import parse_conference_uri
from sipdrill.pool.policy import RegistrarDecision
from sipdrill.pool.presence import CONTACTS_EVENT
from sipdrill.pool.sip_contacts import ContactList
from sipdrill.pool.sip_context import (
    ALLOW,
    Headers,
    Pretence,
    event_of,
    from_pool,
    strip_pool_claims,
)
from sipdrill.pool.sip_endpoint import Later, SipEndpoint
from sipdrill.pool.sip_focus import ConferenceFocus
from sipdrill.pool.sip_partner import PartnerHeartbeat
from sipdrill.pool.sip_presence import PresenceHub
from sipdrill.pool.sip_proxy import CallProxy
from sipdrill.pool.sip_registrar import RegistrarSide
from sipdrill.pool.sip_relay import ImRelay
from sipdrill.sip.message import make_response
from sipdrill.sip.registrar import Registrar
from sipdrill.sip.tls_front import TlsFront
from sipdrill.sip.transaction import TimerConfig
from sipdrill.sip.transport import (
    Flow,
    Kind,
    Received,
    TimerCore,
    TimerDriver,
    TransportError,
    TransportLimits,
)

if TYPE_CHECKING:
    from sipdrill.pool.metrics import PoolMetrics
    from sipdrill.pool.service import PoolService
    from sipdrill.pool.settings import PoolSettings
    from sipdrill.pool.store import UserStore

Answer = Response | Awaitable[Response] | Later

log = logging.getLogger("sipdrill.pool")


class PoolSip:
    """One pool's SIP side; a :class:`~.sip_context.SipContext` for its parts,
    their :class:`~.sip_registrar.RegistrationWatcher` and
    :class:`~.sip_partner.PartnerListener`."""

    def __init__(self, svc: PoolService) -> None:
        self.svc = svc
        topo = svc.topology
        expiry = topo.timers.registration_expiry
        self.fqdn = svc.fqdn
        self.domain = topo.domain
        self.settings: PoolSettings = svc.settings
        self.metrics: PoolMetrics = svc.metrics
        registrar = Registrar(
            topo.domain,
            expiry.default,
            expiry.min,
            expiry.max,
            flow_timer=int(topo.timers.keepalive_interval),
        )
        self.registrations = RegistrarSide(self, registrar, self)
        self.relay = ImRelay(self, self.registrations)
        self.presence = PresenceHub(self, self.registrations, self.relay)
        self.contacts = ContactList(self, self.registrations, svc.add_contact)
        self.focus = ConferenceFocus(self, self.registrations, self.relay)
        loopback = svc.settings.loopback
        pools = {p.fqdn: addresses.pool_sip_address(topo, p, loopback=loopback) for p in topo.pools}
        # Record-Route names the front end that took the call: its flows are here.
        pools[svc.fqdn] = (svc.address, svc.pool.sip_tls_port)
        self.calls = CallProxy(
            self, self.registrations, self.relay, lambda: self.endpoint, pools,
            hosts={
                h: p.fqdn
                for p in topo.pools
                for h, _ in addresses.front_end_sip_addresses(topo, p, loopback=loopback)
                if p.fqdn != svc.fqdn or h == svc.address
            },
        )
        #: The partner pool's heartbeats (from start, when the pool has a partner).
        self.heartbeat: PartnerHeartbeat | None = None
        self._handlers: dict[str, Callable[[Request, Flow], Answer]] = {
            "OPTIONS": self._options,
            "MESSAGE": self.relay.message,
            "SUBSCRIBE": self._subscribe,
            "NOTIFY": self.presence.notify_in,
            "PUBLISH": lambda request, flow: self.presence.publish(request),
            "SERVICE": self.contacts.add,
            "INVITE": self._invite,
            "CANCEL": lambda request, flow: self.calls.cancel(request),
            "BYE": self.focus.bye,
        }
        self._pretences_logged: set[Pretence] = set()
        self._endpoint: SipEndpoint | None = None
        self._drivers: list[TimerDriver] = []
        self._loops: list[asyncio.Task[None]] = []
        self._tls_front: TlsFront | None = None
        #: Per pool, the front end to try first (see pool_flow).
        self._front_end_cursor: dict[str, int] = {}

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def endpoint(self) -> SipEndpoint:
        if self._endpoint is None:
            raise RuntimeError("the pool's SIP side is not started")
        return self._endpoint

    @property
    def heartbeats(self) -> dict[str, int]:
        """The heartbeat counters (none without a partner)."""
        return self.heartbeat.heartbeats if self.heartbeat is not None else {}

    async def start(self) -> list[tuple[Kind, tuple[str, int]]]:
        svc = self.svc
        limits = TransportLimits(max_connections=svc.settings.max_connections)
        self._endpoint = SipEndpoint(
            self._handle,
            limits=limits,
            timers=TimerConfig(t1=svc.settings.sip_t1),
            server_name=f"sipdrill-pool/{svc.fqdn}",
            on_flow_closed=self.registrations.flow_closed,
        )
        pool = svc.pool
        host = svc.address
        workers = svc.settings.tls_workers
        listens = [] if workers else [(Kind.TLS, host, pool.sip_tls_port)]
        listens += [(Kind.TCP, host, pool.sip_tcp_port), (Kind.UDP, host, pool.sip_udp_port)]
        bound = await self.endpoint.listen(listens, ssl_context=svc.server_ssl)
        if workers:
            bound.insert(0, (Kind.TLS, self._start_tls_front(host, pool.sip_tls_port, workers)))
        self.registrations.start()
        self.calls.start()
        loop = asyncio.get_running_loop()
        if svc.monitor is not None:
            self.heartbeat = PartnerHeartbeat(
                self, svc.monitor, self,
                interval=svc.heartbeat_interval, timeout=svc.heartbeat_timeout,
            )
            self.heartbeat.start()
            self._loops.append(loop.create_task(self.heartbeat.run(), name="heartbeat"))
        self._loops.append(loop.create_task(self._housekeeping(), name="housekeeping"))
        return bound

    def _start_tls_front(self, host: str, port: int, workers: int) -> tuple[str, int]:
        """TLS on ``workers`` processes, the SIP state here (sipdrill.sip.tls_front)."""
        cert = self.svc.server_cert
        assert cert is not None
        transport = self.endpoint.transport

        def adopt(
            sock: socket.socket,
            remote: tuple[str, int],
            local: tuple[str, int],
            names: tuple[str, ...],
        ) -> None:
            transport.adopt_stream(sock, Kind.TLS, remote, local, names)

        try:
            # The workers ask for and verify a certificate as the pool's own
            # context does (svc.server_ssl), and pass its names with the flow:
            # a partner pool is trusted through them.
            front = TlsFront(
                host, port, cert=cert.cert_path, key=cert.key_path, workers=workers,
                adopt=adopt, client_ca=cert.ca_path,
                handshake_timeout=transport.limits.tls_handshake_timeout,
            )
        except OSError as exc:
            raise TransportError(Kind.TLS, f"{host}:{port}", str(exc)) from exc
        front.start()
        self._tls_front = front
        return front.address

    async def close(self) -> None:
        if self._tls_front is not None:
            await self._tls_front.close()
            self._tls_front = None
        for driver in self._drivers:
            driver.stop()
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops.clear()
        if self._endpoint is not None:
            await self._endpoint.close()

    # -- dispatch -------------------------------------------------------------------------
    def _handle(self, request: Request, rx: Received) -> Answer | None:
        method = request.method.upper()
        pretence = strip_pool_claims(request, from_pool(self, rx.flow))
        if pretence is not None:
            self._pretended(pretence, request, rx.flow)
        if method == "REGISTER":
            return self.registrations.register(request, rx.flow)
        calls = self.calls
        if method != "CANCEL" and calls.routes_here(request):
            request = calls.pop_own_routes(request)
            if calls.routed_inside(request):
                # Inside a call we record-routed: on to the next pool or the client.
                return self._counted(method, request, lambda: calls.in_dialog(request, rx.flow))
        if method == "ACK":
            return None  # the 2xx of a conference join needs nothing more (see conference.py)
        handler = self._handlers.get(method)
        if handler is None:
            return self._count(method, make_response(request, 405, headers=[("Allow", ALLOW)]))
        return self._counted(method, request, lambda: handler(request, rx.flow))

    def _counted(
        self, method: str, request: Request, answer_of: Callable[[], Answer | None]
    ) -> Answer | None:
        try:
            answer = answer_of()
        except SipError as exc:
            answer = make_response(request, exc.status_code, exc.reason, exc.headers)
        if answer is None or isinstance(answer, Later):
            return answer  # an ACK; or the call proxy answers (and counts) itself
        if isinstance(answer, Response):
            return self._count(method, answer)
        return self._count_later(method, answer)

    def _count(self, method: str, response: Response) -> Response:
        self.svc.metrics.requests.labels(method, f"{response.code // 100}xx").inc()
        return response

    async def _count_later(self, method: str, answer: Awaitable[Response]) -> Response:
        return self._count(method, await answer)

    def _pretended(self, pretence: Pretence, request: Request, flow: Flow) -> None:
        """Count a request that claimed what its connection did not prove; it
        is answered as its real sender's. The log says so once per kind (a
        flood of them is the metric's business, not the log's)."""
        self.metrics.untrusted_pool_claims.labels(pretence.value).inc()
        level = logging.DEBUG if pretence in self._pretences_logged else logging.WARNING
        self._pretences_logged.add(pretence)
        log.log(
            level, "%s from %s (certificate names: %s) claimed to come from a pool (%s); "
            "answered as %s", request.method, flow.remote, ", ".join(flow.peer_names) or "none",
            pretence.value, "a client's" if pretence is Pretence.CLIENT else "anyone's",
        )

    def _options(self, request: Request, flow: Flow) -> Response:
        heartbeat = self.heartbeat
        sender = from_pool(self, flow)
        if heartbeat is not None and sender == heartbeat.partner:
            heartbeat.received()
        elif sender is not None:
            # Pools send OPTIONS only as heartbeats, to their partner.
            self._pretended(Pretence.NOT_PARTNER, request, flow)
        return make_response(
            request, 200, headers=[("Allow", ALLOW), ("Supported", "path, outbound")]
        )

    def _invite(self, request: Request, flow: Flow) -> Answer:
        if parse_conference_uri(request.uri) is not None:
            return self.focus.invite(request, flow)
        return self.calls.invite(request, flow)

    def _subscribe(self, request: Request, flow: Flow) -> Answer:
        if event_of(request) == CONTACTS_EVENT:
            return self.contacts.fetch(request, flow)
        return self.presence.subscribe(request, flow)

    # -- what one part tells the others ---------------------------------------------------
    def mode_changed(self, aor: str) -> None:
        self.presence.changed(aor)

    def signed_out(self, aor: str) -> None:
        self.presence.signed_out(aor)

    def flow_closed(self, flow: Flow) -> None:
        self.presence.flow_closed(flow)

    def decisions_changed(self) -> None:
        self.focus.end_orphaned()
        self.presence.refresh()

    def partner_changed(self) -> None:
        self.endpoint.loop.call_soon(self.presence.refresh)

    def partner_down(self, pool: str) -> None:
        self.presence.remote_pool_down(pool)

    def partner_up(self, pool: str) -> None:
        self.registrations.reevaluate(f"failback {pool}")

    # -- the parts' context (SipContext) --------------------------------------------------
    @property
    def store(self) -> UserStore:
        return self.svc.store

    def decide(self, aor: str) -> RegistrarDecision:
        return self.svc.decide(aor)

    def home_of(self, aor: str) -> str | None:
        return self.svc.home_of(aor)

    def serving_pool(self, home: str) -> str:
        return self.svc.failover.serving_pool(home)

    def backup_of(self, home: str) -> str | None:
        return self.svc.backups.get(home)

    def is_pool(self, name: str) -> bool:
        return name in self.svc.pool_names

    def pool_sip_uri(self, pool: str) -> str:
        return addresses.pool_sip_uri(self.svc.topology, pool)

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def wall(self) -> float:
        return time.time()

    def spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        return self.endpoint.spawn(coro, name=name)

    def timer(self, core: TimerCore) -> TimerDriver:
        driver = TimerDriver(core)
        self._drivers.append(driver)
        return driver

    def via(self, flow: Flow) -> str:
        return self.endpoint.via_for(flow, self.endpoint.new_branch())

    async def send(
        self, request: Request, flow: Flow, *, give_up_after: float | None = None
    ) -> Response:
        if give_up_after is None:
            give_up_after = self.svc.settings.forward_timeout
        return await self.endpoint.request(request, flow, give_up_after=give_up_after)

    async def proxy(
        self, request: Request, flow: Flow, *, uri: URI | None = None, headers: Headers = ()
    ) -> Response:
        return await self.endpoint.proxy(
            request, flow, uri=uri, headers=headers,
            give_up_after=self.svc.settings.forward_timeout,
        )

    async def pool_flow(self, pool: str) -> Flow:
        """A flow to any front end of ``pool``: the one that answered last,
        else the next in DNS order. A front end that fails (refused, or a
        handshake cut short by the caller's timeout: a stopped process
        accepts and says nothing) moves the next call on to the next one."""
        svc = self.svc
        where = addresses.front_end_sip_addresses(
            svc.topology, pool, loopback=svc.settings.loopback
        )
        start = self._front_end_cursor.get(pool, 0) % len(where)
        error: BaseException | None = None
        for k in range(len(where)):
            i = (start + k) % len(where)
            host, port = where[i]
            try:
                flow = await self.endpoint.open_flow(
                    Kind.TLS, host, port, ssl_context=svc.client_ssl, server_hostname=pool
                )
            except BaseException as exc:
                self._front_end_cursor[pool] = i + 1
                if not isinstance(exc, Exception):
                    raise  # cancelled (the caller's timeout): the next call tries the next
                error = exc
                continue
            self._front_end_cursor[pool] = i
            return flow
        assert error is not None
        raise error

    def is_open(self, flow: Flow) -> bool:
        return self.endpoint.transport.is_open(flow)

    def close_flow(self, flow: Flow) -> None:
        self.endpoint.transport.close_flow(flow)

    # -- housekeeping -------------------------------------------------------------------
    async def _housekeeping(self) -> None:
        interval = self.svc.settings.housekeeping_interval
        while True:
            await asyncio.sleep(interval)
            now = self.now()
            self.svc.cms.refresh()
            self.registrations.nudges_due(now)
            await self.presence.housekeeping(now)
            await self.svc.user_moves.retry_pending()

    def status(self) -> dict[str, object]:
        now = self.now()
        registrations = self.registrations
        conferences = self.focus.conferences
        rereg = registrations.reregistration
        return {
            "partner": self.heartbeat.status(now) if self.heartbeat is not None else None,
            "registrations": {**registrations.counts(), "bindings": len(registrations.registrar)},
            "subscriptions": len(self.presence.subs),
            "conferences": {
                "active": len(conferences.active),
                "participants": conferences.participants(),
            },
            "reregistration": rereg.summary(now) if rereg else None,
            "calls": self.calls.status(),
        }
