"""The fault layer without a Docker engine: parameters, the journal, healing
from it, and the delayer's netlink encoding."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from sipdrill.errors import FaultError
from sipdrill.orchestrator import nfq_delay
from sipdrill.orchestrator.docker_runtime import python_bootstrap
from sipdrill.orchestrator.faults import (
    FAULT_KINDS,
    Crash,
    Cut,
    Degrade,
    Disconnect,
    DockerFaultRegistry,
    FaultJournal,
    Partition,
    heal_journal,
    journal_path,
)


class GoneRuntime:
    """A runtime whose containers and networks have all been removed."""

    name = "docker"

    def find(self, ref: str) -> None:
        return None

    def find_network(self, ref: str) -> None:
        return None

    def netns_again(self, ref: str, method: str, generation: str) -> None:
        return None

    def kill_tagged(self, method: str, container: str, pid: int, tag: str) -> None:
        self.killed = (method, container, pid, tag)


def _runtime() -> Any:
    return GoneRuntime()


def test_the_kinds_are_the_drill_files_names() -> None:
    assert set(FAULT_KINDS) == {
        "cut",
        "disconnect",
        "partition",
        "degrade",
        "crash",
        "stop",
        "pause",
        "restart",
    }


@pytest.mark.parametrize(
    ("kind", "params", "message"),
    [
        ("dns-outage", {}, "not a docker fault"),
        ("cut", {"egress": "netem"}, "egress must be"),
        ("cut", {"loss": 3}, "bad parameters"),
        ("partition", {"peer": ["x"]}, "on both sides"),
        ("partition", {"peer": []}, "needs a peer"),
        ("degrade", {}, "nothing to degrade"),
        ("degrade", {"delay_ms": 10, "jitter_ms": 20}, "jitter larger"),
        ("degrade", {"loss_percent": 120}, "loss in 0..100"),
        ("degrade", {"delay_ms": 10, "method": "tbf"}, "method must be"),
        ("degrade", {"delay_ms": 10, "method": "netem", "peers": ["10.0.0.1"]}, "no peers"),
    ],
)
def test_impossible_faults_raise_fault_error(
    kind: str, params: dict[str, Any], message: str
) -> None:
    registry = DockerFaultRegistry(_runtime())
    with pytest.raises(FaultError, match=message) as info:
        registry.create(kind, ["x"], **params)
    assert info.value.runtime == "docker"
    assert info.value.fault == kind


def test_a_fault_needs_a_target() -> None:
    with pytest.raises(FaultError, match="no container"):
        Cut(_runtime(), [])


def test_records_rebuild_the_same_fault() -> None:
    rt = _runtime()
    faults = [
        Cut(rt, ["a", "b"], egress="iptables"),
        Partition(rt, ["a"], ["b", "c"]),
        Degrade(rt, "a", delay_ms=100, jitter_ms=10, loss_percent=1.5, peers=["10.1.0.0/24"]),
        Disconnect(rt, ["a"], network="core"),
        Crash(rt, ["a"], signal="SIGTERM"),
    ]
    for fault in faults:
        fault.state = {"targets": {"a": {"method": "exec"}}}
        fault.status = "active"
        record = json.loads(json.dumps(fault.to_record()))
        again = FAULT_KINDS[record["kind"]].from_record(rt, record)
        assert type(again) is type(fault)
        assert again.to_record() == fault.to_record()
        assert again.id == fault.id and again.active


def test_the_journal_holds_what_is_in_force(tmp_path: Path) -> None:
    path = journal_path(tmp_path / "lab")
    assert path == tmp_path / "lab" / "faults.json"
    journal = FaultJournal(path)
    assert journal.records() == []
    rt = _runtime()
    a, b = Crash(rt, ["x"]), Cut(rt, ["y"])
    for fault in (a, b):
        fault.status = "active"
        journal.put(fault)
    assert [r["id"] for r in journal.records()] == [a.id, b.id]
    a.status = "undone"
    journal.put(a)
    assert [r["id"] for r in journal.records()] == [b.id]
    assert [p.name for p in path.parent.iterdir()] == ["faults.json"]  # no temp file left


def test_a_registry_takes_over_a_journal_and_heals_it(tmp_path: Path) -> None:
    path = tmp_path / "faults.json"
    rt = _runtime()
    first = DockerFaultRegistry(rt, path)
    for fault in (
        Crash(rt, ["pool1"]),
        Disconnect(rt, ["pool1"]),
        Degrade(rt, ["pool2"], delay_ms=50),
    ):
        fault.status = "active"
        fault.state = {
            "targets": {
                "pool2": {
                    "method": "nsenter",
                    "generation": "g",
                    "helper_pid": 4242,
                    "helper_tag": "sipdrill-0-dg",
                }
            },
            "endpoints": [{"container": "pool1", "network": "site1"}],
            "generations": {"pool1": "g"},
        }
        first._adopt(fault)
        fault.save()
    # A new process (after a crash) finds them, and heals them although every
    # container is gone: the host-side delayer is still stopped.
    second = DockerFaultRegistry(rt, path)
    assert [f.kind for f in second.active()] == ["crash", "disconnect", "degrade"]
    assert second.heal() == []
    assert rt.killed == ("nsenter", "pool2", 4242, "sipdrill-0-dg")
    assert FaultJournal(path).records() == []
    assert heal_journal(path, rt) == []


def test_a_journal_with_an_unknown_kind_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "faults.json"
    path.write_text(json.dumps({"faults": [{"id": "00000000", "kind": "flood", "params": {}}]}))
    with pytest.raises(FaultError, match="unknown kind"):
        DockerFaultRegistry(_runtime(), path)


def test_undo_before_inject_does_nothing() -> None:
    fault = Cut(_runtime(), ["x"])
    fault.undo()
    assert fault.status == "new"


def test_the_delayer_speaks_nfnetlink_queue() -> None:
    attr = nfq_delay._attr(nfq_delay.NFQA_VERDICT_HDR, struct.pack("!II", nfq_delay.NF_ACCEPT, 7))
    message = nfq_delay._message(nfq_delay.NFQNL_MSG_VERDICT, 0x5D01, attr, seq=3)
    [(msg_type, payload)] = nfq_delay._split(message)
    assert msg_type == (nfq_delay.NFNL_SUBSYS_QUEUE << 8) | nfq_delay.NFQNL_MSG_VERDICT
    assert struct.unpack("!H", payload[2:4]) == (0x5D01,)  # queue number, network order
    attrs = nfq_delay._attrs(payload[4:])
    assert struct.unpack("!II", attrs[nfq_delay.NFQA_VERDICT_HDR]) == (1, 7)


def test_the_bootstrap_runs_the_source_as_main() -> None:
    source = "import sys\nif __name__ == '__main__':\n    sys.exit(sys.argv[1:] == ['ok'])\n"
    program = python_bootstrap(source)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    argv, sys.argv = sys.argv, ["-c", "ok"]
    try:
        with pytest.raises(SystemExit) as info:
            exec(program, namespace)
    finally:
        sys.argv = argv
    assert info.value.code is True
