"""Calls through the pools: INVITE/ACK/BYE/CANCEL between registered users,
on one pool, across pools, forked, refused, in resiliency mode and after a
pool failover (docs/reference.md: calls work in resiliency mode)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pool_harness import ALICE, BOB, CAROL, DAVE, ERIN, P1, P2, TAKEOVER, Lab, two_pools, wait_for
from sipmessage import Address, Request, Response

from sipdrill.pool.sip_ua import UserAgent, route_set
from sipdrill.sip.transport import Kind


def rr_hosts(message: Request | Response) -> list[str]:
    out = []
    for value in message.headers.getlist("Record-Route"):
        for a in Address.parse_many(value):
            assert "lr" in a.uri.parameters
            out.append(f"{a.uri.host}:{a.uri.port}")
    return out


def pool_at(lab: Lab, fqdn: str) -> str:
    host, port = lab.sip_target(fqdn)
    return f"{host}:{port}"


async def metric(lab: Lab, fqdn: str, line: str) -> float:
    text = (await lab.get(fqdn, "/metrics")).text
    for row in text.splitlines():
        if row.startswith(line + " "):
            return float(row.rsplit(" ", 1)[1])
    raise AssertionError(f"{line} not in the metrics of {fqdn}")


async def call_and_hang_up(caller: UserAgent, callee: UserAgent, uri: str) -> Response:
    invite, ok = await caller.invite(uri)
    assert ok.code == 200, f"{caller.aor} -> {uri}: {ok.code} {ok.phrase}"
    caller.ack(invite, ok)
    await callee.next_request("ACK", within=3)
    bye = await caller.send(caller.in_dialog("BYE", invite, ok, invite.cseq.sequence + 1))
    assert bye.code == 200, f"BYE: {bye.code} {bye.phrase}"
    got = await callee.next_request("BYE", within=3)
    assert got.call_id == invite.call_id
    return ok


async def test_a_call_on_one_pool(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab:
        alice = await lab.registered(ALICE, P1)
        bob = await lab.registered(BOB, P1)
        invite, ok = await alice.invite(BOB)
        assert ok.code == 200
        assert ok.headers.get("Content-Type") == "application/sdp" and b"v=0" in ok.body
        # One pool on the path: one Record-Route, where alice reached it.
        assert rr_hosts(ok) == [pool_at(lab, P1)]
        got = await bob.next_request("INVITE")
        assert got.headers.get("Max-Forwards") == "69"
        assert str(got.uri) == str(Address.parse(bob.contact).uri)  # retargeted to the binding
        assert rr_hosts(got) == [pool_at(lab, P1)]
        alice.ack(invite, ok)
        ack = await bob.next_request("ACK", within=3)
        assert ack.headers.get("Route") is None  # the pool took its own Route off
        bye = await alice.send(alice.in_dialog("BYE", invite, ok, invite.cseq.sequence + 1))
        assert bye.code == 200
        assert (await bob.next_request("BYE")).call_id == invite.call_id
        assert await metric(lab, P1, 'sipdrill_pool_calls_total{result="answered"}') == 1
        assert (await lab.status(P1))["calls"]["in_progress"] == 0


async def test_a_call_across_pools_and_the_callee_hangs_up(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab:
        alice = await lab.registered(ALICE, P1)
        carol = await lab.registered(CAROL, P2)
        invite, ok = await alice.invite(CAROL)
        assert ok.code == 200
        # Both pools record-route: the callee's side on top.
        assert rr_hosts(ok) == [pool_at(lab, P2), pool_at(lab, P1)]
        assert route_set(ok)[0].startswith(f"<sip:{pool_at(lab, P1)}")
        got = await carol.next_request("INVITE")
        assert got.headers.get("Max-Forwards") == "68"
        alice.ack(invite, ok)
        await carol.next_request("ACK", within=3)
        # A re-INVITE (hold, say) follows the route set too.
        reinvite = alice.in_dialog("INVITE", invite, ok, invite.cseq.sequence + 1)
        reinvite.headers.set("Contact", alice.contact)
        again = await alice.send(reinvite)
        assert again.code == 200
        alice.ack(reinvite, again)
        # The callee hangs up: its BYE goes P2, P1, alice.
        bye = await carol.hang_up(invite.call_id)
        assert bye.code == 200, bye.phrase
        got_bye = await alice.next_request("BYE")
        assert got_bye.call_id == invite.call_id
        assert await metric(lab, P1, 'sipdrill_pool_calls_total{result="answered"}') == 1
        assert await metric(lab, P2, 'sipdrill_pool_calls_total{result="answered"}') == 1


async def test_each_side_gets_the_pool_where_it_reached_it(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab:
        bob = await lab.registered(BOB, P1)  # over TLS
        assert lab.stack is not None
        alice = lab.stack.agent(ALICE)
        host, _ = lab.sip_target(P1)
        await alice.connect(host, lab.topology.pool(P1).sip_tcp_port, P1, kind=Kind.TCP)
        assert (await alice.register()).code == 200
        invite, ok = await alice.invite(BOB)
        assert ok.code == 200
        got = await bob.next_request("INVITE")
        # The callee reaches the pool over TLS, the caller over TCP (RFC 3261 16.7 step 4).
        assert got.headers.getlist("Record-Route") == [f"<sip:{host}:5061;transport=tls;lr>"]
        assert ok.headers.getlist("Record-Route") == [f"<sip:{host}:5060;transport=tcp;lr>"]
        bye = await alice.ack_and_bye(invite, ok)
        assert bye.code == 200
        assert (await bob.next_request("BYE")).call_id == invite.call_id


async def test_forks_to_every_binding_and_cancels_the_rest(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab:
        alice = await lab.registered(ALICE, P1)
        desk = await lab.registered(BOB, P1)
        laptop = await lab.registered(BOB, P1)
        laptop.ring = 5.0  # rings; the desk phone answers at once
        invite, ok = await alice.invite(BOB)
        assert ok.code == 200
        assert ok.contact[0].uri.port == desk.flow.local[1]  # type: ignore[union-attr]
        assert (await desk.next_request("INVITE")).call_id == invite.call_id
        assert (await laptop.next_request("INVITE")).call_id == invite.call_id
        cancel = await laptop.next_request("CANCEL", within=3)
        assert "Call completed elsewhere" in (cancel.headers.get("Reason") or "")
        assert laptop.dialogs == {}
        alice.ack(invite, ok)
        await desk.next_request("ACK", within=3)


async def test_every_branch_fails_the_best_answer_wins(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab:
        alice = await lab.registered(ALICE, P1)
        busy = await lab.registered(BOB, P1)
        busy.answer = 486
        gone = await lab.registered(BOB, P1)
        gone.answer = 480
        _, r = await alice.invite(BOB)
        assert r.code == 486  # 4xx, and the busy one rather than the other


async def test_the_caller_cancels(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab:
        alice = await lab.registered(ALICE, P1)
        carol = await lab.registered(CAROL, P2)
        carol.ring = 10.0
        invite = alice.invite_request(CAROL)
        answer = asyncio.ensure_future(alice.send(invite))
        await carol.next_request("INVITE")
        await asyncio.sleep(0.2)  # the 180 is back
        r = await alice.cancel(invite)
        assert r.code == 200
        final = await asyncio.wait_for(answer, 5)
        assert final.code == 487
        assert (await carol.next_request("CANCEL")).call_id == invite.call_id
        assert await metric(lab, P1, 'sipdrill_pool_calls_total{result="cancelled"}') == 1
        # A CANCEL for nothing: 481.
        assert (await alice.cancel(alice.invite_request(CAROL))).code == 481


async def test_refusals_480_404_416_403(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab:
        alice = await lab.registered(ALICE, P1)
        loop = asyncio.get_running_loop()
        start = loop.time()
        # Nobody registered: dave (at home) and carol (P1 asks P2, P2 has none).
        for who in (DAVE, CAROL):
            _, r = await alice.invite(who)
            assert r.code == 480, (who, r.code, r.phrase)
        assert loop.time() - start < 3.0
        for uri, code in (
            ("sip:nobody@lab.local", 404),
            ("sip:lab.local", 404),
            ("sip:bob@example.com", 404),
            ("tel:+15550100", 416),
        ):
            _, r = await alice.invite(uri)
            assert r.code == code, (uri, r.code, r.phrase)
        # A caller this pool does not serve: carol is homed on P2.
        stranger = await lab.agent(CAROL, P1)
        _, r = await stranger.invite(ALICE)
        assert r.code == 403


async def test_max_forwards_and_loops(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab:
        alice = await lab.registered(ALICE, P1)
        bob = await lab.registered(BOB, P1)
        req = alice.invite_request(BOB)
        req.headers.set("Max-Forwards", "0")
        r = await alice.send(req)
        assert r.code == 483
        # An INVITE that already went through P1 (its Via is in there) has looped.
        _, ok = await alice.invite(BOB)
        assert ok.code == 200
        seen = await bob.next_request("INVITE")
        p1_via = seen.headers.getlist("Via")[0]
        looped = alice.invite_request(BOB)
        looped.headers.setlist("Via", [*looped.headers.getlist("Via"), p1_via])
        r = await alice.send(looped)
        assert r.code == 482


async def test_a_malformed_request_uri_is_a_4xx_and_the_pool_carries_on(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab:
        alice = await lab.registered(ALICE, P1)
        bob = await lab.registered(BOB, P1)
        host, _ = lab.sip_target(P1)
        port = lab.topology.pool(P1).sip_tcp_port
        for n, ruri in enumerate((b"sip:bob@", b"sip:@lab.local", b"sip:bob@lab.local:99999x")):
            # A request that cannot be read closes its stream (where the next
            # one starts is unknown): one connection each.
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(
                    b"INVITE " + ruri + b" SIP/2.0\r\n"
                    b"Via: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bKbad%d\r\n" % n
                    + b"Max-Forwards: 70\r\nFrom: <sip:alice@lab.local>;tag=x\r\n"
                    b"To: <sip:bob@lab.local>\r\nCall-ID: bad-uri\r\nCSeq: 1 INVITE\r\n"
                    b"Content-Length: 0\r\n\r\n"
                )
                await writer.drain()
                line = await asyncio.wait_for(reader.readline(), 5)
                assert line.startswith(b"SIP/2.0 4"), (ruri, line)
            finally:
                writer.close()
        await call_and_hang_up(alice, bob, BOB)


async def test_calls_in_resiliency_mode(tmp_path: Path) -> None:
    async with two_pools(tmp_path, detection=TAKEOVER) as lab:
        await lab.stop(P1)
        alice = await lab.agent(ALICE, P2)
        bob = await lab.agent(BOB, P2)

        async def limited(ua: UserAgent) -> bool:
            r = await ua.register()
            return r.code == 200 and r.headers.get("X-Sipdrill-Mode") == "resiliency"

        await wait_for(lambda: limited(alice), 6, step=0.2)
        assert await limited(bob)
        carol = await lab.registered(CAROL, P2)
        # P1's users call each other, a P2 user, and are called, on their backup pool.
        await call_and_hang_up(alice, bob, BOB)
        await call_and_hang_up(alice, carol, CAROL)
        await call_and_hang_up(carol, alice, ALICE)
        # A P1 user nobody has registered: P2 tries P1 (down), answers 480 quickly.
        loop = asyncio.get_running_loop()
        start = loop.time()
        _, r = await carol.invite(DAVE)
        assert r.code == 480
        assert loop.time() - start < 5.0
        status = await lab.status(P2)
        assert status["registrations"]["resiliency"] == 2


async def test_calls_after_pool_failover(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab:
        for event in ("failover_started", "failover_completed"):
            for pool in (P1, P2):
                r = await lab.post(pool, "/failover/state", json={"home_pool": P1, "event": event})
                assert r.status_code == 200, r.text
        alice = await lab.agent(ALICE, P2)
        r = await alice.register()
        assert (r.code, r.headers.get("X-Sipdrill-Mode")) == (200, "full")
        erin = await lab.registered(ERIN, P2)
        await call_and_hang_up(alice, erin, ERIN)
        await call_and_hang_up(erin, alice, ALICE)
