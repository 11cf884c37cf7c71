from __future__ import annotations

import pytest
from labkit import P1, P2, P3

from sipdrill.errors import SipError
from sipdrill.pool.policy import (
    CONFERENCE_POOL_DOWN,
    HOME_POOL_UNKNOWN,
    RESILIENCY_ALLOWED,
    USER_NOT_FOUND,
    Feature,
    Redirect,
    RedirectTarget,
    RegistrarDecision,
    Serve,
    ServiceMode,
    backups_from_topology,
    check_feature,
    registrar_decision,
)
from sipdrill.pool.state import FailoverState, PartnerState
from sipdrill.topology import Topology

BACKUPS: dict[str, str | None] = {P1: P2, P2: P1, P3: None}
A, F, FO, FB, BACK = (
    FailoverState.ACTIVE,
    FailoverState.FAILED_OVER,
    FailoverState.FAILING_OVER,
    FailoverState.FAILING_BACK,
    FailoverState.FAILED_BACK,
)
UP, DOWN, RET = PartnerState.UP, PartnerState.DOWN, PartnerState.RETURNING

FULL = ServiceMode.FULL
LIMITED = ServiceMode.RESILIENCY
TO_P1 = Redirect((RedirectTarget(P1, 0.7), RedirectTarget(P2, 0.3)))
TO_P2 = Redirect((RedirectTarget(P2, 0.7), RedirectTarget(P1, 0.3)))
TO_P3 = Redirect((RedirectTarget(P3, 1.0),))


# (user's home, this pool, this pool's view of its partner, home's failover state) -> decision
CASES: list[tuple[str | None, str, PartnerState | None, FailoverState, RegistrarDecision]] = [
    (None, P1, UP, A, USER_NOT_FOUND),
    ("gone.lab.local", P1, UP, A, HOME_POOL_UNKNOWN),
    # Normal operation: home serves, everyone else redirects home.
    (P1, P1, UP, A, Serve(FULL, P1)),
    (P1, P1, DOWN, A, Serve(FULL, P1)),  # P1's view of P2 does not matter to P1's users
    (P1, P2, UP, A, TO_P1),
    (P1, P2, None, A, TO_P1),  # no automatic registrar failover
    (P1, P3, None, A, TO_P1),
    (P1, P1, UP, BACK, Serve(FULL, P1)),
    # The home pool is down: its backup registrar takes its users, limited.
    (P1, P2, DOWN, A, Serve(LIMITED, P2)),
    (P1, P2, RET, A, Serve(LIMITED, P2)),
    (P1, P2, DOWN, BACK, Serve(LIMITED, P2)),
    (P1, P3, DOWN, A, TO_P1),  # only the partner takes over
    # Pool failover: the backup holds the data; full service once it is done.
    (P1, P2, DOWN, FO, Serve(LIMITED, P2)),
    (P1, P2, UP, FO, Serve(LIMITED, P2)),
    (P1, P2, DOWN, F, Serve(FULL, P2)),
    (P1, P2, UP, F, Serve(FULL, P2)),  # the home pool is back, but not failed back
    (P1, P2, UP, FB, Serve(LIMITED, P2)),
    (P1, P1, UP, FO, TO_P2),
    (P1, P1, UP, F, TO_P2),
    (P1, P1, UP, FB, TO_P2),
    (P1, P3, None, F, TO_P2),
    # A pool without a backup.
    (P3, P3, None, A, Serve(FULL, P3)),
    (P3, P1, DOWN, A, TO_P3),
]


@pytest.mark.parametrize(("home", "here", "partner", "failover", "expected"), CASES)
def test_registrar_decision(
    home: str | None,
    here: str,
    partner: PartnerState | None,
    failover: FailoverState,
    expected: RegistrarDecision,
) -> None:
    decision = registrar_decision(
        user_home=home,
        this_pool=here,
        backups=BACKUPS,
        partner_state=partner,
        failover_state=failover,
    )
    assert decision == expected


def test_redirect_is_a_301_home_first() -> None:
    decision = registrar_decision(
        user_home=P1, this_pool=P2, backups=BACKUPS, partner_state=UP, failover_state=A
    )
    assert isinstance(decision, Redirect)
    assert decision.status_code == 301
    assert [(t.pool, t.q) for t in decision.targets] == [(P1, 0.7), (P2, 0.3)]


def test_refusals_are_structured() -> None:
    assert (USER_NOT_FOUND.status_code, HOME_POOL_UNKNOWN.status_code) == (404, 503)
    error = USER_NOT_FOUND.to_sip_error()
    assert isinstance(error, SipError)
    assert error.status_code == 404


def test_backups_from_topology(topology: Topology) -> None:
    assert backups_from_topology(topology) == BACKUPS


# --- the feature matrix ------------------------------------------------------------

#: REFERENCE.md, "Limited functionality": what works on the backup registrar.
WORKS_IN_RESILIENCY = {Feature.P2P_IM, Feature.P2P_AV, Feature.CALL, Feature.JOIN_CONFERENCE}


@pytest.mark.parametrize("feature", list(Feature))
def test_full_service_allows_everything(feature: Feature) -> None:
    assert check_feature(feature, FULL) is None


@pytest.mark.parametrize("feature", list(Feature))
def test_resiliency_mode_matrix(feature: Feature) -> None:
    refusal = check_feature(feature, LIMITED)
    if feature in WORKS_IN_RESILIENCY:
        assert refusal is None
        return
    assert refusal is not None
    assert refusal.feature is feature
    # 403/488, never 503: a 503 would make the client fail over again.
    assert refusal.status_code in (403, 488)
    assert refusal.reason.startswith("Limited functionality: ")
    assert refusal.reason.endswith(" in resiliency mode")


def test_matrix_examples() -> None:
    contact_list = check_feature(Feature.CONTACT_LIST_READ, LIMITED)
    assert contact_list is not None
    assert (contact_list.status_code, contact_list.reason) == (
        403,
        "Limited functionality: contact list unavailable in resiliency mode",
    )
    adhoc = check_feature(Feature.ADHOC_CONFERENCE, LIMITED)
    assert adhoc is not None and adhoc.status_code == 488
    assert RESILIENCY_ALLOWED == WORKS_IN_RESILIENCY


@pytest.mark.parametrize("mode", list(ServiceMode))
def test_conferences_on_a_down_pool_cannot_be_joined_in_any_mode(mode: ServiceMode) -> None:
    assert check_feature(Feature.JOIN_CONFERENCE, mode, conference_pool_up=True) is None
    refusal = check_feature(Feature.JOIN_CONFERENCE, mode, conference_pool_up=False)
    assert refusal == CONFERENCE_POOL_DOWN
    assert refusal.status_code == 480
