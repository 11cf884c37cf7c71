"""The Compose file generated from a topology's lab plan, without a Docker
engine: the committed compose.yaml is what `sipdrill lab compose` makes of
topologies/paired-pools.yaml, and the file has what the lab needs."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from sipdrill.cli import app
from sipdrill.errors import OperationError
from sipdrill.orchestrator.compose import (
    CLIENT_SLOTS,
    CONTAINER_STATE,
    CONTAINER_TOPOLOGY,
    ComposeOptions,
    compose_model,
    docker_plan,
    dynamic_range,
    generate,
    project_name,
    write_env_file,
)
from sipdrill.orchestrator.docker_runtime import compose_command
from sipdrill.topology import load_topology, parse_topology

ROOT = Path(__file__).resolve().parents[2]
TOPOLOGY = ROOT / "topologies/paired-pools.yaml"


@pytest.fixture(scope="module")
def committed() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def test_the_committed_compose_file_is_the_generated_one() -> None:
    """The topology stays the one source of truth: regenerate compose.yaml
    (the command is in its header) when this fails."""
    proc = subprocess.run(
        [sys.executable, "-m", "sipdrill", "lab", "compose", "topologies/paired-pools.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    committed = (ROOT / "compose.yaml").read_text()
    assert proc.stdout == committed, (
        "compose.yaml is stale: run `sipdrill lab compose topologies/paired-pools.yaml "
        "> compose.yaml`"
    )
    assert "sipdrill lab compose topologies/paired-pools.yaml" in committed.splitlines()[1]


def test_the_committed_env_file_names_the_project_after_the_lab(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beside compose.yaml, .env fixes the project name (v1 has no top-level
    `name:`): `-o` writes both, the file as printed and the .env committed."""
    (tmp_path / "topologies").mkdir()
    shutil.copy(TOPOLOGY, tmp_path / "topologies")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        app, ["lab", "compose", "topologies/paired-pools.yaml", "-o", "compose.yaml"]
    )
    assert result.exit_code == 0, result.output
    assert "COMPOSE_PROJECT_NAME=paired-pools" in result.output  # said on stderr
    # The topology path as given (relative): the same file as committed.
    assert (tmp_path / "compose.yaml").read_text() == (ROOT / "compose.yaml").read_text()
    env = (ROOT / ".env").read_text()
    assert (tmp_path / ".env").read_text() == env
    assert [line for line in env.splitlines() if not line.startswith("#")] == [
        "COMPOSE_PROJECT_NAME=paired-pools"
    ]


def test_writing_the_env_file_keeps_what_else_is_in_it(tmp_path: Path) -> None:
    mine = "# mine\nSIPDRILL_IMAGE=sipdrill:mine\n"
    (tmp_path / ".env").write_text(mine + "COMPOSE_PROJECT_NAME=old\n")
    write_env_file(tmp_path, {"COMPOSE_PROJECT_NAME": "paired-pools"})
    assert (tmp_path / ".env").read_text() == mine + "COMPOSE_PROJECT_NAME=paired-pools\n"


def test_project_names_are_what_compose_accepts() -> None:
    assert project_name("paired-pools") == "paired-pools"
    assert project_name("My Lab.2") == "mylab2"
    assert project_name("-x_") == "x_"
    assert project_name("...") == "sipdrill"


def test_a_network_per_site_and_the_core_with_the_topology_subnets(committed) -> None:
    nets = committed["networks"]
    assert list(nets) == ["core", "site1", "site2"]
    subnets = {n: net["ipam"]["config"][0] for n, net in nets.items()}
    assert subnets["core"]["subnet"] == "172.30.0.0/24"
    assert subnets["site1"]["subnet"] == "172.30.1.0/24"
    assert subnets["site2"]["subnet"] == "172.30.2.0/24"
    for n, config in subnets.items():
        assert config["gateway"].endswith(".1")
        assert config["ip_range"].endswith(".192/26"), n  # legs, away from plan addresses
        assert nets[n]["labels"] == {"sipdrill.lab": "paired-pools"}


def test_fixed_plan_addresses_on_the_home_network_and_a_leg_on_every_other(committed) -> None:
    services = committed["services"]
    expected = {
        "dns": ("core", "172.30.0.53"),
        "pool1": ("site1", "172.30.1.11"),
        "backup-pool1": ("site1", "172.30.1.111"),
        "pool2": ("site2", "172.30.2.11"),
        "backup-pool2": ("site2", "172.30.2.111"),
    }
    assert list(services) == [*expected, "clients"]
    for name, (home, address) in expected.items():
        nets = services[name]["networks"]
        assert nets[home] == {"ipv4_address": address}
        assert sorted(nets) == ["core", "site1", "site2"]
        assert all(nets[n] is None for n in nets if n != home)  # legs: Docker picks
        assert services[name]["container_name"] == f"paired-pools-{name}"
    assert services["clients"]["networks"] == {"core": None, "site1": None, "site2": None}
    assert "container_name" not in services["clients"]  # scalable


def test_every_service_has_what_the_lab_and_its_faults_need(committed) -> None:
    for name, svc in committed["services"].items():
        assert svc["init"] is True, name
        assert svc["cap_add"] == ["NET_ADMIN"], name
        assert svc["image"] == "${SIPDRILL_IMAGE:-sipdrill:latest}"
        assert svc["environment"]["SIPDRILL_CONTROL_TOKEN"] == "${SIPDRILL_CONTROL_TOKEN:-lab}"
        assert all(p.startswith("127.0.0.1:") for p in svc["ports"]), name
        assert svc["volumes"] == [
            f"./topologies/paired-pools.yaml:{CONTAINER_TOPOLOGY}:ro",
            f"lab-state:{CONTAINER_STATE}",
        ]
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD" and "python3" in test and "GET /health" in test[-1], name
        assert svc["labels"]["sipdrill.service"] == name
    assert committed["volumes"] == {"lab-state": {"labels": {"sipdrill.lab": "paired-pools"}}}
    dns = committed["services"]["dns"]
    assert dns["environment"]["SIPDRILL_DNS_TOKEN"] == "${SIPDRILL_CONTROL_TOKEN:-lab}"
    assert "172.30.0.53:53" in dns["command"]
    ports = [p for s in committed["services"].values() for p in s["ports"]]
    assert ports[:5] == [f"127.0.0.1:{18080 + i}:8080" for i in range(5)]
    assert ports[5] == "127.0.0.1::8080"  # clients: ephemeral, so replicas do not clash


def test_start_order_is_gated_on_health(committed) -> None:
    s = committed["services"]
    healthy = {"condition": "service_healthy"}
    assert "depends_on" not in s["dns"]
    assert s["pool1"]["depends_on"] == {"dns": healthy}
    assert s["backup-pool1"]["depends_on"] == {"pool1": healthy}
    assert s["clients"]["depends_on"] == {"pool1": healthy, "pool2": healthy}


def test_site_services_forward_their_published_port_to_their_address(committed) -> None:
    """Docker publishes a multi-homed container's ports on its first network
    (core): pools and Backup Services forward that to the address they listen on."""
    for name in ("pool1", "backup-pool1", "pool2", "backup-pool2"):
        svc = committed["services"][name]
        entry = svc["entrypoint"]
        assert entry[:2] == ["sh", "-c"]
        address = next(v["ipv4_address"] for v in svc["networks"].values() if v)
        assert f"--to-destination {address}:8080" in entry[2]
        # Root for that rule only; the service itself runs as the image's user
        # with no capability left ($$: Compose's escape for $).
        drop = (
            "setpriv --reuid=sipdrill --regid=sipdrill --init-groups --inh-caps=-all "
            "--bounding-set=-all --no-new-privs"
        )
        assert svc["user"] == "root"
        assert entry[2].rstrip().endswith(f'exec {drop} sipdrill "$$@"')
        # So does its health check (Docker runs it as the container's user).
        assert svc["healthcheck"]["test"][:9] == ["CMD", *drop.split(), "python3"]
    assert "entrypoint" not in committed["services"]["dns"]  # core is its gateway


def test_services_without_a_forward_run_as_the_images_user(committed) -> None:
    """The image's USER (sipdrill): no `user:` key, no root at all."""
    for name in ("dns", "clients"):
        svc = committed["services"][name]
        assert "user" not in svc, name
        assert svc["healthcheck"]["test"][:2] == ["CMD", "python3"], name


def test_clients_replicas_take_their_own_users(committed) -> None:
    """Each replica claims a slot on the shared volume (`serve clients --slots`,
    tests/clients/test_clients_slots.py): the image's own entrypoint, no script."""
    clients = committed["services"]["clients"]
    assert "entrypoint" not in clients
    command = clients["command"]
    assert command[:2] == ["serve", "clients"]
    assert command[command.index("--count") + 1] == "50"
    assert command[command.index("--control") + 1] == "0.0.0.0:8080"
    assert command[command.index("--slots") + 1] == CLIENT_SLOTS
    assert CLIENT_SLOTS.startswith(CONTAINER_STATE + "/")  # the volume all replicas share
    assert "--bind" not in command and "--offset" not in command


def test_replicas_from_the_plan_and_ephemeral_ports() -> None:
    t = load_topology(TOPOLOGY).topology
    options = ComposeOptions(lab="x", topology_source="/abs/t.yaml", port_base=None)
    model = compose_model(t, docker_plan(t, clients=30, clients_processes=3), options)
    clients = model["services"]["clients"]
    assert clients["scale"] == 3
    assert clients["command"][clients["command"].index("--count") + 1] == "10"
    assert {p for s in model["services"].values() for p in s["ports"]} == {"127.0.0.1::8080"}
    assert model["services"]["dns"]["volumes"][0] == f"/abs/t.yaml:{CONTAINER_TOPOLOGY}:ro"


def test_a_plan_address_in_the_range_of_legs_is_refused() -> None:
    text = TOPOLOGY.read_text().replace("172.30.2.11}", "172.30.2.200}")
    t = parse_topology(text, "moved.yaml").topology
    assert ipaddress.ip_address("172.30.2.200") in dynamic_range(t.site("site2").subnet)
    with pytest.raises(OperationError, match=r"172\.30\.2\.200 is in 172\.30\.2\.192/26"):
        generate(t, ComposeOptions(lab="x", topology_source="./t.yaml"))


def test_lab_compose_command_options(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["lab", "compose", str(TOPOLOGY), "--clients", "5", "--lab", "other", "--port-base", "0"],
    )
    assert result.exit_code == 0, result.output
    model = yaml.safe_load(result.output)
    assert model["services"]["pool1"]["container_name"] == "other-pool1"
    assert model["services"]["pool1"]["ports"] == ["127.0.0.1::8080"]
    assert model["services"]["dns"]["volumes"][0].startswith(f"{TOPOLOGY}:")  # absolute stays
    assert "--lab other --clients 5 --port-base 0`" in result.output.splitlines()[1]
    bad = runner.invoke(app, ["lab", "compose", str(tmp_path / "missing.yaml")])
    assert bad.exit_code == 1


@pytest.mark.skipif(compose_command() is None, reason="no docker compose / docker-compose")
def test_compose_accepts_the_committed_file(tmp_path: Path) -> None:
    """Compose's own schema check (`config` needs no engine)."""
    command = compose_command()
    assert command is not None
    (tmp_path / "topologies").mkdir()
    shutil.copy(TOPOLOGY, tmp_path / "topologies")
    shutil.copy(ROOT / "compose.yaml", tmp_path / "compose.yaml")
    proc = subprocess.run(
        [*command, "-f", str(tmp_path / "compose.yaml"), "config"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["services"]["pool1"]["environment"]["SIPDRILL_CONTROL_TOKEN"] == "lab"
    clients_cmd = resolved["services"]["clients"]["command"]
    assert clients_cmd[:2] == ["serve", "clients"]
