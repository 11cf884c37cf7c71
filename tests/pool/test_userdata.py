from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from labkit import P1, P2, P3, StoreFactory

from sipdrill.errors import OperationError
from sipdrill.pool.state import FailoverState, PoolFailoverStates
from sipdrill.pool.store import StoreSnapshot, UserStore
from sipdrill.pool.userdata import (
    MoveResult,
    export_cs_user_data,
    get_pool_status,
    import_cs_user_data,
    move_cs_user,
)
from sipdrill.topology import Topology

ALICE = "sip:alice@lab.local"  # homed on P1: 2 contacts, 1 meeting in the test topology
BOB = "sip:bob@lab.local"


@pytest.fixture
def pools(open_store: StoreFactory, topology: Topology) -> dict[str, UserStore]:
    stores = {pool: open_store(pool) for pool in (P1, P2, P3)}
    for store in stores.values():
        store.seed_from_topology(topology)
    return stores


def _state(stores: Mapping[str, UserStore]) -> dict[str, tuple[StoreSnapshot, int]]:
    return {p: (s.snapshot(), s.high_water_mark()) for p, s in stores.items()}


def _refused(stores: Mapping[str, UserStore], code: str, op: Callable[[], object]) -> None:
    before = _state(stores)
    with pytest.raises(OperationError) as e:
        op()
    assert e.value.code == code
    assert _state(stores) == before


# --- Move-CsUser ----------------------------------------------------------------------


def test_move_takes_contacts_and_meetings_along(pools: dict[str, UserStore]) -> None:
    pools[P1].schedule_conference(ALICE, "deck", subject="Review", content=b"slides")
    contacts = pools[P1].contacts(ALICE)
    meetings = pools[P1].conferences(ALICE)

    result = move_cs_user(ALICE, P3, stores=pools)

    assert result == MoveResult(ALICE, P1, P3, False, 2, 2, 0, 0)
    assert pools[P1].get_user(ALICE) is None
    moved = pools[P3].get_user(ALICE)
    assert moved is not None and moved.home_pool == moved.serving_pool == P3
    assert pools[P3].contacts(ALICE) == contacts
    assert pools[P3].conferences(ALICE) == meetings


def test_forced_move_loses_contacts_and_meetings_and_counts_them(
    pools: dict[str, UserStore],
) -> None:
    pools[P1].update_settings(ALICE, {"ring": 5})
    result = move_cs_user(ALICE, P3, stores=pools, down=[P1], force=True)

    assert (result.contacts_lost, result.conferences_lost) == (2, 1)
    assert (result.contacts_moved, result.conferences_moved) == (0, 0)
    assert pools[P3].contacts(ALICE) == []
    assert pools[P3].conferences(ALICE) == []
    moved = pools[P3].get_user(ALICE)
    assert moved is not None and moved.settings == {"ring": 5}
    assert pools[P1].get_user(ALICE) is None


def test_forced_move_to_the_backup_does_not_keep_the_replica(
    pools: dict[str, UserStore],
) -> None:
    # P2 holds a Backup Service replica of P1's users.
    pools[P2].apply_changes(pools[P1].changes_since(0, 10_000), P1)
    assert pools[P2].contacts(ALICE)
    result = move_cs_user(ALICE, P2, stores=pools, down=[P1], force=True)
    assert result.contacts_lost == 2
    assert pools[P2].contacts(ALICE) == []
    assert pools[P2].get_user(ALICE).home_pool == P2  # type: ignore[union-attr]


def test_forced_move_from_a_pool_the_lab_has_no_store_for(
    pools: dict[str, UserStore],
) -> None:
    pools[P2].apply_changes(pools[P1].changes_since(0, 10_000), P1)
    without_p1 = {P2: pools[P2], P3: pools[P3]}
    _refused(without_p1, "unknown-user", lambda: move_cs_user(ALICE, P3, stores=without_p1))
    result = move_cs_user(ALICE, P3, stores=without_p1, force=True)
    assert (result.source_pool, result.contacts_lost, result.conferences_lost) == (P1, 2, 1)


def test_forced_move_to_a_down_pool_rehomes_the_account(pools: dict[str, UserStore]) -> None:
    result = move_cs_user(ALICE, P3, stores=pools, down=[P3], force=True)
    assert result.target_pool == P3
    assert pools[P3].get_user(ALICE) is not None


@pytest.mark.parametrize(
    ("code", "kwargs"),
    [
        ("unknown-user", {"identity": "sip:nobody@lab.local", "target_pool": P3}),
        ("unknown-pool", {"identity": ALICE, "target_pool": "pool9.lab.local"}),
        ("same-pool", {"identity": ALICE, "target_pool": P1}),
        ("pool-down", {"identity": ALICE, "target_pool": P3, "down": [P3]}),
        ("pool-down", {"identity": ALICE, "target_pool": P3, "down": [P1]}),
        ("same-pool", {"identity": ALICE, "target_pool": P1, "force": True}),
        ("unknown-user", {"identity": "sip:nobody@lab.local", "target_pool": P3, "force": True}),
    ],
)
def test_invalid_moves_change_nothing(
    pools: dict[str, UserStore], code: str, kwargs: dict[str, object]
) -> None:
    _refused(pools, code, lambda: move_cs_user(stores=pools, **kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize("read_only", [P1, P3])
@pytest.mark.parametrize("force", [False, True])
def test_moves_touching_a_read_only_store_change_nothing(
    pools: dict[str, UserStore], read_only: str, force: bool
) -> None:
    pools[read_only].set_read_only(True)
    _refused(pools, "read-only", lambda: move_cs_user(ALICE, P3, stores=pools, force=force))


def test_an_interrupted_move_finishes_when_run_again(pools: dict[str, UserStore]) -> None:
    # The crash came after the target's commit and before the source's.
    pools[P3].upsert_user(ALICE, home_pool=P3)
    result = move_cs_user(ALICE, P3, stores=pools)
    assert (result.source_pool, result.contacts_moved) == (P1, 2)
    assert pools[P1].get_user(ALICE) is None
    assert len(pools[P3].contacts(ALICE)) == 2


# --- Export / Import -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["export.xml", "export.json", "export.dat"])
def test_export_force_move_import_restores_contact_lists(
    pools: dict[str, UserStore], tmp_path: Path, name: str
) -> None:
    """The budget-DR drill: nightly export, forced move to the standby pool
    (contacts and meetings lost), import there (both back)."""
    p1 = pools[P1]
    p1.update_settings(ALICE, {"note": "façade <&>"})
    p1.schedule_conference(ALICE, "deck", subject="Review <&>", content=b"\x00slides\xff")
    homed = {u.uri: p1.contacts(u.uri) for u in p1.users(home_pool=P1)}
    meetings = p1.conferences(ALICE)
    exported = export_cs_user_data(p1, tmp_path / name, domain="lab.local")
    assert (exported.users, exported.contacts) == (len(homed), sum(map(len, homed.values())))
    assert exported.meetings == sum(len(p1.conferences(u)) for u in homed) >= 2
    assert exported.seq == p1.high_water_mark()

    lost = 0
    for uri in homed:
        lost += move_cs_user(uri, P3, stores=pools, down=[P1], force=True).contacts_lost
    assert lost == exported.contacts
    assert pools[P3].counts().contacts == 0

    result = import_cs_user_data(pools[P3], tmp_path / name, domain="lab.local", pools=[P1, P3])
    assert (result.users_restored, result.contacts_restored) == (len(homed), lost)
    assert result.meetings_restored == exported.meetings
    assert result.skipped == ()
    assert result.export is not None and result.export.seq == exported.seq
    assert {uri: pools[P3].contacts(uri) for uri in homed} == homed
    assert pools[P3].get_user(ALICE).settings == {"note": "façade <&>"}  # type: ignore[union-attr]
    assert [(m.conf_id, m.subject, m.content) for m in pools[P3].conferences(ALICE)] == [
        (m.conf_id, m.subject, m.content) for m in meetings
    ]

    # Importing twice restores the same lists and logs no new change.
    hwm = pools[P3].high_water_mark()
    import_cs_user_data(pools[P3], tmp_path / name)
    assert {uri: pools[P3].contacts(uri) for uri in homed} == homed
    assert pools[P3].high_water_mark() == hwm


def test_import_skips_users_not_homed_on_the_pool(
    pools: dict[str, UserStore], tmp_path: Path
) -> None:
    export_cs_user_data(pools[P1], tmp_path / "p1.xml")
    move_cs_user(ALICE, P3, stores=pools)
    pools[P3].replace_contacts(ALICE, [])
    result = import_cs_user_data(pools[P3], tmp_path / "p1.xml")
    assert result.users_restored == 1
    assert ALICE not in result.skipped and BOB in result.skipped
    assert result.reasons[BOB] == f"no account on {P3}"
    assert len(pools[P3].contacts(ALICE)) == 2
    # Imported on the pool the users still live on, nobody is "restored" there
    # by mistake: the reason says what to do.
    export_cs_user_data(pools[P2], tmp_path / "p2.xml")
    pools[P3].upsert_user("sip:carol@lab.local", home_pool=P2)
    result = import_cs_user_data(pools[P3], tmp_path / "p2.xml")
    assert result.reasons["sip:carol@lab.local"] == f"homed on {P2}, not {P3}: move them first"


@pytest.mark.parametrize(
    "content",
    [
        b"<UserData version='1'><User uri='sip:a@lab.local'/></UserData>",
        b"<UserData version='7'/>",
        b"<UserData version='2'><User",
        b'{"version": 2, "users": [{"uri": "sip:a@lab.local"}]}',
        b"{not json",
    ],
)
def test_a_bad_export_file_changes_nothing(
    pools: dict[str, UserStore], tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "bad.xml"
    path.write_bytes(content)
    _refused(pools, "bad-export", lambda: import_cs_user_data(pools[P1], path))
    _refused(pools, "bad-export", lambda: import_cs_user_data(pools[P1], tmp_path / "none.xml"))


def _exported_then_moved(pools: dict[str, UserStore], path: Path) -> None:
    """P1's users exported to ``path`` and force-moved to P3 (lists lost)."""
    export_cs_user_data(pools[P1], path, domain="lab.local")
    for u in pools[P1].users(home_pool=P1):
        move_cs_user(u.uri, P3, stores=pools, down=[P1], force=True)


@pytest.mark.parametrize("name", ["p1.xml", "p1.json"])
@pytest.mark.parametrize(
    ("damage", "says"),
    [
        # Cut short at a user's boundary, the document closed again: well-formed,
        # but the header's counts give it away.
        ("drop-user", "cut short or edited"),
        ("truncate", "cut short or damaged"),
        # One contact's URI changed in transit: only the digest notices.
        ("flip", "does not match its digest"),
    ],
)
def test_a_truncated_or_damaged_export_is_refused_with_nothing_changed(
    pools: dict[str, UserStore], tmp_path: Path, name: str, damage: str, says: str
) -> None:
    path = tmp_path / name
    _exported_then_moved(pools, path)
    data = path.read_bytes()
    if damage == "truncate":
        data = data[: len(data) * 2 // 3]
    elif damage == "flip":
        data = data.replace(b"sip:bob@lab.local", b"sip:bob@lab.locul", 1)
    elif name.endswith(".xml"):
        start = data.index(b"<User ", data.index(b"<User ") + 1)
        data = data[:start] + data[data.index(b"</User>", start) + len(b"</User>") :]
    else:
        doc = json.loads(data)
        doc["users"].pop()
        data = json.dumps(doc).encode()
    path.write_bytes(data)

    before = _state(pools)
    with pytest.raises(OperationError, match=says) as e:
        import_cs_user_data(pools[P3], path, domain="lab.local", pools=[P1, P2, P3])
    assert e.value.code == "bad-export" and str(path) in e.value.message
    assert _state(pools) == before
    assert pools[P3].counts().contacts == 0


def test_a_foreign_export_is_refused_with_nothing_changed(
    pools: dict[str, UserStore], tmp_path: Path
) -> None:
    path = tmp_path / "p1.xml"
    _exported_then_moved(pools, path)
    # Another lab's domain, and a pool this lab does not have.
    _refused(
        pools,
        "foreign-export",
        lambda: import_cs_user_data(pools[P3], path, domain="other.example", pools=[P1, P3]),
    )
    _refused(
        pools,
        "foreign-export",
        lambda: import_cs_user_data(pools[P3], path, domain="lab.local", pools=[P2, P3]),
    )
    # Accepted by this lab's own description.
    result = import_cs_user_data(pools[P3], path, domain="lab.local", pools=[P1, P3])
    assert result.users_restored == len(pools[P3].users(home_pool=P3))


def test_import_into_a_read_only_store_changes_nothing(
    pools: dict[str, UserStore], tmp_path: Path
) -> None:
    export_cs_user_data(pools[P1], tmp_path / "p1.json")
    pools[P1].set_read_only(True)
    _refused(pools, "read-only", lambda: import_cs_user_data(pools[P1], tmp_path / "p1.json"))


def test_export_replaces_the_file_whole(pools: dict[str, UserStore], tmp_path: Path) -> None:
    path = tmp_path / "nightly.xml"
    export_cs_user_data(pools[P1], path)
    export_cs_user_data(pools[P1], path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".", "nightly"))) == [
        "nightly.xml"
    ]
    assert path.read_bytes().startswith(b"<?xml")


# --- pool status -------------------------------------------------------------------------


def test_pool_status(pools: dict[str, UserStore], topology: Topology) -> None:
    states = PoolFailoverStates.from_topology(topology)
    states.failover_started(P1)
    pools[P2].apply_changes(pools[P1].changes_since(0, 10_000), P1)
    pools[P2].reassign_serving_pool(P1, P2)
    pools[P1].set_read_only(True)

    p1 = get_pool_status(pools[P1], states)
    assert (p1.read_only, p1.failover_state, p1.backup_pool) == (
        True,
        FailoverState.FAILING_OVER,
        P2,
    )
    assert p1.high_water_mark == pools[P1].high_water_mark()

    p2 = get_pool_status(pools[P2], states)
    homed_on = topology.users_by_pool()
    assert p2.counts.homed_users == homed_on[P2]
    assert p2.counts.served_users == homed_on[P1] + homed_on[P2]
    assert p2.replicated_from == {P1: pools[P1].high_water_mark()}

    p3 = get_pool_status(pools[P3])
    assert (p3.failover_state, p3.backup_pool, p3.counts.users) == (None, None, 0)
    assert get_pool_status(pools[P3], states).backup_pool is None
