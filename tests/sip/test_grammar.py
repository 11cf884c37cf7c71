"""sipdrill.sip.grammar gives exactly what sipmessage gives, on any input."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sipmessage import URI, Address, CSeq, Via

from sipdrill.sip import grammar

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Fragments that build values close to the grammar's edges, so that most
# examples reach the fast path and many fall just off it.
_PIECES = [
    "sip:",
    "sips:",
    "tel:",
    "u7",
    "alice",
    "@",
    "lab.local",
    "127.0.0.1",
    "[::1]",
    ":5061",
    ":",
    "<",
    ">",
    ";",
    "tag=1234T7",
    "transport=UDP",
    "lr",
    "=",
    "+sip.instance=",
    '"',
    '"<urn:uuid:1>"',
    "%41",
    " ",
    "  ",
    "\t",
    ",",
    "expires=600",
    "SIP/2.0/UDP ",
    "SIP/2.0/TLS",
    "branch=z9hG4bK-1",
    "rport",
    "received=1.2.3.4",
    "1 ",
    "REGISTER",
    "Bob ",
    "-",
    ".",
    "q=0.7",
    "x",
]
VALUES = st.lists(st.sampled_from(_PIECES), max_size=10).map("".join) | st.text(max_size=40)


def _same(fast: Callable[[str], Any], slow: Callable[[str], Any], text: str) -> None:
    try:
        expected = slow(text)
    except ValueError:
        with pytest.raises(ValueError):
            fast(text)
        return
    got = fast(text)
    assert got == expected
    assert str(got) == str(expected)
    assert type(got) is type(expected)


@FUZZ
@given(VALUES)
@example("sip:u7@127.0.0.1:5061;transport=UDP")
@example("sip:a;b@host")
@example("sip:proxy.lab.local;lr")
def test_uri(text: str) -> None:
    _same(grammar.parse_uri, URI.parse, text)


@FUZZ
@given(VALUES)
@example("<sip:u7@lab.local>;tag=1234T7")
@example("<sip:a@b>;;x")
@example("<sip:u@h;lr>;x")
@example('<sip:u@h;transport=tls>;+sip.instance="<urn:uuid:1>";reg-id=1')
def test_address(text: str) -> None:
    _same(grammar.parse_address, Address.parse, text)


@FUZZ
@given(VALUES)
@example("<sip:u7@lab.local>;tag=1234T7")
@example("<sip:u@h>;;x")
@example('"A" <sip:u@h>')
@example("<tel:+1555>")
def test_valid_address_agrees_with_parsing(text: str) -> None:
    try:
        Address.parse(text)
    except ValueError:
        assert not grammar.valid_address(text)
    else:
        assert grammar.valid_address(text)


@FUZZ
@given(VALUES)
@example("<sip:u7@127.0.0.1:5061;transport=UDP>;expires=600")
def test_addresses(text: str) -> None:
    _same(grammar.parse_addresses, Address.parse_many, text)


@FUZZ
@given(VALUES)
@example("SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-7-1-0")
@example("SIP/2.0/UDP host ;branch=x")
@example("SIP/2.0/UDP 10.0.0.1:5060;rport;branch=z9hG4bK1")
@example("SIP/2.0/UDP h;rport;branch=z9hG4bK1, SIP/2.0/TCP g")
def test_vias(text: str) -> None:
    _same(grammar.parse_vias, Via.parse_many, text)


@FUZZ
@given(VALUES)
@example("1 REGISTER")
@example(" 1 REGISTER")
def test_cseq(text: str) -> None:
    _same(grammar.parse_cseq, CSeq.parse, text)


def test_the_common_values_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("fell back to sipmessage")

    for cls in (URI, Address, Via, CSeq):
        monkeypatch.setattr(cls, "parse", refuse)
    monkeypatch.setattr(Address, "parse_many", refuse)
    monkeypatch.setattr(Via, "parse_many", refuse)
    assert grammar.parse_address("<sip:u7@lab.local>;tag=1").parameters["tag"] == "1"
    assert grammar.parse_addresses("<sip:u7@10.0.0.1:5061;transport=tls>")[0].uri.port == 5061
    assert grammar.parse_vias("SIP/2.0/TLS 10.0.0.1;branch=z9hG4bKx")[0].host == "10.0.0.1"
    assert grammar.parse_cseq("2 REGISTER").sequence == 2
    assert grammar.valid_address("<sip:u7@lab.local>;tag=1")
