"""The CMS: one active master, a standby on its partner, a replica in every
pool; changes through the master only; failover with and without --force;
generations fence an old master."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fake_pool import FakeLab
from labkit import P1, P2, P3, FakeClock, make_topology

from sipdrill.cms.operations import cms_failover, cms_status, cms_update, replicate_cms
from sipdrill.cms.store import (
    CmsConfigPatch,
    CmsDocument,
    CmsRole,
    CmsRoleIn,
    CmsStore,
    PoolFailoverRecord,
)
from sipdrill.errors import OperationError
from sipdrill.topology import Topology


@pytest.fixture
async def lab(tmp_path: Path, clock: FakeClock, topology: Topology) -> AsyncIterator[FakeLab]:
    lab = FakeLab(topology, tmp_path, clock)
    yield lab
    await lab.aclose()


def role(lab: FakeLab, pool: str) -> str:
    return lab.pools[pool].router.cms_store.state().role.value  # type: ignore[attr-defined]


def doc(lab: FakeLab, pool: str) -> CmsDocument:
    return lab.pools[pool].router.cms_store.state().document  # type: ignore[attr-defined]


async def test_roles_follow_the_topology(lab: FakeLab) -> None:
    assert [role(lab, p) for p in (P1, P2, P3)] == ["active", "standby", "replica"]
    body = await lab.clients.pool(P3).cms()
    assert body["ActiveMasterFqdn"] == P1 and body["version"] == 0 and body["generation"] == 1
    status = await cms_status(lab.topology, lab.clients)
    assert (status.active_master_fqdn, status.standby, status.replication_state) == (
        P1, P2, "UpToDate",
    )


async def test_changes_go_through_the_master_and_reach_every_replica(lab: FakeLab) -> None:
    result = await cms_update(
        lab.topology, lab.clients,
        CmsConfigPatch(timers={"sync_interval": 30}, user_homing={"sip:alice@lab.local": P2}),
    )
    assert result["version"] == 1
    assert result["replicated"] == {P2: "replicated", P3: "replicated"}
    for p in (P1, P2, P3):
        d = doc(lab, p)
        assert d.version == 1 and d.config.timers == {"sync_interval": 30}
        assert d.config.user_homing == {"sip:alice@lab.local": P2}
    store = lab.pools[P3].router.cms_store  # type: ignore[attr-defined]
    assert store.effective_timers().sync_interval == 30
    assert store.effective_timers().failback_interval == lab.topology.timers.failback_interval
    # Removing an override.
    await cms_update(lab.topology, lab.clients, CmsConfigPatch(timers={"sync_interval": None}))
    assert doc(lab, P3).config.timers == {}


async def test_replicas_refuse_changes_and_bad_values_change_nothing(lab: FakeLab) -> None:
    with pytest.raises(OperationError) as exc:
        await lab.clients.pool(P2).cms_put_config({"timers": {"sync_interval": 30}})
    assert (exc.value.code, exc.value.http_status) == ("cms-not-active", 409)
    with pytest.raises(OperationError) as exc:
        await cms_update(lab.topology, lab.clients, CmsConfigPatch(timers={"sync_interval": 1}))
    assert exc.value.code == "bad-config"
    with pytest.raises(OperationError) as exc:
        await cms_update(lab.topology, lab.clients, CmsConfigPatch(expected_version=7))
    assert exc.value.code == "cms-version-conflict"
    with pytest.raises(OperationError) as exc:
        await cms_update(
            lab.topology, lab.clients, CmsConfigPatch(user_homing={"sip:x@lab.local": "nope"})
        )
    assert exc.value.code == "unknown-pool"
    assert all(doc(lab, p).version == 0 for p in (P1, P2, P3))


async def test_an_unreachable_master_stops_changes_not_service(lab: FakeLab) -> None:
    lab.cut(P1)
    with pytest.raises(OperationError) as exc:
        await cms_update(lab.topology, lab.clients, CmsConfigPatch(timers={"sync_interval": 30}))
    assert (exc.value.code, exc.value.http_status) == ("cms-unavailable", 503)
    assert "cms failover" in exc.value.message
    status = await cms_status(lab.topology, lab.clients)
    assert status.replication_state == "MasterUnavailable" and not status.active_reachable
    # The replicas still answer (service goes on).
    assert (await lab.clients.pool(P3).cms())["ActiveMasterFqdn"] == P1


async def test_failover_without_force_replicates_then_swaps(lab: FakeLab) -> None:
    await cms_update(lab.topology, lab.clients, CmsConfigPatch(timers={"sync_interval": 45}))
    # The standby missed the last change (it was away).
    lab.cut(P2)
    await cms_update(lab.topology, lab.clients, CmsConfigPatch(timers={"sync_interval": 50}))
    lab.heal(P2)
    assert doc(lab, P2).version == 1

    report = await cms_failover(lab.topology, False, lab.clients)

    assert (report.source, report.target, report.forced, report.lost_versions) == (
        P1, P2, False, 0,
    )
    assert [role(lab, p) for p in (P1, P2, P3)] == ["standby", "active", "replica"]
    assert all(doc(lab, p).active_master == P2 for p in (P1, P2, P3))
    assert doc(lab, P2).version == 2 and doc(lab, P2).config.timers == {"sync_interval": 50}
    assert doc(lab, P2).generation == 2
    assert not lab.pools[P1].router.cms_store.state().read_only  # type: ignore[attr-defined]
    # Changes now go to the new master.
    result = await cms_update(lab.topology, lab.clients, CmsConfigPatch(timers={}))
    assert result["ActiveMasterFqdn"] == P2
    status = await cms_status(lab.topology, lab.clients)
    assert (status.active_master_fqdn, status.standby, status.replication_state) == (
        P2, P1, "UpToDate",
    )
    # And back.
    back = await cms_failover(lab.topology, False, lab.clients)
    assert (back.source, back.target, back.generation) == (P2, P1, 3)


async def test_failover_without_force_refuses_an_unreachable_master(lab: FakeLab) -> None:
    lab.cut(P1)
    with pytest.raises(OperationError) as exc:
        await cms_failover(lab.topology, False, lab.clients)
    assert exc.value.code == "cms-unavailable" and "--force" in exc.value.message
    assert role(lab, P2) == "standby" and doc(lab, P2).generation == 1


async def test_failover_refuses_an_unreachable_standby(lab: FakeLab) -> None:
    lab.cut(P2)
    with pytest.raises(OperationError) as exc:
        await cms_failover(lab.topology, True, lab.clients)
    assert exc.value.code == "cms-standby-unreachable"
    assert role(lab, P1) == "active" and not lab.pools[P1].router.cms_store.state().read_only  # type: ignore[attr-defined]


async def test_forced_failover_and_the_old_master_steps_down(lab: FakeLab) -> None:
    await cms_update(lab.topology, lab.clients, CmsConfigPatch(timers={"sync_interval": 45}))
    lab.cut(P1)

    report = await cms_failover(lab.topology, True, lab.clients)

    assert (report.target, report.forced, report.source_reachable) == (P2, True, False)
    assert report.lost_versions is None
    assert role(lab, P2) == "active" and doc(lab, P2).generation == 2
    assert doc(lab, P3).active_master == P2  # the replica follows
    await cms_update(lab.topology, lab.clients, CmsConfigPatch(timers={"sync_interval": 60}))

    # The old master comes back still believing it is the master.
    lab.heal(P1)
    assert role(lab, P1) == "active"
    status = await cms_status(lab.topology, lab.clients)
    assert status.active_master_fqdn == P2  # the newer generation wins
    outcome = await replicate_cms(lab.topology, lab.clients, P2)  # its Backup Service's push
    assert outcome[P1] == "replicated"
    assert role(lab, P1) == "standby" and doc(lab, P1).config.timers == {"sync_interval": 60}
    # The old master's own push is refused everywhere now.
    assert await replicate_cms(lab.topology, lab.clients, P1) == {}


async def test_a_replica_refuses_an_older_generation(lab: FakeLab) -> None:
    lab.cut(P1)
    await cms_failover(lab.topology, True, lab.clients)
    old = CmsDocument(version=99, generation=1, active_master=P1)
    with pytest.raises(OperationError) as exc:
        await lab.clients.pool(P3).cms_replicate(old.model_dump(mode="json"))
    assert exc.value.code == "cms-stale-generation"


async def test_no_standby_no_failover(tmp_path: Path, clock: FakeClock) -> None:
    topology = make_topology().model_copy(update={"cms": make_topology().cms.model_copy(
        update={"active": P3})})
    lab = FakeLab(topology, tmp_path, clock)
    try:
        with pytest.raises(OperationError) as exc:
            await cms_failover(topology, True, lab.clients)
        assert exc.value.code == "no-cms-standby"
    finally:
        await lab.aclose()


def test_the_replica_survives_a_restart(tmp_path: Path, clock: FakeClock) -> None:
    topology = make_topology()
    store = CmsStore(tmp_path, P1, topology, clock=clock)
    store.put_config(CmsConfigPatch(timers={"sync_interval": 30}))
    again = CmsStore(tmp_path, P1, topology, clock=clock)
    assert again.state().document.version == 1 and again.state().role is CmsRole.ACTIVE
    (tmp_path / "cms.json").write_text("garbage")
    with pytest.raises(OperationError) as exc:
        CmsStore(tmp_path, P1, topology)
    assert exc.value.code == "cms-store"
    with pytest.raises(OperationError):
        CmsStore(tmp_path / "x", P2, topology).replicate(
            CmsDocument(version=1, generation=0, active_master=P1)
        )


async def test_router_answers_refusals_as_json(lab: FakeLab) -> None:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=lab.pools[P2].app), base_url="http://p2"
    ) as http:
        r = await http.put("/cms/config", json={"timers": {"sync_interval": 30}})
        assert r.status_code == 409 and r.json()["code"] == "cms-not-active"
        r = await http.post("/cms/role", json={"role": "active", "generation": 0})
        assert r.status_code == 409 and r.json()["code"] == "cms-stale-generation"


def test_documents_naming_no_pool_of_the_lab_are_refused(tmp_path: Path, clock: FakeClock) -> None:
    topology = make_topology()
    store = CmsStore(tmp_path / "p1", P1, topology, clock=clock)  # the active master
    before = store.state()
    bad = [
        CmsDocument(generation=2, active_master="nowhere.lab.local"),  # once a KeyError
        CmsDocument.model_validate({"generation": 2, "active_master": P2, "config": {
            "user_homing": {"sip:alice@lab.local": "nowhere.lab.local"}}}),
        CmsDocument.model_validate({"generation": 2, "active_master": P2, "config": {
            "pool_failover": {"nowhere.lab.local": {"backup_pool": P2, "state": "FailedOver"}}}}),
        CmsDocument.model_validate({"generation": 2, "active_master": P2, "config": {
            "timers": {"no_such_timer": 5}}}),
    ]
    for document in bad:
        with pytest.raises(OperationError) as exc:
            store.replicate(document)
        assert exc.value.code in ("unknown-pool", "bad-config"), exc.value
        assert "nowhere" not in exc.value.message
    assert exc.value.message == (
        "document.config.timers.no_such_timer: unknown field (not in the schema)"
    )
    assert store.state() == before
    with pytest.raises(ValueError, match="state"):
        PoolFailoverRecord.model_validate({"backup_pool": P2, "state": "Sideways"})
    with pytest.raises(OperationError) as exc:
        store.set_role(CmsRoleIn(role=CmsRole.REPLICA, active_master="nowhere.lab.local"))
    assert exc.value.code == "unknown-pool" and store.state() == before
