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


def test_the_labs_sign_in_rate_is_split_over_its_clients_processes(paired) -> None:
    """Regression (issue 20): each of 20 replicas signed in at 100/s, 2,000/s
    in all, and the pools' TLS handshakes timed out in a retry storm."""

    def ramps(processes: int, client_args: tuple[str, ...] = ()) -> list[str | None]:
        specs = lab_plan(
            paired, RuntimeKind.DOCKER, topology_path="t", state_dir="/s",
            clients=1000, clients_processes=processes, client_args=client_args,
        )  # fmt: skip
        return [
            s.args[s.args.index("--ramp") + 1] if "--ramp" in s.args else None
            for s in specs
            if s.role is Role.CLIENTS
        ]

    assert ramps(1) == [None]  # the process's own default, 100/s
    assert ramps(4) == ["25"] * 4
    assert ramps(3) == ["33.3333"] * 3
    assert ramps(4, ("--ramp", "7")) == ["7"] * 4  # the user's own, untouched
    specs = lab_plan(
        paired, RuntimeKind.DOCKER, topology_path="t", state_dir="/s",
        clients=1000, clients_processes=4, client_args=("--ramp", "7"),
    )  # fmt: skip
    assert all(s.args.count("--ramp") == 1 for s in specs if s.role is Role.CLIENTS)


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


def test_enterprise_plan_runs_a_process_per_front_end() -> None:
    from sipdrill.orchestrator.plan import pool_fault_targets

    topo = load_topology(ROOT / "topologies/enterprise.yaml").topology
    specs = lab_plan(topo, RuntimeKind.LOCAL, topology_path="t.yaml", state_dir="/s", clients=4)
    pools = [s for s in specs if s.role is Role.POOL]
    assert [s.name for s in pools] == [
        "pool1-fe1",
        "pool1-fe2",
        "pool1-fe3",
        "pool2-fe1",
        "pool2-fe2",
        "pool2-fe3",
    ]
    # Each front end on its own address, all on the pool's one state directory.
    assert len({s.address for s in pools}) == 6
    for s in pools[:3]:
        args = list(s.args)
        assert args[args.index("--state-dir") + 1] == "/s/pool1"
        assert args[args.index("--front-end") + 1] == s.front_end
    assert pools[1].address.endswith(".1.12") and pools[1].front_end == "fe2.pool1.lab.local"
    backup = next(s for s in specs if s.name == "backup-pool1")
    assert backup.depends_on == ("pool1-fe1",)
    clients = next(s for s in specs if s.role is Role.CLIENTS)
    assert {s.name for s in pools} <= set(clients.depends_on)
    targets = pool_fault_targets(topo)
    assert targets["pool1"] == ["pool1-fe1", "pool1-fe2", "pool1-fe3"]
    assert targets["pool1/fe2"] == ["pool1-fe2"]


def test_one_front_end_pools_keep_their_service_names(paired) -> None:
    from sipdrill.orchestrator.plan import pool_fault_targets

    specs = lab_plan(paired, RuntimeKind.LOCAL, topology_path="t.yaml", state_dir="/s")
    pools = [s for s in specs if s.role is Role.POOL]
    assert [s.name for s in pools] == ["pool1", "pool2"]
    assert all("--front-end" not in s.args for s in pools)
    assert pool_fault_targets(paired)["pool1/fe1"] == ["pool1"]
