"""RFC 5626 keep-alive state machine and recovery backoff."""

from __future__ import annotations

import random

import pytest

from sipdrill.sip.keepalive import (
    PING,
    Backoff,
    FlowFailed,
    KeepAlive,
    KeepAliveConfig,
    KeepAliveState,
    KeepAliveStateError,
    PongReceived,
    SendPing,
    backoff_window,
    recovery_delay,
)


class TestKeepAlive:
    def test_default_interval_is_95_to_120_s(self) -> None:
        for seed in range(200):
            ka = KeepAlive(random.Random(seed))
            ka.start(1000.0)
            deadline = ka.next_deadline()
            assert deadline is not None
            assert 1095.0 <= deadline <= 1120.0

    def test_flow_timer_interval_is_80_to_100_percent(self) -> None:
        draws = []
        for seed in range(300):
            ka = KeepAlive(random.Random(seed), flow_timer=120.0)
            ka.start(0.0)
            deadline = ka.next_deadline()
            assert deadline is not None
            draws.append(deadline)
        assert min(draws) >= 96.0
        assert max(draws) <= 120.0
        # Spread over the range, not a constant.
        assert max(draws) - min(draws) > 20.0

    def test_ping_pong_cycle(self) -> None:
        ka = KeepAlive(random.Random(1), flow_timer=100.0)
        assert ka.start(0.0) == []
        first = ka.next_deadline()
        assert first is not None
        assert ka.handle_timer(first - 0.001) == []
        assert ka.handle_timer(first) == [SendPing()]
        assert SendPing().data == PING == b"\r\n\r\n"
        assert ka.state is KeepAliveState.AWAITING_PONG
        assert ka.next_deadline() == first + 10.0
        assert ka.pong_received(first + 0.25) == [PongReceived(pytest.approx(0.25))]
        second = ka.next_deadline()
        assert second is not None
        assert first + 0.25 + 80.0 <= second <= first + 0.25 + 100.0
        assert ka.state is KeepAliveState.WAITING

    def test_no_pong_within_10_s_fails_the_flow(self) -> None:
        ka = KeepAlive(random.Random(2))
        ka.start(0.0)
        ping_at = ka.next_deadline()
        assert ping_at is not None
        ka.handle_timer(ping_at)
        assert ka.handle_timer(ping_at + 9.999) == []
        assert ka.handle_timer(ping_at + 10.0) == [FlowFailed("no pong within 10 s")]
        assert ka.state is KeepAliveState.FAILED
        assert ka.next_deadline() is None
        # A late pong changes nothing; a new flow can start over.
        assert ka.pong_received(ping_at + 11.0) == []
        assert ka.state is KeepAliveState.FAILED
        ka.start(ping_at + 12.0)
        assert ka.state is KeepAliveState.WAITING

    def test_configurable_pong_timeout(self) -> None:
        ka = KeepAlive(random.Random(3), KeepAliveConfig(pong_timeout=2.0), flow_timer=10.0)
        ka.start(0.0)
        ping_at = ka.next_deadline()
        assert ping_at is not None
        ka.handle_timer(ping_at)
        assert ka.handle_timer(ping_at + 2.0) == [FlowFailed("no pong within 2 s")]

    def test_unsolicited_pong_is_ignored(self) -> None:
        ka = KeepAlive(random.Random(4))
        ka.start(0.0)
        before = ka.next_deadline()
        assert ka.pong_received(5.0) == []
        assert ka.next_deadline() == before

    def test_flow_timer_update_reschedules(self) -> None:
        ka = KeepAlive(random.Random(5))
        ka.start(0.0)
        ka.set_flow_timer(30.0, 10.0)
        deadline = ka.next_deadline()
        assert deadline is not None
        assert 34.0 <= deadline <= 40.0

    def test_illegal_transition_raises_and_changes_nothing(self) -> None:
        ka = KeepAlive(random.Random(6))
        ka.start(0.0)
        deadline = ka.next_deadline()
        with pytest.raises(KeepAliveStateError):
            ka.start(1.0)
        assert ka.state is KeepAliveState.WAITING
        assert ka.next_deadline() == deadline

    def test_stop(self) -> None:
        ka = KeepAlive(random.Random(7))
        ka.start(0.0)
        ka.stop()
        assert ka.state is KeepAliveState.IDLE
        assert ka.next_deadline() is None
        assert ka.handle_timer(1000.0) == []


class TestBackoff:
    @pytest.mark.parametrize(
        ("failures", "all_failed", "window"),
        [
            (0, True, 30.0),
            (1, True, 60.0),
            (3, True, 240.0),
            (5, True, 960.0),
            (6, True, 1800.0),
            (60, True, 1800.0),
            (1, False, 180.0),
            (4, False, 1440.0),
            (5, False, 1800.0),
        ],
    )
    def test_window(self, failures: int, all_failed: bool, window: float) -> None:
        assert backoff_window(failures, all_failed=all_failed) == window

    def test_window_is_configurable(self) -> None:
        assert backoff_window(2, all_failed=True, base_time_all_failed=1.0, max_time=3.0) == 3.0
        assert backoff_window(1, all_failed=False, base_time_ok=5.0) == 10.0

    def test_delay_bounds(self) -> None:
        rng = random.Random(8)
        for failures in range(10):
            window = backoff_window(failures, all_failed=True)
            draws = [recovery_delay(failures, rng, all_failed=True) for _ in range(200)]
            assert all(window / 2 <= d <= window for d in draws)
            # Both halves of the window are used: the spread is what de-synchronises a storm.
            assert min(draws) < window * 0.6
            assert max(draws) > window * 0.9

    def test_backoff_counts_failures_and_resets(self) -> None:
        backoff = Backoff(random.Random(9))
        first = backoff.failure(all_failed=True)
        assert 30.0 <= first <= 60.0
        second = backoff.failure(all_failed=True)
        assert 60.0 <= second <= 120.0
        assert backoff.failures == 2
        for _ in range(20):
            assert backoff.failure(all_failed=False) <= 1800.0
        backoff.success()
        assert backoff.failures == 0
        assert 90.0 <= backoff.failure(all_failed=False) <= 180.0

    def test_same_seed_same_delays(self) -> None:
        a, b = Backoff(random.Random(10)), Backoff(random.Random(10))
        assert [a.failure(all_failed=True) for _ in range(5)] == [
            b.failure(all_failed=True) for _ in range(5)
        ]
