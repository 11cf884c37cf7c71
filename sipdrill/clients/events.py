"""What a simulated client reports: its modes and the events it emits.

Every event is a frozen dataclass with the user, the pool and the address
involved, a reason, and two timestamps: ``wall`` (Unix seconds, to line up
with other processes' logs) and ``monotonic`` (the clock the endpoint's
timers run on, to measure durations). :func:`event_to_dict` gives the JSON
form written one per line by the runner.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

__all__ = [
    "CallAnswered",
    "CallEnded",
    "CallFailed",
    "CallPlaced",
    "ClientEvent",
    "DnsLookup",
    "EndpointFault",
    "Failure",
    "Mode",
    "ModeChanged",
    "Nudged",
    "Redirected",
    "Registered",
    "RetryScheduled",
    "TargetFailed",
    "WorkloadResult",
    "event_to_dict",
    "event_to_json",
]


class Mode(enum.Enum):
    """What the user sees in the client."""

    SIGNED_OUT = "SignedOut"
    DISCOVERING = "Discovering"
    SIGNING_IN = "SigningIn"
    FULL_SERVICE = "FullService"
    RESILIENCY_MODE = "ResiliencyMode"
    BACKING_OFF = "BackingOff"

    @property
    def registered(self) -> bool:
        return self in (Mode.FULL_SERVICE, Mode.RESILIENCY_MODE)


class Failure(enum.Enum):
    """Why a target (a registrar address) or a registered flow failed."""

    #: No CRLF pong within the pong timeout (RFC 5626 4.4.1).
    PONG_TIMEOUT = "pong-timeout"
    #: The connection was reset or closed by the peer (or a send failed on it).
    RESET = "reset"
    #: The connection was refused (nothing listening).
    REFUSED = "refused"
    #: The connection or TLS handshake did not complete in time.
    CONNECT_TIMEOUT = "connect-timeout"
    #: The TLS handshake failed (certificate not trusted or wrong name).
    TLS = "tls"
    #: Timer B/F fired: no final response (RFC 3261 17.1).
    TRANSACTION_TIMEOUT = "transaction-timeout"
    #: 503 Service Unavailable (RFC 3263 4.3: try the next server).
    SERVICE_UNAVAILABLE = "503"
    #: Another final error (4xx-6xx but 503).
    REJECTED = "rejected"
    #: A registered client was sent elsewhere by a 301/302 to a refresh.
    REDIRECTED = "redirected"
    #: Too many redirects in one sign-in attempt.
    REDIRECT_LOOP = "redirect-loop"
    #: A redirect without a usable Contact, or a 2xx that makes no sense.
    BAD_RESPONSE = "bad-response"
    #: The target's name does not resolve, or is outside the SIP domain.
    BAD_TARGET = "bad-target"
    #: Connecting failed for another reason.
    UNREACHABLE = "unreachable"


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientEvent:
    """Common fields. ``pool`` is the registrar name involved (a pool FQDN, or
    the DNS name the client connected to), ``address`` its ``ip:port``."""

    KIND: ClassVar[str] = "ClientEvent"

    user: str
    wall: float
    monotonic: float
    pool: str | None = None
    address: str | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ModeChanged(ClientEvent):
    KIND: ClassVar[str] = "ModeChanged"

    old: Mode
    new: Mode
    trigger: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Registered(ClientEvent):
    """A 2xx to a REGISTER (initial or refresh).

    ``outage``: seconds since the client lost service (None when it had not:
    a first sign-in or a refresh). ``since_sign_in``: seconds since this
    sign-in attempt started (None for a refresh). ``front_end_move``: it came
    back on another front end of the pool it was on (``previous_pool``), not
    on another pool.
    """

    KIND: ClassVar[str] = "Registered"

    mode: Mode
    expires: int
    refresh: bool
    outage: float | None = None
    since_sign_in: float | None = None
    previous_pool: str | None = None
    #: The front end (``ip:port``) of the previous registration.
    previous_address: str | None = None
    #: Registered on another front end of the same pool as before: a
    #: front-end move, not a pool failover.
    front_end_move: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetFailed(ClientEvent):
    KIND: ClassVar[str] = "TargetFailed"

    failure: Failure
    status_code: int | None = None
    source: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Redirected(ClientEvent):
    KIND: ClassVar[str] = "Redirected"

    status_code: int
    targets: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class DnsLookup(ClientEvent):
    """A DNS answer the endpoint used (``cached``: it came from the cache)."""

    KIND: ClassVar[str] = "DnsLookup"

    qname: str
    rtype: str
    status: str
    answer: tuple[str, ...] = ()
    cached: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryScheduled(ClientEvent):
    """Every target failed: RFC 5626 4.5 backoff before the next attempt."""

    KIND: ClassVar[str] = "RetryScheduled"

    delay: float
    failures: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Nudged(ClientEvent):
    """The registrar asked the client to register again (a NOTIFY)."""

    KIND: ClassVar[str] = "Nudged"

    method: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadResult(ClientEvent):
    """One IM, presence subscription or conference join, and how it ended.

    ``status_code`` is the final response's, or None when none came
    (``reason`` says why: a timeout or a lost flow)."""

    KIND: ClassVar[str] = "WorkloadResult"

    kind: str
    target: str
    status_code: int | None
    ok: bool
    elapsed: float
    mode: Mode


@dataclass(frozen=True, slots=True, kw_only=True)
class CallPlaced(ClientEvent):
    """The ``call`` workload sent an INVITE (with SDP) to ``target``; ``mode``:
    the caller's mode then. One of :class:`CallAnswered` or :class:`CallFailed`
    follows for the same ``call_id``."""

    KIND: ClassVar[str] = "CallPlaced"

    target: str
    call_id: str
    mode: Mode


@dataclass(frozen=True, slots=True, kw_only=True)
class CallAnswered(ClientEvent):
    """A 2xx to the call's INVITE; ``setup``: seconds from the INVITE to it."""

    KIND: ClassVar[str] = "CallAnswered"

    target: str
    call_id: str
    status_code: int
    setup: float
    mode: Mode


@dataclass(frozen=True, slots=True, kw_only=True)
class CallFailed(ClientEvent):
    """The call's INVITE got a final 3xx-6xx (``status_code``), or none
    (None: a timeout or the flow lost; ``reason`` says which)."""

    KIND: ClassVar[str] = "CallFailed"

    target: str
    call_id: str
    status_code: int | None
    elapsed: float
    mode: Mode


@dataclass(frozen=True, slots=True, kw_only=True)
class CallEnded(ClientEvent):
    """An answered call is over: ``duration`` from the 2xx; ``ok`` when the BYE
    got a 2xx (``status_code``, None without an answer); ``dropped`` when the
    flow went before the BYE could be sent; ``by_remote`` when the callee hung up."""

    KIND: ClassVar[str] = "CallEnded"

    target: str
    call_id: str
    duration: float
    ok: bool
    status_code: int | None = None
    dropped: bool = False
    by_remote: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointFault(ClientEvent):
    """The endpoint hit a bug or an input it could not digest; it was reset."""

    KIND: ClassVar[str] = "EndpointFault"

    detail: str


_ATOMS = frozenset({str, int, float, bool})


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


_FIELDS: dict[type, tuple[str, ...]] = {}


def event_to_dict(event: ClientEvent, seq: int | None = None) -> dict[str, Any]:
    """The JSON-ready form: ``{"event": kind, "seq": n, ...fields}``."""
    out: dict[str, Any] = {"event": event.KIND}
    if seq is not None:
        out["seq"] = seq
    names = _FIELDS.get(type(event))
    if names is None:
        names = _FIELDS[type(event)] = tuple(f.name for f in fields(event))
    for name in names:
        value = getattr(event, name)
        out[name] = value if value is None or type(value) in _ATOMS else _plain(value)
    return out


# The generic form: json.dumps with separators builds a new JSONEncoder per call.
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
_STR = json.encoder.encode_basestring_ascii  # what _ENCODE does to a str, in C
_FLOAT = float.__repr__


def _json(value: Any) -> str:
    """``_ENCODE(_plain(value))``, without the encoder for the common atoms."""
    kind = type(value)
    if kind is str:
        return _STR(value)
    if value is None:
        return "null"
    if kind is float and value - value == 0.0:  # finite: the encoder writes repr()
        return _FLOAT(value)
    if kind is int:
        return int.__repr__(value)
    if kind is bool:
        return "true" if value else "false"
    if isinstance(value, enum.Enum) and type(value.value) is str:
        return _STR(value.value)
    return _ENCODE(_plain(value))


def _compile(cls: type[ClientEvent]) -> Callable[[ClientEvent, int | None], str]:
    """One event class's JSON line as a single expression (5 events a re-registration:
    the generic form took 4.1 us an event, this 2.3-2.6 us). Same text as the generic form;
    a value other than an atom or a string-valued enum takes the generic path."""
    head = '{"event":' + _STR(cls.KIND)
    terms = []
    for f in fields(cls):
        terms.append(f"{',' + _STR(f.name) + ':'!r} + _json(e.{f.name})")
    source = (
        "def encode(e, seq):\n"
        f"    head = {head!r} if seq is None else {head!r} + ',\"seq\":' + int.__repr__(seq)\n"
        f"    return head + {' + '.join(terms)} + '}}'\n"
    )
    namespace: dict[str, Any] = {"_json": _json}
    exec(source, namespace)  # built from the dataclass's own field names
    encode: Callable[[ClientEvent, int | None], str] = namespace["encode"]
    return encode


_ENCODERS: dict[type, Callable[[ClientEvent, int | None], str]] = {}


def event_to_json(event: ClientEvent, seq: int | None = None) -> str:
    """The JSON line of :func:`event_to_dict`, by a per-class encoder."""
    encode = _ENCODERS.get(type(event))
    if encode is None:
        encode = _ENCODERS[type(event)] = _compile(type(event))
    return encode(event, seq)
