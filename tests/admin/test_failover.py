"""Pool failover and failback over the control API (fake pools over ASGI):
refusals that change nothing, and the data guarantees.

- A change acknowledged before the last completed sync is never lost.
- Changes after it (the RPO) are counted and reported, never silently
  dropped or duplicated.
- A normal failback loses nothing written on the backup; a disaster-mode
  failback loses exactly those writes, and says how many.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fake_pool import FakeLab
from labkit import P1, P2, P3, FakeClock

from sipdrill.admin.failover import count_losses, pool_failback, pool_failover
from sipdrill.cms.operations import cms_failover
from sipdrill.errors import OperationError
from sipdrill.pool.state import FailoverState
from sipdrill.pool.store import UserStore
from sipdrill.topology import Topology

ALICE = "sip:alice@lab.local"
BOB = "sip:bob@lab.local"
CAROL = "sip:carol@lab.local"


@pytest.fixture
async def lab(tmp_path: Path, clock: FakeClock, topology: Topology) -> AsyncIterator[FakeLab]:
    lab = FakeLab(topology, tmp_path, clock, page_size=5)
    for p in (P1, P2, P3):
        lab.store(p).seed_from_topology(topology)
    await lab.backups[P1].sync()
    await lab.backups[P2].sync()
    yield lab
    await lab.aclose()


def state(lab: FakeLab, pool: str, home: str) -> FailoverState:
    return lab.pools[pool].states.state(home)


def everything(lab: FakeLab) -> object:
    """All the lab's data and failover states, to compare before/after a refusal."""
    return (
        {p: f.store.snapshot() for p, f in lab.pools.items()},
        {p: f.store.read_only for p, f in lab.pools.items()},
        {p: f.store.replication_positions() for p, f in lab.pools.items()},
        {p: f.states.snapshot() for p, f in lab.pools.items()},
        {p: f.router.cms_store.state() for p, f in lab.pools.items()},  # type: ignore[attr-defined]
    )


def contacts(store: UserStore, owner: str) -> set[str]:
    return set(store.contacts(owner))


# --- refusals change nothing ------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "pool", "disaster", "code"),
    [
        ("none", P3, False, "no-backup-pool"),
        ("none", "pool9.lab.local", False, "unknown-pool"),
        ("cut-home", P1, False, "pool-unreachable"),
        ("cut-backup", P1, True, "backup-pool-unreachable"),
        ("cut-home", P1, True, "cms-unavailable"),  # the CMS master is on P1
    ],
)
async def test_failover_refusals_change_nothing(
    lab: FakeLab, setup: str, pool: str, disaster: bool, code: str
) -> None:
    if setup == "cut-home":
        lab.cut(P1)
    elif setup == "cut-backup":
        lab.cut(P2)
    before = everything(lab)
    with pytest.raises(OperationError) as exc:
        await pool_failover(lab.topology, pool, disaster, lab.clients)
    assert exc.value.code == code
    assert everything(lab) == before


async def test_ordering_rule_refuses_the_partner_while_failed_over(lab: FakeLab) -> None:
    await pool_failover(lab.topology, P1, False, lab.clients)
    before = everything(lab)
    with pytest.raises(OperationError) as exc:
        await pool_failover(lab.topology, P2, False, lab.clients)
    assert exc.value.code == "failover-order" and f"fail {P1} back" in exc.value.message
    with pytest.raises(OperationError) as exc:
        await pool_failover(lab.topology, P1, False, lab.clients)
    assert exc.value.code == "already-failed-over"
    assert everything(lab) == before
    # After the failback, P2's users can fail over to P1.
    await pool_failback(lab.topology, P1, False, lab.clients)
    report = await pool_failover(lab.topology, P2, False, lab.clients)
    assert report.serving_pool == P1 and state(lab, P1, P2) is FailoverState.FAILED_OVER


async def test_failback_refusals_change_nothing(lab: FakeLab) -> None:
    before = everything(lab)
    with pytest.raises(OperationError) as exc:
        await pool_failback(lab.topology, P1, False, lab.clients)
    assert exc.value.code == "not-failed-over"
    assert everything(lab) == before
    await pool_failover(lab.topology, P1, False, lab.clients)
    lab.cut(P2)
    before = everything(lab)
    with pytest.raises(OperationError) as exc:
        await pool_failback(lab.topology, P1, False, lab.clients)
    assert exc.value.code == "backup-pool-unreachable" and "--disaster-mode" in exc.value.message
    lab.heal(P2)
    lab.cut(P1)
    with pytest.raises(OperationError) as exc:
        await pool_failback(lab.topology, P1, True, lab.clients)
    assert exc.value.code == "pool-unreachable"
    assert everything(lab) == before


# --- failover ---------------------------------------------------------------------------------


async def test_normal_failover_loses_nothing(lab: FakeLab) -> None:
    s1, s2 = lab.store(P1), lab.store(P2)
    # Written after the last sync: the final sync carries them.
    late = [s1.add_contact(ALICE, f"sip:late{i}@example.com") for i in range(7)]
    s1.schedule_conference(BOB, "late", subject="after the sync", content=b"deck")

    report = await pool_failover(lab.topology, P1, False, lab.clients)

    assert report.lost_writes == 0 and report.synced_changes == 8
    assert report.takeover_position == s1.high_water_mark() == report.home_high_water_mark
    assert max(late) <= s2.last_applied(P1)
    assert {f"sip:late{i}@example.com" for i in range(7)} <= contacts(s2, ALICE)
    assert s2.conferences(BOB)[-1].content == b"deck"
    assert s1.read_only and not s2.read_only
    assert state(lab, P2, P1) is FailoverState.FAILED_OVER
    assert state(lab, P1, P1) is FailoverState.FAILED_OVER
    assert s2.get_user(ALICE).serving_pool == P2  # type: ignore[union-attr]
    assert [name for name, _ in report.steps] == [
        "checks", "failover started", "home read-only", "final sync", "backup took over",
        "completed",
    ]
    assert lab.backups[P1].direction.export_state.value == "FinalState"
    record = lab.pools[P3].router.cms_store.state().document.config.pool_failover[P1]  # type: ignore[attr-defined]
    assert (record.state, record.disaster_mode, record.takeover_position) == (
        "FailedOver", False, s1.high_water_mark(),
    )


async def test_disaster_failover_with_the_home_pool_answering_counts_the_loss(
    lab: FakeLab,
) -> None:
    s1, s2 = lab.store(P1), lab.store(P2)
    synced = s2.last_applied(P1)
    for i in range(5):
        s1.add_contact(ALICE, f"sip:tail{i}@example.com")

    report = await pool_failover(lab.topology, P1, True, lab.clients)

    assert report.lost_writes == 5 and report.synced_changes == 0
    assert report.takeover_position == synced
    assert not {f"sip:tail{i}@example.com" for i in range(5)} & contacts(s2, ALICE)
    assert s1.read_only  # fenced, so the count is final
    # The home pool's Backup Service holds the tail: it never lands on P2.
    result = await lab.backups[P1].sync()
    assert result.outcome == "held" and s2.last_applied(P1) == synced


async def test_disaster_failover_without_the_home_pool_counts_the_loss_when_it_returns(
    lab: FakeLab, clock: FakeClock
) -> None:
    s1, s2 = lab.store(P1), lab.store(P2)
    synced = s2.last_applied(P1)
    for i in range(4):
        s1.add_contact(BOB, f"sip:tail{i}@example.com")
    lab.cut(P1)  # site loss: pool, Backup Service and the CMS master
    with pytest.raises(OperationError) as exc:
        await pool_failover(lab.topology, P1, True, lab.clients)
    assert exc.value.code == "cms-unavailable"
    await cms_failover(lab.topology, True, lab.clients)
    clock.advance(60)

    report = await pool_failover(lab.topology, P1, True, lab.clients, wall_clock=clock)

    assert report.lost_writes is None and report.takeover_position == synced
    assert any("counted when" in n for n in report.notes)
    assert state(lab, P2, P1) is FailoverState.FAILED_OVER
    assert s2.get_user(BOB).serving_pool == P2  # type: ignore[union-attr]
    # Users write on P2 during the failover.
    s2.add_contact(BOB, "sip:on-backup@example.com")
    clock.advance(60)

    # P1 comes back writable (it crashed before it could be told anything):
    # its Backup Service holds the tail and fences it.
    lab.heal(P1)
    assert not s1.read_only
    assert (await lab.backups[P1].sync()).outcome == "held"
    assert s1.read_only and s2.last_applied(P1) == synced
    losses = await count_losses(lab.topology, P1, lab.clients)
    assert losses.failover_lost_writes == 4 and losses.failback_lost_writes is None

    s1_writes_refused = False
    try:
        s1.add_contact(BOB, "sip:after-takeover@example.com")
    except OperationError:
        s1_writes_refused = True
    assert s1_writes_refused
    back = await pool_failback(lab.topology, P1, False, lab.clients, wall_clock=clock)

    assert back.failover_lost_writes == 4 and back.lost_writes == 0
    assert "sip:on-backup@example.com" in contacts(s1, BOB)
    assert not s1.read_only and state(lab, P1, P1) is FailoverState.FAILED_BACK
    assert s1.get_user(BOB).serving_pool == P1  # type: ignore[union-attr]
    # The tail was on P1's disk all along; after the failback it replicates
    # (late, exactly once) and the count does not change.
    await lab.backups[P1].sync()
    assert s2.last_applied(P1) == s1.high_water_mark()
    assert lab.pools[P2].applied[P1] == s1.high_water_mark()
    assert (await count_losses(lab.topology, P1, lab.clients)).failover_lost_writes == 4


@pytest.mark.parametrize("seed", range(6))
async def test_acknowledged_before_the_last_completed_sync_is_never_lost(
    lab: FakeLab, seed: int
) -> None:
    """Random writes and syncs, then a disaster-mode failover at a random
    point: P2 has every change up to the last completed sync, the count is
    exactly the rest, and nothing is applied twice."""
    rng = random.Random(seed)
    s1, s2 = lab.store(P1), lab.store(P2)
    users = [u.uri for u in lab.topology.all_users() if u.home_pool == P1]
    last_completed = s1.high_water_mark()
    for step in range(rng.randint(5, 40)):
        action = rng.random()
        if action < 0.6:
            s1.add_contact(rng.choice(users), f"sip:w{seed}-{step}@example.com")
        elif action < 0.7:
            s1.update_settings(rng.choice(users), {"n": step})
        elif action < 0.8:
            owner = rng.choice(users)
            have = s1.contacts(owner)
            if have:
                s1.remove_contact(owner, rng.choice(have))
        else:
            result = await lab.backups[P1].sync()
            assert result.outcome == "caught-up"
            last_completed = result.position
    acked = s1.high_water_mark()

    report = await pool_failover(lab.topology, P1, True, lab.clients)

    assert s2.last_applied(P1) >= last_completed
    assert report.lost_writes == acked - s2.last_applied(P1)
    assert lab.pools[P2].applied[P1] == s2.last_applied(P1)  # no duplicates
    # P2's copy is P1's state as of the position it took over from.
    replica = UserStore(":memory:", "replica.lab.local")
    try:
        replica.apply_changes(s1.changes_since(0, 1_000_000)[: report.takeover_position], P1)
        want = replica.snapshot()
        got = s2.snapshot()
        for uri in users:
            assert got.contacts.get(uri, ()) == want.contacts.get(uri, ())
            assert got.users[uri].settings == want.users[uri].settings
    finally:
        replica.close()


# --- failback --------------------------------------------------------------------------------


async def test_normal_failback_brings_every_backup_write_home(lab: FakeLab) -> None:
    s1, s2 = lab.store(P1), lab.store(P2)
    await pool_failover(lab.topology, P1, False, lab.clients)
    written = [f"sip:b{i}@example.com" for i in range(9)]
    for c in written:
        s2.add_contact(ALICE, c)  # ALICE, homed on P1, writes on P2
    s2.schedule_conference(ALICE, "fo", subject="during failover", content=b"x" * 64)
    s2.add_contact(CAROL, "sip:p2-own@example.com")  # P2's own user

    report = await pool_failback(lab.topology, P1, False, lab.clients)

    assert report.lost_writes == 0 and report.failover_lost_writes == 0
    assert set(written) <= contacts(s1, ALICE)
    assert {c.conf_id: c.subject for c in s1.conferences(ALICE)}["fo"] == "during failover"
    assert s1.last_applied(P2) == s2.high_water_mark()
    assert not s1.read_only
    assert state(lab, P1, P1) is FailoverState.FAILED_BACK
    assert state(lab, P2, P1) is FailoverState.FAILED_BACK
    assert s1.get_user(ALICE).serving_pool == P1  # type: ignore[union-attr]
    assert [n for n, _ in report.steps][:4] == [
        "checks", "failback started", f"sync {P2} -> {P1}", "home writable",
    ]
    # P1 takes writes again, and they replicate to P2.
    s1.add_contact(ALICE, "sip:home-again@example.com")
    assert (await lab.backups[P1].sync()).outcome == "caught-up"
    assert "sip:home-again@example.com" in contacts(s2, ALICE)
    assert lab.pools[P1].applied[P2] == s1.last_applied(P2)  # no duplicates


async def test_failback_syncs_directly_when_the_backup_service_is_away(lab: FakeLab) -> None:
    await pool_failover(lab.topology, P1, False, lab.clients)
    lab.store(P2).add_contact(ALICE, "sip:b@example.com")
    lab.backup_transport[P2].down = True
    report = await pool_failback(lab.topology, P1, False, lab.clients)
    assert report.lost_writes == 0 and "sip:b@example.com" in contacts(lab.store(P1), ALICE)


async def test_disaster_failback_loses_exactly_the_unsynced_backup_writes(
    lab: FakeLab, clock: FakeClock
) -> None:
    s1, s2 = lab.store(P1), lab.store(P2)
    await pool_failover(lab.topology, P1, False, lab.clients)
    synced = [f"sip:synced{i}@example.com" for i in range(3)]
    for c in synced:
        s2.add_contact(ALICE, c)
    assert (await lab.backups[P2].sync()).outcome == "caught-up"
    unsynced = [f"sip:unsynced{i}@example.com" for i in range(6)]
    for c in unsynced:
        s2.add_contact(BOB, c)
    s2.add_contact(CAROL, "sip:p2-own-unsynced@example.com")  # P2's user: not a P1 loss
    clock.advance(30)
    lab.cut(P2)  # the backup site is lost (the CMS master stays on P1)

    report = await pool_failback(lab.topology, P1, True, lab.clients, wall_clock=clock)

    assert report.lost_writes is None and report.serving_pool == P1
    assert set(synced) <= contacts(s1, ALICE)
    assert not set(unsynced) & contacts(s1, BOB)
    assert not s1.read_only and state(lab, P1, P1) is FailoverState.FAILED_BACK
    clock.advance(30)

    # P2 comes back: now the loss can be counted (P1 users' writes only).
    lab.heal(P2)
    losses = await count_losses(lab.topology, P1, lab.clients)
    assert losses.failback_lost_writes == 6
    assert state(lab, P2, P1) is FailoverState.FAILED_OVER  # P2 missed the failback
    assert (await pool_failback_refused(lab)) == "not-failed-over"
    # P2's Backup Service tells P2, and delivers its tail late (exactly
    # once); the count stays.
    clock.advance(30)
    s2.add_contact(CAROL, "sip:p2-after-return@example.com")
    assert (await lab.backups[P2].sync()).outcome == "caught-up"
    assert state(lab, P2, P1) is FailoverState.FAILED_BACK
    assert lab.pools[P1].applied[P2] == s1.last_applied(P2) == s2.high_water_mark()
    assert (await count_losses(lab.topology, P1, lab.clients)).failback_lost_writes == 6


async def pool_failback_refused(lab: FakeLab) -> str:
    try:
        await pool_failback(lab.topology, P1, False, lab.clients)
    except OperationError as exc:
        return exc.code
    return "accepted"


async def test_disaster_failback_with_the_backup_answering_syncs_first(lab: FakeLab) -> None:
    await pool_failover(lab.topology, P1, False, lab.clients)
    lab.store(P2).add_contact(ALICE, "sip:b@example.com")
    report = await pool_failback(lab.topology, P1, True, lab.clients)
    assert report.lost_writes == 0 and "sip:b@example.com" in contacts(lab.store(P1), ALICE)


async def test_a_home_pool_that_missed_its_second_failover_is_caught_up(
    lab: FakeLab, clock: FakeClock
) -> None:
    """Found by bench/backup_sync: after one failover and failback, P1 says
    FailedBack; it misses a second (disaster-mode) failover; the CMS record,
    not P1's stale view, decides that its users are failed over."""
    s1 = lab.store(P1)
    await pool_failover(lab.topology, P1, False, lab.clients)
    await pool_failback(lab.topology, P1, False, lab.clients)
    await lab.backups[P1].sync()
    s1.add_contact(ALICE, "sip:tail@example.com")
    lab.cut(P1)
    await cms_failover(lab.topology, True, lab.clients)
    clock.advance(10)
    await pool_failover(lab.topology, P1, True, lab.clients, wall_clock=clock)
    clock.advance(10)
    lab.heal(P1)  # no Backup Service cycle yet: P1 still says FailedBack
    assert state(lab, P1, P1) is FailoverState.FAILED_BACK

    back = await pool_failback(lab.topology, P1, False, lab.clients, wall_clock=clock)

    assert back.failover_lost_writes == 1 and any("missed" in n for n in back.notes)
    assert state(lab, P1, P1) is FailoverState.FAILED_BACK
    assert state(lab, P2, P1) is FailoverState.FAILED_BACK


async def test_a_home_pool_cut_half_way_through_its_failover_is_caught_up(
    lab: FakeLab, clock: FakeClock
) -> None:
    """Found by a docker chaos run: P1 heard the disaster-mode failover start,
    then was cut; P2 finished it. P1 says FailingOver, from which a failback
    is not a transition: the failback finishes P1's failover first."""
    lab.cut(P1)
    await cms_failover(lab.topology, True, lab.clients)
    await pool_failover(lab.topology, P1, True, lab.clients, wall_clock=clock)
    lab.heal(P1)
    await lab.clients.pool(P1).failover_event(P1, "failover_started", True)
    assert state(lab, P1, P1) is FailoverState.FAILING_OVER
    assert state(lab, P2, P1) is FailoverState.FAILED_OVER

    back = await pool_failback(lab.topology, P1, False, lab.clients, wall_clock=clock)

    assert any("missed" in n for n in back.notes)
    assert state(lab, P1, P1) is FailoverState.FAILED_BACK
    assert state(lab, P2, P1) is FailoverState.FAILED_BACK


async def test_a_failover_cut_mid_final_sync_is_finished_by_running_it_again(
    lab: FakeLab,
) -> None:
    s1, s2 = lab.store(P1), lab.store(P2)
    for i in range(40):  # 8 pages of 5
        s1.add_contact(ALICE, f"sip:late{i}@example.com")
    applies = 0

    def cut_after_three_applies(request: object) -> None:
        nonlocal applies
        if getattr(request, "url", None) and request.url.path == "/replication/apply":  # type: ignore[attr-defined]
            applies += 1
            if applies == 3:
                lab.pool_transport[P2].down = True

    lab.pool_transport[P2].on_request = cut_after_three_applies
    with pytest.raises(OperationError) as exc:
        await pool_failover(lab.topology, P1, False, lab.clients)
    assert exc.value.code == "sync-failed"
    assert state(lab, P2, P1) is FailoverState.FAILING_OVER and s1.read_only
    assert 0 < s2.last_applied(P1) < s1.high_water_mark()

    lab.pool_transport[P2].on_request = None
    lab.pool_transport[P2].down = False
    report = await pool_failover(lab.topology, P1, False, lab.clients)

    assert report.lost_writes == 0 and s2.last_applied(P1) == s1.high_water_mark()
    assert lab.pools[P2].applied[P1] == s1.high_water_mark()  # nothing applied twice
    assert state(lab, P2, P1) is FailoverState.FAILED_OVER
