"""The swarm runtime on a real single-node swarm: ``docker swarm init`` here,
``docker swarm leave --force`` on every exit, and nothing left behind (stack,
networks, volumes, agents' routes). A site cut through the fault agent,
observed from a clients replica; the agents healing on their own when the
orchestrator stops renewing the lease; a fault on a node whose agent is gone;
the registrar-failover drill with ``--runtime swarm``.

Needs a Docker engine and the image (`make image`); skipped otherwise, unless
SIPDRILL_REQUIRE_DOCKER=1 (CI). A swarm this test did not start is used as it
is and left alone.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from docker_labkit import LAB_PREFIX, REQUIRED, docker_marks, lab_problem
from test_docker_lab import topology_on_free_subnets

from sipdrill.errors import FaultError
from sipdrill.orchestrator.compose import docker_plan
from sipdrill.orchestrator.fault_model import FaultJournal
from sipdrill.orchestrator.swarm_agent import ROUTE_PROTO
from sipdrill.orchestrator.swarm_lab import STACK_LABEL, SwarmLab
from sipdrill.orchestrator.swarm_stack import AGENT_SERVICE
from sipdrill.topology import load_topology

_PROBLEM = lab_problem(compose=False)
_REQUIRED = REQUIRED

pytestmark = docker_marks(_PROBLEM, slow=True)

#: The swarm's own networks (ingress) come from here, away from the labs'.
ADDR_POOL = "10.230.0.0/16"


def _networks(client: docker.DockerClient) -> set[str]:
    return {str(n.name) for n in client.networks.list()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def swarm() -> Iterator[docker.DockerClient]:
    """A single-node swarm for the module; left (and its networks removed)
    on every exit if this fixture started it."""
    if _PROBLEM:
        pytest.fail(f"SIPDRILL_REQUIRE_DOCKER=1 but {_PROBLEM}")
    client = docker.from_env(timeout=120)
    before = _networks(client)
    state = (client.info().get("Swarm") or {}).get("LocalNodeState")
    ours = state == "inactive"
    if ours:
        subprocess.run(
            ["docker", "swarm", "init", "--advertise-addr", "127.0.0.1",
             "--listen-addr", f"127.0.0.1:{_free_port()}", "--default-addr-pool", ADDR_POOL],
            check=True, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    elif not (client.info().get("Swarm") or {}).get("ControlAvailable"):
        pytest.skip(f"this engine is in a swarm ({state}) but not a manager")
    try:
        yield client
    finally:
        if ours:
            subprocess.run(["docker", "swarm", "leave", "--force"], capture_output=True,
                           timeout=60, check=False)  # fmt: skip
            for name in _networks(client) - before:  # docker_gwbridge, made for the swarm
                try:
                    client.networks.get(name).remove()
                except docker.errors.DockerException:
                    time.sleep(1)
                    client.networks.get(name).remove()
            assert _networks(client) == before, "the swarm left networks behind"
        client.close()


def _nothing_left(client: docker.DockerClient, lab: str, subnets: list[str]) -> None:
    assert not client.services.list(filters={"label": f"{STACK_LABEL}={lab}"})
    assert not client.networks.list(filters={"label": f"sipdrill.lab={lab}"})
    assert not client.volumes.list(filters={"label": f"sipdrill.lab={lab}"})
    assert not client.containers.list(all=True, filters={"label": f"sipdrill.lab={lab}"})
    routes = subprocess.run(["ip", "-o", "route", "show", "proto", str(ROUTE_PROTO)],
                            capture_output=True, text=True, check=False).stdout  # fmt: skip
    prefixes = [s.rsplit(".", 2)[0] + "." for s in subnets]
    assert not [r for r in routes.splitlines() if r.startswith(tuple(prefixes))], routes


@pytest.fixture(scope="module")
def lab(
    swarm: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[SwarmLab, list[str]]]:
    name = f"{LAB_PREFIX}sw-{secrets.token_hex(3)}"
    tmp = tmp_path_factory.mktemp("swarm-lab")
    text, _dns = topology_on_free_subnets(name)
    topology_file = tmp / "topology.yaml"
    topology_file.write_text(text)
    lines: list[str] = []
    runtime = SwarmLab(name, tmp / "state" / name, lines.append, topology_file=topology_file)
    specs = docker_plan(load_topology(topology_file).topology, clients=4, clients_processes=2)
    subnets: list[str] = []
    try:
        runtime.up(specs, timeout=90)
        subnets = json.loads(runtime.state_path.read_text())["subnets"]
        yield runtime, lines
    finally:
        runtime.down()
        _nothing_left(swarm, name, subnets)


def _clients_container(client: docker.DockerClient, lab: str) -> Any:
    found = client.containers.list(
        filters={"label": [f"sipdrill.lab={lab}", "sipdrill.service=clients"]}
    )
    assert found, "no clients replica running"
    return found[0]


def _reaches(client: docker.DockerClient, lab: SwarmLab, pool: str) -> bool:
    """From a clients replica (another service): a TCP connection to the
    pool's SIP over TLS at its plan address."""
    t = load_topology(lab.topology_file or Path()).topology
    p = t.pool(pool)
    host = str(p.front_ends[0].address)
    script = (
        "import socket; s = socket.socket(); s.settimeout(1.5)\n"
        f"try:\n    s.connect(({host!r}, {p.sip_tls_port})); print('ok')\n"
        "except OSError as e:\n    print(type(e).__name__)\n"
    )
    out = _clients_container(client, lab.lab).exec_run(["python3", "-c", script])
    return bytes(out.output).decode().strip() == "ok"


def _agent_health(lab: SwarmLab) -> dict[str, Any]:
    state = json.loads(lab.state_path.read_text())
    return dict(httpx.get(f"http://127.0.0.1:{state['agent_port']}/health", timeout=5).json())


def _until(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return bool(predicate())


def test_up_shows_nodes_services_placement_and_warns_of_unlabelled_sites(
    lab: tuple[SwarmLab, list[str]],
) -> None:
    runtime, lines = lab
    assert any("no node is labelled sipdrill.site=site1" in line for line in lines)
    assert any("healthy after" in line for line in lines)
    rows = {r["name"]: r for r in runtime.status()}
    assert {"dns", "pool1", "backup-pool1", "pool2", "backup-pool2", "clients-1", "clients-2",
            AGENT_SERVICE} <= set(rows)  # fmt: skip
    assert rows["pool1"]["health"] == "running" and rows["pool1"]["node"]
    assert rows["pool1"]["address"].endswith(".1.11")
    (node,) = runtime.nodes()
    assert "pool1" in node["tasks"] and node["site label"] == "-"
    # The control APIs answer from this host at the plan addresses.
    for spec in runtime.live_specs():
        r = httpx.get(f"{spec.control_url}/health", timeout=5)
        assert r.status_code == 200, spec.name


def test_a_site_cut_through_the_fault_agent_is_seen_from_another_service_and_healed(
    lab: tuple[SwarmLab, list[str]], swarm: docker.DockerClient
) -> None:
    runtime, _ = lab
    assert _reaches(swarm, runtime, "pool1.lab.local")
    fault = runtime.inject("cut", "site1")
    try:
        assert sorted(fault["containers"]) == ["backup-pool1", "pool1"]
        assert not _reaches(swarm, runtime, "pool1.lab.local")
        assert _reaches(swarm, runtime, "pool2.lab.local")
        assert [r["id"] for r in FaultJournal(runtime.journal).records()] == [fault["id"]]
        assert _agent_health(runtime)["faults"] == 1
        rows = {r["name"]: r for r in runtime.status()}
        assert f"cut {fault['id']}" in rows["pool1"]["health"]
        found = runtime.leftovers()  # the journal's entry, and the chains the agent sees
        assert any("still in the journal" in f for f in found)
        assert any(f"pool1: iptables chain sipdrill-{fault['id']}-in" in f for f in found), found
    finally:
        runtime.undo(fault["id"])
    assert _until(lambda: _reaches(swarm, runtime, "pool1.lab.local"), 10)
    assert FaultJournal(runtime.journal).records() == []
    assert _agent_health(runtime)["faults"] == 0
    assert runtime.leftovers() == []
    pool1 = swarm.containers.list(filters={"label": [f"sipdrill.lab={runtime.lab}",
                                                     "sipdrill.service=pool1"]})[0]  # fmt: skip
    out = bytes(pool1.exec_run(["sh", "-c", "iptables -S; tc qdisc show"]).output).decode()
    assert "sipdrill-" not in out and "5d1:" not in out


def test_the_agents_heal_by_themselves_when_the_lease_is_not_renewed(
    lab: tuple[SwarmLab, list[str]], swarm: docker.DockerClient
) -> None:
    runtime, _ = lab
    # An orchestrator with an 8 s lease that "crashes": it stops renewing.
    short = SwarmLab(runtime.lab, runtime.state_dir, lease=8.0)
    runtime.renewer.close()  # this process's other orchestrator must not renew it either
    healed_before = _agent_health(runtime)["healed_by_lease"]
    short.inject("cut", "site1")
    short.renewer.close()
    assert not _reaches(swarm, runtime, "pool1.lab.local")
    assert _until(lambda: _reaches(swarm, runtime, "pool1.lab.local"), 30), "not healed by lease"
    assert _agent_health(runtime)["healed_by_lease"] == healed_before + 1
    # The journal's entry is healed already: heal is a no-op that succeeds.
    runtime.heal_all()
    assert FaultJournal(runtime.journal).records() == []


def test_a_fault_on_a_node_whose_agent_is_gone_fails_clearly_and_heals_when_it_returns(
    lab: tuple[SwarmLab, list[str]], swarm: docker.DockerClient
) -> None:
    runtime, _ = lab
    impatient = SwarmLab(runtime.lab, runtime.state_dir, agent_wait=3.0)

    def agent() -> Any:
        return swarm.containers.list(filters={"label": [f"sipdrill.lab={runtime.lab}",
                                                        "sipdrill.role=agent"]})[0]  # fmt: skip

    undone_before = _agent_health(runtime)["undone"]
    paused = agent()
    paused.pause()
    try:
        with pytest.raises(FaultError, match="does not answer") as caught:
            impatient.inject("cut", "site1")
        assert "fault-agent" in str(caught.value)  # how to look at it
    finally:
        paused.unpause()
    assert FaultJournal(runtime.journal).records() == []  # nothing half-done stays
    # The unpaused agent reads the order and its undo, both queued on its
    # socket, and runs them on two threads in either order: the order may take
    # effect for a moment, never for longer than its undo.
    assert _until(lambda: _agent_health(runtime)["undone"] > undone_before, 15)
    assert not _until(lambda: _agent_health(runtime)["faults"] > 0, 2)
    assert _reaches(swarm, runtime, "pool1.lab.local")
    # A fault in force, then the agent dies: heal waits for Swarm's new agent,
    # which finds the fault in its journal and undoes it.
    fault = runtime.inject("cut", "site1")
    killed = agent()
    killed.kill()
    runtime.heal_all()
    assert agent().id != killed.id
    # (the replica's ARP entry for pool1 may need a second after the cut)
    assert _until(lambda: _reaches(swarm, runtime, "pool1.lab.local"), 10)
    assert FaultJournal(runtime.journal).records() == []
    assert fault["id"]


DRILL = """\
name: swarm-failover
topology: topology.yaml
runtime: swarm
timers:
  failover_detection_interval: 6
  failback_interval: 6
  keepalive_interval: 5
  keepalive_pong_timeout: 3
  sync_interval: 5
clients: {count: 10, processes: 2}
steps:
  - wait: {mode: full}
    timeout: 90
  - fault: {kind: cut, target: site1, id: cut}
  - wait: {mode: resiliency, users: "pool1.lab.local:*", pool: pool2.lab.local}
    timeout: 120
    measure: time_to_resiliency
  - wait: {mode: full, users: "pool2.lab.local:*", pool: pool2.lab.local}
    timeout: 10
  - heal: cut
  - wait: {mode: full, users: "pool1.lab.local:*", pool: pool1.lab.local}
    timeout: 120
    measure: time_to_failback
expect:
  time_to_resiliency: {max: 90}
"""


def test_the_registrar_failover_drill_passes_on_swarm(
    swarm: docker.DockerClient, tmp_path: Path
) -> None:
    name = f"{LAB_PREFIX}swdrill-{secrets.token_hex(3)}"
    (tmp_path / "topology.yaml").write_text(topology_on_free_subnets(name)[0])
    (tmp_path / "drill.yaml").write_text(DRILL)
    reports = tmp_path / "reports"
    proc = subprocess.run(
        [sys.executable, "-m", "sipdrill", "drill", "run", str(tmp_path / "drill.yaml"),
         "--state-dir", str(tmp_path / "state"), "--report-dir", str(reports)],
        capture_output=True, text=True, timeout=420, check=False,
    )  # fmt: skip
    _nothing_left(swarm, name, [])
    (report_dir,) = reports.iterdir()
    report = json.loads((report_dir / "report.json").read_text())
    assert proc.returncode == 0, (report.get("error"), proc.stderr[-3000:])
    assert report["status"] == "passed" and report["healed"] and report["runtime"] == "swarm"
    m = report["measurements"]
    # Events of both replicas reached the orchestrator, every client recovered.
    assert m["clients"] == 10 and m["events_lost"] == 0
    assert [f["affected"] > 0 and f["not_recovered"] == 0 for f in m["faults"]] == [True]
    print("swarm drill metrics:", json.dumps(report["metrics"]))
    assert 3 <= report["metrics"]["time_to_resiliency"] <= 90
