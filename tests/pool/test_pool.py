"""The Front End pool on loopback: registrar, backup registrar, pool failover."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pool_harness import ALICE, BOB, CAROL, P1, P2, TAKEOVER, contacts_q, two_pools, wait_for


async def test_home_pool_registers_with_full_service(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab:
        ua = await lab.agent(ALICE, P1)
        r = await ua.register()
        assert r.code == 200
        assert r.headers.get("X-Sipdrill-Mode") == "full"
        assert r.headers.get("Flow-Timer") == "120"
        status = await lab.status(P1)
        assert status["registrations"]["full"] == 1
        assert status["registrations"]["resiliency"] == 0
        # Unregister: the binding goes, and so does the count.
        r = await ua.register(expires=0)
        assert r.code == 200
        assert (await lab.status(P1))["registrations"]["full"] == 0


async def test_other_pool_redirects_home_and_backup(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab:
        ua = await lab.agent(ALICE, P2)
        r = await ua.register()
        assert r.code == 301
        assert contacts_q(r) == [(P1, 0.7), (P2, 0.3)]
        assert all("transport=tls" in c for c in r.headers.getlist("Contact"))
        unknown = await lab.agent("sip:nobody@lab.local", P2)
        assert (await unknown.register()).code == 404


async def test_backup_takes_over_then_sends_users_home(tmp_path: Path) -> None:
    async with two_pools(tmp_path, detection=TAKEOVER) as lab:
        await wait_for(lambda: lab.pools[P2].sip.heartbeats["answered"] > 0, 5)
        loop = asyncio.get_running_loop()
        await lab.stop(P1)
        stopped = loop.time()
        # Within the detection interval the backup still sends the user home.
        ua = await lab.agent(ALICE, P2)
        assert (await ua.register()).code == 301

        async def partner_down() -> bool:
            return (await lab.status(P2))["partner"]["state"] == "down"

        await wait_for(partner_down, 5, step=0.02)
        took = loop.time() - stopped
        # Detection interval 1.5 s after the last heartbeat (every 0.375 s).
        assert 1.0 <= took <= 3.5, took
        r = await ua.register()
        assert r.code == 200
        assert r.headers.get("X-Sipdrill-Mode") == "resiliency"
        assert (await lab.status(P2))["registrations"]["resiliency"] == 1

        # The home pool returns; after the failback interval the backup
        # nudges the user, and answers the refresh with 301 home.
        await lab.start(P1)
        returned = loop.time()
        nudge = await ua.next_request("NOTIFY", within=6)
        assert nudge.headers.get("Event") == "x-sipdrill-reregister"
        assert loop.time() - returned >= 0.9
        r = await ua.register()
        assert r.code == 301
        assert contacts_q(r)[0] == (P1, 0.7)
        assert (await lab.status(P2))["registrations"]["resiliency"] == 0
        home = await lab.agent(ALICE, P1)
        r = await home.register()
        assert (r.code, r.headers.get("X-Sipdrill-Mode")) == (200, "full")


async def test_ignored_nudge_closes_the_flow(tmp_path: Path) -> None:
    async with two_pools(tmp_path, detection=TAKEOVER, nudge_grace=0.5) as lab:
        await lab.stop(P1)
        ua = await lab.agent(BOB, P2)

        async def taken() -> bool:
            return (await ua.register()).code == 200

        await wait_for(taken, 5, step=0.2)
        await lab.start(P1)
        await ua.next_request("NOTIFY", within=6)
        # No REGISTER comes back: the pool closes the flow.
        await asyncio.wait_for(ua.closed.wait(), 3)
        assert (await lab.status(P2))["registrations"]["resiliency"] == 0


async def test_failover_state_gives_full_service_on_the_backup(tmp_path: Path) -> None:
    async with two_pools(tmp_path, detection=TAKEOVER) as lab:
        # The Backup Service's part, done by hand: P1's data on P2.
        assert await lab.replicate(P1, P2) > 0
        await lab.stop(P1)
        ua = await lab.agent(ALICE, P2, auto_nudge=True)

        async def resiliency() -> bool:
            r = await ua.register()
            return r.code == 200 and r.headers.get("X-Sipdrill-Mode") == "resiliency"

        await wait_for(resiliency, 5, step=0.2)
        fetch = await ua.subscribe(ALICE, event="vnd-microsoft-roaming-contacts", expires=0)
        assert fetch.code == 403

        # The order rule: P2's users cannot fail over to P1 now... once P1's are on P2.
        r = await lab.post(P2, "/failover/state",
                           json={"home_pool": P1, "event": "failover_started",
                                 "disaster_mode": True})
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "FailingOver"
        r = await lab.post(P2, "/failover/state",
                           json={"home_pool": P2, "event": "failover_started"})
        assert (r.status_code, r.json()["code"]) == (409, "failover-order")
        # During the cmdlet the user data moves: still resiliency mode.
        assert (await ua.register()).headers.get("X-Sipdrill-Mode") == "resiliency"

        r = await lab.post(P2, "/failover/state",
                           json={"home_pool": P1, "event": "failover_completed",
                                 "disaster_mode": True})
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "FailedOver"
        assert r.json()["reevaluated"]["mode_changed"] == 1

        # The client was nudged, registered again, and has full service.
        await wait_for(lambda: bool(ua.responses_to_nudge), 5)
        assert ua.responses_to_nudge[-1].headers.get("X-Sipdrill-Mode") == "full"
        status = await lab.status(P2)
        rr = status["reregistration"]
        assert (rr["users"], rr["reregistered"], rr["complete"]) == (1, 1, True)
        assert rr["max"] < 2.0
        assert status["registrations"] == {"full": 1, "resiliency": 0, "bindings": 1}
        state = (await lab.get(P2, "/failover/state")).json()
        assert state["states"][P1] == "FailedOver"

        # Full service: the replicated contact list, and writes.
        fetch = await ua.subscribe(ALICE, event="vnd-microsoft-roaming-contacts", expires=0)
        assert fetch.code == 200
        notify = await ua.next_request("NOTIFY", event="vnd-microsoft-roaming-contacts")
        assert b"sip:bob@lab.local" in notify.body and b"sip:carol@lab.local" in notify.body
        r = await lab.post(P2, f"/users/{ALICE}/contacts", json={"contact": "sip:erin@lab.local"})
        assert r.status_code == 200, r.text

        # Another P1 user registering at P2 now gets full service at once.
        bob = await lab.agent(BOB, P2)
        r = await bob.register()
        assert (r.code, r.headers.get("X-Sipdrill-Mode")) == (200, "full")


async def test_failback_sends_users_home(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab:
        for event in ("failover_started", "failover_completed"):
            for pool in (P1, P2):
                r = await lab.post(pool, "/failover/state", json={"home_pool": P1, "event": event})
                assert r.status_code == 200, r.text
        # P1 now redirects its own users to P2 (the serving pool).
        ua = await lab.agent(ALICE, P1)
        r = await ua.register()
        assert r.code == 301 and contacts_q(r)[0] == (P2, 0.7)
        at_p2 = await lab.agent(ALICE, P2, auto_nudge=True)
        r = await at_p2.register()
        assert (r.code, r.headers.get("X-Sipdrill-Mode")) == (200, "full")
        for event in ("failback_started", "failback_completed"):
            for pool in (P2, P1):
                r = await lab.post(pool, "/failover/state", json={"home_pool": P1, "event": event})
                assert r.status_code == 200, r.text
        await wait_for(lambda: any(r.code == 301 for r in at_p2.responses_to_nudge), 5)
        assert (await lab.status(P2))["registrations"]["full"] == 0
        r = await lab.post(P2, "/failover/state", json={"home_pool": P1, "event": "bogus"})
        # Refused by the schema (the events are listed in /openapi.json).
        assert (r.status_code, r.json()["code"]) == (422, "bad-request")
        assert r.json()["message"].startswith("event: Input should be 'failover_started'")


async def test_metrics_and_health(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab:
        await lab.registered(ALICE, P1)
        await (await lab.agent(CAROL, P1)).register()  # 301
        r = await lab.http.get(lab.url(P1, "/health"), headers={"Authorization": ""})
        assert r.json() == {"status": "ok", "pool": P1, "front_end": "fe.pool1.lab.local"}
        unauth = await httpx_get_without_token(lab.url(P1, "/status"))
        assert unauth.status_code == 401 and unauth.json()["code"] == "unauthorized"
        await wait_for(lambda: lab.pools[P1].sip.heartbeats["answered"] > 0, 5)
        text = (await lab.get(P1, "/metrics")).text
        assert 'sipdrill_pool_registrations{mode="full"} 1.0' in text
        assert 'sipdrill_pool_register_requests_total{result="ok"} 1.0' in text
        assert 'sipdrill_pool_redirects_total 1.0' in text
        assert 'sipdrill_pool_heartbeats_total{direction="answered"}' in text
        assert 'sipdrill_pool_refusals_total{feature="add-contact"} 0.0' in text
        assert 'sipdrill_pool_partner_state{state="up"} 1.0' in text


async def httpx_get_without_token(url: str) -> object:
    import httpx

    async with httpx.AsyncClient() as client:
        return await client.get(url)
