"""Presence (SUBSCRIBE/NOTIFY, PIDF), IM and resiliency-mode refusals, across pools."""

from __future__ import annotations

from pathlib import Path

import pytest
from pool_harness import ALICE, BOB, CAROL, ERIN, P1, P2, TAKEOVER, two_pools, wait_for

from sipdrill.pool.presence import (
    Availability,
    PresenceState,
    Subscription,
    SubscriptionTable,
    parse_contact_list,
    parse_pidf,
    render_contact_list,
    render_pidf,
    subscription_expires,
)
from sipdrill.pool.sip_ua import UserAgent

# --- sans-IO ---------------------------------------------------------------------------


@pytest.mark.parametrize("availability", list(Availability))
def test_pidf_round_trip(availability: Availability) -> None:
    state = PresenceState(ALICE, availability, "in a meeting")
    body = render_pidf(state)
    assert body.startswith(b"<?xml")
    assert (b"<basic>open</basic>" in body) == (availability is Availability.AVAILABLE)
    assert parse_pidf(body) == state


def test_pidf_from_another_client_reads_basic() -> None:
    body = (
        b'<presence xmlns="urn:ietf:params:xml:ns:pidf" entity="sip:x@lab.local">'
        b"<tuple id='t'><status><basic>closed</basic></status></tuple></presence>"
    )
    assert parse_pidf(body) == PresenceState("sip:x@lab.local", Availability.OFFLINE)
    for bad in (b"not xml", b"<presence/>", b'<presence xmlns="urn:ietf:params:xml:ns:pidf"/>'):
        with pytest.raises(ValueError):
            parse_pidf(bad)


def test_contact_list_and_expires() -> None:
    assert parse_contact_list(render_contact_list(ALICE, [BOB, CAROL])) == [BOB, CAROL]
    assert subscription_expires(None) == 600
    assert subscription_expires(99999) == 3600
    assert subscription_expires(-5) == 0


def test_subscription_table_expires_lazily() -> None:
    table = SubscriptionTable()
    a = Subscription("c1", "t1", ALICE, BOB, "l1", "sip:a@x", expires_at=10.0)
    b = Subscription("c2", "t2", CAROL, BOB, "l2", "sip:c@x", expires_at=20.0)
    table.put(a)
    table.put(b)
    assert {s.watcher for s in table.watching(BOB)} == {ALICE, CAROL}
    a.expires_at = 30.0  # refreshed
    table.put(a)
    assert [s.watcher for s in table.expire(25.0)] == [CAROL]
    assert [s.watcher for s in table.watching(BOB)] == [ALICE]
    assert table.remove(a.key) is a and len(table) == 0 and table.presentities() == []


# --- on the wire -------------------------------------------------------------------------


async def _availability(ua: UserAgent, entity: str, within: float = 5.0) -> str:
    seen = []
    try:
        while True:
            notify = await ua.next_request("NOTIFY", within=within, event="presence")
            state = parse_pidf(notify.body)
            seen.append(state)
            if state.entity == entity:
                return state.availability.value
    except TimeoutError:
        raise AssertionError(f"no NOTIFY for {entity} within {within} s; saw {seen}") from None


async def test_presence_across_pools(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab:
        alice = await lab.registered(ALICE, P1)
        r = await alice.subscribe(CAROL)
        assert r.code == 200 and r.headers.get("Expires") == "600"
        assert await _availability(alice, CAROL) == "offline"
        carol = await lab.registered(CAROL, P2)
        assert await _availability(alice, CAROL) == "available"
        # What carol publishes reaches alice, through P2's NOTIFY to P1.
        body = render_pidf(PresenceState(CAROL, Availability.AVAILABLE, "lunch"))
        req = carol.build("PUBLISH", CAROL, headers=[("Event", "presence"),
                          ("Content-Type", "application/pidf+xml"), ("Expires", "600")],
                          body=body)
        assert (await carol.send(req)).code == 200
        notify = await alice.next_request("NOTIFY", event="presence")
        assert parse_pidf(notify.body).note == "lunch"
        assert (await carol.register(expires=0)).code == 200
        assert await _availability(alice, CAROL) == "offline"
        # Same pool: carol watches erin.
        carol2 = await lab.registered(CAROL, P2)
        sub = await carol2.subscribe(ERIN)
        assert await _availability(carol2, ERIN) == "offline"
        await lab.registered(ERIN, P2)
        assert await _availability(carol2, ERIN) == "available"
        # Unsubscribe: no more NOTIFYs for that dialog.
        r = await carol2.subscribe(ERIN, expires=0, call_id=sub.headers.get("Call-ID"))
        assert r.code == 200
        assert (await lab.status(P2))["subscriptions"] == 1  # P1's back-end one for carol


async def test_presence_unknown_when_the_pool_is_down_or_in_resiliency(tmp_path: Path) -> None:
    async with two_pools(tmp_path, detection=TAKEOVER) as lab:
        carol = await lab.registered(CAROL, P2)
        await lab.registered(BOB, P1)
        await carol.subscribe(BOB)
        assert await _availability(carol, BOB) == "available"
        await lab.stop(P1)
        # P1 down: its users' presence is unknown to P2's watchers.
        assert await _availability(carol, BOB, within=5) == "unknown"
        bob = await lab.agent(BOB, P2)

        async def taken() -> bool:
            r = await bob.register()
            return r.headers.get("X-Sipdrill-Mode") == "resiliency"

        await wait_for(taken, 5, step=0.2)
        # Registered in resiliency mode: others still see unknown.
        erin = await lab.registered(ERIN, P2)
        await erin.subscribe(BOB)
        assert await _availability(erin, BOB) == "unknown"


async def test_im_across_pools(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab:
        alice = await lab.registered(ALICE, P1)
        carol = await lab.registered(CAROL, P2)
        r = await alice.message(CAROL, "hello carol")
        assert r.code == 200
        got = await carol.next_request("MESSAGE")
        assert got.body == b"hello carol"
        assert got.headers.get("From", "").startswith(f"<{ALICE}>")
        r = await carol.message(ALICE, "hi alice")
        assert r.code == 200 and (await alice.next_request("MESSAGE")).body == b"hi alice"
        assert (await alice.message(ERIN, "offline?")).code == 480
        assert (await alice.message("sip:nobody@lab.local", "?")).code == 404


async def test_resiliency_mode_refusals(tmp_path: Path) -> None:
    async with two_pools(tmp_path, detection=TAKEOVER) as lab:
        carol = await lab.registered(CAROL, P2)
        await lab.stop(P1)
        alice = await lab.agent(ALICE, P2)

        async def taken() -> bool:
            r = await alice.register()
            return r.headers.get("X-Sipdrill-Mode") == "resiliency"

        await wait_for(taken, 5, step=0.2)
        r = await alice.subscribe(CAROL)
        assert (r.code, r.phrase) == (
            403, "Limited functionality: presence unavailable in resiliency mode"
        )
        r = await alice.subscribe(ALICE, event="vnd-microsoft-roaming-contacts", expires=0)
        assert (r.code, r.phrase) == (
            403, "Limited functionality: contact list unavailable in resiliency mode"
        )
        r = await alice.add_contact(ERIN)
        assert (r.code, r.phrase) == (
            403, "Limited functionality: contact list changes unavailable in resiliency mode"
        )
        body = render_pidf(PresenceState(ALICE, Availability.AVAILABLE))
        req = alice.build("PUBLISH", ALICE, headers=[("Event", "presence")], body=body)
        assert (await alice.send(req)).code == 403
        # The control API refuses the same writes.
        r = await lab.post(P2, f"/users/{ALICE}/contacts", json={"contact": ERIN})
        assert (r.status_code, r.json()["code"]) == (409, "resiliency-mode")
        r = await lab.post(P2, f"/users/{ALICE}/conferences", json={"conf_id": "new"})
        assert (r.status_code, r.json()["code"]) == (409, "resiliency-mode")
        # Peer-to-peer IM works.
        assert (await alice.message(CAROL, "still here")).code == 200
        assert (await carol.next_request("MESSAGE")).body == b"still here"
        text = (await lab.get(P2, "/metrics")).text
        # add-contact twice: once over SIP, once over the control API.
        for feature, n in (("presence-subscribe", 1), ("contact-list-read", 1),
                           ("add-contact", 2), ("presence-publish", 1), ("schedule-meeting", 1)):
            assert f'sipdrill_pool_refusals_total{{feature="{feature}"}} {n}.0' in text, feature


async def test_contact_list_with_full_service(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab:
        alice = await lab.registered(ALICE, P1)
        r = await alice.add_contact(ERIN)
        assert r.code == 200 and int(r.headers.get("X-Sipdrill-Seq") or 0) > 0
        r = await alice.subscribe(ALICE, event="vnd-microsoft-roaming-contacts", expires=0)
        assert (r.code, r.headers.get("Expires")) == (200, "0")
        notify = await alice.next_request("NOTIFY", event="vnd-microsoft-roaming-contacts")
        assert parse_contact_list(notify.body) == [BOB, CAROL, ERIN]
        data = (await lab.get(P1, f"/users/{ALICE}")).json()
        assert data["contacts"] == [BOB, CAROL, ERIN]
        assert data["registration"] == {"mode": "full", "bindings": 1}
