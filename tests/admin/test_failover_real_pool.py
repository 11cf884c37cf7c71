"""Integration: the Backup Service process adapter, pool failover / failback
and the CMS against the real pool (``PoolService``, the pool engineer's
two-pool harness on a random 127.x loopback network), over HTTP with the
control token.

Site loss drill, as seed 003 runs it: the CMS master's pool goes away, the
CMS fails over with --force, the pool fails over in disaster mode; the pool
comes back, is fenced and told, and the failback brings the backup's writes
home and counts what the failover lost.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pool_harness import ALICE, BOB, P1, P2, TOKEN, Lab, two_pools

from sipdrill.addresses import backup_listen_address
from sipdrill.admin.failover import pool_failback, pool_failover
from sipdrill.backup.api import run_backup_process
from sipdrill.backup.client import LabClients
from sipdrill.cms.operations import cms_failover, cms_status
from sipdrill.errors import OperationError
from sipdrill.pool.state import FailoverState

pytestmark = pytest.mark.slow


@contextlib.asynccontextmanager
async def backup_services(lab: Lab) -> AsyncIterator[None]:
    stop = asyncio.Event()
    ready: dict[str, Any] = {}
    tasks = [
        asyncio.create_task(
            run_backup_process(
                lab.topology, pool, lab.tmp / f"backup-{pool}",
                listen=backup_listen_address(lab.topology, pool, loopback=True),
                token=TOKEN, loopback=True, stop=stop,
                ready=lambda url, service, pool=pool: ready.__setitem__(pool, service),
            )
        )
        for pool in (P1, P2)
    ]
    try:
        for _ in range(600):
            if len(ready) == 2 or any(t.done() for t in tasks):
                break
            await asyncio.sleep(0.01)
        for t in tasks:
            if t.done():
                t.result()
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks)


def contacts(lab: Lab, pool: str, user: str) -> list[str]:
    # From the pool's store (in process), not GET /users: only the
    # replication contract is under test here.
    return lab.pools[pool].store.contacts(user)


async def states(clients: LabClients, pool: str) -> dict[str, FailoverState]:
    return await clients.pool(pool).failover_states()


async def test_normal_failover_and_failback_with_real_pools(tmp_path: Path) -> None:
    async with (
        two_pools(tmp_path) as lab,
        backup_services(lab),
        LabClients(lab.topology, token=TOKEN, loopback=True) as clients,
    ):
        p1 = clients.pool(P1)
        await p1.add_contact(ALICE, "sip:synced@example.com")
        result = await clients.backup(P1).sync()  # type: ignore[union-attr]
        assert result["outcome"] == "caught-up", result
        assert "sip:synced@example.com" in contacts(lab, P2, ALICE)
        seq = await p1.add_contact(ALICE, "sip:late@example.com")  # after the last sync

        report = await pool_failover(lab.topology, P1, False, clients)

        assert report.lost_writes == 0 and report.takeover_position == seq
        assert "sip:late@example.com" in contacts(lab, P2, ALICE)
        assert (await states(clients, P2))[P1] is FailoverState.FAILED_OVER
        assert (await p1.changes(0, 1)).read_only
        with pytest.raises(OperationError) as exc:
            await p1.add_contact(BOB, "sip:refused@example.com")
        assert exc.value.http_status == 409
        await clients.pool(P2).add_contact(ALICE, "sip:on-backup@example.com")
        status = await clients.backup(P1).status()  # type: ignore[union-attr]
        assert status["directions"][0]["export_state"] == "FinalState"

        back = await pool_failback(lab.topology, P1, False, clients)

        assert back.lost_writes == 0
        assert "sip:on-backup@example.com" in contacts(lab, P1, ALICE)
        assert (await states(clients, P1))[P1] is FailoverState.FAILED_BACK
        assert not (await p1.changes(0, 1)).read_only
        await p1.add_contact(ALICE, "sip:home-again@example.com")
        assert (await clients.backup(P1).sync())["outcome"] == "caught-up"  # type: ignore[union-attr]


async def test_site_loss_drill_with_real_pools(tmp_path: Path) -> None:
    async with (
        two_pools(tmp_path) as lab,
        backup_services(lab),
        LabClients(lab.topology, token=TOKEN, loopback=True) as clients,
    ):
        assert (await clients.backup(P1).sync())["outcome"] == "caught-up"  # type: ignore[union-attr]
        tail = [await clients.pool(P1).add_contact(BOB, f"sip:tail{i}@example.com")
                for i in range(3)]
        await lab.stop(P1)  # the site is lost, with the CMS master

        with pytest.raises(OperationError) as exc:
            await pool_failover(lab.topology, P1, True, clients)
        assert exc.value.code == "cms-unavailable"
        cms = await cms_failover(lab.topology, True, clients)
        assert cms.target == P2 and cms.lost_versions is None
        report = await pool_failover(lab.topology, P1, True, clients)
        assert report.lost_writes is None and report.takeover_position == min(tail) - 1
        assert not {f"sip:tail{i}@example.com" for i in range(3)} & set(
            contacts(lab, P2, BOB)
        )
        await clients.pool(P2).add_contact(BOB, "sip:on-backup@example.com")

        await lab.start(P1)  # back, writable, unaware of the failover
        held = await clients.backup(P1).sync()  # type: ignore[union-attr]
        assert held["outcome"] == "held"
        assert (await clients.pool(P1).changes(0, 1)).read_only  # fenced
        assert (await states(clients, P1))[P1] is FailoverState.FAILED_OVER  # told
        status = await cms_status(lab.topology, clients)
        assert status.active_master_fqdn == P2

        back = await pool_failback(lab.topology, P1, False, clients)

        assert back.failover_lost_writes == 3 and back.lost_writes == 0
        assert "sip:on-backup@example.com" in contacts(lab, P1, BOB)
        assert (await states(clients, P2))[P1] is FailoverState.FAILED_BACK
