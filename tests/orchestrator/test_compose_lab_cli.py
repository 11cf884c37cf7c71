"""A lab started by hand with `docker-compose up -d`, as a user would, driven
by sipdrill with no state of its own: every fault kind by `sipdrill lab fault`
and `lab heal`, then `sipdrill drill run` attaching to it (and leaving it up),
then `lab down`. Also: the project is named after the lab by the `.env` that
`lab compose -o` writes (not after the directory), and a clients replica past
the topology's last user is up, healthy and idle.

Needs a Docker engine, a Compose CLI and the image (`make image`); skipped
otherwise, unless SIPDRILL_REQUIRE_DOCKER=1 (CI), which turns the skip into a
failure.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode
import httpx
import pytest
from docker_labkit import LAB_PREFIX, REQUIRED, docker_marks, lab_problem, leftovers_of
from test_docker_lab import topology_on_free_subnets
from typer.testing import CliRunner

from sipdrill.cli import app
from sipdrill.orchestrator.docker_runtime import DockerRuntime, compose_command
from sipdrill.orchestrator.fault_model import FaultJournal

COMPOSE = compose_command()

_PROBLEM = lab_problem(compose=True)
_REQUIRED = REQUIRED

pytestmark = docker_marks(_PROBLEM, slow=True)

TOKEN = "not-the-default"
#: Five users (alice, bob, carol, p1u001, p2u001), three per replica, three
#: replicas: the second has what is left (two), the third none (idle).
PER_REPLICA, REPLICAS = 3, 3
TIMERS = """timers:
  failover_detection_interval: 6
  failback_interval: 6
  sync_interval: 5
  keepalive_interval: 5
  keepalive_pong_timeout: 3
"""
DRILL = """\
name: on-a-compose-lab
topology: topologies/paired-pools.yaml
runtime: docker
timers:
  sync_interval: 7
clients: {count: 5}
steps:
  - wait: {mode: full}
    timeout: 90
  - fault: {kind: cut, target: site1, id: cut}
  - wait: {mode: resiliency, users: "pool1.lab.local:*", pool: pool2.lab.local}
    timeout: 90
    measure: time_to_resiliency
  - heal: cut
  - wait: {mode: full, users: "pool1.lab.local:*", pool: pool1.lab.local}
    timeout: 90
"""


def _small_topology(name: str) -> str:
    text, _ = topology_on_free_subnets(name)
    text = re.sub(r"count: 150", "count: 1", text)
    return re.sub(r"^timers:\n(?:  .*\n)+", TIMERS, text, flags=re.MULTILINE)


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"{what}: not after {timeout:g} s (last: {last!r})")


def _answers(url: str, timeout: float = 1.0) -> float | None:
    """Seconds a GET of ``url`` took, or None without an answer."""
    t0 = time.monotonic()
    try:
        httpx.get(url, timeout=timeout)
    except httpx.HTTPError:
        return None
    return time.monotonic() - t0


def _rcode(server: str) -> int | None:
    query = dns.message.make_query("_sipinternaltls._tcp.lab.local", "SRV")
    try:
        return int(dns.query.udp(query, server, timeout=1.0).rcode())
    except (dns.exception.Timeout, OSError):
        return None


def test_a_lab_started_with_docker_compose_is_fully_drivable(tmp_path: Path) -> None:
    if _PROBLEM:
        pytest.fail(f"SIPDRILL_REQUIRE_DOCKER=1 but {_PROBLEM}")
    assert COMPOSE is not None
    name = f"{LAB_PREFIX}hand-{secrets.token_hex(3)}"
    home = tmp_path / "Not The Lab"  # the project would be `notthelab` without .env
    (home / "topologies").mkdir(parents=True)
    (home / "topologies/paired-pools.yaml").write_text(_small_topology(name))
    env = {**os.environ, "SIPDRILL_CONTROL_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    env.pop("COMPOSE_PROJECT_NAME", None)
    subprocess.run(
        [
            sys.executable, "-m", "sipdrill", "lab", "compose", "topologies/paired-pools.yaml",
            "--clients", str(PER_REPLICA), "--lab", name, "--port-base", "0",
            "-o", "compose.yaml",
        ],
        cwd=home, env=env, check=True, capture_output=True,
    )  # fmt: skip
    assert f"COMPOSE_PROJECT_NAME={name}" in (home / ".env").read_text()
    cli = CliRunner(env={"COLUMNS": "200"})
    state = ["--runtime", "docker", "--state-dir", str(tmp_path / "state")]  # empty: no state

    def sipdrill(*args: str) -> str:
        result = cli.invoke(app, [*args, *state])
        assert result.exit_code == 0, f"sipdrill {' '.join(args)}: {result.output}"
        return str(result.output)

    try:
        t0 = time.monotonic()
        up = subprocess.run(
            [*COMPOSE, "--ansi", "never", "up", "-d", "--scale", f"clients={REPLICAS}"],
            cwd=home, env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert up.returncode == 0, up.stdout + up.stderr
        with DockerRuntime.from_env() as rt:
            containers = {c.name: c for c in rt.lab_containers(name)}
            # Named after the lab, not after the directory: .env beside compose.yaml.
            assert {c.labels["com.docker.compose.project"] for c in containers.values()} == {
                name
            }
            assert rt.find_network(f"{name}_core") is not None
        address = {
            c.labels["sipdrill.service"]: next(
                n["IPAMConfig"]["IPv4Address"]
                for n in c.attrs["NetworkSettings"]["Networks"].values()
                if (n.get("IPAMConfig") or {}).get("IPv4Address")
            )
            for c in containers.values()
            if c.labels["sipdrill.service"] != "clients"
        }

        def all_healthy() -> bool:
            with DockerRuntime.from_env() as rt:
                states = [c.attrs["State"] for c in rt.lab_containers(name)]
            return len(states) == 5 + REPLICAS and all(
                (s.get("Health") or {}).get("Status") == "healthy" for s in states
            )

        _wait(all_healthy, 180, "every container healthy, the idle replica too")
        print(f"docker-compose up -d to every container healthy: {time.monotonic() - t0:.1f} s")
        logs = subprocess.run(
            [*COMPOSE, "--ansi", "never", "logs", "--no-color", "clients"],
            cwd=home, env=env, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert "users 1 to 3" in logs and "users 4 to 5 (2 of 3" in logs, logs
        assert logs.count("no users left") == 1, logs  # one clear line, no restarts
        status = sipdrill("lab", "status", name)
        assert status.count("healthy") == 5 + REPLICAS, status

        # Every fault kind, with the token the lab runs with and a plan from
        # the topology its containers mount; each healed by `lab heal`.
        pool1 = f"http://{address['pool1']}:8080/health"
        pool2 = f"http://{address['pool2']}:8080/health"
        journal = tmp_path / "state" / name / "faults.json"
        assert _answers(pool1) is not None and _rcode(address["dns"]) == dns.rcode.NOERROR
        faults: list[tuple[list[str], Any]] = [
            (["cut", "site1"], lambda: _answers(pool1) is None),
            (["disconnect", "backup-pool1"], None),
            (["partition", "site1", "--peer", "site2"], None),
            (["degrade", "pool2", "--delay-ms", "300"], lambda: (_answers(pool2, 3) or 0) > 0.25),
            (["crash", "backup-pool2"], None),
            (["stop", "backup-pool1"], None),
            (["pause", "dns"], lambda: _rcode(address["dns"]) is None),
            (["restart", "backup-pool2"], None),
            (
                ["dns-outage", "dns", "--mode", "servfail"],
                lambda: _rcode(address["dns"]) == dns.rcode.SERVFAIL,
            ),
        ]
        t0 = time.monotonic()
        for args, in_force in faults:
            out = sipdrill("lab", "fault", name, *args)
            assert re.search(rf"fault \S+: {args[0]} on {args[1]}", out), out
            if args[0] != "restart":  # over when it returns: nothing to heal
                assert [r["kind"] for r in FaultJournal(journal).records()] == [args[0]]
            if in_force is not None:
                assert in_force(), f"{args}: not in force"
            assert "every fault healed" in sipdrill("lab", "heal", name)
            assert FaultJournal(journal).records() == []
        _wait(all_healthy, 120, "every container healthy after the heals")
        print(f"nine faults injected and healed by the CLI: {time.monotonic() - t0:.1f} s")
        assert _answers(pool1) is not None and _rcode(address["dns"]) == dns.rcode.NOERROR

        # A drill on the running lab: attached, not started; it stays up after.
        (home / "drill.yaml").write_text(DRILL)
        reports = tmp_path / "reports"
        proc = subprocess.run(
            [
                sys.executable, "-m", "sipdrill", "drill", "run", "drill.yaml", "--runtime",
                "docker", "--state-dir", str(tmp_path / "drill-state"), "--report-dir",
                str(reports),
            ],
            cwd=home, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True,
            text=True, timeout=420, check=False,
        )  # fmt: skip
        (report_dir,) = reports.iterdir()
        report = json.loads((report_dir / "report.json").read_text())
        assert proc.returncode == 0, (report["error"], proc.stderr[-3000:])
        assert report["status"] == "passed" and report["healed"]
        assert report["lab"]["attached"] is True
        notes = " | ".join(report["lab"]["notes"])
        assert "sync_interval 5.0 (the drill's: 7.0)" in notes, notes
        assert "no users left (idle)" in notes and "simulates" not in notes, notes
        assert "stays up" in proc.stderr and "stopping the lab" not in proc.stderr
        assert 3 <= report["metrics"]["time_to_resiliency"] <= 90
        print(f"attached drill: {report['duration']:.1f} s, metrics {report['metrics']}")
        print("notes:", notes)
        assert all_healthy()  # still up, nothing left broken

        down = sipdrill("lab", "down", name)
        assert f"stopped {5 + REPLICAS} service(s)" in down, down
    finally:
        subprocess.run(
            [*COMPOSE, "--ansi", "never", "down", "-v", "-t", "3"],
            cwd=home, env=env, capture_output=True, timeout=300, check=False,
        )  # fmt: skip
        with DockerRuntime.from_env() as rt:
            rt.remove_lab(name)
    assert leftovers_of(name) == set()
