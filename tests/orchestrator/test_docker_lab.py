"""The docker runtime (DockerLab) on a real engine, with a lab of one real
`sipdrill serve dns` container (quick to start): up, status, every fault kind
injected and observed from the host with DNS queries, undo, heal after a
crashed orchestrator, refusals, down, and nothing left behind, even by a test
that fails.

Needs a Docker engine and the image (`make image`); skipped otherwise, unless
SIPDRILL_REQUIRE_DOCKER=1 (CI), which turns the skip into a failure.
"""

from __future__ import annotations

import ipaddress
import random
import re
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import httpx
import pytest
from docker_labkit import LAB_PREFIX, REQUIRED, docker_marks, lab_problem, leftovers_of
from typer.testing import CliRunner

from sipdrill.cli import app
from sipdrill.errors import FaultError, OperationError
from sipdrill.orchestrator.compose import docker_plan
from sipdrill.orchestrator.docker_lab import DockerLab
from sipdrill.orchestrator.docker_runtime import DockerRuntime
from sipdrill.orchestrator.faults import FaultJournal
from sipdrill.orchestrator.plan import Role, ServiceSpec
from sipdrill.topology import load_topology

ROOT = Path(__file__).resolve().parents[2]
TOPOLOGY = ROOT / "topologies/paired-pools.yaml"
SRV = "_sipinternaltls._tcp.lab.local"

_PROBLEM = lab_problem(compose=False)
_REQUIRED = REQUIRED

pytestmark = docker_marks(_PROBLEM, slow=False)


def topology_on_free_subnets(
    name: str, *, clients: bool = True, source: Path = TOPOLOGY
) -> tuple[str, str]:
    """paired-pools.yaml (or ``source``) named ``name``, with its networks
    (172.30.k.0/24) moved to free 10.x.k.0/24 ones, so that tests running at
    the same time (and a lab started from compose.yaml) do not clash. Returns
    (text, DNS address)."""
    with DockerRuntime.from_env() as rt:
        used = [
            ipaddress.ip_network(c["Subnet"])
            for n in rt.client.networks.list()
            for c in (n.attrs.get("IPAM") or {}).get("Config") or []
            if c.get("Subnet") and ":" not in c["Subnet"]
        ]
    for _ in range(100):
        x = random.randint(160, 199)  # docker_labkit's probe labs use 10.213.x
        nets = [ipaddress.ip_network(f"10.{x}.{k}.0/24") for k in range(3)]
        if not any(n.overlaps(u) for n in nets for u in used):
            break
    else:
        raise RuntimeError("no free 10.x.0.0/22 for a test lab")
    text = re.sub(r"(?m)^name: .*$", f"name: {name}", source.read_text(), count=1)
    text = text.replace("172.30.", f"10.{x}.") + f"\nlab: {{core_subnet: 10.{x}.0.0/24}}\n"
    return text, f"10.{x}.0.53"


DNS = ""  # the lab DNS server of this module's lab (set by the `lab` fixture)


def ask(timeout: float = 1.0) -> int:
    q = dns.message.make_query(SRV, "SRV")
    return int(dns.query.udp(q, DNS, port=53, timeout=timeout).rcode())


def answers(timeout: float = 30.0) -> bool:
    """True once the lab DNS server answers NOERROR (it may be starting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ask(0.5) == dns.rcode.NOERROR:
                return True
        except (dns.exception.Timeout, OSError):
            pass
        time.sleep(0.2)
    return False


def silent() -> bool:
    """No answer: a timeout, or "unreachable" once ARP gives up."""
    try:
        ask(0.7)
    except (dns.exception.Timeout, OSError):
        return True
    return False


def dns_only(topology: Path) -> list[ServiceSpec]:
    specs = docker_plan(load_topology(topology).topology)
    return [s for s in specs if s.role is Role.DNS]


def lab_topology(tmp: Path, name: str) -> tuple[Path, str]:
    """The topology file of a test lab, and its DNS server's address."""
    path = tmp / "topology.yaml"
    text, dns_address = topology_on_free_subnets(name)
    path.write_text(text)
    return path, dns_address


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerLab]:
    if _PROBLEM:
        pytest.fail(f"SIPDRILL_REQUIRE_DOCKER=1 but {_PROBLEM}")
    name = f"{LAB_PREFIX}dl-{secrets.token_hex(3)}"
    tmp = tmp_path_factory.mktemp("docker-lab")
    global DNS
    topology, DNS = lab_topology(tmp, name)
    runtime = DockerLab(name, tmp / "state" / name, topology_file=topology)
    try:
        runtime.up(dns_only(runtime.topology_file or TOPOLOGY), timeout=60)
        yield runtime
    finally:
        runtime.down()
    assert leftovers_of(name) == set()


@pytest.fixture
def clean(lab: DockerLab) -> Iterator[DockerLab]:
    """Each test starts and ends with no fault in force and DNS answering."""
    yield lab
    lab.heal_all()
    assert FaultJournal(lab.journal).records() == []
    assert answers(), "the lab DNS server does not answer after the test"


def test_up_status_token_and_a_second_up_refused(clean: DockerLab) -> None:
    (row,) = clean.status()
    assert row == {
        "name": "dns",
        "role": "dns",
        "address": DNS,
        "container": f"{clean.lab}-dns",
        "health": "healthy",
    }
    assert ask() == dns.rcode.NOERROR
    # The control API from the host, at the container's address, with the lab's token.
    with httpx.Client(headers={"Authorization": f"Bearer {clean.token}"}) as http:
        assert http.get(f"http://{DNS}:8080/faults").status_code == 200
    with pytest.raises(OperationError, match="already"):
        clean.up(dns_only(clean.topology_file or TOPOLOGY))
    assert [r["health"] for r in clean.status()] == ["healthy"]  # the refusal changed nothing


@pytest.mark.parametrize("kind", ["cut", "pause", "disconnect"])
def test_faults_that_silence_the_server_and_their_undo(clean: DockerLab, kind: str) -> None:
    fault = clean.inject(kind, "dns")
    assert fault["containers"] == [f"{clean.lab}-dns"]
    assert [r["kind"] for r in FaultJournal(clean.journal).records()] == [kind]
    assert silent()
    assert f"{kind} {fault['id']}" in clean.status()[0]["health"]
    clean.undo(fault["id"])
    clean.undo(fault["id"])  # idempotent
    assert answers(10)
    assert FaultJournal(clean.journal).records() == []


@pytest.mark.parametrize("kind", ["crash", "stop"])
def test_crash_and_stop_then_undo_starts_the_container(clean: DockerLab, kind: str) -> None:
    fault = clean.inject(kind, "core")  # a network target: every service homed on it
    assert fault["containers"] == [f"{clean.lab}-dns"]
    assert clean.status()[0]["health"].startswith("exited")
    assert silent()
    clean.undo(fault["id"])
    assert answers()


def test_restart_waits_until_healthy_and_leaves_nothing_to_heal(clean: DockerLab) -> None:
    clean.inject("restart", "dns")
    assert clean.status()[0]["health"] == "healthy"
    assert FaultJournal(clean.journal).records() == []
    assert answers()


def test_dns_outage_through_the_control_api(clean: DockerLab) -> None:
    servfail = clean.inject("dns-outage", "dns", mode="servfail")
    assert ask() == dns.rcode.SERVFAIL
    clean.undo(servfail["id"])
    assert ask() == dns.rcode.NOERROR
    drop = clean.inject("dns-outage", "dns")  # mode drop by default
    assert silent()
    clean.undo(drop["id"])
    assert ask() == dns.rcode.NOERROR


def test_degrade_delays_answers_without_netem(clean: DockerLab) -> None:
    slow = clean.inject("degrade", "dns", delay_ms=300, jitter_ms=20)
    t0 = time.monotonic()
    assert ask(3.0) == dns.rcode.NOERROR
    assert time.monotonic() - t0 >= 0.25
    clean.undo(slow["id"])
    t0 = time.monotonic()
    assert ask() == dns.rcode.NOERROR
    assert time.monotonic() - t0 < 0.2


def test_what_the_runtime_cannot_do_is_refused_and_changes_nothing(clean: DockerLab) -> None:
    with pytest.raises(FaultError, match=r"unknown target 'pool9'.*services: dns"):
        clean.inject("cut", "pool9")
    with pytest.raises(FaultError, match="not supported"):
        clean.inject("flood", "dns")
    with pytest.raises(FaultError, match="needs `peer`"):
        clean.inject("partition", "dns")
    with pytest.raises(FaultError, match="unexpected parameters"):
        clean.inject("cut", "dns", delay_ms=5)
    with pytest.raises(FaultError, match="mode must be drop or servfail"):
        clean.inject("dns-outage", "dns", mode="nxdomain")
    assert FaultJournal(clean.journal).records() == []
    assert ask() == dns.rcode.NOERROR


def test_the_cli_drives_the_docker_runtime(clean: DockerLab) -> None:
    runner = CliRunner()
    state = str(clean.state_dir.parent)
    common = ["--runtime", "docker", "--state-dir", state]
    status = runner.invoke(app, ["lab", "status", clean.lab, *common])
    assert status.exit_code == 0, status.output
    assert DNS in status.output and "healthy" in status.output
    fault = runner.invoke(app, ["lab", "fault", clean.lab, "cut", "dns", *common])
    assert fault.exit_code == 0, fault.output
    assert silent()
    refused = runner.invoke(app, ["lab", "fault", clean.lab, "partition", "dns", *common])
    assert refused.exit_code == 1
    healed = runner.invoke(app, ["lab", "heal", clean.lab, *common])
    assert healed.exit_code == 0, healed.output
    assert answers(10)


def test_a_crashed_orchestrator_is_healed_from_the_journal(clean: DockerLab) -> None:
    program = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from sipdrill.orchestrator.docker_lab import DockerLab
        lab = DockerLab({clean.lab!r}, Path({str(clean.state_dir)!r}))
        lab.inject("dns-outage", "dns", mode="servfail")
        lab.inject("degrade", "dns", delay_ms=200)
        lab.inject("cut", "core")
        os._exit(0)  # a crash: nothing undone, nothing closed
        """
    )
    subprocess.run([sys.executable, "-c", program], check=True, timeout=120)
    records = FaultJournal(clean.journal).records()
    assert [r["kind"] for r in records] == ["dns-outage", "degrade", "cut"]
    assert silent()
    DockerLab(clean.lab, clean.state_dir).heal_all()  # a new orchestrator
    assert FaultJournal(clean.journal).records() == []
    t0 = time.monotonic()
    assert ask() == dns.rcode.NOERROR  # not SERVFAIL, not delayed
    assert time.monotonic() - t0 < 0.2


INNER_TEST = """
from pathlib import Path
import pytest
from sipdrill.orchestrator.compose import docker_plan
from sipdrill.orchestrator.docker_lab import DockerLab
from sipdrill.orchestrator.plan import Role
from sipdrill.topology import load_topology

TOPOLOGY = Path({topology!r})


@pytest.fixture
def lab(tmp_path):
    runtime = DockerLab({name!r}, tmp_path / "state", topology_file=TOPOLOGY)
    try:
        specs = [s for s in docker_plan(load_topology(TOPOLOGY).topology) if s.role is Role.DNS]
        runtime.up(specs, timeout=60)
        yield runtime
    finally:
        runtime.down()


def test_fails_on_purpose(lab):
    lab.inject("cut", "dns")
    print("made", lab.lab)
    assert False, "this test fails on purpose"
"""


def test_a_failing_test_leaves_no_container_network_or_volume(
    lab: DockerLab, tmp_path: Path
) -> None:
    """Another lab on the same subnets cannot start while this module's is up:
    the inner test's lab takes its turn after this module's lab is down."""
    lab.down()
    assert leftovers_of(lab.lab) == set()
    name = f"{LAB_PREFIX}inner-{secrets.token_hex(3)}"
    test_file = tmp_path / "test_fails_on_purpose.py"
    topology = tmp_path / "topology.yaml"
    topology.write_text(topology_on_free_subnets(name)[0])
    test_file.write_text(INNER_TEST.format(topology=str(topology), name=name))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-s",
            "-p",
            "no:cacheprovider",
            "--tb=short",
            str(test_file),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 failed" in proc.stdout, proc.stdout[-3000:]
    assert f"made {name}" in proc.stdout  # it did make a lab before failing
    assert leftovers_of(name) == set()
    assert lab.down() == []  # down twice: nothing to do


def test_lab_up_and_down_from_the_cli_heal_and_remove_everything(tmp_path: Path) -> None:
    """`sipdrill lab up --runtime docker` (every server role, no clients), a
    fault left in force, then `sipdrill lab down` heals it and removes the lab."""
    name = f"{LAB_PREFIX}cli-{secrets.token_hex(3)}"
    topology, _ = lab_topology(tmp_path, name)
    common = ["--runtime", "docker", "--state-dir", str(tmp_path / "state")]
    runner = CliRunner()
    try:
        up = runner.invoke(app, ["lab", "up", str(topology), *common])
        assert up.exit_code == 0, up.output
        for service in ("dns", "pool1", "backup-pool1", "pool2", "backup-pool2"):
            assert service in up.output
        assert up.output.count("│ healthy") == 5  # the status table
        fault = runner.invoke(app, ["lab", "fault", name, "cut", "site2", *common])
        assert fault.exit_code == 0, fault.output
        journal = tmp_path / "state" / name / "faults.json"
        assert [r["kind"] for r in FaultJournal(journal).records()] == ["cut"]
        down = runner.invoke(app, ["lab", "down", name, *common])
        assert down.exit_code == 0, down.output
        assert "stopped 5 service(s)" in down.output
        assert not journal.exists()
        assert not (tmp_path / "state" / name / "docker-lab.json").exists()
    finally:
        DockerLab(name, tmp_path / "state" / name).down()
    assert leftovers_of(name) == set()
