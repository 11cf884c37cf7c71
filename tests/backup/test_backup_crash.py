"""A Backup Service process killed at random points (SIGKILL mid-sync, or
SIGTERM) and restarted, while its pool keeps taking writes, never corrupts or
duplicates data: once it has caught up, the partner holds exactly the
source's data, every change applied once.

The two pools are fake pools served with uvicorn on 127.0.0.1 in the test's
event loop; the Backup Service is ``sipdrill serve backup`` in a child
process (through its typer command), pointed at them with ``--pool-url``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
import yaml
from fake_pool import FakePool, serve
from labkit import P1, P2, P3, FakeClock, make_topology
from procutil import free_port

from sipdrill.pool.store import UserStore

pytestmark = pytest.mark.slow

_SERVE = (
    "import typer; from sipdrill.backup.cli import serve_backup; typer.run(serve_backup)"
)


class Lab:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.topology = make_topology(group_count=300, contacts=6, conferences=1)
        data = self.topology.model_dump(mode="json")
        data["timers"]["sync_interval"] = 5.0  # the minimum
        self.topology_file = root / "lab.yaml"
        self.topology_file.write_text(yaml.safe_dump(data))
        clock = FakeClock()
        self.pools = {
            p: FakePool(self.topology, UserStore(root / f"{p}.db", p, clock=clock), root / p)
            for p in (P1, P2, P3)
        }
        self.urls: dict[str, str] = {}
        self.port = free_port()
        self.state_dir = root / "backup-state"

    def args(self) -> list[str]:
        out = [
            "--topology",
            str(self.topology_file),
            "--pool",
            P1,
            "--state-dir",
            str(self.state_dir),
            "--control",
            f"127.0.0.1:{self.port}",
            "--page-size",
            "25",
            "--log-level",
            "warning",
        ]
        for fqdn, url in self.urls.items():
            out += ["--pool-url", f"{fqdn}={url}"]
        return out

    async def start(self) -> asyncio.subprocess.Process:
        log = os.open(self.root / "backup.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:  # the child keeps its own copy of the descriptor
            return await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _SERVE,
                *self.args(),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
            )
        finally:
            os.close(log)

    async def ready(self, proc: asyncio.subprocess.Process) -> None:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=2) as h:
            for _ in range(600):
                assert proc.returncode is None, (self.root / "backup.log").read_text()
                try:
                    await h.get("/health")
                    return
                except httpx.HTTPError:
                    await asyncio.sleep(0.05)
        raise AssertionError("the Backup Service did not start")


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    lab = Lab(tmp_path)
    lab.pools[P1].store.seed_from_topology(lab.topology)
    async with AsyncExitStack() as stack:
        for fqdn, pool in lab.pools.items():
            lab.urls[fqdn] = await stack.enter_async_context(serve(pool.app))
        yield lab
    for pool in lab.pools.values():
        pool.store.close()


async def _poke(port: int, stop: asyncio.Event) -> None:
    """Ask for syncs while the service lives, so kills land mid-cycle."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
        while not stop.is_set():
            try:
                await http.post("/sync", json={})
            except httpx.HTTPError:
                await asyncio.sleep(0.02)


async def _writer(store: UserStore, stop: asyncio.Event, tag: str) -> int:
    users = [u.uri for u in store.users(home_pool=P1)]
    n = 0
    while not stop.is_set():
        store.add_contact(users[n % len(users)], f"sip:{tag}-{n}@example.com")
        n += 1
        await asyncio.sleep(0.005)
    return n


async def test_kills_at_random_points_never_corrupt_or_duplicate(lab: Lab) -> None:
    rng = random.Random(os.urandom(8))
    s1, s2 = lab.pools[P1].store, lab.pools[P2].store
    kills = 0
    users = [u.uri for u in s1.users(home_pool=P1)]
    for run in range(5):
        graceful = run == 2
        with s1.batch():  # a backlog for this run to ship
            for i in range(400):
                s1.add_contact(users[i % len(users)], f"sip:burst{run}-{i}@example.com")
        proc = await lab.start()
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(_poke(lab.port, stop)),
            asyncio.create_task(_writer(s1, stop, f"r{run}")),
        ]
        try:
            # The first kill lands while the child starts, the others
            # (most likely) mid-sync.
            if run > 0:
                await lab.ready(proc)
            await asyncio.sleep(rng.uniform(0.0, 0.6) if run > 0 else rng.uniform(0.2, 1.0))
        finally:
            proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
            code = await asyncio.wait_for(proc.wait(), 30)
            stop.set()
            await asyncio.gather(*tasks)
        assert code == (0 if graceful else -signal.SIGKILL), (lab.root / "backup.log").read_text()
        kills += not graceful
        # Whatever the kill interrupted, the partner is consistent: a prefix
        # of the feed, applied once.
        position = s2.last_applied(P1)
        assert lab.pools[P2].applied.get(P1, 0) == position
    assert position > 0, "the service never got to sync"

    # A last run catches up and stops cleanly.
    proc = await lab.start()
    await lab.ready(proc)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{lab.port}", timeout=30) as http:
            for _ in range(200):
                try:
                    result = (await http.post("/sync", json={})).json()
                except httpx.HTTPError:
                    await asyncio.sleep(0.05)
                    continue
                if result["position"] == s1.high_water_mark():
                    break
            status = (await http.get("/status")).json()["directions"][0]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0

    assert status["export_state"] == "SteadyState" and status["backlog"] == 0
    assert s2.last_applied(P1) == s1.high_water_mark()
    assert lab.pools[P2].applied[P1] == s1.high_water_mark()  # each change exactly once
    assert s2.snapshot() == s1.snapshot()
    record = json.loads(next(lab.state_dir.glob("direction-*.json")).read_text())
    assert record["position"] == s1.high_water_mark()
    assert kills == 4
