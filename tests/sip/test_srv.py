"""RFC 2782 SRV ordering with an injected RNG."""

from __future__ import annotations

import random
from collections import Counter

from sipdrill.sip.srv import SrvRecord, order_srv

PRIMARY = (0, 0, 5061, "pool1.example.com.")
BACKUP = (10, 10, 5061, "pool2.example.com.")


def targets(records: list[SrvRecord]) -> list[str]:
    return [r.host for r in records]


class _FixedRng(random.Random):
    """Returns scripted draws, to pin the exact RFC 2782 selection steps."""

    def __init__(self, draws: list[int]) -> None:
        super().__init__(0)
        self.draws = list(draws)
        self.bounds: list[tuple[int, int]] = []

    def randint(self, a: int, b: int) -> int:
        self.bounds.append((a, b))
        return self.draws.pop(0)


def test_lowest_priority_first() -> None:
    # Seed 003's setup: primary pool priority 0, backup priority 10.
    for seed in range(20):
        assert targets(order_srv([BACKUP, PRIMARY], random.Random(seed))) == [
            "pool1.example.com",
            "pool2.example.com",
        ]


def test_single_dot_target_means_no_service() -> None:
    assert order_srv([(0, 0, 0, ".")], random.Random(1)) == []
    # Among real records a "." is ignored rather than tried.
    assert targets(order_srv([(0, 0, 0, "."), PRIMARY], random.Random(1))) == ["pool1.example.com"]


def test_running_sums_and_inclusive_draw() -> None:
    records = [(1, 30, 5060, "a"), (1, 0, 5060, "zero"), (1, 70, 5060, "b")]
    # Order after moving weight 0 first: zero(0) a(30) b(100).
    # Draw 31 -> first running sum >= 31 is b. Then zero(0) a(30): draw 0 -> zero.
    # Then a alone: total 30, draw anything -> a.
    rng = _FixedRng([31, 0, 17])
    assert targets(order_srv(records, rng)) == ["b", "zero", "a"]
    assert rng.bounds == [(0, 100), (0, 30), (0, 30)]


def test_draw_equal_to_running_sum_selects_that_record() -> None:
    records = [(1, 30, 5060, "a"), (1, 70, 5060, "b")]
    assert targets(order_srv(records, _FixedRng([30, 0]))) == ["a", "b"]
    assert targets(order_srv(records, _FixedRng([0, 0]))) == ["a", "b"]
    assert targets(order_srv(records, _FixedRng([100, 0]))) == ["b", "a"]


def test_seeded_rng_is_reproducible() -> None:
    records = [(0, w, 5061, f"fe{w}") for w in (10, 20, 30, 40)]
    first = order_srv(records, random.Random(2024))
    assert first == order_srv(records, random.Random(2024))
    assert sorted(targets(first)) == ["fe10", "fe20", "fe30", "fe40"]


def test_weights_share_the_load() -> None:
    records = [(0, 10, 5061, "light"), (0, 90, 5061, "heavy")]
    rng = random.Random(7)
    trials = 20_000
    firsts = Counter(order_srv(records, rng)[0].host for _ in range(trials))
    # N in 0..100 inclusive; "light" (running sum 10) wins for N <= 10: 11/101.
    assert abs(firsts["light"] / trials - 11 / 101) < 0.01
    assert firsts["light"] + firsts["heavy"] == trials


def test_all_zero_weights_keep_given_order() -> None:
    records = [(5, 0, 1, "x"), (5, 0, 2, "y"), (5, 0, 3, "z")]
    for seed in range(10):
        assert targets(order_srv(records, random.Random(seed))) == ["x", "y", "z"]


def test_every_record_once_across_priorities() -> None:
    records = [(p, w, 5060, f"h{p}-{w}") for p in (20, 10, 30) for w in (0, 5, 50)]
    result = order_srv(records, random.Random(3))
    assert sorted(targets(result)) == sorted(r[3] for r in records)
    assert [r.priority for r in result] == sorted(r.priority for r in result)
