"""Conferences: focus URIs, joining across pools, ad-hoc, and ending on failover."""

from __future__ import annotations

from pathlib import Path

from pool_harness import ALICE, BOB, CAROL, P1, P2, TAKEOVER, two_pools, wait_for
from sipmessage import URI

from sipdrill.pool.conference import (
    ConferenceRef,
    ConferenceTable,
    Participant,
    conference_uri,
    parse_conference_uri,
)

WEEKLY = conference_uri(ALICE, "weekly")


def test_focus_uri_round_trip() -> None:
    assert WEEKLY == "sip:alice@lab.local;gruu;opaque=app:conf:focus:id:weekly"
    ref = parse_conference_uri(URI.parse(WEEKLY))
    assert ref == ConferenceRef(ALICE, "weekly")
    assert ref.uri == WEEKLY
    for not_a_conference in (
        "sip:alice@lab.local",
        "sip:alice@lab.local;opaque=app:conf:focus:id:x",
        "sip:alice@lab.local;gruu;opaque=app:voicemail",
        "sip:alice@lab.local;gruu;opaque=app:conf:focus:id:bad/id",
    ):
        assert parse_conference_uri(URI.parse(not_a_conference)) is None


def test_conference_table() -> None:
    table = ConferenceTable()
    ref = ConferenceRef(ALICE, "x")

    def p(call_id: str) -> Participant:
        return Participant(BOB, call_id, "rt", "lt", "sip:bob@h", 0.0)

    assert table.join(ref, p("c1"), adhoc=True)
    assert not table.join(ref, p("c2"), adhoc=True)
    assert table.participants() == 2
    assert table.leave(ref, "c1") is not None
    assert table.leave(ref, "nope") is None
    assert table.leave(ref, "c2") is not None
    assert ref not in table.active  # the last one out ends it
    table.join(ref, p("c3"), adhoc=False)
    assert [x.call_id for x in table.end(ref)] == ["c3"]


async def test_join_a_scheduled_conference_across_pools(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab:
        carol = await lab.registered(CAROL, P2)
        invite, ok = await carol.invite(WEEKLY)
        assert ok.code == 200, ok.phrase
        assert "isfocus" in (ok.headers.get("Contact") or "")
        confs = (await lab.get(P1, "/conferences")).json()
        assert confs == [{"uri": WEEKLY, "organiser": ALICE, "conf_id": "weekly",
                          "adhoc": False, "participants": [CAROL]}]
        assert (await lab.get(P2, "/conferences")).json() == []
        bye = await carol.ack_and_bye(invite, ok)
        assert bye.code == 200
        assert (await lab.get(P1, "/conferences")).json() == []
        # No such conference; scheduling one makes it joinable.
        _, missing = await carol.invite(conference_uri(ALICE, "later"))
        assert missing.code == 404
        r = await lab.post(P1, f"/users/{ALICE}/conferences",
                           json={"conf_id": "later", "subject": "Later"})
        assert r.status_code == 200 and r.json()["uri"] == conference_uri(ALICE, "later")
        _, ok = await carol.invite(conference_uri(ALICE, "later"))
        assert ok.code == 200


async def test_adhoc_conference_by_its_organiser(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab:
        bob = await lab.registered(BOB, P1)
        carol = await lab.registered(CAROL, P2)
        adhoc = conference_uri(BOB, "adhoc-1")
        _, early = await carol.invite(adhoc)
        assert early.code == 404  # only the organiser starts an ad-hoc conference
        b_invite, b_ok = await bob.invite(adhoc)
        assert b_ok.code == 200
        c_invite, c_ok = await carol.invite(adhoc)
        assert c_ok.code == 200
        [conf] = (await lab.get(P1, "/conferences")).json()
        assert conf["adhoc"] and conf["participants"] == [BOB, CAROL]
        assert (await bob.ack_and_bye(b_invite, b_ok)).code == 200
        assert (await carol.ack_and_bye(c_invite, c_ok)).code == 200
        assert (await lab.get(P1, "/conferences")).json() == []


async def test_organiser_in_resiliency_mode_has_no_conferences(tmp_path: Path) -> None:
    async with two_pools(tmp_path, detection=TAKEOVER) as lab:
        carol = await lab.registered(CAROL, P2)
        await lab.registered(ALICE, P1)
        _, ok = await carol.invite(WEEKLY)
        assert ok.code == 200
        await lab.stop(P1)
        # The conference's pool is gone: the participant's flow to it, and
        # any new join, end with 480.
        alice = await lab.agent(ALICE, P2)

        async def taken() -> bool:
            r = await alice.register()
            return r.headers.get("X-Sipdrill-Mode") == "resiliency"

        await wait_for(taken, 6, step=0.2)
        _, again = await carol.invite(WEEKLY)
        assert (again.code, again.phrase) == (
            480, "Temporarily Unavailable: the conference's pool is down"
        )
        # The organiser in resiliency mode can neither start nor host one.
        _, own = await alice.invite(conference_uri(ALICE, "adhoc-2"))
        assert (own.code, own.phrase) == (
            488, "Limited functionality: ad-hoc conferences unavailable in resiliency mode"
        )
        # Joining a conference whose pool is up works in resiliency mode.
        _, up = await alice.invite(conference_uri(CAROL, "nope"))
        assert up.code == 404  # routed to P2, which answered: no such conference
        text = (await lab.get(P2, "/metrics")).text
        assert 'sipdrill_pool_refusals_total{feature="join-conference"} 1.0' in text
        assert 'sipdrill_pool_refusals_total{feature="adhoc-conference"} 1.0' in text


async def test_failover_ends_the_home_pools_conferences(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab:
        carol = await lab.registered(CAROL, P2)
        bob = await lab.registered(BOB, P1)
        _, ok = await carol.invite(WEEKLY)
        assert ok.code == 200
        _, ok = await bob.invite(WEEKLY)
        assert ok.code == 200
        # A planned failover of P1: the conference moves with alice's data,
        # so P1 ends it and both participants get a BYE (carol's via P2).
        r = await lab.post(P1, "/failover/state",
                           json={"home_pool": P1, "event": "failover_started"})
        assert r.status_code == 200, r.text
        for ua in (carol, bob):
            bye = await ua.next_request("BYE")
            assert "alice@lab.local" in (bye.headers.get("From") or "")
        assert (await lab.get(P1, "/conferences")).json() == []
