"""What the parts of a pool's SIP side use of their pool, the headers pools
put on what they send each other, and how a pool knows a request came from
another pool.

The parts (:mod:`.sip_registrar`, :mod:`.sip_partner`, :mod:`.sip_presence`,
:mod:`.sip_contacts`, :mod:`.sip_relay`, :mod:`.sip_focus`) do not reach into
the pool service: they get a :class:`SipContext`, which
:class:`~sipdrill.pool.sip_side.PoolSip` implements over the service and its
SIP endpoint. The clock, task creation and timers are in it, so a test can
drive a part with a plain object and no event loop where that is cheap.

Which pool sent a request is what the TLS connection it came on proved
(mutual TLS, as between Lync pools): each pool presents its certificate from
the lab CA, which names the pool, when it connects to another pool, and the
transport hands the names it verified over with the flow
(:attr:`~sipdrill.sip.transport.Flow.peer_names`). :func:`from_pool` reads
them; no header counts. A request on any other flow is a client's, whatever
it says: :func:`strip_pool_claims` removes the pool-to-pool headers from it
(so they are neither believed nor relayed) and says what it pretended.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING, Protocol

from sipmessage import URI, Request, Response

from sipdrill.pool.policy import Refusal, RegistrarDecision
from sipdrill.sip.message import make_response
from sipdrill.sip.transport import Flow, TimerCore

if TYPE_CHECKING:
    from sipdrill.pool.metrics import PoolMetrics
    from sipdrill.pool.settings import PoolSettings
    from sipdrill.pool.store import UserStore

MODE_HEADER = "X-Sipdrill-Mode"
#: What pools once marked their requests to each other with. No pool sends it
#: now (the certificate says who sent a request); one that arrives is removed.
POOL_HEADER = "X-Sipdrill-Pool"
#: The sender's service mode, on requests one pool relays to another;
#: believed only from a pool (:func:`from_pool`), removed from anyone else's.
SENDER_MODE_HEADER = "X-Sipdrill-Sender-Mode"
ALLOW = "REGISTER, OPTIONS, MESSAGE, SUBSCRIBE, NOTIFY, PUBLISH, SERVICE, INVITE, ACK, BYE, CANCEL"
#: Header (name, value) pairs to add to a request.
Headers = Iterable[tuple[str, str]]


class Timer(Protocol):
    """Fires its core's ``handle_timer`` at the core's next deadline."""

    def poke(self) -> None:
        """The deadline may have moved: look again."""


class SipContext(Protocol):
    """A pool as its SIP side's parts see it."""

    fqdn: str
    domain: str
    settings: PoolSettings
    metrics: PoolMetrics

    # -- store, policy, failover state ---------------------------------------------------
    @property
    def store(self) -> UserStore: ...

    def decide(self, aor: str) -> RegistrarDecision:
        """The registrar's decision for ``aor`` (:func:`~.policy.registrar_decision`)."""
        ...

    def home_of(self, aor: str) -> str | None: ...

    def serving_pool(self, home: str) -> str:
        """The pool that serves ``home``'s users now (pool failover state)."""
        ...

    def backup_of(self, home: str) -> str | None: ...

    def is_pool(self, name: str) -> bool:
        """``name`` is a pool of this lab (this one included)."""
        ...

    def pool_sip_uri(self, pool: str) -> str: ...

    # -- clock and tasks -------------------------------------------------------------------
    def now(self) -> float:
        """Monotonic seconds (the loop's clock)."""
        ...

    def wall(self) -> float:
        """Wall-clock seconds (for reports)."""
        ...

    def spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        """Run ``coro`` until it ends or the SIP side closes; errors are logged."""
        ...

    def timer(self, core: TimerCore) -> Timer: ...

    # -- send ------------------------------------------------------------------------------
    def via(self, flow: Flow) -> str:
        """The Via of a new request on ``flow`` (a fresh branch)."""
        ...

    async def send(
        self, request: Request, flow: Flow, *, give_up_after: float | None = None
    ) -> Response:
        """Its final response; :class:`~.sip_endpoint.RequestFailed` when none
        comes within ``give_up_after`` (default: the forward timeout)."""
        ...

    async def proxy(
        self, request: Request, flow: Flow, *, uri: URI | None = None, headers: Headers = ()
    ) -> Response:
        """Relay a received request on ``flow``; its final response (within
        the forward timeout)."""
        ...

    async def pool_flow(self, pool: str) -> Flow:
        """A TLS flow to ``pool``'s SIP side (reused while it is open)."""
        ...

    def is_open(self, flow: Flow) -> bool: ...

    def close_flow(self, flow: Flow) -> None: ...


def new_request(
    ctx: SipContext, method: str, uri: URI, flow: Flow, *, from_: str, to: str, call_id: str,
    cseq: int, headers: Headers = (), body: bytes = b"",
) -> Request:
    """A request this pool sends on ``flow`` (to a client, or to another
    pool: :meth:`SipContext.pool_flow`'s connection presents this pool's
    certificate, which is how the other pool knows the sender)."""
    req = Request(method=method, uri=uri, body=body)
    h = req.headers
    h.set("Via", ctx.via(flow))
    h.set("Max-Forwards", "70")
    h.set("From", from_)
    h.set("To", to)
    h.set("Call-ID", call_id)
    h.set("CSeq", f"{cseq} {method}")
    for name, value in headers:
        h.add(name, value)
    return req


async def reach(ctx: SipContext, pool: str | None, route: object) -> Flow | None:
    """The flow to a watcher or a participant: to the pool that relays for
    them, else the flow they came on while it is open (None: gone)."""
    if pool is not None:
        return await ctx.pool_flow(pool)
    if isinstance(route, Flow) and ctx.is_open(route):
        return route
    return None


def from_pool(ctx: SipContext, flow: Flow) -> str | None:
    """The other pool of this lab at the far end of ``flow``, or None (a client).

    A pool is the one whose FQDN is among the names of the certificate that
    ``flow``'s TLS connection verified (the lab CA's: a pool trusts no
    other). No certificate, one naming no pool, or one naming several pools
    (no certificate of this lab does): a client. A certificate naming this
    pool is not another pool either.
    """
    pools = {name for name in flow.peer_names if ctx.is_pool(name)}
    if len(pools) != 1:
        return None
    (pool,) = pools
    return pool if pool != ctx.fqdn else None


class Pretence(enum.StrEnum):
    """How a request pretended to come from a pool its connection did not
    prove (the ``reason`` of ``sipdrill_pool_untrusted_pool_claims``)."""

    #: Pool-to-pool headers on a connection without a lab pool's certificate.
    CLIENT = "client"
    #: :data:`POOL_HEADER` naming another pool than the certificate does.
    WRONG_POOL = "wrong-pool"
    #: A heartbeat (OPTIONS) from a pool that is not this pool's partner.
    NOT_PARTNER = "not-partner"


def strip_pool_claims(request: Request, sender: str | None) -> Pretence | None:
    """Remove from ``request`` what only a pool may say that its connection
    did not prove; ``sender`` is :func:`from_pool` of its flow.

    :data:`POOL_HEADER` goes from every request (the certificate says who
    sent it); :data:`SENDER_MODE_HEADER` from a client's (a client saying
    its own mode must not be believed, nor relayed to the next pool as if
    this pool had said it). The request is then handled as its sender's:
    a client's request as any client's. Returns what it pretended, or None.
    """
    headers = request.headers
    claimed = headers.get(POOL_HEADER)
    pretence: Pretence | None = None
    if claimed is not None:
        headers.remove(POOL_HEADER)
        if sender is None:
            pretence = Pretence.CLIENT
        elif claimed.strip().lower() != sender:
            pretence = Pretence.WRONG_POOL
    if sender is None and headers.get(SENDER_MODE_HEADER) is not None:
        headers.remove(SENDER_MODE_HEADER)
        pretence = Pretence.CLIENT
    return pretence


def event_of(request: Request) -> str:
    """The event package of a SUBSCRIBE or PUBLISH (``presence``)."""
    return (request.headers.get("Event") or "").split(";", 1)[0].strip().lower()


def refuse(ctx: SipContext, request: Request, refusal: Refusal) -> Response:
    if refusal.feature is not None:
        ctx.metrics.refusals.labels(refusal.feature.value).inc()
    return make_response(request, refusal.status_code, refusal.reason)
