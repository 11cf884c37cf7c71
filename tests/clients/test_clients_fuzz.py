"""Hypothesis: whatever a registrar answers, the endpoint never raises and keeps going."""

from __future__ import annotations

from clients_harness import POOL1, World
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sipmessage import Request, Response

from sipdrill.clients.events import Mode
from sipdrill.sip.message import SipMessageError, make_response, parse_message, serialize

_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters=","),
    max_size=40,
)
_contact = st.one_of(
    _text,
    st.builds(
        lambda host, port, q, params: f"<sip:{host}:{port}{params}>;q={q}",
        st.sampled_from(["pool1.lab.local", "pool2.lab.local", "x.example", "10.0.2.11", "[::1]"]),
        st.integers(min_value=0, max_value=70000),
        st.one_of(st.floats(allow_nan=True), _text),
        st.sampled_from(["", ";transport=tls", ";transport=udp", ";transport=bogus"]),
    ),
    st.just("*"),
    st.just("<tel:+1555>"),
    st.just("<sips:pool2.lab.local>;q=0.5;expires=abc"),
)
_header = st.one_of(
    st.tuples(st.just("Contact"), _contact),
    st.tuples(st.just("Expires"), st.one_of(_text, st.integers(-5, 2**40).map(str))),
    st.tuples(
        st.just("X-Sipdrill-Mode"), st.one_of(_text, st.sampled_from(["resiliency", "full"]))
    ),
    st.tuples(st.just("Flow-Timer"), st.one_of(_text, st.integers(-5, 10**12).map(str))),
    st.tuples(st.just("Min-Expires"), st.one_of(_text, st.integers(-5, 10**12).map(str))),
    st.tuples(st.sampled_from(["Retry-After", "Warning", "Event", "X-Junk"]), _text),
)
_response = st.tuples(st.integers(min_value=100, max_value=699), st.lists(_header, max_size=6))


def _answer(request: Request, code: int, headers: list[tuple[str, str]]) -> Response | None:
    response = make_response(request, code)
    for name, value in headers:
        response.headers.add(name, value)
    try:
        parsed = parse_message(serialize(response))
    except SipMessageError:
        return None
    assert isinstance(parsed, Response)
    return parsed


def _check_alive(w: World) -> None:
    assert isinstance(w.mode, Mode)
    w.advance(2000)  # timers still run, and end somewhere sensible
    assert w.mode in (Mode.FULL_SERVICE, Mode.RESILIENCY_MODE, Mode.BACKING_OFF, Mode.SIGNING_IN)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers=st.lists(_response, min_size=1, max_size=4))
def test_any_answer_to_a_register_is_digested(
    answers: list[tuple[int, list[tuple[str, str]]]],
) -> None:
    w = World()
    w.registrars[POOL1].silent = True
    w.sign_in()
    assert w.mode is Mode.SIGNING_IN
    request = w.registrars[POOL1].registers[-1]
    for code, headers in answers:
        response = _answer(request, code, headers)
        if response is not None:
            w.feed(w.ep.receive(w.ep.conn, response))
    _check_alive(w)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers=st.lists(_response, min_size=1, max_size=4), when=st.floats(0, 400))
def test_any_answer_to_a_refresh_is_digested(
    answers: list[tuple[int, list[tuple[str, str]]]], when: float
) -> None:
    w = World()
    w.sign_in()
    w.registrars[POOL1].silent = True
    w.advance(when)
    request = w.registrars[POOL1].registers[-1]
    for code, headers in answers:
        response = _answer(request, code, headers)
        if response is not None and w.ep.conn:
            w.feed(w.ep.receive(w.ep.conn, response))
    w.registrars[POOL1].silent = False
    _check_alive(w)


@settings(max_examples=200, deadline=None)
@given(
    method=st.sampled_from(["NOTIFY", "MESSAGE", "INVITE", "BYE", "CANCEL", "FOO", "ACK"]),
    headers=st.lists(
        st.tuples(st.sampled_from(["Event", "Content-Type", "Subscription-State"]), _text),
        max_size=3,
    ),
)
def test_any_request_from_the_registrar_is_answered_or_absorbed(
    method: str, headers: list[tuple[str, str]]
) -> None:
    w = World()
    w.sign_in()
    lines = [
        f"{method} sip:alice@10.0.0.100:40001;transport=tls SIP/2.0",
        "Via: SIP/2.0/TLS 10.0.1.11:5061;branch=z9hG4bKfuzz",
        "From: <sip:pool1.lab.local>;tag=f",
        "To: <sip:alice@lab.local>",
        "Call-ID: fuzz",
        f"CSeq: 1 {method}",
        *[f"{n}: {v}" for n, v in headers],
        "Content-Length: 0",
    ]
    try:
        request = parse_message(("\r\n".join(lines) + "\r\n\r\n").encode())
    except SipMessageError:
        return
    w.feed(w.ep.receive(w.ep.conn, request))
    _check_alive(w)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400))
def test_random_bytes_that_parse_are_digested(data: bytes) -> None:
    w = World()
    w.sign_in()
    for raw in (data, b"SIP/2.0 200 OK\r\n" + data):
        try:
            message = parse_message(raw)
        except SipMessageError:
            continue
        w.feed(w.ep.receive(w.ep.conn, message))
    _check_alive(w)
