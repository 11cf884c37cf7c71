"""Parsing and serializing SIP messages (RFC 3261 section 7), sans-IO.

``sipmessage`` supplies the message model and the grammar of individual
header values, but its own ``Message.parse`` is too loose for a server that
faces the network (no size limits, no folding, no mandatory-header checks,
and errors are bare ``ValueError`` with no status). So the start line and the
header section are tokenized here, the result is built as ordinary
``sipmessage.Request`` / ``sipmessage.Response`` objects, and every failure
is a :class:`SipParseError` (a request, or something that cannot be told
apart: answer it) or a :class:`MalformedResponse` (drop it and log).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from sipmessage import URI, Address, CSeq, Request, Response, Via

# RFC 3261 7.3.3 compact forms; sipmessage's table is reused so that both
# parsers agree on which long name a letter stands for.
from sipmessage.message import COMPACT_FORMS as _COMPACT_FORMS
from sipmessage.message import Headers

from sipdrill.errors import SipError
from sipdrill.sip import grammar

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_CSEQ",
    "REASON_PHRASES",
    "IndexedHeaders",
    "Limits",
    "MalformedResponse",
    "Message",
    "ParsedRequest",
    "ParsedResponse",
    "SipMessageError",
    "SipParseError",
    "best_effort_400",
    "header_name",
    "make_response",
    "parse_message",
    "serialize",
    "stateless_tag",
]

Message = Request | Response


# Lower-cased spellings of the canonical header names (see _canonical_name).
_LOWER: dict[str, str] = {}


class IndexedHeaders(Headers):
    """sipmessage's :class:`Headers` with an index by lower-cased name.

    sipmessage lower-cases every stored name on every lookup; a registrar
    looks headers up a few dozen times per REGISTER, which made that alone
    about 5 % of the server's CPU. Same behaviour otherwise: names are
    merged case-insensitively into one entry whose value list ``getlist``
    returns (live, as sipmessage does), and the output order is unchanged.
    """

    def __init__(self) -> None:
        super().__init__()
        self._index: dict[str, list[str]] = {}

    def _position(self, values: list[str]) -> int:
        for i, (_, stored) in enumerate(self._list):
            if stored is values:
                return i
        raise AssertionError("header index out of step with the header list")

    def add(self, key: str, value: str) -> None:
        self.extend(((key, value),))

    def extend(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Add each (name, value) in order; one call for a parsed message's headers."""
        index = self._index
        stored = self._list
        for key, value in pairs:
            ikey = _LOWER.get(key) or key.lower()
            values = index.get(ikey)
            if values is None:
                index[ikey] = values = [value]
                stored.append((key, values))
            else:
                values.append(value)

    def get(self, key: str, default: str | None = None) -> str | None:
        values = self._index.get(key.lower())
        return values[0] if values else default

    def getlist(self, key: str) -> list[str]:
        return self._index.get(key.lower(), [])

    def remove(self, key: str) -> None:
        values = self._index.pop(key.lower(), None)
        if values is not None:
            del self._list[self._position(values)]

    def set(self, key: str, value: str) -> None:
        self.setlist(key, [value])

    def setlist(self, key: str, values: list[str]) -> None:
        ikey = key.lower()
        old = self._index.get(ikey)
        self._index[ikey] = values
        if old is None:
            self._list.append((key, values))
        else:
            i = self._position(old)
            self._list[i] = (self._list[i][0], values)

    def __getitem__(self, key: str) -> str:
        values = self._index.get(key.lower())
        if not values:
            raise KeyError(key)
        return values[0]


_T = TypeVar("_T")


def _parse_vias(texts: tuple[str, ...]) -> tuple[Via, ...]:
    return tuple(via for text in texts for via in grammar.parse_vias(text))


def _parse_addresses(texts: tuple[str, ...]) -> tuple[Address, ...]:
    return tuple(address for text in texts for address in grammar.parse_addresses(text))


def _parse_address(texts: tuple[str, ...]) -> Address:
    if not texts:
        raise KeyError
    return grammar.parse_address(texts[0])


def _parse_cseq(texts: tuple[str, ...]) -> CSeq:
    if not texts:
        raise KeyError
    return grammar.parse_cseq(texts[0])


class _ParsedHeaders:
    """Typed header accessors that parse each header value once per message.

    sipmessage parses on every access, and the transaction layer, the
    registrar and the response builder each read Via, To and CSeq again:
    five parses of each per REGISTER. The parsed values (immutable: frozen
    dataclasses over an immutable Parameters) are memoized under the header
    text they came from, so writing a header through any path makes the
    next read parse the new text. List-valued accessors return a fresh list.
    """

    headers: Headers
    _parsed: dict[str, tuple[tuple[str, ...], Any]]

    def _memo(self, name: str, key: str, parse: Callable[[tuple[str, ...]], _T]) -> _T:
        headers = self.headers
        # Read about a dozen times per REGISTER: straight from the index when the
        # headers are ours (they always are, unless a caller swapped them).
        if type(headers) is IndexedHeaders:
            texts = tuple(headers._index.get(key, ()))
        else:
            texts = tuple(headers.getlist(name))
        hit = self._parsed.get(name)
        if hit is not None and hit[0] == texts:
            value: _T = hit[1]
            return value
        value = parse(texts)
        self._parsed[name] = (texts, value)
        return value

    @property
    def via(self) -> list[Via]:
        return list(self._memo("Via", "via", _parse_vias))

    @via.setter
    def via(self, value: list[Via]) -> None:
        self.headers.setlist("Via", [str(x) for x in value])

    @property
    def contact(self) -> list[Address]:
        return list(self._memo("Contact", "contact", _parse_addresses))

    @contact.setter
    def contact(self, value: list[Address]) -> None:
        self.headers.setlist("Contact", [str(x) for x in value])

    @property
    def from_address(self) -> Address:
        return self._memo("From", "from", _parse_address)

    @from_address.setter
    def from_address(self, value: Address) -> None:
        self.headers.set("From", str(value))

    @property
    def to_address(self) -> Address:
        return self._memo("To", "to", _parse_address)

    @to_address.setter
    def to_address(self, value: Address) -> None:
        self.headers.set("To", str(value))

    @property
    def cseq(self) -> CSeq:
        return self._memo("CSeq", "cseq", _parse_cseq)

    @cseq.setter
    def cseq(self, value: CSeq) -> None:
        self.headers.set("CSeq", str(value))


class ParsedRequest(_ParsedHeaders, Request):
    """A :class:`sipmessage.Request` as :func:`parse_message` builds it (see _ParsedHeaders)."""

    def __init__(self, method: str, uri: URI, body: bytes = b"") -> None:
        super().__init__(method=method, uri=uri, body=body)
        self.headers = IndexedHeaders()
        self._parsed = {}


class ParsedResponse(_ParsedHeaders, Response):
    """A :class:`sipmessage.Response` as :func:`parse_message` and :func:`make_response` make."""

    def __init__(self, code: int, phrase: str, body: bytes = b"") -> None:
        super().__init__(code=code, phrase=phrase, body=body)
        self.headers = IndexedHeaders()
        self._parsed = {}


@dataclass(frozen=True)
class Limits:
    """Resource limits applied to every message before any work is done on it."""

    max_message_size: int = 64 * 1024
    max_headers: int = 128
    max_line_length: int = 8 * 1024


DEFAULT_LIMITS = Limits()


@dataclass
class SipMessageError(SipError):
    """Bytes that are not an acceptable SIP message."""


@dataclass
class SipParseError(SipMessageError):
    """A malformed request (or unclassifiable bytes): answer ``status_code`` if you can."""


@dataclass
class MalformedResponse(SipMessageError):
    """A malformed response. RFC 3261 18.1.2: discard it silently; never answer a response."""


REASON_PHRASES: dict[int, str] = {
    100: "Trying",
    180: "Ringing",
    183: "Session Progress",
    200: "OK",
    202: "Accepted",
    301: "Moved Permanently",
    302: "Moved Temporarily",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    423: "Interval Too Brief",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    486: "Busy Here",
    487: "Request Terminated",
    500: "Server Internal Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    504: "Server Time-out",
    505: "Version Not Supported",
    513: "Message Too Large",
    603: "Decline",
}

_TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
_STATUS_RE = re.compile(r"SIP/2\.0 ([1-6][0-9][0-9])(?: (.*))?")
_DIGITS_RE = re.compile(r"[0-9]+")
_CTL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# The same over a whole header section, but for CR and LF, which are checked
# to come only as CRLF pairs by counting (a lookaround alternation in this
# pattern cost 15 us per message, a tenth of a REGISTER's parse).
_SECTION_CTL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _ctl_free(text: str) -> bool:
    """No control character but HTAB, and CR and LF only as CRLF pairs."""
    if _SECTION_CTL_RE.search(text) is not None:
        return False
    pairs = text.count("\r\n")
    return text.count("\r") == pairs and text.count("\n") == pairs


_SUPPORTED_SCHEMES = frozenset({"sip", "sips", "tel"})
# RFC 3261 20.16: the sequence number must be below 2**31.
MAX_CSEQ = 2**31 - 1
# Headers that must appear exactly once; a second copy makes the
# message ambiguous (which To tag? which CSeq?), so it is rejected.
_SINGLETONS = ("From", "To", "Call-ID", "CSeq", "Max-Forwards", "Content-Length")


# Spelling the common names one way means serialized messages look the
# same whatever case the peer used.
_KNOWN_NAMES = (
    "Via",
    "From",
    "To",
    "Call-ID",
    "CSeq",
    "Contact",
    "Max-Forwards",
    "Content-Length",
    "Content-Type",
    "Expires",
    "Min-Expires",
    "Authorization",
    "WWW-Authenticate",
    "Route",
    "Record-Route",
    "Supported",
    "Require",
    "User-Agent",
    "Server",
)
_CANONICAL = {name.lower(): name for name in _KNOWN_NAMES}
_CANONICAL.update(_COMPACT_FORMS)
_LOWER.update({name: name.lower() for name in _CANONICAL.values()})


def _canonical_name(name: str) -> str:
    return _CANONICAL.get(name.lower(), name)


def _fail(is_response: bool, reason: str, status: int = 400) -> SipMessageError:
    if is_response:
        return MalformedResponse(reason=reason, status_code=status)
    return SipParseError(reason=reason, status_code=status)


def _split_header_section(data: bytes, limits: Limits) -> tuple[list[str], bytes, bool]:
    """Return the lines (start line first), the raw body, and whether the
    section is free of control characters other than HTAB and its CRLFs."""
    if len(data) > limits.max_message_size:
        raise SipParseError(reason="Message Too Large", status_code=513)
    # RFC 3261 7.5: CRLFs before the start line are ignored.
    start = 0
    while data.startswith(b"\r\n", start):
        start += 2
    end = data.find(b"\r\n\r\n", start)
    if end < 0:
        if start == len(data):
            raise SipParseError(reason="Missing start line")
        raise SipParseError(reason="Missing end of header section")
    section = data[start:end]
    body = data[end + 4 :]
    raw_lines = section.split(b"\r\n")
    if max(map(len, raw_lines)) > limits.max_line_length:
        raise SipParseError(reason="Header line too long")
    try:
        # CR and LF never occur inside a UTF-8 sequence, so one decode of
        # the section splits into the same lines as decoding each line.
        text = section.decode("utf-8")
    except UnicodeDecodeError:
        raise SipParseError(reason="Header section is not valid UTF-8") from None
    return text.split("\r\n"), body, _ctl_free(text)


# Raw header names (as sent, up to the colon) already found valid, with their
# canonical spelling: most messages repeat the same dozen. Bounded, so that a
# peer inventing names cannot grow it.
_VALID_NAMES: dict[str, str] = {}
_VALID_NAMES_MAX = 4096


def _header_name(raw: str, is_response: bool) -> str:
    canonical = _VALID_NAMES.get(raw)
    if canonical is None:
        name = raw.rstrip(" \t")
        if not _TOKEN_RE.fullmatch(name):
            raise _fail(is_response, "Bad header line")
        canonical = _canonical_name(name)
        if len(_VALID_NAMES) < _VALID_NAMES_MAX:
            _VALID_NAMES[raw] = canonical
    return canonical


def header_name(raw: str) -> str | None:
    """The canonical spelling of the request header name ``raw`` (as sent, up to
    the colon), or None where :func:`parse_message` would refuse it."""
    try:
        return _header_name(raw, False)
    except SipMessageError:
        return None


def _unfold(
    lines: list[str], is_response: bool, limits: Limits, *, ctl_free: bool = False
) -> list[tuple[str, str]]:
    """Split header lines into (canonical name, value), joining folded lines (RFC 3261 7.3.1).

    ``ctl_free``: the caller has checked the whole section for control
    characters, so the per-value check (which names the header) is skipped.
    """
    headers: list[tuple[str, str]] = []
    for line in lines:
        if line[:1] in (" ", "\t"):
            if not headers:
                raise _fail(is_response, "Bad header folding")
            name, value = headers[-1]
            if not ctl_free and _CTL_RE.search(line):
                raise _fail(is_response, f"Control character in {name}")
            headers[-1] = (name, f"{value} {line.strip()}".strip())
            continue
        raw_name, sep, value = line.partition(":")
        if not sep:
            raise _fail(is_response, "Bad header line")
        name = _header_name(raw_name, is_response)
        if len(headers) >= limits.max_headers:
            raise _fail(is_response, "Too Many Headers")
        # Control characters other than HTAB have no business in a value
        # and would be copied into our answers if let through.
        if not ctl_free and _CTL_RE.search(value):
            raise _fail(is_response, "Control character in " + raw_name.rstrip(" \t"))
        headers.append((name, value.strip(" \t")))
    return headers


def parse_message(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Parse one complete SIP message (a datagram, or one frame from :mod:`framing`).

    Raises :class:`SipParseError` for a bad request or unclassifiable bytes
    and :class:`MalformedResponse` for a bad response; nothing else escapes.
    A body longer than Content-Length is truncated (RFC 3261 18.3); a shorter
    one is an error.
    """
    lines, body, ctl_free = _split_header_section(data, limits)
    start_line = lines[0]
    is_response = start_line.startswith("SIP/")
    message: ParsedRequest | ParsedResponse
    if is_response:
        m = _STATUS_RE.fullmatch(start_line)
        if m is None:
            raise MalformedResponse(reason="Bad status line")
        message = ParsedResponse(code=int(m.group(1)), phrase=m.group(2) or "")
    else:
        message = _parse_request_line(start_line)
    cast(IndexedHeaders, message.headers).extend(
        _unfold(lines[1:], is_response, limits, ctl_free=ctl_free)
    )
    message.body = _check_body(message, body, is_response)
    _check_mandatory(message, is_response)
    return message


def _parse_request_line(line: str) -> ParsedRequest:
    parts = line.split(" ")
    if len(parts) != 3:
        raise SipParseError(reason="Bad request line")
    method, uri_text, version = parts
    if not _TOKEN_RE.fullmatch(method):
        raise SipParseError(reason="Bad method")
    if version != "SIP/2.0":
        if version.upper().startswith("SIP/"):
            raise SipParseError(reason="Version Not Supported", status_code=505)
        raise SipParseError(reason="Bad request line")
    scheme = uri_text.partition(":")[0].lower()
    if scheme not in _SUPPORTED_SCHEMES:
        if ":" in uri_text and _TOKEN_RE.fullmatch(scheme):
            raise SipParseError(reason="Unsupported URI Scheme", status_code=416)
        raise SipParseError(reason="Bad Request-URI")
    try:
        uri = grammar.parse_uri(uri_text)
    except ValueError:
        raise SipParseError(reason="Bad Request-URI") from None
    return ParsedRequest(method=method, uri=uri)


def _check_body(message: Message, body: bytes, is_response: bool) -> bytes:
    values = message.headers.getlist("Content-Length")
    if not values:
        return body
    if len(values) > 1 and len(set(values)) > 1:
        raise _fail(is_response, "Conflicting Content-Length")
    if not _DIGITS_RE.fullmatch(values[0]):
        raise _fail(is_response, "Bad Content-Length")
    length = int(values[0])
    if length > len(body):
        raise _fail(is_response, "Body shorter than Content-Length")
    return body[:length]


def _check_mandatory(message: ParsedRequest | ParsedResponse, is_response: bool) -> None:
    hdrs = message.headers
    for name in _SINGLETONS:
        # Content-Length duplicates with one value were let through above.
        if name != "Content-Length" and len(hdrs.getlist(name)) > 1:
            raise _fail(is_response, f"Duplicate {name}")
    # The parses below are memoized on the message: the transaction layer
    # and the core read these same values again.
    if not hdrs.getlist("Via"):
        raise _fail(is_response, "Missing Via")
    try:
        message.via  # noqa: B018
    except ValueError:
        raise _fail(is_response, "Bad Via") from None
    for name in ("From", "To"):
        if hdrs.get(name) is None:
            raise _fail(is_response, f"Missing {name}")
    # From is only checked here (a response copies its text); parsed on demand.
    if not grammar.valid_address(hdrs.getlist("From")[0]):
        raise _fail(is_response, "Bad From")
    try:
        message.to_address  # noqa: B018
    except ValueError:
        raise _fail(is_response, "Bad To") from None
    if not hdrs.get("Call-ID"):
        raise _fail(is_response, "Missing Call-ID")
    if hdrs.get("CSeq") is None:
        raise _fail(is_response, "Missing CSeq")
    try:
        cseq = message.cseq
    except ValueError:
        raise _fail(is_response, "Bad CSeq") from None
    if cseq.sequence > MAX_CSEQ:
        raise _fail(is_response, "Bad CSeq")
    max_forwards = hdrs.get("Max-Forwards")
    # Max-Forwards is optional here (lenient towards old UAs), but a
    # present one must be a number a proxy could decrement.
    if max_forwards is not None and (
        not _DIGITS_RE.fullmatch(max_forwards) or int(max_forwards) > 255
    ):
        raise _fail(is_response, "Bad Max-Forwards")
    if isinstance(message, Request) and cseq.method != message.method:
        raise SipParseError(reason="CSeq method does not match request method")


def serialize(message: Message) -> bytes:
    """Bytes for the wire, with a Content-Length that matches the body.

    A stream peer cannot frame a message without Content-Length (RFC 3261
    18.3), so it is always written, even for an empty body.
    """
    message.headers.set("Content-Length", str(len(message.body)))
    return bytes(message)


def stateless_tag(call_id: str, from_value: str, branch: str) -> str:
    # A deterministic To tag means a retransmitted request gets a response
    # with the same tag even from a stateless responder, without an RNG.
    # Not a secret, just unique enough: a 64-bit BLAKE2b costs half a SHA-256.
    data = f"{call_id}\n{from_value}\n{branch}".encode()
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _has_tag(to_value: str) -> bool:
    try:
        return "tag" in grammar.parse_address(to_value).parameters
    except ValueError:
        return ";tag=" in to_value.lower().replace(" ", "")


def _to_has_tag(request: Request, to_value: str) -> bool:
    try:  # the parsed To (memoized on messages we parsed)
        return "tag" in request.to_address.parameters
    except (ValueError, KeyError):
        return _has_tag(to_value)


def make_response(
    request: Request,
    status: int,
    reason: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    *,
    to_tag: str | None = None,
    body: bytes = b"",
) -> Response:
    """Build a response per RFC 3261 8.2.6: Via (all, in order), From, To, Call-ID, CSeq copied.

    A To tag is added unless the request's To already has one or the status
    is 100 (8.2.6.2); pass ``to_tag`` to choose it, otherwise a stable one
    is derived from the request. Use :func:`serialize` to get bytes.
    """
    response = ParsedResponse(
        code=status, phrase=reason or REASON_PHRASES.get(status, ""), body=body
    )
    rh = response.headers
    qh = request.headers
    rh.setlist("Via", list(qh.getlist("Via")))
    from_value = qh.get("From", "") or ""
    rh.add("From", from_value)
    to_value = qh.get("To", "") or ""
    if status > 100 and to_value and not _to_has_tag(request, to_value):
        tag = to_tag or stateless_tag(qh.get("Call-ID", "") or "", from_value, _top_branch(request))
        to_value = f"{to_value};tag={tag}"
    rh.add("To", to_value)
    rh.add("Call-ID", qh.get("Call-ID", "") or "")
    rh.add("CSeq", qh.get("CSeq", "") or "")
    for name, value in headers:
        rh.add(name, value)
    return response


def _top_branch(request: Request) -> str:
    try:  # the parsed Via (memoized on messages we parsed)
        return request.via[0].parameters.get("branch") or ""
    except (ValueError, IndexError):
        return ""


def best_effort_400(
    data: bytes, error: SipMessageError | None = None, limits: Limits = DEFAULT_LIMITS
) -> bytes | None:
    """Answer bytes that failed :func:`parse_message`, if the answer could reach its sender.

    Returns the serialized error response (status and reason from ``error``,
    or from parsing ``data`` again when it is not given: usually 400, but 513,
    505 or 416 when that is what was wrong), or ``None`` when there is
    nothing to answer: the bytes parse fine, are a response, or the Via,
    From, To, Call-ID and CSeq the sender needs to match an answer cannot
    be salvaged.
    """
    if error is None:
        try:
            parse_message(data, limits)
        except SipMessageError as exc:
            error = exc
        else:
            return None
    if isinstance(error, MalformedResponse):
        return None
    salvaged = _salvage(data[: limits.max_message_size], limits)
    if salvaged is None:
        return None
    vias, from_value, to_value, call_id, cseq = salvaged
    if not _has_tag(to_value):
        to_value = f"{to_value};tag={stateless_tag(call_id, from_value, '')}"
    lines = [f"SIP/2.0 {error.status_code} {error.reason}"]
    lines += [f"Via: {v}" for v in vias]
    lines.append(f"From: {from_value}")
    lines.append(f"To: {to_value}")
    lines.append(f"Call-ID: {call_id}")
    lines.append(f"CSeq: {cseq}")
    lines += [f"{name}: {value}" for name, value in error.headers]
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


_Salvaged = tuple[list[str], str, str, str, str]


def _salvage(data: bytes, limits: Limits) -> _Salvaged | None:
    """Via, From, To, Call-ID and CSeq if each is present once (Via: at least once) and valid.

    From and To are required too: a response without them is malformed
    (RFC 3261 8.2.6.2) and a compliant UAC would drop it anyway.
    """
    start = 0
    while data.startswith(b"\r\n", start):
        start += 2
    end = data.find(b"\r\n\r\n", start)
    section = data[start:] if end < 0 else data[start:end]
    raw_lines = section.split(b"\r\n")
    if raw_lines[0].startswith(b"SIP/"):
        return None
    found: dict[str, list[str]] = {}
    for raw in raw_lines[1:]:
        if len(raw) > limits.max_line_length:
            continue  # copying it would make our answer too long to parse
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue  # one undecodable line must not cost us the others
        name, sep, value = line.partition(":")
        name = _canonical_name(name.strip(" \t"))
        value = value.strip(" \t")
        if not sep or not value or _CTL_RE.search(value):
            continue
        found.setdefault(name, []).append(value)
    vias = []
    for value in found.get("Via", []):
        try:
            vias += [str(v) for v in Via.parse_many(value)]
        except ValueError:
            return None  # a response routed on a half-read Via goes astray
    singles = {}
    for name in ("From", "To", "Call-ID", "CSeq"):
        values = found.get(name, [])
        if len(values) != 1:
            return None
        singles[name] = values[0]
    if not vias or len(vias) + 6 > limits.max_headers:
        return None
    try:
        cseq = str(CSeq.parse(singles["CSeq"]))
        Address.parse(singles["From"])
        Address.parse(singles["To"])
    except ValueError:
        return None
    return vias, singles["From"], singles["To"], singles["Call-ID"], cseq
