"""Message framing for stream (TCP/TLS) and datagram (UDP) transports, sans-IO.

A stream carries messages back to back, delimited only by Content-Length
(RFC 3261 18.3), with RFC 5626 keep-alives in the gaps: CRLFCRLF is a ping
and a single CRLF is the pong. The framer only cuts the stream into frames;
:func:`sipdrill.sip.message.parse_message` judges what is inside them.

Every check the framer makes is monotone in the bytes seen so far (a line
that is too long in a prefix is too long in the whole), so the events do not
depend on how the stream was split into ``feed()`` calls.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from sipdrill.sip.message import DEFAULT_LIMITS, Limits, SipParseError

__all__ = [
    "FramerEvent",
    "FramerRole",
    "FramingError",
    "KeepAlivePing",
    "KeepAlivePong",
    "MessageBytes",
    "StreamFramer",
    "classify_datagram",
]


@dataclass(frozen=True)
class MessageBytes:
    """One complete message: header section, blank line and Content-Length bytes of body."""

    data: bytes


@dataclass(frozen=True)
class KeepAlivePing:
    """CRLFCRLF from the peer (RFC 5626 4.4.1): answer with a single CRLF."""


@dataclass(frozen=True)
class KeepAlivePong:
    """A single CRLF from the peer: the answer to our ping."""


@dataclass(frozen=True)
class FramingError:
    """The stream cannot be resynchronised: answer if possible, then close the connection.

    ``data`` holds the header bytes of the offending message when they are
    complete, so the transport can answer before closing:
    ``best_effort_400(err.data, err.as_sip_error())``.
    """

    status_code: int
    reason: str
    data: bytes = b""

    def as_sip_error(self) -> SipParseError:
        return SipParseError(reason=self.reason, status_code=self.status_code)


FramerEvent = MessageBytes | KeepAlivePing | KeepAlivePong | FramingError


class FramerRole(enum.Enum):
    """Which keep-alives this side receives; it decides what a lone CRLF means.

    RFC 5626 pings go from the flow's client to its server, so a server
    sees CRLFCRLF pings and a client sees CRLF pongs. On a server a CRLF at
    the end of the data may be the first half of a ping and is held back;
    on a client every CRLF is a pong at once (waiting would delay the pong
    the keep-alive deadline depends on).
    """

    SERVER = "server"
    CLIENT = "client"


_DIGITS_RE = re.compile(rb"[0-9]+")


class StreamFramer:
    """Cut a TCP/TLS byte stream into SIP messages and keep-alives.

    After a :class:`FramingError` the framer is dead: it returns the error
    once and nothing afterwards, because the byte position of the next
    message is unknown.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS, role: FramerRole = FramerRole.SERVER):
        self._limits = limits
        self._role = role
        self._buffer = bytearray()
        # Incremental scan state for the header section of the message at
        # the start of the buffer, so a slow sender costs O(n), not O(n^2).
        self._scan_pos = 0
        self._line_start = 0
        self._header_end: int | None = None
        self._body_length = 0
        self._failed = False

    @property
    def failed(self) -> bool:
        return self._failed

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as an event."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[FramerEvent]:
        if self._failed:
            return []
        self._buffer += data
        events: list[FramerEvent] = []
        while True:
            event = self._next_event()
            if event is None:
                return events
            events.append(event)
            if isinstance(event, FramingError):
                self._failed = True
                self._buffer.clear()
                return events

    def _reset_scan(self) -> None:
        self._scan_pos = 0
        self._line_start = 0
        self._header_end = None
        self._body_length = 0

    def _next_event(self) -> FramerEvent | None:
        buf = self._buffer
        if self._header_end is None:
            if buf[:1] == b"\r" and (len(buf) == 1 or buf[1] == 0x0A):
                return self._keepalive()
            error = self._scan_header()
            if error is not None or self._header_end is None:
                return error
        total = self._header_end + self._body_length
        if len(buf) < total:
            return None
        frame = bytes(buf[:total])
        del buf[:total]
        self._reset_scan()
        return MessageBytes(frame)

    def _keepalive(self) -> FramerEvent | None:
        buf = self._buffer
        if len(buf) < 2:
            return None
        if self._role is FramerRole.CLIENT:
            del buf[:2]
            return KeepAlivePong()
        if buf[:4] == b"\r\n\r\n":
            del buf[:4]
            return KeepAlivePing()
        if len(buf) < 4 and b"\r\n\r\n".startswith(bytes(buf)):
            return None  # possibly the first half of a ping
        # RFC 3261 7.5 lets a CRLF precede a start line; a server has no
        # use for pongs, so reporting it as one is harmless.
        del buf[:2]
        return KeepAlivePong()

    def _scan_header(self) -> FramingError | None:
        buf = self._buffer
        limits = self._limits
        # Only the first max_message_size (+ the blank line) bytes are ever
        # looked at, so a prefix and the whole stream see the same lines.
        view_end = min(len(buf), limits.max_message_size + 4)
        pos = self._scan_pos
        while True:
            crlf = buf.find(b"\r\n", pos, view_end)
            if crlf < 0:
                partial = view_end - self._line_start
                # A trailing CR may be half of the CRLF that ends the line.
                if view_end == len(buf) and buf.endswith(b"\r"):
                    partial -= 1
                if partial > limits.max_line_length:
                    return FramingError(400, "Header line too long")
                if view_end == limits.max_message_size + 4:
                    return FramingError(513, "Message Too Large")
                self._scan_pos = max(self._line_start, view_end - 1)
                return None
            if crlf - self._line_start > limits.max_line_length:
                return FramingError(400, "Header line too long")
            if crlf == self._line_start and crlf > 0:
                return self._header_complete(crlf + 2)
            self._line_start = crlf + 2
            pos = crlf + 2

    def _header_complete(self, header_end: int) -> FramingError | None:
        limits = self._limits
        header = bytes(self._buffer[:header_end])
        if header_end > limits.max_message_size:
            return FramingError(513, "Message Too Large", header)
        values = set()
        for line in header[:-4].split(b"\r\n")[1:]:
            name, sep, value = line.partition(b":")
            if sep and name.rstrip(b" \t").lower() in (b"content-length", b"l"):
                values.add(value.strip(b" \t"))
        if not values:
            return FramingError(400, "Missing Content-Length", header)
        if len(values) > 1:
            return FramingError(400, "Conflicting Content-Length", header)
        (value,) = values
        if not _DIGITS_RE.fullmatch(value):
            return FramingError(400, "Bad Content-Length", header)
        length = int(value)
        if header_end + length > limits.max_message_size:
            return FramingError(513, "Message Too Large", header)
        self._header_end = header_end
        self._body_length = length
        return None


def classify_datagram(data: bytes) -> MessageBytes | KeepAlivePing | KeepAlivePong:
    """What one UDP datagram is.

    RFC 5626 uses STUN on UDP, but peers in the wild also send CRLF
    keep-alives there; they are recognised so they are not parsed (and
    answered with 400) as broken messages.
    """
    if data == b"\r\n\r\n":
        return KeepAlivePing()
    if data == b"\r\n":
        return KeepAlivePong()
    return MessageBytes(data)
