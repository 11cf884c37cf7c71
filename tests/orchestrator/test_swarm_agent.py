"""The fault agent's lease and API without a Docker engine: faults healed
only once the lease has run out, the lease kept across a restart, a shorter
renewal shortening it, the token required (the docker test drives it for real)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from sipdrill.errors import FaultError
from sipdrill.orchestrator.fault_model import FaultKind
from sipdrill.orchestrator.faults import DockerFault
from sipdrill.orchestrator.swarm_agent import UNDONE_KEPT, AgentCore, FaultOrder, agent_app


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeRuntime:
    """What the agent needs of the engine when no fault touches it."""

    class client:
        class networks:
            @staticmethod
            def get(name: str) -> Any:
                raise docker.errors.NotFound(name)

    def lab_containers(self, lab: str) -> list[Any]:
        return []


class Recorded(DockerFault):
    kind = FaultKind.CUT
    undone = 0

    def _inject(self) -> None:
        pass

    def _undo(self) -> None:
        type(self).undone += 1


def _core(tmp_path: Path, clock: Clock) -> AgentCore:
    return AgentCore("lab", "node1", tmp_path, FakeRuntime(), routes=False, clock=clock)  # type: ignore[arg-type]


def test_faults_are_healed_when_the_lease_runs_out_and_not_before(tmp_path: Path) -> None:
    clock = Clock()
    core = _core(tmp_path, clock)
    core.renew(30)
    Recorded.undone = 0
    core.registry.inject(Recorded(core.runtime, ["c1"]))  # type: ignore[arg-type]
    clock.now += 29
    assert core.check_lease() == 0 and Recorded.undone == 0
    core.renew(30)  # the orchestrator is alive
    clock.now += 29
    assert core.check_lease() == 0
    clock.now += 2
    assert core.check_lease() == 1 and Recorded.undone == 1
    assert core.healed_by_lease == 1 and core.registry.active() == []
    assert core.check_lease() == 0  # nothing left to heal


def test_the_lease_survives_a_restart_and_a_shorter_renewal_shortens_it(tmp_path: Path) -> None:
    clock = Clock()
    core = _core(tmp_path, clock)
    core.renew(900)
    again = _core(tmp_path, clock)
    assert again.lease_left() == 900
    again.renew(3)
    assert again.lease_left() == 3


def test_the_api_wants_the_token_and_a_well_formed_id(tmp_path: Path) -> None:
    core = _core(tmp_path, Clock())

    async def main() -> None:
        transport = httpx.ASGITransport(app=agent_app(core, "secret"))
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as http:
            assert (await http.get("/health")).status_code == 200  # no token: health only
            assert (await http.get("/faults")).status_code == 401
            auth = {"Authorization": "Bearer secret"}
            assert (await http.get("/faults", headers=auth)).json()["faults"] == []
            body = {"kind": "cut", "services": ["pool1"]}
            r = await http.put("/faults/not-hex!", json=body, headers=auth)
            assert r.status_code == 422
            r = await http.put("/faults/0123abcd", json=body, headers=auth)
            assert r.status_code == 409  # no task of pool1 on this node
            assert "no running task of pool1 on node node1" in r.json()["message"]
            r = await http.post("/lease", json={"seconds": 5}, headers=auth)
            assert r.json()["lease_left"] == 5
            r = await http.delete("/faults/0123abcd", headers=auth)
            assert r.json() == {"healed": False}

    asyncio.run(main())


def test_an_order_read_after_its_undo_is_refused_as_stale(tmp_path: Path) -> None:
    """A paused agent still reads what was queued on its socket: the order the
    orchestrator gave up on, and the undo it sent after, in either order (two
    threads). The order must not take effect after its undo."""
    core = _core(tmp_path, Clock())
    body = {"kind": "cut", "services": ["pool1"]}

    async def main() -> None:
        transport = httpx.ASGITransport(app=agent_app(core, None))
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as http:
            assert (await http.delete("/faults/0123abcd")).json() == {"healed": False}
            r = await http.put("/faults/0123abcd", json=body)
            assert r.status_code == 409
            assert "undone before this order was read" in r.json()["message"]
            # Another id is not affected: it gets as far as looking for pool1.
            r = await http.put("/faults/0123abce", json=body)
            assert "no running task of pool1" in r.json()["message"]

    asyncio.run(main())
    assert core.registry.active() == []
    # The order first, then its undo: healed, and the order cannot come back.
    Recorded.undone = 0
    core.registry.inject(Recorded(core.runtime, ["c1"], fault_id="89abcdef"))  # type: ignore[arg-type]
    assert core.undo("89abcdef") and Recorded.undone == 1
    with pytest.raises(FaultError, match="stale"):
        core.apply("89abcdef", FaultOrder(kind=FaultKind.CUT, services=["c1"]))
    assert core.registry.active() == []


def test_an_agent_remembers_a_bounded_number_of_undone_ids(tmp_path: Path) -> None:
    core = _core(tmp_path, Clock())
    for n in range(UNDONE_KEPT + 10):
        core.undo(f"{n:08x}")
    assert len(core.undone) == UNDONE_KEPT
    assert f"{0:08x}" not in core.undone and f"{UNDONE_KEPT + 9:08x}" in core.undone


# --- across nodes: the overlays' gossip to routes ------------------------------

GOSSIP = {
    "Name": "lab_site2",
    "Services": {
        "lab_pool2": {
            "Tasks": [
                {"Name": "lab_pool2.1.abc", "EndpointIP": "10.9.2.200",
                 "Info": {"Host IP": "10.224.0.3"}},
            ]
        },
        "lab_clients": {
            "Tasks": [
                {"Name": "lab_clients.2.def", "EndpointIP": "10.9.2.201",
                 "Info": {"Host IP": "10.224.0.3"}},
                {"Name": "lab_clients.1.ghi", "EndpointIP": "10.9.2.202",
                 "Info": {"Host IP": "10.224.0.1"}},
            ]
        },
        # A container started by hand on the attachable overlay: not the lab's.
        "": {"Tasks": [{"Name": "probe", "EndpointIP": "10.9.2.203",
                        "Info": {"Host IP": "10.224.0.3"}}]},
    },
}  # fmt: skip


def test_the_gossip_gives_the_other_nodes_tasks_and_their_routes() -> None:
    from sipdrill.orchestrator.swarm_agent import (
        RemoteTask,
        parse_gossip,
        parse_plan,
        plan_routes,
        remote_host_routes,
        task_service,
    )

    assert task_service("lab", "lab_clients.3.x") == "clients-3"
    assert task_service("lab", "other_pool1.1.x") is None
    remote = parse_gossip("lab", GOSSIP, local=["lab_clients.1.ghi"])
    assert remote == [
        RemoteTask("pool2", "lab_site2", "10.9.2.200", "10.224.0.3"),
        RemoteTask("clients-2", "lab_site2", "10.9.2.201", "10.224.0.3"),
    ]
    plan = parse_plan("pool1=10.9.1.11, pool2=10.9.2.11,dns=10.9.0.53")
    assert plan["pool2"] == "10.9.2.11"
    import ipaddress

    subnets = {"lab_site2": ipaddress.IPv4Network("10.9.2.0/24")}
    # pool2's plan address via its Docker address on its home network.
    assert plan_routes(remote, plan, subnets) == {"10.9.2.11": ("lab_site2", "10.9.2.200")}
    # Not its home network: no route there (the address is not in that subnet).
    assert plan_routes(remote, plan, {"lab_site2": ipaddress.IPv4Network("10.9.3.0/24")}) == {}
    # The orchestrator's routes: by the task's node; a replica by its core address only.
    assert remote_host_routes("lab", remote, plan) == {"10.9.2.11": "10.224.0.3"}
    core = [RemoteTask("clients-2", "lab_core", "10.9.0.201", "10.224.0.3")]
    assert remote_host_routes("lab", core, plan) == {"10.9.0.201": "10.224.0.3"}
    with pytest.raises(ValueError):
        parse_plan("pool1=not-an-address")
