"""`sipdrill serve pool` as a process: start, acknowledged writes survive a
SIGKILL, a clean stop on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import yaml
from pool_harness import CAROL, P2, TOKEN, make_topology, wait_for


@contextlib.asynccontextmanager
async def pool_process(
    topo: Path, state: Path, ca: Path, log: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sipdrill", "serve", "pool", "--topology", str(topo),
            "--loopback", "--pool", P2, "--state-dir", str(state), "--ca", str(ca),
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
            env={**os.environ, "SIPDRILL_CONTROL_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"},
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def test_acknowledged_writes_survive_a_kill(tmp_path: Path) -> None:
    topology = make_topology()
    topo = tmp_path / "topology.yaml"
    topo.write_text(yaml.safe_dump(json.loads(topology.model_dump_json())))
    pool = topology.pool(P2)
    base = f"http://{topology.loopback_address(pool.front_ends[0].address)}:{pool.control_port}"
    state, ca, log = tmp_path / "pool2", tmp_path / "ca", tmp_path / "pool2.log"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=5.0) as http:

        async def healthy() -> bool:
            try:
                return (await http.get("/health")).status_code == 200
            except httpx.HTTPError:
                return False

        acked: list[str] = []
        async with pool_process(topo, state, ca, log) as proc:
            await wait_for(healthy, 30, step=0.1)
            for i in range(20):
                contact = f"sip:c{i}@lab.local"
                r = await http.post(f"/users/{CAROL}/contacts", json={"contact": contact})
                assert r.status_code == 200, r.text
                acked.append(contact)
            r = await http.post("/failover/state",
                                json={"home_pool": P2, "event": "failover_started"})
            assert r.status_code == 200, r.text
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        async with pool_process(topo, state, ca, log) as proc:
            await wait_for(healthy, 30, step=0.1)
            data = (await http.get(f"/users/{CAROL}")).json()
            assert data["contacts"][-20:] == acked
            # Seeding again on restart did not overwrite what was written.
            assert data["contacts"][0] == "sip:alice@lab.local"
            state_doc = (await http.get("/failover/state")).json()
            assert state_doc["states"][P2] == "FailingOver"
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 10) == 0
    text = log.read_text()
    assert f"sipdrill pool {P2}: sip tls:" in text


async def test_a_frozen_partner_is_detected_by_heartbeats(tmp_path: Path) -> None:
    """The local runtime's `cut`: SIGSTOP. Connections to the frozen pool
    are accepted by the kernel and then nothing happens; the heartbeats
    must notice all the same, and notice its return."""
    from pool_harness import P1, Lab

    from sipdrill.pool.service import PoolService

    topology = make_topology()
    topo = tmp_path / "topology.yaml"
    topo.write_text(yaml.safe_dump(json.loads(topology.model_dump_json())))
    lab = Lab(tmp_path, topology)
    try:
        p1: PoolService = await lab.start(P1)
        async with pool_process(topo, tmp_path / "pool2", tmp_path / "ca",
                                tmp_path / "pool2.log") as proc:

            async def partner(state: str) -> bool:
                return (await lab.status(P1))["partner"]["state"] == state

            await wait_for(lambda: p1.sip.heartbeats["answered"] > 0, 30)
            proc.send_signal(signal.SIGSTOP)
            try:
                took = await wait_for(lambda: partner("down"), 10)
                assert took <= 4.0, took
            finally:
                proc.send_signal(signal.SIGCONT)
            await wait_for(lambda: partner("up"), 10)
            assert p1.sip.heartbeats["failed"] > 0
    finally:
        await lab.close()
