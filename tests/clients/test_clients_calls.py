"""The call workload of the sans-IO endpoint: placing, answering and ending
calls, on the fake world's clock (no sockets)."""

from __future__ import annotations

import pytest
from clients_harness import ALICE, DOMAIN, POOL1, World
from sipmessage import URI, Request, Response

from sipdrill.clients.calls import (
    CALL_TRANSITIONS,
    Call,
    CallInput,
    CallState,
    CallStateError,
    is_caller,
)
from sipdrill.clients.endpoint import ClientProfile, WorkloadKind
from sipdrill.clients.events import (
    CallAnswered,
    CallEnded,
    CallFailed,
    CallPlaced,
    Failure,
    Mode,
)
from sipdrill.sip.message import make_response
from sipdrill.sip.transaction import TransactionKey

BOB = "sip:bob@lab.local"
RR = "<sip:10.0.1.11:5061;transport=tls;lr>"
BOB_CONTACT = "<sip:bob@10.0.0.9:5555;transport=tls;ob>"


def calling_world(**kw: object) -> World:
    settings: dict[str, object] = {
        "workload": (WorkloadKind.CALL,),
        "call_fraction": 1.0,
        "call_interval": 10.0,
        "call_hold": 3.0,
        "call_targets": (ALICE.uri, BOB),
        **kw,
    }
    profile = ClientProfile(domain=DOMAIN, **settings)  # type: ignore[arg-type]
    w = World(profile)
    w.registrars[POOL1].invite_headers = (("Contact", BOB_CONTACT), ("Record-Route", RR))
    return w


def sent(w: World, method: str) -> list[Request]:
    return [m for _, m in w.sent if isinstance(m, Request) and m.method == method]


def test_callers_are_a_stable_share_of_the_users() -> None:
    uris = [f"sip:user{i:04d}@lab.local" for i in range(2000)]
    chosen = [u for u in uris if is_caller(u, 0.25)]
    assert 0.2 * len(uris) < len(chosen) < 0.3 * len(uris)
    assert chosen == [u for u in uris if is_caller(u, 0.25)]  # the same every time
    assert not any(is_caller(u, 0.0) for u in uris)
    assert all(is_caller(u, 1.0) for u in uris)


def test_a_call_is_placed_answered_acked_held_and_hung_up() -> None:
    w = calling_world()
    w.sign_in()
    assert w.mode is Mode.FULL_SERVICE
    w.run_until(lambda: bool(w.of(CallEnded)), limit=30)
    placed, answered, ended = w.of(CallPlaced)[0], w.of(CallAnswered)[0], w.of(CallEnded)[0]
    assert placed.target == BOB and placed.mode is Mode.FULL_SERVICE  # type: ignore[attr-defined]
    assert answered.call_id == placed.call_id == ended.call_id  # type: ignore[attr-defined]
    assert answered.status_code == 200 and answered.setup >= 0  # type: ignore[attr-defined]
    # Placed 5-15 s after signing in (10 s +-50 %), then held 3 s.
    registered = w.events[0].monotonic
    assert 5.0 <= placed.monotonic - registered <= 15.0
    assert ended.ok and not ended.dropped  # type: ignore[attr-defined]
    assert ended.duration == pytest.approx(3.0, abs=0.01)  # type: ignore[attr-defined]
    [invite] = sent(w, "INVITE")
    assert str(invite.uri) == BOB
    assert invite.headers.get("Content-Type") == "application/sdp" and b"m=audio" in invite.body
    # ACK and BYE go to the callee's Contact along the route set (RFC 3261 12.2).
    [ack] = sent(w, "ACK")
    [bye] = sent(w, "BYE")
    for request in (ack, bye):
        assert str(request.uri) == "sip:bob@10.0.0.9:5555;transport=tls;ob"
        assert request.headers.get("Route") == RR
        assert request.call_id == invite.call_id
        assert "tag=" in (request.headers.get("To") or "")
    assert bye.cseq.sequence == 2 and ack.cseq.sequence == 1
    # The next call comes 5-15 s after this one ended.
    end = ended.monotonic
    w.run_until(lambda: len(w.of(CallPlaced)) == 2, limit=20)
    assert 5.0 <= w.of(CallPlaced)[1].monotonic - end <= 15.0


def test_a_refused_call_is_a_call_failed_with_its_status() -> None:
    w = calling_world()
    w.registrars[POOL1].work_status = 480
    w.sign_in()
    w.run_until(lambda: bool(w.of(CallFailed)), limit=30)
    failed = w.of(CallFailed)[0]
    assert failed.status_code == 480  # type: ignore[attr-defined]
    assert not w.of(CallAnswered) and not sent(w, "BYE")
    assert w.mode is Mode.FULL_SERVICE  # a failed call is not a failed registrar


def test_an_unanswered_call_times_out_without_a_status() -> None:
    w = calling_world()
    w.sign_in()
    w.registrars[POOL1].silent = True  # keeps answering pings, not requests
    w.run_until(lambda: bool(w.of(CallFailed)), limit=60)
    failed = w.of(CallFailed)[0]
    assert failed.status_code is None  # type: ignore[attr-defined]
    assert "timeout" in failed.reason
    assert failed.elapsed == pytest.approx(32.0, abs=0.5)  # type: ignore[attr-defined]


def test_a_flow_lost_mid_call_drops_it() -> None:
    w = calling_world(call_hold=30.0)
    w.sign_in()
    w.run_until(lambda: bool(w.of(CallAnswered)), limit=30)
    w.close_flow(Failure.RESET)
    ended = w.of(CallEnded)[0]
    assert ended.dropped and not ended.ok  # type: ignore[attr-defined]
    assert ended.reason == "flow closed"
    assert not sent(w, "BYE")


def test_the_callee_hangs_up_first() -> None:
    w = calling_world(call_hold=30.0)
    w.sign_in()
    w.run_until(lambda: bool(w.of(CallAnswered)), limit=30)
    invite = sent(w, "INVITE")[0]
    bye = Request(method="BYE", uri=invite.uri)
    for name, value in (
        ("Via", "SIP/2.0/TLS 10.0.1.11:5061;branch=z9hG4bKremotebye"),
        ("From", "<sip:bob@lab.local>;tag=bobtag"),
        ("To", invite.headers.get("From") or ""),
        ("Call-ID", invite.call_id),
        ("CSeq", "1 BYE"),
        ("Max-Forwards", "70"),
    ):
        bye.headers.set(name, value)
    w.inject(bye)
    ended = w.of(CallEnded)[0]
    assert ended.by_remote and ended.ok  # type: ignore[attr-defined]
    w.advance(40)
    assert all(b.call_id != invite.call_id for b in sent(w, "BYE"))  # nothing left to hang up


def test_every_endpoint_answers_an_invite_with_sdp() -> None:
    w = World(ClientProfile(domain=DOMAIN))  # no call workload: still a callee
    w.sign_in()
    invite = Request(method="INVITE", uri=call_uri())
    for name, value in (
        ("Via", "SIP/2.0/TLS 10.0.1.11:5061;branch=z9hG4bKcall"),
        ("Record-Route", RR),
        ("From", "<sip:carol@lab.local>;tag=c1"),
        ("To", f"<{ALICE.uri}>"),
        ("Call-ID", "incoming-1"),
        ("CSeq", "1 INVITE"),
        ("Contact", "<sip:carol@10.0.0.8:4444;transport=tls>"),
        ("Max-Forwards", "69"),
    ):
        invite.headers.set(name, value)
    w.inject(invite)
    answers = [m for _, m in w.sent if isinstance(m, Response)]
    assert [a.code for a in answers] == [100, 200]
    ok = answers[-1]
    assert ok.headers.get("Content-Type") == "application/sdp" and b"v=0" in ok.body
    assert ok.headers.get("Record-Route") == RR
    assert "tag=" in (ok.headers.get("To") or "")
    assert ALICE.user_part in (ok.headers.get("Contact") or "")


def test_calls_are_off_unless_the_workload_asks() -> None:
    w = World(ClientProfile(domain=DOMAIN, workload=(WorkloadKind.IM,), call_targets=(BOB,),
                            call_fraction=1.0, workload_interval=5))
    w.sign_in()
    w.advance(120)
    assert not w.of(CallPlaced) and not sent(w, "INVITE")


def test_the_call_table_refuses_what_it_does_not_list() -> None:
    key = TransactionKey("z9hG4bKx", "INVITE")
    call = Call(BOB, "c", "t", key, 0.0)
    with pytest.raises(CallStateError):
        call.step(CallInput.HOLD_OVER)
    assert call.state is CallState.CALLING
    ok = make_response(Request(method="INVITE", uri=call_uri()), 200)
    call.answered(ok, 1.0, 3.0)
    assert (call.state, call.hangup_at) == (CallState.TALKING, 4.0)
    # Every state but ENDED has a way out; ENDED has none.
    assert {s for s, _ in CALL_TRANSITIONS} == set(CallState) - {CallState.ENDED}


def call_uri() -> URI:
    return URI.parse(BOB)
