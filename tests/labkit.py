"""What the tests of the pool, the Backup Service, the CMS and the admin
operations share: a small paired topology built in code (not read from
``topologies/``, so these tests do not follow edits to the shipped labs), a
fake clock, and stores in temporary files. The fixtures are made available
by each of those directories' conftest.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sipdrill.pool.store import UserStore
from sipdrill.topology import Topology

P1 = "pool1.lab.local"
P2 = "pool2.lab.local"
P3 = "pool3.lab.local"


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_topology(*, group_count: int = 5, contacts: int = 2, conferences: int = 1) -> Topology:
    def pool(name: str, site: int, backup: str | None) -> dict[str, object]:
        return {
            "fqdn": name,
            "site": f"site{site}",
            "edition": "Enterprise",
            "backup": backup,
            "front_ends": [{"fqdn": f"fe1.{name}", "address": f"172.30.{site}.11"}],
        }

    return Topology.model_validate(
        {
            "name": "services-test",
            "domain": "lab.local",
            "sites": [{"name": f"site{i}", "subnet": f"172.30.{i}.0/24"} for i in (1, 2, 3)],
            "pools": [pool(P1, 1, P2), pool(P2, 2, P1), pool(P3, 3, None)],
            "cms": {"active": P1},
            "dns": {"address": "172.30.0.53"},
            "users": [
                {
                    "uri": "sip:alice@lab.local",
                    "home_pool": P1,
                    "contacts": ["sip:bob@lab.local", "sip:carol@lab.local"],
                    "conferences": [{"id": "weekly", "subject": "Weekly sync"}],
                },
                {"uri": "sip:bob@lab.local", "home_pool": P1, "contacts": ["sip:alice@lab.local"]},
                {
                    "uri": "sip:carol@lab.local",
                    "home_pool": P2,
                    "contacts": ["sip:alice@lab.local"],
                },
            ],
            "user_groups": [
                {
                    "home_pool": P1,
                    "prefix": "u",
                    "count": group_count,
                    "contacts_per_user": contacts,
                    "conferences_per_user": conferences,
                },
                {
                    "home_pool": P2,
                    "prefix": "v",
                    "count": group_count,
                    "contacts_per_user": contacts,
                },
            ],
        }
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def topology() -> Topology:
    return make_topology()


StoreFactory = Callable[..., UserStore]


@pytest.fixture
def open_store(tmp_path: Path, clock: FakeClock) -> Iterator[StoreFactory]:
    """Opens ``<tmp>/<pool>.db`` (again, if asked twice); closes all at teardown."""
    opened: list[UserStore] = []

    def factory(pool: str = P1, name: str | None = None) -> UserStore:
        store = UserStore(tmp_path / f"{name or pool}.db", pool, clock=clock)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()
