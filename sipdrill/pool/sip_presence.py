"""The pool's presence hub: PUBLISH, SUBSCRIBE and NOTIFY for ``presence``
(PIDF bodies, :mod:`sipdrill.pool.presence`).

Watchers subscribe here; the state of a user this pool holds is its own view
(what they published, unknown in resiliency mode, offline when not
registered); any other user's comes from a back-end subscription to the pool
that holds them, kept fresh and dropped when nobody here watches any more.
A pool never relays a subscription it got from a pool (one hop).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable
from dataclasses import dataclass

from sipmessage import URI, Request, Response

from sipdrill.errors import SipError
from sipdrill.pool.policy import Feature, Serve, ServiceMode, check_feature
from sipdrill.pool.presence import (
    PIDF_CONTENT_TYPE,
    PRESENCE_EVENT,
    Availability,
    PresenceState,
    Subscription,
    SubscriptionTable,
    parse_pidf,
    render_pidf,
    subscription_expires,
)
from sipdrill.pool.sip_context import SipContext, event_of, from_pool, new_request, reach, refuse
from sipdrill.pool.sip_endpoint import RequestFailed
from sipdrill.pool.sip_registrar import RegistrarSide
from sipdrill.pool.sip_relay import ImRelay
from sipdrill.sip.message import make_response
from sipdrill.sip.registrar import aor_of
from sipdrill.sip.transport import Flow

log = logging.getLogger("sipdrill.pool")


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


class PresenceHub:
    """Subscriptions to users' presence (``subs``), the back-end ones this
    pool holds for its watchers (``backend``, ``remote_views``) and what
    users registered here published."""

    def __init__(self, ctx: SipContext, registrations: RegistrarSide, relay: ImRelay) -> None:
        self.ctx = ctx
        self.registrations = registrations
        self.relay = relay
        self.subs = SubscriptionTable()
        self._notify_pending: dict[tuple[str, str], tuple[Subscription, PresenceState]] = {}
        self._notify_running: set[tuple[str, str]] = set()
        self.backend: dict[str, BackendSub] = {}
        self.remote_views: dict[str, PresenceState] = {}
        self.published: dict[str, PresenceState] = {}

    def _contact(self) -> str:
        return f"<{self.ctx.pool_sip_uri(self.ctx.fqdn)}>"

    # -- what the registrar side and the housekeeping tell -----------------------------
    def signed_out(self, aor: str) -> None:
        self.published.pop(aor, None)
        self.changed(aor)

    def flow_closed(self, flow: Flow) -> None:
        for sub in self.subs:
            if sub.route == flow:
                self.subs.remove(sub.key)

    async def housekeeping(self, now: float) -> None:
        """Drop expired subscriptions and back-end ones nobody watches; refresh the rest."""
        self.subs.expire(now)
        watched = {s.presentity for s in self.subs if s.pool is None}
        for presentity in list(self.backend):
            if presentity not in watched:
                del self.backend[presentity]
                self.remote_views.pop(presentity, None)
            elif self.backend[presentity].refresh_at <= now:
                await self._backend_subscribe(presentity)

    # -- views -----------------------------------------------------------------------------
    def presence_of(self, aor: str) -> PresenceState | None:
        """This pool's own view of ``aor``: None when another pool holds it."""
        if self.registrations.registered(aor):
            if self.registrations.modes.get(aor) is ServiceMode.RESILIENCY:
                return PresenceState(aor, Availability.UNKNOWN)
            return self.published.get(aor) or PresenceState(aor, Availability.AVAILABLE)
        decision = self.ctx.decide(aor)
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

    def changed(self, aor: str) -> None:
        """``aor``'s state may differ: NOTIFY its watchers whatever did."""
        if not self.subs.watching(aor):
            return
        state = self.view_of(aor)
        for sub in self.subs.watching(aor):
            if sub.last_sent != state:
                self._queue_notify(sub, state)

    # -- SUBSCRIBE ---------------------------------------------------------------------
    def subscribe(self, request: Request, flow: Flow) -> Response | Awaitable[Response]:
        if event_of(request) != PRESENCE_EVENT:
            return make_response(request, 489, "Bad Event", [("Allow-Events", "presence")])
        presentity = aor_of(request.uri)
        pool = from_pool(self.ctx, flow)
        if pool is not None:
            return self._pool_subscribe(request, pool, presentity)
        sender, refused = self.registrations.check_sender(
            request, flow, Feature.PRESENCE_SUBSCRIBE
        )
        if refused is not None:
            return refused
        return self._client_subscribe(request, flow, sender, presentity)

    def _expires(self, request: Request) -> int:
        text = request.headers.get("Expires")
        try:
            return subscription_expires(int(text) if text is not None else None)
        except ValueError:
            raise SipError("Bad Expires", 400) from None

    async def _client_subscribe(
        self, request: Request, flow: Flow, watcher: str, presentity: str
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
        sub = existing or self._new(key, watcher, presentity, str(contact), route=flow)
        sub.expires_at = self.ctx.now() + expires
        sub.route = flow
        self.subs.put(sub)
        self._queue_notify(sub, self.view_of(presentity))
        return make_response(
            request, 200, headers=[("Expires", str(expires)), ("Contact", self._contact())],
            to_tag=sub.local_tag,
        )

    def _new(
        self, key: tuple[str, str], watcher: str, presentity: str, target: str,
        *, route: Flow | None = None, pool: str | None = None,
    ) -> Subscription:
        return Subscription(
            call_id=key[0], watcher_tag=key[1], watcher=watcher, presentity=presentity,
            local_tag=secrets.token_hex(6), remote_target=target, expires_at=0.0,
            route=route, pool=pool,
        )

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
        sub = existing or self._new(key, pool, presentity, f"sip:{pool}", pool=pool)
        sub.expires_at = self.ctx.now() + expires
        sub.last_sent = state
        self.subs.put(sub)
        # The state rides on the 200 (pool to pool only), so the watcher's
        # pool can answer its client without waiting for a NOTIFY.
        return make_response(
            request, 200,
            headers=[("Expires", str(expires)), ("Content-Type", PIDF_CONTENT_TYPE)],
            to_tag=sub.local_tag, body=render_pidf(state),
        )

    # -- back-end subscriptions (to the pool that holds a user) ------------------------
    async def _ensure_backend(self, presentity: str) -> None:
        sub = self.backend.get(presentity)
        if sub is not None and sub.pool is not None and sub.refresh_at > self.ctx.now():
            return
        await self._backend_subscribe(presentity)

    async def _backend_subscribe(self, presentity: str) -> None:
        sub = self.backend.get(presentity)
        if sub is None:
            sub = self.backend[presentity] = BackendSub(
                presentity, f"presence-{secrets.token_hex(8)}@{self.ctx.fqdn}",
                secrets.token_hex(4),
            )
        home = self.ctx.home_of(presentity)
        pools = self.relay.candidates(home) if home else []
        if sub.pool in pools:  # where it worked last time first
            pools.remove(sub.pool)
            pools.insert(0, sub.pool)
        refresh = self.ctx.settings.presence_refresh
        state: PresenceState | None = None
        asked_at = self.ctx.now()
        for pool in pools:
            try:
                flow = await self.ctx.pool_flow(pool)
                sub.cseq += 1
                req = new_request(
                    self.ctx, "SUBSCRIBE", URI.parse(presentity), flow,
                    from_=f"<sip:{self.ctx.fqdn}>;tag={sub.tag}", to=f"<{presentity}>",
                    call_id=sub.call_id, cseq=sub.cseq,
                    headers=[("Event", PRESENCE_EVENT), ("Expires", str(int(refresh * 3))),
                             ("Contact", self._contact())],
                )
                response = await self.ctx.send(req, flow)
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
            sub.refresh_at = self.ctx.now() + min(refresh, 5.0)
        else:
            sub.refresh_at = self.ctx.now() + refresh
            if sub.notified_at > asked_at:
                return  # a NOTIFY overtook this answer: it is newer
        self._set_remote_view(presentity, state)

    def _set_remote_view(self, presentity: str, state: PresenceState) -> None:
        previous = self.remote_views.get(presentity)
        self.remote_views[presentity] = state
        if previous != state:
            self.changed(presentity)

    def refresh(self) -> None:
        """Tell watchers whatever changed: after a partner or failover event
        this pool's own view of many users changes at once."""
        for presentity in self.subs.presentities():
            self.changed(presentity)

    def remote_pool_down(self, pool: str) -> None:
        """What ``pool`` told about its users is unknown now; ask again soon."""
        for sub in list(self.backend.values()):
            if sub.pool == pool:
                sub.pool = None
                sub.refresh_at = 0.0
                self._set_remote_view(
                    sub.presentity, PresenceState(sub.presentity, Availability.UNKNOWN)
                )

    # -- NOTIFY ------------------------------------------------------------------------
    def notify_in(self, request: Request, flow: Flow) -> Response:
        pool = from_pool(self.ctx, flow)
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
        sub.notified_at = self.ctx.now()
        self._set_remote_view(presentity, state)
        return make_response(request, 200)

    def _queue_notify(self, sub: Subscription, state: PresenceState) -> None:
        """NOTIFY ``state`` to ``sub``'s watcher. One sender per subscription,
        so NOTIFYs arrive in order, and a state superseded before it was sent
        is skipped; ``last_sent`` is what the watcher will end up with."""
        sub.last_sent = state
        self._notify_pending[sub.key] = (sub, state)
        if sub.key not in self._notify_running:
            self._notify_running.add(sub.key)
            self.ctx.spawn(self._notify_worker(sub.key), name="notify")

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
        remaining = max(0, int(sub.expires_at - self.ctx.now()))
        substate = "terminated;reason=timeout" if final else f"active;expires={remaining}"
        headers = [
            ("Event", PRESENCE_EVENT),
            ("Subscription-State", substate),
            ("Content-Type", PIDF_CONTENT_TYPE),
        ]
        try:
            flow = await reach(self.ctx, sub.pool, sub.route)
            if flow is None:
                self.subs.remove(sub.key)
                return
            req = new_request(
                self.ctx, "NOTIFY", URI.parse(sub.remote_target), flow,
                from_=f"<{sub.presentity}>;tag={sub.local_tag}",
                to=f"<{sub.remote_target if sub.pool else sub.watcher}>;tag={sub.watcher_tag}",
                call_id=sub.call_id, cseq=sub.next_cseq(), headers=headers,
                body=render_pidf(state),
            )
            response = await self.ctx.send(req, flow)
        except RequestFailed as exc:
            log.info("NOTIFY to %s failed: %s; subscription dropped", sub.watcher, exc)
            self.subs.remove(sub.key)
            return
        if response.code == 481 or response.code >= 500:
            self.subs.remove(sub.key)

    # -- PUBLISH -----------------------------------------------------------------------
    def publish(self, request: Request) -> Response:
        if event_of(request) != PRESENCE_EVENT:
            return make_response(request, 489, "Bad Event", [("Allow-Events", "presence")])
        aor = aor_of(request.uri)
        mode = self.registrations.modes.get(aor)
        if mode is None or aor != aor_of(request.from_address.uri):
            return make_response(request, 403, "Forbidden: publish your own presence, registered")
        refusal = check_feature(Feature.PRESENCE_PUBLISH, mode)
        if refusal is not None:
            return refuse(self.ctx, request, refusal)
        expires = self._expires(request)
        if expires == 0 or not request.body:
            self.published.pop(aor, None)
        else:
            try:
                state = parse_pidf(request.body)
            except ValueError as exc:
                return make_response(request, 400, f"Bad Request: {exc}")
            self.published[aor] = PresenceState(aor, state.availability, state.note)
        self.changed(aor)
        return make_response(
            request, 200,
            headers=[("SIP-ETag", secrets.token_hex(6)), ("Expires", str(expires))],
        )
