"""The pool's conference focus: INVITE to a conference URI joins it, BYE
leaves (:mod:`sipdrill.pool.conference` has the URIs and the table).

A conference lives on its organiser's serving pool, with full service: a
join elsewhere is relayed there, and a conference ends (BYE to every
participant) when that changes. In resiliency mode the organiser's
scheduled conferences are over (480) and ad-hoc ones cannot start (488).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable

from sipmessage import URI, Request, Response

from sipdrill.pool.conference import (
    ConferenceRef,
    ConferenceTable,
    Participant,
    parse_conference_uri,
)
from sipdrill.pool.policy import (
    CONFERENCE_POOL_DOWN,
    Feature,
    Serve,
    ServiceMode,
    check_feature,
)
from sipdrill.pool.sip_context import ALLOW, SipContext, from_pool, new_request, reach, refuse
from sipdrill.pool.sip_endpoint import RequestFailed
from sipdrill.pool.sip_registrar import RegistrarSide
from sipdrill.pool.sip_relay import ImRelay
from sipdrill.sip.message import make_response
from sipdrill.sip.registrar import aor_of
from sipdrill.sip.transport import Flow

log = logging.getLogger("sipdrill.pool")


class ConferenceFocus:
    def __init__(self, ctx: SipContext, registrations: RegistrarSide, relay: ImRelay) -> None:
        self.ctx = ctx
        self.registrations = registrations
        self.relay = relay
        self.conferences = ConferenceTable()

    def invite(self, request: Request, flow: Flow) -> Response | Awaitable[Response]:
        ref = parse_conference_uri(request.uri)
        if ref is None:
            return make_response(
                request, 488, "Not Acceptable Here: this lab's pools host conferences only"
            )
        return self._join(request, flow, ref)

    async def _join(self, request: Request, flow: Flow, ref: ConferenceRef) -> Response:
        sender = aor_of(request.from_address.uri)
        mode = self.registrations.sender_mode(request, flow, sender)
        via_pool = from_pool(self.ctx, flow)
        decision = self.ctx.decide(ref.organiser)
        if via_pool is not None or (
            isinstance(decision, Serve) and self.ctx.fqdn == self._serving(ref.organiser)
        ):
            return await self._host(request, flow, ref, sender, mode, via_pool)
        if sender == ref.organiser and mode is ServiceMode.RESILIENCY:
            # The organiser's own conferences live on their home pool, which
            # is down: scheduled ones have ended, new ones cannot start.
            scheduled = await self._scheduled(ref)
            if scheduled:
                return refuse(self.ctx, request, CONFERENCE_POOL_DOWN)
            refusal = check_feature(Feature.ADHOC_CONFERENCE, mode)
            assert refusal is not None
            return refuse(self.ctx, request, refusal)
        home = self.ctx.home_of(ref.organiser)
        if home is None:
            return make_response(request, 404, "Not Found: no such organiser")
        response = await self.relay.forward(request, self.relay.candidates(home), mode)
        if response is None:
            return refuse(self.ctx, request, CONFERENCE_POOL_DOWN)
        return response

    def _serving(self, aor: str) -> str | None:
        home = self.ctx.home_of(aor)
        return self.ctx.serving_pool(home) if home else None

    async def _scheduled(self, ref: ConferenceRef) -> bool:
        confs = await asyncio.to_thread(self.ctx.store.conferences, ref.organiser)
        return any(c.conf_id == ref.conf_id for c in confs)

    async def _host(
        self,
        request: Request,
        flow: Flow,
        ref: ConferenceRef,
        sender: str,
        mode: ServiceMode | None,
        via_pool: str | None,
    ) -> Response:
        decision = self.ctx.decide(ref.organiser)
        if not isinstance(decision, Serve):
            return make_response(request, 404, "Not Found: the conference is not hosted here")
        if decision.mode is ServiceMode.RESILIENCY:
            return refuse(self.ctx, request, CONFERENCE_POOL_DOWN)
        active = self.conferences.active.get(ref)
        adhoc = active.adhoc if active is not None else False
        if active is None and not await self._scheduled(ref):
            if sender != ref.organiser:
                return make_response(request, 404, "Not Found: no such conference")
            refusal = check_feature(Feature.ADHOC_CONFERENCE, mode or ServiceMode.FULL)
            if refusal is not None:
                return refuse(self.ctx, request, refusal)
            adhoc = True
        refusal = check_feature(Feature.JOIN_CONFERENCE, mode or ServiceMode.FULL)
        if refusal is not None:
            return refuse(self.ctx, request, refusal)
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
            joined_at=self.ctx.now(),
            route=flow if via_pool is None else None,
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

    async def bye(self, request: Request, flow: Flow) -> Response:
        ref = parse_conference_uri(request.uri)
        via_pool = from_pool(self.ctx, flow)
        if ref is None:
            if via_pool is not None:
                # A hosting pool ending a conference: relay to the participant.
                target = self.relay.target_aor(request, flow)
                response = await self.relay.deliver_local(request, target)
                return response or make_response(request, 481)
            return make_response(request, 481)
        conf = self.conferences.active.get(ref)
        if conf is not None and request.call_id in conf.participants:
            self.conferences.leave(ref, request.call_id)
            return make_response(request, 200)
        if via_pool is not None:
            return make_response(request, 481)
        home = self.ctx.home_of(ref.organiser)
        if home is None:
            return make_response(request, 481)
        sender = aor_of(request.from_address.uri)
        response = await self.relay.forward(
            request, self.relay.candidates(home),
            self.registrations.sender_mode(request, flow, sender),
        )
        return response or make_response(request, 481)

    def end_orphaned(self) -> None:
        """A conference lives on its organiser's serving pool, with full
        service: one whose organiser this pool no longer serves that way
        (failover, or the organiser now in resiliency mode) ends."""
        for ref in list(self.conferences.active):
            decision = self.ctx.decide(ref.organiser)
            if isinstance(decision, Serve) and decision.mode is ServiceMode.FULL:
                continue
            self.end_conference(ref, "the organiser's pool changed")

    def end_conference(self, ref: ConferenceRef, why: str) -> int:
        participants = self.conferences.end(ref)
        log.info("conference %s ended (%s): BYE to %d participants", ref.uri, why,
                 len(participants))
        for p in participants:
            self.ctx.spawn(self._bye_participant(ref, p, why), name="conference bye")
        return len(participants)

    async def _bye_participant(self, ref: ConferenceRef, p: Participant, why: str) -> None:
        try:
            flow = await reach(self.ctx, p.via_pool, p.route)
            if flow is None:
                return
            req = new_request(
                self.ctx, "BYE", URI.parse(p.remote_target), flow,
                from_=f"<{ref.uri}>;tag={p.local_tag}", to=f"<{p.aor}>;tag={p.remote_tag}",
                call_id=p.call_id, cseq=p.next_cseq(),
                headers=[("Reason", f'SIP;cause=480;text="{why}"')],
            )
            await self.ctx.send(req, flow)
        except RequestFailed as exc:
            log.info("BYE to %s failed: %s", p.aor, exc)
