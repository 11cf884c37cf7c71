"""The registrar's common REGISTER over UDP, from the datagram to the answer's bytes.

The full path (``parse_message``, the transaction layer's events, the
registrar's ``handle`` and ``make_response``) builds a sipmessage request
with an indexed header table, a response of the same kind, and serializes
it: most of the registrar's CPU per REGISTER. A REGISTER as user agents send
it (one Via, one Contact, no body, no authentication) needs none of that:
:func:`read_register` takes apart just the headers the registrar reads and
:func:`answer_register` binds and writes the 200 directly.

It takes that path only when nothing is unusual, and gives None otherwise,
so that the full path answers (and, for bad input, answers 400/513 as it
always did). Every header value it reads is validated by the same grammar
functions (``sipdrill.sip.grammar``) the full path uses, so it builds the
same objects; the rest (line structure, limits, duplicate and mandatory
headers) it checks more strictly than ``parse_message``. What it leaves
behind is what the full path would: the same bindings (``Registrar.bind_plain``
shares the binding code) and a completed server transaction holding the
answer, so a retransmission gets the same bytes whichever path took the
original. ``tests/sip/test_fastpath.py`` checks both paths agree, state and
answer, on generated REGISTERs.

Sans-IO: bytes, the flow they came on and ``now`` in, bytes out.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from sipmessage import Address
from sipmessage.address import ADDRESS_PATTERNS
from sipmessage.cseq import CSEQ_PATTERN
from sipmessage.uri import SIP_URI_PATTERN
from sipmessage.via import VIA_PATTERN

from sipdrill.sip import grammar
from sipdrill.sip.message import (
    DEFAULT_LIMITS,
    MAX_CSEQ,
    Limits,
    header_name,
    stateless_tag,
)
from sipdrill.sip.registrar import Registrar
from sipdrill.sip.transaction import MAGIC_COOKIE, TransactionKey, TransactionManager
from sipdrill.sip.transport import Flow, stamped_via

__all__ = ["PlainRegister", "answer_register", "read_register"]

# Any control character but CR and LF, which are checked to come as CRLF
# pairs by counting. HTAB too: the full path normalises whitespace around it.
_UNUSUAL = re.compile("[\x00-\x09\x0b\x0c\x0e-\x1f\x7f]")
_DIGITS = re.compile("[0-9]+")
# The headers read, each at most once (a second copy sends the request the
# full way); any other is checked to be a valid name and otherwise ignored,
# as the full path ignores it.
_READ = ("Via", "From", "To", "Call-ID", "CSeq", "Contact", "Expires", "Max-Forwards",
         "Content-Length")  # fmt: skip
_SLOT = {name: i for i, name in enumerate(_READ)}
_IGNORED = -1

# Raw header names (slot in _READ, or _IGNORED) and Request-URIs found valid
# before: a client repeats the same dozen names and one Request-URI.
# Bounded, so that a peer inventing names cannot grow them.
_NAMES: dict[str, int] = {}
_REQUEST_URIS: set[str] = set()
_MEMO_MAX = 4096

# sipmessage's own patterns, as sipdrill.sip.grammar uses them: a value they
# match in full with nothing to normalise is one grammar would build the
# objects of straight from the match; any other value goes the full way.
_NOT_PLAIN = re.compile(r'[\s%",]')
# grammar's _NOT_PLAIN_VIA less its " .* " (a second space), which is
# counted instead: that alternative made the search cost as much as the match.
_NOT_PLAIN_VIA = re.compile(r'[^\S ]|[%",]')
_NAME_ADDR = ADDRESS_PATTERNS[0]


class PlainRegister(NamedTuple):
    """What the registrar needs of a REGISTER, as sent (values stripped as the full path does)."""

    via: str
    from_value: str
    to_value: str
    aor: str
    to_host: str
    to_tagged: bool
    call_id: str
    cseq_text: str
    cseq: int
    contact_text: str  # "" for a query (no Contact)
    contact: Address | None
    expires: int | None
    branch: str
    sent_by: str


def _request_uri_ok(text: str) -> bool:
    if text in _REQUEST_URIS:
        return True
    if text.partition(":")[0].lower() not in ("sip", "sips"):
        return False
    try:
        grammar.parse_uri(text)
    except ValueError:
        return False
    if len(_REQUEST_URIS) < _MEMO_MAX:
        _REQUEST_URIS.add(text)
    return True


def _full_match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    m = pattern.match(text)
    return m if m is not None and m.end() == len(text) else None


def _param_names(text: str) -> list[str]:
    """The names in a plain ``;a=b;c`` (as grammar's _parameters reads them)."""
    return [bit.partition("=")[0] for bit in text[1:].split(";")] if text else []


def read_register(data: bytes, limits: Limits = DEFAULT_LIMITS) -> PlainRegister | None:
    """The REGISTER in ``data`` taken apart, or None when anything is unusual
    (the full path then answers it, error or not)."""
    if not data.startswith(b"REGISTER ") or len(data) > limits.max_message_size:
        return None
    end = data.find(b"\r\n\r\n")
    # No body (so Content-Length is 0 or absent), nothing but ASCII.
    if end + 4 != len(data) or not data.isascii():
        return None
    text = data[:end].decode("ascii")
    if _UNUSUAL.search(text) is not None:
        return None
    lines = text.split("\r\n")
    count = len(lines) - 1
    if text.count("\r") != count or text.count("\n") != count or count > limits.max_headers:
        return None
    if max(map(len, lines)) > limits.max_line_length:
        return None
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] != "SIP/2.0" or not _request_uri_ok(parts[1]):
        return None
    values: list[str | None] = [None] * len(_READ)
    for line in lines[1:]:
        raw, sep, value = line.partition(":")
        if not sep:
            return None
        slot = _NAMES.get(raw)
        if slot is None:
            # Folding (a leading space) is refused here too: not a token.
            name = header_name(raw)
            if name is None:
                return None
            slot = _SLOT.get(name, _IGNORED)
            if len(_NAMES) < _MEMO_MAX:
                _NAMES[raw] = slot
        if slot != _IGNORED:
            if values[slot] is not None:
                return None
            values[slot] = value.strip(" ")
    return _plain(*values)


def _plain(
    via: str | None,
    from_value: str | None,
    to_value: str | None,
    call_id: str | None,
    cseq_text: str | None,
    contact_text: str | None,
    expires_text: str | None,
    max_forwards: str | None,
    length: str | None,
) -> PlainRegister | None:
    if via is None or from_value is None or to_value is None or not call_id or cseq_text is None:
        return None
    if max_forwards is not None and (
        _DIGITS.fullmatch(max_forwards) is None or int(max_forwards) > 255
    ):
        return None
    if length is not None and (_DIGITS.fullmatch(length) is None or int(length) != 0):
        return None
    expires = None
    if expires_text is not None:
        if not (expires_text.isdigit() and expires_text.isascii()):
            return None
        expires = int(expires_text)
    # Via: one, plain (so its parameters have no spaces to trim).
    if _NOT_PLAIN_VIA.search(via) is not None or via.count(" ") > 1:
        return None
    m = VIA_PATTERN.match(via)
    if m is None or m.end() != len(via):
        return None
    branch = ""
    params = m.group("parameters")
    if params:
        for bit in params[1:].split(";"):
            name, _, value = bit.partition("=")
            if name == "branch":
                branch = value  # the last one, as Parameters keeps it
    if not branch.startswith(MAGIC_COOKIE):
        return None
    port_text = m.group("port")
    port = int(port_text) if port_text else None
    sent_by = f"{m.group('host')}:{port or ''}"
    # CSeq
    if _NOT_PLAIN_VIA.search(cseq_text) is not None or cseq_text.count(" ") > 1:
        return None
    m = CSEQ_PATTERN.match(cseq_text)
    if m is None or m.group("method") != "REGISTER":
        return None
    cseq = int(m.group("sequence"))
    if cseq > MAX_CSEQ:
        return None
    # From: valid; To: plain name-addr with a sip(s) URI.
    if not grammar.valid_address(from_value) or _NOT_PLAIN.search(to_value) is not None:
        return None
    m = _NAME_ADDR.match(to_value)
    if m is None or m.end() != len(to_value) or m.group("name"):
        return None
    to_tagged = "tag" in _param_names(m.group("parameters"))
    m = SIP_URI_PATTERN.match(m.group("uri"))
    if m is None:
        return None
    user, host = m.group("user"), m.group("host")
    scheme = "sip" if m.group("scheme") == "sips" else m.group("scheme")
    aor = (f"{scheme}:{user}@{host}" if user else f"{scheme}:{host}").lower()
    contact = None
    if contact_text is None:
        contact_text = ""  # a query
    else:
        if not contact_text or "," in contact_text or "*" in contact_text:
            return None  # several contacts, a removal of all: the full path's business
        try:
            contacts = grammar.parse_addresses(contact_text)
        except ValueError:
            return None
        if len(contacts) != 1:
            return None
        contact = contacts[0]
    return PlainRegister(
        via=via,
        from_value=from_value,
        to_value=to_value,
        aor=aor,
        to_host=host,
        to_tagged=to_tagged,
        call_id=call_id,
        cseq_text=cseq_text,
        cseq=cseq,
        contact_text=contact_text,
        contact=contact,
        expires=expires,
        branch=branch,
        sent_by=sent_by,
    )


def answer_register(
    registrar: Registrar,
    transactions: TransactionManager,
    data: bytes,
    flow: Flow,
    now: float,
    server_name: str,
    limits: Limits = DEFAULT_LIMITS,
) -> bytes | None:
    """The 200 to the REGISTER datagram ``data`` from ``flow``, its binding made and
    its server transaction filed; None, with nothing changed, when the full path
    has to answer (anything unusual, a retransmission, any answer but a 200)."""
    if registrar.auth is not None or registrar.policy is not None:
        return None
    plain = read_register(data, limits)
    if plain is None:
        return None
    if plain.to_host.lower() != registrar.domain:
        return None
    key = TransactionKey(plain.branch, "REGISTER", plain.sent_by)
    if transactions.server(key) is not None:
        return None  # a retransmission: the transaction answers it
    via = stamped_via(plain.via, flow.remote)
    if via is None:
        via = plain.via
    elif (
        _NOT_PLAIN_VIA.search(via) is not None
        or via.count(" ") > 1
        or _full_match(VIA_PATTERN, via) is None
    ):
        # The full path parses the Via again once stamped (an IPv6 received=
        # is no token, for one): let it.
        return None
    headers = registrar.bind_plain(
        plain.aor,
        plain.contact,
        plain.contact_text,
        plain.expires,
        plain.call_id,
        plain.cseq,
        now,
        flow,
    )
    if headers is None:
        return None
    to_value = plain.to_value
    if not plain.to_tagged:
        to_value += ";tag=" + stateless_tag(plain.call_id, plain.from_value, plain.branch)
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
    answer = (
        f"SIP/2.0 200 OK\r\nVia: {via}\r\nFrom: {plain.from_value}\r\nTo: {to_value}\r\n"
        f"Call-ID: {plain.call_id}\r\nCSeq: {plain.cseq_text}\r\n{extra}"
        f"Server: {server_name}\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    transactions.answered(key, 200, answer, now, reliable=False, peer=flow.remote)
    return answer
