"""Users and settings from a topology: --users patterns, --count, conferences, workload."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sipdrill.clients.endpoint import WorkloadKind
from sipdrill.clients.population import (
    PopulationError,
    parse_workload,
    profile_for,
    proportional_order,
    select_users,
)
from sipdrill.topology import User, load_topology

PAIRED = Path(__file__).resolve().parents[2] / "topologies" / "paired-pools.yaml"


@pytest.fixture(scope="module")
def topology():  # type: ignore[no-untyped-def]
    return load_topology(PAIRED).topology


def test_patterns_pick_users_by_pool_and_name(topology) -> None:  # type: ignore[no-untyped-def]
    pool1 = select_users(topology, ["pool1.lab.local:*"])
    assert len(pool1) == 151 and all(u.home_pool == "pool1.lab.local" for u in pool1)
    assert pool1[0].uri == "sip:alice@lab.local"
    some = select_users(topology, ["*:p2u00*", "pool2.lab.local:bob"])
    assert [u.uri for u in some][:2] == ["sip:bob@lab.local", "sip:p2u001@lab.local"]
    assert len(select_users(topology, ["*:*"], count=10)) == 10


def test_a_small_lab_draws_its_clients_across_home_pools_in_proportion(topology) -> None:  # type: ignore[no-untyped-def]
    """Regression (issue 19): 40 clients of paired-pools were 38 of pool1 (alice,
    bob, carol and pool1's group come first in the file)."""
    forty = select_users(topology, ["*:*"], count=40)
    homes = [u.home_pool for u in forty]
    assert homes.count("pool1.lab.local") == homes.count("pool2.lab.local") == 20
    # Each pool's users in topology order: alice, then p1u001...; bob, carol, then p2u001...
    pool1 = [u.uri for u in forty if u.home_pool == "pool1.lab.local"]
    pool2 = [u.uri for u in forty if u.home_pool == "pool2.lab.local"]
    assert pool1[:2] == ["sip:alice@lab.local", "sip:p1u001@lab.local"]
    assert pool2[:3] == ["sip:bob@lab.local", "sip:carol@lab.local", "sip:p2u001@lab.local"]
    # Deterministic, and a prefix of a larger draw (clients processes split by --offset).
    assert [u.uri for u in select_users(topology, ["*:*"], count=40)] == [u.uri for u in forty]
    assert [u.uri for u in select_users(topology, ["*:*"], count=100)][:40] == [
        u.uri for u in forty
    ]


@given(st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=5))
@example([1, 1, 1, 11, 11])  # found by CI: a pool 1.04 ahead at the 16th user
def test_every_prefix_holds_each_pools_share_within_bounds(sizes: list[int]) -> None:
    users = [
        User(uri=f"sip:u{k}x{j}@lab.local", home_pool=f"pool{k}.lab.local")
        for k, n in enumerate(sizes)
        for j in range(n)
    ]
    order = proportional_order(users)
    assert sorted(u.uri for u in order) == sorted(u.uri for u in users)
    total = len(users)
    taken = [0] * len(sizes)
    for m, user in enumerate(order, start=1):
        k = int(user.uri.split("x")[0][5:])
        taken[k] += 1
        for i, n in enumerate(sizes):
            # About one user either way; a little more can happen
            # ([1, 1, 1, 11, 11] at m=16: 1.04 ahead and 1.04 behind).
            assert abs(taken[i] - m * n / total) < 2, (m, taken, sizes)
    # Within a pool the given order is kept.
    for k in range(len(sizes)):
        mine = [u.uri for u in order if u.home_pool == f"pool{k}.lab.local"]
        assert mine == [f"sip:u{k}x{j}@lab.local" for j in range(sizes[k])]


def test_alice_joins_her_conference_and_her_contacts(topology) -> None:  # type: ignore[no-untyped-def]
    (alice,) = select_users(topology, ["*:alice"])
    assert alice.contacts == ("sip:bob@lab.local", "sip:carol@lab.local")
    assert alice.conferences[0] == "sip:alice@lab.local;gruu;opaque=app:conf:focus:id:alice-weekly"


def test_errors_name_the_fix(topology) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PopulationError, match="only 151 users match"):
        select_users(topology, ["pool1.lab.local:*"], count=1000)
    with pytest.raises(PopulationError, match="no such pool"):
        select_users(topology, ["pool9.lab.local:*"])
    with pytest.raises(PopulationError, match="POOL:GLOB"):
        select_users(topology, ["alice"])
    with pytest.raises(PopulationError, match="use some of"):
        parse_workload("im,video")


def test_workload_and_profile(topology) -> None:  # type: ignore[no-untyped-def]
    assert parse_workload("im, presence,im") == (WorkloadKind.IM, WorkloadKind.PRESENCE)
    assert parse_workload(None) == ()
    profile = profile_for(topology)
    assert profile.domain == "lab.local"
    assert profile.expires == 600
    assert profile.keepalive.default_interval == (96.0, 120.0)
    assert profile.keepalive.pong_timeout == 10.0
    assert [n.label for n in profile.order()][2] == "_sipinternaltls._tcp"


def test_call_settings_are_checked_and_reach_the_profile() -> None:
    from sipdrill.clients.population import CallSettings, PopulationError, parse_workload

    for bad in ({"fraction": 1.5}, {"interval": 0}, {"hold": -1}):
        with pytest.raises(PopulationError):
            CallSettings(**bad)  # type: ignore[arg-type]
    assert parse_workload("im, call") == (WorkloadKind.IM, WorkloadKind.CALL)


def _brute_force(topology, patterns: list[str]) -> set[str]:  # type: ignore[no-untyped-def]
    """Every user against every pattern with fnmatch: what select_users did."""
    import fnmatch

    from sipdrill.clients.population import parse_patterns

    out = set()
    for u in topology.all_users():
        local = u.uri.partition(":")[2].partition("@")[0]
        for pool, glob in parse_patterns(patterns):
            if fnmatch.fnmatchcase(u.home_pool, pool) and (
                fnmatch.fnmatchcase(local, glob) or fnmatch.fnmatchcase(u.uri, glob)
            ):
                out.add(u.uri)
    return out


_NAMES = ["alice", "bob", "p1u001", "p2u150", "p1u15*", "p2u0?1", "p1u[01]0*", "nobody", "*",
          "carol@lab.local", "*p2u002@lab.local", "*p1u00*"]  # fmt: skip


@given(
    st.lists(
        st.tuples(st.sampled_from(["*", "pool1.lab.local", "pool2.lab.local", "pool?.lab.local"]),
                  st.sampled_from(_NAMES)),
        min_size=1, max_size=6,
    )
)  # fmt: skip
def test_literal_and_glob_patterns_pick_what_fnmatch_would(topology, pairs) -> None:  # type: ignore[no-untyped-def]
    patterns = [f"{pool}:{name}" for pool, name in pairs]
    want = _brute_force(topology, patterns)
    if not want:
        with pytest.raises(PopulationError):
            select_users(topology, patterns)
        return
    assert {u.uri for u in select_users(topology, patterns)} == want


def test_a_replicas_thousands_of_literal_users_are_looked_up_not_globbed(  # type: ignore[no-untyped-def]
    topology, monkeypatch
) -> None:
    """Regression (issue 20's 50,000-client bench): a clients replica gets one
    literal pattern per user of its slot; matched one by one with fnmatch that
    was 2,500 x 50,000 calls and minutes of CPU before the replica started."""
    import fnmatch

    from sipdrill.clients import population

    users = [
        User(uri=f"sip:u{k:05d}@lab.local", home_pool=f"pool{k % 2 + 1}.lab.local")
        for k in range(20_000)
    ]
    big = topology.model_copy(update={"users": users, "user_groups": []})
    calls = 0
    real = fnmatch.fnmatchcase

    def counted(name: str, pat: str) -> bool:
        nonlocal calls
        calls += 1
        return real(name, pat)

    monkeypatch.setattr(population.fnmatch, "fnmatchcase", counted)
    picked = range(0, 20_000, 8)  # 2,500 users
    chosen = select_users(big, [",".join(f"*:u{k:05d}" for k in picked)])
    assert {u.uri for u in chosen} == {f"sip:u{k:05d}@lab.local" for k in picked}
    # One pool check per chosen user (and one per pool pattern), not 50 million.
    assert calls < 2 * len(picked) + 10, calls
