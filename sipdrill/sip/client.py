"""A minimal asyncio SIP user agent: client transactions and REGISTER with refresh and auth.

:class:`SipClient` owns a :class:`~sipdrill.sip.transport.SipTransport` and a
:class:`~sipdrill.sip.transaction.TransactionManager`; :meth:`SipClient.request`
sends one request as a client transaction (new branch, retransmissions,
Timer F) and returns its final response. :class:`Registration` keeps one
AoR registered with one registrar (RFC 3261 10.2): the same Call-ID and an
increasing CSeq, digest authentication on 401 (RFC 7616, stale nonces
retried), 423 answered by retrying with Min-Expires, refresh before expiry,
and unregister (Expires: 0).

    async with SipClient() as client:
        reg = Registration(client, "sip:alice@lab.local", Target(Kind.UDP, "127.0.0.1", 5060),
                           username="alice", password="secret")
        ok = await reg.register()          # 200 (raises RegistrationError otherwise)
        reg.start_refresh()                # re-REGISTER at refresh_ratio x granted expiry
        await reg.unregister()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from dataclasses import dataclass, field

from sipmessage import URI, Address, AuthChallenge, Request, Response

from sipdrill.errors import SipError
from sipdrill.sip.digest import ALGORITHMS, DigestError, authorization
from sipdrill.sip.message import make_response
from sipdrill.sip.transaction import (
    DeliverRequest,
    DeliverResponse,
    Send,
    TimerConfig,
    TransactionError,
    TransactionEvent,
    TransactionKey,
    TransactionManager,
    TransactionTerminated,
    TransactionTimeout,
)
from sipdrill.sip.transaction import TransportError as TxTransportError
from sipdrill.sip.transport import (
    Flow,
    Kind,
    Received,
    SipTransport,
    TimerDriver,
    TransportError,
    TransportLimits,
)

__all__ = [
    "ClientTimeout",
    "Registration",
    "RegistrationError",
    "RequestFailed",
    "SipClient",
    "Target",
]

log = logging.getLogger("sipdrill.sip.client")


@dataclass
class RequestFailed(SipError):
    """A request got no final response: transport failure (503 semantics, RFC 3263)."""

    status_code: int = 503


@dataclass
class ClientTimeout(RequestFailed):
    """Timer B/F fired: no final response (RFC 3261 8.1.3.1 treats it as 408)."""

    status_code: int = 408


@dataclass
class RegistrationError(SipError):
    """The registrar refused the REGISTER; ``response`` is its final answer, if any."""

    response: Response | None = None


@dataclass(frozen=True)
class Target:
    """Where to send: transport, IP, port; for TLS the name the certificate must carry."""

    kind: Kind
    host: str
    port: int
    server_hostname: str | None = None
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False)


class SipClient:
    """Client transactions over one transport; answers incoming OPTIONS, refuses the rest."""

    def __init__(
        self,
        *,
        timers: TimerConfig | None = None,
        limits: TransportLimits | None = None,
        rng: random.Random | None = None,
        user_agent: str = "sipdrill",
        local_host: str = "127.0.0.1",
    ) -> None:
        self.rng = rng or random.Random()
        self.transactions = TransactionManager(self.rng, timers or TimerConfig())
        self.user_agent = user_agent
        self.local_host = local_host
        self._limits = limits
        self._transport: SipTransport | None = None
        self._driver: TimerDriver | None = None
        self._waiters: dict[TransactionKey, asyncio.Future[Response]] = {}
        self._flows: dict[TransactionKey, Flow] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def transport(self) -> SipTransport:
        if self._transport is None:
            raise RuntimeError("SipClient.start() has not been called")
        return self._transport

    async def start(self) -> SipClient:
        self.loop = asyncio.get_running_loop()
        if self._transport is None:
            self._transport = SipTransport(
                self._on_message, limits=self._limits, on_flow_closed=self._on_flow_closed
            )
            self._driver = TimerDriver(self.transactions, self._on_timer_events)
            # One UDP socket for every UDP request, so responses find their way back.
            await self._transport.listen(Kind.UDP, self.local_host, 0)
        return self

    async def close(self) -> None:
        if self._driver is not None:
            self._driver.stop()
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(RequestFailed(reason="client closed"))
                fut.exception()
        self._waiters.clear()
        if self._transport is not None:
            await self._transport.close()

    async def __aenter__(self) -> SipClient:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _now(self) -> float:
        assert self.loop is not None
        return self.loop.time()

    # -- sending --------------------------------------------------------------------------
    async def open_flow(self, target: Target) -> Flow:
        """A reused or new flow to ``target``; :class:`RequestFailed` if it cannot be opened."""
        try:
            return await self.transport.open_flow(
                target.kind,
                target.host,
                target.port,
                ssl_context=target.ssl_context,
                server_hostname=target.server_hostname,
            )
        except TransportError as exc:
            raise RequestFailed(reason=str(exc)) from exc

    def via_for(self, flow: Flow, branch: str) -> str:
        host, port = flow.local
        if host in ("0.0.0.0", "::"):
            host = self.local_host
        shown = f"[{host}]" if ":" in host else host
        return f"SIP/2.0/{flow.kind.via} {shown}:{port};branch={branch};rport"

    async def request(self, request: Request, target: Target) -> Response:
        """Send ``request`` (its top Via is set here) and wait for the final response.

        Raises :class:`ClientTimeout` (Timer B/F) or :class:`RequestFailed`
        (connection refused, TLS verification failure, flow closed).
        """
        flow = await self.open_flow(target)
        branch = self.transactions.new_branch()
        vias = request.headers.getlist("Via")
        request.headers.setlist("Via", [self.via_for(flow, branch), *vias[1:]])
        if request.headers.get("User-Agent") is None:
            request.headers.set("User-Agent", self.user_agent)
        assert self.loop is not None
        fut: asyncio.Future[Response] = self.loop.create_future()
        try:
            key, events = self.transactions.send_request(
                request, self._now(), reliable=flow.reliable, peer=flow.remote
            )
        except TransactionError as exc:
            raise RequestFailed(reason=str(exc), status_code=exc.status_code) from exc
        self._waiters[key] = fut
        self._flows[key] = flow
        self._run(events)
        assert self._driver is not None
        self._driver.poke()
        try:
            return await fut
        finally:
            self._waiters.pop(key, None)

    # -- events ---------------------------------------------------------------------------
    def _on_message(self, rx: Received) -> None:
        now = self._now()
        try:
            if isinstance(rx.message, Response):
                events = self.transactions.receive_response(rx.message, now)
            else:
                events = self.transactions.receive_request(
                    rx.message, now, reliable=rx.flow.reliable, peer=rx.remote
                )
        except TransactionError as exc:
            log.info("from %s: %s", rx.remote, exc)
            return
        for event in events:
            if isinstance(event, DeliverRequest) and event.key is not None:
                self._flows[event.key] = rx.flow
        self._run(events)
        assert self._driver is not None
        self._driver.poke()

    def _on_timer_events(self, output: object) -> None:
        if isinstance(output, list):
            self._run(output)

    def _on_flow_closed(self, flow: Flow) -> None:
        keys = [key for key, f in self._flows.items() if f == flow]
        for key in keys:
            self._run(self.transactions.transport_error(key, "connection closed", self._now()))

    def _fail(self, key: TransactionKey, exc: RequestFailed) -> None:
        fut = self._waiters.get(key)
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    def _run(self, events: list[TransactionEvent]) -> None:
        pending = list(events)
        while pending:
            event = pending.pop(0)
            if isinstance(event, Send):
                flow = self._flows.get(event.key)
                if flow is None or not self.transport.send(flow, event.data):
                    pending += self.transactions.transport_error(
                        event.key, "flow closed", self._now()
                    )
            elif isinstance(event, DeliverResponse):
                if event.key is not None and event.response.code >= 200:
                    fut = self._waiters.get(event.key)
                    if fut is not None and not fut.done():
                        fut.set_result(event.response)
            elif isinstance(event, TransactionTimeout):
                self._fail(event.key, ClientTimeout(reason=f"Timer {event.timer.value} fired"))
            elif isinstance(event, TxTransportError):
                self._fail(event.key, RequestFailed(reason=event.reason))
            elif isinstance(event, TransactionTerminated):
                self._flows.pop(event.key, None)
                self._fail(event.key, RequestFailed(reason="transaction ended unanswered"))
            elif isinstance(event, DeliverRequest) and event.key is not None:
                request = event.request
                if request.method == "OPTIONS":
                    answer = make_response(request, 200, headers=[("Allow", "OPTIONS")])
                else:
                    answer = make_response(request, 405, headers=[("Allow", "OPTIONS")])
                try:
                    pending += self.transactions.send_response(event.key, answer, self._now())
                except TransactionError as exc:
                    log.info("cannot answer %s: %s", request.method, exc)


def _pick_challenge(response: Response) -> AuthChallenge | None:
    """The first challenge we can answer (a server lists its preferred algorithm first)."""
    for value in response.headers.getlist("WWW-Authenticate"):
        try:
            challenge = AuthChallenge.parse(value)
        except ValueError:
            continue
        algorithm = challenge.parameters.get("algorithm", "MD5")
        if challenge.scheme.lower() == "digest" and algorithm in ALGORITHMS:
            return challenge
    return None


class Registration:
    """One AoR registered at one registrar through ``client``."""

    def __init__(
        self,
        client: SipClient,
        aor: str,
        registrar: Target,
        *,
        username: str | None = None,
        password: str | None = None,
        expires: int = 600,
        refresh_ratio: float = 0.5,
        contact_params: str = "",
    ) -> None:
        self.client = client
        self.aor = URI.parse(aor)
        self.registrar = registrar
        self.username = username or self.aor.user or ""
        self.password = password
        self.expires = expires
        self.refresh_ratio = refresh_ratio
        self.contact_params = contact_params
        rng = client.rng
        self.call_id = f"{rng.getrandbits(64):016x}@sipdrill"
        self.from_tag = f"{rng.getrandbits(48):012x}"
        self.cseq = rng.randrange(1, 1000)
        self.granted: int | None = None
        self.last_response: Response | None = None
        self.registered_count = 0
        self._contact: str | None = None
        self._refresh: asyncio.Task[None] | None = None

    @property
    def request_uri(self) -> URI:
        return URI.parse(f"sip:{self.aor.host}")

    def contact_uri(self, flow: Flow) -> str:
        host, port = flow.local
        if host in ("0.0.0.0", "::"):
            host = self.client.local_host
        shown = f"[{host}]" if ":" in host else host
        return f"sip:{self.aor.user}@{shown}:{port};transport={flow.kind.value}"

    def _build(self, contact: str | None, expires: int | None, auth: str | None) -> Request:
        self.cseq += 1
        request = Request("REGISTER", self.request_uri)
        h = request.headers
        h.set("Via", "SIP/2.0/UDP placeholder;branch=z9hG4bKplaceholder")
        h.set("Max-Forwards", "70")
        h.set("From", f"<{self.aor}>;tag={self.from_tag}")
        h.set("To", f"<{self.aor}>")
        h.set("Call-ID", self.call_id)
        h.set("CSeq", f"{self.cseq} REGISTER")
        if contact is not None:
            h.set("Contact", contact)
        if expires is not None:
            h.set("Expires", str(expires))
        if auth is not None:
            h.set("Authorization", auth)
        return request

    async def _send(self, contact: str | None, expires: int | None) -> Response:
        """REGISTER with auth and 423 retries; returns the final answer (any status)."""
        auth: str | None = None
        response: Response | None = None
        for _attempt in range(4):
            request = self._build(contact, expires, auth)
            response = await self.client.request(request, self.registrar)
            if response.code == 401 and self.password is not None:
                challenge = _pick_challenge(response)
                if challenge is None:
                    return response
                stale = (challenge.parameters.get("stale") or "").lower() == "true"
                if auth is not None and not stale:
                    return response  # our credentials were refused
                try:
                    auth = authorization(
                        challenge,
                        method="REGISTER",
                        uri=str(self.request_uri),
                        username=self.username,
                        password=self.password,
                        rng=self.client.rng,
                        nc=1,
                    )
                except DigestError:
                    return response
                continue
            if response.code == 423 and expires:
                minimum = response.min_expires
                if minimum is None or minimum <= expires:
                    return response
                expires = minimum
                if contact is not None:
                    self.expires = minimum
                continue
            return response
        assert response is not None
        return response

    async def register(self, expires: int | None = None) -> Response:
        """Register (or refresh) the binding; raises :class:`RegistrationError` unless 200."""
        flow = await self.client.open_flow(self.registrar)
        contact_uri = self.contact_uri(flow)
        self._contact = f"<{contact_uri}>{self.contact_params}"
        response = await self._send(self._contact, self.expires if expires is None else expires)
        self.last_response = response
        if response.code != 200:
            raise RegistrationError(
                reason=f"REGISTER answered {response.code} {response.phrase}",
                status_code=response.code,
                response=response,
            )
        self.granted = self._granted(response, contact_uri)
        self.registered_count += 1
        return response

    def _granted(self, response: Response, contact_uri: str) -> int | None:
        try:
            contacts = response.contact
        except ValueError:
            contacts = []
        mine = URI.parse(contact_uri)
        for address in contacts:
            uri = address.uri
            if (uri.user, uri.host, uri.port) == (mine.user, mine.host, mine.port):
                value = address.parameters.get("expires")
                if value and value.isdigit():
                    return int(value)
        return response.expires if response.expires is not None else self.expires

    async def query(self) -> list[Address]:
        """REGISTER without Contact: the bindings the registrar holds for the AoR."""
        response = await self._send(None, None)
        if response.code != 200:
            raise RegistrationError(
                reason=f"query answered {response.code}",
                status_code=response.code,
                response=response,
            )
        try:
            return response.contact
        except ValueError:
            return []

    async def unregister(self) -> Response:
        """Remove our binding (Expires: 0) and stop refreshing."""
        await self.stop_refresh()
        contact = self._contact
        if contact is None:
            flow = await self.client.open_flow(self.registrar)
            contact = f"<{self.contact_uri(flow)}>"
        response = await self._send(contact, 0)
        self.last_response = response
        if response.code != 200:
            raise RegistrationError(
                reason=f"unREGISTER answered {response.code}",
                status_code=response.code,
                response=response,
            )
        self.granted = None
        return response

    # -- refresh --------------------------------------------------------------------------
    def start_refresh(self) -> None:
        """Re-REGISTER at ``refresh_ratio`` of each granted expiry until stopped."""
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while True:
            delay = max(0.5, (self.granted or self.expires) * self.refresh_ratio)
            await asyncio.sleep(delay)
            try:
                await self.register()
            except (SipError, TransportError) as exc:
                log.warning("refresh of %s failed: %s; retrying", self.aor, exc)
                await asyncio.sleep(min(30.0, delay))

    async def stop_refresh(self) -> None:
        task, self._refresh = self._refresh, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
