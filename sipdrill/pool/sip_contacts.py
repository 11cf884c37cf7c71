"""The pool's contact list over SIP: Lync's ``vnd-microsoft-roaming-contacts``
SUBSCRIBE as a fetch (one NOTIFY with the list), and SERVICE to add a contact
(body: the contact's URI, ``Content-Type: application/vnd.sipdrill.add-contact``).
Both need full service (:func:`~sipdrill.pool.policy.check_feature`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable

from sipmessage import URI, Request, Response

from sipdrill.errors import OperationError, SipError
from sipdrill.pool.policy import Feature
from sipdrill.pool.presence import CONTACTS_CONTENT_TYPE, CONTACTS_EVENT, render_contact_list
from sipdrill.pool.sip_context import SipContext, new_request
from sipdrill.pool.sip_endpoint import RequestFailed
from sipdrill.pool.sip_registrar import RegistrarSide
from sipdrill.sip.message import make_response
from sipdrill.sip.registrar import aor_of
from sipdrill.sip.transport import Flow

log = logging.getLogger("sipdrill.pool")

ADD_CONTACT_TYPE = "application/vnd.sipdrill.add-contact"


class ContactList:
    """``add_contact(owner, contact)`` stores a contact (the pool service's
    write, which answers its sequence number)."""

    def __init__(
        self,
        ctx: SipContext,
        registrations: RegistrarSide,
        add_contact: Callable[[str, str], Awaitable[int]],
    ) -> None:
        self.ctx = ctx
        self.registrations = registrations
        self._add_contact = add_contact

    async def fetch(self, request: Request, flow: Flow) -> Response:
        owner, refused = self.registrations.check_sender(
            request, flow, Feature.CONTACT_LIST_READ
        )
        if refused is not None:
            return refused
        contacts = await asyncio.to_thread(self.ctx.store.contacts, owner)
        tag = secrets.token_hex(6)
        try:
            target = request.contact[0].uri
        except (ValueError, IndexError):
            raise SipError("Bad Request: SUBSCRIBE needs a Contact", 400) from None
        watcher_tag = request.from_address.parameters.get("tag") or ""

        async def notify() -> None:
            req = new_request(
                self.ctx, "NOTIFY", target, flow, from_=f"<{owner}>;tag={tag}",
                to=f"<{owner}>;tag={watcher_tag}", call_id=request.call_id, cseq=1,
                headers=[("Event", CONTACTS_EVENT),
                         ("Subscription-State", "terminated;reason=timeout"),
                         ("Content-Type", CONTACTS_CONTENT_TYPE)],
                body=render_contact_list(owner, contacts),
            )
            try:
                await self.ctx.send(req, flow)
            except RequestFailed as exc:
                log.info("contact list NOTIFY to %s failed: %s", owner, exc)

        self.ctx.spawn(notify(), name="contacts notify")
        # A fetch (RFC 6665 4.4.3): one NOTIFY, then the subscription is over.
        return make_response(request, 200, headers=[("Expires", "0")], to_tag=tag)

    async def add(self, request: Request, flow: Flow) -> Response:
        ctype = (request.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if ctype != ADD_CONTACT_TYPE:
            return make_response(request, 415, "Unsupported Media Type",
                                 [("Accept", ADD_CONTACT_TYPE)])
        owner, refused = self.registrations.check_sender(request, flow, Feature.ADD_CONTACT)
        if refused is not None:
            return refused
        contact = request.body.decode("utf-8", "replace").strip()
        try:
            contact = aor_of(URI.parse(contact))
        except ValueError:
            return make_response(request, 400, "Bad Request: the body must be a SIP URI")
        try:
            seq = await self._add_contact(owner, contact)
        except OperationError as exc:
            status = 404 if exc.http_status == 404 else 403
            return make_response(request, status, f"{exc.code}: {exc.message}"[:200])
        return make_response(request, 200, headers=[("X-Sipdrill-Seq", str(seq))])
