"""StreamFramer and classify_datagram."""

from __future__ import annotations

import contextlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sipdrill.errors import SipError
from sipdrill.sip.framing import (
    FramerEvent,
    FramerRole,
    FramingError,
    KeepAlivePing,
    KeepAlivePong,
    MessageBytes,
    StreamFramer,
    classify_datagram,
)
from sipdrill.sip.message import Limits, best_effort_400, parse_message


def message(body: bytes = b"", cl: bytes | None = None, call_id: bytes = b"abc") -> bytes:
    length = str(len(body)).encode() if cl is None else cl
    return (
        b"MESSAGE sip:bob@example.com SIP/2.0\r\n"
        b"Via: SIP/2.0/TCP 10.0.0.1:5061;branch=z9hG4bK1\r\n"
        b"From: <sip:alice@example.com>;tag=1\r\n"
        b"To: <sip:bob@example.com>\r\n"
        b"Call-ID: " + call_id + b"\r\n"
        b"CSeq: 1 MESSAGE\r\n"
        b"Content-Length: " + length + b"\r\n"
        b"\r\n" + body
    )


def feed_in_chunks(data: bytes, cuts: list[int], **kw: object) -> list[FramerEvent]:
    framer = StreamFramer(**kw)  # type: ignore[arg-type]
    events: list[FramerEvent] = []
    last = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        events += framer.feed(data[last:cut])
        last = cut
    return events


class TestStreamFramer:
    def test_messages_back_to_back(self) -> None:
        a, b = message(b"hello"), message(b"", call_id=b"two")
        events = StreamFramer().feed(a + b)
        assert events == [MessageBytes(a), MessageBytes(b)]
        assert parse_message(a).body == b"hello"

    def test_body_split_waits_for_content_length(self) -> None:
        framer = StreamFramer()
        data = message(b"0123456789")
        assert framer.feed(data[:-3]) == []
        assert framer.buffered == len(data) - 3
        assert framer.feed(data[-3:]) == [MessageBytes(data)]
        assert framer.buffered == 0

    def test_compact_content_length(self) -> None:
        data = message(b"xy").replace(b"Content-Length: 2", b"l : 2")
        assert StreamFramer().feed(data) == [MessageBytes(data)]

    def test_ping_and_pong_on_server(self) -> None:
        data = message()
        events = StreamFramer().feed(b"\r\n\r\n" + data + b"\r\n" + data)
        assert events == [KeepAlivePing(), MessageBytes(data), KeepAlivePong(), MessageBytes(data)]

    def test_server_holds_lone_crlf_until_it_knows(self) -> None:
        framer = StreamFramer()
        assert framer.feed(b"\r\n") == []
        assert framer.feed(b"\r") == []
        assert framer.feed(b"\n") == [KeepAlivePing()]
        assert framer.feed(b"\r\n") == []
        assert framer.feed(b"M") == [KeepAlivePong()]

    def test_client_reports_pong_at_once(self) -> None:
        framer = StreamFramer(role=FramerRole.CLIENT)
        assert framer.feed(b"\r") == []
        assert framer.feed(b"\n") == [KeepAlivePong()]
        assert framer.feed(b"\r\n\r\n") == [KeepAlivePong(), KeepAlivePong()]

    def test_missing_content_length_is_fatal(self) -> None:
        data = message().replace(b"Content-Length: 0\r\n", b"")
        framer = StreamFramer()
        events = framer.feed(data + message())
        assert len(events) == 1
        error = events[0]
        assert isinstance(error, FramingError)
        assert (error.status_code, error.reason) == (400, "Missing Content-Length")
        assert framer.failed
        assert framer.feed(message()) == []
        # The header bytes let the transport answer before closing.
        assert best_effort_400(error.data) is None  # fine as a datagram: the error must be passed
        answer = best_effort_400(error.data, error.as_sip_error())
        assert answer is not None
        assert answer.startswith(b"SIP/2.0 400 Missing Content-Length\r\n")

    def test_bad_and_conflicting_content_length(self) -> None:
        (bad,) = StreamFramer().feed(message(cl=b"-1"))
        assert isinstance(bad, FramingError)
        assert bad.reason == "Bad Content-Length"
        data = message().replace(b"CSeq", b"l: 5\r\nCSeq")
        (conflict,) = StreamFramer().feed(data)
        assert isinstance(conflict, FramingError)
        assert conflict.reason == "Conflicting Content-Length"

    def test_oversized_body_is_513_before_the_body_arrives(self) -> None:
        limits = Limits(max_message_size=1000)
        (error,) = StreamFramer(limits).feed(message(cl=b"900"))
        assert error == FramingError(513, "Message Too Large", message(cl=b"900"))

    def test_endless_header_is_513(self) -> None:
        limits = Limits(max_message_size=1000, max_line_length=100)
        framer = StreamFramer(limits)
        events: list[FramerEvent] = []
        for _ in range(200):
            events += framer.feed(b"X-Pad: 0123456789\r\n")
        assert events == [FramingError(513, "Message Too Large")]

    def test_long_line_is_400_without_waiting_for_its_end(self) -> None:
        framer = StreamFramer(Limits(max_line_length=50))
        assert framer.feed(b"MESSAGE sip:" + b"a" * 38) == []
        assert framer.feed(b"a") == [FramingError(400, "Header line too long")]

    def test_slow_sender_is_linear(self) -> None:
        data = message(b"x" * 100).replace(b"CSeq", b"X-Pad: " + b"p" * 5000 + b"\r\nCSeq")
        framer = StreamFramer()
        events: list[FramerEvent] = []
        for i in range(len(data)):
            events += framer.feed(data[i : i + 1])
        assert events == [MessageBytes(data)]

    def test_classify_datagram(self) -> None:
        assert classify_datagram(b"\r\n\r\n") == KeepAlivePing()
        assert classify_datagram(b"\r\n") == KeepAlivePong()
        assert classify_datagram(message()) == MessageBytes(message())


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

STREAM = b"\r\n\r\n".join([message(b"hello"), message(b"", call_id=b"2"), message(b"\r\n\r\n")])


@FUZZ
@given(
    st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12),
    st.sampled_from(list(FramerRole)),
)
def test_random_splits_give_identical_events(cuts: list[int], role: FramerRole) -> None:
    whole = StreamFramer(role=role).feed(STREAM)
    assert feed_in_chunks(STREAM, cuts, role=role) == whole
    assert [e for e in whole if isinstance(e, MessageBytes)] == [
        MessageBytes(message(b"hello")),
        MessageBytes(message(b"", call_id=b"2")),
        MessageBytes(message(b"\r\n\r\n")),
    ]


@FUZZ
@given(
    st.binary(max_size=600),
    st.lists(st.integers(min_value=0, max_value=600), max_size=8),
    st.integers(min_value=40, max_value=400),
)
def test_random_bytes_split_invariant(data: bytes, cuts: list[int], limit: int) -> None:
    limits = Limits(max_message_size=limit, max_line_length=limit // 4)
    whole = StreamFramer(limits).feed(data)
    assert feed_in_chunks(data, cuts, limits=limits) == whole
    for event in whole:
        if isinstance(event, MessageBytes):
            with contextlib.suppress(SipError):
                parse_message(event.data, limits)


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=len(STREAM)),
            st.integers(min_value=0, max_value=6),
            st.sampled_from([b"\r\n", b"\r", b"\n", b"9", b"Content-Length: 7\r\n", b"\x00", b""]),
        ),
        max_size=5,
    ),
    st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=8),
)
def test_mutated_stream_split_invariant(
    edits: list[tuple[int, int, bytes]], cuts: list[int]
) -> None:
    data = STREAM
    for pos, cut, insert in edits:
        data = data[:pos] + insert + data[pos + cut :]
    whole = StreamFramer().feed(data)
    assert feed_in_chunks(data, cuts) == whole
    for event in whole:
        if isinstance(event, MessageBytes):
            with contextlib.suppress(SipError):
                parse_message(event.data)
