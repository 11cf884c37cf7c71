"""The swarm stack file made from a topology's lab plan (through the Compose
generator), without a Docker engine: what Swarm does differently is there,
and the fault model knows what the swarm runtime can do."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from sipdrill.errors import FaultError
from sipdrill.orchestrator.compose import CONTAINER_TOPOLOGY, STATE_VOLUME, docker_plan, render
from sipdrill.orchestrator.fault_model import FaultKind, parse_fault_request
from sipdrill.orchestrator.plan import RuntimeKind
from sipdrill.orchestrator.swarm_lab import _peer_id
from sipdrill.orchestrator.swarm_stack import (
    ADDRESS_LABEL,
    AGENT_SERVICE,
    SITE_LABEL,
    SWARM_ENTRYPOINT,
    StackOptions,
    overlay_networks,
    placement_warnings,
    stack_model,
)
from sipdrill.topology import load_topology

ROOT = Path(__file__).resolve().parents[2]
TOPOLOGY = ROOT / "topologies/paired-pools.yaml"


def _model(placed: frozenset[str] = frozenset(), clients: int = 30, replicas: int = 3) -> Any:
    topology = load_topology(TOPOLOGY).topology
    specs = docker_plan(topology, clients=clients, clients_processes=replicas)
    options = StackOptions(
        lab="pp", topology_file="/x/topology.yaml", ca_cert="/x/ca.pem", ca_key="/x/ca-key.pem",
        placed=placed, agent_port=18777,
    )  # fmt: skip
    return stack_model(topology, specs, options)


def test_networks_are_the_runtimes_overlays_with_the_plan_kept_out_of_the_dynamic_range() -> None:
    topology = load_topology(TOPOLOGY).topology
    overlays = {o.network: o for o in overlay_networks(topology, "pp")}
    assert set(overlays) == {"core", "site1", "site2"}
    assert overlays["site1"].name == "pp_site1"
    assert str(overlays["site1"].ip_range) == "172.30.1.192/26"
    model = _model()
    assert model["networks"]["site1"] == {"external": True, "name": "pp_site1"}
    assert model["networks"]["hostnet"] == {"external": True, "name": "host"}
    # Every plan address is below the range Swarm hands out.
    for name, svc in model["services"].items():
        addr = svc["environment"].get("SIPDRILL_PLAN_ADDRESS")
        if addr:
            subnet = ipaddress.ip_network(svc["environment"]["SIPDRILL_PLAN_SUBNET"])
            assert ipaddress.ip_address(addr) in subnet
            assert ipaddress.ip_address(addr) not in ipaddress.ip_network(
                str(next(o.ip_range for o in overlays.values() if o.subnet == subnet))
            ), name


def test_each_task_claims_its_plan_address_and_nothing_swarm_ignores_is_left() -> None:
    services = _model()["services"]
    pool1 = services["pool1"]
    for key in ("container_name", "depends_on", "ports", "scale"):
        assert key not in pool1
    assert pool1["environment"]["SIPDRILL_PLAN_ADDRESS"] == "172.30.1.11"
    assert pool1["environment"]["SIPDRILL_PLAN_SUBNET"] == "172.30.1.0/24"
    assert pool1["labels"][ADDRESS_LABEL] == "172.30.1.11"
    assert pool1["entrypoint"] == ["sh", "-c", SWARM_ENTRYPOINT, "sipdrill"]
    assert pool1["networks"] == ["core", "site1", "site2"]  # a leg on every network
    assert pool1["cap_add"] == ["NET_ADMIN"]
    # Root for the address and the CA, then the image's user with no capability.
    assert pool1["user"] == "root"
    assert SWARM_ENTRYPOINT.rstrip().splitlines()[-1].startswith("exec setpriv --reuid=sipdrill")
    assert pool1["deploy"]["endpoint_mode"] == "dnsrr"
    # Swarm replaces an unhealthy task: two minutes of failed checks first.
    check = pool1["healthcheck"]
    assert check["retries"] * int(check["interval"].rstrip("s")) >= 120
    # ... checked every 5 s: each check is a Python process (34 tasks at 2 s
    # were 17 a second, most of a core on a 2-core node).
    assert check["interval"] == "5s"
    assert pool1["deploy"]["restart_policy"]["condition"] == "any"
    # The topology as a config, the CA as secrets; the state volume per node.
    assert pool1["configs"][0]["target"] == CONTAINER_TOPOLOGY
    assert {s["target"] for s in pool1["secrets"]} == {"sipdrill-ca.pem", "sipdrill-ca-key.pem"}
    assert all(not v.endswith(":ro") for v in pool1["volumes"])
    assert any(v.startswith(f"{STATE_VOLUME}:") for v in pool1["volumes"])
    assert pool1["command"][:2] == ["serve", "pool"]
    # `$` doubled for the stack's interpolation, and the address added on the home leg.
    assert 'ip addr replace "$$SIPDRILL_PLAN_ADDRESS/' in SWARM_ENTRYPOINT
    # Tasks of one node share the volume: each copies the CA under its own names.
    assert 'cert=$$(mktemp "$$ca/.ca.XXXXXX")' in SWARM_ENTRYPOINT


def test_clients_are_replicas_that_pick_their_users_by_task_slot() -> None:
    clients = _model(clients=30, replicas=3)["services"]["clients"]
    assert clients["deploy"]["replicas"] == 3
    assert clients["environment"]["SIPDRILL_CLIENT_SLOT"] == "{{.Task.Slot}}"
    assert clients["command"][0] == "clients-slot"
    assert "--count" in clients["command"] and "10" in clients["command"]
    assert "--slots" not in clients["command"]  # not a lock in a per-node volume
    assert "SIPDRILL_PLAN_ADDRESS" not in clients["environment"]
    assert "$$" not in clients["environment"]["SIPDRILL_SLOT_SCRIPT"].replace("$$", "")


def test_the_fault_agent_is_global_on_the_host_network_with_the_docker_socket() -> None:
    agent = _model()["services"][AGENT_SERVICE]
    assert agent["deploy"]["mode"] == "global"
    assert agent["networks"] == ["hostnet"]
    assert "/var/run/docker.sock:/var/run/docker.sock" in agent["volumes"]
    assert agent["cap_add"] == ["NET_ADMIN"]
    assert agent["command"][:2] == ["serve", "fault-agent"]
    assert "0.0.0.0:18777" in agent["command"]
    assert agent["environment"]["SIPDRILL_AGENT_NODE"] == "{{.Node.Hostname}}"
    # The plan's addresses, which it routes other nodes' tasks by (not the clients').
    from sipdrill.orchestrator.swarm_agent import parse_plan

    plan = parse_plan(agent["environment"]["SIPDRILL_PLAN_ADDRESSES"])
    assert set(plan) == {"dns", "pool1", "backup-pool1", "pool2", "backup-pool2"}
    assert plan["pool1"] == _model()["services"]["pool1"]["environment"]["SIPDRILL_PLAN_ADDRESS"]


def test_placement_on_labelled_nodes_and_a_warning_for_a_site_with_none() -> None:
    topology = load_topology(TOPOLOGY).topology
    placed, warnings = placement_warnings(topology, {"n1": {SITE_LABEL: "site1"}, "n2": {}})
    assert placed == frozenset({"site1"})
    assert len(warnings) == 1 and f"{SITE_LABEL}=site2" in warnings[0]
    assert "any node" in warnings[0] and "docker node update --label-add" in warnings[0]
    services = _model(placed)["services"]
    assert services["pool1"]["deploy"]["placement"]["constraints"] == [
        f"node.labels.{SITE_LABEL} == site1"
    ]
    assert "placement" not in services["pool2"]["deploy"]
    placed, warnings = placement_warnings(topology, {"n1": {SITE_LABEL: "mars"}})
    assert placed == frozenset() and any("mars" in w for w in warnings)


def test_the_stack_file_renders_as_yaml_swarm_reads() -> None:
    import yaml

    text = render(_model())
    data = yaml.safe_load(text)
    assert data["version"] == "3.9"
    assert set(data["services"]) == {
        "dns", "pool1", "backup-pool1", "pool2", "backup-pool2", "clients", AGENT_SERVICE,
    }  # fmt: skip


def test_the_swarm_runtime_refuses_what_it_cannot_do() -> None:
    request = parse_fault_request("cut", "site1", {}, RuntimeKind.SWARM)
    assert request.kind is FaultKind.CUT
    with pytest.raises(FaultError, match="not supported"):
        parse_fault_request("disconnect", "site1", {}, RuntimeKind.SWARM)
    with pytest.raises(FaultError, match="unexpected parameters"):
        parse_fault_request("cut", "site1", {"delay_ms": 3}, RuntimeKind.SWARM)
    with pytest.raises(FaultError, match="peer"):
        parse_fault_request("partition", "site1", {}, RuntimeKind.SWARM)


def test_a_partitions_two_sides_have_two_ids_on_the_agents() -> None:
    assert _peer_id("0000abcd") == "0000abcc"
    assert _peer_id(_peer_id("12345678")) == "12345678"
