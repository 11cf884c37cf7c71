"""The pool's IM relay: MESSAGE (and any request for a user) to the user's
clients registered here, else to the pool that serves them.

Between pools: a relayed request goes on this pool's mutual-TLS connection
to the other pool (its certificate says which pool relayed it,
:func:`~.sip_context.from_pool`) with the sender's mode
(``X-Sipdrill-Sender-Mode``); a pool never relays a request it got from a
pool (one hop, so no loops).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable

from sipmessage import Request, Response

from sipdrill.pool.policy import ServiceMode
from sipdrill.pool.sip_context import SENDER_MODE_HEADER, SipContext, from_pool
from sipdrill.pool.sip_endpoint import RequestFailed
from sipdrill.pool.sip_registrar import RegistrarSide
from sipdrill.sip.message import make_response
from sipdrill.sip.registrar import aor_of
from sipdrill.sip.transport import Flow

log = logging.getLogger("sipdrill.pool")


class ImRelay:
    """Routes requests for users: to their flows here, or to their pools."""

    def __init__(self, ctx: SipContext, registrations: RegistrarSide) -> None:
        self.ctx = ctx
        self.registrations = registrations

    def message(self, request: Request, flow: Flow) -> Awaitable[Response] | Response:
        if request.uri.host.lower() != self.ctx.domain:
            return make_response(request, 404, "Not Found: not a user of this lab")
        # Peer-to-peer IM works in every mode (docs/reference.md).
        return self.route_to_user(request, flow, self.target_aor(request, flow))

    def target_aor(self, request: Request, flow: Flow) -> str:
        # A request a pool relays inside a dialog (a BYE ending a conference)
        # names the client's contact, not the AoR: the To header has it.
        to = request.to_address
        if from_pool(self.ctx, flow) is not None and "tag" in to.parameters:
            return aor_of(to.uri)
        return aor_of(request.uri)

    async def route_to_user(self, request: Request, flow: Flow, target: str) -> Response:
        response = await self.deliver_local(request, target)
        if response is not None:
            return response
        if from_pool(self.ctx, flow) is not None:
            return make_response(request, 480, "Temporarily Unavailable: not registered here")
        home = self.ctx.home_of(target)
        if home is None:
            return make_response(request, 404, "Not Found: no such user")
        sender = aor_of(request.from_address.uri)
        forwarded = await self.forward(
            request, self.candidates(home), self.registrations.sender_mode(request, flow, sender)
        )
        return forwarded or make_response(request, 480, "Temporarily Unavailable")

    async def deliver_local(self, request: Request, aor: str) -> Response | None:
        """Relay ``request`` to ``aor``'s client(s) registered here: the
        binding whose contact is the Request-URI first (an in-dialog
        request), then the others, best q first. None if none took it."""
        bindings = self.registrations.registered(aor)
        if not bindings:
            return None
        target = str(request.uri)
        bindings.sort(key=lambda b: str(b.contact.uri) != target)
        for b in bindings:
            flow = b.source
            if not isinstance(flow, Flow) or not self.ctx.is_open(flow):
                continue
            try:
                return await self.ctx.proxy(request, flow, uri=b.contact.uri)
            except RequestFailed as exc:
                log.info("%s to %s on %s failed: %s", request.method, aor, flow.remote, exc)
        return None

    def candidates(self, home: str) -> list[str]:
        """Where a user homed on ``home`` may be: the pool that serves them,
        their home, the home's backup (resiliency mode); this pool excluded."""
        out: list[str] = []
        for pool in (self.ctx.serving_pool(home), home, self.ctx.backup_of(home)):
            if pool and pool not in out and pool != self.ctx.fqdn:
                out.append(pool)
        return out

    async def forward(
        self, request: Request, pools: list[str], sender_mode: ServiceMode | None
    ) -> Response | None:
        """Relay to the first of ``pools`` that takes it (RFC 3263-style: a
        transport failure, a timeout, 503, 480 or 404 moves on to the next;
        a 301 adds the pool it names, once). None when no pool answered."""
        headers = []
        if sender_mode is not None:
            headers.append((SENDER_MODE_HEADER, sender_mode.value))
        todo = list(pools)
        seen = set(todo)
        last: Response | None = None
        metrics = self.ctx.metrics.forwarded
        while todo:
            pool = todo.pop(0)
            try:
                flow = await self.ctx.pool_flow(pool)
                response = await self.ctx.proxy(request, flow, headers=headers)
            except RequestFailed as exc:
                metrics.labels("failed").inc()
                log.info("%s to %s via %s failed: %s", request.method, request.uri, pool, exc)
                continue
            metrics.labels("ok").inc()
            if response.code == 301:
                for target in self._redirect_pools(response):
                    if target not in seen and target != self.ctx.fqdn:
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
            if self.ctx.is_pool(host):
                pools.append(host)
        return pools
