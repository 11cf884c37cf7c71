"""A small SIP user agent for the pool's tests and benchmarks.

Not the lab's client (:mod:`sipdrill.clients` simulates Lync clients with
discovery, failover and backoff): this one does exactly what a test tells it
to, over one flow per user, and keeps what the pool sends it (MESSAGE,
NOTIFY, INVITE, ACK, BYE, CANCEL) in an inbox. As a callee it answers an
INVITE with ``answer`` (200 with SDP by default), after ringing ``ring``
seconds (a CANCEL meanwhile gets the INVITE a 487); as a caller it follows
the Record-Route of the answer in its ACK and BYE. Many agents share one :class:`UaStack` (one
:class:`~sipdrill.pool.sip_endpoint.SipEndpoint`), so a benchmark can
run ten thousand of them in one process, each on its own TLS connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import secrets
import ssl
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from sipmessage import URI, Address, Request, Response

from sipdrill.pool.sip_endpoint import LATER, Later, RequestFailed, SipEndpoint
from sipdrill.sip.message import make_response
from sipdrill.sip.transaction import TimerConfig, TransactionKey, server_key
from sipdrill.sip.transport import Flow, Kind, Received, TransportLimits

__all__ = ["Dialog", "RequestFailed", "UaStack", "UserAgent", "route_set"]

NUDGE_EVENT = "x-sipdrill-reregister"


def sdp(host: str = "127.0.0.1") -> bytes:
    """An offer or answer with no media worth sending (the lab carries no RTP)."""
    return (
        f"v=0\r\no=- 0 0 IN IP4 {host}\r\ns=sipdrill\r\nc=IN IP4 {host}\r\nt=0 0\r\n"
        "m=audio 9 RTP/AVP 0\r\na=inactive\r\n"
    ).encode()


def route_set(response: Response) -> list[str]:
    """The caller's route set from a 2xx: its Record-Route, reversed (RFC 3261 12.1.2)."""
    entries: list[str] = []
    for value in response.headers.getlist("Record-Route"):
        entries += [str(a) for a in Address.parse_many(value)]
    return entries[::-1]


@dataclass
class Dialog:
    """A call this agent answered, as the callee sees it."""

    call_id: str
    local_tag: str
    remote_tag: str
    remote_uri: str
    remote_target: str
    #: The Record-Route of the INVITE, in order (the callee's route set).
    routes: list[str]
    cseq: int = 0


class UaStack:
    """The shared endpoint; ``async with UaStack(ssl_context) as stack``."""

    def __init__(
        self,
        client_ssl: ssl.SSLContext | None = None,
        *,
        max_connections: int = 60_000,
        t1: float = 0.5,
    ) -> None:
        self.client_ssl = client_ssl
        self._limits = TransportLimits(max_connections=max_connections)
        self._t1 = t1
        self._by_conn: dict[int, UserAgent] = {}
        self._endpoint: SipEndpoint | None = None

    @property
    def endpoint(self) -> SipEndpoint:
        assert self._endpoint is not None, "use `async with UaStack(...)`"
        return self._endpoint

    async def __aenter__(self) -> UaStack:
        self._endpoint = SipEndpoint(
            self._handle,
            limits=self._limits,
            timers=TimerConfig(t1=self._t1),
            server_name="sipdrill-ua",
            on_flow_closed=self._closed,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._endpoint is not None:
            await self._endpoint.close()

    def agent(self, aor: str, **kwargs: object) -> UserAgent:
        return UserAgent(self, aor, **kwargs)  # type: ignore[arg-type]

    def _handle(self, request: Request, rx: Received) -> Response | Later | None:
        ua = self._by_conn.get(rx.flow.conn)
        if request.method == "ACK":
            if ua is not None:
                ua.inbox.put_nowait(request)
            return None
        if ua is None:
            return make_response(request, 481)
        return ua._incoming(request)

    def _closed(self, flow: Flow) -> None:
        ua = self._by_conn.pop(flow.conn, None)
        if ua is not None and ua.flow == flow:
            ua.closed.set()


@dataclass
class UserAgent:
    stack: UaStack
    aor: str
    #: Answer the pool's re-register nudge with a REGISTER refresh, as the
    #: lab's clients do.
    auto_nudge: bool = False
    flow: Flow | None = None
    server_name: str | None = None
    inbox: asyncio.Queue[Request] = field(default_factory=asyncio.Queue)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    responses_to_nudge: list[Response] = field(default_factory=list)
    register_call_id: str = field(default_factory=lambda: f"{secrets.token_hex(8)}@ua")
    instance: str = field(default_factory=lambda: str(uuid.uuid4()))
    #: How this agent answers an INVITE (2xx: with SDP), after ringing ``ring`` s.
    answer: int = 200
    ring: float = 0.0
    #: Calls answered, by Call-ID (a BYE ends one).
    dialogs: dict[str, Dialog] = field(default_factory=dict)
    _ringing: dict[TransactionKey, tuple[asyncio.Task[None], Request, str]] = field(
        default_factory=dict
    )
    _cseq: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _tag: str = field(default_factory=lambda: secrets.token_hex(4))

    @property
    def user(self) -> str:
        return self.aor.split(":", 1)[1].split("@", 1)[0]

    @property
    def domain(self) -> str:
        return self.aor.split("@", 1)[1]

    async def connect(
        self, host: str, port: int, server_name: str, *, kind: Kind = Kind.TLS
    ) -> Flow:
        """A new flow of this agent's own to a pool (not shared with others)."""
        endpoint = self.stack.endpoint
        self.flow = await endpoint.open_flow(
            kind, host, port,
            ssl_context=self.stack.client_ssl if kind is Kind.TLS else None,
            server_hostname=server_name, reuse=False,
        )
        self.server_name = server_name
        self.closed.clear()
        self.stack._by_conn[self.flow.conn] = self
        return self.flow

    def disconnect(self) -> None:
        if self.flow is not None:
            self.stack.endpoint.transport.close_flow(self.flow)

    @property
    def contact(self) -> str:
        assert self.flow is not None
        host, port = self.flow.local
        return (
            f"<sip:{self.user}@{host}:{port};transport={self.flow.kind.value};ob>"
            f';+sip.instance="<urn:uuid:{self.instance}>";reg-id=1'
        )

    def build(
        self,
        method: str,
        uri: str,
        *,
        to: str | None = None,
        to_tag: str | None = None,
        call_id: str | None = None,
        cseq: int | None = None,
        from_tag: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> Request:
        assert self.flow is not None, "connect() first"
        endpoint = self.stack.endpoint
        req = Request(method=method, uri=URI.parse(uri), body=body)
        h = req.headers
        h.set("Via", endpoint.via_for(self.flow, endpoint.new_branch()))
        h.set("Max-Forwards", "70")
        h.set("From", f"<{self.aor}>;tag={from_tag or self._tag}")
        to_value = f"<{to or uri}>"
        h.set("To", to_value + (f";tag={to_tag}" if to_tag else ""))
        h.set("Call-ID", call_id or f"{secrets.token_hex(8)}@ua")
        h.set("CSeq", f"{cseq if cseq is not None else next(self._cseq)} {method}")
        for name, value in headers:
            h.add(name, value)
        return req

    async def send(self, request: Request, *, give_up_after: float = 10.0) -> Response:
        assert self.flow is not None, "connect() first"
        return await self.stack.endpoint.request(request, self.flow, give_up_after=give_up_after)

    async def register(self, expires: int = 600) -> Response:
        req = self.build(
            "REGISTER", f"sip:{self.domain}", to=self.aor, call_id=self.register_call_id,
            headers=[("Contact", self.contact), ("Expires", str(expires)),
                     ("Supported", "outbound, path")],
        )
        return await self.send(req)

    async def message(self, to: str, text: str) -> Response:
        req = self.build(
            "MESSAGE", to, headers=[("Content-Type", "text/plain")], body=text.encode()
        )
        return await self.send(req)

    async def subscribe(
        self, to: str, event: str = "presence", expires: int = 600, call_id: str | None = None
    ) -> Response:
        req = self.build(
            "SUBSCRIBE", to, call_id=call_id,
            headers=[("Event", event), ("Expires", str(expires)), ("Contact", self.contact),
                     ("Accept", "application/pidf+xml")],
        )
        return await self.send(req)

    async def add_contact(self, contact: str) -> Response:
        req = self.build(
            "SERVICE", self.aor,
            headers=[("Content-Type", "application/vnd.sipdrill.add-contact")],
            body=contact.encode(),
        )
        return await self.send(req)

    async def invite(
        self, uri: str, *, headers: Iterable[tuple[str, str]] = (), give_up_after: float = 10.0
    ) -> tuple[Request, Response]:
        req = self.invite_request(uri, headers=headers)
        return req, await self.send(req, give_up_after=give_up_after)

    def invite_request(self, uri: str, *, headers: Iterable[tuple[str, str]] = ()) -> Request:
        return self.build(
            "INVITE", uri, headers=[("Contact", self.contact),
                                    ("Content-Type", "application/sdp"), *headers],
            body=sdp(),
        )

    def in_dialog(self, method: str, invite: Request, ok: Response, cseq: int) -> Request:
        """A request of the caller's dialog: to the callee's Contact, along the route set."""
        to_tag = Address.parse(ok.headers.get("To") or "").parameters.get("tag")
        routes = route_set(ok)
        return self.build(
            method, str(ok.contact[0].uri), to=str(invite.to_address.uri), to_tag=to_tag,
            call_id=invite.call_id, cseq=cseq,
            from_tag=invite.from_address.parameters.get("tag"),
            headers=[("Route", ", ".join(routes))] if routes else (),
        )

    def ack(self, invite: Request, ok: Response) -> None:
        """ACK a 2xx (its own transaction: sent as is)."""
        assert self.flow is not None
        self.stack.endpoint.send_stateless(
            self.flow, self.in_dialog("ACK", invite, ok, invite.cseq.sequence)
        )

    async def ack_and_bye(self, invite: Request, ok: Response) -> Response:
        """ACK the 2xx, then leave with BYE (in the dialog)."""
        self.ack(invite, ok)
        return await self.send(self.in_dialog("BYE", invite, ok, invite.cseq.sequence + 1))

    async def cancel(self, invite: Request) -> Response:
        """CANCEL ``invite`` (same Via branch, RFC 3261 9.1)."""
        cancel = Request(method="CANCEL", uri=invite.uri)
        h = cancel.headers
        h.set("Via", invite.headers.getlist("Via")[0])
        h.set("Max-Forwards", "70")
        for name in ("From", "To", "Call-ID"):
            h.set(name, invite.headers.get(name) or "")
        h.set("CSeq", f"{invite.cseq.sequence} CANCEL")
        return await self.send(cancel)

    async def hang_up(self, call_id: str) -> Response:
        """End a call this agent answered: BYE from the callee's side."""
        d = self.dialogs.pop(call_id)
        d.cseq += 1
        bye = self.build(
            "BYE", d.remote_target, to=d.remote_uri, to_tag=d.remote_tag, call_id=d.call_id,
            cseq=d.cseq, from_tag=d.local_tag,
            headers=[("Route", ", ".join(d.routes))] if d.routes else (),
        )
        return await self.send(bye)

    async def next_request(
        self, method: str, within: float = 5.0, *, event: str | None = None
    ) -> Request:
        """The next request of ``method`` (and ``event``) the pool sent us;
        others before it are dropped."""
        async with asyncio.timeout(within):
            while True:
                request = await self.inbox.get()
                if request.method != method:
                    continue
                got = (request.headers.get("Event") or "").split(";", 1)[0].strip().lower()
                if event is None or got == event:
                    return request

    def _incoming(self, request: Request) -> Response | Later:
        self.inbox.put_nowait(request)
        event = (request.headers.get("Event") or "").split(";", 1)[0].strip().lower()
        if request.method == "NOTIFY" and event == NUDGE_EVENT and self.auto_nudge:
            self.stack.endpoint.spawn(self._answer_nudge(), name="answer nudge")
        if request.method == "INVITE" and "tag" not in request.to_address.parameters:
            return self._invited(request)
        if request.method == "CANCEL":
            return self._cancelled(request)
        if request.method == "BYE":
            self.dialogs.pop(request.call_id, None)
        if request.method == "INVITE":  # a re-INVITE: the same (no) media
            return make_response(request, 200, headers=[("Contact", self.contact),
                                 ("Content-Type", "application/sdp")], body=sdp())
        return make_response(request, 200)

    def _invited(self, request: Request) -> Response | Later:
        tag = secrets.token_hex(4)
        if self.ring <= 0:
            return self._answer_invite(request, tag)
        key = server_key(request)
        endpoint = self.stack.endpoint
        endpoint.respond(key, make_response(request, 180, to_tag=tag))

        async def answer_later() -> None:
            await asyncio.sleep(self.ring)
            self._ringing.pop(key, None)
            endpoint.respond(key, self._answer_invite(request, tag))

        self._ringing[key] = (endpoint.spawn(answer_later(), name="ring"), request, tag)
        return LATER

    def _answer_invite(self, request: Request, tag: str) -> Response:
        if not 200 <= self.answer < 300:
            return make_response(request, self.answer, to_tag=tag)
        routes = list(request.headers.getlist("Record-Route"))
        self.dialogs[request.call_id] = Dialog(
            request.call_id, tag, request.from_address.parameters.get("tag") or "",
            str(request.from_address.uri), str(request.contact[0].uri),
            [str(a) for v in routes for a in Address.parse_many(v)],
        )
        headers = [("Contact", self.contact), ("Content-Type", "application/sdp")]
        headers += [("Record-Route", v) for v in routes]
        return make_response(request, self.answer, headers=headers, to_tag=tag, body=sdp())

    def _cancelled(self, request: Request) -> Response:
        key = dataclasses.replace(server_key(request), method="INVITE")
        ringing = self._ringing.pop(key, None)
        if ringing is None:
            return make_response(request, 481)
        task, invite, tag = ringing
        task.cancel()
        self.stack.endpoint.respond(key, make_response(invite, 487, to_tag=tag))
        return make_response(request, 200)

    async def _answer_nudge(self) -> None:
        with contextlib.suppress(RequestFailed):
            self.responses_to_nudge.append(await self.register())
