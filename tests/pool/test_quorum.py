"""Enterprise pool quorum: REFERENCE.md's figures for every pool size, and one
front end's view of its pool (sans-IO, an injected clock)."""

from __future__ import annotations

import itertools

import pytest

from sipdrill.pool.quorum import (
    TRANSITIONS,
    FrontEndQuorum,
    PoolQuorumState,
    QuorumLost,
    QuorumRegained,
    has_quorum,
    quorum_rule,
)

# size: (need, among) -- REFERENCE.md "Enterprise pool quorum"
FIGURES = {
    1: (1, 1),
    2: (1, 2),
    3: (2, 3),
    4: (2, 4),
    5: (3, 5),
    6: (3, 6),
    7: (4, 7),
    8: (4, 7),
    9: (4, 7),
    10: (5, 9),
    11: (5, 9),
    12: (5, 9),
}


@pytest.mark.parametrize(("size", "figure"), sorted(FIGURES.items()))
def test_rule_for_every_size(size: int, figure: tuple[int, int]) -> None:
    rule = quorum_rule(size)
    assert (rule.need, rule.among) == figure


@pytest.mark.parametrize("size", sorted(FIGURES))
def test_has_quorum_exactly_at_the_figure(size: int) -> None:
    need, among = FIGURES[size]
    for up in range(size + 1):
        for chosen in itertools.combinations(range(size), up):
            counted = sum(1 for i in chosen if i < among)
            assert has_quorum(size, chosen) is (counted >= need), (size, chosen)


def test_the_first_seven_or_nine_decide() -> None:
    # 8-9: any 4 of the first 7; the 8th and 9th do not count.
    assert not has_quorum(9, [0, 1, 2, 7, 8])
    assert has_quorum(9, [0, 1, 2, 6])
    # 10-12: any 5 of the first 9.
    assert not has_quorum(12, [0, 1, 2, 3, 9, 10, 11])
    assert has_quorum(12, [4, 5, 6, 7, 8])


@pytest.mark.parametrize("size", [0, 13, -1])
def test_sizes_outside_a_pool_are_refused(size: int) -> None:
    with pytest.raises(ValueError, match="1 to 12"):
        quorum_rule(size)


def test_describe() -> None:
    assert quorum_rule(3).describe() == "any 2 of 3"
    assert quorum_rule(8).describe() == "any 4 of the first 7 of 8"


def test_front_end_loses_and_regains_quorum() -> None:
    q = FrontEndQuorum(3, 0, down_after=3.0, now=0.0)
    assert q.on_timer(100.0) == []  # siblings not heard yet: starting, presumed up
    q.heard(1, 101.0)
    q.heard(2, 101.5)
    assert q.on_timer(103.0) == []
    q.heard(1, 103.0)
    # fe3 silent since 101.5: down at 104.5; fe2 heard at 103.0 is still up.
    assert q.up(105.0) == (0, 1)
    assert q.on_timer(105.0) == []  # any 2 of 3
    events = q.on_timer(106.0)  # fe2 now silent for 3 s too
    assert events == [QuorumLost(106.0, (0,), quorum_rule(3))]
    assert q.state is PoolQuorumState.STOPPED
    assert q.on_timer(107.0) == []  # no repeat
    q.heard(2, 108.0)
    assert q.on_timer(108.0) == [QuorumRegained(108.0, (0, 2), quorum_rule(3))]
    assert q.state is PoolQuorumState.SERVING


def test_next_deadline_is_the_first_sibling_to_go_silent() -> None:
    q = FrontEndQuorum(3, 1, down_after=2.0, now=10.0)
    assert q.next_deadline() is None  # nobody heard yet
    q.heard(0, 11.0)
    q.heard(2, 10.5)
    assert q.next_deadline() == 12.5
    assert FrontEndQuorum(1, 0, down_after=2.0, now=0.0).next_deadline() is None


def test_one_front_end_pool_never_loses_quorum() -> None:
    q = FrontEndQuorum(1, 0, down_after=1.0, now=0.0)
    assert q.on_timer(1000.0) == []


def test_transition_table_is_closed() -> None:
    assert set(TRANSITIONS.values()) <= set(PoolQuorumState)
    assert len(TRANSITIONS) == 2


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        FrontEndQuorum(3, 3, down_after=1.0, now=0.0)
    with pytest.raises(ValueError):
        FrontEndQuorum(3, 0, down_after=0.0, now=0.0)
