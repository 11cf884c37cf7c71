"""The asyncio adapter that owns sockets and the clock for the sans-IO SIP core.

It is deliberately thin: it cuts bytes into messages (``framing``), parses
them (``message``), and hands each one to a synchronous handler as a
:class:`Received` (message, transport kind, remote address and a
:class:`Flow` handle). Whoever handles it answers with
:meth:`SipTransport.send` on the same flow. Everything protocol-level
(transactions, registrar, digest) lives in the core, driven through
:class:`TimerDriver` with ``loop.time()``.

What the adapter enforces itself, because only it sees the sockets:

* garbage on a stream gets a 400 (513 when too large) when the sender can be
  answered, then the connection is closed; bad datagrams are answered the
  same way and dropped;
* a stream that stalls mid-message (``partial_timeout``) or goes silent
  (``idle_timeout``) is closed; a peer that does not read its responses
  (``max_write_buffer``) is closed;
* at most ``max_connections`` streams are open at once;
* CRLFCRLF pings on streams are answered with a CRLF pong (RFC 5626 4.4.1);
* an outbound message to a peer reuses an open flow to that peer
  (RFC 3261 18.1.1, RFC 5626), for connections we opened and accepted alike;
* RFC 3261 18.2.1 / RFC 3581: ``received`` and ``rport`` are stamped on the
  top Via of requests when needed;
* a TLS flow carries the DNS names of the certificate its peer presented and
  this side verified (:attr:`Flow.peer_names`): who the peer is, for whoever
  decides what that peer may do (the pool's trust in its partner, for one).

Nothing raises out of the adapter's callbacks: errors are logged and the
message or connection dropped.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import enum
import itertools
import logging
import math
import re
import socket
import ssl
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Protocol, cast

from sipmessage import Request

from sipdrill.errors import SipdrillError
from sipdrill.sip import shard
from sipdrill.sip.framing import (
    FramerRole,
    FramingError,
    KeepAlivePing,
    KeepAlivePong,
    MessageBytes,
    StreamFramer,
    classify_datagram,
)
from sipdrill.sip.message import (
    DEFAULT_LIMITS,
    Limits,
    MalformedResponse,
    Message,
    SipMessageError,
    SipParseError,
    best_effort_400,
    parse_message,
    serialize,
)
from sipdrill.sip.tls import peer_dns_names

__all__ = [
    "Addr",
    "Flow",
    "Kind",
    "Received",
    "SipTransport",
    "TimerCore",
    "TimerDriver",
    "TransportError",
    "TransportLimits",
    "Unreadable",
    "limit_tls_read_buffers",
    "read_message",
    "stamped_via",
]

log = logging.getLogger("sipdrill.sip.transport")

try:  # optional recvmmsg/sendmmsg (ext/mmsg, built by `make install`)
    import sipdrill_mmsg as _mmsg
except ImportError:
    _mmsg = None

Addr = tuple[str, int]


class Kind(enum.StrEnum):
    UDP = "udp"
    TCP = "tcp"
    TLS = "tls"

    @property
    def reliable(self) -> bool:
        return self is not Kind.UDP

    @property
    def via(self) -> str:
        """The Via transport token (RFC 3261 20.42)."""
        return self.value.upper()


@dataclass(frozen=True, slots=True)
class Flow:
    """A handle on one flow: a stream connection, or (UDP socket, remote address).

    It is a plain value (hashable, comparable, safe to keep in the core);
    sending on a flow whose connection has gone returns ``False``.
    ``conn`` is the serial of the connection or UDP socket in this transport.

    ``peer_names``: on TLS, the DNS names (subjectAltName) of the certificate
    the peer presented in the handshake and this side verified against its
    trust store: a client certificate on a connection we accepted, the
    server's on one we opened. Empty when the peer presented none, and on
    TCP and UDP. Never names from an unverified certificate: such a
    handshake fails. Not part of equality (the connection's serial is).
    """

    kind: Kind
    local: Addr
    remote: Addr
    conn: int
    peer_names: tuple[str, ...] = field(default=(), compare=False)

    @property
    def reliable(self) -> bool:
        return self.kind.reliable


@dataclass(frozen=True, slots=True)
class Received:
    """One parsed message as the transport delivers it."""

    message: Message
    kind: Kind
    remote: Addr
    flow: Flow


@dataclass
class TransportError(SipdrillError):
    """A listener or an outbound connection could not be set up."""

    kind: str
    address: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.address}: {self.message}"


@dataclass(frozen=True)
class TransportLimits:
    """Resource limits of the adapter (message-level limits are ``message``)."""

    message: Limits = DEFAULT_LIMITS
    max_connections: int = 1024
    # RFC 5626 clients ping every 95-120 s without a Flow-Timer; a flow with
    # no bytes at all for longer than this is dead or abusive.
    idle_timeout: float = 300.0
    # A message whose first byte arrived must be complete within this.
    partial_timeout: float = 10.0
    max_write_buffer: int = 1024 * 1024
    connect_timeout: float = 5.0
    tls_handshake_timeout: float = 5.0
    # UDP socket receive buffer: absorbs bursts (and short stalls of this
    # process) that the kernel default (~200 KiB, ~450 REGISTERs) drops.
    # Capped by net.core.rmem_max.
    udp_receive_buffer: int = 1024 * 1024
    # A worker's share of a UDP listener (_SharedUdp) reads with recvmmsg and
    # sends a wake-up's answers with one sendmmsg, when sipdrill_mmsg is there.
    udp_batch_io: bool = True


Handler = Callable[[Received], None]
FlowCallback = Callable[[Flow], None]
DatagramShortcut = Callable[[bytes, Flow], bytes | None]
"""``(datagram, flow) -> answer``: the whole exchange for a datagram it recognises,
or None to let the datagram take the ordinary path (parse, ``handler``)."""


def _addr(raw: object) -> Addr:
    if isinstance(raw, tuple) and len(raw) >= 2:
        return (str(raw[0]), int(raw[1]))
    return ("", 0)


_RPORT_RE = re.compile(r";[ \t]*rport(?=[ \t]*(?:;|$))", re.IGNORECASE)
_RECEIVED_RE = re.compile(r";[ \t]*received[ \t]*=", re.IGNORECASE)
# The sent-by host of a Via the parser has already validated (a regex, not
# Via.parse: this runs for every request and the parse is the costly part).
_SENT_BY_RE = re.compile(
    r"[ \t]*SIP[ \t]*/[ \t]*2\.0[ \t]*/[ \t]*[^ \t]+[ \t]+(\[[^\]]*\]|[^ \t;:]+)", re.IGNORECASE
)


# Plaintext read per TLS record is at most 16 KiB (RFC 8446 5.1).
TLS_READ_BUFFER = 16 * 1024


def limit_tls_read_buffers() -> None:
    """Make asyncio's TLS connections allocate a 16 KiB read buffer instead of 256 KiB.

    asyncio's SSLProtocol gives every connection a ``bytearray(max_size)``
    (256 KiB on CPython 3.11) for decrypted reads: a pool holding 10,000
    clients' TLS flows used 2.8 GB for them alone (bench/clients_scale). A
    SIP message arrives in records of at most 16 KiB, so a larger buffer only
    saves read calls. Process-wide (a class attribute); called by
    :meth:`SipTransport.listen` and before TLS connects, so every SIP process
    that speaks TLS through asyncio gets it.
    """
    sslproto = asyncio.sslproto.SSLProtocol
    if getattr(sslproto, "max_size", 0) > TLS_READ_BUFFER:
        sslproto.max_size = TLS_READ_BUFFER


def _verified_peer_names(transport: asyncio.BaseTransport) -> tuple[str, ...]:
    """The DNS SANs of the certificate the TLS peer presented, when it was verified.

    ``getpeercert()`` (asyncio's ``peercert``) is empty or None unless the
    context verified the certificate (CERT_OPTIONAL or CERT_REQUIRED); a
    certificate that fails verification fails the handshake before asyncio
    calls ``connection_made``, so whatever is here was verified.
    """
    return peer_dns_names(transport.get_extra_info("peercert"))


def _stamp_via(request: Request, remote: Addr) -> None:
    """RFC 3261 18.2.1 and RFC 3581: add ``received`` (and fill ``rport``) on the top Via.

    The Via text is extended rather than re-serialized, so the branch and
    other parameters reach the response byte for byte as the client sent them.
    """
    vias = request.headers.getlist("Via")
    if not vias:
        return
    new = stamped_via(vias[0], remote)
    if new is not None:
        vias = list(vias)
        vias[0] = new
        request.headers.setlist("Via", vias)


def stamped_via(value: str, remote: Addr) -> str | None:
    """The first Via header value ``value`` with ``received``/``rport`` stamped for a
    request from ``remote`` (see :func:`_stamp_via`), or None when it stays as it is."""
    first, sep, rest = value.partition(",")
    if '"' in first:
        return None  # a quoted parameter may hide a comma: leave such a Via alone
    host, port = remote
    new = first.rstrip()
    has_rport = _RPORT_RE.search(new) is not None
    if has_rport:
        new = _RPORT_RE.sub(f";rport={port}", new, count=1)
    if not _RECEIVED_RE.search(new):
        m = _SENT_BY_RE.match(new)
        if m is None:
            return None
        if has_rport or m.group(1).strip("[]") != host:
            new += f";received={host}"
    if new == first.rstrip():
        return None
    return new + (sep + rest if sep else "")


@dataclass(frozen=True, slots=True)
class Unreadable:
    """Bytes :func:`parse_message` refused, and what the receiving side should do.

    ``answer``: the error response to send back (400, 513, ...) when one can
    reach the sender. ``close_stream``: after a request that could not be
    read, where the next message starts on a stream is uncertain, so do not
    guess, close; a malformed response is only dropped (RFC 3261 18.1.2).
    """

    answer: bytes | None
    close_stream: bool


def read_message(
    data: bytes, kind: Kind, remote: Addr, limits: Limits, stats: MutableMapping[str, int]
) -> Message | Unreadable:
    """Parse one received message for a transport (the server's or a client flow's):
    failures are logged and counted in ``stats`` (``parse_errors``), never raised."""
    try:
        message = parse_message(data, limits)
    except MalformedResponse as exc:
        stats["parse_errors"] += 1
        log.info("%s: dropped a malformed response from %s: %s", kind, remote, exc)
        return Unreadable(None, close_stream=False)
    except SipMessageError as exc:
        stats["parse_errors"] += 1
        log.info("%s: bad request from %s: %s", kind, remote, exc)
        return Unreadable(best_effort_400(data, exc, limits), close_stream=True)
    except Exception:
        stats["parse_errors"] += 1
        log.exception("%s: parser failed on bytes from %s", kind, remote)
        return Unreadable(None, close_stream=True)
    stats["received"] += 1
    return message


class _Endpoint:
    """What a Flow's ``conn`` refers to."""

    kind: Kind
    local: Addr

    def write(self, data: bytes, remote: Addr) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _Udp(asyncio.DatagramProtocol, _Endpoint):
    def __init__(self, owner: SipTransport, serial: int) -> None:
        self.owner = owner
        self.serial = serial
        self.kind = Kind.UDP
        self.local: Addr = ("", 0)
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not a DatagramTransport subclass on every Python version: cast.
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.local = _addr(transport.get_extra_info("sockname"))
        sock = transport.get_extra_info("socket")
        size = self.owner.limits.udp_receive_buffer
        if sock is not None and size > 0:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        try:
            self.owner._on_datagram(self, data, _addr(addr))
        except Exception:  # never let a datagram stop the socket
            log.exception("udp %s: error handling a datagram from %s", self.local, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: nothing to do for a datagram.
        log.debug("udp %s: %s", self.local, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._forget(self.serial)

    def write(self, data: bytes, remote: Addr) -> bool:
        if not self.usable():
            return False
        try:
            self._sendto(data, remote)
        except (OSError, RuntimeError) as exc:  # a full send buffer too: the peer retransmits
            log.info("udp %s -> %s: send failed: %s", self.local, remote, exc)
            return False
        return True

    def _sendto(self, data: bytes, remote: Addr) -> None:
        assert self.transport is not None
        self.transport.sendto(data, remote)

    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _SharedUdp(_Udp):
    """One worker's share of a UDP listener that several worker processes read.

    Every worker reads the shared listening socket (see :mod:`sipdrill.sip.shard`):
    a datagram whose AoR this worker owns is handled here, any other is passed
    to its owner's inbox (a Unix datagram socket) framed with the sender's
    address. Answers leave from the shared socket, so the peer sees the
    address it sent to. Each wake-up drains up to :attr:`BATCH` datagrams:
    under load one epoll round trip then serves many requests.
    """

    BATCH = 64

    def __init__(
        self,
        owner: SipTransport,
        serial: int,
        shared: socket.socket,
        inbox: socket.socket,
        peers: list[socket.socket],
        me: int,
    ) -> None:
        super().__init__(owner, serial)
        self.shared = shared
        self.inbox = inbox
        self.peers = peers
        self.me = me
        for sock in (shared, inbox, *peers):
            sock.setblocking(False)
        self.local = _addr(shared.getsockname())
        self._open = True
        self.batched = owner.limits.udp_batch_io and _mmsg is not None
        # Answers of the datagrams being read, sent together at the end (batched).
        self._outbox: list[tuple[bytes, Addr]] | None = None
        owner.loop.add_reader(
            shared.fileno(), self._read_shared_batch if self.batched else self._read_shared
        )
        owner.loop.add_reader(inbox.fileno(), self._read_inbox)

    def usable(self) -> bool:
        return self._open

    def _read_shared_batch(self) -> None:
        """:meth:`_read_shared` with one recvmmsg, and one sendmmsg for the answers."""
        assert _mmsg is not None
        try:
            batch = _mmsg.recv(self.shared.fileno(), self.BATCH, 65535)
        except OSError as exc:  # e.g. ICMP errors surfacing on the socket
            log.debug("udp %s: %s", self.local, exc)
            return
        if not batch:
            return
        shards = len(self.peers)
        stats = self.owner.stats
        self._outbox = []
        try:
            for data, addr in batch:
                self._route(data, addr, shards, stats)
        finally:
            self._flush()

    def _flush(self) -> None:
        out, self._outbox = self._outbox, None
        if not out or not self._open:
            return
        assert _mmsg is not None
        try:
            sent = _mmsg.send(self.shared.fileno(), out)
        except (OSError, ValueError, OverflowError) as exc:
            # The first answer could not go: one by one, so that the rest still do.
            log.info("udp %s: batch send failed (%s), one by one", self.local, exc)
            for data, remote in out:
                with contextlib.suppress(OSError):
                    self.shared.sendto(data, remote)
            return
        if sent < len(out):  # a full send buffer: UDP, the peers retransmit
            self.owner.stats["send_dropped"] += len(out) - sent

    def _read_shared(self) -> None:
        shards = len(self.peers)
        stats = self.owner.stats
        for _ in range(self.BATCH):
            try:
                data, addr = self.shared.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return  # another worker took it, or nothing left
            except OSError as exc:  # e.g. ICMP errors surfacing on the socket
                log.debug("udp %s: %s", self.local, exc)
                return
            self._route(data, addr, shards, stats)

    def _route(self, data: bytes, addr: Addr, shards: int, stats: MutableMapping[str, int]) -> None:
        """Handle a datagram whose AoR this worker owns; send any other to its owner."""
        target = shard.shard_of(data, shards)
        if target == self.me:
            self.datagram_received(data, addr)
            return
        try:
            self.peers[target].send(shard.pack(_addr(addr), data))
            stats["forwarded"] += 1
        except OSError:  # a full inbox: UDP semantics, the client retransmits
            stats["forward_dropped"] += 1

    def _read_inbox(self) -> None:
        if self.batched:
            self._outbox = []
        try:
            self._read_inbox_frames()
        finally:
            if self.batched:
                self._flush()

    def _read_inbox_frames(self) -> None:
        for _ in range(self.BATCH):
            try:
                frame = self.inbox.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("udp %s inbox: %s", self.local, exc)
                return
            try:
                remote, payload = shard.unpack(frame)
            except (ValueError, UnicodeDecodeError):
                log.warning("udp %s: an inbox frame without a sender address, dropped", self.local)
                continue
            self.datagram_received(payload, remote)

    def _sendto(self, data: bytes, remote: Addr) -> None:
        if self._outbox is not None:
            self._outbox.append((data, remote))
        else:
            self.shared.sendto(data, remote)

    def close(self) -> None:
        if self._open:
            self._open = False
            self.owner.loop.remove_reader(self.shared.fileno())
            self.owner.loop.remove_reader(self.inbox.fileno())
            self.owner._forget(self.serial)


class _Stream(asyncio.Protocol, _Endpoint):
    def __init__(
        self,
        owner: SipTransport,
        serial: int,
        kind: Kind,
        outbound: bool,
        sni: str | None = None,
        addresses: tuple[Addr, Addr] | None = None,
        peer_names: tuple[str, ...] = (),
    ) -> None:
        self.owner = owner
        # (local, remote) of a flow whose socket is not the client's own: a
        # plaintext pipe from a TLS worker (sipdrill.sip.tls_front), with the
        # names of the certificate the worker verified.
        self.addresses = addresses
        self.peer_names = peer_names
        self.serial = serial
        self.kind = kind
        self.outbound = outbound
        # For a TLS connection we opened: the name the certificate was checked
        # against. Reuse is only for that name (RFC 5923 3: a connection
        # serves the names its certificate was verified for).
        self.sni = sni
        self.local: Addr = ("", 0)
        self.remote: Addr = ("", 0)
        self.transport: asyncio.Transport | None = None
        self.framer = StreamFramer(
            owner.limits.message, FramerRole.CLIENT if outbound else FramerRole.SERVER
        )
        self.last_activity = 0.0
        self.partial_since: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.flow: Flow | None = None

    # -- asyncio callbacks -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.addresses is not None:
            self.local, self.remote = self.addresses
            names = self.peer_names
        else:
            self.local = _addr(transport.get_extra_info("sockname"))
            self.remote = _addr(transport.get_extra_info("peername"))
            names = _verified_peer_names(transport) if self.kind is Kind.TLS else ()
        self.flow = Flow(self.kind, self.local, self.remote, self.serial, names)
        if not self.owner._admit(self):
            log.warning(
                "%s %s: connection from %s refused: %d connections open",
                self.kind,
                self.local,
                self.remote,
                self.owner.limits.max_connections,
            )
            self.owner.stats["refused_connections"] += 1
            transport.abort()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and self.addresses is None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.last_activity = self.owner.loop.time()
        self._arm()

    def data_received(self, data: bytes) -> None:
        try:
            self._data(data)
        except Exception:
            log.exception("%s %s: error handling data from %s", self.kind, self.local, self.remote)
            self.close()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.closed.done():
            self.closed.set_result(None)
        self.owner._stream_gone(self)

    # -- behaviour -----------------------------------------------------------
    def _data(self, data: bytes) -> None:
        owner = self.owner
        now = owner.loop.time()
        self.last_activity = now
        events = self.framer.feed(data)
        progressed = bool(events)
        for event in events:
            if self.transport is None or self.transport.is_closing():
                return
            if isinstance(event, MessageBytes):
                owner._deliver(self.kind, event.data, self.remote, self._flow(), self)
            elif isinstance(event, KeepAlivePing):
                self.write(b"\r\n", self.remote)
            elif isinstance(event, KeepAlivePong):
                owner._pong(self._flow())
            elif isinstance(event, FramingError):
                owner.stats["framing_errors"] += 1
                log.info(
                    "%s %s: framing error from %s: %d %s; closing",
                    self.kind,
                    self.local,
                    self.remote,
                    event.status_code,
                    event.reason,
                )
                if event.data:
                    answer = best_effort_400(
                        event.data,
                        SipParseError(reason=event.reason, status_code=event.status_code),
                        owner.limits.message,
                    )
                    if answer is not None:
                        self.write(answer, self.remote)
                self.close()
                return
        if not self.framer.buffered:
            self.partial_since = None
        elif self.partial_since is None or progressed:
            # The clock runs from the first byte of the message now pending,
            # so a busy pipelined stream whose reads end mid-message is fine.
            self.partial_since = now

    def _flow(self) -> Flow:
        assert self.flow is not None
        return self.flow

    def _arm(self) -> None:
        limits = self.owner.limits
        deadline = self.last_activity + limits.idle_timeout if not self.outbound else math.inf
        if self.partial_since is not None:
            deadline = min(deadline, self.partial_since + limits.partial_timeout)
        # Check at least every partial_timeout, so a stall that starts later
        # is caught within twice the timeout.
        now = self.owner.loop.time()
        deadline = min(deadline, now + limits.partial_timeout)
        self.timer = self.owner.loop.call_at(max(deadline, now), self._check)

    def _check(self) -> None:
        self.timer = None
        if self.transport is None or self.transport.is_closing():
            return
        limits = self.owner.limits
        now = self.owner.loop.time()
        if self.partial_since is not None and now - self.partial_since >= limits.partial_timeout:
            log.info(
                "%s %s: %s stalled mid-message (%d bytes) for %.1fs; closing",
                self.kind,
                self.local,
                self.remote,
                self.framer.buffered,
                now - self.partial_since,
            )
            self.owner.stats["stalled"] += 1
            self.close()
            return
        # Idle flows we opened are the owner's business (it keeps them alive
        # with pings or lets them go); idle flows we accepted cost us a slot.
        if not self.outbound and now - self.last_activity >= limits.idle_timeout:
            log.info("%s %s: %s idle; closing", self.kind, self.local, self.remote)
            self.owner.stats["idle_closed"] += 1
            self.close()
            return
        self._arm()

    def write(self, data: bytes, remote: Addr) -> bool:
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        try:
            transport.write(data)
        except (OSError, RuntimeError) as exc:
            log.info("%s %s -> %s: write failed: %s", self.kind, self.local, self.remote, exc)
            self.close()
            return False
        if transport.get_write_buffer_size() > self.owner.limits.max_write_buffer:
            log.warning(
                "%s %s: %s does not read its responses; closing", self.kind, self.local, self.remote
            )
            transport.abort()
            return False
        return True

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class SipTransport:
    """Owns every socket of one SIP service (or one client) and delivers messages.

    ``handler`` is called synchronously for every parsed message; ``on_pong``
    for every CRLF pong on a flow we opened, ``on_flow_closed`` when a stream
    flow goes away (so the core can fail its transactions or bindings).
    Create it inside a running event loop; ``await close()`` when done.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        limits: TransportLimits | None = None,
        on_pong: FlowCallback | None = None,
        on_flow_closed: FlowCallback | None = None,
    ) -> None:
        self.handler = handler
        self.limits = limits or TransportLimits()
        self.on_pong = on_pong
        self.on_flow_closed = on_flow_closed
        # Tried first on every datagram (see DatagramShortcut): the registrar's
        # REGISTER fast path (sipdrill.sip.fastpath).
        self.datagram_shortcut: DatagramShortcut | None = None
        self.loop = asyncio.get_running_loop()
        self.stats: dict[str, int] = {
            "received": 0,
            "sent": 0,
            "parse_errors": 0,
            "framing_errors": 0,
            "refused_connections": 0,
            "stalled": 0,
            "idle_closed": 0,
            "handler_errors": 0,
            "forwarded": 0,
            "forward_dropped": 0,
            "send_dropped": 0,
        }
        self._serials = itertools.count(1)
        self._endpoints: dict[int, _Endpoint] = {}
        self._servers: list[tuple[Kind, asyncio.Server]] = []
        self._udp: list[_Udp] = []
        self._streams: dict[int, _Stream] = {}
        self._by_remote: dict[tuple[Kind, Addr, str | None], int] = {}
        self._connecting: dict[tuple[Kind, Addr, str | None], asyncio.Future[Flow]] = {}
        self._adopting: set[asyncio.Task[None]] = set()
        self._closing = False

    # -- listeners -----------------------------------------------------------
    async def listen(
        self,
        kind: Kind | str,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
    ) -> Addr:
        """Open a listener; returns the bound address (useful with port 0)."""
        kind = Kind(kind)
        try:
            if kind is Kind.UDP:
                serial = next(self._serials)
                _, proto = await self.loop.create_datagram_endpoint(
                    lambda: _Udp(self, serial),
                    local_addr=(host, port),
                    reuse_port=reuse_port or None,
                )
                self._endpoints[serial] = proto
                self._udp.append(proto)
                return proto.local
            if kind is Kind.TLS and ssl_context is None:
                raise TransportError(kind, f"{host}:{port}", "a TLS listener needs ssl_context")
            if kind is Kind.TLS:
                limit_tls_read_buffers()
            server = await self.loop.create_server(
                lambda: self._new_stream(kind, outbound=False),
                host,
                port,
                ssl=ssl_context if kind is Kind.TLS else None,
                ssl_handshake_timeout=(
                    self.limits.tls_handshake_timeout if kind is Kind.TLS else None
                ),
                reuse_port=reuse_port or None,
                backlog=min(1024, max(16, self.limits.max_connections)),
            )
        except OSError as exc:
            raise TransportError(kind, f"{host}:{port}", str(exc)) from exc
        self._servers.append((kind, server))
        return _addr(server.sockets[0].getsockname())

    def adopt_stream(
        self,
        sock: socket.socket,
        kind: Kind,
        remote: Addr,
        local: Addr,
        peer_names: tuple[str, ...] = (),
    ) -> None:
        """Serve an accepted connection whose socket carries ``kind``'s plaintext
        for a peer at ``remote`` (a TLS worker's pipe, see sipdrill.sip.tls_front):
        a flow like one accepted by :meth:`listen`, with the peer's addresses and
        the DNS names of the certificate the worker verified (``Flow.peer_names``)."""
        if self._closing:
            sock.close()
            return
        serial = next(self._serials)

        async def connect() -> None:
            try:
                await self.loop.connect_accepted_socket(
                    lambda: _Stream(
                        self,
                        serial,
                        kind,
                        False,
                        addresses=(local, remote),
                        peer_names=peer_names,
                    ),
                    sock,
                )
            except OSError as exc:
                log.info("%s %s: cannot adopt a flow from %s: %s", kind, local, remote, exc)
                sock.close()

        task = self.loop.create_task(connect())
        self._adopting.add(task)
        task.add_done_callback(self._adopting.discard)

    def attach_shard(
        self, shared: socket.socket, inbox: socket.socket, peers: list[socket.socket], me: int
    ) -> Addr:
        """Serve worker ``me``'s share of the UDP listener ``shared``, read by every
        worker; ``peers[w]`` reaches worker ``w``'s ``inbox`` (see
        :mod:`sipdrill.sip.shard`). Returns the listener's address."""
        serial = next(self._serials)
        endpoint = _SharedUdp(self, serial, shared, inbox, peers, me)
        self._endpoints[serial] = endpoint
        self._udp.append(endpoint)
        return endpoint.local

    @property
    def listening(self) -> list[tuple[Kind, Addr]]:
        out = [(Kind.UDP, u.local) for u in self._udp]
        for kind, server in self._servers:
            out += [(kind, _addr(s.getsockname())) for s in server.sockets]
        return out

    # -- outbound ------------------------------------------------------------
    async def open_flow(
        self,
        kind: Kind | str,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        reuse: bool = True,
    ) -> Flow:
        """A flow to ``host:port``: an open one to that peer if any, else a new one.

        ``host`` is an IP address (resolve names with the core's SRV/A logic
        first); for TLS, ``server_hostname`` is the name the certificate must
        carry. Raises :class:`TransportError` when the peer cannot be reached.
        """
        kind = Kind(kind)
        remote = (host, port)
        if kind is Kind.UDP:
            udp = self._udp_for(host)
            if udp is None:
                await self.listen(Kind.UDP, "::" if ":" in host else "0.0.0.0", 0)
                udp = self._udp_for(host)
                assert udp is not None
            return Flow(Kind.UDP, udp.local, remote, udp.serial)
        if reuse:
            serial = self._by_remote.get(self._reuse_key(kind, remote, server_hostname))
            if serial is None and kind is Kind.TLS and server_hostname is None:
                serial = self._by_remote.get((kind, remote, remote[0]))
            stream = self._streams.get(serial) if serial is not None else None
            if stream is not None and stream.flow is not None:
                return stream.flow
            pending = self._connecting.get((kind, remote, server_hostname))
            if pending is not None:
                return await asyncio.shield(pending)
        key = (kind, remote, server_hostname)
        fut: asyncio.Future[Flow] = self.loop.create_future()
        self._connecting[key] = fut
        try:
            flow = await self._connect(kind, remote, ssl_context, server_hostname)
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: waiters got it or there are none
            raise
        else:
            fut.set_result(flow)
            return flow
        finally:
            if self._connecting.get(key) is fut:
                del self._connecting[key]

    async def _connect(
        self,
        kind: Kind,
        remote: Addr,
        ssl_context: ssl.SSLContext | None,
        server_hostname: str | None,
    ) -> Flow:
        if kind is Kind.TLS and ssl_context is None:
            raise TransportError(kind, f"{remote[0]}:{remote[1]}", "TLS needs ssl_context")
        sni = (server_hostname or remote[0]) if kind is Kind.TLS else None
        if kind is Kind.TLS:
            limit_tls_read_buffers()
        try:
            async with asyncio.timeout(self.limits.connect_timeout):
                _, proto = await self.loop.create_connection(
                    lambda: self._new_stream(kind, outbound=True, sni=sni),
                    remote[0],
                    remote[1],
                    ssl=ssl_context if kind is Kind.TLS else None,
                    server_hostname=sni,
                    ssl_handshake_timeout=(
                        self.limits.tls_handshake_timeout if kind is Kind.TLS else None
                    ),
                )
        except ssl.SSLCertVerificationError as exc:
            raise TransportError(
                kind, f"{remote[0]}:{remote[1]}", f"certificate rejected: {exc.verify_message}"
            ) from exc
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise TransportError(kind, f"{remote[0]}:{remote[1]}", str(exc) or "timeout") from exc
        if proto.flow is None or proto.transport is None or proto.transport.is_closing():
            raise TransportError(kind, f"{remote[0]}:{remote[1]}", "connection refused locally")
        return proto.flow

    def _udp_for(self, host: str) -> _Udp | None:
        v6 = ":" in host
        for udp in self._udp:
            local = udp.local[0]
            if (
                (":" in local) == v6
                and udp.usable()
                and (
                    local in ("0.0.0.0", "::")
                    or local.startswith("127.") == host.startswith("127.")
                    or local == host
                )
            ):
                return udp
        return None

    async def send_to(
        self,
        kind: Kind | str,
        host: str,
        port: int,
        message: Message | bytes,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> Flow:
        """Send to a peer on a reused or new flow; returns the flow used."""
        flow = await self.open_flow(
            kind, host, port, ssl_context=ssl_context, server_hostname=server_hostname
        )
        if not self.send(flow, message):
            raise TransportError(kind, f"{host}:{port}", "send failed: the flow is closed")
        return flow

    def send(self, flow: Flow, message: Message | bytes) -> bool:
        """Send on ``flow``; False (and nothing raised) when the flow is gone."""
        endpoint = self._endpoints.get(flow.conn)
        if endpoint is None:
            return False
        try:
            data = message if isinstance(message, bytes) else serialize(message)
        except Exception:
            log.exception("cannot serialize a message for %s", flow.remote)
            return False
        ok = endpoint.write(data, flow.remote)
        if ok:
            self.stats["sent"] += 1
        return ok

    def ping(self, flow: Flow) -> bool:
        """Send an RFC 5626 CRLFCRLF keep-alive ping on a stream flow."""
        if not flow.reliable:
            return False
        endpoint = self._endpoints.get(flow.conn)
        return endpoint is not None and endpoint.write(b"\r\n\r\n", flow.remote)

    def close_flow(self, flow: Flow) -> None:
        if flow.reliable:
            endpoint = self._endpoints.get(flow.conn)
            if endpoint is not None:
                endpoint.close()

    def is_open(self, flow: Flow) -> bool:
        return flow.conn in self._endpoints

    @property
    def connection_count(self) -> int:
        return len(self._streams)

    # -- internals -------------------------------------------------------------
    @staticmethod
    def _reuse_key(kind: Kind, remote: Addr, sni: str | None) -> tuple[Kind, Addr, str | None]:
        return (kind, remote, sni if kind is Kind.TLS else None)

    def _new_stream(self, kind: Kind, *, outbound: bool, sni: str | None = None) -> _Stream:
        return _Stream(self, next(self._serials), kind, outbound, sni)

    def _admit(self, stream: _Stream) -> bool:
        if self._closing:
            return False
        if not stream.outbound and len(self._streams) >= self.limits.max_connections:
            return False
        self._streams[stream.serial] = stream
        self._endpoints[stream.serial] = stream
        self._by_remote[self._reuse_key(stream.kind, stream.remote, stream.sni)] = stream.serial
        return True

    def _stream_gone(self, stream: _Stream) -> None:
        if self._streams.pop(stream.serial, None) is None:
            return
        self._endpoints.pop(stream.serial, None)
        key = self._reuse_key(stream.kind, stream.remote, stream.sni)
        if self._by_remote.get(key) == stream.serial:
            del self._by_remote[key]
        if self.on_flow_closed is not None and stream.flow is not None:
            try:
                self.on_flow_closed(stream.flow)
            except Exception:
                log.exception("on_flow_closed failed for %s", stream.flow)

    def _forget(self, serial: int) -> None:
        endpoint = self._endpoints.pop(serial, None)
        if isinstance(endpoint, _Udp) and endpoint in self._udp:
            self._udp.remove(endpoint)

    def _pong(self, flow: Flow) -> None:
        if self.on_pong is not None:
            try:
                self.on_pong(flow)
            except Exception:
                log.exception("on_pong failed for %s", flow)

    def _on_datagram(self, udp: _Udp, data: bytes, remote: Addr) -> None:
        event = classify_datagram(data)
        if isinstance(event, KeepAlivePing):
            udp.write(b"\r\n", remote)
            return
        if isinstance(event, KeepAlivePong):
            self._pong(Flow(Kind.UDP, udp.local, remote, udp.serial))
            return
        flow = Flow(Kind.UDP, udp.local, remote, udp.serial)
        shortcut = self.datagram_shortcut
        if shortcut is not None:
            try:
                answer = shortcut(event.data, flow)
            except Exception:
                self.stats["handler_errors"] += 1
                log.exception("udp: the shortcut failed on a datagram from %s", remote)
                return
            if answer is not None:
                self.stats["received"] += 1
                if udp.write(answer, remote):
                    self.stats["sent"] += 1
                return
        self._deliver(Kind.UDP, event.data, remote, flow, udp)

    def _deliver(
        self, kind: Kind, data: bytes, remote: Addr, flow: Flow, endpoint: _Endpoint
    ) -> None:
        message = read_message(data, kind, remote, self.limits.message, self.stats)
        if isinstance(message, Unreadable):
            if message.answer is not None:
                endpoint.write(message.answer, remote)
            if message.close_stream and isinstance(endpoint, _Stream):
                endpoint.close()
            return
        if isinstance(message, Request):
            _stamp_via(message, remote)
        try:
            self.handler(Received(message, kind, remote, flow))
        except Exception:
            self.stats["handler_errors"] += 1
            log.exception("%s: handler failed on a message from %s", kind, remote)

    # -- shutdown --------------------------------------------------------------
    async def close(self) -> None:
        """Stop listening and close every flow; waits until sockets are closed."""
        self._closing = True
        for task in list(self._adopting):
            task.cancel()
        for _, server in self._servers:
            server.close()
        streams = list(self._streams.values())
        for stream in streams:
            stream.close()
        for udp in list(self._udp):
            udp.close()
        for _, server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
        if streams:
            waiters = [s.closed for s in streams]
            _done, pending = await asyncio.wait(waiters, timeout=2.0)
            for s in streams:
                if not s.closed.done() and s.transport is not None:
                    s.transport.abort()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        # Let UDP transports run their connection_lost callbacks.
        await asyncio.sleep(0)
        self._udp.clear()
        self._endpoints.clear()

    async def __aenter__(self) -> SipTransport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class TimerCore(Protocol):
    """What :class:`TimerDriver` needs from a sans-IO core."""

    def next_deadline(self) -> float | None: ...

    def handle_timer(self, now: float) -> object: ...


@dataclass
class TimerDriver:
    """Calls ``core.handle_timer(loop.time())`` at ``core.next_deadline()``.

    The core's clock is ``loop.time()`` (monotonic seconds). Call
    :meth:`poke` after anything that may have moved the deadline (a message
    handled, a request sent); ``on_output`` receives whatever
    ``handle_timer`` returns (e.g. retransmissions to send).
    """

    core: TimerCore
    on_output: Callable[[object], None] | None = None
    _handle: asyncio.TimerHandle | None = field(default=None, init=False)
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop, init=False)
    _stopped: bool = field(default=False, init=False)

    def poke(self) -> None:
        if self._stopped:
            return
        try:
            deadline = self.core.next_deadline()
        except Exception:
            log.exception("next_deadline failed")
            return
        handle = self._handle
        if deadline is None:
            if handle is not None:
                handle.cancel()
                self._handle = None
            return
        if handle is not None:
            if handle.when() <= deadline:
                return
            handle.cancel()
        self._handle = self._loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        self._handle = None
        try:
            output = self.core.handle_timer(self._loop.time())
            if self.on_output is not None:
                self.on_output(output)
        except Exception:
            log.exception("handle_timer failed")
        self.poke()

    def stop(self) -> None:
        self._stopped = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
