"""The local runtime with a real `sipdrill serve dns` process on 127.78.0.53:
start, health, faults (cut, crash, dns-outage), undo, and nothing left behind."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import labnet
import pytest

from sipdrill.errors import FaultError, OperationError
from sipdrill.orchestrator.local_runtime import LocalRuntime, _alive
from sipdrill.orchestrator.plan import Role, RuntimeKind, ServiceSpec, lab_plan
from sipdrill.topology import load_topology

ROOT = Path(__file__).resolve().parents[2]
PAIRED = ROOT / "topologies/paired-pools.yaml"
SRV = "_sipinternaltls._tcp.lab.local"

pytestmark = pytest.mark.slow


def dns_spec(tmp_path: Path) -> ServiceSpec:
    # Its own loopback range (127.78): a lab the user runs on 127.77 cannot collide.
    topology = tmp_path / "paired-pools.yaml"
    topology.write_text(PAIRED.read_text() + f"\nlab:\n  loopback_network: {labnet.NET}\n")
    t = load_topology(topology).topology
    specs = lab_plan(t, RuntimeKind.LOCAL, topology_path=str(topology), state_dir=str(tmp_path))
    (spec,) = [s for s in specs if s.role is Role.DNS]
    return spec


def ask(timeout: float = 1.0) -> int:
    q = dns.message.make_query(SRV, "SRV")
    return dns.query.udp(q, labnet.addr("0.53"), port=5353, timeout=timeout).rcode()


@pytest.fixture
def lab(tmp_path: Path):
    runtime = LocalRuntime("t", tmp_path / "state")
    yield runtime
    runtime.down()


def test_up_fault_undo_down(lab: LocalRuntime, tmp_path: Path) -> None:
    lab.up([dns_spec(tmp_path)], timeout=30)
    assert [r["health"] for r in lab.status()] == ["healthy"]
    assert ask() == dns.rcode.NOERROR

    cut = lab.inject("cut", "dns")
    with pytest.raises(dns.exception.Timeout):
        ask(timeout=0.5)
    assert lab.status()[0]["health"] == "cut (SIGSTOP)"
    lab.undo(cut["id"])
    assert ask() == dns.rcode.NOERROR

    outage = lab.inject("dns-outage", "dns", mode="servfail")
    assert ask() == dns.rcode.SERVFAIL
    lab.undo(outage["id"])
    assert ask() == dns.rcode.NOERROR

    pid = lab.status()[0]["pid"]
    crash = lab.inject("crash", "dns")
    lab.undo(crash["id"])  # starts it again
    new_pid = lab.status()[0]["pid"]
    assert new_pid != pid and not _alive(pid)

    stopped = lab.down()
    assert stopped == ["dns"] and not _alive(new_pid)
    assert lab.down() == []  # idempotent
    assert lab.status() == []

    # A new run starts its logs anew and keeps the last run's once.
    log = lab.state_dir / "logs" / "dns.log"
    first_run = log.read_bytes()
    assert first_run
    lab.up([dns_spec(tmp_path)], timeout=30)
    lab.down()
    assert (lab.state_dir / "logs" / "dns.log.1").read_bytes() == first_run
    assert first_run not in log.read_bytes()  # this run alone


def test_heal_all_after_orchestrator_loss(tmp_path: Path) -> None:
    """A second runtime object (a new orchestrator after a crash) heals and stops
    what the first one left from the journal alone."""
    first = LocalRuntime("t", tmp_path / "state")
    first.up([dns_spec(tmp_path)], timeout=30)
    first.inject("cut", "dns")
    pid = first.status()[0]["pid"]
    second = LocalRuntime("t", tmp_path / "state")
    assert second.down() == ["dns"]
    assert not _alive(pid)


def test_unsupported_fault_is_refused(lab: LocalRuntime, tmp_path: Path) -> None:
    lab.up([dns_spec(tmp_path)], timeout=30)
    with pytest.raises(FaultError) as exc_info:
        lab.inject("partition", "site1")
    assert exc_info.value.runtime == "local" and "docker" in exc_info.value.message
    with pytest.raises(FaultError):
        lab.inject("cut", "nowhere")


def test_second_up_is_refused(lab: LocalRuntime, tmp_path: Path) -> None:
    lab.up([dns_spec(tmp_path)], timeout=30)
    with pytest.raises(OperationError) as exc_info:
        lab.up([dns_spec(tmp_path)], timeout=30)
    assert exc_info.value.code == "lab-already-up"


def test_failed_start_leaves_nothing(lab: LocalRuntime, tmp_path: Path) -> None:
    spec = dns_spec(tmp_path)
    broken = ServiceSpec(
        name="dns",
        role=Role.DNS,
        network="core",
        address=spec.address,
        args=("serve", "dns", "--topology", str(tmp_path / "missing.yaml")),
    )
    with pytest.raises(OperationError) as exc_info:
        lab.up([broken], timeout=20)
    assert exc_info.value.code == "start-failed"
    # The log tail is typer's boxed error, wrapped at 80 columns where the
    # length of tmp_path says (longer under an xdist worker): unwrap it first.
    assert "missing.yaml" in re.sub(r"[\s│]", "", exc_info.value.message)
    assert lab.status() == []
    assert os.listdir(tmp_path / "state" / "logs") == ["dns.log"]


def test_site_fault_hits_every_member(lab: LocalRuntime, tmp_path: Path) -> None:
    spec = dns_spec(tmp_path)
    lab.up([spec], timeout=30)
    fault = lab.inject("cut", "core")  # the DNS server is the core network's only member
    with pytest.raises(dns.exception.Timeout):
        ask(timeout=0.5)
    lab.undo(fault["id"])
    assert ask() == dns.rcode.NOERROR
    with pytest.raises(FaultError) as exc_info:
        lab.inject("dns-outage", "core")
    assert "sites (cut, crash)" in exc_info.value.message


def test_the_leftover_probe_sees_what_a_fault_left(lab: LocalRuntime, tmp_path: Path) -> None:
    """What `chaos run` asks the runtime at the end: every fault left in place,
    whether or not the journal still knows it."""
    import signal

    lab.up([dns_spec(tmp_path)], timeout=30)
    assert lab.leftovers() == []
    outage = lab.inject("dns-outage", "dns", mode="drop")
    found = lab.leftovers()
    assert any("still in the journal" in f and outage["id"] in f for f in found)
    assert "dns: DNS fault drop=True" in found
    lab.heal_all()
    assert lab.leftovers() == []
    # A SIGSTOP the journal never heard of (a crashed orchestrator, a hand).
    pid = lab.status()[0]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        assert lab.leftovers() == ["dns: stopped (SIGSTOP)"]
    finally:
        os.kill(pid, signal.SIGCONT)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lab.leftovers() == ["dns: not running"]


def test_a_stop_that_lands_during_the_probe_is_reported_as_a_stop(
    lab: LocalRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGSTOP takes effect asynchronously: the probe may see the DNS server
    running, then its control API not answering. The stop is what it reports."""
    import signal

    from sipdrill.orchestrator import local_runtime

    lab.up([dns_spec(tmp_path)], timeout=30)
    pid = lab.status()[0]["pid"]
    real = local_runtime._stopped
    looks: list[int] = []

    def not_yet(p: int) -> bool:  # the first look comes before the stop lands
        looks.append(p)
        return real(p) if len(looks) > 1 else False

    monkeypatch.setattr(local_runtime, "_stopped", not_yet)
    os.kill(pid, signal.SIGSTOP)
    try:
        assert lab.leftovers() == ["dns: stopped (SIGSTOP)"]
    finally:
        os.kill(pid, signal.SIGCONT)
    assert len(looks) == 2


def test_pool_and_front_end_targets(tmp_path: Path) -> None:
    """`pool1/fe2` is that front end's process; `pool1` every front end's, for
    cut and crash; anything else on a pool of several is refused, naming both."""
    from dataclasses import asdict

    from sipdrill.orchestrator.fault_model import parse_fault_request
    from sipdrill.orchestrator.local_runtime import LabState, ProcessRecord

    root = Path(__file__).resolve().parents[2]
    topo = load_topology(root / "topologies/enterprise.yaml").topology
    specs = lab_plan(topo, RuntimeKind.LOCAL, topology_path="t.yaml", state_dir=str(tmp_path))
    state = LabState("enterprise", "local", "t", {s.name: ProcessRecord(asdict(s)) for s in specs})
    rt = LocalRuntime("enterprise", tmp_path)

    def targets(kind: str, target: str) -> list[str]:
        return rt._targets(state, parse_fault_request(kind, target, {}, RuntimeKind.LOCAL))

    assert targets("cut", "pool1/fe2") == ["pool1-fe2"]
    assert targets("restart", "pool2/fe3") == ["pool2-fe3"]
    assert targets("cut", "pool1") == ["pool1-fe1", "pool1-fe2", "pool1-fe3"]
    with pytest.raises(FaultError, match="pool1/fe1, pool1/fe2, pool1/fe3"):
        targets("restart", "pool1")
    with pytest.raises(FaultError, match=r"pools and front ends: .*pool1/fe2"):
        targets("cut", "pool1/fe9")
