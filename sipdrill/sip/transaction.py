"""RFC 3261 section 17 transactions (with the RFC 6026 Accepted state), sans-IO.

Every method takes ``now`` (seconds on any monotonic clock the caller
likes) and returns a list of events; the caller sends the bytes of every
:class:`Send`, hands responses and requests to its core, and calls
:meth:`TransactionManager.handle_timer` at :meth:`~TransactionManager.next_deadline`.

Each transaction kind is a declarative table ``(state, input) -> state``.
An input missing from the table raises :class:`TransactionStateError` and
changes nothing; that only happens on local misuse (the TU answering twice),
because every input the network can produce is listed, if only to be
absorbed. Timers are declared per state too: entering a state cancels the
timers that do not belong to it, so no action code has to remember to.
"""

from __future__ import annotations

import enum
import heapq
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from sipmessage import Request, Response, Via

from sipdrill.errors import SipError
from sipdrill.sip.message import serialize

__all__ = [
    "MAGIC_COOKIE",
    "ClientInviteTransaction",
    "ClientNonInviteTransaction",
    "ClientTransaction",
    "DeliverRequest",
    "DeliverResponse",
    "Peer",
    "Send",
    "ServerInviteTransaction",
    "ServerNonInviteTransaction",
    "ServerTransaction",
    "Timer",
    "TimerConfig",
    "TransactionError",
    "TransactionEvent",
    "TransactionKey",
    "TransactionManager",
    "TransactionStateError",
    "TransactionTerminated",
    "TransactionTimeout",
    "TransportError",
    "TxInput",
    "TxState",
    "is_failover_trigger",
    "make_ack",
    "new_branch",
    "rebranch",
    "server_key",
]

MAGIC_COOKIE = "z9hG4bK"

Peer = tuple[str, int]


@dataclass(frozen=True)
class TimerConfig:
    """RFC 3261 timer bases (seconds); every transaction timer derives from these."""

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0

    @property
    def timeout(self) -> float:
        """Timers B, F, H, J (unreliable), L, M: 64*T1."""
        return 64 * self.t1

    @property
    def timer_d(self) -> float:
        # RFC 3261 17.1.1.2: "at least 32 seconds"; with a short test T1 the
        # floor would dominate, so it scales with T1 instead.
        return 64 * self.t1


@dataclass
class TransactionError(SipError):
    """A transaction could not be created or driven (a local error, not the peer's)."""

    status_code: int = 500


@dataclass
class TransactionStateError(TransactionError):
    """An input the state table does not allow in the current state; nothing changed."""


@dataclass(frozen=True)
class TransactionKey:
    """RFC 3261 17.1.3 / 17.2.3 matching key.

    ``method`` is the CSeq method, except that ACK is filed under INVITE so
    it finds the INVITE server transaction it acknowledges. ``sent_by`` is
    empty for client transactions (the branch is ours, so it is unique).
    """

    branch: str
    method: str
    sent_by: str = ""


class TxState(enum.Enum):
    CALLING = "Calling"
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    CONFIRMED = "Confirmed"
    ACCEPTED = "Accepted"
    TERMINATED = "Terminated"


class Timer(enum.Enum):
    A = "A"
    B = "B"
    D = "D"
    E = "E"
    F = "F"
    G = "G"
    H = "H"
    I = "I"  # noqa: E741  (RFC 3261's name)
    J = "J"
    K = "K"
    L = "L"
    M = "M"


class TxInput(enum.Enum):
    RECV_1XX = "receive 1xx"
    RECV_2XX = "receive 2xx"
    RECV_FINAL = "receive 300-699"
    RECV_REQUEST = "receive request retransmission"
    RECV_ACK = "receive ACK"
    TU_1XX = "send 1xx"
    TU_2XX = "send 2xx"
    TU_FINAL = "send 300-699"
    TRANSPORT_ERROR = "transport error"
    TIMER_A = "Timer A"
    TIMER_B = "Timer B"
    TIMER_D = "Timer D"
    TIMER_E = "Timer E"
    TIMER_F = "Timer F"
    TIMER_G = "Timer G"
    TIMER_H = "Timer H"
    TIMER_I = "Timer I"
    TIMER_J = "Timer J"
    TIMER_K = "Timer K"
    TIMER_L = "Timer L"
    TIMER_M = "Timer M"


_TIMER_INPUT = {timer: TxInput[f"TIMER_{timer.value}"] for timer in Timer}


# --- events -----------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Bytes to put on the wire towards ``peer`` (the transaction's destination or source)."""

    key: TransactionKey
    data: bytes
    peer: Peer | None


@dataclass(frozen=True)
class DeliverResponse:
    """A response for the TU. ``key`` is None for a stray response (RFC 3261 18.1.2)."""

    key: TransactionKey | None
    response: Response


@dataclass(frozen=True)
class DeliverRequest:
    """A new request for the TU. ``key`` is None for an ACK that matches no transaction
    (the ACK of a 2xx, which is its own transaction)."""

    key: TransactionKey | None
    request: Request
    peer: Peer | None


@dataclass(frozen=True)
class TransactionTimeout:
    """Timer B or F (client: no final response) or H (server: no ACK) fired."""

    key: TransactionKey
    timer: Timer


@dataclass(frozen=True)
class TransportError:
    """The transport could not send for this transaction (RFC 3261 17.1.4)."""

    key: TransactionKey
    reason: str


@dataclass(frozen=True)
class TransactionTerminated:
    """The transaction reached Terminated and was forgotten."""

    key: TransactionKey


TransactionEvent = (
    Send
    | DeliverResponse
    | DeliverRequest
    | TransactionTimeout
    | TransportError
    | TransactionTerminated
)


def is_failover_trigger(event: TransactionEvent) -> bool:
    """RFC 3263 4.3: try the next server after a 503, a transport error or a client timeout."""
    if isinstance(event, TransportError):
        return True
    if isinstance(event, TransactionTimeout):
        return event.timer in (Timer.B, Timer.F)
    return isinstance(event, DeliverResponse) and event.response.code == 503


# --- branches and helper requests ------------------------------------------------


def new_branch(rng: random.Random) -> str:
    """An RFC 3261 branch: the magic cookie and 64 random bits from the injected RNG."""
    return f"{MAGIC_COOKIE}{rng.getrandbits(64):016x}"


def _copy_request(request: Request) -> Request:
    copy = Request(method=request.method, uri=request.uri, body=request.body)
    # sipmessage.Headers has keys() but is not iterable.
    for name in request.headers.keys():  # noqa: SIM118
        copy.headers.setlist(name, list(request.headers.getlist(name)))
    return copy


def rebranch(request: Request, branch: str) -> Request:
    """A copy of ``request`` whose top Via carries ``branch``: the same request as a new
    transaction, as RFC 3263 4.3 wants when failing over to the next target."""
    copy = _copy_request(request)
    vias = copy.via
    if not vias:
        raise TransactionError(reason="Request has no Via")
    top = vias[0]
    vias[0] = Via(top.transport, top.host, top.port, top.parameters.replace(branch=branch))
    copy.via = vias
    return copy


def make_ack(request: Request, response: Response) -> Request:
    """The ACK for a 300-699 answer to ``request`` (RFC 3261 17.1.1.3): same branch."""
    ack = Request(method="ACK", uri=request.uri)
    h = ack.headers
    h.set("Via", request.headers.getlist("Via")[0])
    h.set("Max-Forwards", "70")
    h.set("From", request.headers.get("From", "") or "")
    h.set("To", response.headers.get("To", "") or "")
    h.set("Call-ID", request.headers.get("Call-ID", "") or "")
    h.set("CSeq", f"{request.cseq.sequence} ACK")
    routes = request.headers.getlist("Route")
    if routes:
        h.setlist("Route", list(routes))
    return ack


def _branch_key(message: Request | Response, *, server: bool) -> TransactionKey:
    try:
        top = message.via[0]
        cseq = message.cseq
    except (ValueError, IndexError, KeyError):
        raise TransactionError(
            reason="Message without a usable Via or CSeq", status_code=400
        ) from None
    method = "INVITE" if cseq.method == "ACK" else cseq.method
    branch = top.parameters.get("branch") or ""
    sent_by = f"{top.host}:{top.port or ''}" if server else ""
    if not branch.startswith(MAGIC_COOKIE):
        # RFC 2543 peers: no unique branch. Call-ID, CSeq number and From tag
        # identify the transaction well enough, and the ACK shares all three.
        try:
            from_tag = message.from_address.parameters.get("tag") or ""
        except (ValueError, KeyError):
            from_tag = ""
        branch = f"legacy:{message.headers.get('Call-ID')}:{cseq.sequence}:{from_tag}:{branch}"
    return TransactionKey(branch=branch, method=method, sent_by=sent_by)


def server_key(request: Request) -> TransactionKey:
    """The key of the server transaction ``request`` belongs to (RFC 3261
    17.2.3): a TU that answers later, or a CANCEL looking for its INVITE
    (``dataclasses.replace(key, method="INVITE")``), needs it."""
    return _branch_key(request, server=True)


def _response_input(code: int) -> TxInput:
    if code < 200:
        return TxInput.RECV_1XX
    if code < 300:
        return TxInput.RECV_2XX
    return TxInput.RECV_FINAL


def _tu_input(code: int) -> TxInput:
    if code < 200:
        return TxInput.TU_1XX
    if code < 300:
        return TxInput.TU_2XX
    return TxInput.TU_FINAL


# --- the state machines ------------------------------------------------------------

S = TxState
I = TxInput  # noqa: E741


class _Transaction:
    TABLE: ClassVar[Mapping[tuple[TxState, TxInput], TxState]]
    TIMERS: ClassVar[Mapping[TxState, frozenset[Timer]]]
    INITIAL: ClassVar[TxState]

    def __init__(
        self, key: TransactionKey, config: TimerConfig, reliable: bool, peer: Peer | None
    ) -> None:
        self.key = key
        self.config = config
        self.reliable = reliable
        self.peer = peer
        self.state = self.INITIAL
        self._deadlines: dict[Timer, float] = {}
        self._intervals: dict[Timer, float] = {}
        # The deadline last filed in the manager's heap, to avoid duplicates.
        self.filed_deadline: float | None = None

    @property
    def terminated(self) -> bool:
        return self.state is TxState.TERMINATED

    def next_deadline(self) -> float | None:
        return min(self._deadlines.values(), default=None)

    def deadlines(self) -> dict[Timer, float]:
        """The pending timers, for tests and for the curious."""
        return dict(self._deadlines)

    def _transition(self, inp: TxInput) -> TxState:
        """Move to the table's next state and return the previous one."""
        new = self.TABLE.get((self.state, inp))
        if new is None:
            raise TransactionStateError(
                reason=f"{type(self).__name__}: {inp.value} not allowed in {self.state.value}"
            )
        old, self.state = self.state, new
        keep = self.TIMERS.get(new, frozenset())
        for timer in [t for t in self._deadlines if t not in keep]:
            del self._deadlines[timer]
        return old

    def _start_timer(self, timer: Timer, now: float, interval: float) -> None:
        self._intervals[timer] = interval
        self._deadlines[timer] = now + interval

    def _send(self, data: bytes) -> Send:
        return Send(self.key, data, self.peer)

    def handle_timer(self, now: float) -> list[TransactionEvent]:
        events: list[TransactionEvent] = []
        while self._deadlines:
            timer, deadline = min(self._deadlines.items(), key=lambda item: item[1])
            if deadline > now:
                break
            del self._deadlines[timer]
            old = self._transition(_TIMER_INPUT[timer])
            events += self._on_timer(timer, old, now)
        return events

    def _on_timer(self, timer: Timer, old: TxState, now: float) -> list[TransactionEvent]:
        raise NotImplementedError

    def _zero_timers(self, now: float) -> list[TransactionEvent]:
        # Timers that are 0 on reliable transports (D, I, J, K) fire at once,
        # so the caller does not need a handle_timer call to finish.
        return self.handle_timer(now)


class ClientTransaction(_Transaction):
    """Shared by both client kinds: the request and its retransmission."""

    def __init__(
        self,
        request: Request,
        config: TimerConfig,
        reliable: bool,
        peer: Peer | None,
    ) -> None:
        key = _branch_key(request, server=False)
        if not key.branch.startswith(MAGIC_COOKIE):
            raise TransactionError(reason="Client request needs a z9hG4bK branch")
        super().__init__(key, config, reliable, peer)
        self.request = request
        self.data = serialize(request)
        self.last_response: Response | None = None

    @staticmethod
    def create(
        request: Request,
        config: TimerConfig = TimerConfig(),
        *,
        reliable: bool,
        peer: Peer | None = None,
    ) -> ClientTransaction:
        if request.method == "ACK":
            raise TransactionError(reason="ACK is sent without a client transaction")
        kind = ClientInviteTransaction if request.method == "INVITE" else ClientNonInviteTransaction
        return kind(request, config, reliable, peer)

    def start(self, now: float) -> list[TransactionEvent]:
        raise NotImplementedError

    def receive_response(self, response: Response, now: float) -> list[TransactionEvent]:
        raise NotImplementedError

    def transport_error(self, reason: str, now: float) -> list[TransactionEvent]:
        old = self._transition(TxInput.TRANSPORT_ERROR)
        if old in (TxState.CALLING, TxState.TRYING, TxState.PROCEEDING):
            return [TransportError(self.key, reason)]
        return []


class ClientInviteTransaction(ClientTransaction):
    """RFC 3261 17.1.1 with RFC 6026's Accepted state (2xx retransmissions reach the TU)."""

    INITIAL = S.CALLING
    TABLE: ClassVar[Mapping[tuple[TxState, TxInput], TxState]] = {
        (S.CALLING, I.TIMER_A): S.CALLING,
        (S.CALLING, I.TIMER_B): S.TERMINATED,
        (S.CALLING, I.RECV_1XX): S.PROCEEDING,
        (S.CALLING, I.RECV_2XX): S.ACCEPTED,
        (S.CALLING, I.RECV_FINAL): S.COMPLETED,
        (S.CALLING, I.TRANSPORT_ERROR): S.TERMINATED,
        (S.PROCEEDING, I.RECV_1XX): S.PROCEEDING,
        (S.PROCEEDING, I.RECV_2XX): S.ACCEPTED,
        (S.PROCEEDING, I.RECV_FINAL): S.COMPLETED,
        (S.PROCEEDING, I.TRANSPORT_ERROR): S.TERMINATED,
        (S.COMPLETED, I.RECV_1XX): S.COMPLETED,
        (S.COMPLETED, I.RECV_2XX): S.COMPLETED,
        (S.COMPLETED, I.RECV_FINAL): S.COMPLETED,
        (S.COMPLETED, I.TIMER_D): S.TERMINATED,
        (S.COMPLETED, I.TRANSPORT_ERROR): S.TERMINATED,
        (S.ACCEPTED, I.RECV_1XX): S.ACCEPTED,
        (S.ACCEPTED, I.RECV_2XX): S.ACCEPTED,
        (S.ACCEPTED, I.RECV_FINAL): S.ACCEPTED,
        (S.ACCEPTED, I.TIMER_M): S.TERMINATED,
        (S.ACCEPTED, I.TRANSPORT_ERROR): S.ACCEPTED,
    }
    TIMERS: ClassVar[Mapping[TxState, frozenset[Timer]]] = {
        S.CALLING: frozenset({Timer.A, Timer.B}),
        S.COMPLETED: frozenset({Timer.D}),
        S.ACCEPTED: frozenset({Timer.M}),
    }

    def start(self, now: float) -> list[TransactionEvent]:
        if not self.reliable:
            self._start_timer(Timer.A, now, self.config.t1)
        self._start_timer(Timer.B, now, self.config.timeout)
        return [self._send(self.data)]

    def receive_response(self, response: Response, now: float) -> list[TransactionEvent]:
        inp = _response_input(response.code)
        old = self._transition(inp)
        if self.state is TxState.COMPLETED:
            if old is TxState.COMPLETED and inp is not TxInput.RECV_FINAL:
                return []
            ack = self._send(serialize(make_ack(self.request, response)))
            if old is TxState.COMPLETED:
                return [ack]  # a retransmitted final: ACK again, the TU already knows
            self.last_response = response
            self._start_timer(Timer.D, now, 0.0 if self.reliable else self.config.timer_d)
            return [ack, DeliverResponse(self.key, response), *self._zero_timers(now)]
        if self.state is TxState.ACCEPTED:
            if inp is not TxInput.RECV_2XX:
                return []
            if old is not TxState.ACCEPTED:
                self._start_timer(Timer.M, now, self.config.timeout)
        self.last_response = response
        return [DeliverResponse(self.key, response)]

    def _on_timer(self, timer: Timer, old: TxState, now: float) -> list[TransactionEvent]:
        if timer is Timer.A:
            # Timer A doubles without the T2 cap that Timer E has (17.1.1.2).
            self._start_timer(Timer.A, now, 2 * self._intervals[Timer.A])
            return [self._send(self.data)]
        if timer is Timer.B:
            return [TransactionTimeout(self.key, Timer.B)]
        return []


class ClientNonInviteTransaction(ClientTransaction):
    """RFC 3261 17.1.2."""

    INITIAL = S.TRYING
    TABLE: ClassVar[Mapping[tuple[TxState, TxInput], TxState]] = {
        (S.TRYING, I.TIMER_E): S.TRYING,
        (S.TRYING, I.TIMER_F): S.TERMINATED,
        (S.TRYING, I.RECV_1XX): S.PROCEEDING,
        (S.TRYING, I.RECV_2XX): S.COMPLETED,
        (S.TRYING, I.RECV_FINAL): S.COMPLETED,
        (S.TRYING, I.TRANSPORT_ERROR): S.TERMINATED,
        (S.PROCEEDING, I.TIMER_E): S.PROCEEDING,
        (S.PROCEEDING, I.TIMER_F): S.TERMINATED,
        (S.PROCEEDING, I.RECV_1XX): S.PROCEEDING,
        (S.PROCEEDING, I.RECV_2XX): S.COMPLETED,
        (S.PROCEEDING, I.RECV_FINAL): S.COMPLETED,
        (S.PROCEEDING, I.TRANSPORT_ERROR): S.TERMINATED,
        (S.COMPLETED, I.RECV_1XX): S.COMPLETED,
        (S.COMPLETED, I.RECV_2XX): S.COMPLETED,
        (S.COMPLETED, I.RECV_FINAL): S.COMPLETED,
        (S.COMPLETED, I.TIMER_K): S.TERMINATED,
        (S.COMPLETED, I.TRANSPORT_ERROR): S.TERMINATED,
    }
    TIMERS: ClassVar[Mapping[TxState, frozenset[Timer]]] = {
        S.TRYING: frozenset({Timer.E, Timer.F}),
        S.PROCEEDING: frozenset({Timer.E, Timer.F}),
        S.COMPLETED: frozenset({Timer.K}),
    }

    def start(self, now: float) -> list[TransactionEvent]:
        if not self.reliable:
            self._start_timer(Timer.E, now, self.config.t1)
        self._start_timer(Timer.F, now, self.config.timeout)
        return [self._send(self.data)]

    def receive_response(self, response: Response, now: float) -> list[TransactionEvent]:
        old = self._transition(_response_input(response.code))
        if old is TxState.COMPLETED:
            return []  # retransmissions of the final response are absorbed
        self.last_response = response
        events: list[TransactionEvent] = [DeliverResponse(self.key, response)]
        if self.state is TxState.COMPLETED:
            self._start_timer(Timer.K, now, 0.0 if self.reliable else self.config.t4)
            events += self._zero_timers(now)
        return events

    def _on_timer(self, timer: Timer, old: TxState, now: float) -> list[TransactionEvent]:
        if timer is Timer.E:
            if self.state is TxState.PROCEEDING:
                interval = self.config.t2
            else:
                interval = min(2 * self._intervals[Timer.E], self.config.t2)
            self._start_timer(Timer.E, now, interval)
            return [self._send(self.data)]
        if timer is Timer.F:
            return [TransactionTimeout(self.key, Timer.F)]
        return []


class ServerTransaction(_Transaction):
    """Shared by both server kinds: the request and the last response sent."""

    def __init__(
        self,
        request: Request | None,
        config: TimerConfig,
        reliable: bool,
        peer: Peer | None,
        key: TransactionKey | None = None,
    ) -> None:
        if key is None:
            if request is None:
                raise TransactionError(reason="a server transaction needs its request or key")
            key = _branch_key(request, server=True)
        super().__init__(key, config, reliable, peer)
        # Held until start() hands it to the TU: a UDP transaction lives on for
        # 32 s (Timer J) answering retransmissions from last_response, and tens
        # of thousands of parsed requests kept that long only fed the collector.
        self.request: Request | None = request
        self.last_response: bytes | None = None

    @staticmethod
    def create(
        request: Request,
        config: TimerConfig = TimerConfig(),
        *,
        reliable: bool,
        peer: Peer | None = None,
        key: TransactionKey | None = None,
    ) -> ServerTransaction:
        """``key``: the request's key when the caller has computed it already."""
        if request.method == "ACK":
            raise TransactionError(reason="ACK does not create a server transaction")
        kind = ServerInviteTransaction if request.method == "INVITE" else ServerNonInviteTransaction
        return kind(request, config, reliable, peer, key)

    def start(self, now: float) -> list[TransactionEvent]:
        request, self.request = self.request, None
        if request is None:
            raise TransactionStateError(reason="server transaction started twice")
        return [DeliverRequest(self.key, request, self.peer)]

    def receive_request(self, request: Request, now: float) -> list[TransactionEvent]:
        """A retransmission (or, for INVITE, the ACK) matched this transaction."""
        inp = TxInput.RECV_ACK if request.method == "ACK" else TxInput.RECV_REQUEST
        old = self._transition(inp)
        return self._on_request(inp, old, request, now)

    def _on_request(
        self, inp: TxInput, old: TxState, request: Request, now: float
    ) -> list[TransactionEvent]:
        if inp is TxInput.RECV_REQUEST and self.last_response is not None:
            return [self._send(self.last_response)]
        return []

    def send_response(self, response: Response, now: float) -> list[TransactionEvent]:
        return self.send_encoded(response.code, serialize(response), now)

    def send_encoded(self, code: int, data: bytes, now: float) -> list[TransactionEvent]:
        """:meth:`send_response` for a response already serialized (status ``code``)."""
        old = self._transition(_tu_input(code))
        self.last_response = data
        return [self._send(data), *self._after_response(old, now)]

    def _after_response(self, old: TxState, now: float) -> list[TransactionEvent]:
        raise NotImplementedError

    def transport_error(self, reason: str, now: float) -> list[TransactionEvent]:
        # Once the ACK (or, for a 2xx, the TU) has taken over, a late send
        # failure changes nothing worth reporting.
        self._transition(TxInput.TRANSPORT_ERROR)
        return [TransportError(self.key, reason)] if self.terminated else []


class ServerInviteTransaction(ServerTransaction):
    """RFC 3261 17.2.1 with RFC 6026's Accepted state."""

    INITIAL = S.PROCEEDING
    TABLE: ClassVar[Mapping[tuple[TxState, TxInput], TxState]] = {
        (S.PROCEEDING, I.RECV_REQUEST): S.PROCEEDING,
        (S.PROCEEDING, I.RECV_ACK): S.PROCEEDING,
        (S.PROCEEDING, I.TU_1XX): S.PROCEEDING,
        (S.PROCEEDING, I.TU_2XX): S.ACCEPTED,
        (S.PROCEEDING, I.TU_FINAL): S.COMPLETED,
        (S.PROCEEDING, I.TRANSPORT_ERROR): S.TERMINATED,
        (S.COMPLETED, I.RECV_REQUEST): S.COMPLETED,
        (S.COMPLETED, I.RECV_ACK): S.CONFIRMED,
        (S.COMPLETED, I.TIMER_G): S.COMPLETED,
        (S.COMPLETED, I.TIMER_H): S.TERMINATED,
        (S.COMPLETED, I.TRANSPORT_ERROR): S.TERMINATED,
        (S.CONFIRMED, I.RECV_REQUEST): S.CONFIRMED,
        (S.CONFIRMED, I.RECV_ACK): S.CONFIRMED,
        (S.CONFIRMED, I.TIMER_I): S.TERMINATED,
        (S.CONFIRMED, I.TRANSPORT_ERROR): S.CONFIRMED,
        (S.ACCEPTED, I.RECV_REQUEST): S.ACCEPTED,
        (S.ACCEPTED, I.RECV_ACK): S.ACCEPTED,
        (S.ACCEPTED, I.TU_2XX): S.ACCEPTED,
        (S.ACCEPTED, I.TIMER_L): S.TERMINATED,
        (S.ACCEPTED, I.TRANSPORT_ERROR): S.ACCEPTED,
    }
    TIMERS: ClassVar[Mapping[TxState, frozenset[Timer]]] = {
        S.COMPLETED: frozenset({Timer.G, Timer.H}),
        S.CONFIRMED: frozenset({Timer.I}),
        S.ACCEPTED: frozenset({Timer.L}),
    }

    def start(self, now: float) -> list[TransactionEvent]:
        # 17.2.1: a 100 at once spares the client its INVITE retransmissions,
        # whatever the TU takes to answer.
        trying = Response(100, "Trying")
        assert self.request is not None
        for name in ("Via", "From", "To", "Call-ID", "CSeq"):
            trying.headers.setlist(name, list(self.request.headers.getlist(name)))
        data = serialize(trying)
        self.last_response = data
        return [self._send(data), *super().start(now)]

    def _on_request(
        self, inp: TxInput, old: TxState, request: Request, now: float
    ) -> list[TransactionEvent]:
        if self.state is TxState.ACCEPTED:
            # RFC 6026 8.7: retransmissions are absorbed, the ACK of the 2xx
            # belongs to the TU.
            if inp is TxInput.RECV_ACK:
                return [DeliverRequest(self.key, request, self.peer)]
            return []
        if inp is TxInput.RECV_ACK:
            if old is TxState.COMPLETED:
                self._start_timer(Timer.I, now, 0.0 if self.reliable else self.config.t4)
                return self._zero_timers(now)
            return []
        if self.state is TxState.CONFIRMED:
            return []
        return super()._on_request(inp, old, request, now)

    def _after_response(self, old: TxState, now: float) -> list[TransactionEvent]:
        if self.state is TxState.COMPLETED:
            if not self.reliable:
                self._start_timer(Timer.G, now, self.config.t1)
            self._start_timer(Timer.H, now, self.config.timeout)
        elif self.state is TxState.ACCEPTED and old is not TxState.ACCEPTED:
            self._start_timer(Timer.L, now, self.config.timeout)
        return []

    def _on_timer(self, timer: Timer, old: TxState, now: float) -> list[TransactionEvent]:
        if timer is Timer.G:
            self._start_timer(Timer.G, now, min(2 * self._intervals[Timer.G], self.config.t2))
            assert self.last_response is not None
            return [self._send(self.last_response)]
        if timer is Timer.H:
            return [TransactionTimeout(self.key, Timer.H)]
        return []


class ServerNonInviteTransaction(ServerTransaction):
    """RFC 3261 17.2.2."""

    INITIAL = S.TRYING
    TABLE: ClassVar[Mapping[tuple[TxState, TxInput], TxState]] = {
        (S.TRYING, I.RECV_REQUEST): S.TRYING,
        (S.TRYING, I.TU_1XX): S.PROCEEDING,
        (S.TRYING, I.TU_2XX): S.COMPLETED,
        (S.TRYING, I.TU_FINAL): S.COMPLETED,
        (S.TRYING, I.TRANSPORT_ERROR): S.TERMINATED,
        (S.PROCEEDING, I.RECV_REQUEST): S.PROCEEDING,
        (S.PROCEEDING, I.TU_1XX): S.PROCEEDING,
        (S.PROCEEDING, I.TU_2XX): S.COMPLETED,
        (S.PROCEEDING, I.TU_FINAL): S.COMPLETED,
        (S.PROCEEDING, I.TRANSPORT_ERROR): S.TERMINATED,
        (S.COMPLETED, I.RECV_REQUEST): S.COMPLETED,
        (S.COMPLETED, I.TIMER_J): S.TERMINATED,
        (S.COMPLETED, I.TRANSPORT_ERROR): S.TERMINATED,
    }
    TIMERS: ClassVar[Mapping[TxState, frozenset[Timer]]] = {
        S.COMPLETED: frozenset({Timer.J}),
    }

    def _after_response(self, old: TxState, now: float) -> list[TransactionEvent]:
        if self.state is TxState.COMPLETED:
            self._start_timer(Timer.J, now, 0.0 if self.reliable else self.config.timeout)
            return self._zero_timers(now)
        return []

    def _on_timer(self, timer: Timer, old: TxState, now: float) -> list[TransactionEvent]:
        return []


# --- the manager ----------------------------------------------------------------------


class TransactionManager:
    """All transactions of one SIP endpoint, matched by RFC 3261 17.1.3 / 17.2.3 keys.

    Deadlines sit in a heap with lazy deletion, so next_deadline() and
    handle_timer() stay O(log n) with tens of thousands of transactions.
    """

    def __init__(self, rng: random.Random, config: TimerConfig = TimerConfig()) -> None:
        self.rng = rng
        self.config = config
        self._client: dict[TransactionKey, ClientTransaction] = {}
        self._server: dict[TransactionKey, ServerTransaction] = {}
        self._heap: list[tuple[float, int, TransactionKey, bool]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._client) + len(self._server)

    def new_branch(self) -> str:
        return new_branch(self.rng)

    def client(self, key: TransactionKey) -> ClientTransaction | None:
        return self._client.get(key)

    def server(self, key: TransactionKey) -> ServerTransaction | None:
        return self._server.get(key)

    # -- client side --

    def send_request(
        self, request: Request, now: float, *, reliable: bool, peer: Peer | None = None
    ) -> tuple[TransactionKey, list[TransactionEvent]]:
        """Start a client transaction; the top Via must carry a fresh z9hG4bK branch."""
        tx = ClientTransaction.create(request, self.config, reliable=reliable, peer=peer)
        if tx.key in self._client:
            raise TransactionError(reason=f"Branch {tx.key.branch} already in use")
        self._client[tx.key] = tx
        return tx.key, self._after(tx, tx.start(now), client=True)

    def receive_response(self, response: Response, now: float) -> list[TransactionEvent]:
        try:
            key = _branch_key(response, server=False)
        except TransactionError:
            return []
        tx = self._client.get(key)
        if tx is None:
            return [DeliverResponse(None, response)]
        return self._after(tx, tx.receive_response(response, now), client=True)

    # -- server side --

    def receive_request(
        self, request: Request, now: float, *, reliable: bool, peer: Peer | None = None
    ) -> list[TransactionEvent]:
        """A request from the network: a new transaction, a retransmission, or an ACK."""
        key = _branch_key(request, server=True)
        tx = self._server.get(key)
        if tx is not None:
            if request.method == "ACK" and not isinstance(tx, ServerInviteTransaction):
                return [DeliverRequest(None, request, peer)]
            return self._after(tx, tx.receive_request(request, now), client=False)
        if request.method == "ACK":
            return [DeliverRequest(None, request, peer)]
        tx = ServerTransaction.create(request, self.config, reliable=reliable, peer=peer, key=key)
        self._server[key] = tx
        return self._after(tx, tx.start(now), client=False)

    def answered(
        self,
        key: TransactionKey,
        code: int,
        data: bytes,
        now: float,
        *,
        reliable: bool,
        peer: Peer | None = None,
    ) -> list[TransactionEvent]:
        """A new non-INVITE request (``key``) its TU answered as it arrived, with ``data``
        (status ``code``): the server transaction :meth:`receive_request` and
        :meth:`send_response` would leave, filed without the parsed request
        (the registrar's fast path never builds one). Its retransmissions are
        answered from it, as any other's."""
        if key in self._server:
            raise TransactionError(reason=f"Server transaction {key} already exists")
        if key.method in ("INVITE", "ACK"):
            raise TransactionError(reason="answered() is for non-INVITE requests")
        tx = ServerNonInviteTransaction(None, self.config, reliable, peer, key)
        self._server[key] = tx
        return self._after(tx, tx.send_encoded(code, data, now), client=False)

    def send_response(
        self, key: TransactionKey, response: Response, now: float
    ) -> list[TransactionEvent]:
        tx = self._server.get(key)
        if tx is None:
            raise TransactionStateError(reason=f"No server transaction {key}")
        return self._after(tx, tx.send_response(response, now), client=False)

    # -- both --

    def transport_error(
        self, key: TransactionKey, reason: str, now: float
    ) -> list[TransactionEvent]:
        """The transport failed to send something a transaction asked for."""
        client = self._client.get(key)
        if client is not None:
            return self._after(client, client.transport_error(reason, now), client=True)
        server = self._server.get(key)
        if server is not None:
            return self._after(server, server.transport_error(reason, now), client=False)
        return []

    def next_deadline(self) -> float | None:
        while self._heap:
            deadline, _, key, client = self._heap[0]
            tx = (self._client if client else self._server).get(key)
            if tx is not None and tx.next_deadline() == deadline:
                return deadline
            heapq.heappop(self._heap)  # stale: the timer moved or the transaction ended
        return None

    def handle_timer(self, now: float) -> list[TransactionEvent]:
        events: list[TransactionEvent] = []
        while True:
            deadline = self.next_deadline()
            if deadline is None or deadline > now:
                return events
            _, _, key, client = heapq.heappop(self._heap)
            tx: _Transaction | None = (self._client if client else self._server).get(key)
            assert tx is not None
            tx.filed_deadline = None
            events += self._after(tx, tx.handle_timer(now), client=client)

    def _after(
        self, tx: _Transaction, events: list[TransactionEvent], *, client: bool
    ) -> list[TransactionEvent]:
        if tx.terminated:
            (self._client if client else self._server).pop(tx.key, None)
            events.append(TransactionTerminated(tx.key))
            return events
        deadline = tx.next_deadline()
        if deadline is not None and deadline != tx.filed_deadline:
            tx.filed_deadline = deadline
            self._seq += 1
            heapq.heappush(self._heap, (deadline, self._seq, tx.key, client))
        return events
