"""One simulated Lync 2013 client, sans-IO (in the style of h11 and aioquic).

The endpoint never opens a socket, reads a clock of its own or draws from a
global RNG. Its inputs are method calls (:meth:`Endpoint.sign_in`,
:meth:`~Endpoint.dns_result`, :meth:`~Endpoint.connected`,
:meth:`~Endpoint.receive`, :meth:`~Endpoint.pong`,
:meth:`~Endpoint.flow_closed`, :meth:`~Endpoint.handle_timer`, ...); each
returns a list of *outputs*: actions for the adapter (:class:`Resolve`,
:class:`Connect`, :class:`Send`, :class:`Ping`, :class:`Close`,
:class:`Schedule`) and :class:`~sipdrill.clients.events.ClientEvent` records.

What it does, and where the rules come from (docs/reference.md):

* **Discovery** walks the Lync 2013 lookup order (lyncdiscoverinternal,
  lyncdiscover, _sipinternaltls._tcp, [_sipinternal._tcp], _sip._tls,
  sipinternal, sip, sipexternal), asking only on a cache miss (TTLs are
  honoured, see :mod:`.dnscache`). The two lyncdiscover names point at the
  Autodiscover web service, which the lab does not run: they are looked up
  (the DNS traffic is real) but give no SIP target. SRV answers are ordered
  with :func:`sipdrill.sip.srv.order_srv` and the injected RNG; a lone "."
  target means no service; a target outside the SIP domain is refused.
* **Targets** are tried one by one, each on a new flow with a new
  transaction (new Via branch), RFC 3263 4.3: a 503, a transport error
  (reset, refused, TLS) or a transaction timeout moves on to the next.
  A 301/302 puts its Contacts first, highest q first. A target already
  tried in this attempt is skipped, so a backup registrar that answers
  301 "home pool 0.7, me 0.3" while the home pool is down ends the attempt.
* **Every target failed**: wait the RFC 5626 4.5 backoff
  (:class:`sipdrill.sip.keepalive.Backoff`, base 30 s, max 1800 s), then
  start over.
* **Registered**: full service, or resiliency mode when the 2xx carries
  ``X-Sipdrill-Mode: resiliency``. The same Call-ID is used per registrar
  with increasing CSeq; the binding is refreshed before it expires. CRLF
  keep-alives run on the flow (:class:`sipdrill.sip.keepalive.KeepAlive`).
  A missing pong, a closed flow, a 503 or a timeout on a refresh, a 301 on a
  refresh, or a NOTIFY nudge sends the client back through sign-in; a
  refresh answered in another mode switches mode in place.
* **Calls** (the ``call`` workload, :mod:`.calls`): a ``call_fraction`` of
  the users place a call every ``call_interval`` seconds (jittered) to a
  random user of ``call_targets``: INVITE with SDP, ACK of the 2xx along
  its Record-Route, hold ``call_hold`` seconds, BYE; events
  :class:`~.events.CallPlaced`, :class:`~.events.CallAnswered`,
  :class:`~.events.CallFailed`, :class:`~.events.CallEnded`. Every endpoint
  answers an INVITE with 200 and SDP.

Modes move only along :data:`TRANSITIONS`; a move that is not in the table
raises :class:`IllegalTransition` and changes nothing.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import random
import re
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, cast

from sipmessage import URI, Address, Request, Response

from sipdrill.clients.calls import Call, CallInput, CallState, answer_invite, is_caller, offer
from sipdrill.clients.dnscache import DnsAnswer, DnsStatus, TtlCache, normalise_name
from sipdrill.clients.events import (
    CallAnswered,
    CallEnded,
    CallFailed,
    CallPlaced,
    ClientEvent,
    DnsLookup,
    Failure,
    Mode,
    ModeChanged,
    Nudged,
    Redirected,
    Registered,
    RetryScheduled,
    TargetFailed,
    WorkloadResult,
)
from sipdrill.errors import SipdrillError
from sipdrill.sip import grammar
from sipdrill.sip.keepalive import Backoff, FlowFailed, KeepAlive, KeepAliveConfig, SendPing
from sipdrill.sip.message import IndexedHeaders, ParsedRequest, make_response, serialize
from sipdrill.sip.srv import order_srv
from sipdrill.sip.transaction import (
    DeliverRequest,
    DeliverResponse,
    TimerConfig,
    TransactionError,
    TransactionEvent,
    TransactionKey,
    TransactionManager,
    TransactionTerminated,
    TransactionTimeout,
)
from sipdrill.sip.transaction import (
    Send as TxSend,
)
from sipdrill.sip.transaction import (
    TransportError as TxTransportError,
)
from sipdrill.sip.transport import Kind

__all__ = [
    "DEFAULT_MODE_HEADER",
    "TRANSITIONS",
    "Action",
    "ClientProfile",
    "Clock",
    "Close",
    "Connect",
    "Endpoint",
    "IllegalTransition",
    "LookupName",
    "Output",
    "Ping",
    "Resolve",
    "Schedule",
    "Send",
    "SystemClock",
    "Target",
    "Trigger",
    "UserSpec",
    "WorkloadKind",
    "lync_lookup_order",
]

DEFAULT_MODE_HEADER: Final = "X-Sipdrill-Mode"
Addr = tuple[str, int]


# --- clock ---------------------------------------------------------------------


class Clock(Protocol):
    """Where the endpoint gets the time: ``monotonic`` drives timers, ``wall`` stamps events."""

    def monotonic(self) -> float: ...

    def wall(self) -> float: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


# --- configuration ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LookupName:
    """One name of the lookup order, relative to the SIP domain."""

    label: str
    rtype: str  # "A" or "SRV"
    #: The transport an SRV name implies (None: the profile's transport).
    transport: Kind | None = None
    #: An Autodiscover name: looked up, but no SIP target comes of it.
    autodiscover: bool = False


@functools.cache
def lync_lookup_order(*, allow_tcp: bool = False) -> tuple[LookupName, ...]:
    """The Lync 2013 client's order (docs/reference.md, "DNS"); _sipinternal._tcp only with TCP."""
    order = [
        LookupName("lyncdiscoverinternal", "A", autodiscover=True),
        LookupName("lyncdiscover", "A", autodiscover=True),
        LookupName("_sipinternaltls._tcp", "SRV", Kind.TLS),
        LookupName("_sipinternal._tcp", "SRV", Kind.TCP),
        LookupName("_sip._tls", "SRV", Kind.TLS),
        LookupName("sipinternal", "A"),
        LookupName("sip", "A"),
        LookupName("sipexternal", "A"),
    ]
    return tuple(n for n in order if allow_tcp or n.label != "_sipinternal._tcp")


class WorkloadKind(enum.Enum):
    IM = "im"
    PRESENCE = "presence"
    CONFERENCE = "conference"
    #: Calls to random users, on their own timer (see ClientProfile.call_*).
    CALL = "call"


@dataclass(frozen=True, slots=True)
class Target:
    """A registrar to try: ``host`` names it (TLS server name, Call-ID scope);
    ``address`` is None until resolved."""

    host: str
    port: int
    transport: Kind
    address: str | None = None
    source: str = ""
    #: Every address ``host`` resolved to, in DNS order (an Enterprise pool's
    #: front ends): where to move when the one at ``address`` fails. The DNS
    #: answer's own tuple, shared by its targets.
    front_ends: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return f"{self.address or self.host}:{self.port}"

    def other_front_ends(self) -> list[Target]:
        """The pool's other front ends, in DNS order after this one (a
        front-end move: the same pool, so not a pool failover)."""
        addrs = self.front_ends
        if len(addrs) < 2 or self.address not in addrs:
            return []
        i = addrs.index(self.address)
        return [
            Target(
                self.host,
                self.port,
                self.transport,
                addrs[(i + k) % len(addrs)],
                FRONT_END_MOVE,
                addrs,
            )
            for k in range(1, len(addrs))
        ]


#: The source of a target tried because the front end before it failed.
FRONT_END_MOVE = "front-end move"


def dns_order(addresses: tuple[str, ...], turn: int) -> list[str]:
    """The A records in DNS order, rotated by ``turn``: what a round-robin DNS
    server hands the query it answers ``turn``-th (DNS load balancing spreads
    the clients over the front ends; a failed front end is followed by the next
    one)."""
    n = len(addresses)
    if n < 2:
        return list(addresses)
    start = turn % n
    return [addresses[(start + k) % n] for k in range(n)]


def default_dns_turn(user: UserSpec) -> int:
    """A client's first round-robin turn when its adapter gives none: fixed by
    its URI, so that which front end a client starts on never depends on how
    the clients' draws from a shared RNG interleaved in time (a seeded drill
    puts the same clients on the same front ends every run)."""
    return zlib.crc32(user.uri.encode())


@dataclass(frozen=True)
class ClientProfile:
    """Settings shared by many endpoints (one object for all of them)."""

    domain: str
    #: The transport for A-record and static targets; SRV names imply their own.
    transport: Kind = Kind.TLS
    allow_tcp: bool = False
    #: None: the Lync 2013 order for the allowed transports.
    lookup_order: tuple[LookupName, ...] | None = None
    #: Registrars to use instead of DNS (e.g. Kamailio in interop tests).
    static_targets: tuple[Target, ...] = ()
    default_ports: Mapping[Kind, int] = field(
        default_factory=lambda: {Kind.TLS: 5061, Kind.TCP: 5060, Kind.UDP: 5060}
    )
    expires: int = 600
    #: Refresh at min(expires * fraction, expires - margin), at least 1 s.
    refresh_fraction: float = 0.5
    refresh_margin: float = 30.0
    keepalive: KeepAliveConfig = field(default_factory=KeepAliveConfig)
    timers: TimerConfig = field(default_factory=TimerConfig)
    backoff_base_all_failed: float = 30.0
    backoff_base_ok: float = 90.0
    backoff_max: float = 1800.0
    max_redirects: int = 3
    mode_header: str = DEFAULT_MODE_HEADER
    #: NOTIFY Event packages that mean "register again now".
    nudge_events: frozenset[str] = frozenset({"reg", "registration", "x-sipdrill-reregister"})
    #: Lync: SRV targets must be A records in the SIP domain.
    srv_same_domain: bool = True
    workload: tuple[WorkloadKind, ...] = ()
    #: Mean seconds between two workload actions of one endpoint (jittered +-50 %).
    workload_interval: float = 60.0
    #: Contacts subscribed to per presence action.
    presence_batch: int = 3
    #: Expires of presence SUBSCRIBEs (0: a one-shot fetch, RFC 6665 4.1.2.4).
    presence_expires: int = 0
    #: A 503 to an IM/presence/conference request on the registered flow
    #: means the registrar failed (RFC 3263): register again.
    reregister_on_workload_503: bool = True
    #: The call workload (with WorkloadKind.CALL): the share of users that
    #: place calls, the mean seconds between two calls of one caller
    #: (jittered +-50 %, one call at a time), how long a call is held.
    call_fraction: float = 0.25
    call_interval: float = 30.0
    call_hold: float = 3.0
    #: Whom callers call (themselves excluded): the users being simulated.
    call_targets: tuple[str, ...] = ()
    user_agent: str = "sipdrill-client/0.1 (Lync 2013 semantics)"

    def order(self) -> tuple[LookupName, ...]:
        if self.static_targets:
            return ()
        if self.lookup_order is not None:
            return self.lookup_order
        return lync_lookup_order(allow_tcp=self.allow_tcp)

    def port_for(self, kind: Kind) -> int:
        return int(self.default_ports.get(kind, 5061 if kind is Kind.TLS else 5060))


@dataclass(frozen=True, slots=True)
class UserSpec:
    """One user: SIP URI, home pool (for reports), contacts, conference URIs to join."""

    uri: str
    home_pool: str = ""
    contacts: tuple[str, ...] = ()
    conferences: tuple[str, ...] = ()

    @property
    def user_part(self) -> str:
        return self.uri.partition(":")[2].partition("@")[0]


# --- outputs ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resolve:
    """Look up ``qname`` (absolute, no trailing dot) of type ``rtype``; answer with
    :meth:`Endpoint.dns_result`."""

    qname: str
    rtype: str


@dataclass(frozen=True, slots=True)
class Connect:
    """Open a new flow for ``conn`` to ``target`` (its address is resolved); answer
    with :meth:`Endpoint.connected` or :meth:`Endpoint.connect_failed`."""

    conn: int
    target: Target


@dataclass(frozen=True, slots=True)
class Send:
    conn: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Ping:
    """Send an RFC 5626 CRLFCRLF keep-alive on ``conn``."""

    conn: int


@dataclass(frozen=True, slots=True)
class Close:
    conn: int


@dataclass(frozen=True, slots=True)
class Schedule:
    """Call :meth:`Endpoint.handle_timer` at ``at`` (monotonic), or never (None)."""

    at: float | None


Action = Resolve | Connect | Send | Ping | Close | Schedule
Output = Action | ClientEvent


# --- the mode table --------------------------------------------------------------------


class Trigger(enum.Enum):
    SIGN_IN = "sign-in"
    SIGN_OUT = "sign-out"
    TARGET_FOUND = "target-found"
    NEED_TARGETS = "need-targets"
    ALL_FAILED = "all-failed"
    REGISTERED_FULL = "registered-full"
    REGISTERED_LIMITED = "registered-limited"
    SERVICE_LOST = "service-lost"
    RETRY = "retry"


_M = Mode
_T = Trigger

TRANSITIONS: Mapping[tuple[Mode, Trigger], Mode] = {
    (_M.SIGNED_OUT, _T.SIGN_IN): _M.DISCOVERING,
    (_M.DISCOVERING, _T.TARGET_FOUND): _M.SIGNING_IN,
    (_M.SIGNING_IN, _T.TARGET_FOUND): _M.SIGNING_IN,
    (_M.SIGNING_IN, _T.NEED_TARGETS): _M.DISCOVERING,
    (_M.DISCOVERING, _T.ALL_FAILED): _M.BACKING_OFF,
    (_M.SIGNING_IN, _T.ALL_FAILED): _M.BACKING_OFF,
    (_M.SIGNING_IN, _T.REGISTERED_FULL): _M.FULL_SERVICE,
    (_M.SIGNING_IN, _T.REGISTERED_LIMITED): _M.RESILIENCY_MODE,
    (_M.FULL_SERVICE, _T.REGISTERED_FULL): _M.FULL_SERVICE,
    (_M.FULL_SERVICE, _T.REGISTERED_LIMITED): _M.RESILIENCY_MODE,
    (_M.RESILIENCY_MODE, _T.REGISTERED_FULL): _M.FULL_SERVICE,
    (_M.RESILIENCY_MODE, _T.REGISTERED_LIMITED): _M.RESILIENCY_MODE,
    (_M.FULL_SERVICE, _T.SERVICE_LOST): _M.DISCOVERING,
    (_M.RESILIENCY_MODE, _T.SERVICE_LOST): _M.DISCOVERING,
    (_M.BACKING_OFF, _T.RETRY): _M.DISCOVERING,
    **{(m, _T.SIGN_OUT): _M.SIGNED_OUT for m in Mode if m is not _M.SIGNED_OUT},
}


@dataclass
class IllegalTransition(SipdrillError):
    """``trigger`` is not allowed in ``mode``; nothing was changed."""

    mode: Mode
    trigger: Trigger

    def __str__(self) -> str:
        return f"{self.trigger.value} is not allowed in mode {self.mode.value}"


# --- internals --------------------------------------------------------------------------


class _RegState:
    """Per registrar: one Call-ID and From tag, CSeq increasing (RFC 3261 10.2)."""

    __slots__ = ("call_id", "cseq", "from_tag")

    def __init__(self, call_id: str, from_tag: str) -> None:
        self.call_id = call_id
        self.cseq = 0
        self.from_tag = from_tag


class _Work:
    __slots__ = ("call_id", "cseq", "from_tag", "kind", "request", "started", "target")

    def __init__(
        self, kind: WorkloadKind, target: str, request: Request, started: float, from_tag: str
    ) -> None:
        self.kind = kind
        self.target = target
        self.request = request
        self.started = started
        self.from_tag = from_tag
        self.call_id = request.headers.get("Call-ID") or ""
        self.cseq = int((request.headers.get("CSeq") or "1").split()[0])


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _unquote(value: str | None) -> str:
    return (value or "").strip().strip('"')


#: The rest of a Contact that is ours as sent, plus the registrar's expires.
_ECHOED_EXPIRES: Final = re.compile(r";(?i:expires)=([0-9]{1,10})")


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit() or len(text) > 10:
        return None
    return int(text)


def _q(address: Address) -> float:
    try:
        q = float(address.parameters.get("q") or 1.0)
    except ValueError:
        return 0.0
    return q if 0.0 <= q <= 1.0 else 0.0


@functools.lru_cache(maxsize=1024)
def _parse_uri(text: str) -> URI:
    # Every REGISTER of every endpoint has the same Request-URI (the domain);
    # URIs are frozen, and no request's URI is changed in place.
    return URI.parse(text)


def _has_service(answer: DnsAnswer) -> bool:
    """RFC 2782: a lone "." target means the service is decidedly not available."""
    srv = answer.srv
    return bool(srv) and not (len(srv) == 1 and srv[0].target in (".", ""))


def _event_package(value: str | None) -> str:
    return (value or "").split(";")[0].strip().lower()


_ALL_FAILED_REASON = "every target failed"


class Endpoint:
    """The state machine of one user's client. Not thread-safe; one adapter drives it."""

    __slots__ = (
        "_announced",
        "_attempted",
        "_backoff_until",
        "_call",
        "_call_at",
        "_caller",
        "_conn",
        "_conn_open",
        "_conn_seq",
        "_contact_rr",
        "_cycle_started",
        "_dead",
        "_dns_turn",
        "_expires",
        "_instance",
        "_interval_retries",
        "_local",
        "_lookup_pos",
        "_lost_at",
        "_out",
        "_pending_host",
        "_pool",
        "_pool_address",
        "_queue",
        "_redirects",
        "_refresh_at",
        "_reg_contact",
        "_reg_expires",
        "_reg_key",
        "_reg_refresh",
        "_regs",
        "_srv_ports",
        "_target",
        "_wait",
        "_work",
        "_work_at",
        "_work_index",
        "backoff",
        "cache",
        "clock",
        "keepalive",
        "mode",
        "profile",
        "rng",
        "transactions",
        "user",
    )

    def __init__(
        self,
        user: UserSpec,
        profile: ClientProfile,
        clock: Clock,
        rng: random.Random,
        *,
        cache: TtlCache | None = None,
        dns_turn: int | None = None,
    ) -> None:
        self.user = user
        #: The round-robin turn of this client's next A lookup (see dns_order).
        self._dns_turn = default_dns_turn(user) if dns_turn is None else dns_turn
        self.profile = profile
        self.clock = clock
        self.rng = rng
        #: Shared by many endpoints when the adapter passes one in.
        self.cache = cache if cache is not None else TtlCache(max_entries=64)
        self.transactions = TransactionManager(rng, profile.timers)
        self.keepalive: KeepAlive | None = None
        self.backoff = Backoff(
            rng,
            base_time_all_failed=profile.backoff_base_all_failed,
            base_time_ok=profile.backoff_base_ok,
            max_time=profile.backoff_max,
        )
        self.mode = Mode.SIGNED_OUT
        self._instance = str(uuid.uuid5(uuid.NAMESPACE_URL, user.uri))
        self._out: list[Output] = []
        self._announced: float | None = None
        self._conn = 0
        self._conn_seq = 0
        self._conn_open = False
        self._local: Addr | None = None
        self._target: Target | None = None
        self._queue: list[Target] = []
        # Targets tried in this attempt cycle; None while none is (an empty set is 216 B).
        self._attempted: set[tuple[str, str, int, Kind]] | None = None
        self._lookup_pos = 0
        self._wait: tuple[str, str] | None = None
        self._redirects = 0
        self._cycle_started: float | None = None
        self._regs: dict[str, _RegState] = {}
        self._reg_key: TransactionKey | None = None
        self._reg_refresh = False
        self._reg_expires = profile.expires
        #: The Contact of the last REGISTER, as sent.
        self._reg_contact = ""
        self._interval_retries = 0
        self._srv_ports: dict[str, int] = {}
        self._pool: str | None = None
        #: The front end (``ip:port``) of the last registration's pool.
        self._pool_address: str | None = None
        self._pending_host: Target | None = None
        self._expires = 0
        self._refresh_at: float | None = None
        self._lost_at: float | None = None
        self._backoff_until: float | None = None
        self._work: dict[TransactionKey, _Work] = {}
        # Client transactions given up with their flow: their retransmissions
        # (UDP) must not go out on the next flow.
        self._dead: set[TransactionKey] | None = None
        self._work_at: float | None = None
        self._work_index = 0
        self._contact_rr = 0
        self._call: Call | None = None
        self._call_at: float | None = None
        self._caller = WorkloadKind.CALL in profile.workload and is_caller(
            user.uri, profile.call_fraction
        )

    # ------------------------------------------------------------------ properties

    @property
    def conn(self) -> int:
        """The id of the current flow (0: none)."""
        return self._conn

    @property
    def target(self) -> Target | None:
        """The registrar being tried, or the one registered with."""
        return self._target

    @property
    def pool(self) -> str | None:
        """The registrar (pool) the endpoint is registered with, if it is."""
        return self._pool if self.mode.registered else None

    @property
    def instance_id(self) -> str:
        return self._instance

    def can(self, trigger: Trigger) -> bool:
        return (self.mode, trigger) in TRANSITIONS

    def next_deadline(self) -> float | None:
        # Called after every input: no list, no generator (this runs ~50 times
        # per endpoint in a failover storm).
        best = self.transactions.next_deadline()
        keepalive = self.keepalive
        call = self._call
        for d in (
            keepalive.next_deadline() if keepalive is not None else None,
            self._refresh_at,
            self._backoff_until,
            self._work_at,
            self._call_at,
            call.hangup_at if call is not None else None,
        ):
            if d is not None and (best is None or d < best):
                best = d
        return best

    # ------------------------------------------------------------------ inputs

    def sign_in(self) -> list[Output]:
        """Start signing in (SignedOut only; raises :class:`IllegalTransition` otherwise)."""
        self._check(Trigger.SIGN_IN)
        self._out = []
        now = self._now()
        self._transition(Trigger.SIGN_IN, "user signed in")
        self._start_attempt(now, ())
        return self._flush()

    def sign_out(self) -> list[Output]:
        """Sign out: a REGISTER with Expires 0 if registered, close the flow, forget timers."""
        self._check(Trigger.SIGN_OUT)
        self._out = []
        now = self._now()
        if self.mode.registered and self._conn_open and self._target is not None:
            self._send_register(now, expires=0, refresh=True)
        self._drop_flow()
        self._reset_attempt()
        self._refresh_at = self._backoff_until = self._work_at = self._call_at = None
        self._reg_key = None
        self._work.clear()
        self._call = None
        self.transactions = TransactionManager(self.rng, self.profile.timers)
        self._dead = None
        self._lost_at = None
        self._transition(Trigger.SIGN_OUT, "user signed out")
        return self._flush()

    def dns_result(self, answer: DnsAnswer, *, queried: bool = True) -> list[Output]:
        """The answer to a :class:`Resolve` (stale answers are cached and otherwise ignored).

        ``queried``: this endpoint's Resolve sent a DNS query. False when the
        answer came from a query another endpoint had in flight, or from the
        shared cache: its DnsLookup event then says ``cached`` (and is not
        emitted), so the events count the queries the wire carries."""
        self._out = []
        now = self._now()
        self.cache.put(answer, now)
        key = TtlCache.key(answer.qname, answer.rtype)
        if self._wait is not None and TtlCache.key(*self._wait) == key:
            self._wait = None
            self._use_answer(answer, now, cached=not queried)
            self._advance(now)
        return self._flush()

    def connected(self, conn: int, local: Addr) -> list[Output]:
        """The flow for ``conn`` is open (TLS verified); ``local`` is our address on it."""
        self._out = []
        if conn != self._conn or self._target is None:
            self._out.append(Close(conn))  # a flow we no longer want
            return self._flush()
        if self._conn_open:
            return self._flush()
        now = self._now()
        self._conn_open = True
        self._local = local
        self._interval_retries = 0
        self._send_register(now, expires=self.profile.expires, refresh=False)
        return self._flush()

    def connect_failed(self, conn: int, failure: Failure, detail: str = "") -> list[Output]:
        self._out = []
        if conn == self._conn and not self._conn_open and self._target is not None:
            self._conn = 0
            self._fail_target(self._now(), failure, detail or failure.value)
        return self._flush()

    def flow_closed(
        self, conn: int, failure: Failure = Failure.RESET, detail: str = ""
    ) -> list[Output]:
        """The flow went away (reset, closed by the peer, a send failed on it)."""
        self._out = []
        if conn == self._conn and self._conn_open:
            self._conn_open = False
            self._conn = 0
            self._flow_failed(self._now(), failure, detail or "flow closed")
        return self._flush()

    def pong(self, conn: int) -> list[Output]:
        self._out = []
        if conn == self._conn and self.keepalive is not None:
            self.keepalive.pong_received(self._now())
        return self._flush()

    def receive(self, conn: int, message: Request | Response) -> list[Output]:
        """A message that arrived on ``conn`` (already parsed by the transport)."""
        self._out = []
        if conn != self._conn or not self._conn_open:
            return self._flush()
        now = self._now()
        reliable = self._target is not None and self._target.transport.reliable
        try:
            if isinstance(message, Response):
                events = self.transactions.receive_response(message, now)
            else:
                peer = (self._target.address or "", self._target.port) if self._target else None
                events = self.transactions.receive_request(
                    message, now, reliable=reliable, peer=peer
                )
        except (TransactionError, ValueError, KeyError, IndexError):
            # A message the transaction layer cannot place is dropped, as
            # RFC 3261 18.1.2 drops stray responses.
            return self._flush()
        self._run_tx(events, now)
        return self._flush()

    def handle_timer(self) -> list[Output]:
        self._out = []
        now = self._now()
        self._run_tx(self.transactions.handle_timer(now), now)
        if self.keepalive is not None:
            for ev in self.keepalive.handle_timer(now):
                if isinstance(ev, SendPing) and self._conn_open:
                    self._out.append(Ping(self._conn))
                elif isinstance(ev, FlowFailed):
                    self._flow_failed(now, Failure.PONG_TIMEOUT, ev.reason)
        if self._refresh_at is not None and now >= self._refresh_at:
            self._refresh_at = None
            if self.mode.registered and self._conn_open and self._reg_key is None:
                self._send_register(now, expires=self._reg_expires, refresh=True)
        if self._backoff_until is not None and now >= self._backoff_until:
            self._backoff_until = None
            if self.mode is Mode.BACKING_OFF:
                self._transition(Trigger.RETRY, "backoff over")
                self._start_attempt(now, ())
        if self._work_at is not None and now >= self._work_at:
            self._work_at = None
            if self.mode.registered and self._conn_open:
                self._workload_action(now)
                self._schedule_work(now)
        if self._call_at is not None and now >= self._call_at:
            self._call_at = None
            if self.mode.registered and self._conn_open and self._call is None:
                self._place_call(now)
        call = self._call
        if call is not None and call.hangup_at is not None and now >= call.hangup_at:
            call.hangup_at = None
            self._hang_up(call, now)
        return self._flush()

    # ------------------------------------------------------------------ plumbing

    def _now(self) -> float:
        return self.clock.monotonic()

    def _check(self, trigger: Trigger) -> None:
        if (self.mode, trigger) not in TRANSITIONS:
            raise IllegalTransition(self.mode, trigger)

    def _transition(self, trigger: Trigger, reason: str) -> None:
        new = TRANSITIONS.get((self.mode, trigger))
        if new is None:
            raise IllegalTransition(self.mode, trigger)
        old = self.mode
        if new is old:
            return
        self.mode = new
        self._emit(ModeChanged, old=old, new=new, trigger=trigger.value, reason=reason)

    def _emit(self, cls: Callable[..., ClientEvent], **fields: object) -> None:
        target = self._target
        fields.setdefault("pool", target.host if target is not None else None)
        fields.setdefault("address", target.where if target is not None else None)
        self._out.append(
            cls(user=self.user.uri, wall=self.clock.wall(), monotonic=self._now(), **fields)
        )

    def _flush(self) -> list[Output]:
        deadline = self.next_deadline()
        if deadline != self._announced:
            self._announced = deadline
            self._out.append(Schedule(deadline))
        out, self._out = self._out, []
        return out

    # ------------------------------------------------------------------ discovery

    def _first_attempt(self, key: tuple[str, str, int, Kind]) -> bool:
        """Record ``key`` as tried in this cycle; False if it already was."""
        if self._attempted is None:
            self._attempted = {key}
            return True
        if key in self._attempted:
            return False
        self._attempted.add(key)
        return True

    def _reset_attempt(self) -> None:
        self._queue = []
        self._attempted = None
        self._lookup_pos = 0
        self._wait = None
        self._redirects = 0

    def _start_attempt(self, now: float, first: Sequence[Target]) -> None:
        """A new sign-in attempt: ``first`` targets (a redirect's), then the lookup order."""
        self._reset_attempt()
        self._cycle_started = now
        self._queue = list(first) + list(self.profile.static_targets)
        self._advance(now)

    def _advance(self, now: float) -> None:
        """Make progress until waiting on DNS, connecting, or out of targets."""
        while self._wait is None:
            if self._queue:
                target = self._queue.pop(0)
                if target.address is None:
                    self._resolve_target(target, now)
                    continue
                if not self._first_attempt(("a", target.address, target.port, target.transport)):
                    continue
                self._connect(target, now)
                return
            order = self.profile.order()
            if self._lookup_pos >= len(order):
                self._all_failed(now)
                return
            if self.mode is Mode.SIGNING_IN:
                self._transition(Trigger.NEED_TARGETS, "looking for another registrar")
            name = order[self._lookup_pos]
            qname = f"{name.label}.{normalise_name(self.profile.domain)}"
            answer = self.cache.get(qname, name.rtype, now)
            if answer is None:
                self._ask(qname, name.rtype)
                return
            self._use_answer(answer, now, cached=True)

    def _ask(self, qname: str, rtype: str) -> None:
        self._wait = (qname, rtype)
        self._out.append(Resolve(qname, rtype))

    def _use_answer(self, answer: DnsAnswer, now: float, *, cached: bool) -> None:
        """Use the answer we waited for: a target's A record, or a lookup-order name."""
        status = answer.status.value
        if answer.status is DnsStatus.OK and answer.rtype == "SRV" and not _has_service(answer):
            status = "no-service"
        pending = self._pending_host
        if not cached:
            self._out.append(
                DnsLookup(
                    user=self.user.uri,
                    wall=self.clock.wall(),
                    monotonic=now,
                    pool=pending.host if pending is not None else None,
                    reason="registrar address" if pending is not None else "lookup order",
                    qname=normalise_name(answer.qname),
                    rtype=answer.rtype,
                    status=status,
                    answer=answer.summary(),
                    cached=cached,
                )
            )
        if pending is not None:
            self._pending_host = None
            if answer.status is not DnsStatus.OK or not answer.addresses:
                self._target_event(
                    pending, Failure.BAD_TARGET, f"{pending.host} does not resolve ({status})", now
                )
                return
            self._queue[:0] = [
                Target(
                    pending.host,
                    pending.port,
                    pending.transport,
                    a,
                    pending.source,
                    answer.addresses,
                )
                for a in self._rotate(answer.addresses)
            ]
            return
        order = self.profile.order()
        if self._lookup_pos >= len(order):
            return
        name = order[self._lookup_pos]
        self._lookup_pos += 1
        if answer.status is not DnsStatus.OK or name.autodiscover:
            return
        qname = normalise_name(answer.qname)
        if name.rtype == "SRV":
            self._expand_srv(answer, name, now)
            return
        kind = self.profile.transport
        self._queue[:0] = [
            Target(qname, self.profile.port_for(kind), kind, a, qname, answer.addresses)
            for a in self._rotate(answer.addresses)
        ]

    def _rotate(self, addresses: tuple[str, ...]) -> list[str]:
        if len(addresses) < 2:
            return list(addresses)
        turn = self._dns_turn
        self._dns_turn = turn + 1
        return dns_order(addresses, turn)

    def _expand_srv(self, answer: DnsAnswer, name: LookupName, now: float) -> None:
        kind = name.transport or self.profile.transport
        domain = normalise_name(self.profile.domain)
        targets: list[Target] = []
        for rec in order_srv(answer.srv, self.rng):
            host = normalise_name(rec.host)
            if self.profile.srv_same_domain and host != domain and not host.endswith("." + domain):
                self._target_event(
                    Target(host, rec.port, kind, None, answer.qname),
                    Failure.BAD_TARGET,
                    f"SRV target {host} is outside the SIP domain {domain}",
                    now,
                )
                continue
            self._srv_ports[host] = rec.port
            targets.append(Target(host, rec.port, kind, None, normalise_name(answer.qname)))
        self._queue[:0] = targets

    def _resolve_target(self, target: Target, now: float) -> None:
        if not self._first_attempt(("h", target.host, target.port, target.transport)):
            return
        if _is_ip(target.host):
            self._queue.insert(
                0, Target(target.host, target.port, target.transport, target.host, target.source)
            )
            return
        answer = self.cache.get(target.host, "A", now)
        self._pending_host = target
        if answer is None:
            self._ask(normalise_name(target.host), "A")
            return
        self._use_answer(answer, now, cached=True)

    def _connect(self, target: Target, now: float) -> None:
        self._target = target
        self._conn_seq += 1
        self._conn = self._conn_seq
        self._conn_open = False
        self._local = None
        if self.mode is Mode.DISCOVERING:
            self._transition(Trigger.TARGET_FOUND, f"trying {target.host} ({target.source})")
        self._out.append(Connect(self._conn, target))

    def _all_failed(self, now: float) -> None:
        delay = self.backoff.failure(all_failed=True)
        self._target = None
        self._transition(Trigger.ALL_FAILED, _ALL_FAILED_REASON)
        self._backoff_until = now + delay
        self._emit(
            RetryScheduled,
            reason=_ALL_FAILED_REASON,
            delay=delay,
            failures=self.backoff.failures,
        )

    def _target_event(
        self,
        target: Target,
        failure: Failure,
        reason: str,
        now: float,
        status: int | None = None,
    ) -> None:
        self._out.append(
            TargetFailed(
                user=self.user.uri,
                wall=self.clock.wall(),
                monotonic=now,
                pool=target.host,
                address=target.where,
                reason=reason,
                failure=failure,
                status_code=status,
                source=target.source,
            )
        )

    # ------------------------------------------------------------------ failures

    def _drop_flow(self) -> None:
        if self.keepalive is not None:
            self.keepalive = None
        call = self._call
        call_keys = (call.invite_key, call.bye_key) if call is not None else ()
        abandoned = [k for k in (self._reg_key, *self._work, *call_keys) if k is not None]
        if abandoned:
            if self._dead is None:
                self._dead = set()
            self._dead.update(abandoned)
        if self._conn:
            self._out.append(Close(self._conn))
        self._conn = 0
        self._conn_open = False
        self._local = None
        self._reg_key = None
        self._refresh_at = None
        self._work_at = None
        self._fail_work("flow closed")
        self._lose_call(self._now())
        self._call_at = None

    def _fail_target(
        self, now: float, failure: Failure, reason: str, status: int | None = None
    ) -> None:
        """The target being signed in to failed: next one (RFC 3263 4.3)."""
        target = self._target
        if target is not None:
            self._target_event(target, failure, reason, now, status)
        self._drop_flow()
        self._advance(now)

    def _flow_failed(
        self, now: float, failure: Failure, reason: str, status: int | None = None
    ) -> None:
        if self.mode.registered:
            self._lose_service(now, failure, reason, status)
        elif self.mode is Mode.SIGNING_IN and self._target is not None:
            self._fail_target(now, failure, reason, status)

    def _lose_service(
        self,
        now: float,
        failure: Failure,
        reason: str,
        status: int | None = None,
        first: Sequence[Target] = (),
    ) -> None:
        """Registered, and the registrar or flow failed (or redirected us): sign in
        again, first on the pool's other front ends (unless redirected)."""
        target = self._target
        if target is not None:
            self._target_event(target, failure, reason, now, status)
            if not first:
                first = target.other_front_ends()
        self._drop_flow()
        self._lost_at = now
        self._transition(Trigger.SERVICE_LOST, reason)
        self._start_attempt(now, first)

    # ------------------------------------------------------------------ REGISTER

    def _reg_state(self, host: str) -> _RegState:
        reg = self._regs.get(host)
        if reg is None:
            reg = _RegState(
                f"{self.rng.getrandbits(64):016x}@{self.user.user_part}",
                f"{self.rng.getrandbits(32):08x}",
            )
            self._regs[host] = reg
        return reg

    def _via(self, branch: str) -> str:
        target = self._target
        assert target is not None
        host, port = self._local or ("127.0.0.1", 0)
        host = f"[{host}]" if ":" in host else host
        return f"SIP/2.0/{target.transport.via} {host}:{port};branch={branch};rport"

    def _contact(self) -> str:
        target = self._target
        assert target is not None
        host, port = self._local or ("127.0.0.1", 0)
        host = f"[{host}]" if ":" in host else host
        return (
            f"<sip:{self.user.user_part}@{host}:{port};transport={target.transport.value};ob>"
            f';+sip.instance="<urn:uuid:{self._instance}>";reg-id=1'
        )

    def _request(
        self,
        method: str,
        ruri: str,
        to: str,
        call_id: str,
        cseq: int,
        from_tag: str,
        *,
        to_tag: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> Request:
        # A ParsedRequest memoizes Via and CSeq, which the transaction layer
        # reads back at once (sipmessage's Request parses them on every read).
        request = ParsedRequest(method, _parse_uri(ruri), body)
        cast(IndexedHeaders, request.headers).extend(
            (
                ("Via", self._via(self.transactions.new_branch())),
                ("Max-Forwards", "70"),
                ("From", f"<{self.user.uri}>;tag={from_tag}"),
                ("To", f"<{to}>" + (f";tag={to_tag}" if to_tag else "")),
                ("Call-ID", call_id),
                ("CSeq", f"{cseq} {method}"),
                *headers,
                ("User-Agent", self.profile.user_agent),
            )
        )
        return request

    def _send_register(self, now: float, *, expires: int, refresh: bool) -> None:
        target = self._target
        assert target is not None
        reg = self._reg_state(target.host)
        reg.cseq += 1
        contact = self._reg_contact = self._contact()
        request = self._request(
            "REGISTER",
            f"sip:{normalise_name(self.profile.domain)}",
            self.user.uri,
            reg.call_id,
            reg.cseq,
            reg.from_tag,
            headers=(
                ("Contact", contact),
                ("Expires", str(expires)),
                ("Supported", "outbound, path"),
            ),
        )
        self._reg_refresh = refresh
        self._reg_expires = expires if expires > 0 else self._reg_expires
        self._reg_key = self._start_tx(request, now)
        if self._reg_key is None and expires > 0:
            self._flow_failed(now, Failure.RESET, "could not start a REGISTER transaction")

    def _start_tx(self, request: Request, now: float) -> TransactionKey | None:
        target = self._target
        if target is None:
            return None
        try:
            key, events = self.transactions.send_request(
                request,
                now,
                reliable=target.transport.reliable,
                peer=(target.address or target.host, target.port),
            )
        except TransactionError:
            return None
        self._run_tx(events, now)
        return key

    def _run_tx(self, events: list[TransactionEvent], now: float) -> None:
        for ev in events:
            if isinstance(ev, TxSend):
                if self._conn_open and (self._dead is None or ev.key not in self._dead):
                    self._out.append(Send(self._conn, ev.data))
            elif isinstance(ev, TransactionTerminated):
                if self._dead is not None:
                    self._dead.discard(ev.key)
                    if not self._dead:
                        self._dead = None
            elif isinstance(ev, DeliverResponse):
                if ev.key is None:
                    continue  # stray (RFC 3261 18.1.2)
                if ev.key == self._reg_key:
                    self._on_register_response(ev.response, now)
                elif ev.key in self._work:
                    self._on_work_response(ev.key, ev.response, now)
                elif self._call is not None:
                    self._on_call_response(ev.key, ev.response, now)
            elif isinstance(ev, DeliverRequest):
                if ev.key is not None:
                    self._on_request(ev.key, ev.request, now)
            elif isinstance(ev, TransactionTimeout):
                if ev.key == self._reg_key:
                    self._reg_key = None
                    self._flow_failed(now, Failure.TRANSACTION_TIMEOUT, "no answer to REGISTER")
                elif ev.key in self._work:
                    self._finish_work(ev.key, None, now, "transaction timeout")
                elif self._call is not None:
                    self._call_gave_up(ev.key, now, "transaction timeout")
            elif isinstance(ev, TxTransportError):
                if ev.key == self._reg_key:
                    self._reg_key = None
                    self._flow_failed(now, Failure.RESET, ev.reason)
                elif ev.key in self._work:
                    self._finish_work(ev.key, None, now, f"transport error: {ev.reason}")
                elif self._call is not None:
                    self._call_gave_up(ev.key, now, f"transport error: {ev.reason}")

    def _on_register_response(self, response: Response, now: float) -> None:
        code = response.code
        if code < 200:
            return
        self._reg_key = None
        target = self._target
        if target is None:
            return
        if self.mode is Mode.SIGNED_OUT:
            return
        if 200 <= code < 300:
            self._registered(response, now, target)
        elif code in (301, 302):
            self._redirect(response, now, target)
        elif code == 423 and self._interval_retries < 2:
            min_expires = _int(response.headers.get("Min-Expires"))
            if min_expires is None or min_expires <= 0:
                self._flow_failed(now, Failure.REJECTED, "423 without Min-Expires", code)
                return
            self._interval_retries += 1
            self._send_register(
                now, expires=max(min_expires, self._reg_expires), refresh=self._reg_refresh
            )
        elif code == 503:
            self._flow_failed(now, Failure.SERVICE_UNAVAILABLE, response.phrase or "503", code)
        else:
            self._flow_failed(now, Failure.REJECTED, f"{code} {response.phrase}".strip(), code)

    def _granted_expires(self, response: Response) -> int:
        requested = self._reg_expires
        header = _int(response.headers.get("Expires"))
        mine: int | None = None
        values = response.headers.getlist("Contact")
        if len(values) == 1 and self._reg_contact and values[0].startswith(self._reg_contact):
            # The registrar echoed the one Contact we sent with its expires: that
            # is what the parse below finds, without parsing (a reconnect storm
            # does this 10,000 times).
            echoed = _ECHOED_EXPIRES.fullmatch(values[0], len(self._reg_contact))
            if echoed is not None:
                mine = int(echoed.group(1))
                values = []
        for value in values:
            try:
                contacts = Address.parse_many(value)
            except ValueError:
                continue
            for contact in contacts:
                instance = _unquote(contact.parameters.get("+sip.instance"))
                ours = instance == f"<urn:uuid:{self._instance}>"
                if not ours and self._local is not None:
                    uri = contact.uri
                    ours = uri.user == self.user.user_part and (uri.host, uri.port) == (
                        self._local[0],
                        self._local[1],
                    )
                if ours:
                    spelled = grammar.param_name(contact.parameters, "expires")
                    mine = _int(contact.parameters.get(spelled) if spelled else None)
                    break
            if mine is not None:
                break
        granted = mine if mine is not None else header if header is not None else requested
        return max(1, min(granted, 2**31 - 1))

    def _registered(self, response: Response, now: float, target: Target) -> None:
        mode_text = (response.headers.get(self.profile.mode_header) or "").strip().lower()
        limited = mode_text == "resiliency"
        trigger = Trigger.REGISTERED_LIMITED if limited else Trigger.REGISTERED_FULL
        if not self.can(trigger):
            return
        expires = self._granted_expires(response)
        flow_timer = _int(response.headers.get("Flow-Timer"))
        was_registered = self.mode.registered
        refresh = self._reg_refresh and was_registered
        self.backoff.success()
        self._expires = expires
        delay = min(expires * self.profile.refresh_fraction, expires - self.profile.refresh_margin)
        self._refresh_at = now + max(1.0, delay)
        if target.transport.reliable:
            if self.keepalive is None:
                self.keepalive = KeepAlive(self.rng, self.profile.keepalive, flow_timer)
                self.keepalive.start(now)
            elif flow_timer != self.keepalive.flow_timer:
                self.keepalive.set_flow_timer(flow_timer, now)
        outage = None if self._lost_at is None else now - self._lost_at
        since = None if refresh or self._cycle_started is None else now - self._cycle_started
        previous = self._pool
        previous_address = self._pool_address
        if not refresh:
            self._pool = target.host
            self._pool_address = target.where
        new_mode = Mode.RESILIENCY_MODE if limited else Mode.FULL_SERVICE
        self._transition(trigger, f"{response.code} from {target.host}")
        self._emit(
            Registered,
            reason=f"{response.code} {response.phrase}".strip(),
            mode=new_mode,
            expires=expires,
            refresh=refresh,
            outage=outage,
            since_sign_in=since,
            previous_pool=None if refresh else previous,
            previous_address=None if refresh else previous_address,
            front_end_move=(
                not refresh and previous == target.host and previous_address != target.where
            ),
        )
        self._lost_at = None
        if not refresh:
            self._cycle_started = None
            self._queue = []
            self._attempted = None
            self._schedule_work(now)
            self._schedule_call(now)

    def _redirect(self, response: Response, now: float, target: Target) -> None:
        code = response.code
        contacts: list[Address] = []
        for value in response.headers.getlist("Contact"):
            try:
                contacts += Address.parse_many(value)
            except ValueError:
                continue
        contacts.sort(key=_q, reverse=True)
        targets: list[Target] = []
        shown: list[str] = []
        for contact in contacts:
            uri = contact.uri
            scheme = (uri.scheme or "").lower()
            if scheme not in ("sip", "sips") or not uri.host:
                continue
            transport_param = (uri.parameters.get("transport") or "").lower()
            if scheme == "sips" or transport_param == "tls":
                kind = Kind.TLS
            elif transport_param == "tcp":
                kind = Kind.TCP
            elif transport_param == "udp":
                kind = Kind.UDP
            else:
                kind = target.transport
            host = normalise_name(uri.host.strip("[]"))
            port = uri.port or self._srv_ports.get(host) or self.profile.port_for(kind)
            if not host or not 0 < port < 65536:
                continue
            targets.append(Target(host, port, kind, None, f"redirect from {target.host}"))
            shown.append(f"{host}:{port};q={_q(contact):g}")
        if not targets:
            self._flow_failed(now, Failure.BAD_RESPONSE, f"{code} without a usable Contact", code)
            return
        if self._redirects >= self.profile.max_redirects:
            self._flow_failed(
                now,
                Failure.REDIRECT_LOOP,
                f"more than {self.profile.max_redirects} redirects",
                code,
            )
            return
        self._emit(
            Redirected,
            reason=f"{code} {response.phrase}".strip(),
            status_code=code,
            targets=tuple(shown),
        )
        if self.mode.registered:
            self._lose_service(now, Failure.REDIRECTED, f"{code}: moved", code, first=targets)
            return
        self._redirects += 1
        self._drop_flow()
        self._queue[:0] = targets
        self._advance(now)

    # ------------------------------------------------------------------ requests to us

    def _on_request(self, key: TransactionKey, request: Request, now: float) -> None:
        method = request.method.upper()
        if method in ("NOTIFY", "MESSAGE", "OPTIONS", "INFO", "BYE", "UPDATE", "INVITE"):
            status = 200
        elif method == "CANCEL":
            status = 481  # every INVITE is answered at once: nothing left to cancel
        else:
            status = 405
        if method == "BYE":
            self._remote_bye(request, now)
        try:
            if method == "INVITE":
                host = self._local[0] if self._local else "127.0.0.1"
                response = answer_invite(request, self._contact(), host)
            else:
                response = make_response(request, status)
            if status == 405:
                response.headers.add(
                    "Allow", "INVITE, ACK, BYE, CANCEL, MESSAGE, NOTIFY, OPTIONS, INFO, UPDATE"
                )
            events = self.transactions.send_response(key, response, now)
        except (TransactionError, ValueError):
            return
        self._run_tx(events, now)
        if (
            method == "NOTIFY"
            and _event_package(request.headers.get("Event")) in self.profile.nudge_events
            and self.mode.registered
            and self._conn_open
        ):
            self._emit(Nudged, reason="registrar asked to register again", method=method)
            if self._reg_key is None:
                self._refresh_at = None
                self._send_register(now, expires=self._reg_expires, refresh=True)

    # ------------------------------------------------------------------ workload

    def _schedule_work(self, now: float) -> None:
        if not self.profile.workload or self._work_at is not None:
            return
        self._work_at = now + self.profile.workload_interval * self.rng.uniform(0.5, 1.5)

    def _workload_action(self, now: float) -> None:
        kinds = self.profile.workload
        for _ in range(len(kinds)):
            kind = kinds[self._work_index % len(kinds)]
            self._work_index += 1
            if kind is WorkloadKind.IM and self.user.contacts:
                contact = self.user.contacts[self._contact_rr % len(self.user.contacts)]
                self._contact_rr += 1
                self._send_work(
                    kind,
                    "MESSAGE",
                    contact,
                    now,
                    headers=(("Content-Type", "text/plain"),),
                    body=f"hello from {self.user.user_part}".encode(),
                )
                return
            if kind is WorkloadKind.PRESENCE and self.user.contacts:
                n = min(self.profile.presence_batch, len(self.user.contacts))
                for i in range(n):
                    contact = self.user.contacts[(self._contact_rr + i) % len(self.user.contacts)]
                    self._send_work(
                        kind,
                        "SUBSCRIBE",
                        contact,
                        now,
                        headers=(
                            ("Event", "presence"),
                            ("Accept", "application/pidf+xml"),
                            ("Contact", self._contact()),
                            ("Expires", str(self.profile.presence_expires)),
                        ),
                    )
                self._contact_rr += n
                return
            if kind is WorkloadKind.CONFERENCE and self.user.conferences:
                conference = self.user.conferences[self._work_index % len(self.user.conferences)]
                host = self._local[0] if self._local else "127.0.0.1"
                sdp = (
                    "v=0\r\n"
                    f"o=- 0 0 IN IP4 {host}\r\n"
                    "s=sipdrill\r\n"
                    f"c=IN IP4 {host}\r\n"
                    "t=0 0\r\n"
                    "m=audio 9 RTP/AVP 0\r\n"
                    "a=inactive\r\n"
                ).encode()
                self._send_work(
                    kind,
                    "INVITE",
                    conference,
                    now,
                    headers=(("Contact", self._contact()), ("Content-Type", "application/sdp")),
                    body=sdp,
                )
                return

    def _send_work(
        self,
        kind: WorkloadKind,
        method: str,
        target: str,
        now: float,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> None:
        call_id = f"{self.rng.getrandbits(64):016x}@{self.user.user_part}"
        from_tag = f"{self.rng.getrandbits(32):08x}"
        try:
            request = self._request(
                method, target, target, call_id, 1, from_tag, headers=headers, body=body
            )
        except ValueError:
            self._record(kind, target, None, now, now, "not a SIP URI")
            return
        key = self._start_tx(request, now)
        if key is not None:
            self._work[key] = _Work(kind, target, request, now, from_tag)

    def _on_work_response(self, key: TransactionKey, response: Response, now: float) -> None:
        work = self._work.get(key)
        if work is None or response.code < 200:
            return
        if work.kind is WorkloadKind.CONFERENCE and 200 <= response.code < 300:
            self._ack_and_leave(work, response, now)
        self._finish_work(key, response.code, now, f"{response.code} {response.phrase}".strip())
        if (
            response.code == 503
            and self.profile.reregister_on_workload_503
            and self.mode.registered
        ):
            self._lose_service(now, Failure.SERVICE_UNAVAILABLE, "503 to a request", 503)

    def _ack_and_leave(self, work: _Work, response: Response, now: float) -> None:
        """ACK the 2xx (a new transaction of its own, RFC 3261 13.2.2.4), then BYE."""
        to_value = response.headers.get("To") or ""
        try:
            to_tag = Address.parse(to_value).parameters.get("tag")
            remote = Address.parse_many(response.headers.get("Contact") or "")
            ruri = str(remote[0].uri) if remote else work.target
        except ValueError:
            return
        try:
            ack = self._request(
                "ACK", ruri, work.target, work.call_id, work.cseq, work.from_tag, to_tag=to_tag
            )
            if self._conn_open:
                self._out.append(Send(self._conn, serialize(ack)))
            bye = self._request(
                "BYE", ruri, work.target, work.call_id, work.cseq + 1, work.from_tag, to_tag=to_tag
            )
        except ValueError:
            return
        self._start_tx(bye, now)

    def _finish_work(
        self, key: TransactionKey, status: int | None, now: float, reason: str
    ) -> None:
        work = self._work.pop(key, None)
        if work is None:
            return
        self._record(work.kind, work.target, status, work.started, now, reason)

    def _record(
        self,
        kind: WorkloadKind,
        target: str,
        status: int | None,
        started: float,
        now: float,
        reason: str,
    ) -> None:
        self._emit(
            WorkloadResult,
            reason=reason,
            kind=kind.value,
            target=target,
            status_code=status,
            ok=status is not None and 200 <= status < 300,
            elapsed=now - started,
            mode=self.mode,
        )

    def _fail_work(self, reason: str) -> None:
        if not self._work:
            return
        now = self._now()
        for key in list(self._work):
            self._finish_work(key, None, now, reason)

    # ------------------------------------------------------------------ calls

    def _schedule_call(self, now: float) -> None:
        if not self._caller or self._call_at is not None or self._call is not None:
            return
        self._call_at = now + self.profile.call_interval * self.rng.uniform(0.5, 1.5)

    def _place_call(self, now: float) -> None:
        targets = [t for t in self.profile.call_targets if t != self.user.uri]
        if not targets:
            return  # nobody to call: the caller stays quiet
        target = targets[self.rng.randrange(len(targets))]
        call_id = f"{self.rng.getrandbits(64):016x}@{self.user.user_part}"
        from_tag = f"{self.rng.getrandbits(32):08x}"
        host = self._local[0] if self._local else "127.0.0.1"
        try:
            request = self._request(
                "INVITE", target, target, call_id, 1, from_tag,
                headers=(("Contact", self._contact()), ("Content-Type", "application/sdp")),
                body=offer(host),
            )
        except ValueError:
            self._emit(CallFailed, reason="not a SIP URI", target=target, call_id=call_id,
                       status_code=None, elapsed=0.0, mode=self.mode)
            self._schedule_call(now)
            return
        key = self._start_tx(request, now)
        if key is None:
            self._schedule_call(now)
            return
        self._call = Call(target, call_id, from_tag, key, now)
        self._emit(CallPlaced, reason="INVITE sent", target=target, call_id=call_id,
                   mode=self.mode)

    def _in_dialog(self, call: Call, method: str, cseq: int) -> Request:
        routes = call.routes
        return self._request(
            method, call.remote_target, call.target, call.call_id, cseq, call.from_tag,
            to_tag=call.to_tag,
            headers=(("Route", ", ".join(routes)),) if routes else (),
        )

    def _on_call_response(self, key: TransactionKey, response: Response, now: float) -> None:
        call = self._call
        assert call is not None
        code = response.code
        if code < 200:
            return
        if key == call.bye_key:
            call.step(CallInput.BYE_ANSWERED)
            self._end_call(call, now, ok=code < 300, status=code,
                           reason=f"BYE: {code} {response.phrase}".strip())
            return
        if key != call.invite_key:
            return
        if 200 <= code < 300:
            if call.state is CallState.CALLING:
                call.answered(response, now, self.profile.call_hold)
                try:
                    ack: bytes | None = serialize(self._in_dialog(call, "ACK", 1))
                except ValueError:
                    ack = None
                call.ack = ack
                self._emit(CallAnswered, reason=f"{code} {response.phrase}".strip(),
                           target=call.target, call_id=call.call_id, status_code=code,
                           setup=now - call.placed, mode=self.mode)
            if call.ack is not None and self._conn_open:
                # The ACK of a 2xx is its own transaction: sent again for each 2xx.
                self._out.append(Send(self._conn, call.ack))
            return
        if call.state is CallState.CALLING:
            call.step(CallInput.REJECTED)
            self._call = None
            self._emit(CallFailed, reason=f"{code} {response.phrase}".strip(),
                       target=call.target, call_id=call.call_id, status_code=code,
                       elapsed=now - call.placed, mode=self.mode)
            self._schedule_call(now)
            if (code == 503 and self.profile.reregister_on_workload_503
                    and self.mode.registered):
                self._lose_service(now, Failure.SERVICE_UNAVAILABLE, "503 to a call", 503)

    def _call_gave_up(self, key: TransactionKey, now: float, reason: str) -> None:
        """A call's INVITE or BYE got no final answer."""
        call = self._call
        assert call is not None
        if key == call.invite_key and call.state is CallState.CALLING:
            call.step(CallInput.REJECTED)
            self._call = None
            self._emit(CallFailed, reason=reason, target=call.target, call_id=call.call_id,
                       status_code=None, elapsed=now - call.placed, mode=self.mode)
            self._schedule_call(now)
        elif key == call.bye_key and call.state is CallState.HANGING_UP:
            call.step(CallInput.BYE_ANSWERED)
            self._end_call(call, now, ok=False, status=None, reason=f"BYE: {reason}")

    def _hang_up(self, call: Call, now: float) -> None:
        call.step(CallInput.HOLD_OVER)
        call.cseq += 1
        try:
            bye: Request | None = self._in_dialog(call, "BYE", call.cseq)
        except ValueError:
            bye = None
        call.bye_key = self._start_tx(bye, now) if bye is not None else None
        if call.bye_key is None and self._call is call:
            call.step(CallInput.BYE_ANSWERED)
            self._end_call(call, now, ok=False, status=None, reason="BYE could not be sent")

    def _remote_bye(self, request: Request, now: float) -> None:
        call = self._call
        if call is None or request.headers.get("Call-ID") != call.call_id:
            return
        if call.state in (CallState.TALKING, CallState.HANGING_UP):
            call.step(CallInput.REMOTE_BYE)
            self._end_call(call, now, ok=True, status=None, reason="the callee hung up",
                           by_remote=True)

    def _lose_call(self, now: float) -> None:
        """The flow went: a call being set up failed, one in progress dropped."""
        call = self._call
        if call is None:
            return
        old = call.step(CallInput.FLOW_LOST)
        if old is CallState.CALLING:
            self._call = None
            self._emit(CallFailed, reason="flow closed", target=call.target,
                       call_id=call.call_id, status_code=None, elapsed=now - call.placed,
                       mode=self.mode)
        else:
            self._end_call(call, now, ok=False, status=None, reason="flow closed",
                           dropped=True)

    def _end_call(
        self, call: Call, now: float, *, ok: bool, status: int | None, reason: str,
        dropped: bool = False, by_remote: bool = False,
    ) -> None:
        self._call = None
        started = call.answered_at if call.answered_at is not None else now
        self._emit(CallEnded, reason=reason, target=call.target, call_id=call.call_id,
                   duration=now - started, ok=ok, status_code=status, dropped=dropped,
                   by_remote=by_remote)
        self._schedule_call(now)
