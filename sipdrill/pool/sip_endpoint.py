"""An asyncio SIP endpoint that can answer later and send requests of its own.

:class:`sipdrill.sip.server.SipService` answers every request synchronously
from a callable, which is all a registrar needs. A Front End pool needs more:
it relays IM and conference INVITEs to another pool or to a client's flow and
answers only when that leg has answered; it sends heartbeats, NOTIFYs and
BYEs as a user agent client. So this module puts the same pieces
(:class:`~sipdrill.sip.transport.SipTransport`, the sans-IO
:class:`~sipdrill.sip.transaction.TransactionManager`, a
:class:`~sipdrill.sip.transport.TimerDriver` on ``loop.time()``) together
with two additions:

* a request handler may return an awaitable: the server transaction stays
  open (a retransmission is absorbed) until it resolves;
* :meth:`SipEndpoint.request` runs a client transaction and resolves to its
  final response (or raises :class:`RequestFailed` on a timeout, a
  transport error, or the flow closing under it), and :meth:`SipEndpoint.proxy`
  forwards a received request statefully (RFC 3261 16: our Via on top,
  Max-Forwards decremented, our Via removed from the response).

A forking proxy needs every response, not only the final one: a handler may
return :data:`LATER` and answer through :meth:`SipEndpoint.respond` (1xx,
the final, 2xx retransmissions), and :meth:`SipEndpoint.start_request`
hands each response of a client transaction (1xx, the final, 2xx
retransmissions) or its failure to a listener.

Both the pool and the small user agent of the tests and benchmarks
(:mod:`sipdrill.pool.sip_ua`) use it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from sipmessage import URI, Request, Response

from sipdrill.errors import SipdrillError, SipError
from sipdrill.sip.forking import strip_top_via
from sipdrill.sip.message import make_response
from sipdrill.sip.server import receive_into
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
    Addr,
    Flow,
    Kind,
    Received,
    SipTransport,
    TimerDriver,
    TransportError,
    TransportLimits,
)

__all__ = [
    "LATER",
    "Handler",
    "Later",
    "RequestFailed",
    "ResponseListener",
    "SipEndpoint",
    "copy_request",
]

log = logging.getLogger("sipdrill.pool.sip")

class Later:
    """The handler took the request's server transaction over: it answers
    with :meth:`SipEndpoint.respond` (the key: :func:`~sipdrill.sip.transaction.server_key`)."""

    _instance: Later | None = None

    def __new__(cls) -> Later:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "LATER"


LATER = Later()

Answer = Response | Awaitable[Response] | Later | None
Handler = Callable[[Request, Received], Answer]
"""``handler(request, received)``: a final response now, an awaitable of one,
:data:`LATER`, or None (only for ACKs, which are never answered)."""

FlowCallback = Callable[[Flow], None]


@dataclass
class RequestFailed(SipdrillError):
    """A request we sent got no final response: ``reason`` is ``timeout``,
    ``transport`` (could not connect or send) or ``flow-closed``."""

    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


ResponseListener = Callable[[Response | RequestFailed], None]
"""Told each response of a client transaction (provisional, final, 2xx
retransmissions) and, instead of a final, why none came."""


def copy_request(request: Request, uri: URI | None = None) -> Request:
    """A deep-enough copy of ``request`` (headers are lists that sipmessage
    hands out by reference), optionally with another Request-URI."""
    copy = Request(method=request.method, uri=uri or request.uri, body=request.body)
    # sipmessage.Headers has keys() but is not iterable.
    for name in request.headers.keys():  # noqa: SIM118
        copy.headers.setlist(name, list(request.headers.getlist(name)))
    return copy


class SipEndpoint:
    """Server and client transactions over one :class:`SipTransport`.

    Create and use inside a running loop; ``await close()`` when done. The
    endpoint cancels the tasks it started for deferred answers on close.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        limits: TransportLimits | None = None,
        timers: TimerConfig | None = None,
        rng: random.Random | None = None,
        server_name: str = "sipdrill",
        on_flow_closed: FlowCallback | None = None,
    ) -> None:
        self.handler = handler
        self.server_name = server_name
        self.on_flow_closed = on_flow_closed
        self.loop = asyncio.get_running_loop()
        self.transactions = TransactionManager(rng or random.Random(), timers or TimerConfig())
        self.transport = SipTransport(
            self._on_message, limits=limits, on_flow_closed=self._flow_closed
        )
        self._driver = TimerDriver(self.transactions, self._on_timer_output)
        self._server_flows: dict[TransactionKey, Flow] = {}
        self._client_flows: dict[TransactionKey, Flow] = {}
        #: Client transactions per flow, so a closing flow fails its own in O(1).
        self._by_flow: dict[Flow, set[TransactionKey]] = {}
        self._waiters: dict[TransactionKey, asyncio.Future[Response]] = {}
        self._listeners: dict[TransactionKey, ResponseListener] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------
    async def listen(
        self, listens: Sequence[tuple[Kind, str, int]], *, ssl_context: ssl.SSLContext | None
    ) -> list[tuple[Kind, Addr]]:
        """Open every listener; on failure nothing stays open (the caller closes)."""
        bound = []
        for kind, host, port in listens:
            addr = await self.transport.listen(
                kind, host, port, ssl_context=ssl_context if kind is Kind.TLS else None
            )
            bound.append((kind, addr))
        return bound

    async def close(self) -> None:
        self._closed = True
        self._driver.stop()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for fut in self._waiters.values():
            if not fut.done():
                fut.cancel()
        self._waiters.clear()
        self._listeners.clear()
        await self.transport.close()
        self._server_flows.clear()
        self._client_flows.clear()
        self._by_flow.clear()

    def spawn(self, coro: Awaitable[None], name: str | None = None) -> asyncio.Task[None]:
        """Run ``coro`` as a task the endpoint cancels on close; errors are logged."""

        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("task %s failed", name or coro)

        task = self.loop.create_task(guarded(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- client side -----------------------------------------------------------------
    def via_for(self, flow: Flow, branch: str) -> str:
        host, port = flow.local
        host = f"[{host}]" if ":" in host else host
        return f"SIP/2.0/{flow.kind.via} {host}:{port};branch={branch};rport"

    async def open_flow(
        self,
        kind: Kind,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        reuse: bool = True,
    ) -> Flow:
        """A flow to a peer (see :meth:`SipTransport.open_flow`); raises
        :class:`RequestFailed` (``transport``) when it cannot be opened."""
        try:
            return await self.transport.open_flow(
                kind,
                host,
                port,
                ssl_context=ssl_context,
                server_hostname=server_hostname,
                reuse=reuse,
            )
        except TransportError as exc:
            raise RequestFailed("transport", str(exc)) from exc

    async def request(
        self, request: Request, flow: Flow, *, give_up_after: float | None = None
    ) -> Response:
        """Send ``request`` (its top Via must carry a fresh branch, see
        :meth:`new_branch`) on ``flow``; its final response.

        ``give_up_after`` bounds the wait below the transaction's own 64*T1: a
        pool must not hold a client's MESSAGE for 32 s because a peer pool
        went silent.
        """
        if self._closed:
            raise RequestFailed("transport", "endpoint closed")
        now = self.loop.time()
        try:
            key, events = self.transactions.send_request(
                request, now, reliable=flow.reliable, peer=flow.remote
            )
        except TransactionError as exc:
            raise RequestFailed("transport", exc.reason) from exc
        fut: asyncio.Future[Response] = self.loop.create_future()
        self._waiters[key] = fut
        self._client_flows[key] = flow
        self._by_flow.setdefault(flow, set()).add(key)
        self._run(events, None)
        self._driver.poke()
        try:
            async with asyncio.timeout(give_up_after):
                return await fut
        except TimeoutError:
            raise RequestFailed("timeout", f"{request.method} to {flow.remote}") from None
        finally:
            # An abandoned transaction lives on in the manager until its own
            # timer ends it; its late events then find no waiter.
            self._waiters.pop(key, None)

    def new_branch(self) -> str:
        return self.transactions.new_branch()

    def start_request(
        self, request: Request, flow: Flow, listener: ResponseListener
    ) -> TransactionKey:
        """Send ``request`` on ``flow`` (a fresh branch in its top Via) and
        tell ``listener`` every response, or the failure; raises
        :class:`RequestFailed` when the transaction cannot start."""
        if self._closed:
            raise RequestFailed("transport", "endpoint closed")
        try:
            key, events = self.transactions.send_request(
                request, self.loop.time(), reliable=flow.reliable, peer=flow.remote
            )
        except TransactionError as exc:
            raise RequestFailed("transport", exc.reason) from exc
        self._listeners[key] = listener
        self._client_flows[key] = flow
        self._by_flow.setdefault(flow, set()).add(key)
        self._run(events, None)
        self._driver.poke()
        return key

    def forget(self, key: TransactionKey) -> None:
        """Stop telling anyone about ``key``'s responses (the transaction runs on)."""
        self._listeners.pop(key, None)

    async def proxy(
        self,
        request: Request,
        flow: Flow,
        *,
        uri: URI | None = None,
        headers: Iterable[tuple[str, str]] = (),
        give_up_after: float | None = None,
    ) -> Response:
        """Forward ``request`` on ``flow`` (RFC 3261 16.6) and return the
        final response with our Via removed, ready to send upstream."""
        fwd = copy_request(request, uri)
        max_forwards = request.headers.get("Max-Forwards")
        hops = int(max_forwards) if max_forwards and max_forwards.isdigit() else 70
        if hops <= 0:
            raise SipError("Too Many Hops", 483)
        fwd.headers.set("Max-Forwards", str(hops - 1))
        vias = [self.via_for(flow, self.new_branch()), *request.headers.getlist("Via")]
        fwd.headers.setlist("Via", vias)
        for name, value in headers:
            fwd.headers.set(name, value)
        response = await self.request(fwd, flow, give_up_after=give_up_after)
        return strip_top_via(response)

    def send_stateless(self, flow: Flow, message: Request | Response) -> bool:
        """Send without a transaction (an ACK for a 2xx, relayed)."""
        return self.transport.send(flow, message)

    # -- the receive path --------------------------------------------------------------
    def _on_message(self, rx: Received) -> None:
        now = self.loop.time()
        events = receive_into(self.transactions, rx, now)
        if events is None:
            return
        self._run(events, rx)
        self._driver.poke()

    def _on_timer_output(self, output: object) -> None:
        if isinstance(output, list):
            self._run(output, None)

    def _run(self, events: list[TransactionEvent], rx: Received | None) -> None:
        pending = list(events)
        while pending:
            event = pending.pop(0)
            if isinstance(event, DeliverRequest):
                if rx is not None:
                    self._deliver(event, rx)
            elif isinstance(event, Send):
                flow = self._server_flows.get(event.key) or self._client_flows.get(event.key)
                if flow is None and rx is not None and isinstance(rx.message, Request):
                    # A server INVITE transaction sends its 100 Trying before
                    # it delivers the request: answer on the flow it came in on.
                    flow = self._server_flows[event.key] = rx.flow
                if flow is None or not self.transport.send(flow, event.data):
                    pending += self.transactions.transport_error(
                        event.key, "flow closed", self.loop.time()
                    )
            elif isinstance(event, DeliverResponse):
                if event.key is None:
                    continue  # stray
                listener = self._listeners.get(event.key)
                if listener is not None:
                    self._tell(listener, event.response)
                elif event.response.code >= 200:  # a proxy leg only waits for the final
                    self._resolve(event.key, event.response)
            elif isinstance(event, TransactionTimeout):
                self._fail(event.key, RequestFailed("timeout", f"timer {event.timer.value}"))
            elif isinstance(event, TxTransportError):
                self._fail(event.key, RequestFailed("transport", event.reason))
            elif isinstance(event, TransactionTerminated):
                self._server_flows.pop(event.key, None)
                self._listeners.pop(event.key, None)
                flow = self._client_flows.pop(event.key, None)
                if flow is not None:
                    keys = self._by_flow.get(flow)
                    if keys is not None:
                        keys.discard(event.key)
                        if not keys:
                            del self._by_flow[flow]

    def _resolve(self, key: TransactionKey, response: Response) -> None:
        fut = self._waiters.get(key)
        if fut is not None and not fut.done():
            fut.set_result(response)

    def _fail(self, key: TransactionKey, exc: RequestFailed) -> None:
        listener = self._listeners.pop(key, None)
        if listener is not None:
            self._tell(listener, exc)
        fut = self._waiters.get(key)
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    @staticmethod
    def _tell(listener: ResponseListener, what: Response | RequestFailed) -> None:
        try:
            listener(what)
        except Exception:
            log.exception("a response listener failed on %s", what)

    def _deliver(self, event: DeliverRequest, rx: Received) -> None:
        request = event.request
        key = event.key
        if key is None:
            # An ACK for a 2xx: its own transaction, never answered.
            self._call(request, rx)
            return
        self._server_flows[key] = rx.flow
        answer = self._call(request, rx)
        if request.method == "ACK" or isinstance(answer, Later):
            # An ACK that matched an INVITE answered 2xx (RFC 6026) is never
            # answered; LATER: the handler answers through respond().
            return
        if answer is None:
            self._respond(key, make_response(request, 500))
        elif isinstance(answer, Response):
            self._respond(key, answer)
        else:
            self.spawn(self._respond_later(key, request, answer), name=f"answer {request.method}")

    def _call(self, request: Request, rx: Received) -> Answer:
        try:
            return self.handler(request, rx)
        except SipError as exc:
            return make_response(request, exc.status_code, exc.reason, exc.headers)
        except Exception:
            log.exception("%s %s from %s: handler failed", request.method, request.uri, rx.remote)
            return make_response(request, 500)

    async def _respond_later(
        self, key: TransactionKey, request: Request, answer: Awaitable[Response]
    ) -> None:
        try:
            response = await answer
        except SipError as exc:
            response = make_response(request, exc.status_code, exc.reason, exc.headers)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s %s: handler failed", request.method, request.uri)
            response = make_response(request, 500)
        self._respond(key, response)

    def respond(self, key: TransactionKey, response: Response) -> bool:
        """Answer server transaction ``key`` (a 1xx, the final, a 2xx again);
        False when it is gone or cannot send that now."""
        return self._respond(key, response)

    def _respond(self, key: TransactionKey, response: Response) -> bool:
        if response.headers.get("Server") is None:
            response.headers.add("Server", self.server_name)
        try:
            events = self.transactions.send_response(key, response, self.loop.time())
        except TransactionError as exc:
            log.info("cannot answer %s: %s", key, exc)
            return False
        self._run(events, None)
        self._driver.poke()
        return True

    def _flow_closed(self, flow: Flow) -> None:
        # A request waiting on a stream that has gone will never be answered:
        # fail it now rather than at Timer F.
        for key in list(self._by_flow.pop(flow, ())):
            self._fail(key, RequestFailed("flow-closed", f"{flow.remote}"))
        if self.on_flow_closed is not None:
            try:
                self.on_flow_closed(flow)
            except Exception:
                log.exception("on_flow_closed failed for %s", flow)
