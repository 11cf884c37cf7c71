"""A front end warns when its open-file limit is below the connections it may hold."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pool_harness import TOKEN
from pydantic import SecretStr
from test_pool_front_ends import P1, P2, enterprise

from sipdrill.pool.service import PoolService, PoolSettings
from sipdrill.sip.fdlimit import FD_HEADROOM, raise_fd_limit
from sipdrill.topology import Topology


def service(tmp_path: Path, pool: str, fe: str, users: dict[str, int]) -> PoolService:
    data = enterprise().model_dump(mode="json")
    data["user_groups"] = [
        {"home_pool": p, "prefix": f"u{i}x", "count": n} for i, (p, n) in enumerate(users.items())
    ]
    topology = Topology.model_validate(data)
    settings = PoolSettings(
        pool=pool, front_end=fe, state_dir=tmp_path, ca_dir=tmp_path / "ca",
        loopback=True, token=SecretStr(TOKEN),
    )  # fmt: skip
    return PoolService(topology, settings)


def test_a_backup_registrar_counts_its_partners_users_over_its_front_ends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression (issue 20's 50,000-client bench): pools of 25,000 users ran
    into the engine's 20,000 open files; accept() failed with EMFILE and the
    clients' handshakes timed out, with nothing saying why."""
    users = {P1: 30_000, P2: 12_000}  # + alice on pool1
    # pool1 has three front ends: (30,001 + 12,000) / 3, pool2 one: all of it.
    fe = service(tmp_path, P1, f"fe2.{P1}", users)
    single = service(tmp_path, P2, f"fe1.{P2}", users)
    with caplog.at_level(logging.WARNING, logger="sipdrill.pool"):
        assert fe._check_fd_limit(20_000) == 14_001 + FD_HEADROOM
        assert not caplog.records
        assert single._check_fd_limit(20_000) == 42_001 + FD_HEADROOM
    (record,) = caplog.records
    assert "open-file limit (20000)" in record.getMessage()
    assert "42001 users" in record.getMessage()


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
        got = raise_fd_limit()
        assert got == (hard if hard != resource.RLIM_INFINITY else max(1024, 1_048_576))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
