"""parse_message, serialize, make_response and best_effort_400."""

from __future__ import annotations

import contextlib
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sipmessage import Request, Response

from sipdrill.errors import SipError
from sipdrill.sip.message import (
    Limits,
    MalformedResponse,
    SipMessageError,
    SipParseError,
    best_effort_400,
    make_response,
    parse_message,
    serialize,
)

REGISTER = (
    b"REGISTER sip:example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP 10.0.0.1:5060;branch=z9hG4bKabc\r\n"
    b"Max-Forwards: 70\r\n"
    b"From: <sip:alice@example.com>;tag=1928301774\r\n"
    b"To: <sip:alice@example.com>\r\n"
    b"Call-ID: a84b4c76e66710\r\n"
    b"CSeq: 314159 REGISTER\r\n"
    b"Contact: <sip:alice@10.0.0.1:5060;transport=tcp>\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)

OK_RESPONSE = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/TCP 10.0.0.1:5060;branch=z9hG4bKabc\r\n"
    b"From: <sip:alice@example.com>;tag=1928301774\r\n"
    b"To: <sip:alice@example.com>;tag=37GkEhwl6\r\n"
    b"Call-ID: a84b4c76e66710\r\n"
    b"CSeq: 314159 REGISTER\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)


def drop_header(data: bytes, name: bytes) -> bytes:
    return b"".join(
        line for line in data.splitlines(keepends=True) if not line.startswith(name + b":")
    )


def replace(data: bytes, old: bytes, new: bytes) -> bytes:
    assert old in data
    return data.replace(old, new)


def reason_of(data: bytes, limits: Limits = Limits()) -> tuple[type[SipError], int, str]:
    with pytest.raises(SipMessageError) as info:
        parse_message(data, limits)
    return type(info.value), info.value.status_code, info.value.reason


class TestParseValid:
    def test_request_fields(self) -> None:
        msg = parse_message(REGISTER)
        assert isinstance(msg, Request)
        assert msg.method == "REGISTER"
        assert str(msg.uri) == "sip:example.com"
        assert msg.call_id == "a84b4c76e66710"
        assert msg.cseq.sequence == 314159
        assert msg.via[0].parameters["branch"] == "z9hG4bKabc"
        assert str(msg.contact[0].uri) == "sip:alice@10.0.0.1:5060;transport=tcp"
        assert msg.body == b""

    def test_response_fields(self) -> None:
        msg = parse_message(OK_RESPONSE)
        assert isinstance(msg, Response)
        assert (msg.code, msg.phrase) == (200, "OK")
        assert msg.to_address.parameters["tag"] == "37GkEhwl6"

    def test_compact_forms_are_expanded(self) -> None:
        data = REGISTER.replace(b"Call-ID:", b"i:").replace(b"Via:", b"v:")
        data = data.replace(b"From:", b"f:").replace(b"To:", b"t:").replace(b"Contact:", b"m:")
        msg = parse_message(data)
        assert msg.headers.get("Call-ID") == "a84b4c76e66710"
        assert msg.headers.keys()[0] == "Via"
        assert "Contact: <sip:alice@10.0.0.1" in serialize(msg).decode()

    def test_header_names_are_case_insensitive(self) -> None:
        msg = parse_message(REGISTER.replace(b"Call-ID:", b"CALL-ID:").replace(b"CSeq", b"cseq"))
        assert msg.call_id == "a84b4c76e66710"
        assert msg.cseq.method == "REGISTER"

    def test_folded_header_is_joined(self) -> None:
        data = replace(REGISTER, b"Max-Forwards: 70\r\n", b"Subject: I know\r\n  you're there\r\n")
        assert parse_message(data).headers.get("Subject") == "I know you're there"

    def test_leading_crlf_is_ignored(self) -> None:
        assert isinstance(parse_message(b"\r\n\r\n" + REGISTER), Request)

    def test_body_longer_than_content_length_is_truncated(self) -> None:
        data = replace(REGISTER, b"Content-Length: 0", b"Content-Length: 3") + b"abcdef"
        assert parse_message(data).body == b"abc"

    def test_body_without_content_length_is_taken_whole(self) -> None:
        assert parse_message(drop_header(REGISTER, b"Content-Length") + b"xyz").body == b"xyz"

    def test_max_forwards_is_optional(self) -> None:
        assert isinstance(parse_message(drop_header(REGISTER, b"Max-Forwards")), Request)

    def test_response_with_empty_reason(self) -> None:
        msg = parse_message(replace(OK_RESPONSE, b"200 OK", b"200"))
        assert isinstance(msg, Response)
        assert msg.code == 200


class TestParseErrors:
    @pytest.mark.parametrize(
        ("name", "reason"),
        [
            (b"Via", "Missing Via"),
            (b"From", "Missing From"),
            (b"To", "Missing To"),
            (b"Call-ID", "Missing Call-ID"),
            (b"CSeq", "Missing CSeq"),
        ],
    )
    def test_missing_mandatory_header(self, name: bytes, reason: str) -> None:
        assert reason_of(drop_header(REGISTER, name)) == (SipParseError, 400, reason)

    def test_missing_header_in_response_is_malformed_response(self) -> None:
        assert reason_of(drop_header(OK_RESPONSE, b"Call-ID")) == (
            MalformedResponse,
            400,
            "Missing Call-ID",
        )

    def test_malformed_response_is_not_a_parse_error(self) -> None:
        # Callers answer SipParseError with a response; a response must never be answered.
        assert not issubclass(MalformedResponse, SipParseError)

    @pytest.mark.parametrize(
        ("old", "new", "reason"),
        [
            (b"CSeq: 314159 REGISTER", b"CSeq: REGISTER", "Bad CSeq"),
            (b"CSeq: 314159 REGISTER", b"CSeq: 2147483648 REGISTER", "Bad CSeq"),
            (
                b"CSeq: 314159 REGISTER",
                b"CSeq: 1 INVITE",
                "CSeq method does not match request method",
            ),
            (b"Via: SIP/2.0/TCP 10.0.0.1:5060", b"Via: garbage", "Bad Via"),
            (b"From: <sip:alice@example.com>", b"From: <>", "Bad From"),
            (b"Max-Forwards: 70", b"Max-Forwards: many", "Bad Max-Forwards"),
            (b"Max-Forwards: 70", b"Max-Forwards: 256", "Bad Max-Forwards"),
            (b"Content-Length: 0", b"Content-Length: x", "Bad Content-Length"),
            (b"Content-Length: 0", b"Content-Length: 9", "Body shorter than Content-Length"),
            (b"Max-Forwards: 70", b"No colon here", "Bad header line"),
            (b"Max-Forwards: 70", b"Bad Name: 1", "Bad header line"),
            (b"Max-Forwards: 70", b"Subject: a\x01b", "Control character in Subject"),
            (b"Max-Forwards: 70", b"Subject : a\rb", "Control character in Subject"),
            (b"Max-Forwards: 70", b"Subject: a\r\n \x7fb", "Control character in Subject"),
            (b"Max-Forwards: 70", b"Subject: a\nb", "Control character in Subject"),
            (b"Max-Forwards: 70", b"Call-ID: second", "Duplicate Call-ID"),
            (b"REGISTER sip:example.com SIP/2.0", b"REGISTER sip:example.com", "Bad request line"),
            (
                b"REGISTER sip:example.com SIP/2.0",
                b"REG@STER sip:example.com SIP/2.0",
                "Bad method",
            ),
            (
                b"REGISTER sip:example.com SIP/2.0",
                b"REGISTER sip:exa mple SIP/2.0",
                "Bad request line",
            ),
            (b"REGISTER sip:example.com SIP/2.0", b"REGISTER sip:@@ SIP/2.0", "Bad Request-URI"),
            (b"REGISTER sip:example.com SIP/2.0", b"REGISTER example SIP/2.0", "Bad Request-URI"),
            (b"CSeq", b"\xffSeq", "Header section is not valid UTF-8"),
        ],
    )
    def test_bad_request(self, old: bytes, new: bytes, reason: str) -> None:
        assert reason_of(replace(REGISTER, old, new)) == (SipParseError, 400, reason)

    def test_conflicting_content_length(self) -> None:
        data = replace(REGISTER, b"Max-Forwards: 70", b"Content-Length: 1")
        assert reason_of(data)[2] == "Conflicting Content-Length"

    def test_repeated_equal_content_length_is_tolerated(self) -> None:
        data = replace(REGISTER, b"Max-Forwards: 70", b"Content-Length: 0")
        assert isinstance(parse_message(data), Request)

    def test_unsupported_version(self) -> None:
        data = replace(REGISTER, b"sip:example.com SIP/2.0", b"sip:example.com SIP/3.0")
        assert reason_of(data) == (SipParseError, 505, "Version Not Supported")

    def test_unsupported_uri_scheme(self) -> None:
        data = replace(REGISTER, b"sip:example.com SIP/2.0", b"im:alice@example.com SIP/2.0")
        assert reason_of(data) == (SipParseError, 416, "Unsupported URI Scheme")

    def test_too_large(self) -> None:
        data = replace(REGISTER, b"Content-Length: 0", b"Content-Length: 100") + b"x" * 100
        assert reason_of(data, Limits(max_message_size=len(REGISTER))) == (
            SipParseError,
            513,
            "Message Too Large",
        )

    def test_too_many_headers(self) -> None:
        extra = b"".join(b"X-H%d: v\r\n" % i for i in range(5))
        data = replace(REGISTER, b"Max-Forwards: 70\r\n", extra)
        assert reason_of(data, Limits(max_headers=10))[2] == "Too Many Headers"
        assert isinstance(parse_message(data, Limits(max_headers=13)), Request)

    def test_line_too_long(self) -> None:
        data = replace(REGISTER, b"Max-Forwards: 70", b"Subject: " + b"a" * 100)
        assert reason_of(data, Limits(max_line_length=100))[2] == "Header line too long"
        assert isinstance(parse_message(data, Limits(max_line_length=109)), Request)

    def test_no_blank_line(self) -> None:
        assert reason_of(REGISTER[:-2])[2] == "Missing end of header section"

    @pytest.mark.parametrize("data", [b"", b"\r\n", b"\r\n\r\n"])
    def test_empty(self, data: bytes) -> None:
        assert reason_of(data)[2] in {"Missing start line", "Missing end of header section"}

    def test_fold_at_first_header(self) -> None:
        data = replace(REGISTER, b"SIP/2.0\r\nVia", b"SIP/2.0\r\n Via")
        assert reason_of(data)[2] == "Bad header folding"

    def test_bad_status_line(self) -> None:
        assert reason_of(replace(OK_RESPONSE, b"SIP/2.0 200", b"SIP/2.0 2000")) == (
            MalformedResponse,
            400,
            "Bad status line",
        )


class TestSerializeAndResponses:
    def test_round_trip(self) -> None:
        msg = parse_message(REGISTER)
        again = parse_message(serialize(msg))
        assert isinstance(again, Request)
        assert str(again.headers) == str(msg.headers)

    def test_serialize_sets_content_length(self) -> None:
        msg = parse_message(REGISTER)
        msg.body = b"hello"
        assert b"Content-Length: 5\r\n" in serialize(msg)
        assert parse_message(serialize(msg)).body == b"hello"

    def test_make_response_copies_rfc3261_headers(self) -> None:
        req = parse_message(
            replace(
                REGISTER,
                b"Max-Forwards: 70\r\n",
                b"Via: SIP/2.0/UDP 10.0.0.9;branch=z9hG4bKsecond\r\n",
            )
        )
        assert isinstance(req, Request)
        resp = make_response(req, 423, headers=[("Min-Expires", "300")])
        parsed = parse_message(serialize(resp))
        assert isinstance(parsed, Response)
        assert (parsed.code, parsed.phrase) == (423, "Interval Too Brief")
        assert [v.parameters["branch"] for v in parsed.via] == ["z9hG4bKabc", "z9hG4bKsecond"]
        assert parsed.headers.get("From") == req.headers.get("From")
        assert parsed.call_id == req.call_id
        assert str(parsed.cseq) == str(req.cseq)
        assert parsed.min_expires == 300
        assert parsed.to_address.parameters["tag"]

    def test_to_tag_is_stable_across_retransmissions(self) -> None:
        req = parse_message(REGISTER)
        assert isinstance(req, Request)
        tag1 = make_response(req, 200).to_address.parameters["tag"]
        tag2 = make_response(parse_message(REGISTER), 200).to_address.parameters["tag"]  # type: ignore[arg-type]
        assert tag1 == tag2
        assert make_response(req, 200, to_tag="mine").to_address.parameters["tag"] == "mine"

    def test_no_tag_on_100_and_existing_tag_kept(self) -> None:
        req = parse_message(REGISTER)
        assert isinstance(req, Request)
        assert "tag" not in make_response(req, 100).to_address.parameters
        tagged = parse_message(
            replace(REGISTER, b"To: <sip:alice@example.com>", b"To: <sip:alice@example.com>;tag=x")
        )
        assert isinstance(tagged, Request)
        assert make_response(tagged, 200).headers.get("To") == "<sip:alice@example.com>;tag=x"

    def test_custom_reason(self) -> None:
        req = parse_message(REGISTER)
        assert isinstance(req, Request)
        assert serialize(make_response(req, 403, "Not your domain")).startswith(
            b"SIP/2.0 403 Not your domain\r\n"
        )


class TestBestEffort400:
    def test_answers_bad_cseq_method(self) -> None:
        data = replace(REGISTER, b"CSeq: 314159 REGISTER", b"CSeq: 314159 INVITE")
        answer = best_effort_400(data)
        assert answer is not None
        resp = parse_message(answer)
        assert isinstance(resp, Response)
        assert (resp.code, resp.phrase) == (400, "CSeq method does not match request method")
        assert resp.via[0].parameters["branch"] == "z9hG4bKabc"
        assert resp.call_id == "a84b4c76e66710"
        assert resp.to_address.parameters["tag"]

    def test_answers_garbage_header_line(self) -> None:
        for junk, reason in [
            (b"\x80\x81 junk", b"Header section is not valid UTF-8"),
            (b"@@@ junk", b"Bad header line"),
        ]:
            answer = best_effort_400(replace(REGISTER, b"Max-Forwards: 70", junk))
            assert answer is not None
            assert answer.startswith(b"SIP/2.0 400 " + reason + b"\r\n")

    def test_uses_error_status(self) -> None:
        data = replace(REGISTER, b"sip:example.com SIP/2.0", b"sip:example.com SIP/3.0")
        answer = best_effort_400(data)
        assert answer is not None
        assert answer.startswith(b"SIP/2.0 505 Version Not Supported\r\n")

    def test_passes_given_error_through(self) -> None:
        err = SipParseError(reason="Message Too Large", status_code=513)
        answer = best_effort_400(REGISTER, err)
        assert answer is not None
        assert answer.startswith(b"SIP/2.0 513 Message Too Large\r\n")

    @pytest.mark.parametrize("name", [b"Via", b"Call-ID", b"CSeq", b"From", b"To"])
    def test_silent_without_routing_headers(self, name: bytes) -> None:
        assert best_effort_400(drop_header(REGISTER, name)) is None

    def test_silent_for_valid_message_and_responses(self) -> None:
        assert best_effort_400(REGISTER) is None
        assert best_effort_400(drop_header(OK_RESPONSE, b"From")) is None
        assert best_effort_400(b"\x00\x01garbage") is None


# --- fuzzing: nothing but SipError subclasses may escape ----------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check(data: bytes) -> None:
    with contextlib.suppress(SipError):
        parse_message(data)
    answer = best_effort_400(data)
    if answer is not None:
        assert isinstance(parse_message(answer), Response)


@FUZZ
@given(st.binary(max_size=2000))
def test_fuzz_random_bytes(data: bytes) -> None:
    _check(data)


@FUZZ
@given(
    st.sampled_from([REGISTER, OK_RESPONSE]),
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=len(REGISTER)),
            st.integers(min_value=0, max_value=8),
            st.binary(max_size=8)
            | st.sampled_from([b"\r\n", b":", b" ", b";", b"<", b">", b"\r\n ", b",", b"\x00"]),
        ),
        max_size=6,
    ),
)
def test_fuzz_mutated_messages(base: bytes, edits: list[tuple[int, int, bytes]]) -> None:
    data = base
    for pos, cut, insert in edits:
        data = data[:pos] + insert + data[pos + cut :]
    _check(data)


@FUZZ
@given(st.text(max_size=60))
def test_fuzz_header_values(value: str) -> None:
    for name in (b"Via", b"From", b"To", b"CSeq", b"Contact", b"Call-ID"):
        lines = REGISTER.split(b"\r\n")
        data = b"\r\n".join(
            name + b": " + value.encode("utf-8") if line.startswith(name + b":") else line
            for line in lines
        )
        _check(data)


# --- IndexedHeaders and the memoized accessors ------------------------------------

_NAMES = st.sampled_from(["Via", "via", "VIA", "To", "to", "Contact", "X-A", "x-a"])
_OPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "set", "setlist", "remove"]),
        _NAMES,
        st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3),
    ),
    max_size=25,
)


@FUZZ
@given(_OPS)
def test_indexed_headers_behave_like_sipmessage_headers(
    ops: list[tuple[str, str, list[str]]],
) -> None:
    from sipmessage.message import Headers

    from sipdrill.sip.message import IndexedHeaders

    ours, theirs = IndexedHeaders(), Headers()
    for op, name, values in ops:
        for headers in (ours, theirs):
            if op == "add":
                headers.add(name, values[0])
            elif op == "set":
                headers.set(name, values[0])
            elif op == "setlist":
                headers.setlist(name, list(values))
            else:
                headers.remove(name)
        assert str(ours) == str(theirs)
        assert ours.keys() == theirs.keys()
        for probe in ("via", "To", "contact", "X-A"):
            assert ours.getlist(probe) == theirs.getlist(probe)
            assert ours.get(probe) == theirs.get(probe)


def test_parsed_values_follow_header_rewrites() -> None:
    request = parse_message(REGISTER)
    assert isinstance(request, Request)
    assert request.via[0].parameters["branch"] == "z9hG4bKabc"
    assert request.to_address.uri.user == "alice"
    # Written through the raw headers, the accessors parse the new text.
    request.headers.setlist("Via", ["SIP/2.0/UDP 10.0.0.2;branch=z9hG4bKnew"])
    request.headers.set("To", "<sip:bob@example.com>;tag=x")
    request.headers.set("CSeq", "7 REGISTER")
    assert request.via[0].parameters["branch"] == "z9hG4bKnew"
    assert request.to_address.uri.user == "bob"
    assert request.cseq.sequence == 7
    # A list handed out is the caller's: changing it changes nothing here.
    vias = request.via
    vias.clear()
    assert len(request.via) == 1
    # The setters write the header text.
    request.to_address = parse_message(REGISTER).from_address
    assert request.headers.get("To") == "<sip:alice@example.com>;tag=1928301774"


def test_make_response_reads_the_parsed_to_tag() -> None:
    request = parse_message(
        REGISTER.replace(b"To: <sip:alice@example.com>", b"To: <sip:alice@example.com>;tag=t1")
    )
    response = make_response(request, 200)  # type: ignore[arg-type]
    assert response.headers.get("To") == "<sip:alice@example.com>;tag=t1"
    plain = make_response(parse_message(REGISTER), 200)  # type: ignore[arg-type]
    assert ";tag=" in (plain.headers.get("To") or "")


# The lookaround pattern the section check used before counting CRLF pairs.
_LOOKAROUND_CTL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n")


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from(["a", " ", "\t", "\r", "\n", "\r\n", "\x00", "\x7f", "é"])).map(
        "".join
    )
)
def test_section_control_check_counts_crlf_pairs_like_the_lookaround(text: str) -> None:
    from sipdrill.sip.message import _ctl_free

    assert _ctl_free(text) == (_LOOKAROUND_CTL.search(text) is None)


def test_a_bare_cr_or_lf_in_a_header_value_is_refused() -> None:
    for bad in ("x\ry", "x\ny", "x\r\ry"):
        data = (
            "REGISTER sip:lab.local SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
            f"From: <sip:a@lab.local>;tag=1\r\nTo: <sip:a@lab.local>\r\nCall-ID: {bad}\r\n"
            "CSeq: 1 REGISTER\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        with pytest.raises(SipParseError) as err:
            parse_message(data)
        assert err.value.status_code == 400
