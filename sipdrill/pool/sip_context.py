"""What the parts of a pool's SIP side use of their pool, and the headers
pools put on what they send each other.

The parts (:mod:`.sip_registrar`, :mod:`.sip_partner`, :mod:`.sip_presence`,
:mod:`.sip_contacts`, :mod:`.sip_relay`, :mod:`.sip_focus`) do not reach into
the pool service: they get a :class:`SipContext`, which
:class:`~sipdrill.pool.sip_side.PoolSip` implements over the service and its
SIP endpoint. The clock, task creation and timers are in it, so a test can
drive a part with a plain object and no event loop where that is cheap.
"""

from __future__ import annotations

import asyncio
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
POOL_HEADER = "X-Sipdrill-Pool"
#: The sender's service mode, on requests one pool relays to another.
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
    cseq: int, headers: Headers = (), body: bytes = b"", to_pool: bool = True,
) -> Request:
    """A request this pool sends on ``flow`` (``to_pool``: to another pool,
    marked with :data:`POOL_HEADER`)."""
    req = Request(method=method, uri=uri, body=body)
    h = req.headers
    h.set("Via", ctx.via(flow))
    h.set("Max-Forwards", "70")
    h.set("From", from_)
    h.set("To", to)
    h.set("Call-ID", call_id)
    h.set("CSeq", f"{cseq} {method}")
    if to_pool:
        h.set(POOL_HEADER, ctx.fqdn)
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


def from_pool(ctx: SipContext, request: Request) -> str | None:
    """The other pool that sent ``request`` (:data:`POOL_HEADER`), or None."""
    value = request.headers.get(POOL_HEADER)
    if value is None:
        return None
    pool = value.strip().lower()
    return pool if ctx.is_pool(pool) and pool != ctx.fqdn else None


def event_of(request: Request) -> str:
    """The event package of a SUBSCRIBE or PUBLISH (``presence``)."""
    return (request.headers.get("Event") or "").split(";", 1)[0].strip().lower()


def refuse(ctx: SipContext, request: Request, refusal: Refusal) -> Response:
    if refusal.feature is not None:
        ctx.metrics.refusals.labels(refusal.feature.value).inc()
    return make_response(request, refusal.status_code, refusal.reason)
