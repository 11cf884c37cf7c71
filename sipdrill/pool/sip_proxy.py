"""Calls between users: the pool as a stateful, record-routing, forking proxy.

An INVITE to a user (not to a conference focus) is routed by the callee's
bindings and home pool, as :mod:`.sip_relay` routes IM:

- the callee has bindings here: the INVITE forks to every one of them in
  parallel (RFC 3261 16.6), the first 2xx wins and the other branches are
  cancelled;
- it has none, and the request came from another pool: 480 (one pool-to-pool
  hop, so no loops);
- otherwise the pools that may have it, one after another: the pool serving
  the callee's home pool, the home pool, its backup pool (where the callee
  registers in resiliency mode); a pool that is unreachable, does not answer
  within the forward timeout or answers 480/404/503 passes to the next. None
  left: 480. An unknown user: 404.

Calls work in resiliency mode (docs/reference.md, "Limited functionality"):
the caller must be served by this pool in some mode (else 403), and nothing
else is asked of it. Every pool on the path adds a ``Record-Route`` (its
address as the next hop sees it, ``;lr``), so ACK, BYE and re-INVITEs follow
the same pools: a request whose top ``Route`` names this pool is routed by
the rest of its route set, or, at the end of it, to the flow of the binding
whose contact is its Request-URI (RFC 5626: a client is reachable only
through its flow). A CANCEL cancels every branch of its INVITE (the caller
then gets 487). Max-Forwards 0 gets 483; an INVITE that carries a Via this
pool added gets 482 (loop). A Request-URI that is not a SIP URI gets 416,
one without a user part or outside the lab's domain 404.

The response context (which branch, what goes upstream, what to cancel) is
the sans-IO :class:`~sipdrill.sip.forking.ForkContext`; this module turns
its actions into transactions on the pool's SIP endpoint.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import heapq
import itertools
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from sipmessage import URI, Address, Request, Response

from sipdrill.errors import SipError
from sipdrill.pool.policy import Feature, ServiceMode
from sipdrill.pool.sip_context import (
    SENDER_MODE_HEADER,
    SipContext,
    Timer,
    from_pool,
)
from sipdrill.pool.sip_endpoint import LATER, Later, RequestFailed, ResponseListener, copy_request
from sipdrill.pool.sip_registrar import RegistrarSide
from sipdrill.pool.sip_relay import ImRelay
from sipdrill.sip.forking import (
    AbandonBranch,
    BranchGroup,
    CancelBranch,
    ForkAction,
    ForkConfig,
    ForkContext,
    LateSuccess,
    StartBranch,
    Upstream,
)
from sipdrill.sip.message import make_response
from sipdrill.sip.registrar import Binding, aor_of
from sipdrill.sip.transaction import MAGIC_COOKIE, TransactionKey, server_key
from sipdrill.sip.transport import Flow

log = logging.getLogger("sipdrill.pool")

__all__ = ["CallProxy", "CallSignalling", "PoolHop", "UserHop"]


class CallSignalling(Protocol):
    """What the proxy needs of the SIP endpoint besides :class:`SipContext`:
    every response of a branch, and answering its caller more than once
    (:class:`~sipdrill.pool.sip_endpoint.SipEndpoint` is one)."""

    def start_request(
        self, request: Request, flow: Flow, listener: ResponseListener
    ) -> TransactionKey: ...

    def forget(self, key: TransactionKey) -> None: ...

    def respond(self, key: TransactionKey, response: Response) -> bool: ...

    def send_stateless(self, flow: Flow, message: Request | Response) -> bool: ...

    def via_for(self, flow: Flow, branch: str) -> str: ...

    def new_branch(self) -> str: ...


@dataclass(frozen=True)
class UserHop:
    """A user's client, on the flow its binding came in on."""

    flow: Flow
    uri: URI


@dataclass(frozen=True)
class PoolHop:
    """Another pool, over the pools' TLS."""

    pool: str


Hop = UserHop | PoolHop


@dataclass
class _Leg:
    """One branch as sent: the request, the flow, its client transaction."""

    request: Request | None = None
    flow: Flow | None = None
    key: TransactionKey | None = None
    record_route: str | None = None


@dataclass
class _Call:
    key: TransactionKey
    request: Request  # to forward: as received, less the Routes that named us
    upstream: Flow
    fork: ForkContext[Hop]
    record_route: bool
    sender_mode: ServiceMode | None
    legs: dict[int, _Leg] = field(default_factory=dict)
    inbox: collections.deque[Callable[[], list[ForkAction[Hop]]]] = field(
        default_factory=collections.deque
    )
    running: bool = False
    final_sent: bool = False
    #: The deadline last filed in the proxy's heap (to skip duplicates).
    filed: float | None = None


def _same_place(contact: URI, target: URI) -> bool:
    """``target`` (a dialog's remote target) reaches the client that registered
    ``contact``: the same host and port. Not the user part: a UA's Contact in a
    200 need not repeat the one it registered (SIPp's has none)."""
    return ((contact.host or "").strip("[]").lower(), contact.port) == (
        (target.host or "").strip("[]").lower(), target.port
    )


def _route_entries(request: Request) -> list[str]:
    """The route set, one entry per element (a header line may hold several)."""
    out: list[str] = []
    for value in request.headers.getlist("Route"):
        out += [str(a) for a in Address.parse_many(value)]
    return out


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class CallProxy:
    """INVITE, ACK, BYE, CANCEL (and anything else inside a call) between
    users; a :class:`~sipdrill.sip.transport.TimerCore` for the calls'
    timers (:meth:`start` arms it)."""

    def __init__(
        self,
        ctx: SipContext,
        registrations: RegistrarSide,
        relay: ImRelay,
        signalling: Callable[[], CallSignalling],
        pools: Mapping[str, tuple[str, int]],
        *,
        config: ForkConfig | None = None,
        hosts: Mapping[str, str] | None = None,
    ) -> None:
        """``pools``: every pool's SIP over TLS address (this one included: this
        front end's), to name this pool in a Record-Route and to find the pool a
        Route names; ``hosts``: more addresses naming a pool (its other front
        ends), host -> pool."""
        self.ctx = ctx
        self.registrations = registrations
        self.relay = relay
        self._signalling = signalling
        self.pools = dict(pools)
        self._by_host = {host.lower(): pool for host, pool in (hosts or {}).items()}
        self._by_host.update({host.lower(): pool for pool, (host, _) in self.pools.items()})
        self._own_host = self.pools[ctx.fqdn][0].lower()
        self.config = config or ForkConfig(linger=64 * ctx.settings.sip_t1)
        # Our branches start with a tag of this pool: a request that comes back
        # with one of them in its Via has looped (RFC 3261 16.3 step 4).
        self._loop_tag = hashlib.blake2b(ctx.fqdn.encode(), digest_size=4).hexdigest()
        self.calls: dict[TransactionKey, _Call] = {}
        # Deadlines in a heap with lazy deletion: thousands of calls linger
        # 64*T1 after their answer, and the timer asks after every event.
        self._heap: list[tuple[float, int, TransactionKey]] = []
        self._seq = itertools.count()
        self._timer: Timer | None = None

    def start(self) -> None:
        self._timer = self.ctx.timer(self)

    @property
    def signalling(self) -> CallSignalling:
        return self._signalling()

    # -- what is ours --------------------------------------------------------------
    def is_me(self, uri: URI) -> bool:
        host = (uri.host or "").strip("[]").lower()
        return host in (self._own_host, self.ctx.fqdn)

    def routes_here(self, request: Request) -> bool:
        """The request's top Route names this pool: it is inside a call we
        record-routed."""
        try:
            routes = _route_entries(request)
            return bool(routes) and self.is_me(Address.parse(routes[0]).uri)
        except ValueError:
            return False

    def _pool_named(self, uri: URI) -> str | None:
        host = (uri.host or "").strip("[]").lower()
        if host in self.pools:
            return host
        return self._by_host.get(host)

    def _branch(self) -> str:
        return f"{MAGIC_COOKIE}{self._loop_tag}.{self.signalling.new_branch()[len(MAGIC_COOKIE):]}"

    def _looped(self, request: Request) -> bool:
        mark = f"{MAGIC_COOKIE}{self._loop_tag}."
        return any(
            (via.parameters.get("branch") or "").startswith(mark) for via in request.via
        )

    # -- checks every request we forward gets -----------------------------------------
    @staticmethod
    def _hops_left(request: Request) -> int:
        value = (request.headers.get("Max-Forwards") or "").strip()
        return int(value) if value.isdigit() else 70

    def _refuse(self, request: Request) -> Response | None:
        if self._hops_left(request) <= 0:
            return make_response(request, 483, "Too Many Hops")
        try:
            looped = self._looped(request)
        except (ValueError, IndexError):
            return make_response(request, 400, "Bad Request: unreadable Via")
        if looped:
            return make_response(request, 482, "Loop Detected")
        return None

    # -- a new call --------------------------------------------------------------------
    def invite(self, request: Request, flow: Flow) -> Response | Later:
        """An INVITE outside a dialog, to a user."""
        refusal = self._refuse(request)
        if refusal is not None:
            return refusal
        uri = request.uri
        if (uri.scheme or "").lower() not in ("sip", "sips"):
            return make_response(
                request, 416, f"Unsupported URI Scheme: {uri.scheme or '(none)'}: call a SIP URI"
            )
        if not uri.user:
            return make_response(
                request, 404, "Not Found: the Request-URI names no user (sip:user@domain)"
            )
        if (uri.host or "").lower() != self.ctx.domain:
            return make_response(request, 404, "Not Found: not a user of this lab")
        via_pool = from_pool(self.ctx, flow)
        _, refused = self.registrations.check_sender(request, flow, Feature.CALL)
        if refused is not None:
            return refused
        callee = aor_of(uri)
        local = [b for b in self.registrations.registered(callee) if self._reachable(b)]
        timeout = self.ctx.settings.forward_timeout
        groups: list[BranchGroup[Hop]]
        if local:
            hops: tuple[Hop, ...] = tuple(
                UserHop(b.source, b.contact.uri) for b in local if isinstance(b.source, Flow)
            )
            groups = [BranchGroup(hops, timeout)]
        elif via_pool is not None:
            return make_response(
                request, 480, "Temporarily Unavailable: not registered here"
            )
        else:
            home = self.ctx.home_of(callee)
            if home is None:
                return make_response(request, 404, "Not Found: no such user")
            groups = [BranchGroup((PoolHop(p),), timeout) for p in self.relay.candidates(home)]
        sender = aor_of(request.from_address.uri)
        mode = self.registrations.sender_mode(request, flow, sender)
        return self._begin(request, flow, groups, record_route=True, mode=mode)

    def _reachable(self, b: Binding) -> bool:
        return isinstance(b.source, Flow) and self.ctx.is_open(b.source)

    def _begin(
        self, request: Request, flow: Flow, groups: list[BranchGroup[Hop]], *,
        record_route: bool, mode: ServiceMode | None,
    ) -> Later:
        key = server_key(request)
        call = _Call(key, request, flow, ForkContext(request, groups, self.config),
                     record_route, mode)
        self.calls[key] = call
        now = self.ctx.now()
        self._feed(call, lambda: call.fork.start(now))
        return LATER

    def cancel(self, request: Request) -> Response:
        """CANCEL: hop by hop; 200 here, and the INVITE's branches are cancelled."""
        try:
            key = dataclasses.replace(server_key(request), method="INVITE")
        except SipError:
            return make_response(request, 400, "Bad Request: CANCEL without a usable Via")
        call = self.calls.get(key)
        if call is None or call.final_sent:
            return make_response(request, 481, "Call/Transaction Does Not Exist")
        now = self.ctx.now()
        self._feed(call, lambda: call.fork.cancel(now))
        return make_response(request, 200)

    # -- inside a call -----------------------------------------------------------------
    def pop_own_routes(self, request: Request) -> Request:
        """``request`` without the leading Routes that name this pool (RFC 3261
        16.4), a copy; unchanged when the route set cannot be read."""
        try:
            routes = _route_entries(request)
            while routes and self.is_me(Address.parse(routes[0]).uri):
                routes.pop(0)
        except ValueError:
            return request
        out = copy_request(request)
        if routes:
            out.headers.setlist("Route", routes)
        else:
            out.headers.remove("Route")
        return out

    def routed_inside(self, request: Request) -> bool:
        """``request`` (that named this pool in its Route; ours popped) goes on
        along its route set, or is inside a call to a client registered here:
        :meth:`in_dialog` takes it. Otherwise (baresip's INVITE to its
        outbound proxy) the pool handles it as if it had no Route."""
        if request.headers.getlist("Route"):
            return True
        try:
            tagged = "tag" in request.to_address.parameters
        except ValueError:
            return False
        return tagged and self._client_hop(request) is not None

    def in_dialog(
        self, request: Request, flow: Flow
    ) -> Response | Awaitable[Response] | Later | None:
        """A request inside a call (ACK, BYE, re-INVITE...; our Routes popped):
        to the pool its route set names next, or to the client at its end."""
        ack = request.method == "ACK"
        refusal = self._refuse(request)
        if refusal is not None:
            return None if ack else refusal
        try:
            routes = _route_entries(request)
            next_uri = Address.parse(routes[0]).uri if routes else None
        except ValueError:
            return None if ack else make_response(request, 400, "Bad Request: unreadable Route")
        hop: Hop | None
        if next_uri is not None:
            pool = self._pool_named(next_uri)
            hop = PoolHop(pool) if pool is not None else None
            why = f"no route to {next_uri.host}: not a pool of this lab"
        else:
            hop = self._client_hop(request)
            why = "the remote target is not registered here"
        if hop is None:
            return None if ack else make_response(request, 480, f"Temporarily Unavailable: {why}")
        if ack:
            self.ctx.spawn(self._send_ack(request, hop), name="relay ACK")
            return None
        if request.method == "INVITE":
            return self._begin(
                request, flow, [BranchGroup((hop,), self.ctx.settings.forward_timeout)],
                record_route=False, mode=None,
            )
        return self._relay(request, hop)

    def _client_hop(self, request: Request) -> UserHop | None:
        """The binding whose contact is the Request-URI: the To header names
        the other party of the dialog, whose client it is."""
        try:
            aor = aor_of(request.to_address.uri)
        except ValueError:
            return None
        target = request.uri
        where = ((target.host or "").strip("[]").lower(), target.port)
        for b in self.registrations.registered(aor):
            if not self._reachable(b):
                continue
            assert isinstance(b.source, Flow)
            if _same_place(b.contact.uri, target) or b.source.remote == where:
                return UserHop(b.source, target)
        return None

    async def _flow(self, hop: Hop) -> Flow:
        return hop.flow if isinstance(hop, UserHop) else await self.ctx.pool_flow(hop.pool)

    def _pool_headers(self, hop: Hop, mode: ServiceMode | None) -> list[tuple[str, str]]:
        if not isinstance(hop, PoolHop):
            return []
        # Who we are travels in our TLS certificate (sip_context.from_pool), not a header.
        headers: list[tuple[str, str]] = []
        if mode is not None:
            headers.append((SENDER_MODE_HEADER, mode.value))
        return headers

    async def _relay(self, request: Request, hop: Hop) -> Response:
        try:
            flow = await self._flow(hop)
            return await self.ctx.proxy(request, flow, headers=self._pool_headers(hop, None))
        except RequestFailed as exc:
            log.info("%s in a call to %s failed: %s", request.method, hop, exc)
            status = 408 if exc.reason == "timeout" else 480
            return make_response(request, status, f"the next hop did not answer: {exc}")

    async def _send_ack(self, ack: Request, hop: Hop) -> None:
        try:
            flow = await self._flow(hop)
        except RequestFailed as exc:
            log.info("ACK to %s dropped: %s", hop, exc)
            return
        ack.headers.set("Max-Forwards", str(self._hops_left(ack) - 1))
        ack.headers.setlist("Via", [self.signalling.via_for(flow, self._branch()),
                                    *ack.headers.getlist("Via")])
        for name, value in self._pool_headers(hop, None):
            ack.headers.set(name, value)
        if not self.signalling.send_stateless(flow, ack):
            log.info("ACK to %s dropped: the flow closed", hop)

    # -- driving a call's fork context ----------------------------------------------
    def _feed(self, call: _Call, step: Callable[[], list[ForkAction[Hop]]]) -> None:
        """Run ``step`` on the call's context and act on what it says; steps
        that arrive while one runs (a listener told at once) queue behind it."""
        call.inbox.append(step)
        if call.running:
            return
        call.running = True
        try:
            while call.inbox:
                for action in call.inbox.popleft()():
                    self._act(call, action)
        finally:
            call.running = False
        if call.fork.done:
            self.calls.pop(call.key, None)
            return
        deadline = call.fork.next_deadline()
        if deadline is not None and deadline != call.filed:
            call.filed = deadline
            heapq.heappush(self._heap, (deadline, next(self._seq), call.key))
            if self._timer is not None:
                self._timer.poke()

    def _act(self, call: _Call, action: ForkAction[Hop]) -> None:
        if isinstance(action, StartBranch):
            self._start_branch(call, action.branch, action.target)
        elif isinstance(action, Upstream):
            self._upstream(call, action)
        elif isinstance(action, CancelBranch):
            self._cancel_branch(call, action.branch, action.reason)
        elif isinstance(action, AbandonBranch):
            leg = call.legs.get(action.branch)
            if leg is not None and leg.key is not None:
                self.signalling.forget(leg.key)
        elif isinstance(action, LateSuccess):
            self.ctx.metrics.calls.labels("late-2xx").inc()
            log.info("a 2xx on branch %d of %s came after the final answer; dropped",
                     action.branch, call.request.call_id)

    def _start_branch(self, call: _Call, branch: int, hop: Hop) -> None:
        call.legs[branch] = _Leg()
        if isinstance(hop, UserHop):
            self._send_leg(call, branch, hop, hop.flow)
            return

        async def open_then_send() -> None:
            try:
                flow = await self.ctx.pool_flow(hop.pool)
            except RequestFailed as exc:
                why = f"Temporarily Unavailable: {hop.pool} unreachable ({exc})"
                self._fail_branch(call, branch, why)
                return
            if call.fork.branches[branch].final is None:  # not abandoned meanwhile
                self._send_leg(call, branch, hop, flow)

        self.ctx.spawn(open_then_send(), name=f"call to {hop.pool}")

    def _record_route(self, flow: Flow | None, hop: Hop) -> str:
        """This pool as the next hop (or the caller) reaches it."""
        if isinstance(hop, PoolHop) or flow is None:
            host, port = self.pools[self.ctx.fqdn]
            kind = "tls"
        else:
            (host, port), kind = flow.local, flow.kind.value
        return f"<sip:{_host_port(host, port)};transport={kind};lr>"

    def _send_leg(self, call: _Call, branch: int, hop: Hop, flow: Flow) -> None:
        leg = call.legs[branch]
        fwd = copy_request(call.request, hop.uri if isinstance(hop, UserHop) else None)
        h = fwd.headers
        h.set("Max-Forwards", str(self._hops_left(call.request) - 1))
        if call.record_route:
            leg.record_route = self._record_route(flow, hop)
            h.setlist("Record-Route", [leg.record_route, *h.getlist("Record-Route")])
        h.setlist("Via", [self.signalling.via_for(flow, self._branch()), *h.getlist("Via")])
        for name, value in self._pool_headers(hop, call.sender_mode):
            h.set(name, value)
        leg.request, leg.flow = fwd, flow

        def listener(what: Response | RequestFailed) -> None:
            self._feed(call, lambda: self._branch_result(call, branch, what))

        try:
            leg.key = self.signalling.start_request(fwd, flow, listener)
        except RequestFailed as exc:
            self._fail_branch(call, branch, f"Temporarily Unavailable: {exc}")

    def _fail_branch(self, call: _Call, branch: int, why: str) -> None:
        now = self.ctx.now()
        self._feed(call, lambda: call.fork.failed(branch, 480, why, now))

    def _branch_result(
        self, call: _Call, branch: int, what: Response | RequestFailed
    ) -> list[ForkAction[Hop]]:
        now = self.ctx.now()
        if isinstance(what, Response):
            return call.fork.response(branch, what, now)
        if what.reason == "timeout":
            return call.fork.failed(branch, 408, "Request Timeout: the callee did not answer", now)
        return call.fork.failed(branch, 480, f"Temporarily Unavailable: {what}", now)

    def _upstream(self, call: _Call, action: Upstream) -> None:
        response = action.response
        leg = call.legs.get(action.branch) if action.branch is not None else None
        if leg is not None and leg.record_route is not None:
            # RFC 3261 16.7 step 4: the caller reaches us where it sent the
            # INVITE, which may not be where the callee reaches us.
            if from_pool(self.ctx, call.upstream) is not None:
                mine = self._record_route(None, PoolHop(self.ctx.fqdn))
            else:
                mine = self._record_route(call.upstream, UserHop(call.upstream, call.request.uri))
            if mine != leg.record_route:
                rr = list(response.headers.getlist("Record-Route"))
                response.headers.setlist(
                    "Record-Route", [mine if v == leg.record_route else v for v in rr]
                )
        if response.code >= 200 and not call.final_sent:
            call.final_sent = True
            if call.record_route:  # a new call, not a re-INVITE
                result = ("answered" if response.code < 300
                          else "cancelled" if response.code == 487 else "failed")
                self.ctx.metrics.calls.labels(result).inc()
            # PoolSip counts the answers it returns; this one is ours to count.
            self.ctx.metrics.requests.labels("INVITE", f"{response.code // 100}xx").inc()
        self.signalling.respond(call.key, response)

    def _cancel_branch(self, call: _Call, branch: int, reason: str) -> None:
        leg = call.legs.get(branch)
        if leg is None or leg.request is None or leg.flow is None:
            return
        sent = leg.request
        cancel = Request(method="CANCEL", uri=sent.uri)
        h = cancel.headers
        h.set("Via", sent.headers.getlist("Via")[0])
        for name in ("Route",):
            routes = sent.headers.getlist(name)
            if routes:
                h.setlist(name, list(routes))
        h.set("Max-Forwards", "70")
        for name in ("From", "To", "Call-ID"):
            h.set(name, sent.headers.get(name) or "")
        h.set("CSeq", f"{sent.cseq.sequence} CANCEL")
        h.set("Reason", reason)
        try:
            self.signalling.start_request(cancel, leg.flow, lambda _what: None)
        except RequestFailed as exc:
            log.info("CANCEL of branch %d of %s not sent: %s", branch, call.request.call_id, exc)

    # -- timers (TimerCore) --------------------------------------------------------
    def next_deadline(self) -> float | None:
        while self._heap:
            deadline, _, key = self._heap[0]
            call = self.calls.get(key)
            if call is not None and call.filed == deadline:
                return deadline
            heapq.heappop(self._heap)  # stale: the call moved on or is over
        return None

    def handle_timer(self, now: float) -> object:
        while (deadline := self.next_deadline()) is not None and deadline <= now:
            _, _, key = heapq.heappop(self._heap)
            call = self.calls[key]
            call.filed = None
            self._feed(call, functools.partial(call.fork.handle_timer, now))
        return None

    def status(self) -> dict[str, int]:
        return {"in_progress": sum(1 for c in self.calls.values() if not c.final_sent),
                "tracked": len(self.calls)}
