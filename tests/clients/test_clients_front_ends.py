"""Enterprise pools with several front ends, client side (sans-IO): the pool
FQDN's A records tried in DNS order, a failed front end followed by the next
one of the same pool (a front-end move, not a pool failover), and the backup
pool only when every front end is gone."""

from __future__ import annotations

import pytest
from clients_harness import POOL2, FakeRegistrar, World, a, paired_pools_dns

from sipdrill.clients.endpoint import (
    FRONT_END_MOVE,
    ClientProfile,
    Target,
    UserSpec,
    default_dns_turn,
    dns_order,
)
from sipdrill.clients.events import Failure, Mode, Registered, TargetFailed
from sipdrill.sip.keepalive import KeepAliveConfig
from sipdrill.sip.transport import Kind

FES = ("10.0.1.11", "10.0.1.12", "10.0.1.13")


def _world(seed: int = 1) -> World:
    dns = paired_pools_dns()
    dns[("pool1.lab.local", "A")] = a("pool1.lab.local", *FES)
    w = World(
        ClientProfile(domain="lab.local", keepalive=KeepAliveConfig(default_interval=(30, 30))),
        dns=dns,
        seed=seed,
        dns_turn=seed,
    )
    for i, fe in enumerate(FES):
        w.registrars[(fe, 5061)] = FakeRegistrar(f"pool1-fe{i + 1}")
    return w


def _addresses(w: World) -> list[str]:
    return [c.target.address or "" for c in w.connects]


@pytest.mark.parametrize("turn", range(7))
def test_dns_order_is_the_answer_rotated_by_the_turn(turn: int) -> None:
    assert dns_order(FES, turn) == [FES[(turn + k) % 3] for k in range(3)]


def test_one_address_is_the_order() -> None:
    assert dns_order(("10.0.1.11",), 5) == ["10.0.1.11"]


def test_each_lookup_of_a_client_is_the_next_turn() -> None:
    w = _world(4)  # turn 4: fe2 first
    w.sign_in()
    assert _addresses(w)[0] == FES[1]
    assert w.ep._rotate(FES) == [FES[2], FES[0], FES[1]]  # the next lookup: turn 5


def test_without_a_turn_a_client_starts_where_its_uri_says_whatever_its_rng() -> None:
    firsts = set()
    for seed in range(5):
        w = World(ClientProfile(domain="lab.local"), seed=seed)
        firsts.add(default_dns_turn(w.ep.user))
        assert w.ep._dns_turn == default_dns_turn(w.ep.user)
    assert len(firsts) == 1
    # ...and different users start on different turns (crc32 of the URI).
    assert default_dns_turn(UserSpec("sip:a@lab.local")) != default_dns_turn(
        UserSpec("sip:b@lab.local")
    )


@pytest.mark.parametrize("seed", range(6))
def test_a_dead_front_end_at_sign_in_is_followed_by_the_next_in_dns_order(seed: int) -> None:
    probe = _world(seed)  # the same seed draws the same first front end
    probe.sign_in()
    first = _addresses(probe)[0]
    w = _world(seed)
    w.down[(first, 5061)] = Failure.REFUSED
    w.sign_in()
    assert w.mode is Mode.FULL_SERVICE and w.pool == "pool1.lab.local"
    tried = _addresses(w)
    assert tried[0] == first
    assert tried[1] == FES[(FES.index(first) + 1) % 3]


def test_a_lost_front_end_moves_the_client_to_the_next_one_of_the_pool() -> None:
    w = _world()
    w.sign_in()
    on = w.connects[-1].target
    assert on.address in FES and on.front_ends == FES
    w.down[(on.address or "", 5061)] = Failure.REFUSED
    w.close_flow(Failure.RESET)
    assert w.mode is Mode.FULL_SERVICE
    assert w.pool == "pool1.lab.local"  # not the backup pool
    nxt = FES[(FES.index(on.address or "") + 1) % 3]
    assert w.connects[-1].target == Target(
        "pool1.lab.local", 5061, Kind.TLS, nxt, FRONT_END_MOVE, FES
    )
    reg = w.of(Registered)[-1]
    assert reg.front_end_move  # type: ignore[attr-defined]
    assert reg.previous_pool == "pool1.lab.local"  # type: ignore[attr-defined]
    assert reg.previous_address == f"{on.address}:5061"  # type: ignore[attr-defined]
    assert reg.address == f"{nxt}:5061"
    # No DNS asked again: the move is on the answer it had.
    assert len(w.connects) == 2


def test_a_missing_pong_moves_to_another_front_end_in_seconds() -> None:
    w = _world()
    w.sign_in()
    on = w.connects[-1].target
    w.registrars[(on.address or "", 5061)].silent = True  # the front end froze
    w.down[(on.address or "", 5061)] = Failure.CONNECT_TIMEOUT
    took = w.run_until(lambda: w.of(Registered)[-1].front_end_move, limit=60)  # type: ignore[attr-defined]
    assert 39.0 <= took <= 41.0  # the pong timeout, then straight on: no backoff
    assert w.pool == "pool1.lab.local"
    assert [e.failure for e in w.of(TargetFailed)] == [Failure.PONG_TIMEOUT]  # type: ignore[attr-defined]


def test_the_backup_pool_only_when_every_front_end_is_down() -> None:
    w = _world()
    w.sign_in()
    for fe in FES:
        w.down[(fe, 5061)] = Failure.REFUSED
    w.close_flow(Failure.RESET)
    assert w.pool == "pool2.lab.local"
    reg = w.of(Registered)[-1]
    assert not reg.front_end_move  # type: ignore[attr-defined]
    assert reg.previous_pool == "pool1.lab.local"  # type: ignore[attr-defined]
    failed = [e.address for e in w.of(TargetFailed)]
    # the lost flow, the two other front ends, then (from the SRV again) the
    # lost one once more, before the backup pool
    assert sorted(failed[:3]) == sorted(f"{fe}:5061" for fe in FES)
    assert w.connects[-1].target.address == POOL2[0]


def test_a_redirect_is_not_a_front_end_move() -> None:
    w = _world()
    w.sign_in()
    on = w.connects[-1].target
    w.registrars[(on.address or "", 5061)].redirect = ("<sip:pool2.lab.local:5061;transport=tls>",)
    w.advance(400)  # the refresh is redirected to pool2
    assert w.pool == "pool2.lab.local"
    assert not w.of(Registered)[-1].front_end_move  # type: ignore[attr-defined]
