"""The lab plan derived from a topology, in both runtimes."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from sipdrill.orchestrator.plan import Role, RuntimeKind, lab_plan
from sipdrill.topology import load_topology

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def paired():
    return load_topology(ROOT / "topologies/paired-pools.yaml").topology


def test_plan_has_every_role_once_per_pool(paired) -> None:
    specs = lab_plan(
        paired,
        RuntimeKind.DOCKER,
        topology_path="/lab/t.yaml",
        state_dir="/state",
        clients=1000,
        clients_processes=3,
    )
    names = [s.name for s in specs]
    assert names == [
        "dns",
        "pool1",
        "backup-pool1",
        "pool2",
        "backup-pool2",
        "clients-1",
        "clients-2",
        "clients-3",
    ]
    assert len(set(s.address for s in specs)) == len(specs)
    counts = [int(s.args[s.args.index("--count") + 1]) for s in specs if s.role is Role.CLIENTS]
    offsets = [int(s.args[s.args.index("--offset") + 1]) for s in specs if s.role is Role.CLIENTS]
    assert sum(counts) == 1000 and offsets == [0, 334, 668]


def test_docker_plan_uses_topology_addresses(paired) -> None:
    specs = {
        s.name: s for s in lab_plan(paired, RuntimeKind.DOCKER, topology_path="t", state_dir="/s")
    }
    assert specs["pool1"].address == "172.30.1.11"
    assert specs["backup-pool1"].address == "172.30.1.111"
    assert specs["backup-pool1"].network == "site1"  # a site cut takes the Backup Service too
    assert "--listen" in specs["dns"].args and "172.30.0.53:53" in specs["dns"].args


def test_local_plan_is_all_loopback(paired) -> None:
    specs = lab_plan(paired, RuntimeKind.LOCAL, topology_path="t", state_dir="/s", clients=10)
    for s in specs:
        assert ipaddress.IPv4Address(s.address).is_loopback, s
        if s.role is not Role.CLIENTS:
            assert "--loopback" in s.args
    dns = specs[0]
    assert "127.77.0.53:5353" in dns.args


def test_dependencies_point_backwards(paired) -> None:
    specs = lab_plan(paired, RuntimeKind.LOCAL, topology_path="t", state_dir="/s", clients=5)
    seen: set[str] = set()
    for s in specs:
        assert set(s.depends_on) <= seen, s.name
        seen.add(s.name)


def test_budget_dr_has_no_backup_service() -> None:
    t = load_topology(ROOT / "topologies/budget-dr.yaml").topology
    roles = [s.role for s in lab_plan(t, RuntimeKind.DOCKER, topology_path="t", state_dir="/s")]
    assert Role.BACKUP not in roles and roles.count(Role.POOL) == 2
