"""Move-CsUser over every user of a pool (one request, paced, with progress),
the scheduled user-data export copied to the DR pool's share, and the import
of a held copy: the budget DR runbook (seed 001) on two pool processes, through
the control API and `sipdrill admin user ...`."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pool_harness import ALICE, BOB, CAROL, DAVE, P1, P2, TOKEN, Lab, make_topology, wait_for
from typer.testing import CliRunner

from sipdrill.admin.pool_cli import user_app
from sipdrill.backup.client import LabClients
from sipdrill.cms.operations import cms_failover
from sipdrill.errors import OperationError
from sipdrill.pool.store import StoreSnapshot
from sipdrill.topology import Topology

P1_USERS = sorted(u.lower() for u in (ALICE, BOB, DAVE))


def _topology(export: bool) -> Topology:
    raw = json.loads(make_topology().model_dump_json())
    if export:
        raw["pools"][0]["user_data_export"] = {"copy_to": P2, "keep": 3}
    return Topology.model_validate(raw)


@pytest.fixture
async def lab(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Lab]:
    lab = Lab(tmp_path, _topology(export=getattr(request, "param", False)))
    try:
        await lab.start(P1)
        await lab.start(P2)
        yield lab
    finally:
        await lab.close()


def _topology_file(lab: Lab) -> Path:
    path = lab.tmp / "topology.yaml"
    path.write_text(yaml.safe_dump(json.loads(lab.topology.model_dump_json())))
    return path


async def _cli(lab: Lab, *args: str) -> Any:
    # The pools run in this loop: the command (sync httpx) runs in a thread.
    runner = CliRunner()
    env = {"SIPDRILL_CONTROL_TOKEN": TOKEN, "COLUMNS": "200"}
    argv = [*args, "--topology", str(_topology_file(lab)), "--loopback"]
    return await asyncio.to_thread(runner.invoke, user_app, argv, env=env)


def _lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


async def _fail_over_cms(lab: Lab) -> None:
    async with LabClients(lab.topology, token=TOKEN, loopback=True) as clients:
        assert (await cms_failover(lab.topology, True, clients)).target == P2


def _snapshots(lab: Lab) -> dict[str, tuple[StoreSnapshot, int]]:
    return {p: (s.store.snapshot(), s.store.high_water_mark()) for p, s in lab.pools.items()}


# --- Move-CsUser over a pool ------------------------------------------------------------


async def test_every_user_of_a_pool_moves_in_one_request_with_progress(lab: Lab) -> None:
    contacts = {u: (await lab.get(P1, f"/users/{u}")).json()["contacts"] for u in P1_USERS}
    result = await _cli(lab, "move", "--from-pool", P1, "--to", P2, "--rate", "2")
    assert result.exit_code == 0, result.output
    # Paced at 2 users a second: a progress line per batch, then the summary.
    assert "moving users of pool1.lab.local to pool2.lab.local: 2/3 moved" in result.output
    assert "moved 3 of 3 users from pool1.lab.local to pool2.lab.local" in result.output
    assert "moved along: 6 contacts, 1 meetings" in result.output
    for uri in P1_USERS:
        data = (await lab.get(P2, f"/users/{uri}")).json()
        assert (data["home_pool"], data["contacts"]) == (P2, contacts[uri])
        assert (await lab.get(P1, f"/users/{uri}")).status_code == 404
        assert lab.pools[P1].home_of(uri) == lab.pools[P2].home_of(uri) == P2
    cms = (await lab.get(P2, "/cms")).json()
    assert cms["document"]["config"]["user_homing"] == {u: P2 for u in P1_USERS}
    status = (await lab.get(P2, "/admin/users/move-all")).json()
    assert not status["running"] and status["last"]["moved"] == 3
    # Nobody is left on pool1: refused, nothing changed.
    before = _snapshots(lab)
    r = await lab.post(P2, "/admin/users/move-all", json={"from_pool": P1, "to": P2})
    assert (r.status_code, r.json()["code"]) == (404, "no-users")
    assert _snapshots(lab) == before


async def test_the_stream_reports_each_batch_then_the_result(lab: Lab) -> None:
    r = await lab.post(
        P2, "/admin/users/move-all", json={"from_pool": P1, "to": P2, "force": True, "rate": 1}
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    events = _lines(r.text)
    assert [e["event"] for e in events] == ["started"] + ["progress"] * 3 + ["finished", "result"]
    assert [e["moved"] for e in events[:5]] == [0, 1, 2, 3, 3]
    # One user a second: the third batch starts about two seconds in.
    assert events[4]["elapsed"] >= 1.9
    result = events[-1]
    assert (result["moved"], result["failed"], result["force"]) == (3, [], True)
    # Forced with pool1 up: what was lost is counted from pool1 itself.
    assert (result["contacts_lost"], result["conferences_lost"]) == (6, 1)
    assert result["counted_from"] == {"source": 3} and result["pending_source_cleanups"] == 0
    assert (await lab.get(P2, f"/users/{ALICE}")).json()["contacts"] == []


async def test_bad_moves_are_refused_with_nothing_changed(lab: Lab) -> None:
    before = _snapshots(lab)
    cases = [
        ({"from_pool": "pool9.lab.local", "to": P2}, P2, 404, "unknown-pool"),
        ({"from_pool": P2, "to": P2}, P2, 409, "same-pool"),
        ({"from_pool": P1, "to": P2}, P1, 409, "not-target"),  # asked of the wrong pool
        ({"from_pool": P1, "to": P2, "rate": 0}, P2, 422, "bad-request"),
    ]
    for body, asked, status, code in cases:
        r = await lab.post(asked, "/admin/users/move-all", json=body)
        assert (r.status_code, r.json()["code"]) == (status, code), body
    result = await _cli(lab, "move", "--from-pool", "pool9.lab.local", "--to", P2)
    assert result.exit_code == 1
    assert "unknown-pool: the source pool is not a pool of this lab" in result.output
    result = await _cli(lab, "move", ALICE, "--from-pool", P1, "--to", P2)
    assert result.exit_code == 1 and "give a USER, or --from-pool" in result.output
    # pool1 down (the CMS failed over first): only -Force moves its users.
    await lab.stop(P1)
    await _fail_over_cms(lab)
    before = _snapshots(lab)
    r = await lab.post(P2, "/admin/users/move-all", json={"from_pool": P1, "to": P2})
    assert (r.status_code, r.json()["code"]) == (503, "pool-down")
    assert "only Move-CsUser -Force" in r.json()["message"]
    assert _snapshots(lab) == before


async def test_a_forced_move_of_a_pool_that_is_down_cleans_up_when_it_returns(
    lab: Lab,
) -> None:
    assert await lab.replicate(P1, P2) > 0  # pool2 holds a replica: losses are counted
    await lab.stop(P1)
    await _fail_over_cms(lab)
    result = await _cli(lab, "move", "--from-pool", P1, "--to", P2, "--force", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    assert (summary["moved"], summary["source_answered"]) == (3, False)
    assert summary["counted_from"] == {"replica": 3} and summary["contacts_lost"] == 6
    assert summary["pending_source_cleanups"] == 3
    for uri in P1_USERS:
        data = (await lab.get(P2, f"/users/{uri}")).json()
        assert (data["home_pool"], data["contacts"]) == (P2, [])
    await lab.start(P1)

    async def cleaned() -> bool:
        gone = [(await lab.get(P1, f"/users/{u}")).status_code == 404 for u in P1_USERS]
        return all(gone) and (await lab.status(P2))["pending_deletes"] == 0

    await wait_for(cleaned, 10, step=0.2)


async def test_a_silent_source_is_waited_for_once_not_once_per_batch(lab: Lab) -> None:
    """A cut site answers nothing (the kernel still accepts connections): each
    probe of it costs its timeout. The move waits for it while checking the CMS
    and the source, then not again for each batch's CMS change."""
    await lab.stop(P1)
    await _fail_over_cms(lab)
    host, port = lab.url(P1, "").removeprefix("http://").rsplit(":", 1)
    silent = socket.socket()
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    silent.bind((host, int(port)))
    silent.listen(64)  # accepts, never answers
    try:
        r = await lab.post(
            P2, "/admin/users/move-all",
            json={"from_pool": P1, "to": P2, "force": True, "rate": 1}, timeout=120,
        )
    finally:
        silent.close()
    result = _lines(r.text)[-1]
    assert result["moved"] == 3 and result["source_answered"] is False
    # Three batches a second apart, and no 3 s CMS probe of pool1 in any of them
    # (with one per batch it took 3 x 6 s).
    assert result["duration"] < 10, result


async def test_a_batch_the_cms_refuses_is_put_back_and_reported(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All or nothing per user: the second batch's homing is refused, so its
    user's account on pool2 is put back as it was (here: none) and it is
    reported failed; the first batch stays moved."""
    cms = lab.pools[P2].user_moves.cms
    real = cms.set_homes
    calls = 0

    async def flaky(homes: dict[str, str | None], **kw: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OperationError("cms-unavailable", "the CMS master went away", 503)
        await real(homes, **kw)

    monkeypatch.setattr(cms, "set_homes", flaky)
    contacts = {u: len((await lab.get(P1, f"/users/{u}")).json()["contacts"]) for u in P1_USERS}
    r = await lab.post(
        P2, "/admin/users/move-all", json={"from_pool": P1, "to": P2, "force": True, "rate": 2}
    )
    result = _lines(r.text)[-1]
    moved, (failed,) = result["users"], result["failed"]
    assert sorted(moved) == P1_USERS[:2] and failed["user"] == P1_USERS[2]
    assert failed["code"] == "cms-unavailable" and "put back" in failed["message"]
    # Only the users really moved count: the one put back lost nothing.
    assert result["contacts_lost"] == contacts[P1_USERS[0]] + contacts[P1_USERS[1]]
    assert (await lab.get(P2, f"/users/{P1_USERS[2]}")).status_code == 404
    data = (await lab.get(P1, f"/users/{P1_USERS[2]}")).json()
    assert data["home_pool"] == P1 and data["contacts"]  # untouched at its home
    assert lab.pools[P2].home_of(P1_USERS[2]) == P1
    # Run again: whoever is still on pool1 moves.
    r = await lab.post(P2, "/admin/users/move-all", json={"from_pool": P1, "to": P2, "force": True})
    assert _lines(r.text)[-1]["users"] == [P1_USERS[2]]


# --- the scheduled export, its copy and the import of a held copy -------------------------


@pytest.mark.parametrize("lab", [True], indirect=True)
async def test_nightly_export_copied_to_the_dr_pool_and_restored_after_a_forced_move(
    lab: Lab,
) -> None:
    """Seed 001 end to end: the export runs at start and is copied to pool2's
    share; a write after the last export is lost, counted by seq, exactly."""

    async def held() -> list[dict[str, Any]]:
        r = await lab.get(P2, "/admin/users/share")
        return list(r.json())

    await wait_for(lambda: held(), 10)  # the first export, copied at start
    kept = (await lab.post(P1, f"/users/{ALICE}/contacts", json={"contact": "sip:k@lab.local"}))
    result = await _cli(lab, "export-job", "--pool", P1, "--json")
    assert result.exit_code == 0, result.output
    job = json.loads(result.output)
    assert (job["copied"], job["copy_to"]) == (True, P2)
    assert job["export"]["seq"] >= kept.json()["seq"]
    lost = await lab.post(P1, f"/users/{ALICE}/contacts", json={"contact": "sip:lost@lab.local"})
    assert lost.json()["seq"] > job["export"]["seq"]
    listing = await _cli(lab, "exports", "--pool", P2)
    assert f"{job['name']}  from {P1}" in listing.output.splitlines()[1]  # newest first

    # Before the move nobody can be restored on pool2: each user says why.
    result = await _cli(lab, "import", "--pool", P2, "--held")
    assert result.exit_code == 1
    assert f"NOT RESTORED {ALICE}: no account on {P2}" in result.output

    await lab.stop(P1)
    await _fail_over_cms(lab)
    r = await lab.post(
        P2, "/admin/users/move-all", json={"from_pool": P1, "to": P2, "force": True}
    )
    assert _lines(r.text)[-1]["moved"] == 3
    result = await _cli(lab, "import", "--pool", P2, "--held", "--from-pool", P1, "--json")
    assert result.exit_code == 0, result.output
    restored = json.loads(result.output)
    assert (restored["users_restored"], restored["skipped"]) == (3, [])
    assert restored["name"] == job["name"] and restored["export"]["seq"] == job["export"]["seq"]
    alice = (await lab.get(P2, f"/users/{ALICE}")).json()
    assert alice["contacts"] == [BOB, CAROL, "sip:k@lab.local"]  # the later write is lost
    assert [c["conf_id"] for c in alice["conferences"]] == ["weekly"]


@pytest.mark.parametrize("lab", [True], indirect=True)
async def test_a_damaged_or_missing_held_export_is_refused_with_nothing_changed(
    lab: Lab,
) -> None:
    job = (await lab.post(P1, "/admin/users/export-job")).json()
    assert job["copied"], job
    await lab.stop(P1)
    await _fail_over_cms(lab)
    r = await lab.post(
        P2, "/admin/users/move-all", json={"from_pool": P1, "to": P2, "force": True}
    )
    assert _lines(r.text)[-1]["moved"] == 3
    copy = lab.tmp / "pool2" / "exports" / "share" / P1 / job["name"]
    data = copy.read_bytes()
    before = _snapshots(lab)
    for damaged in (data[: len(data) // 2], data.replace(b"sip:bob@", b"sip:bab@", 1)):
        copy.write_bytes(damaged)
        r = await lab.post(P2, "/admin/users/import-held", json={"source_pool": P1})
        assert (r.status_code, r.json()["code"]) == (400, "bad-export"), r.text
        assert _snapshots(lab) == before
    result = await _cli(lab, "import", "--pool", P2, "--held")
    assert result.exit_code == 1 and "bad-export" in result.output
    missing = {"name": "userdata-x-0000000000000.xml"}
    r = await lab.post(P2, "/admin/users/import-held", json=missing)
    assert (r.status_code, r.json()["code"]) == (404, "no-export")
    # A foreign file uploaded by hand: refused too.
    foreign = data.replace(b'domain="lab.local"', b'domain="other.example"', 1)
    r = await lab.post(P2, "/admin/users/import", content=foreign)
    assert r.json()["code"] in ("bad-export", "foreign-export")
    assert _snapshots(lab) == before


@pytest.mark.parametrize("lab", [True], indirect=True)
async def test_the_share_refuses_names_and_pools_it_does_not_know(lab: Lab) -> None:
    for params, code in (
        ({"source_pool": P1, "name": "../../store.db"}, "bad-name"),
        ({"source_pool": "pool9.lab.local", "name": "userdata-pool1-0000000000001.xml"},
         "unknown-pool"),
    ):
        r = await lab.http.put(lab.url(P2, "/admin/users/share"), params=params, content=b"x")
        assert r.json()["code"] == code
