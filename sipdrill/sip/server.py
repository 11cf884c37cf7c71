"""A SIP service on UDP, TCP and TLS listeners: server transactions around a request core.

:class:`SipService` glues the asyncio :class:`~sipdrill.sip.transport.SipTransport`
to the sans-IO :class:`~sipdrill.sip.transaction.TransactionManager`: every
request gets a server transaction (so UDP retransmissions are answered from
the transaction, not re-processed), the transaction's ``Send`` events go
back on the flow the request came in on, and timers are driven by
``loop.time()``.

What the service answers itself, so that a core only sees methods it handles
(RFC 3261 8.2.1, 11, 9.2):

* OPTIONS: 200 with Allow, Accept and Supported;
* CANCEL: 481 (a registrar has no INVITE transaction to cancel);
* ACK: absorbed;
* a method the core does not handle: 405 with Allow if it is a method SIP
  defines, 501 otherwise.

The core is a callable ``(request, received, now) -> Response`` (see
:data:`RequestHandler`); :func:`registrar_handler` adapts the generic
:class:`~sipdrill.sip.registrar.Registrar` to it, and :func:`run_registrar`
runs that on a list of listeners until stopped.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from sipmessage import Request, Response

from sipdrill.errors import SipError
from sipdrill.sip import fastpath
from sipdrill.sip.digest import DigestAuthenticator
from sipdrill.sip.message import make_response
from sipdrill.sip.registrar import Authenticator, Registrar
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
)
from sipdrill.sip.transport import (
    Addr,
    Flow,
    Kind,
    Received,
    SipTransport,
    TimerCore,
    TimerDriver,
    TransportError,
    TransportLimits,
)

__all__ = [
    "KNOWN_METHODS",
    "ListenSpec",
    "RegistrarConfig",
    "RequestHandler",
    "SipService",
    "build_registrar_service",
    "make_authenticator",
    "registrar_handler",
    "registrar_service",
    "tune_gc",
]

log = logging.getLogger("sipdrill.sip.server")


def receive_into(
    transactions: TransactionManager, rx: Received, now: float
) -> list[TransactionEvent] | None:
    """Hand a received message to the transaction layer: its events, or None
    when the layer refused the message (logged, and nothing else to do)."""
    message = rx.message
    try:
        if isinstance(message, Response):
            return transactions.receive_response(message, now)
        return transactions.receive_request(message, now, reliable=rx.flow.reliable, peer=rx.remote)
    except TransactionError as exc:
        log.info("%s from %s: %s", rx.kind, rx.remote, exc)
        return None


# Methods defined by RFC 3261 and its common extensions: a server that does
# not handle one answers 405 (with Allow), anything else 501.
KNOWN_METHODS = frozenset(
    {
        "INVITE",
        "ACK",
        "BYE",
        "CANCEL",
        "OPTIONS",
        "REGISTER",
        "PRACK",
        "SUBSCRIBE",
        "NOTIFY",
        "PUBLISH",
        "INFO",
        "REFER",
        "MESSAGE",
        "UPDATE",
    }
)

RequestHandler = Callable[[Request, Received, float], Response]
"""The core: answer one new request (final response). Raising :class:`SipError`
answers its status code; any other exception answers 500."""


@dataclass(frozen=True)
class ListenSpec:
    """One listener, written ``udp:127.0.0.1:5060``, ``tls:[::1]:5061``."""

    kind: Kind
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> ListenSpec:
        kind_text, sep, rest = text.partition(":")
        try:
            kind = Kind(kind_text.lower())
        except ValueError:
            raise ValueError(f"{text!r}: transport must be udp, tcp or tls") from None
        if not sep:
            raise ValueError(f"{text!r}: expected KIND:HOST:PORT")
        if rest.startswith("["):
            host, bracket, port_text = rest[1:].partition("]")
            if not bracket or not port_text.startswith(":"):
                raise ValueError(f"{text!r}: expected KIND:[IPv6]:PORT")
            port_text = port_text[1:]
        else:
            host, sep, port_text = rest.rpartition(":")
            if not sep or not host:
                raise ValueError(f"{text!r}: expected KIND:HOST:PORT")
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ValueError(f"{text!r}: bad port")
        return cls(kind, host, int(port_text))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.kind}:{host}:{self.port}"


class SipService:
    """Server transactions and method dispatch on top of one :class:`SipTransport`."""

    def __init__(
        self,
        handler: RequestHandler,
        *,
        methods: Iterable[str] = ("REGISTER",),
        limits: TransportLimits | None = None,
        timers: TimerConfig | None = None,
        rng: random.Random | None = None,
        server_name: str = "sipdrill",
    ) -> None:
        self.handler = handler
        self.methods = frozenset(m.upper() for m in methods)
        self.allow = ", ".join(sorted(self.methods | {"OPTIONS", "ACK", "CANCEL"}))
        self.server_name = server_name
        self.limits = limits
        self.transactions = TransactionManager(rng or random.Random(), timers or TimerConfig())
        self._flows: dict[TransactionKey, Flow] = {}
        self._transport: SipTransport | None = None
        self._driver: TimerDriver | None = None
        self._extra_cores: list[tuple[TimerCore, Callable[[object], None] | None]] = []
        self._extra_drivers: list[TimerDriver] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        # The core object, when the service was built around one (the registrar).
        self.registrar: Registrar | None = None
        # REGISTERs over UDP answered by sipdrill.sip.fastpath where it can:
        # set by registrar_service, whose handler is the registrar alone.
        self.register_fast_path = False

    def add_timer_core(
        self, core: TimerCore, on_output: Callable[[object], None] | None = None
    ) -> None:
        """Drive another sans-IO core's timers (e.g. binding expiry) with this service."""
        self._extra_cores.append((core, on_output))
        if self.loop is not None:
            self._extra_drivers.append(TimerDriver(core, on_output))

    @property
    def transport(self) -> SipTransport:
        if self._transport is None:
            raise RuntimeError("SipService.start() has not been called")
        return self._transport

    async def start(
        self,
        listens: Sequence[ListenSpec],
        *,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
    ) -> list[tuple[Kind, Addr]]:
        """Open every listener (all or none); returns the bound addresses in order."""
        self.loop = asyncio.get_running_loop()
        if self._transport is None:
            self._transport = SipTransport(self._on_message, limits=self.limits)
            self._driver = TimerDriver(self.transactions, self._on_timer_events)
            self._extra_drivers = [TimerDriver(c, out) for c, out in self._extra_cores]
            if self.register_fast_path and self.registrar is not None:
                self._transport.datagram_shortcut = self._register_shortcut
        bound: list[tuple[Kind, Addr]] = []
        try:
            for spec in listens:
                addr = await self.transport.listen(
                    spec.kind,
                    spec.host,
                    spec.port,
                    ssl_context=ssl_context if spec.kind is Kind.TLS else None,
                    reuse_port=reuse_port,
                )
                bound.append((spec.kind, addr))
        except TransportError:
            await self.close()
            raise
        return bound

    async def close(self) -> None:
        if self._driver is not None:
            self._driver.stop()
        for driver in self._extra_drivers:
            driver.stop()
        if self._transport is not None:
            await self._transport.close()
        self._flows.clear()

    # -- the receive path ---------------------------------------------------------------
    def _now(self) -> float:
        assert self.loop is not None
        return self.loop.time()

    def _on_message(self, rx: Received) -> None:
        now = self._now()
        events = receive_into(self.transactions, rx, now)
        if events is None:
            return
        self._run(events, rx)
        assert self._driver is not None
        self._driver.poke()
        for driver in self._extra_drivers:
            driver.poke()

    def _register_shortcut(self, data: bytes, flow: Flow) -> bytes | None:
        registrar = self.registrar
        if registrar is None or "REGISTER" not in self.methods:
            return None
        answer = fastpath.answer_register(
            registrar,
            self.transactions,
            data,
            flow,
            self._now(),
            self.server_name,
            self.transport.limits.message,
        )
        if answer is not None:
            assert self._driver is not None
            self._driver.poke()
            for driver in self._extra_drivers:
                driver.poke()
        return answer

    def _on_timer_events(self, output: object) -> None:
        if isinstance(output, list):
            self._run(output, None)

    def _run(self, events: list[TransactionEvent], rx: Received | None) -> None:
        pending = list(events)
        while pending:
            event = pending.pop(0)
            if isinstance(event, DeliverRequest):
                if event.key is None or rx is None:
                    continue  # an ACK for a 2xx: a registrar has no dialog to give it to
                self._flows[event.key] = rx.flow
                response = self._answer(event.request, rx)
                try:
                    pending += self.transactions.send_response(event.key, response, self._now())
                except TransactionError as exc:
                    log.warning("cannot answer %s: %s", event.key, exc)
            elif isinstance(event, Send):
                flow = self._flows.get(event.key)
                if flow is None and rx is not None:
                    # An INVITE's 100 Trying comes before the request is delivered.
                    flow = self._flows[event.key] = rx.flow
                if flow is None or not self.transport.send(flow, event.data):
                    pending += self.transactions.transport_error(
                        event.key, "flow closed", self._now()
                    )
            elif isinstance(event, TransactionTerminated):
                self._flows.pop(event.key, None)
            elif isinstance(event, DeliverResponse):
                log.debug("stray response %s dropped", event.response.code)

    def _answer(self, request: Request, rx: Received) -> Response:
        method = request.method.upper()
        try:
            if method in self.methods:
                response = self.handler(request, rx, self._now())
            elif method == "OPTIONS":
                response = make_response(
                    request,
                    200,
                    headers=[
                        ("Allow", self.allow),
                        ("Accept", "application/sdp"),
                        ("Supported", "path, outbound"),
                    ],
                )
            elif method == "CANCEL":
                response = make_response(request, 481)
            elif method in KNOWN_METHODS:
                response = make_response(request, 405, headers=[("Allow", self.allow)])
            else:
                response = make_response(request, 501, headers=[("Allow", self.allow)])
        except SipError as exc:
            response = make_response(request, exc.status_code, exc.reason, headers=exc.headers)
        except Exception:
            log.exception("%s %s from %s: the core failed", method, request.uri, rx.remote)
            response = make_response(request, 500)
        if response.headers.get("Server") is None:
            response.headers.add("Server", self.server_name)
        return response


# -- the registrar as a standalone service -----------------------------------------------


@dataclass
class RegistrarConfig:
    """What `sipdrill sip registrar` runs (see :func:`build_registrar_service`)."""

    domain: str
    listens: list[ListenSpec]
    tls_names: tuple[str, ...] = ()
    users: dict[str, str] | None = None
    expires_default: int = 600
    expires_min: int = 300
    expires_max: int = 900
    digest_algorithms: tuple[str, ...] = ("MD5", "SHA-256")
    #: REGISTERs over UDP through sipdrill.sip.fastpath where it can (not with auth).
    fast_path: bool = True
    #: recvmmsg/sendmmsg on a worker's share of a UDP listener (with sipdrill_mmsg).
    batch_io: bool = True


class _ExpiryTimers:
    """The registrar's binding expiry as a :class:`TimerCore`."""

    def __init__(self, registrar: Registrar) -> None:
        self.registrar = registrar

    def next_deadline(self) -> float | None:
        return self.registrar.next_deadline()

    def handle_timer(self, now: float) -> object:
        return self.registrar.expire(now)


def registrar_handler(registrar: Registrar) -> RequestHandler:
    """Adapt the sans-IO registrar to :data:`RequestHandler`; bindings record the flow."""

    def handle(request: Request, rx: Received, now: float) -> Response:
        return registrar.handle(request, now, rx.flow).response

    return handle


def make_authenticator(
    users: dict[str, str], realm: str, algorithms: Sequence[str] = ("MD5", "SHA-256")
) -> Authenticator:
    """Digest authentication for ``users`` in ``realm`` (nonces from the system RNG).

    MD5 is offered first by default: SIPp and many deployed UAs only know
    MD5 and answer the first challenge they see; SHA-256 is offered too.
    """
    return DigestAuthenticator(realm, users.get, random.SystemRandom(), algorithms=algorithms)


def build_registrar_service(
    config: RegistrarConfig, *, limits: TransportLimits | None = None
) -> SipService:
    """A :class:`SipService` running the generic registrar; listeners are opened by start()."""
    auth = (
        make_authenticator(config.users, config.domain, config.digest_algorithms)
        if config.users
        else None
    )
    registrar = Registrar(
        config.domain, config.expires_default, config.expires_min, config.expires_max, auth
    )
    if limits is None and not config.batch_io:
        limits = TransportLimits(udp_batch_io=False)
    return registrar_service(registrar, limits=limits, fast_path=config.fast_path)


def registrar_service(
    registrar: Registrar,
    *,
    limits: TransportLimits | None = None,
    timers: TimerConfig | None = None,
    fast_path: bool = True,
) -> SipService:
    """A :class:`SipService` around any :class:`Registrar` (with its policy/auth hooks).

    Binding expiry is driven by the service; ``service.registrar`` is the
    registrar, whose bindings carry the :class:`Flow` they came in on.
    ``fast_path``: answer the common REGISTER over UDP without building
    messages (:mod:`sipdrill.sip.fastpath`; same bindings and answer, and
    anything it does not take goes the full way).
    """
    service = SipService(
        registrar_handler(registrar), methods=("REGISTER",), limits=limits, timers=timers
    )
    service.add_timer_core(_ExpiryTimers(registrar))
    service.registrar = registrar
    service.register_fast_path = fast_path
    return service


def tune_gc() -> None:
    """Fewer, not longer, collector pauses for a server holding many live transactions.

    A UDP server transaction lives 32 s (Timer J) after its answer, so at a
    few thousand REGISTER/s tens of thousands of messages are alive; with the
    default thresholds (700, 10, 10) full collections walking all of them ran
    every few thousand requests and stalled the loop for hundreds of ms, long
    enough for clients to retransmit. Measured with SIPp at 2,500 REGISTER/s
    for 4 s: worst event-loop stall 570 ms (five gen-2 collections) with the
    defaults, 29 ms with these settings. Start-up objects are frozen out of
    collection altogether. Process-wide: call once in a server process, after
    start-up.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)
