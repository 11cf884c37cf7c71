"""Fast paths for the header grammars sipmessage parses: same objects, less work.

sipmessage's parsers normalise whitespace with a regex substitution, parse
parameters with two more regexes and percent-decode every name and value,
for every value, every time. Nearly every value a registrar sees has no
whitespace to normalise, no percent escape and no quoted string; for those,
sipmessage's own compiled patterns still decide what is valid (so the fast
path accepts exactly what sipmessage accepts), and the objects are built
from the match directly. Anything else (folding, escapes, quoted display
names, comma-separated lists) goes to sipmessage unchanged.
``tests/sip/test_grammar.py`` checks the two paths agree on arbitrary input.
"""

from __future__ import annotations

import re
from typing import Any

from sipmessage import URI, Address, CSeq, Parameters, Via
from sipmessage.address import ADDRESS_PATTERNS
from sipmessage.cseq import CSEQ_PATTERN
from sipmessage.uri import SIP_URI_PATTERN
from sipmessage.via import VIA_PATTERN

__all__ = [
    "parse_address",
    "parse_addresses",
    "parse_cseq",
    "parse_uri",
    "parse_vias",
    "valid_address",
]

# What makes a value need sipmessage's full treatment: whitespace it would
# normalise, a percent escape it would decode, a quoted string or a comma
# (a list, or a comma inside quotes).
_NOT_PLAIN = re.compile(r'[\s%",]')
# The same, except that one space (the one a Via or CSeq needs) is allowed.
_NOT_PLAIN_VIA = re.compile(r'[^\S ]|[%",]| .* ')
_NAME_ADDR = ADDRESS_PATTERNS[0]


def _new(cls: type[Any], fields: dict[str, Any]) -> Any:
    # Frozen dataclasses set each field through object.__setattr__, which
    # costs more than the parse; filling __dict__ makes an equal object.
    obj = object.__new__(cls)
    obj.__dict__.update(fields)
    return obj


_EMPTY_PARAMETERS = Parameters()


def param_name(parameters: Parameters, name: str) -> str | None:
    """The parameter ``name`` (lower case) as spelled in ``parameters``, or None.

    RFC 3261 7.3.1: parameter names are case-insensitive; sipmessage keeps them
    as sent, so ``parameters.get("expires")`` misses ``;EXPIRES=0``.
    """
    if name in parameters:
        return name
    for key in parameters:
        if key.lower() == name:
            return str(key)
    return None


def _parameters(text: str) -> Parameters:
    """``;a=b;c`` already validated by a sipmessage pattern, with nothing to decode."""
    if not text:
        return _EMPTY_PARAMETERS  # immutable, so one instance serves every value
    data: dict[str, str | None] = {}
    for bit in text[1:].split(";"):
        name, eq, value = bit.partition("=")
        data[name] = value if eq else None
    return Parameters(**data)


def parse_uri(text: str) -> URI:
    """:meth:`sipmessage.URI.parse`."""
    if _NOT_PLAIN.search(text) is None:
        m = SIP_URI_PATTERN.match(text)
        if m is not None:
            port = m.group("port")
            return _new(  # type: ignore[no-any-return]
                URI,
                {
                    "scheme": m.group("scheme"),
                    "host": m.group("host"),
                    "user": m.group("user") or None,
                    "password": m.group("password") or None,
                    "port": int(port) if port else None,
                    "parameters": _parameters(m.group("parameters")),
                },
            )
    return URI.parse(text)


def _plain_name_addr(text: str) -> re.Match[str] | None:
    """The name-addr match when ``text`` can take the fast path (no display name), else None."""
    if _NOT_PLAIN.search(text) is None:
        m = _NAME_ADDR.match(text)
        if m is not None and m.end() == len(text) and not m.group("name"):
            return m
    return None


def parse_address(text: str) -> Address:
    """:meth:`sipmessage.Address.parse` (one address)."""
    m = _plain_name_addr(text)
    if m is not None:
        return _new(  # type: ignore[no-any-return]
            Address,
            {
                "uri": parse_uri(m.group("uri")),
                "name": "",
                "parameters": _parameters(m.group("parameters")),
            },
        )
    return Address.parse(text)


def valid_address(text: str) -> bool:
    """Whether :func:`parse_address` accepts ``text``, without building the objects.

    For a header a server only checks and copies (a REGISTER's From).
    """
    m = _plain_name_addr(text)
    if m is not None and SIP_URI_PATTERN.match(m.group("uri")) is not None:
        return True
    try:
        parse_address(text)
    except ValueError:
        return False
    return True


def parse_addresses(text: str) -> list[Address]:
    """:meth:`sipmessage.Address.parse_many`."""
    if _NOT_PLAIN.search(text) is None and text:
        return [parse_address(text)]
    return Address.parse_many(text)


def parse_vias(text: str) -> list[Via]:
    """:meth:`sipmessage.Via.parse_many`."""
    if _NOT_PLAIN_VIA.search(text) is None:
        m = VIA_PATTERN.match(text)
        if m is not None and m.end() == len(text):
            port = m.group("port")
            return [
                _new(
                    Via,
                    {
                        "transport": m.group("transport"),
                        "host": m.group("host"),
                        "port": int(port) if port else None,
                        "parameters": _parameters(m.group("parameters")),
                    },
                )
            ]
    return Via.parse_many(text)


def parse_cseq(text: str) -> CSeq:
    """:meth:`sipmessage.CSeq.parse`."""
    if _NOT_PLAIN_VIA.search(text) is None:
        m = CSEQ_PATTERN.match(text)
        if m is not None:
            return _new(  # type: ignore[no-any-return]
                CSeq, {"sequence": int(m.group("sequence")), "method": m.group("method")}
            )
    return CSeq.parse(text)
