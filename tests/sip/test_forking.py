"""The forking proxy's response context (RFC 3261 16.7), driven by hand: no
sockets, no loop, the clock is a number."""

from __future__ import annotations

import pytest
from sipmessage import Request, Response

from sipdrill.sip.forking import (
    AbandonBranch,
    BranchGroup,
    CancelBranch,
    ForkConfig,
    ForkContext,
    ForkState,
    ForkStateError,
    LateSuccess,
    StartBranch,
    Upstream,
    best_response,
    strip_top_via,
)
from sipdrill.sip.message import make_response, parse_message

INVITE = (
    b"INVITE sip:bob@lab.local SIP/2.0\r\n"
    b"Via: SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKcaller\r\n"
    b"Max-Forwards: 70\r\n"
    b"From: <sip:alice@lab.local>;tag=a1\r\n"
    b"To: <sip:bob@lab.local>\r\n"
    b"Call-ID: call-1\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def upstream_request() -> Request:
    message = parse_message(INVITE)
    assert isinstance(message, Request)
    return message


def branch_response(code: int, branch: int, tag: str = "") -> Response:
    """What a branch answers: our Via (branch ``b<n>``) above the caller's."""
    request = upstream_request()
    ours = f"SIP/2.0/TLS 10.0.0.2:5061;branch=z9hG4bKb{branch}"
    request.headers.setlist("Via", [ours, *request.headers.getlist("Via")])
    return make_response(request, code, to_tag=tag or f"t{branch}")


def fork(*groups: tuple[str, ...], answer_within: float | None = None) -> ForkContext[str]:
    return ForkContext(
        upstream_request(),
        [BranchGroup(g, answer_within) for g in groups],
        ForkConfig(timer_c=180.0, linger=32.0),
    )


def ups(actions: list[object]) -> list[tuple[int, int | None]]:
    return [(a.response.code, a.branch) for a in actions if isinstance(a, Upstream)]


def test_parallel_branches_first_2xx_wins_and_cancels_the_others() -> None:
    ctx = fork(("phone", "laptop", "tablet"))
    started = ctx.start(0.0)
    assert started == [StartBranch(0, "phone"), StartBranch(1, "laptop"), StartBranch(2, "tablet")]
    # 100 Trying is hop by hop; 180 goes upstream without our Via.
    assert ctx.response(0, branch_response(100, 0), 0.1) == []
    ringing = ctx.response(1, branch_response(180, 1), 0.2)
    assert ups(ringing) == [(180, 1)]
    sent = ringing[0]
    assert isinstance(sent, Upstream)
    assert sent.response.headers.getlist("Via") == [
        "SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKcaller"
    ]
    ok = ctx.response(1, branch_response(200, 1), 0.3)
    assert ups(ok) == [(200, 1)]
    # Branch 0 answered provisionally: cancelled now; branch 2 not yet (RFC 3261 9.1).
    cancels = [a for a in ok if isinstance(a, CancelBranch)]
    assert [c.branch for c in cancels] == [0]
    assert "Call completed elsewhere" in cancels[0].reason
    assert ctx.state is ForkState.ACCEPTED
    assert [a.branch for a in ctx.response(2, branch_response(100, 2), 0.4)
            if isinstance(a, CancelBranch)] == [2]
    # Their 487s go nowhere; a 2xx retransmission still goes upstream.
    assert ctx.response(0, branch_response(487, 0), 0.5) == []
    assert ups(ctx.response(1, branch_response(200, 1), 0.6)) == [(200, 1)]
    assert ctx.response(2, branch_response(487, 2), 0.7) == []
    assert not ctx.done
    assert ctx.next_deadline() == pytest.approx(0.7 + 32.0)
    ctx.handle_timer(40.0)
    assert ctx.done and ctx.next_deadline() is None


def test_all_fail_the_best_final_goes_upstream() -> None:
    ctx = fork(("a", "b", "c"))
    ctx.start(0.0)
    assert ctx.response(0, branch_response(486, 0), 0.1) == []
    assert ctx.failed(1, 408, "Request Timeout", 0.2) == []
    out = ctx.response(2, branch_response(503, 2), 0.3)
    # 4xx beats 5xx; the busy callee rather than a timeout.
    assert ups(out) == [(486, 0)]
    assert ctx.state is ForkState.COMPLETED


def test_a_lone_503_goes_upstream_as_500() -> None:
    ctx = fork(("a",))
    ctx.start(0.0)
    out = ctx.response(0, branch_response(503, 0), 0.1)
    assert ups(out) == [(500, 0)]


def test_no_target_at_all_is_480() -> None:
    ctx = fork(())
    out = ctx.start(0.0)
    assert ups(out) == [(480, None)]
    assert ctx.state is ForkState.COMPLETED
    [up] = [a for a in out if isinstance(a, Upstream)]
    assert up.response.headers.getlist("Via") == ["SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bKcaller"]


def test_groups_are_tried_one_after_another() -> None:
    ctx = fork(("pool2",), ("pool1",), answer_within=8.0)
    assert ctx.start(0.0) == [StartBranch(0, "pool2")]
    # The first pool never answers, not even 100: abandoned after 8 s, then the next.
    assert ctx.next_deadline() == 8.0
    out = ctx.handle_timer(8.0)
    assert out[0] == AbandonBranch(0)
    assert StartBranch(1, "pool1") in out
    assert ups(ctx.response(1, branch_response(480, 1), 8.5)) == [(480, 1)]


def test_a_final_that_is_not_move_on_ends_the_search() -> None:
    ctx = fork(("pool2",), ("pool1",))
    ctx.start(0.0)
    out = ctx.response(0, branch_response(486, 0), 0.1)
    assert ups(out) == [(486, 0)]
    assert not any(isinstance(a, StartBranch) for a in out)


def test_6xx_ends_everything() -> None:
    ctx = fork(("a", "b"), ("c",))
    ctx.start(0.0)
    ctx.response(1, branch_response(180, 1), 0.1)
    out = ctx.response(0, branch_response(603, 0), 0.2)
    assert ups(out) == [(603, 0)]
    assert [a.branch for a in out if isinstance(a, CancelBranch)] == [1]
    assert ctx.state is ForkState.COMPLETED
    # A 2xx racing the 6xx cannot follow it.
    late = ctx.response(1, branch_response(200, 1), 0.3)
    assert [type(a) for a in late] == [LateSuccess]


def test_cancel_from_upstream_gives_487() -> None:
    ctx = fork(("a", "b"))
    ctx.start(0.0)
    ctx.response(0, branch_response(180, 0), 0.1)
    out = ctx.cancel(0.2)
    assert [a.branch for a in out if isinstance(a, CancelBranch)] == [0]
    assert ctx.state is ForkState.CANCELLING
    # b had said nothing: its CANCEL waits for its first provisional.
    assert [a.branch for a in ctx.response(1, branch_response(100, 1), 0.3)
            if isinstance(a, CancelBranch)] == [1]
    assert ctx.response(0, branch_response(487, 0), 0.4) == []
    out = ctx.failed(1, 408, "Request Timeout", 0.5)
    assert ups(out) == [(487, 0)]
    # A second CANCEL changes nothing.
    assert ctx.cancel(0.6) == []


def test_answered_before_the_cancel_got_there() -> None:
    ctx = fork(("a",))
    ctx.start(0.0)
    ctx.response(0, branch_response(180, 0), 0.1)
    ctx.cancel(0.2)
    out = ctx.response(0, branch_response(200, 0), 0.3)
    assert ups(out) == [(200, 0)]
    assert ctx.state is ForkState.ACCEPTED


def test_timer_c_cancels_a_ringing_branch_and_answers_408() -> None:
    ctx = fork(("a",))
    ctx.start(0.0)
    ctx.response(0, branch_response(180, 0), 10.0)
    assert ctx.next_deadline() == pytest.approx(190.0)  # reset by the provisional
    out = ctx.handle_timer(190.0)
    assert [a.branch for a in out if isinstance(a, CancelBranch)] == [0]
    out = ctx.response(0, branch_response(487, 0), 190.1)
    assert ups(out) == [(408, None)]


def test_inputs_for_an_unknown_branch_or_a_second_start_raise() -> None:
    ctx = fork(("a",))
    ctx.start(0.0)
    with pytest.raises(ForkStateError):
        ctx.start(0.0)
    with pytest.raises(ForkStateError):
        ctx.response(7, branch_response(200, 7), 0.1)
    with pytest.raises(ForkStateError):
        ctx.failed(7, 408, "x", 0.1)
    assert ctx.state is ForkState.CALLING


def test_our_via_goes_even_when_one_line_holds_them_all() -> None:
    response = make_response(upstream_request(), 200)
    response.headers.set(
        "Via",
        "SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKours;rport, "
        "SIP/2.0/TLS 10.0.0.3:5061;branch=z9hG4bKpool1, SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKc",
    )
    up = strip_top_via(response)
    assert [v.parameters.get("branch") for v in up.via] == ["z9hG4bKpool1", "z9hG4bKc"]
    response.headers.setlist("Via", ["SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKours",
                                     "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKc"])
    assert strip_top_via(response).headers.getlist("Via") == [
        "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKc"
    ]


def test_best_response_order() -> None:
    def r(code: int) -> Response:
        return make_response(upstream_request(), code)

    assert best_response([]) is None
    assert best_response([r(180)]) is None
    assert best_response([r(503), r(486), r(603)]).code == 603  # type: ignore[union-attr]
    assert best_response([r(408), r(480)]).code == 480  # type: ignore[union-attr]
    assert best_response([r(480), r(486), r(404)]).code == 486  # type: ignore[union-attr]
    assert best_response([r(408), r(500)]).code == 408  # type: ignore[union-attr]
    assert best_response([r(302), r(404)]).code == 302  # type: ignore[union-attr]
