"""The Backup Service against fake pools over ASGI: replication, resuming,
export / import states, the hold of a failed-over pool, its API.

No sockets and no sleeping: the clock is a FakeClock shared by the stores
(which stamp the feed) and the services."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from apicheck import SECRET, assert_docs_behind_token, assert_routing_errors, client, error_of
from fake_pool import FakeLab
from labkit import P1, P2, FakeClock, make_topology

from sipdrill.backup.api import create_backup_app
from sipdrill.backup.service import (
    EXPORT_TRANSITIONS,
    BackupService,
    ExportEvent,
    ExportState,
    SyncDirection,
)
from sipdrill.errors import OperationError
from sipdrill.pool.state import FailoverState, TransitionError
from sipdrill.pool.store import StoreSnapshot, UserStore
from sipdrill.topology import Topology

ALICE = "sip:alice@lab.local"
BOB = "sip:bob@lab.local"


@pytest.fixture
async def lab(tmp_path: Path, clock: FakeClock, topology: Topology) -> AsyncIterator[FakeLab]:
    lab = FakeLab(topology, tmp_path, clock, page_size=7)
    for p in (P1, P2):
        lab.store(p).seed_from_topology(topology)
    yield lab
    await lab.aclose()


def homed(snapshot: StoreSnapshot, pool: str) -> tuple[object, ...]:
    """The data of the users homed on ``pool`` (what P1 -> P2 replicates)."""
    users = {u: r for u, r in snapshot.users.items() if r.home_pool == pool}
    contacts = {o: c for o, c in snapshot.contacts.items() if o in users}
    confs = {k: v for k, v in snapshot.conferences.items() if k[0] in users}
    return users, contacts, confs


async def until(condition: Callable[[], bool], steps: int = 10_000) -> None:
    """Let other tasks run until ``condition`` holds (no sleeping)."""
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


# --- the state machine ------------------------------------------------------------


def test_every_state_answers_every_cycle_outcome() -> None:
    for state in ExportState:
        for event in (
            ExportEvent.CAUGHT_UP,
            ExportEvent.BACKLOG,
            ExportEvent.FINAL,
            ExportEvent.SOURCE_FAILED,
            ExportEvent.TARGET_FAILED,
        ):
            assert (state, event) in EXPORT_TRANSITIONS


def test_only_a_steady_export_can_be_found_lagging(clock: FakeClock) -> None:
    d = SyncDirection(P1, P2, sync_interval=60, clock=clock)
    assert d.export_state is ExportState.NOT_INITIALIZED
    with pytest.raises(TransitionError):
        EXPORT_TRANSITIONS.next_state(ExportState.FINAL, ExportEvent.LAG_EXCEEDED)
    d.on_caught_up(clock())
    d.on_observed(position=10, high_water_mark=12, read_only=False, oldest_pending=clock())
    clock.advance(119)
    assert d.status().export_state == "SteadyState"
    clock.advance(2)
    status = d.status()
    assert status.export_state == "NonSteadyState"
    assert status.backlog == 2 and status.lag == pytest.approx(121)


def test_target_failure_keeps_final_state_and_errors_a_new_direction(clock: FakeClock) -> None:
    d = SyncDirection(P1, P2, sync_interval=60, clock=clock)
    d.on_target_failed("down")
    assert (d.export_state, d.import_state.value) == (ExportState.ERROR, "ErrorState")
    d.on_final(clock(), held=False)
    d.on_target_failed("down")
    assert d.export_state is ExportState.FINAL


# --- replication ----------------------------------------------------------------------


async def test_sync_replicates_user_data_and_conference_content(
    lab: FakeLab, clock: FakeClock
) -> None:
    s1, s2 = lab.store(P1), lab.store(P2)
    s1.schedule_conference(ALICE, "deck", subject="Q3", content=b"\x00slides\xff" * 100)
    s1.update_settings(BOB, {"ring": 4})
    service = lab.backups[P1]
    assert service.direction.status().export_state == "NotInitialized"

    result = await service.sync()

    assert result.outcome == "caught-up"
    assert result.applied == s1.high_water_mark() == result.position
    assert homed(s2.snapshot(), P1) == homed(s1.snapshot(), P1)
    assert s2.conferences(ALICE)[0].content == b"\x00slides\xff" * 100
    status = service.direction.status()
    assert (status.export_state, status.import_state) == ("SteadyState", "NormalState")
    assert status.last_sync == clock() and status.backlog == 0 and status.lag == 0


async def test_a_restarted_service_resumes_from_the_partners_position(
    lab: FakeLab, clock: FakeClock
) -> None:
    s1 = lab.store(P1)
    await lab.backups[P1].sync()
    first = s1.high_water_mark()
    for i in range(10):
        s1.add_contact(ALICE, f"sip:new{i}@example.com")

    again = lab.start_backup(P1)  # same state directory
    assert again.direction.status().export_state == "SteadyState"  # remembered
    result = await again.sync()

    assert result.applied == 10 and result.position == first + 10
    # Each change was applied exactly once on the partner.
    assert lab.pools[P2].applied[P1] == s1.high_water_mark()


async def test_the_partners_position_wins_over_the_services_memory(
    lab: FakeLab, tmp_path: Path
) -> None:
    s1 = lab.store(P1)
    await lab.backups[P1].sync()
    # The partner's store is lost and rebuilt empty (restored from nothing).
    lab.pools[P2].store.close()
    (tmp_path / f"{P2}.db").unlink()
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"{P2}.db{suffix}").unlink(missing_ok=True)
    lab.pools[P2].store = UserStore(tmp_path / f"{P2}.db", P2, clock=lab.clock)

    result = await lab.backups[P1].sync()

    assert result.outcome == "caught-up" and result.applied == s1.high_water_mark()
    assert homed(lab.store(P2).snapshot(), P1) == homed(s1.snapshot(), P1)


async def test_a_replaced_source_store_is_refused(lab: FakeLab, tmp_path: Path) -> None:
    await lab.backups[P1].sync()
    lab.pools[P1].store.close()
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"{P1}.db{suffix}").unlink(missing_ok=True)
    lab.pools[P1].store = UserStore(tmp_path / f"{P1}.db", P1, clock=lab.clock)
    lab.store(P1).upsert_user(ALICE, home_pool=P1)
    before = lab.store(P2).snapshot()

    result = await lab.backups[P1].sync()

    assert result.outcome == "error" and "replaced" in (result.error or "")
    assert result.export_state == "ErrorState"
    assert lab.store(P2).snapshot() == before


async def test_unreachable_partner_then_recovery(lab: FakeLab, clock: FakeClock) -> None:
    service = lab.backups[P1]
    lab.pool_transport[P2].down = True
    result = await service.sync()
    assert (result.outcome, result.export_state, result.import_state) == (
        "error", "ErrorState", "ErrorState",
    )
    lab.pool_transport[P2].down = False
    assert (await service.sync()).export_state == "SteadyState"

    lab.store(P1).add_contact(ALICE, "sip:x@example.com")
    lab.pool_transport[P2].down = True
    result = await service.sync()
    assert (result.export_state, result.import_state) == ("NonSteadyState", "ErrorState")
    assert "unreachable" in (result.error or "")
    lab.pool_transport[P2].down = False
    result = await service.sync()
    assert (result.export_state, result.import_state, result.applied) == (
        "SteadyState", "NormalState", 1,
    )


async def test_a_healed_site_returns_to_normal_and_steady_without_a_new_write(
    lab: FakeLab,
) -> None:
    """Regression (issue 19): after a site heal both Backup Services stayed in
    import ErrorState, their last sync caught up with no error, until a new
    write was applied. A cycle that finds the partner holding everything is a
    working import."""
    service = lab.backups[P1]
    await service.sync()
    lab.pool_transport[P2].down = True
    assert (await service.sync()).import_state == "ErrorState"
    lab.pool_transport[P2].down = False

    result = await service.sync()

    assert (result.outcome, result.applied) == ("caught-up", 0)
    assert (result.export_state, result.import_state) == ("SteadyState", "NormalState")
    status = service.direction.status()
    assert (status.import_state, status.last_error) == ("NormalState", None)


async def test_unreachable_source_is_an_export_error(lab: FakeLab) -> None:
    lab.pool_transport[P1].down = True
    result = await lab.backups[P1].sync()
    assert (result.export_state, result.import_state) == ("ErrorState", "NormalState")


async def test_a_cycle_out_of_time_leaves_a_backlog(lab: FakeLab, clock: FakeClock) -> None:
    service = lab.backups[P1]
    # Each request to the source takes 10 s of (fake) time; the budget is
    # one sync interval (120 s): the cycle stops with changes left.
    for i in range(200):
        lab.store(P1).add_contact(ALICE, f"sip:c{i}@example.com")
    lab.pool_transport[P1].on_request = lambda request: clock.advance(10)

    result = await service.sync()

    assert result.outcome == "backlog" and result.export_state == "NonSteadyState"
    status = service.direction.status()
    assert status.backlog > 0 and status.lag > 0
    lab.pool_transport[P1].on_request = None
    result = await service.sync()
    assert result.outcome == "caught-up" and result.export_state == "SteadyState"
    assert result.position == lab.store(P1).high_water_mark()


async def test_final_sync_needs_a_read_only_source(lab: FakeLab) -> None:
    service = lab.backups[P1]
    with pytest.raises(OperationError) as exc:
        await service.sync(final=True)
    assert exc.value.code == "not-read-only"
    lab.store(P1).set_read_only(True)
    result = await service.sync(final=True)
    assert result.outcome == "final" and result.export_state == "FinalState"
    assert result.position == lab.store(P1).high_water_mark()


async def test_a_failed_over_pool_is_held_and_fenced(lab: FakeLab) -> None:
    """The disaster-mode tail of a failed-over pool never overwrites what its
    users do on the backup, and the pool takes no more writes."""
    s1, s2 = lab.store(P1), lab.store(P2)
    await lab.backups[P1].sync()
    position = s2.last_applied(P1)
    s1.add_contact(ALICE, "sip:tail1@example.com")
    s1.add_contact(ALICE, "sip:tail2@example.com")
    lab.pools[P2].states.failover_started(P1)
    lab.pools[P2].states.failover_completed(P1)

    result = await lab.backups[P1].sync()

    assert result.outcome == "held" and result.export_state == "FinalState"
    assert s2.last_applied(P1) == position
    status = lab.backups[P1].direction.status()
    assert status.held and status.backlog == 2
    assert s1.read_only  # fenced


async def test_status_reports_both_directions(lab: FakeLab) -> None:
    await lab.backups[P1].sync()
    lab.store(P2).add_contact("sip:carol@lab.local", "sip:y@example.com")
    status = await lab.backups[P1].status()
    mine, theirs = status["directions"]
    assert (mine["source"], mine["target"], mine["export_state"]) == (P1, P2, "SteadyState")
    assert (theirs["source"], theirs["target"]) == (P2, P1)
    assert theirs["observed_only"] and theirs["export_state"] == "NotInitialized"
    assert theirs["backlog"] == lab.store(P2).high_water_mark()
    await lab.backups[P2].sync()
    theirs = (await lab.backups[P1].status())["directions"][1]
    assert theirs["export_state"] == "SteadyState" and theirs["backlog"] == 0


async def test_a_corrupt_state_file_is_ignored(lab: FakeLab, tmp_path: Path) -> None:
    await lab.backups[P1].sync()
    path = next((tmp_path / f"backup-{P1}").glob("direction-*.json"))
    path.write_text("{not json")
    service = lab.start_backup(P1)
    assert service.direction.status().export_state == "NotInitialized"
    assert (await service.sync()).outcome == "caught-up"
    assert json.loads(path.read_text())["position"] == lab.store(P1).high_water_mark()


async def test_the_loop_syncs_at_start_and_when_triggered(lab: FakeLab) -> None:
    service = lab.backups[P1]
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    await until(lambda: service.last_result is not None)
    assert service.last_result is not None
    assert service.last_result.outcome == "caught-up"
    lab.store(P1).add_contact(ALICE, "sip:later@example.com")
    first = service.last_result
    service.trigger()
    await until(lambda: service.last_result is not first)
    assert service.last_result.applied == 1
    stop.set()
    await task


async def test_the_loop_syncs_with_a_clock_that_never_stands_still(
    lab: FakeLab, tmp_path: Path
) -> None:
    """Regression: with a real clock every reading is later than the last,
    so "due now" must not be a reading of the clock."""
    ticks = iter(range(1_000_000, 10_000_000))
    service = BackupService(
        lab.topology, P1, tmp_path / "ticking", lab.clients,
        clock=lambda: float(next(ticks)) / 1000,
    )
    assert service.direction.next_deadline() <= service.clock()
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    await until(lambda: service.last_result is not None)
    stop.set()
    await task
    assert service.last_result is not None and service.last_result.outcome == "caught-up"


async def test_sync_interval_comes_from_the_cms(lab: FakeLab) -> None:
    from sipdrill.cms.operations import cms_update
    from sipdrill.cms.store import CmsConfigPatch

    await cms_update(lab.topology, lab.clients, CmsConfigPatch(timers={"sync_interval": 30}))
    service = lab.backups[P1]
    await service.refresh_interval()
    assert service.direction.sync_interval == 30


# --- the API --------------------------------------------------------------------------------


async def test_api_health_status_sync_metrics_and_auth(lab: FakeLab) -> None:
    app = create_backup_app(lab.backups[P1], token="s3cret")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://backup"
    ) as http:
        assert (await http.get("/health")).json()["pool"] == P1
        assert (await http.get("/status")).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        r = await http.post("/sync", json={}, headers=auth)
        assert r.status_code == 200 and r.json()["outcome"] == "caught-up"
        r = await http.post("/sync", json={"final": True}, headers=auth)
        assert r.status_code == 409 and r.json()["code"] == "not-read-only"
        r = await http.get("/status", headers=auth)
        assert r.json()["directions"][0]["export_state"] == "SteadyState"
        text = (await http.get("/metrics")).text
        assert f'sipdrill_backup_backlog_changes{{source="{P1}",target="{P2}"}} 0.0' in text
        assert "sipdrill_backup_changes_applied_total" in text


async def test_api_docs_need_the_token(lab: FakeLab, monkeypatch: pytest.MonkeyPatch) -> None:
    await assert_docs_behind_token(
        lambda: create_backup_app(lab.backups[P1], token="s3cret"), "s3cret", "/status",
        monkeypatch,
    )


async def test_api_errors_are_code_and_message_without_the_body(lab: FakeLab) -> None:
    app = create_backup_app(lab.backups[P1], token="s3cret")
    async with client(app, {"Authorization": "Bearer s3cret"}) as http:
        r = await http.post("/sync", json={"final": SECRET})
        assert error_of(r, 422, "bad-request") == "final: Input should be a valid boolean"
        r = await http.post("/sync", json={"final": 1})
        assert error_of(r, 422, "bad-request") == "final: Input should be a valid boolean"
        r = await http.post("/sync", json={"finale": True})
        assert error_of(r, 422, "bad-request") == "finale: unknown field (not in the schema)"
        await assert_routing_errors(http, "/sync", "GET")
    assert lab.backups[P1].last_result is None  # nothing refused ran a cycle


def test_a_pool_without_backup_has_no_backup_service(tmp_path: Path) -> None:
    from sipdrill.backup.client import LabClients
    from sipdrill.backup.service import BackupService

    topology = make_topology()
    clients = LabClients(topology, transports={})
    try:
        with pytest.raises(OperationError) as exc:
            BackupService(topology, "pool3.lab.local", tmp_path, clients)
        assert exc.value.code == "no-backup-pool"
    finally:
        asyncio.run(clients.aclose())


def test_failover_state_parsing_accepts_common_shapes() -> None:
    from sipdrill.pool.client import parse_failover_states

    want = {P1: FailoverState.FAILED_OVER}
    assert parse_failover_states({"states": {P1: "FailedOver"}}) == want
    assert parse_failover_states({P1: "FailedOver"}) == want
    assert parse_failover_states({P1: {"state": "failed_over"}}) == want
    assert parse_failover_states([{"home_pool": P1, "state": "FailedOver"}]) == want
    assert parse_failover_states({"pool": P2, "pairs": {P1: "FailedOver"}}) == want
