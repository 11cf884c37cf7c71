"""A two-pool lab on loopback for the pool's tests (no tests in here).

Pools run in the test's event loop (``PoolService``) on addresses of a
random 127.x.0.0/16 (the topology's ``lab.loopback_network``), so two test
runs on one machine do not collide. Timers are short: failover detection
3 s (1.5 s where a test takes a pool down and waits for the backup; shorter
sees false outages on 2 busy cores), failback 1 s, heartbeats every
detection / 4. Clients are
:class:`sipdrill.pool.sip_ua.UserAgent` s over TLS, verified against the
lab CA like real clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr
from sipmessage import Address, Response

from sipdrill.pool.service import PoolService, PoolSettings
from sipdrill.pool.sip_ua import UaStack, UserAgent
from sipdrill.sip.tls import client_context
from sipdrill.topology import Topology

P1 = "pool1.lab.local"
P2 = "pool2.lab.local"
#: A third pool, unpaired, in tests that ask for it (``third_pool=True``).
P3 = "pool3.lab.local"
TOKEN = "pool-test-token"
DOMAIN = "lab.local"
#: The detection interval of tests that wait for a backup to take over.
TAKEOVER = 1.5

ALICE = "sip:alice@lab.local"
BOB = "sip:bob@lab.local"
CAROL = "sip:carol@lab.local"
DAVE = "sip:dave@lab.local"
ERIN = "sip:erin@lab.local"


def _loopback_net() -> str:
    """One /16 per test process: 127.<n>.<site>.<host>, n random in 100-250 so
    that two checkouts rarely meet; pytest-xdist workers draw from disjoint
    slices of that range, so two workers of one run never do."""
    low, high = 100, 250
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        index = int(worker.removeprefix("gw"))
        width = (high - low + 1) // count
        low, high = low + index * width, low + (index + 1) * width - 1
    return f"127.{random.randint(low, high)}.0.0/16"


LOOPBACK_NET = _loopback_net()


def make_topology(
    *, detection: float = 1.5, failback: float = 1.0, third_pool: bool = False
) -> Topology:
    def pool(name: str, site: int, backup: str | None) -> dict[str, Any]:
        return {
            "fqdn": name,
            "site": f"site{site}",
            "edition": "Standard",
            "backup": backup,
            "front_ends": [{"fqdn": f"fe.{name}", "address": f"172.30.{site}.11"}],
        }

    sites = (1, 2, 3) if third_pool else (1, 2)

    return Topology.model_validate(
        {
            "name": "pool-test",
            "domain": DOMAIN,
            "sites": [{"name": f"site{i}", "subnet": f"172.30.{i}.0/24"} for i in sites],
            "pools": [pool(P1, 1, P2), pool(P2, 2, P1)]
            + ([pool(P3, 3, None)] if third_pool else []),
            "cms": {"active": P1},
            "dns": {"address": "172.30.0.53"},
            "lab": {"loopback_network": LOOPBACK_NET},
            "timers": {"failover_detection_interval": detection, "failback_interval": failback},
            "users": [
                {
                    "uri": ALICE,
                    "home_pool": P1,
                    "contacts": [BOB, CAROL],
                    "conferences": [{"id": "weekly", "subject": "Weekly sync"}],
                },
                {"uri": BOB, "home_pool": P1, "contacts": [ALICE]},
                {"uri": DAVE, "home_pool": P1, "contacts": [ALICE, BOB, CAROL]},
                {"uri": CAROL, "home_pool": P2, "contacts": [ALICE]},
                {"uri": ERIN, "home_pool": P2},
            ],
        }
    )


async def wait_for(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool], within: float, step: float = 0.05
) -> float:
    """Poll ``check`` until true; how long it took. Fails after ``within`` s."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return loop.time() - start
        if loop.time() - start > within:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(step)


def contacts_q(response: Response) -> list[tuple[str, float]]:
    out = []
    for value in response.headers.getlist("Contact"):
        for c in Address.parse_many(value):
            out.append((c.uri.host, float(c.parameters.get("q") or 1.0)))
    return out


class Lab:
    def __init__(self, tmp: Path, topology: Topology, **settings: Any) -> None:
        self.tmp = tmp
        self.topology = topology
        self.settings = {
            "nudge_grace": 1.0,
            "presence_refresh": 1.0,
            "housekeeping_interval": 0.2,
            "pending_retry_interval": 0.5,
            "forward_timeout": 3.0,
            **settings,
        }
        self.pools: dict[str, PoolService] = {}
        self.ca = tmp / "ca"
        self.stack: UaStack | None = None
        self.http = httpx.AsyncClient(
            timeout=10.0, headers={"Authorization": f"Bearer {TOKEN}"}
        )

    def pool_settings(self, fqdn: str) -> PoolSettings:
        return PoolSettings(
            pool=fqdn,
            state_dir=self.tmp / fqdn.split(".")[0],
            ca_dir=self.ca,
            loopback=True,
            token=SecretStr(TOKEN),
            **self.settings,
        )

    async def start(self, fqdn: str) -> PoolService:
        pool = PoolService(self.topology, self.pool_settings(fqdn))
        await pool.start()
        self.pools[fqdn] = pool
        return pool

    async def stop(self, fqdn: str) -> None:
        pool = self.pools.pop(fqdn)
        await pool.close()

    def url(self, fqdn: str, path: str) -> str:
        pool = self.topology.pool(fqdn)
        host = self.topology.loopback_address(pool.front_ends[0].address)
        return f"http://{host}:{pool.control_port}{path}"

    async def get(self, fqdn: str, path: str, **kw: Any) -> httpx.Response:
        return await self.http.get(self.url(fqdn, path), **kw)

    async def post(self, fqdn: str, path: str, **kw: Any) -> httpx.Response:
        return await self.http.post(self.url(fqdn, path), **kw)

    async def status(self, fqdn: str) -> dict[str, Any]:
        r = await self.get(fqdn, "/status")
        assert r.status_code == 200, r.text
        result: dict[str, Any] = r.json()
        return result

    def sip_target(self, fqdn: str) -> tuple[str, int]:
        pool = self.topology.pool(fqdn)
        host = self.topology.loopback_address(pool.front_ends[0].address)
        return str(host), pool.sip_tls_port

    async def agent(self, aor: str, fqdn: str, *, auto_nudge: bool = False) -> UserAgent:
        if self.stack is None:
            self.stack = UaStack(client_context(self.ca / "ca.pem"))
            await self.stack.__aenter__()
        ua = self.stack.agent(aor, auto_nudge=auto_nudge)
        host, port = self.sip_target(fqdn)
        await ua.connect(host, port, fqdn)
        return ua

    async def registered(self, aor: str, fqdn: str, **kw: Any) -> UserAgent:
        ua = await self.agent(aor, fqdn, **kw)
        r = await ua.register()
        assert r.code == 200, f"{aor} at {fqdn}: {r.code} {r.phrase}"
        return ua

    async def replicate(self, source: str, target: str) -> int:
        """What the Backup Service does: ship source's feed to target."""
        positions = (await self.get(target, "/replication/positions")).json()
        since = positions.get(source, 0)
        page = (await self.get(source, "/replication/changes", params={"since": since})).json()
        r = await self.post(
            target, "/replication/apply",
            json={"source_pool": source, "changes": page["changes"]},
        )
        assert r.status_code == 200, r.text
        applied: int = r.json()["applied"]
        return applied

    async def close(self) -> None:
        if self.stack is not None:
            await self.stack.__aexit__(None, None, None)
        for fqdn in list(self.pools):
            await self.stop(fqdn)
        await self.http.aclose()


@contextlib.asynccontextmanager
async def two_pools(tmp: Path, **settings: Any) -> AsyncIterator[Lab]:
    """Both pools started. ``detection`` (default 3 s) and ``failback``
    (1 s) set the topology's timers; tests that take a pool down pass
    ``detection=1.5`` (TAKEOVER); ``third_pool=True`` adds :data:`P3`
    (unpaired, not started). Everything else is a PoolSettings field."""
    topo_kw = {
        k: settings.pop(k) for k in ("detection", "failback", "third_pool") if k in settings
    }
    topo_kw.setdefault("detection", 3.0)
    lab = Lab(tmp, make_topology(**topo_kw), **settings)
    try:
        await lab.start(P1)
        await lab.start(P2)
        yield lab
    finally:
        await lab.close()
