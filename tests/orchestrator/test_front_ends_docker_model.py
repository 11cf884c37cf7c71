"""Enterprise pools with several front ends on the container runtimes, without
an engine: the Compose file for topologies/enterprise.yaml (a container per
front end at its own address, the pool's state shared on the lab volume), the
lab DNS server's records for it, the fault targets `pool1/fe2` and `pool1`
(resolved as the local runtime does, with the same messages), and the swarm
runtime's refusal."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sipdrill.errors import FaultError, OperationError
from sipdrill.orchestrator import docker_lab_faults, labels, swarm_lab
from sipdrill.orchestrator.compose import (
    CONTAINER_STATE,
    STATE_VOLUME,
    ComposeOptions,
    compose_model,
    docker_plan,
)
from sipdrill.orchestrator.fault_model import parse_fault_request
from sipdrill.orchestrator.faults import Crash, Cut, Pause
from sipdrill.orchestrator.local_runtime import LabState, LocalRuntime, ProcessRecord
from sipdrill.orchestrator.plan import Role, RuntimeKind, pool_targets
from sipdrill.orchestrator.swarm_stack import StackOptions, front_ends_issue, stack_model
from sipdrill.topology import Topology, load_topology

ROOT = Path(__file__).resolve().parents[2]
ENTERPRISE = ROOT / "topologies/enterprise.yaml"
FRONT_ENDS = [f"pool{p}-fe{k}" for p in (1, 2) for k in (1, 2, 3)]


@pytest.fixture(scope="module")
def topo() -> Topology:
    return load_topology(ENTERPRISE).topology


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_compose_runs_a_container_per_front_end_on_the_pools_shared_state(topo: Topology) -> None:
    model = compose_model(
        topo, docker_plan(topo, clients=4), ComposeOptions("ent", "./enterprise.yaml")
    )
    services = model["services"]
    fes = [n for n in services if n.startswith("pool")]
    assert fes == FRONT_ENDS
    for pool in topo.pools:
        short = pool.fqdn.split(".", 1)[0]
        for k, fe in enumerate(pool.front_ends, 1):
            svc = services[f"{short}-fe{k}"]
            cmd = svc["command"]
            assert cmd[:2] == ["serve", "pool"] and _option(cmd, "--pool") == pool.fqdn
            assert _option(cmd, "--front-end") == fe.fqdn
            # Its own container at its own plan address, on the pool's site.
            assert svc["container_name"] == f"ent-{short}-fe{k}"
            assert svc["networks"][pool.site] == {"ipv4_address": str(fe.address)}
            assert svc["labels"][labels.SERVICE] == f"{short}-fe{k}"
            # Its health check asks its own control API, not a sibling's.
            assert f'("{fe.address}", {pool.control_port})' in svc["healthcheck"]["test"][-1]
            # Every front end of the pool opens the same state directory (the
            # pool's store, its Back End) on the lab's one named volume.
            assert _option(cmd, "--state-dir") == f"{CONTAINER_STATE}/{short}"
            assert f"{STATE_VOLUME}:{CONTAINER_STATE}" in svc["volumes"]
            # The pool's first front end makes the store; the others start after it.
            deps = svc["depends_on"]
            if k == 1:
                assert set(deps) == {"dns"}
            else:
                assert deps[f"{short}-fe1"] == {"condition": "service_healthy"}
    assert STATE_VOLUME in model["volumes"]
    # Distinct host ports; the Backup Service waits for the pool's first front
    # end, the clients for every front end.
    ports = [services[n]["ports"][0] for n in services if n != "clients"]
    assert len(set(ports)) == len(ports)
    assert set(services["backup-pool1"]["depends_on"]) == {"pool1-fe1"}
    assert set(FRONT_ENDS) <= set(services["clients"]["depends_on"])


def test_the_lab_dns_server_resolves_the_pool_to_every_front_end_container(
    topo: Topology,
) -> None:
    specs = docker_plan(topo)
    dns = next(s for s in specs if s.role is Role.DNS)
    assert "--loopback" not in dns.args  # it serves the topology's own addresses
    records = topo.dns_records()  # what `serve dns` serves without --loopback
    for pool in topo.pools:
        a = [r.data for r in records if r.name == pool.fqdn and r.rtype == "A"]
        assert a == [str(fe.address) for fe in pool.front_ends]
        containers = {s.address for s in specs if s.role is Role.POOL and s.pool == pool.fqdn}
        assert containers == set(a)


def _engine(lab: str, services: list[str]) -> Any:
    containers = [
        SimpleNamespace(name=f"{lab}-{s}", labels={labels.SERVICE: s}) for s in services
    ]
    return SimpleNamespace(lab_containers=lambda _lab: containers)


def _docker_faults(topo: Topology) -> tuple[docker_lab_faults.DockerLabFaults, Any]:
    specs = docker_plan(topo)
    faults = docker_lab_faults.DockerLabFaults("ent", Path("/nonexistent"), lambda: specs, print)
    engine = _engine("ent", [s.name for s in specs])
    return faults, engine


@pytest.mark.parametrize(
    ("kind", "target", "cls", "containers"),
    [
        ("cut", "pool1/fe2", Cut, ["ent-pool1-fe2"]),
        ("pause", "pool2/fe3", Pause, ["ent-pool2-fe3"]),
        ("cut", "pool1", Cut, ["ent-pool1-fe1", "ent-pool1-fe2", "ent-pool1-fe3"]),
        ("crash", "pool2", Crash, ["ent-pool2-fe1", "ent-pool2-fe2", "ent-pool2-fe3"]),
        ("cut", "pool1-fe3", Cut, ["ent-pool1-fe3"]),  # the service name still works
    ],
)
def test_docker_fault_targets_name_a_front_end_or_the_pool(
    topo: Topology, kind: str, target: str, cls: type, containers: list[str]
) -> None:
    faults, engine = _docker_faults(topo)
    request = parse_fault_request(kind, target, {}, RuntimeKind.DOCKER)
    fault = faults._make(engine, request)
    assert type(fault) is cls and fault.containers == containers


def test_docker_and_local_resolve_pool_targets_alike_with_the_same_messages(
    topo: Topology, tmp_path: Path
) -> None:
    faults, engine = _docker_faults(topo)
    local_specs = docker_plan(topo)  # the same plan; the local runtime keeps it as dicts
    state = LabState("ent", "local", "t", {s.name: ProcessRecord(asdict(s)) for s in local_specs})
    local = LocalRuntime("ent", tmp_path)

    def docker(kind: str, target: str) -> list[str]:
        request = parse_fault_request(kind, target, {}, RuntimeKind.DOCKER)
        return [c.removeprefix("ent-") for c in faults._make(engine, request).containers]

    def on_local(kind: str, target: str) -> list[str]:
        return local._targets(state, parse_fault_request(kind, target, {}, RuntimeKind.LOCAL))

    for target, services in pool_targets(local_specs).items():
        for kind in ("cut", "crash"):
            assert docker(kind, target) == on_local(kind, target) == services
    # Kinds other than cut and crash take one front end: both refuse the pool, alike.
    messages = []
    for runtime, call in (("docker", docker), ("local", on_local)):
        with pytest.raises(FaultError) as info:
            call("restart", "pool1")
        assert info.value.runtime == runtime
        messages.append(info.value.message)
    assert messages[0] == messages[1] == (
        "pool1 is a pool of 3 front ends: restart takes one "
        "(pool1/fe1, pool1/fe2, pool1/fe3), or use cut or crash on the pool"
    )
    with pytest.raises(FaultError, match=r"unknown target 'pool1/fe9'.*pools and front ends: "
                       r"pool1, pool1/fe1, pool1/fe2, pool1/fe3, pool2"):
        docker("cut", "pool1/fe9")


def test_swarm_refuses_a_pool_of_several_front_ends_before_deploying(
    topo: Topology, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    issue = front_ends_issue(topo, ENTERPRISE)
    assert issue is not None
    assert (issue.file, issue.line, issue.field) == (str(ENTERPRISE), 24, "pools[0].front_ends")
    assert "pool1.lab.local has 3 front ends" in issue.message
    assert "--runtime docker" in issue.fix
    paired = load_topology(ROOT / "topologies/paired-pools.yaml").topology
    assert front_ends_issue(paired, ROOT / "topologies/paired-pools.yaml") is None

    def no_engine() -> Any:
        raise AssertionError("the swarm runtime reached the engine")

    monkeypatch.setattr(swarm_lab, "swarm_engine", no_engine)
    lab = swarm_lab.SwarmLab("ent", tmp_path / "ent", topology_file=ENTERPRISE)
    with pytest.raises(OperationError) as info:
        lab.up(docker_plan(topo))
    assert info.value.code == "swarm-front-ends"
    assert f"{ENTERPRISE}:24: error: pools[0].front_ends" in info.value.message
    assert not (tmp_path / "ent").exists()  # nothing written, nothing deployed
    options = StackOptions(lab="ent", topology_file=str(ENTERPRISE), ca_cert="c", ca_key="k")
    with pytest.raises(OperationError, match="swarm runtime runs one front end per pool"):
        stack_model(topo, docker_plan(topo), options)


def test_a_swarm_drill_of_several_front_ends_exits_2_with_the_file_line_and_fix(
    tmp_path: Path,
) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "sipdrill", "drill", "run",
         str(ROOT / "scenarios/front-end-loss.yaml"), "--runtime", "swarm",
         "--state-dir", str(tmp_path / "state"), "--report-dir", str(tmp_path / "reports")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stderr
    assert "enterprise.yaml:24: error: pools[0].front_ends: pool pool1.lab.local" in err
    assert err.count("error:") == 1 and "(fix: run this topology with --runtime docker" in err
    assert not (tmp_path / "reports").exists() and not (tmp_path / "state").exists()
