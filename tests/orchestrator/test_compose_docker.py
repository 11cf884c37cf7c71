"""The generated Compose file on a real engine: `docker-compose up -d` alone
brings the lab to healthy and every client to full service, replicas of the
clients service simulate different users, the published control ports answer
on 127.0.0.1, and `docker-compose down -v` leaves nothing.

Needs a Docker engine, a Compose CLI and the image (`make image`); skipped
otherwise, unless SIPDRILL_REQUIRE_DOCKER=1 (CI), which turns the skip into a
failure.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from docker_labkit import LAB_PREFIX, REQUIRED, docker_marks, lab_problem, leftovers_of
from test_docker_lab import topology_on_free_subnets

from sipdrill.orchestrator.docker_runtime import DockerRuntime, compose_command

COMPOSE = compose_command()

_PROBLEM = lab_problem(compose=True)
_REQUIRED = REQUIRED

pytestmark = docker_marks(_PROBLEM, slow=True)

CLIENTS_PER_REPLICA = 10


@dataclass
class ComposeLab:
    name: str
    directory: Path

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert COMPOSE is not None
        return subprocess.run(
            [*COMPOSE, "--ansi", "never", "-p", self.name, "-f", "compose.yaml", *args],
            cwd=self.directory,
            env={**os.environ, "SIPDRILL_CONTROL_TOKEN": "lab"},
            capture_output=True,
            text=True,
            timeout=300,
            check=check,
        )

    def containers(self) -> dict[str, Any]:
        with DockerRuntime.from_env() as rt:
            return {c.name: c.attrs for c in rt.lab_containers(self.name)}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeLab]:
    """The generated file, as a user would: `sipdrill lab compose ... > compose.yaml`
    in a directory with the topology, then `docker-compose up -d` alone."""
    if _PROBLEM:
        pytest.fail(f"SIPDRILL_REQUIRE_DOCKER=1 but {_PROBLEM}")
    name = f"{LAB_PREFIX}compose-{secrets.token_hex(3)}"
    directory = tmp_path_factory.mktemp("compose")
    (directory / "topologies").mkdir()
    # paired-pools on free subnets: a lab of compose.yaml or another test run may be up.
    text, _ = topology_on_free_subnets(name)
    (directory / "topologies/paired-pools.yaml").write_text(text)
    generated = subprocess.run(
        [
            sys.executable, "-m", "sipdrill", "lab", "compose", "topologies/paired-pools.yaml",
            "--clients", str(CLIENTS_PER_REPLICA), "--lab", name, "--port-base", "0",
        ],
        cwd=directory, capture_output=True, text=True, check=True,
    )  # fmt: skip
    (directory / "compose.yaml").write_text(generated.stdout)
    lab = ComposeLab(name, directory)
    try:
        t0 = time.monotonic()
        up = lab.compose("up", "-d", "--scale", "clients=2", check=False)
        assert up.returncode == 0, up.stdout + up.stderr
        print(f"docker-compose up -d returned after {time.monotonic() - t0:.1f} s")
        yield lab
    finally:
        lab.compose("down", "-v", "-t", "3", check=False)
        with DockerRuntime.from_env() as rt:  # whatever compose could not remove
            rt.remove_lab(name)
    assert leftovers_of(name) == set()


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(1.0)
    raise AssertionError(f"{what}: not after {timeout:g} s (last: {last!r})")


def _replica_counts(lab: ComposeLab) -> dict[str, dict[str, Any]]:
    out = {}
    # The clients' API wants the lab's token, as every control API does (`lab` here).
    with httpx.Client(timeout=3.0, headers={"Authorization": "Bearer lab"}) as http:
        for name, attrs in lab.containers().items():
            if attrs["Config"]["Labels"].get("sipdrill.service") != "clients":
                continue
            address = attrs["NetworkSettings"]["Networks"][f"{lab.name}_core"]["IPAddress"]
            try:
                out[name] = http.get(f"http://{address}:8080/counts").json()
            except httpx.HTTPError:
                out[name] = {}
    return out


def test_every_container_becomes_healthy(lab: ComposeLab) -> None:
    def healthy() -> dict[str, str] | None:
        health = {
            n: (a["State"].get("Health") or {}).get("Status", "")
            for n, a in lab.containers().items()
        }
        return health if len(health) == 7 and set(health.values()) == {"healthy"} else None

    health = _wait(healthy, 120, "7 healthy containers")
    assert {f"{lab.name}-{s}" for s in ("dns", "pool1", "pool2")} <= set(health)


def test_every_client_reaches_full_service_on_its_home_pool(lab: ComposeLab) -> None:
    def all_full() -> dict[str, dict[str, Any]] | None:
        counts = _replica_counts(lab)
        ok = len(counts) == 2 and all(
            c.get("by_mode", {}).get("FullService") == CLIENTS_PER_REPLICA for c in counts.values()
        )
        return counts if ok else None

    counts = _wait(all_full, 120, "20 clients in full service")
    by_home = sorted(
        tuple(sorted((p, m["FullService"]) for p, m in c["by_home_pool"].items() if m))
        for c in counts.values()
    )
    # Replica slots: users 1-10, then 11-20, drawn across the home pools in
    # proportion (151 and 152 users): five of each pool in each replica.
    assert by_home == [
        (("pool1.lab.local", 5), ("pool2.lab.local", 5)),
        (("pool1.lab.local", 5), ("pool2.lab.local", 5)),
    ]
    for c in counts.values():
        assert c["by_pool"] == {p: m for p, m in c["by_home_pool"].items()}  # at home


def test_replicas_say_which_users_they_took(lab: ComposeLab) -> None:
    logs = lab.compose("logs", "--no-color", "clients").stdout
    assert "clients replica 0: users 1 to 10" in logs
    assert "clients replica 1: users 11 to 20" in logs


#: Run as root in a container: the capabilities and user of every process
#: there, and of this one (what a fault's `docker exec --user 0` gets).
PROCESSES = r"""
import json, os
def status(pid):
    lines = open(f"/proc/{pid}/status").read().splitlines()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    caps = {k: int(fields[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    return {"uid": int(fields["Uid"].split()[0]), "nnp": int(fields["NoNewPrivs"]), **caps}
out = {"self": {"pid": os.getpid(), **status("self")}, "procs": []}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        cmd = [a.decode() for a in open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0") if a]
        out["procs"].append({"pid": int(pid), "cmd": cmd, **status(pid)})
    except OSError:
        pass
print(json.dumps(out))
"""
NET_ADMIN = 1 << 12
UNPRIVILEGED = 10001  # the image's sipdrill user


def test_services_run_unprivileged_and_faults_keep_net_admin(lab: ComposeLab) -> None:
    """Each service process runs as the image's user with no capability (those
    that start as root for their port forward drop every one of them, bounding
    set included); a root exec in its container, as a fault does, still has
    NET_ADMIN: it comes from the container's cap_add, not from the service."""
    _wait(lambda: len(lab.containers()) == 7, 60, "7 containers")
    with DockerRuntime.from_env() as rt:
        for c in rt.lab_containers(lab.name):
            result = c.exec_run(["python3", "-c", PROCESSES], user="0")
            assert result.exit_code == 0, result.output
            seen = json.loads(result.output.decode())
            assert seen["self"]["uid"] == 0 and seen["self"]["CapEff"] & NET_ADMIN, c.name
            # PID 1 is Compose's init, whose command line holds the service's.
            services = [p for p in seen["procs"] if p["pid"] != 1 and "serve" in p["cmd"]]
            assert len(services) == 1, (c.name, seen["procs"])
            service = services[0]
            assert service["uid"] == UNPRIVILEGED, (c.name, service)
            for cap in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
                assert service[cap] == 0, (c.name, cap, service)
            # Nothing else of the lab's runs as root either (health checks
            # included), but for a check caught on its way in: runc setting up
            # its exec, or between setpriv and the check's own exec.
            others = [
                p for p in seen["procs"]
                if p["pid"] not in (1, seen["self"]["pid"])
                and p["cmd"][:1] != ["setpriv"] and p["cmd"][:2] != ["runc", "init"]
            ]
            assert {p["uid"] for p in others} == {UNPRIVILEGED}, (c.name, others)
            init = next(p for p in seen["procs"] if p["pid"] == 1)
            if c.attrs["Config"]["User"] == "root":  # a pool or Backup Service: its forward
                assert service["CapBnd"] == 0 and service["nnp"] == 1, (c.name, service)
            else:  # the DNS server, the clients: nothing in the container is root
                assert init["uid"] == UNPRIVILEGED and init["CapEff"] == 0, (c.name, init)


def test_published_control_ports_answer_on_loopback(lab: ComposeLab) -> None:
    """Pools listen on their site address; their published port (Docker maps
    it on the core leg) is forwarded there."""
    with httpx.Client(timeout=5.0, headers={"Authorization": "Bearer lab"}) as http:
        for service, fqdn in (("pool1", "pool1.lab.local"), ("backup-pool2", "pool2.lab.local")):
            port = lab.compose("port", service, "8080").stdout.strip()
            assert port.startswith("127.0.0.1:"), port
            r = http.get(f"http://{port}/health")
            assert r.status_code == 200 and r.json()["pool"] == fqdn
        port = lab.compose("port", "pool1", "8080").stdout.strip()
        assert http.get(f"http://{port}/status").status_code == 200  # the token `lab` works
        dns_port = lab.compose("port", "dns", "8080").stdout.strip()
        assert http.get(f"http://{dns_port}/health").status_code == 200
    for attrs in lab.containers().values():
        for bindings in (attrs["HostConfig"]["PortBindings"] or {}).values():
            assert all(b["HostIp"] == "127.0.0.1" for b in bindings)
