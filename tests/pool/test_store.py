from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from labkit import P1, P2, FakeClock, StoreFactory

from sipdrill.errors import OperationError
from sipdrill.pool.store import Change, ChangeOp, ConferenceRecord, Entity, UserStore
from sipdrill.topology import Topology

ALICE = "sip:alice@lab.local"
BOB = "sip:bob@lab.local"


def _populate(store: UserStore) -> list[int]:
    return [
        store.upsert_user(ALICE, home_pool=P1, settings={"ring": 3}),
        store.upsert_user(BOB, home_pool=P1),
        store.add_contact(ALICE, BOB),
        store.add_contact(ALICE, "sip:zed@example.com"),
        store.schedule_conference(ALICE, "m1", subject="Standup", content=b"\x00slides\xff"),
    ]


def _feed(store: UserStore) -> list[Change]:
    return store.changes_since(0, limit=1_000_000)


def _replicate(source: UserStore, replica: UserStore, batch: int = 3) -> None:
    seq = replica.last_applied(source.pool_fqdn)
    while changes := source.changes_since(seq, batch):
        replica.apply_changes(changes, source.pool_fqdn)
        seq = changes[-1].seq


# --- durability and the change feed ---------------------------------------------


def test_writes_survive_close_and_reopen(open_store: StoreFactory) -> None:
    store = open_store()
    seqs = _populate(store)
    store.set_read_only(True)
    before = store.snapshot()
    store.close()

    again = open_store()
    assert again.snapshot() == before
    assert again.contacts(ALICE) == [BOB, "sip:zed@example.com"]
    assert again.conferences(ALICE) == [ConferenceRecord(ALICE, "m1", "Standup", b"\x00slides\xff")]
    assert again.get_user(ALICE) is not None
    assert again.get_user(ALICE).settings == {"ring": 3}  # type: ignore[union-attr]
    assert again.high_water_mark() == seqs[-1]
    assert again.read_only


def test_store_uses_wal_and_full_synchronous(open_store: StoreFactory) -> None:
    store = open_store()
    conn = store._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_each_write_returns_its_sequence_number_and_the_feed_has_no_gaps(
    open_store: StoreFactory, clock: FakeClock
) -> None:
    store = open_store()
    seqs = _populate(store)
    assert seqs == [1, 2, 3, 4, 5]
    # Refused writes and a rolled-back batch must not burn sequence numbers.
    with pytest.raises(OperationError) as e:
        store.add_contact("sip:nobody@lab.local", BOB)
    assert e.value.code == "unknown-user"
    with pytest.raises(RuntimeError), store.batch():
        store.add_contact(BOB, ALICE)
        raise RuntimeError("abandon the batch")
    assert store.contacts(BOB) == []
    clock.advance(5)
    assert store.add_contact(BOB, ALICE) == 6
    feed = _feed(store)
    assert [c.seq for c in feed] == list(range(1, 7))
    assert feed[-1] == Change(
        6,
        ChangeOp.UPSERT,
        Entity.CONTACT,
        f"{BOB} {ALICE}",
        {"owner": BOB, "contact": ALICE},
        P1,
        clock.now,
    )
    assert {c.origin_pool for c in feed} == {P1}


def test_changes_since_pages_in_order(open_store: StoreFactory) -> None:
    store = open_store()
    _populate(store)
    assert [c.seq for c in store.changes_since(1, 2)] == [2, 3]
    assert store.changes_since(5) == []
    with pytest.raises(ValueError):
        store.changes_since(0, 0)


def test_batch_commits_once_and_returns_sequence_numbers(open_store: StoreFactory) -> None:
    store = open_store()
    with store.batch():
        store.upsert_user(ALICE, home_pool=P1)
        last = store.add_contact(ALICE, BOB)
    assert last == 2 == store.high_water_mark()


def test_delete_user_takes_contacts_and_meetings_along(open_store: StoreFactory) -> None:
    store = open_store()
    _populate(store)
    store.delete_user(ALICE)
    assert store.contacts(ALICE) == []
    assert store.conferences(ALICE) == []
    assert store.get_user(ALICE) is None
    assert _feed(store)[-1].op is ChangeOp.DELETE


def test_replace_contacts_logs_only_the_differences(open_store: StoreFactory) -> None:
    store = open_store()
    _populate(store)
    hwm = store.high_water_mark()
    store.replace_contacts(ALICE, [BOB, "sip:new@lab.local"])
    assert store.contacts(ALICE) == [BOB, "sip:new@lab.local"]
    assert [(c.op, c.key) for c in store.changes_since(hwm)] == [
        (ChangeOp.DELETE, f"{ALICE} sip:zed@example.com"),
        (ChangeOp.UPSERT, f"{ALICE} sip:new@lab.local"),
    ]


def test_refused_writes_on_unknown_rows(open_store: StoreFactory) -> None:
    store = open_store()
    _populate(store)
    before = store.snapshot(), store.high_water_mark()
    for call in (
        lambda: store.delete_user("sip:nobody@lab.local"),
        lambda: store.update_settings("sip:nobody@lab.local", {}),
        lambda: store.schedule_conference("sip:nobody@lab.local", "x"),
        lambda: store.cancel_conference(ALICE, "no-such-meeting"),
    ):
        with pytest.raises(OperationError) as e:
            call()
        assert e.value.http_status == 404
    assert (store.snapshot(), store.high_water_mark()) == before


def test_store_refuses_another_pools_file(tmp_path: Path) -> None:
    UserStore(tmp_path / "p.db", P1).close()
    with pytest.raises(OperationError) as e:
        UserStore(tmp_path / "p.db", P2)
    assert e.value.code == "wrong-pool"


def test_store_refuses_another_schema(tmp_path: Path) -> None:
    with UserStore(tmp_path / "p.db", P1) as store:
        store._conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    with pytest.raises(OperationError) as e:
        UserStore(tmp_path / "p.db", P1)
    assert e.value.code == "store-schema"


async def test_async_callers_use_to_thread(open_store: StoreFactory) -> None:
    store = open_store()
    await asyncio.to_thread(store.upsert_user, ALICE, home_pool=P1)
    seqs = await asyncio.gather(
        *(asyncio.to_thread(store.add_contact, ALICE, f"sip:c{i}@lab.local") for i in range(20))
    )
    assert sorted(seqs) == list(range(2, 22))
    assert len(store.contacts(ALICE)) == 20


# --- read-only ---------------------------------------------------------------------


def test_read_only_store_refuses_every_local_write(open_store: StoreFactory) -> None:
    store = open_store()
    _populate(store)
    store.set_read_only(True)
    before = store.snapshot(), store.high_water_mark()
    writes = [
        lambda: store.upsert_user("sip:new@lab.local", home_pool=P1),
        lambda: store.update_settings(ALICE, {"x": 1}),
        lambda: store.reassign_serving_pool(P1, P2),
        lambda: store.delete_user(BOB),
        lambda: store.add_contact(ALICE, "sip:x@lab.local"),
        lambda: store.remove_contact(ALICE, BOB),
        lambda: store.replace_contacts(ALICE, []),
        lambda: store.schedule_conference(ALICE, "m2"),
        lambda: store.cancel_conference(ALICE, "m1"),
        lambda: store.batch().__enter__(),
    ]
    for write in writes:
        with pytest.raises(OperationError) as e:
            write()
        assert e.value.code == "read-only"
    assert (store.snapshot(), store.high_water_mark()) == before
    store.set_read_only(False)
    assert store.add_contact(ALICE, "sip:x@lab.local") == before[1] + 1


def test_read_only_store_still_applies_replicated_changes(open_store: StoreFactory) -> None:
    # Failback brings the backup's changes home before the home pool's store
    # takes writes again.
    home, backup = open_store(P1), open_store(P2)
    backup.upsert_user(ALICE, home_pool=P1, serving_pool=P2)
    home.set_read_only(True)
    _replicate(backup, home)
    assert home.get_user(ALICE) is not None


# --- seeding -------------------------------------------------------------------------


def test_seed_from_topology_is_idempotent(open_store: StoreFactory, topology: Topology) -> None:
    store = open_store(P1)
    homed = [u for u in topology.all_users() if u.home_pool == P1]
    assert store.seed_from_topology(topology) == len(homed)
    counts = store.counts()
    assert counts.users == counts.homed_users == counts.served_users == len(homed)
    assert counts.contacts == sum(len(u.contacts) for u in homed)
    assert counts.conferences == sum(len(u.conferences) for u in homed)
    assert store.contacts(ALICE) == [BOB, "sip:carol@lab.local"]

    store.remove_contact(ALICE, BOB)  # a user's change since the first seed
    snapshot, hwm = store.snapshot(), store.high_water_mark()
    assert store.seed_from_topology(topology) == 0
    assert (store.snapshot(), store.high_water_mark()) == (snapshot, hwm)


# --- replication -----------------------------------------------------------------------


def test_replica_matches_source_and_replay_is_harmless(
    open_store: StoreFactory, topology: Topology
) -> None:
    source, replica = open_store(P1), open_store(P2)
    source.seed_from_topology(topology)
    replica.seed_from_topology(topology)
    _populate(source)
    source.delete_user(BOB)
    _replicate(source, replica)
    assert replica.last_applied(P1) == source.high_water_mark()
    # The replica holds the source's users plus its own.
    mine = {u.uri for u in replica.users(home_pool=P2)}
    replicated = replica.snapshot()
    assert {u for u in replicated.users if u not in mine} == set(source.snapshot().users)
    own_feed = replica.high_water_mark()

    assert replica.apply_changes(_feed(source), P1) == 0  # replayed in full
    assert replica.apply_changes(_feed(source)[3:9], P1) == 0  # replayed in part
    assert replica.snapshot() == replicated
    # Replicated changes are not re-logged (they would echo back to P1).
    assert replica.high_water_mark() == own_feed


def test_overlapping_batch_applies_only_the_new_part(open_store: StoreFactory) -> None:
    source, replica = open_store(P1), open_store(P2)
    _populate(source)
    feed = _feed(source)
    assert replica.apply_changes(feed[:3], P1) == 3
    assert replica.apply_changes(feed[1:], P1) == 2
    assert replica.apply_changes(list(reversed(feed)) + feed, P1) == 0
    assert replica.snapshot() == source.snapshot()


def test_a_gap_is_refused_and_applies_nothing(open_store: StoreFactory) -> None:
    source, replica = open_store(P1), open_store(P2)
    _populate(source)
    feed = _feed(source)
    replica.apply_changes(feed[:2], P1)
    before = replica.snapshot(), replica.last_applied(P1)
    for batch in (feed[3:], [feed[2], feed[4]]):
        with pytest.raises(OperationError) as e:
            replica.apply_changes(batch, P1)
        assert e.value.code == "replication-gap"
        assert (replica.snapshot(), replica.last_applied(P1)) == before


def test_replication_refuses_wrong_origin_and_loops(open_store: StoreFactory) -> None:
    source, replica = open_store(P1), open_store(P2)
    _populate(source)
    with pytest.raises(OperationError) as e:
        replica.apply_changes(_feed(source), "pool3.lab.local")
    assert e.value.code == "replication-source"
    with pytest.raises(OperationError) as e:
        source.apply_changes(_feed(source), P1)
    assert e.value.code == "replication-loop"
    assert replica.replication_positions() == {}


def test_replication_position_survives_reopen(open_store: StoreFactory) -> None:
    source, replica = open_store(P1), open_store(P2)
    _populate(source)
    replica.apply_changes(_feed(source)[:4], P1)
    replica.close()
    again = open_store(P2)
    assert again.last_applied(P1) == 4
    assert again.apply_changes(_feed(source), P1) == 1
    assert again.snapshot() == source.snapshot()


# A write on the source: (kind, user index, other index).
_writes = st.lists(
    st.tuples(
        st.sampled_from(
            ["user", "settings", "delete", "add", "remove", "replace", "meet", "cancel", "serve"]
        ),
        st.integers(0, 3),
        st.integers(0, 3),
    ),
    max_size=40,
)


def _do(store: UserStore, kind: str, i: int, j: int) -> None:
    uri, other = f"sip:u{i}@lab.local", f"sip:u{j}@lab.local"
    try:
        if kind == "user":
            store.upsert_user(uri, home_pool=P1, settings={"n": j})
        elif kind == "settings":
            store.update_settings(uri, {"k": [i, j]})
        elif kind == "delete":
            store.delete_user(uri)
        elif kind == "add":
            store.add_contact(uri, other)
        elif kind == "remove":
            store.remove_contact(uri, other)
        elif kind == "replace":
            store.replace_contacts(uri, [other, f"sip:x{i}@lab.local"])
        elif kind == "meet":
            store.schedule_conference(uri, f"m{j}", subject=f"s{i}", content=bytes([i, j]))
        elif kind == "cancel":
            store.cancel_conference(uri, f"m{j}")
        else:
            store.reassign_serving_pool(P1, P2 if j % 2 else P1)
    except OperationError as e:
        assert e.http_status == 404


@settings(max_examples=60, deadline=None)
@given(
    writes=_writes,
    cuts=st.lists(st.integers(0, 60), max_size=8),
    replays=st.lists(st.tuples(st.integers(0, 60), st.integers(0, 60)), max_size=5),
)
def test_any_writes_replicated_in_any_overlapping_batches_converge(
    writes: list[tuple[str, int, int]],
    cuts: list[int],
    replays: list[tuple[int, int]],
) -> None:
    with (
        UserStore(":memory:", P1, clock=FakeClock()) as source,
        UserStore(":memory:", P2) as replica,
    ):
        for kind, i, j in writes:
            _do(source, kind, i, j)
        feed = _feed(source)
        assert [c.seq for c in feed] == list(range(1, len(feed) + 1))
        bounds = sorted({0, len(feed), *(min(c, len(feed)) for c in cuts)})
        for lo, hi in itertools.pairwise(bounds):
            replica.apply_changes(feed[lo:hi], P1)
            for a, b in replays:  # at-least-once delivery of anything already sent
                replica.apply_changes(feed[min(a, b) : min(max(a, b), hi)], P1)
        assert replica.snapshot() == source.snapshot()
        assert replica.last_applied(P1) == source.high_water_mark()
