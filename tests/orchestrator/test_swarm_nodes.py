"""The swarm runtime on two nodes: this engine (the manager, labelled
sipdrill.site=site1) and a Docker-in-Docker worker labelled site2
(:mod:`swarm_nodes`). The registrar-failover drill runs across them (pool1's
users on both nodes fail over to pool2 on the worker); a site cut applied by
the worker's agent is seen from a clients replica on the manager and healed;
the worker's agent heals by itself when the lease is not renewed; ``sipdrill
lab status`` shows both nodes and what runs on each. Every exit leaves
nothing: stack, workers, the swarm, networks.

Needs the lab image and the node image (scripts/build-node-image.sh); skipped
without the node image (unless SIPDRILL_BUILD_NODE_IMAGE=1: built first, a few
minutes) and when this engine is in a swarm already.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from docker_labkit import IMAGE, LAB_PREFIX, REPO, docker_problem
from swarm_nodes import SwarmNodes, node_image_problem
from test_docker_lab import topology_on_free_subnets

from sipdrill.orchestrator.fault_model import FaultJournal
from sipdrill.orchestrator.swarm_agent import ROUTE_PROTO
from sipdrill.orchestrator.swarm_lab import STACK_LABEL, SwarmLab
from sipdrill.topology import load_topology


def _problem() -> str | None:
    problem = docker_problem()
    if problem:
        return problem
    client = docker.from_env()
    try:
        if node_image_problem(client) and os.environ.get("SIPDRILL_BUILD_NODE_IMAGE") == "1":
            subprocess.run(["bash", str(REPO / "scripts/build-node-image.sh")], check=True)
        return node_image_problem(client)
    finally:
        client.close()


_PROBLEM = _problem()

pytestmark = [
    pytest.mark.docker,
    pytest.mark.slow,
    pytest.mark.skipif(bool(_PROBLEM), reason=f"two-node swarm: {_PROBLEM}"),
]

DRILL = """\
name: swarm-two-nodes
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
    timeout: 90
    measure: time_to_resiliency
  - heal: cut
  - wait: {mode: full, users: "pool1.lab.local:*", pool: pool1.lab.local}
    timeout: 90
    measure: time_to_failback
expect:
  time_to_resiliency: {max: 60}
"""


@pytest.fixture(scope="module")
def nodes() -> Iterator[SwarmNodes]:
    client = docker.from_env(timeout=120)
    state = (client.info().get("Swarm") or {}).get("LocalNodeState")
    if state != "inactive":
        pytest.skip(f"this engine is in a swarm already ({state}): a test adds no node to it")
    try:
        with SwarmNodes(client, IMAGE, sites=["site2"], manager_site="site1") as n:
            print("two-node swarm up:", {k: round(v, 1) for k, v in n.timings.items()})
            yield n
    finally:
        client.close()


@pytest.fixture(scope="module")
def lab(
    nodes: SwarmNodes, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[SwarmLab, dict[str, Any]]]:
    """The drill's lab, kept up after the drill (``--keep``) for the tests after it."""
    tmp = tmp_path_factory.mktemp("two-nodes")
    name = f"{LAB_PREFIX}sw2-{secrets.token_hex(3)}"
    (tmp / "topology.yaml").write_text(topology_on_free_subnets(name)[0])
    (tmp / "drill.yaml").write_text(DRILL)
    state = tmp / "state"
    runtime = SwarmLab(name, state / name, topology_file=state / name / "topology.yaml")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "sipdrill", "drill", "run", str(tmp / "drill.yaml"), "--keep",
             "--state-dir", str(state), "--report-dir", str(tmp / "reports")],
            capture_output=True, text=True, timeout=400, check=False,
        )  # fmt: skip
        (report_dir,) = (tmp / "reports").iterdir()
        report = json.loads((report_dir / "report.json").read_text())
        report["_stderr"] = proc.stderr[-4000:]
        yield runtime, report
    finally:
        runtime.down()
        client = nodes.client
        assert not client.services.list(filters={"label": f"{STACK_LABEL}={name}"})
        assert not client.networks.list(filters={"label": f"sipdrill.lab={name}"})
        assert not client.containers.list(all=True, filters={"label": f"sipdrill.lab={name}"})
        routes = subprocess.run(["ip", "-o", "route", "show", "proto", str(ROUTE_PROTO)],
                                capture_output=True, text=True, check=False).stdout  # fmt: skip
        assert routes.strip() == "", routes


def _replica(nodes: SwarmNodes, lab: SwarmLab, on_worker: bool) -> tuple[str | None, str]:
    """A running clients replica's container on the manager (None) or the worker."""
    argv = ["ps", "-q", "--filter", f"label=sipdrill.lab={lab.lab}",
            "--filter", "label=sipdrill.service=clients"]  # fmt: skip
    node = nodes.workers[0] if on_worker else None
    out = nodes.exec(node, *argv) if node else subprocess.check_output(["docker", *argv], text=True)
    ids = out.split()
    assert ids, f"no clients replica on the {'worker' if on_worker else 'manager'}"
    return node, ids[0]


def _reaches(nodes: SwarmNodes, lab: SwarmLab, pool: str, *, from_worker: bool) -> bool:
    """A TCP connection to the pool's SIP over TLS at its plan address, from
    a clients replica on the manager or on the worker."""
    p = load_topology(lab.topology_file or Path()).topology.pool(pool)
    host = str(p.front_ends[0].address)
    script = (
        "import socket; s = socket.socket(); s.settimeout(1.5)\n"
        f"try:\n    s.connect(({host!r}, {p.sip_tls_port})); print('ok')\n"
        "except OSError as e:\n    print(type(e).__name__)\n"
    )
    node, cid = _replica(nodes, lab, from_worker)
    argv = ["exec", cid, "python3", "-c", script]
    try:
        out = (
            nodes.exec(node, *argv)
            if node
            else subprocess.check_output(["docker", *argv], text=True)
        )
    except (RuntimeError, subprocess.CalledProcessError):
        return False
    return out.strip() == "ok"


def _until(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return bool(predicate())


def test_registrar_failover_across_two_nodes(
    nodes: SwarmNodes, lab: tuple[SwarmLab, dict[str, Any]]
) -> None:
    runtime, report = lab
    assert report["status"] == "passed", (report.get("error"), report["_stderr"])
    m = report["measurements"]
    assert m["clients"] == 10 and m["events_lost"] == 0
    assert [f["affected"] > 0 and f["not_recovered"] == 0 for f in m["faults"]] == [True]
    print("two-node drill metrics:", json.dumps(report["metrics"]))
    # Placement: site1 on the manager, site2 on the worker, a clients replica
    # on each (so pool1's users on the manager failed over to pool2 on the worker).
    worker = nodes.workers[0]
    rows = {r["name"]: r for r in runtime.status()}
    assert rows["pool2"]["node"] == rows["backup-pool2"]["node"] == worker
    assert rows["pool1"]["node"] != worker
    assert {rows["clients-1"]["node"], rows["clients-2"]["node"]} == {worker, rows["pool1"]["node"]}
    by_node = {n["node"]: n for n in runtime.nodes()}
    assert by_node[worker]["site label"] == "site2" and "pool2" in by_node[worker]["tasks"]
    # The CLI shows both nodes and what runs on each.
    out = subprocess.run(
        [sys.executable, "-m", "sipdrill", "lab", "status", runtime.lab, "--runtime", "swarm",
         "--state-dir", str(runtime.state_dir.parent)],
        capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout  # fmt: skip
    assert worker in out and rows["pool1"]["node"] in out and "site2" in out, out


def test_a_cut_of_the_workers_site_is_seen_from_the_manager_and_healed(
    nodes: SwarmNodes, lab: tuple[SwarmLab, dict[str, Any]]
) -> None:
    runtime, _ = lab
    # Both ways across nodes, at the plan addresses (the agents' routes).
    assert _reaches(nodes, runtime, "pool2.lab.local", from_worker=False)
    assert _reaches(nodes, runtime, "pool1.lab.local", from_worker=True)
    fault = runtime.inject("cut", "site2")  # by the worker's agent
    try:
        (record,) = FaultJournal(runtime.journal).records()
        worker = next(
            n.id
            for n in nodes.client.nodes.list()
            if n.attrs["Description"]["Hostname"] == nodes.workers[0]
        )
        assert list(record["state"]["nodes"]) == [worker], record  # the worker's agent only
        assert not _reaches(nodes, runtime, "pool2.lab.local", from_worker=False)
        assert _reaches(nodes, runtime, "pool1.lab.local", from_worker=False)
    finally:
        runtime.undo(fault["id"])
    assert _until(lambda: _reaches(nodes, runtime, "pool2.lab.local", from_worker=False), 10)
    assert runtime.leftovers() == []


def test_the_workers_agent_heals_when_the_lease_is_not_renewed(
    nodes: SwarmNodes, lab: tuple[SwarmLab, dict[str, Any]]
) -> None:
    runtime, _ = lab
    short = SwarmLab(runtime.lab, runtime.state_dir, lease=10.0)
    short.inject("cut", "site2")
    short.renewer.close()  # the orchestrator "crashes"
    assert not _reaches(nodes, runtime, "pool2.lab.local", from_worker=False)
    started = time.monotonic()
    assert _until(lambda: _reaches(nodes, runtime, "pool2.lab.local", from_worker=False), 30)
    print(f"healed by the worker's agent {time.monotonic() - started:.1f} s after the cut")
    runtime.heal_all()  # the journal's entry: healed already, a no-op
    assert FaultJournal(runtime.journal).records() == []
