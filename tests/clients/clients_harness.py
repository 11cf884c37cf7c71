"""A synchronous world for the sans-IO endpoint: fake clock, DNS table, registrars.

Nothing here sleeps or opens a socket. :class:`World` plays the adapter: it
answers :class:`Resolve` from a table, "connects" by asking a per-address
behaviour, hands every sent request to a :class:`FakeRegistrar` (through
real bytes: serialize, then parse) and feeds the answer back; time moves
only in :meth:`World.advance`, which fires every deadline on the way.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from sipmessage import Request, Response

from sipdrill.clients.dnscache import DnsAnswer, DnsStatus
from sipdrill.clients.endpoint import (
    ClientProfile,
    Close,
    Connect,
    Endpoint,
    Output,
    Ping,
    Resolve,
    Schedule,
    Send,
    Target,
    UserSpec,
)
from sipdrill.clients.events import ClientEvent, Failure, Mode
from sipdrill.sip.message import make_response, parse_message, serialize
from sipdrill.sip.srv import SrvRecord

DOMAIN = "lab.local"
ALICE = UserSpec(
    uri="sip:alice@lab.local",
    home_pool="pool1.lab.local",
    contacts=("sip:bob@lab.local", "sip:carol@lab.local"),
    conferences=("sip:alice@lab.local;gruu;opaque=app:conf:focus:id:alice-weekly",),
)
POOL1 = ("10.0.1.11", 5061)
POOL2 = ("10.0.2.11", 5061)


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now


def a(name: str, *addresses: str, ttl: float = 300) -> DnsAnswer:
    return DnsAnswer(name, "A", DnsStatus.OK, ttl, addresses=addresses)


def srv(name: str, *records: tuple[int, int, int, str], ttl: float = 300) -> DnsAnswer:
    return DnsAnswer(name, "SRV", DnsStatus.OK, ttl, srv=tuple(SrvRecord(*r) for r in records))


def paired_pools_dns(ttl: float = 300) -> dict[tuple[str, str], DnsAnswer]:
    """Seed 003: pool1 at priority 0, the backup pool2 at priority 10 weight 10."""
    return {
        ("_sipinternaltls._tcp.lab.local", "SRV"): srv(
            "_sipinternaltls._tcp.lab.local",
            (0, 10, 5061, "pool1.lab.local."),
            (10, 10, 5061, "pool2.lab.local."),
            ttl=ttl,
        ),
        ("pool1.lab.local", "A"): a("pool1.lab.local", POOL1[0], ttl=ttl),
        ("pool2.lab.local", "A"): a("pool2.lab.local", POOL2[0], ttl=ttl),
    }


@dataclass
class FakeRegistrar:
    """Answers what it is sent; settings can change between steps."""

    name: str
    mode: str | None = "full"
    status: int = 200
    redirect: tuple[str, ...] = ()
    silent: bool = False
    pong: bool = True
    flow_timer: int | None = None
    granted: int | None = None
    #: The 200's Contact value: the request's Contact as ``{contact}``.
    contact_template: str = "{contact};expires={granted}"
    min_expires: int | None = None
    work_status: int = 200
    extra_headers: tuple[tuple[str, str], ...] = ()
    #: Headers of the answer to a call's INVITE (a callee's Contact, the pools' Record-Route).
    invite_headers: tuple[tuple[str, str], ...] = ()
    requests: list[Request] = field(default_factory=list)

    def handle(self, request: Request) -> Response | None:
        self.requests.append(request)
        if self.silent or request.method == "ACK":
            return None
        if request.method == "INVITE":
            return make_response(request, self.work_status, headers=self.invite_headers)
        if request.method != "REGISTER":
            return make_response(request, self.work_status)
        if self.redirect:
            response = make_response(request, 301)
            for contact in self.redirect:
                response.headers.add("Contact", contact)
            return response
        expires = int(request.headers.get("Expires") or "600")
        if self.min_expires is not None and 0 < expires < self.min_expires:
            return make_response(request, 423, headers=[("Min-Expires", str(self.min_expires))])
        if self.status != 200:
            return make_response(request, self.status)
        response = make_response(request, 200)
        contact = request.headers.get("Contact") or ""
        granted = self.granted if self.granted is not None else expires
        response.headers.add(
            "Contact", self.contact_template.format(contact=contact, granted=granted)
        )
        if self.mode is not None:
            response.headers.add("X-Sipdrill-Mode", self.mode)
        if self.flow_timer is not None:
            response.headers.add("Flow-Timer", str(self.flow_timer))
        for name, value in self.extra_headers:
            response.headers.add(name, value)
        return response

    @property
    def registers(self) -> list[Request]:
        return [r for r in self.requests if r.method == "REGISTER"]


#: What connecting to an address does: None (connected), or a Failure.
Reachability = Callable[[tuple[str, int]], Failure | None]


class World:
    def __init__(
        self,
        profile: ClientProfile | None = None,
        user: UserSpec = ALICE,
        *,
        dns: dict[tuple[str, str], DnsAnswer] | None = None,
        seed: int = 1,
        rng: random.Random | None = None,
        dns_turn: int | None = None,
    ) -> None:
        self.clock = FakeClock()
        self.profile = profile or ClientProfile(domain=DOMAIN)
        self.ep = Endpoint(
            user, self.profile, self.clock, rng or random.Random(seed), dns_turn=dns_turn
        )
        self.dns = dict(paired_pools_dns() if dns is None else dns)
        self.registrars: dict[tuple[str, int], FakeRegistrar] = {
            POOL1: FakeRegistrar("pool1"),
            POOL2: FakeRegistrar("pool2"),
        }
        #: Addresses whose connect fails, and how.
        self.down: dict[tuple[str, int], Failure] = {}
        self.resolved: list[tuple[str, str]] = []
        self.connects: list[Connect] = []
        self.events: list[ClientEvent] = []
        self.closed: list[int] = []
        self.pings = 0
        self.deadline: float | None = None
        self.open: dict[int, Target] = {}
        self.sent: list[tuple[int, Request | Response]] = []
        #: Hold the DNS answers instead of answering at once.
        self.hold_dns = False
        self.held: list[Resolve] = []

    # -- driving -----------------------------------------------------------------
    def feed(self, outputs: list[Output]) -> None:
        queue = list(outputs)
        while queue:
            out = queue.pop(0)
            if isinstance(out, ClientEvent):
                self.events.append(out)
            elif isinstance(out, Schedule):
                self.deadline = out.at
            elif isinstance(out, Resolve):
                self.resolved.append((out.qname, out.rtype))
                if self.hold_dns:
                    self.held.append(out)
                    continue
                queue += self.ep.dns_result(self.answer_for(out))
            elif isinstance(out, Connect):
                self.connects.append(out)
                assert out.target.address is not None
                where = (out.target.address, out.target.port)
                failure = self.down.get(where)
                if failure is not None:
                    queue += self.ep.connect_failed(out.conn, failure, "test")
                else:
                    self.open[out.conn] = out.target
                    queue += self.ep.connected(out.conn, ("10.0.0.100", 40000 + out.conn))
            elif isinstance(out, Send):
                queue += self._deliver(out)
            elif isinstance(out, Ping):
                self.pings += 1
                target = self.open.get(out.conn)
                reg = self.registrar_for(target)
                if reg is not None and reg.pong and not reg.silent:
                    queue += self.ep.pong(out.conn)
            elif isinstance(out, Close):
                self.closed.append(out.conn)
                self.open.pop(out.conn, None)

    def answer_for(self, query: Resolve) -> DnsAnswer:
        answer = self.dns.get((query.qname, query.rtype))
        if answer is None:
            return DnsAnswer(query.qname, query.rtype, DnsStatus.NXDOMAIN, 60)
        return answer

    def release_dns(self) -> None:
        held, self.held = self.held, []
        for query in held:
            self.feed(self.ep.dns_result(self.answer_for(query)))

    def registrar_for(self, target: Target | None) -> FakeRegistrar | None:
        if target is None or target.address is None:
            return None
        return self.registrars.get((target.address, target.port))

    def _deliver(self, out: Send) -> list[Output]:
        target = self.open.get(out.conn)
        message = parse_message(out.data)
        self.sent.append((out.conn, message))
        reg = self.registrar_for(target)
        if reg is None or not isinstance(message, Request):
            return []
        response = reg.handle(message)
        if response is None:
            return []
        return self.ep.receive(out.conn, parse_message(serialize(response)))

    def sign_in(self) -> None:
        self.feed(self.ep.sign_in())

    def advance(self, seconds: float) -> None:
        """Move the clock forward, firing every deadline on the way."""
        end = self.clock.now + seconds
        # A timer that never clears, or one that fires ever more often, must fail
        # the test with a message, not hang it (hypothesis then shrinks the input).
        stuck = fired = 0
        while self.deadline is not None and self.deadline <= end:
            before = self.clock.now
            self.clock.now = max(self.clock.now, self.deadline)
            stuck = stuck + 1 if self.clock.now == before else 0
            fired += 1
            if stuck > 1000 or fired > 100_000:
                raise AssertionError(
                    f"timer loop: {fired} timers in {self.clock.now - (end - seconds):.3f} s, "
                    f"the deadline at {self.deadline} (now {before}), mode {self.ep.mode}"
                )
            self.deadline = None
            self.feed(self.ep.handle_timer())
            if self.deadline is None:
                self.deadline = self.ep.next_deadline()
        self.clock.now = end

    def run_until(self, predicate: Callable[[], bool], limit: float, step: float = 0.5) -> float:
        """Advance until ``predicate()``; returns the seconds it took (fails past ``limit``)."""
        start = self.clock.now
        while not predicate():
            if self.clock.now - start > limit:
                raise AssertionError(f"not reached within {limit} s; mode {self.ep.mode}")
            self.advance(step)
        return self.clock.now - start

    def inject(self, message: Request | Response) -> None:
        """A message from the registrar on the current flow."""
        self.feed(self.ep.receive(self.ep.conn, parse_message(serialize(message))))

    def close_flow(self, failure: Failure = Failure.RESET) -> None:
        conn = self.ep.conn
        self.open.pop(conn, None)
        self.feed(self.ep.flow_closed(conn, failure, "test"))

    # -- looking -----------------------------------------------------------------
    def of(self, cls: type[ClientEvent]) -> list[ClientEvent]:
        return [e for e in self.events if isinstance(e, cls)]

    @property
    def mode(self) -> Mode:
        return self.ep.mode

    @property
    def pool(self) -> str | None:
        return self.ep.pool
