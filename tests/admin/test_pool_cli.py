"""Move-CsUser across pool processes, Export/Import-CsUserData and pool status,
through the control API and the `sipdrill admin` commands."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import yaml
from pool_harness import (
    ALICE,
    BOB,
    CAROL,
    DAVE,
    P1,
    P2,
    TAKEOVER,
    TOKEN,
    Lab,
    contacts_q,
    two_pools,
    wait_for,
)
from typer.testing import CliRunner

from sipdrill.addresses import pool_control_url as control_url
from sipdrill.admin.pool_cli import pool_app, user_app
from sipdrill.backup.client import LabClients
from sipdrill.cms.operations import cms_failover


def _topology_file(lab: Lab) -> Path:
    path = lab.tmp / "topology.yaml"
    path.write_text(yaml.safe_dump(json.loads(lab.topology.model_dump_json())))
    return path


async def _cli(app: Any, args: list[str]) -> Any:
    # The pools run in this loop: the command (sync httpx) runs in a thread.
    runner = CliRunner()
    env = {"SIPDRILL_CONTROL_TOKEN": TOKEN, "COLUMNS": "200"}
    return await asyncio.to_thread(runner.invoke, app, args, env=env)


async def test_move_without_force_takes_contacts_along(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab:
        bob = await lab.registered(BOB, P1)
        topo = _topology_file(lab)
        result = await _cli(user_app, ["move", BOB, "--to", P2, "--topology", str(topo),
                                       "--loopback", "--json"])
        assert result.exit_code == 0, result.output
        moved = json.loads(result.output)
        assert moved["source_pool"] == P1 and moved["target_pool"] == P2
        assert (moved["contacts_moved"], moved["contacts_lost"]) == (1, 0)
        assert moved["source_cleaned"] is True
        assert (await lab.get(P1, f"/users/{BOB}")).status_code == 404
        data = (await lab.get(P2, f"/users/{BOB}")).json()
        assert (data["home_pool"], data["contacts"]) == (P2, [ALICE])
        # Bob's client lost its flow to P1; registering again there gets 301 to P2.
        await asyncio.wait_for(bob.closed.wait(), 3)
        again = await lab.agent(BOB, P1)
        r = await again.register()
        assert r.code == 301 and contacts_q(r)[0] == (P2, 0.7)
        r = await (await lab.agent(BOB, P2)).register()
        assert (r.code, r.headers.get("X-Sipdrill-Mode")) == (200, "full")
        # IM still finds him, from his old pool's users.
        alice = await lab.registered(ALICE, P1)
        assert (await alice.message(BOB, "moved?")).code == 200
        # Moving again to where he is: refused, nothing changed.
        result = await _cli(user_app, ["move", BOB, "--to", P2, "--topology", str(topo),
                                       "--loopback"])
        assert result.exit_code == 1 and "same-pool" in result.output


async def test_forced_move_loses_contacts_and_cleans_up_later(tmp_path: Path) -> None:
    async with two_pools(tmp_path, detection=TAKEOVER) as lab:
        assert await lab.replicate(P1, P2) > 0  # P2 holds a replica of dave
        await lab.stop(P1)
        # P1 hosted the CMS master: no move until the CMS is failed over.
        r = await lab.post(P2, "/admin/users/move", json={"user": DAVE, "to": P2, "force": True})
        assert (r.status_code, r.json()["code"]) == (503, "cms-unavailable")
        async with LabClients(lab.topology, token=TOKEN, loopback=True) as clients:
            report = await cms_failover(lab.topology, True, clients)
        assert report.target == P2
        r = await lab.post(P2, "/admin/users/move", json={"user": DAVE, "to": P2})
        assert (r.status_code, r.json()["code"]) == (503, "pool-down")
        r = await lab.post(P2, "/admin/users/move", json={"user": DAVE, "to": P2, "force": True})
        assert r.status_code == 200, r.text
        moved = r.json()
        assert (moved["contacts_lost"], moved["contacts_moved"]) == (3, 0)
        assert moved["counted_from"] == "replica"
        assert moved["source_cleaned"] is False
        data = (await lab.get(P2, f"/users/{DAVE}")).json()
        assert (data["home_pool"], data["contacts"]) == (P2, [])
        r = await (await lab.agent(DAVE, P2)).register()
        assert (r.code, r.headers.get("X-Sipdrill-Mode")) == (200, "full")
        cms = (await lab.get(P2, "/cms")).json()
        assert cms["document"]["config"]["user_homing"] == {DAVE: P2}
        # P1 comes back with dave's stale account: P2 removes it.
        await lab.start(P1)

        async def cleaned() -> bool:
            return (await lab.get(P1, f"/users/{DAVE}")).status_code == 404

        await wait_for(cleaned, 5, step=0.2)

        async def settled() -> bool:
            return (await lab.status(P2))["pending_deletes"] == 0

        await wait_for(settled, 2)
        r = await (await lab.agent(DAVE, P1)).register()
        assert r.code == 301 and contacts_q(r)[0] == (P2, 0.7)


async def test_forced_move_with_the_source_up_counts_from_it(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab:
        result = await lab.post(P1, "/admin/users/move",  # relayed to the target
                                json={"user": ALICE, "to": P2, "force": True})
        assert result.status_code == 200, result.text
        moved = result.json()
        assert (moved["contacts_lost"], moved["conferences_lost"]) == (2, 1)
        assert (moved["counted_from"], moved["source_cleaned"]) == ("source", True)
        r = await lab.post(P2, "/admin/users/move",
                           json={"user": "sip:nobody@lab.local", "to": P2})
        assert (r.status_code, r.json()["code"]) == (404, "unknown-user")


async def test_export_import_and_status_commands(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab:
        topo = _topology_file(lab)
        out = tmp_path / "p1.xml"
        common = ["--topology", str(topo), "--loopback"]
        result = await _cli(user_app, ["export", "--pool", P1, "--out", str(out), *common])
        assert result.exit_code == 0, result.output
        assert "exported 3 users, 6 contacts and 1 meetings" in result.output
        assert out.read_bytes().startswith(b"<?xml")
        # Lose alice's list (a forced move would), then restore it.
        await lab.post(P1, "/admin/users/move", json={"user": ALICE, "to": P2, "force": True})
        await lab.post(P2, "/admin/users/move", json={"user": ALICE, "to": P1, "force": True})
        assert (await lab.get(P1, f"/users/{ALICE}")).json()["contacts"] == []
        result = await _cli(user_app, ["import", str(out), "--pool", P1, *common, "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["users_restored"] == 3
        assert (await lab.get(P1, f"/users/{ALICE}")).json()["contacts"] == [BOB, CAROL]

        await lab.registered(ALICE, P1)
        result = await _cli(pool_app, ["status", "--pool", P1, *common])
        assert result.exit_code == 0, result.output
        assert "registrations: 1 full, 0 resiliency" in result.output
        assert f"failover {P1}: Active" in result.output
        result = await _cli(pool_app, ["status", "--pool", P1, *common, "--token", "wrong"])
        assert result.exit_code == 1 and "unauthorized" in result.output
        assert control_url(lab.topology, P2, loopback=False) == "http://172.30.2.11:8080"


async def test_restart_keeps_failover_state_moves_and_writes(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab:
        seqs = []
        for contact in ("sip:x1@lab.local", "sip:x2@lab.local"):
            r = await lab.post(P2, f"/users/{CAROL}/contacts", json={"contact": contact})
            seqs.append(r.json()["seq"])
        r = await lab.post(P2, "/failover/state", json={"home_pool": P1,
                                                         "event": "failover_started"})
        assert r.status_code == 200
        await lab.post(P2, "/admin/users/move", json={"user": BOB, "to": P2})
        await lab.stop(P2)
        await lab.start(P2)
        state = (await lab.get(P2, "/failover/state")).json()
        assert state["states"][P1] == "FailingOver"
        data = (await lab.get(P2, f"/users/{CAROL}")).json()
        assert data["contacts"][-2:] == ["sip:x1@lab.local", "sip:x2@lab.local"]
        assert (await lab.status(P2))["store"]["high_water_mark"] >= max(seqs)
        assert lab.pools[P2].home_of(BOB) == P2
