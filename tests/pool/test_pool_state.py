from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from labkit import P1, P2, P3

from sipdrill.errors import OperationError
from sipdrill.pool.state import (
    FAILOVER_TRANSITIONS,
    PARTNER_TRANSITIONS,
    FailoverEvent,
    FailoverState,
    PartnerDown,
    PartnerEvent,
    PartnerMonitor,
    PartnerReturnAborted,
    PartnerReturning,
    PartnerState,
    PartnerTrigger,
    PartnerUp,
    PoolFailoverStates,
    TransitionError,
)
from sipdrill.topology import Topology

FS, FC = FailoverEvent.FAILOVER_STARTED, FailoverEvent.FAILOVER_COMPLETED
BS, BC = FailoverEvent.FAILBACK_STARTED, FailoverEvent.FAILBACK_COMPLETED

#: The one path from Active that reaches each state.
PATH_TO = {
    FailoverState.ACTIVE: [],
    FailoverState.FAILING_OVER: [FS],
    FailoverState.FAILED_OVER: [FS, FC],
    FailoverState.FAILING_BACK: [FS, FC, BS],
    FailoverState.FAILED_BACK: [FS, FC, BS, BC],
}

#: Every legal (state, event) and where it leads; everything else is illegal.
LEGAL = {
    (FailoverState.ACTIVE, FS): FailoverState.FAILING_OVER,
    (FailoverState.FAILING_OVER, FS): FailoverState.FAILING_OVER,
    (FailoverState.FAILING_OVER, FC): FailoverState.FAILED_OVER,
    (FailoverState.FAILED_OVER, BS): FailoverState.FAILING_BACK,
    (FailoverState.FAILING_BACK, BS): FailoverState.FAILING_BACK,
    (FailoverState.FAILING_BACK, BC): FailoverState.FAILED_BACK,
    (FailoverState.FAILED_BACK, FS): FailoverState.FAILING_OVER,
}


def _states_at(state: FailoverState) -> PoolFailoverStates:
    states = PoolFailoverStates({P1: P2})
    for event in PATH_TO[state]:
        states.handle(P1, event)
    assert states.state(P1) is state
    return states


@pytest.mark.parametrize(("state", "event"), list(itertools.product(FailoverState, FailoverEvent)))
def test_failover_table(state: FailoverState, event: FailoverEvent) -> None:
    states = _states_at(state)
    before = states.snapshot()
    if (state, event) in LEGAL:
        assert states.handle(P1, event) is LEGAL[(state, event)]
        assert states.state(P2) is FailoverState.ACTIVE
        return
    with pytest.raises(TransitionError) as e:
        states.handle(P1, event)
    assert (e.value.code, e.value.state, e.value.event) == ("invalid-transition", state, event)
    assert isinstance(e.value, OperationError)
    assert states.snapshot() == before


def test_the_table_is_exactly_the_documented_one() -> None:
    for pair in itertools.product(FailoverState, FailoverEvent):
        assert (pair in FAILOVER_TRANSITIONS) == (pair in LEGAL)


@pytest.mark.parametrize(
    "p1_state",
    [FailoverState.FAILING_OVER, FailoverState.FAILED_OVER, FailoverState.FAILING_BACK],
)
def test_partner_cannot_fail_over_while_p1_is_failed_over(p1_state: FailoverState) -> None:
    states = _states_at(p1_state)
    before = states.snapshot()
    with pytest.raises(OperationError) as e:
        states.failover_started(P2)
    assert e.value.code == "failover-order"
    assert not isinstance(e.value, TransitionError)
    assert states.snapshot() == before


def test_partner_fails_over_once_p1_has_failed_back() -> None:
    states = _states_at(FailoverState.FAILED_BACK)
    assert states.failover_started(P2) is FailoverState.FAILING_OVER
    assert states.failover_completed(P2) is FailoverState.FAILED_OVER
    assert states.serving_pool(P2) == P1
    # ...and now the rule holds the other way round.
    with pytest.raises(OperationError) as e:
        states.failover_started(P1)
    assert e.value.code == "failover-order"


def test_serving_pool_follows_the_failover() -> None:
    states = PoolFailoverStates({P1: P2})
    serving = [states.serving_pool(P1)]
    for step in (states.failover_started, states.failover_completed):
        step(P1)
        serving.append(states.serving_pool(P1))
    for step in (states.failback_started, states.failback_completed):
        step(P1)
        serving.append(states.serving_pool(P1))
    assert serving == [P1, P2, P2, P2, P1]


def test_pools_without_a_backup_cannot_fail_over(topology: Topology) -> None:
    states = PoolFailoverStates.from_topology(topology)
    assert states.backup_of(P2) == P1
    assert states.state(P3) is FailoverState.ACTIVE
    assert states.serving_pool(P3) == P3
    for pool in (P3, "nowhere.lab.local"):
        with pytest.raises(OperationError) as e:
            states.failover_started(pool)
        assert e.value.code == "no-backup-pool"


def test_inconsistent_pairing_is_rejected() -> None:
    with pytest.raises(ValueError):
        PoolFailoverStates({P1: P1})
    with pytest.raises(ValueError):
        PoolFailoverStates({P1: P2, P3: P2})


# --- the partner monitor -------------------------------------------------------------

DETECT, FAILBACK = 120.0, 240.0


def _monitor(
    now: float = 0.0, detect: float = DETECT, failback: float = FAILBACK
) -> PartnerMonitor:
    return PartnerMonitor(
        P1, failover_detection_interval=detect, failback_interval=failback, now=now
    )


def _down_at(t: float) -> PartnerMonitor:
    m = _monitor()
    m.on_heartbeat(t - DETECT)
    assert m.on_timer(t) == [PartnerDown(P1, t, t - DETECT)]
    return m


def test_partner_is_down_exactly_one_detection_interval_after_its_last_heartbeat() -> None:
    m = _monitor()
    assert m.next_deadline() == 120.0
    assert m.on_heartbeat(100.0) == []
    assert m.next_deadline() == 220.0
    assert m.on_timer(219.999) == []
    assert m.state is PartnerState.UP and not m.accepts_partner_users
    assert m.on_timer(220.0) == [PartnerDown(P1, 220.0, 100.0)]
    assert m.state is PartnerState.DOWN and m.accepts_partner_users
    assert m.next_deadline() is None
    assert m.on_timer(10_000.0) == []


def test_partner_is_redirected_home_exactly_one_failback_interval_after_it_returns() -> None:
    m = _down_at(220.0)
    assert m.on_heartbeat(500.0) == [PartnerReturning(P1, 500.0)]
    assert m.state is PartnerState.RETURNING and m.accepts_partner_users
    for t in range(530, 740, 30):  # heartbeats keep coming
        assert m.on_heartbeat(float(t)) == []
    assert m.next_deadline() == 740.0
    assert m.on_timer(739.999) == []
    assert m.state is PartnerState.RETURNING
    assert m.on_timer(740.0) == [PartnerUp(P1, 740.0, 500.0)]
    assert m.state is PartnerState.UP and not m.accepts_partner_users
    assert m.next_deadline() == 710.0 + DETECT


def test_a_partner_that_goes_silent_while_returning_is_down_again() -> None:
    m = _down_at(220.0)
    m.on_heartbeat(500.0)
    m.on_heartbeat(550.0)
    assert m.next_deadline() == 670.0
    assert m.on_timer(670.0) == [PartnerReturnAborted(P1, 670.0, 550.0)]
    assert m.state is PartnerState.DOWN
    # The failback interval starts again from the next return.
    assert m.on_heartbeat(800.0) == [PartnerReturning(P1, 800.0)]
    assert m.next_deadline() == 800.0 + DETECT


def test_detection_wins_a_tie_with_failback() -> None:
    m = _monitor(detect=30.0, failback=30.0)  # seed 003's lab values
    m.on_timer(30.0)
    m.on_heartbeat(100.0)
    assert m.on_timer(130.0) == [PartnerReturnAborted(P1, 130.0, 100.0)]


def test_a_late_heartbeat_first_fires_the_deadline_it_missed() -> None:
    m = _monitor()
    assert m.on_heartbeat(130.0) == [PartnerDown(P1, 120.0, 0.0), PartnerReturning(P1, 130.0)]
    # Returning, then silent for longer than the detection interval.
    assert m.on_heartbeat(400.0) == [
        PartnerReturnAborted(P1, 250.0, 130.0),
        PartnerReturning(P1, 400.0),
    ]


def test_a_late_timer_reports_the_timeline_in_order() -> None:
    m = _down_at(220.0)
    for t in (500.0, 600.0, 700.0, 730.0):
        m.on_heartbeat(t)
    assert m.on_timer(10_000.0) == [
        PartnerUp(P1, 740.0, 500.0),
        PartnerDown(P1, 850.0, 730.0),
    ]


def test_time_must_not_go_backwards() -> None:
    m = _monitor(now=50.0)
    with pytest.raises(ValueError):
        m.on_heartbeat(49.0)
    with pytest.raises(ValueError):
        _monitor(detect=0.0)


@pytest.mark.parametrize(
    ("state", "trigger"), list(itertools.product(PartnerState, PartnerTrigger))
)
def test_partner_table(state: PartnerState, trigger: PartnerTrigger) -> None:
    legal = {
        (PartnerState.UP, PartnerTrigger.HEARTBEAT): PartnerState.UP,
        (PartnerState.UP, PartnerTrigger.DETECTION_TIMEOUT): PartnerState.DOWN,
        (PartnerState.DOWN, PartnerTrigger.HEARTBEAT): PartnerState.RETURNING,
        (PartnerState.RETURNING, PartnerTrigger.HEARTBEAT): PartnerState.RETURNING,
        (PartnerState.RETURNING, PartnerTrigger.FAILBACK_ELAPSED): PartnerState.UP,
        (PartnerState.RETURNING, PartnerTrigger.DETECTION_TIMEOUT): PartnerState.DOWN,
    }
    if (state, trigger) in legal:
        assert PARTNER_TRANSITIONS.next_state(state, trigger) is legal[(state, trigger)]
    else:
        with pytest.raises(TransitionError):
            PARTNER_TRANSITIONS.next_state(state, trigger)


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.floats(0.0, 300.0, allow_nan=False), max_size=30),
    tick=st.floats(1.0, 100.0),
)
def test_monitor_matches_the_definition(gaps: list[float], tick: float) -> None:
    """Whatever the heartbeat pattern and however often the timer runs: a
    partner is declared down exactly when a gap reaches the detection
    interval, and declared up exactly a failback interval after it returned,
    with no such gap in between."""
    m = _monitor()
    heartbeats, t = [0.0], 0.0
    for gap in gaps:
        t += gap
        heartbeats.append(t)
    events: list[PartnerEvent] = []
    now = 0.0
    for hb in heartbeats[1:]:
        while now + tick < hb:
            now += tick
            events += m.on_timer(now)
        events += m.on_heartbeat(hb)
        now = hb
    events += m.on_timer(t + DETECT + FAILBACK)

    assert [e.at for e in events] == sorted(e.at for e in events)
    for e in events:
        if isinstance(e, PartnerDown | PartnerReturnAborted):
            assert e.at == e.last_heartbeat + DETECT
            assert e.last_heartbeat in heartbeats
            assert not [h for h in heartbeats if e.last_heartbeat < h < e.at]
        elif isinstance(e, PartnerUp):
            assert e.at == e.returned_at + FAILBACK
            window = [e.returned_at, *(h for h in heartbeats if e.returned_at < h < e.at), e.at]
            assert all(b - a < DETECT for a, b in itertools.pairwise(window))
    kinds = [type(e) for e in events]
    # Down and up alternate: never two downs without a return in between.
    for a, b in itertools.pairwise(kinds):
        if a in (PartnerDown, PartnerReturnAborted):
            assert b is PartnerReturning
    # Silence after the last heartbeat always ends with the partner down.
    assert m.state is PartnerState.DOWN
    assert kinds[-1] in (PartnerDown, PartnerReturnAborted)
