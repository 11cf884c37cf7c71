"""Which docker lab a command acts on, without a Docker engine: a lab's state
read from its containers (a lab started with docker-compose has no state
file), the saved state only while the containers are that state's, and the
lab a command means when none is named."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer

from sipdrill.errors import OperationError
from sipdrill.orchestrator import cli as orchestrator_cli
from sipdrill.orchestrator import docker_lab
from sipdrill.orchestrator.compose import CONTAINER_TOPOLOGY
from sipdrill.orchestrator.docker_lab import DockerLab, DockerLabState, state_from_containers
from sipdrill.orchestrator.plan import Role

ROOT = Path(__file__).resolve().parents[2]
TOPOLOGY = ROOT / "topologies/paired-pools.yaml"


def container(
    service: str,
    role: str,
    *,
    project: str = "paired-pools",
    token: str = "lab",
    topology: str | None = str(TOPOLOGY),
    cmd: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The parts of `docker inspect` of a lab container that sipdrill reads."""
    return {
        "Config": {
            "Image": "sipdrill:latest",
            "Env": [f"SIPDRILL_CONTROL_TOKEN={token}", "PATH=/usr/bin"],
            "Cmd": list(cmd),
            "Labels": {
                "sipdrill.lab": "paired-pools",
                "sipdrill.role": role,
                "sipdrill.service": service,
                "com.docker.compose.project": project,
                "com.docker.compose.project.config_files": "compose.yaml",
                "com.docker.compose.project.working_dir": "/home/me/lab",
            },
        },
        "Mounts": (
            [{"Type": "bind", "Source": topology, "Destination": CONTAINER_TOPOLOGY}]
            if topology
            else []
        )
        + [{"Type": "volume", "Source": "x", "Destination": "/var/lib/sipdrill/lab"}],
    }


def hand_started(**kw: Any) -> list[dict[str, Any]]:
    return [
        container("dns", "dns", **kw),
        container("pool1", "pool", **kw),
        container("clients", "clients", cmd=("serve", "clients", "--count", "50"), **kw),
    ]


def test_a_hand_started_lab_is_read_from_its_containers() -> None:
    state = state_from_containers("paired-pools", hand_started(token="s3cret"))
    assert state.project == "paired-pools" and state.token == "s3cret"
    assert state.adopted_from == str(TOPOLOGY)
    assert state.compose_file == "/home/me/lab/compose.yaml"
    assert state.image == "sipdrill:latest"
    specs = {s["name"]: s for s in state.specs}
    assert {"dns", "pool1", "backup-pool1", "pool2", "backup-pool2", "clients-1"} <= set(specs)
    assert specs["pool1"]["network"] == "site1" and specs["dns"]["address"] == "172.30.0.53"
    clients = specs["clients-1"]
    assert clients["role"] == Role.CLIENTS and "50" in clients["args"]


def test_a_topology_that_cannot_be_read_here_is_a_clear_error(tmp_path: Path) -> None:
    gone = str(tmp_path / "moved.yaml")
    with pytest.raises(OperationError, match="cannot be used here") as caught:
        state_from_containers("paired-pools", hand_started(topology=gone))
    assert gone in caught.value.message and "sipdrill lab up" in caught.value.message
    with pytest.raises(OperationError, match="not made from a sipdrill Compose file"):
        state_from_containers("paired-pools", hand_started(topology=None))


@dataclass
class FakeContainer:
    attrs: dict[str, Any]


class FakeEngine:
    def __init__(self, containers: list[dict[str, Any]]) -> None:
        self.containers = containers

    def lab_containers(self, lab: str) -> list[FakeContainer]:
        return [FakeContainer(a) for a in self.containers]


def _engine(monkeypatch: pytest.MonkeyPatch, containers: list[dict[str, Any]]) -> None:
    @contextlib.contextmanager
    def engine() -> Iterator[FakeEngine]:
        yield FakeEngine(containers)

    monkeypatch.setattr(docker_lab, "lab_engine", engine)


def _saved(tmp_path: Path) -> DockerLab:
    lab = DockerLab("paired-pools", tmp_path / "paired-pools")
    DockerLabState(
        lab="paired-pools",
        project="paired-pools",
        token="saved",
        image="sipdrill:latest",
        compose_file="x",
        specs=[],
    ).save(lab.state_path)
    return lab


def test_the_saved_state_while_its_containers_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _engine(monkeypatch, hand_started(token="saved"))
    assert _saved(tmp_path).token == "saved"


def test_a_lab_started_again_by_hand_is_read_from_its_containers_not_the_old_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same name and project (both named after the lab), another token: the
    saved state is of a lab that is gone."""
    _engine(monkeypatch, hand_started(token="new"))
    lab = _saved(tmp_path)
    assert lab.token == "new"
    assert lab._state().adopted_from == str(TOPOLOGY)


def test_no_container_and_no_state_is_lab_not_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _engine(monkeypatch, [])
    lab = DockerLab("paired-pools", tmp_path / "paired-pools")
    with pytest.raises(OperationError, match=r"no container is labelled sipdrill\.lab=paired"):
        _ = lab.token
    assert lab.status() == []


def test_with_no_state_the_only_lab_on_the_engine_is_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(orchestrator_cli, "_docker_labs", lambda: {"paired-pools"})
    kind = docker_lab.RuntimeKind.DOCKER
    assert orchestrator_cli._lab_name(None, tmp_path, kind) == "paired-pools"
    monkeypatch.setattr(orchestrator_cli, "_docker_labs", lambda: {"a", "b"})
    with pytest.raises(typer.Exit):  # after saying: 2 labs on the Docker engine, name one
        orchestrator_cli._lab_name(None, tmp_path, kind)
