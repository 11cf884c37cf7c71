"""A small SIP user agent for the pool's tests and benchmarks.

Not the lab's client (:mod:`sipdrill.clients` simulates Lync clients with
discovery, failover and backoff): this one does exactly what a test tells it
to, over one flow per user, and keeps what the pool sends it (MESSAGE,
NOTIFY, BYE) in an inbox. Many agents share one :class:`UaStack` (one
:class:`~sipdrill.pool.sip_endpoint.SipEndpoint`), so a benchmark can
run ten thousand of them in one process, each on its own TLS connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import ssl
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from sipmessage import URI, Address, Request, Response

from sipdrill.pool.sip_endpoint import RequestFailed, SipEndpoint
from sipdrill.sip.message import make_response
from sipdrill.sip.transaction import TimerConfig
from sipdrill.sip.transport import Flow, Kind, Received, TransportLimits

__all__ = ["RequestFailed", "UaStack", "UserAgent"]

NUDGE_EVENT = "x-sipdrill-reregister"


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

    def _handle(self, request: Request, rx: Received) -> Response | None:
        ua = self._by_conn.get(rx.flow.conn)
        if request.method == "ACK":
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

    async def invite(self, uri: str) -> tuple[Request, Response]:
        req = self.build(
            "INVITE", uri, headers=[("Contact", self.contact),
                                    ("Content-Type", "application/sdp")],
            body=b"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n",
        )
        return req, await self.send(req)

    async def ack_and_bye(self, invite: Request, ok: Response) -> Response:
        """ACK the 2xx, then leave with BYE (in the dialog)."""
        assert self.flow is not None
        to_tag = Address.parse(ok.headers.get("To") or "").parameters.get("tag")
        target = str(ok.contact[0].uri)
        cseq = invite.cseq.sequence
        from_tag = invite.from_address.parameters.get("tag")
        ack = self.build("ACK", target, to=str(invite.to_address.uri), to_tag=to_tag,
                         call_id=invite.call_id, cseq=cseq, from_tag=from_tag)
        self.stack.endpoint.send_stateless(self.flow, ack)
        bye = self.build("BYE", target, to=str(invite.to_address.uri), to_tag=to_tag,
                         call_id=invite.call_id, cseq=cseq + 1, from_tag=from_tag)
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

    def _incoming(self, request: Request) -> Response:
        self.inbox.put_nowait(request)
        event = (request.headers.get("Event") or "").split(";", 1)[0].strip().lower()
        if request.method == "NOTIFY" and event == NUDGE_EVENT and self.auto_nudge:
            self.stack.endpoint.spawn(self._answer_nudge(), name="answer nudge")
        return make_response(request, 200)

    async def _answer_nudge(self) -> None:
        with contextlib.suppress(RequestFailed):
            self.responses_to_nudge.append(await self.register())
