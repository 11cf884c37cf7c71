"""RFC 3261 transactions driven by an injected clock."""

from __future__ import annotations

import random

import pytest
from sipmessage import Request, Response

from sipdrill.sip.message import make_response, parse_message, serialize
from sipdrill.sip.transaction import (
    MAGIC_COOKIE,
    ClientTransaction,
    DeliverRequest,
    DeliverResponse,
    Send,
    ServerTransaction,
    Timer,
    TimerConfig,
    TransactionError,
    TransactionEvent,
    TransactionKey,
    TransactionManager,
    TransactionStateError,
    TransactionTerminated,
    TransactionTimeout,
    TransportError,
    TxState,
    is_failover_trigger,
    new_branch,
    rebranch,
)

PEER = ("192.0.2.10", 5060)


def request(method: str = "REGISTER", branch: str = "z9hG4bKclient1", cseq: int = 1) -> Request:
    data = (
        f"{method} sip:example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 10.0.0.1:5060;branch={branch}\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:alice@example.com>;tag=ft\r\n"
        "To: <sip:alice@example.com>\r\n"
        "Call-ID: call-1\r\n"
        f"CSeq: {cseq} {method}\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    msg = parse_message(data)
    assert isinstance(msg, Request)
    return msg


def response_to(req: Request, code: int) -> Response:
    # Round-trip through bytes, as the transport would deliver it.
    msg = parse_message(serialize(make_response(req, code, to_tag="tt")))
    assert isinstance(msg, Response)
    return msg


def sends(events: list[TransactionEvent]) -> list[bytes]:
    return [e.data for e in events if isinstance(e, Send)]


def run_timers(tx: ClientTransaction | ServerTransaction, until: float) -> list[float]:
    """Fire every timer up to ``until``; return the times at which something was sent."""
    times = []
    while (deadline := tx.next_deadline()) is not None and deadline <= until:
        if sends(tx.handle_timer(deadline)):
            times.append(deadline)
    return times


class TestClientNonInvite:
    def test_timer_e_doubles_to_t2_then_f_at_32s(self) -> None:
        tx = ClientTransaction.create(request(), reliable=False)
        assert sends(tx.start(0.0)) == [serialize(request())]
        retransmits: list[float] = []
        events: list[TransactionEvent] = []
        while tx.state is not TxState.TERMINATED:
            deadline = tx.next_deadline()
            assert deadline is not None
            fired = tx.handle_timer(deadline)
            if sends(fired):
                retransmits.append(deadline)
            events += fired
        # E: 0.5, 1, 2, 4, 4, 4 ... (intervals), F at 64*T1 = 32 s.
        assert retransmits[:6] == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5]
        assert retransmits[-1] == 31.5
        assert [e for e in events if isinstance(e, TransactionTimeout)] == [
            TransactionTimeout(tx.key, Timer.F)
        ]
        assert is_failover_trigger(TransactionTimeout(tx.key, Timer.F))

    def test_no_retransmission_on_reliable_transport(self) -> None:
        tx = ClientTransaction.create(request(), reliable=True)
        tx.start(0.0)
        assert tx.deadlines() == {Timer.F: 32.0}
        assert run_timers(tx, 100.0) == []
        assert tx.terminated

    def test_proceeding_retransmits_every_t2(self) -> None:
        req = request()
        tx = ClientTransaction.create(req, reliable=False)
        tx.start(0.0)
        assert run_timers(tx, 1.5) == [0.5, 1.5]
        events = tx.receive_response(response_to(req, 100), 1.6)
        assert [type(e) for e in events] == [DeliverResponse]
        assert tx.state is TxState.PROCEEDING
        # Timer E still at 3.5 from Trying, then T2 apart.
        assert run_timers(tx, 12.0) == [3.5, 7.5, 11.5]

    def test_final_response_then_timer_k(self) -> None:
        req = request()
        tx = ClientTransaction.create(req, reliable=False)
        tx.start(0.0)
        ok = response_to(req, 200)
        assert tx.receive_response(ok, 0.2) == [DeliverResponse(tx.key, ok)]
        assert tx.deadlines() == {Timer.K: 5.2}
        # Retransmitted finals are absorbed, not delivered twice.
        assert tx.receive_response(response_to(req, 200), 1.0) == []
        assert tx.handle_timer(5.2) == []
        assert tx.terminated

    def test_reliable_final_terminates_at_once(self) -> None:
        req = request()
        tx = ClientTransaction.create(req, reliable=True)
        tx.start(0.0)
        tx.receive_response(response_to(req, 404), 0.1)
        assert tx.terminated

    def test_custom_timer_config(self) -> None:
        tx = ClientTransaction.create(request(), TimerConfig(t1=0.1, t2=0.3), reliable=False)
        tx.start(0.0)
        assert tx.deadlines() == {Timer.E: 0.1, Timer.F: pytest.approx(6.4)}
        assert run_timers(tx, 1.0) == pytest.approx([0.1, 0.3, 0.6, 0.9])

    def test_transport_error(self) -> None:
        tx = ClientTransaction.create(request(), reliable=True)
        tx.start(0.0)
        events = tx.transport_error("connection refused", 0.0)
        assert events == [TransportError(tx.key, "connection refused")]
        assert tx.terminated
        assert is_failover_trigger(events[0])

    def test_illegal_transition_raises_and_changes_nothing(self) -> None:
        req = request()
        tx = ClientTransaction.create(req, reliable=False)
        tx.start(0.0)
        tx.receive_response(response_to(req, 200), 0.1)
        tx.handle_timer(10.0)
        assert tx.terminated
        with pytest.raises(TransactionStateError):
            tx.receive_response(response_to(req, 200), 11.0)
        assert tx.state is TxState.TERMINATED

    def test_needs_magic_cookie_branch(self) -> None:
        with pytest.raises(TransactionError):
            ClientTransaction.create(request(branch="old-style"), reliable=True)


class TestClientInvite:
    def test_timer_a_doubles_without_cap_and_b_at_32s(self) -> None:
        tx = ClientTransaction.create(request("INVITE"), reliable=False)
        tx.start(0.0)
        events: list[TransactionEvent] = []
        times = []
        while not tx.terminated:
            deadline = tx.next_deadline()
            assert deadline is not None
            fired = tx.handle_timer(deadline)
            times += [deadline] * len(sends(fired))
            events += fired
        assert times == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
        assert TransactionTimeout(tx.key, Timer.B) in events
        assert is_failover_trigger(TransactionTimeout(tx.key, Timer.B))

    def test_error_response_is_acked_with_same_branch_and_timer_d(self) -> None:
        req = request("INVITE")
        tx = ClientTransaction.create(req, reliable=False)
        tx.start(0.0)
        assert [type(e) for e in tx.receive_response(response_to(req, 180), 0.1)] == [
            DeliverResponse
        ]
        assert tx.deadlines() == {}  # Proceeding: A and B stop
        busy = response_to(req, 486)
        events = tx.receive_response(busy, 1.0)
        (ack_bytes,) = sends(events)
        ack = parse_message(ack_bytes)
        assert isinstance(ack, Request)
        assert ack.method == "ACK"
        assert str(ack.cseq) == "1 ACK"
        assert ack.via[0].parameters["branch"] == "z9hG4bKclient1"
        assert ack.to_address.parameters["tag"] == "tt"
        assert DeliverResponse(tx.key, busy) in events
        assert tx.deadlines() == {Timer.D: 33.0}
        # A retransmitted 486 gets the ACK again but is not delivered again.
        again = tx.receive_response(response_to(req, 486), 2.0)
        assert len(sends(again)) == 1
        assert not [e for e in again if isinstance(e, DeliverResponse)]
        tx.handle_timer(33.0)
        assert tx.terminated

    def test_503_is_a_failover_trigger(self) -> None:
        req = request("INVITE")
        tx = ClientTransaction.create(req, reliable=True)
        tx.start(0.0)
        events = tx.receive_response(response_to(req, 503), 0.1)
        delivered = [e for e in events if isinstance(e, DeliverResponse)]
        assert len(delivered) == 1
        assert is_failover_trigger(delivered[0])
        assert tx.terminated  # Timer D is 0 on reliable transports
        assert not is_failover_trigger(DeliverResponse(tx.key, response_to(req, 500)))

    def test_2xx_goes_to_accepted_and_retransmissions_reach_tu(self) -> None:
        req = request("INVITE")
        tx = ClientTransaction.create(req, reliable=False)
        tx.start(0.0)
        tx.receive_response(response_to(req, 200), 0.2)
        assert tx.state is TxState.ACCEPTED
        assert tx.deadlines() == {Timer.M: 32.2}
        assert [type(e) for e in tx.receive_response(response_to(req, 200), 1.0)] == [
            DeliverResponse
        ]
        tx.handle_timer(32.2)
        assert tx.terminated


class TestServerNonInvite:
    def test_retransmissions_absorbed_then_answered_with_last_response(self) -> None:
        req = request()
        tx = ServerTransaction.create(req, reliable=False, peer=PEER)
        assert tx.start(0.0) == [DeliverRequest(tx.key, req, PEER)]
        assert tx.receive_request(request(), 0.5) == []  # Trying: nothing to repeat yet
        assert sends(tx.send_response(make_response(req, 100), 0.6))
        (trying,) = sends(tx.receive_request(request(), 0.7))
        assert trying.startswith(b"SIP/2.0 100 ")
        final = tx.send_response(make_response(req, 200), 1.0)
        assert [e.peer for e in final if isinstance(e, Send)] == [PEER]
        (again,) = sends(tx.receive_request(request(), 2.0))
        assert again.startswith(b"SIP/2.0 200 ")
        assert tx.deadlines() == {Timer.J: 33.0}
        tx.handle_timer(33.0)
        assert tx.terminated

    def test_second_final_response_is_refused(self) -> None:
        req = request()
        tx = ServerTransaction.create(req, reliable=False)
        tx.start(0.0)
        tx.send_response(make_response(req, 200), 0.1)
        with pytest.raises(TransactionStateError):
            tx.send_response(make_response(req, 500), 0.2)
        assert tx.state is TxState.COMPLETED

    def test_reliable_timer_j_is_zero(self) -> None:
        req = request()
        tx = ServerTransaction.create(req, reliable=True)
        tx.start(0.0)
        tx.send_response(make_response(req, 200), 0.1)
        assert tx.terminated


class TestServerInvite:
    def test_100_trying_then_timer_g_doubles_and_h_times_out(self) -> None:
        req = request("INVITE")
        tx = ServerTransaction.create(req, reliable=False)
        started = tx.start(0.0)
        (trying,) = sends(started)
        assert trying.startswith(b"SIP/2.0 100 Trying\r\n")
        (again,) = sends(tx.receive_request(request("INVITE"), 0.5))
        assert again == trying
        tx.send_response(make_response(req, 486), 1.0)
        events: list[TransactionEvent] = []
        times = []
        while not tx.terminated:
            deadline = tx.next_deadline()
            assert deadline is not None
            fired = tx.handle_timer(deadline)
            times += [deadline] * len(sends(fired))
            events += fired
        assert times == [1.5, 2.5, 4.5, 8.5, 12.5, 16.5, 20.5, 24.5, 28.5, 32.5]
        assert events[-1] == TransactionTimeout(tx.key, Timer.H)
        assert times[-1] < 33.0 == tx.config.timeout + 1.0
        assert not is_failover_trigger(TransactionTimeout(tx.key, Timer.H))

    def test_ack_confirms_and_timer_i(self) -> None:
        req = request("INVITE")
        tx = ServerTransaction.create(req, reliable=False)
        tx.start(0.0)
        tx.send_response(make_response(req, 404), 0.1)
        ack = request("ACK")
        assert tx.receive_request(ack, 0.3) == []
        assert tx.state is TxState.CONFIRMED
        assert tx.deadlines() == {Timer.I: 5.3}
        assert tx.receive_request(request("INVITE"), 0.4) == []  # absorbed now
        tx.handle_timer(5.3)
        assert tx.terminated

    def test_2xx_goes_to_accepted(self) -> None:
        req = request("INVITE")
        tx = ServerTransaction.create(req, reliable=True)
        tx.start(0.0)
        tx.send_response(make_response(req, 200), 0.1)
        assert tx.state is TxState.ACCEPTED
        assert tx.receive_request(request("INVITE"), 0.2) == []
        assert sends(tx.send_response(make_response(req, 200), 0.6))  # TU retransmits
        tx.handle_timer(32.1)
        assert tx.terminated


class TestManager:
    def test_matches_responses_by_branch_and_method(self) -> None:
        mgr = TransactionManager(random.Random(1))
        reg = request(branch=mgr.new_branch())
        key, events = mgr.send_request(reg, 0.0, reliable=False, peer=PEER)
        assert [e.peer for e in events if isinstance(e, Send)] == [PEER]
        assert key == TransactionKey(reg.via[0].parameters["branch"] or "", "REGISTER")
        # Same branch, other method (a CANCEL-like mismatch): stray.
        other = response_to(request("OPTIONS", branch=key.branch), 200)
        assert mgr.receive_response(other, 0.1) == [DeliverResponse(None, other)]
        ok = response_to(reg, 200)
        assert mgr.receive_response(ok, 0.2) == [DeliverResponse(key, ok)]
        assert mgr.next_deadline() == pytest.approx(5.2)
        assert mgr.handle_timer(5.2) == [TransactionTerminated(key)]
        assert len(mgr) == 0
        assert mgr.next_deadline() is None

    def test_server_retransmission_absorption(self) -> None:
        mgr = TransactionManager(random.Random(1))
        req = request(branch="z9hG4bKsrv")
        (deliver,) = mgr.receive_request(req, 0.0, reliable=False, peer=PEER)
        assert isinstance(deliver, DeliverRequest)
        assert deliver.key is not None
        assert mgr.receive_request(request(branch="z9hG4bKsrv"), 0.5, reliable=False) == []
        mgr.send_response(deliver.key, make_response(req, 200), 0.6)
        (resend,) = mgr.receive_request(request(branch="z9hG4bKsrv"), 1.0, reliable=False)
        assert isinstance(resend, Send)
        assert resend.data.startswith(b"SIP/2.0 200 OK")
        assert resend.peer == PEER

    def test_ack_for_error_matches_invite_and_2xx_ack_is_passed_up(self) -> None:
        mgr = TransactionManager(random.Random(1))
        inv = request("INVITE", branch="z9hG4bKinv")
        events = mgr.receive_request(inv, 0.0, reliable=False)
        key = next(e.key for e in events if isinstance(e, DeliverRequest))
        assert key is not None
        mgr.send_response(key, make_response(inv, 603), 0.1)
        assert mgr.receive_request(request("ACK", branch="z9hG4bKinv"), 0.2, reliable=False) == []
        server = mgr.server(key)
        assert server is not None
        assert server.state is TxState.CONFIRMED
        stray = request("ACK", branch="z9hG4bKother")
        assert mgr.receive_request(stray, 0.3, reliable=False) == [
            DeliverRequest(None, stray, None)
        ]

    def test_legacy_branch_matches_retransmission(self) -> None:
        mgr = TransactionManager(random.Random(1))
        mgr.receive_request(request(branch="1"), 0.0, reliable=False)
        assert mgr.receive_request(request(branch="1"), 0.5, reliable=False) == []
        assert len(mgr) == 1

    def test_many_transactions_deadlines_in_order(self) -> None:
        mgr = TransactionManager(random.Random(7))
        for i in range(2000):
            mgr.send_request(request(branch=mgr.new_branch()), i * 0.001, reliable=True)
        assert mgr.next_deadline() == pytest.approx(32.0)
        events = mgr.handle_timer(40.0)
        assert sum(isinstance(e, TransactionTimeout) for e in events) == 2000
        assert len(mgr) == 0

    def test_transport_error_via_manager(self) -> None:
        mgr = TransactionManager(random.Random(1))
        key, _ = mgr.send_request(request(branch=mgr.new_branch()), 0.0, reliable=True)
        events = mgr.transport_error(key, "reset", 0.1)
        assert events == [TransportError(key, "reset"), TransactionTerminated(key)]
        assert mgr.transport_error(key, "reset", 0.2) == []

    def test_duplicate_branch_refused(self) -> None:
        mgr = TransactionManager(random.Random(1))
        mgr.send_request(request(branch="z9hG4bKdup"), 0.0, reliable=True)
        with pytest.raises(TransactionError):
            mgr.send_request(request(branch="z9hG4bKdup"), 0.0, reliable=True)


def test_new_branch_uses_injected_rng() -> None:
    a, b = new_branch(random.Random(42)), new_branch(random.Random(42))
    assert a == b
    assert a.startswith(MAGIC_COOKIE)
    assert new_branch(random.Random(43)) != a


def test_rebranch_makes_a_new_transaction() -> None:
    req = request(branch="z9hG4bKfirst")
    again = rebranch(req, "z9hG4bKsecond")
    assert again.via[0].parameters["branch"] == "z9hG4bKsecond"
    assert req.via[0].parameters["branch"] == "z9hG4bKfirst"  # original untouched
    assert again.call_id == req.call_id
    assert str(again.cseq) == str(req.cseq)
