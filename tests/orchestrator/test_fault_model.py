"""The fault model without a lab: the one parser of fault requests (the
errors `lab fault` and drills show), the local faults' journal and undo,
and how the docker lab maps a request onto fault classes (a fake engine)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sipdrill.errors import FaultError
from sipdrill.orchestrator import docker_lab_faults, labels
from sipdrill.orchestrator.drill import FaultStep
from sipdrill.orchestrator.fault_model import (
    RUNTIME_FAULTS,
    FaultJournal,
    FaultKind,
    FaultRegistry,
    FaultRequest,
    parse_fault_request,
)
from sipdrill.orchestrator.faults import Crash, Cut, Degrade, DnsOutage, Partition, Restart, Stop
from sipdrill.orchestrator.local_faults import LOCAL_FAULT_KINDS, LocalCut, LocalDnsOutage
from sipdrill.orchestrator.plan import Role, RuntimeKind, ServiceSpec

LOCAL, DOCKER = RuntimeKind.LOCAL, RuntimeKind.DOCKER


def test_the_drill_file_and_the_runtimes_share_the_kinds() -> None:
    assert FaultStep.model_fields["kind"].annotation is FaultKind
    assert [k.value for k in FaultKind] == [
        "cut", "disconnect", "partition", "degrade", "crash", "stop", "pause", "restart",
        "dns-outage",
    ]  # fmt: skip
    assert set(RUNTIME_FAULTS[DOCKER]) == set(FaultKind)
    assert set(RUNTIME_FAULTS[LOCAL]) == set(LOCAL_FAULT_KINDS)


@pytest.mark.parametrize(
    ("runtime", "kind", "params", "message"),
    [
        (LOCAL, "partition", {"peer": "site2"}, "the local runtime can do: cut, crash, restart"),
        (LOCAL, "flood", {}, "(use --runtime docker for network faults)"),
        (DOCKER, "flood", {}, "the docker runtime can do: cut, disconnect"),
        (DOCKER, "cut", {"delay_ms": 5}, r"unexpected parameters \['delay_ms'\] for cut"),
        (DOCKER, "partition", {}, "a partition needs `peer`"),
        (DOCKER, "dns-outage", {"mode": "nxdomain"}, "mode must be drop or servfail"),
        (LOCAL, "dns-outage", {"mode": "nxdomain"}, "mode must be drop or servfail"),
    ],
)
def test_requests_a_runtime_cannot_do_are_refused(
    runtime: RuntimeKind, kind: str, params: dict[str, Any], message: str
) -> None:
    with pytest.raises(FaultError, match=message) as info:
        parse_fault_request(kind, "site1", params, runtime)
    assert info.value.fault == kind and info.value.runtime == runtime.value
    assert str(info.value).startswith(f"fault '{kind}' in the {runtime.value} runtime: ")


def test_requests_are_typed() -> None:
    degrade = {"delay_ms": 200, "jitter_ms": 20}
    assert parse_fault_request("degrade", "pool2", degrade, DOCKER) == FaultRequest(
        FaultKind.DEGRADE, "pool2", delay_ms=200.0, jitter_ms=20.0
    )
    outage = parse_fault_request("dns-outage", "dns", {}, LOCAL)
    assert outage.kind is FaultKind.DNS_OUTAGE and outage.mode == "drop"
    # The local runtime ignores parameters a kind does not take, as it always has.
    assert parse_fault_request("cut", "dns", {"delay_ms": 5}, LOCAL) == FaultRequest(
        FaultKind.CUT, "dns"
    )


class FakeProcesses:
    """The local runtime's processes, as the faults see them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.running = True

    def alive(self, name: str) -> bool:
        return self.running

    def suspend(self, name: str) -> None:
        self.calls.append(("suspend", name, None))

    def resume(self, name: str) -> None:
        self.calls.append(("resume", name, None))

    def kill(self, name: str) -> None:
        self.calls.append(("kill", name, None))

    def revive(self, name: str) -> None:
        self.calls.append(("revive", name, None))

    def restart(self, name: str) -> None:
        self.calls.append(("restart", name, None))

    def dns_outage(self, name: str, mode: str | None) -> None:
        self.calls.append(("dns", name, mode))


def _local_registry(rt: FakeProcesses, path: Path) -> FaultRegistry[Any]:
    return FaultRegistry(rt, path, kinds=LOCAL_FAULT_KINDS, runtime_name="local")


def test_local_faults_are_journalled_and_a_new_process_heals_them(tmp_path: Path) -> None:
    path, rt = tmp_path / "faults.json", FakeProcesses()
    first = _local_registry(rt, path)
    site = first.inject(LocalCut(rt, ["pool1", "backup-pool1"]))
    first.inject(LocalDnsOutage(rt, ["dns"], mode="servfail"))
    assert rt.calls == [
        ("suspend", "pool1", None),
        ("suspend", "backup-pool1", None),
        ("dns", "dns", "servfail"),
    ]
    records = FaultJournal(path).records()
    assert [(r["kind"], r["params"]) for r in records] == [
        ("cut", {"processes": ["pool1", "backup-pool1"]}),
        ("dns-outage", {"processes": ["dns"], "mode": "servfail"}),
    ]
    rt.calls.clear()
    second = _local_registry(rt, path)  # after a crash of the first
    assert second.heal_one(site.id) is not None and second.heal_one(site.id) is None
    assert second.heal() == []
    assert rt.calls == [
        ("resume", "pool1", None),
        ("resume", "backup-pool1", None),
        ("dns", "dns", None),
    ]
    assert FaultJournal(path).records() == []


def test_a_local_fault_that_fails_half_way_is_undone(tmp_path: Path) -> None:
    rt = FakeProcesses()

    def refuse(name: str) -> None:
        if name == "b":
            raise OSError("no such process")
        rt.calls.append(("kill", name, None))

    rt.kill = refuse  # type: ignore[method-assign]
    registry = _local_registry(rt, tmp_path / "faults.json")
    with pytest.raises(OSError):
        registry.inject(LOCAL_FAULT_KINDS["crash"](rt, ["a", "b"]))
    assert rt.calls == [("kill", "a", None), ("revive", "a", None), ("revive", "b", None)]
    assert FaultJournal(tmp_path / "faults.json").records() == []


# --- the docker lab's mapping from requests to fault classes, without an engine ---


def _container(name: str, service: str) -> Any:
    return SimpleNamespace(name=name, labels={labels.SERVICE: service})


class FakeEngine:
    def lab_containers(self, lab: str) -> list[Any]:
        services = ["dns", "pool1", "backup-pool1", "pool2"]
        return [_container(f"{lab}-{s}", s) for s in services]


SPECS = [
    ServiceSpec("dns", Role.DNS, "core", "10.0.0.53", ()),
    ServiceSpec("pool1", Role.POOL, "site1", "10.0.1.11", ()),
    ServiceSpec("backup-pool1", Role.BACKUP, "site1", "10.0.1.111", ()),
    ServiceSpec("pool2", Role.POOL, "site2", "10.0.2.11", ()),
]


@pytest.fixture
def lab_faults() -> docker_lab_faults.DockerLabFaults:
    return docker_lab_faults.DockerLabFaults("t", Path("/nonexistent"), lambda: SPECS, print)


@pytest.mark.parametrize(
    ("kind", "target", "params", "cls", "containers"),
    [
        ("cut", "site1", {}, Cut, ["t-backup-pool1", "t-pool1"]),
        ("crash", "pool2", {}, Crash, ["t-pool2"]),
        ("stop", "core", {}, Stop, ["t-dns"]),
        ("restart", "dns", {}, Restart, ["t-dns"]),
        ("degrade", "pool2", {"delay_ms": 100}, Degrade, ["t-pool2"]),
        ("partition", "site1", {"peer": "site2"}, Partition, ["t-backup-pool1", "t-pool1"]),
        ("dns-outage", "dns", {"mode": "servfail"}, DnsOutage, ["t-dns"]),
    ],
)
def test_the_docker_lab_maps_requests_onto_fault_classes(
    lab_faults: docker_lab_faults.DockerLabFaults,
    kind: str,
    target: str,
    params: dict[str, Any],
    cls: type[Any],
    containers: list[str],
) -> None:
    request = parse_fault_request(kind, target, params, DOCKER)
    fault = lab_faults._make(FakeEngine(), request)  # type: ignore[arg-type]
    assert type(fault) is cls and fault.containers == containers
    if cls is Partition:
        assert fault.peer == ["t-pool2"]
    if cls is DnsOutage:
        assert fault.mode == "servfail" and fault.url == SPECS[0].control_url
    if cls in (Stop, Restart):
        assert fault.timeout == 5


@pytest.mark.parametrize(
    ("kind", "target", "message"),
    [
        ("cut", "pool9", r"unknown target 'pool9'; services: backup-pool1, dns, pool1, pool2"),
        ("dns-outage", "pool1", "pool1 is not the DNS server"),
    ],
)
def test_the_docker_lab_refuses_targets_it_has_not(
    lab_faults: docker_lab_faults.DockerLabFaults, kind: str, target: str, message: str
) -> None:
    with pytest.raises(FaultError, match=message):
        lab_faults._make(FakeEngine(), parse_fault_request(kind, target, {}, DOCKER))  # type: ignore[arg-type]
