"""An Enterprise pool of three front ends in the test's event loop: each a
PoolService on its own loopback address over the pool's one state directory.
One front end lost: the others keep the pool (quorum any 2 of 3) and the
backup pool keeps hearing it. Two lost: the last one stops its SIP service,
the backup pool sees the pool down. One back: quorum again, SIP again."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from pool_harness import DOMAIN, LOOPBACK_NET, TOKEN, wait_for
from pydantic import SecretStr

from sipdrill.pool.service import PoolService, PoolSettings
from sipdrill.pool.state import PartnerState
from sipdrill.topology import Topology

P1 = "pool1.lab.local"
P2 = "pool2.lab.local"
DETECTION = 2.0


def enterprise() -> Topology:
    def pool(name: str, site: int, backup: str, n: int) -> dict[str, Any]:
        return {
            "fqdn": name,
            "site": f"site{site}",
            "edition": "Enterprise",
            "backup": backup,
            "front_ends": [
                {"fqdn": f"fe{k}.{name}", "address": f"172.30.{site}.{10 + k}"}
                for k in range(1, n + 1)
            ],
        }

    return Topology.model_validate(
        {
            "name": "fe-test",
            "domain": DOMAIN,
            "sites": [{"name": f"site{i}", "subnet": f"172.30.{i}.0/24"} for i in (1, 2)],
            "pools": [pool(P1, 1, P2, 3), pool(P2, 2, P1, 1)],
            "cms": {"active": P1},
            "dns": {"address": "172.30.0.53"},
            "lab": {"loopback_network": LOOPBACK_NET},
            "timers": {"failover_detection_interval": DETECTION, "failback_interval": 1.0},
            "users": [{"uri": "sip:alice@lab.local", "home_pool": P1}],
        }
    )


class FrontEnds:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.topology = enterprise()
        self.running: dict[str, PoolService] = {}

    async def start(self, pool: str, fe: str) -> PoolService:
        settings = PoolSettings(
            pool=pool,
            front_end=fe,
            state_dir=self.tmp / pool.split(".")[0],  # one per pool: its Back End
            ca_dir=self.tmp / "ca",
            loopback=True,
            token=SecretStr(TOKEN),
            housekeeping_interval=0.2,
            front_end_probe_interval=0.2,
            front_end_down_after=0.8,
        )
        svc = PoolService(self.topology, settings)
        await svc.start()
        self.running[f"{pool}/{fe}"] = svc
        return svc

    async def stop(self, key: str) -> None:
        await self.running.pop(key).close()


async def sip_accepts(svc: PoolService) -> bool:
    """Whether the front end's SIP over TLS port takes a connection."""
    host, port = svc.address, svc.pool.sip_tls_port
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def test_front_end_loss_keeps_the_pool_quorum_loss_stops_it(tmp_path: Path) -> None:
    lab = FrontEnds(tmp_path)
    try:
        fe1 = await lab.start(P1, "fe1")
        await lab.start(P1, "fe2")
        fe3 = await lab.start(P1, "fe3")
        backup = await lab.start(P2, "fe1")
        assert {fe1.address, fe3.address} == {
            str(lab.topology.loopback_address(lab.topology.pool(P1).front_ends[k].address))
            for k in (0, 2)
        }
        monitor = backup.monitor
        assert monitor is not None
        await wait_for(
            lambda: (
                fe3.quorum is not None
                and fe3.quorum.up(asyncio.get_running_loop().time()) == (0, 1, 2)
            ),
            within=5,
        )
        # One user store for the pool: a write through fe1 is read through fe3.
        await fe1.add_contact("sip:alice@lab.local", "sip:bob@lab.local")
        assert "sip:bob@lab.local" in fe3.store.contacts("sip:alice@lab.local")

        # fe2 lost: any 2 of 3 still up; the backup pool still hears pool1.
        await lab.stop(f"{P1}/fe2")
        await asyncio.sleep(DETECTION * 1.5)
        assert fe1.sip_running and fe3.sip_running
        assert await sip_accepts(fe3)
        assert monitor.state is PartnerState.UP
        assert (await fe3.status())["quorum"]["up"] == [0, 2]

        # fe1 lost too: fe3 alone is below quorum and stops its SIP service.
        await lab.stop(f"{P1}/fe1")
        took = await wait_for(lambda: not fe3.sip_running, within=5)
        assert took <= 0.8 + 0.2 * 3  # down_after, and a probe or two
        assert not await sip_accepts(fe3)
        await wait_for(lambda: monitor.state is PartnerState.DOWN, within=DETECTION * 3)
        assert fe3.metrics.quorum_stops._value.get() == 1  # type: ignore[attr-defined]

        # fe2 back: quorum (fe2, fe3), fe3 serves SIP again, the backup hears pool1.
        await lab.start(P1, "fe2")
        await wait_for(lambda: fe3.sip_running, within=5)
        assert await sip_accepts(fe3)
        await wait_for(lambda: monitor.state is not PartnerState.DOWN, within=DETECTION * 3)
    finally:
        for key in list(lab.running):
            await lab.stop(key)
