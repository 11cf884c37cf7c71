"""Short seeded chaos runs on a real lab (`sipdrill chaos run`): the local
runtime (processes on loopback, SIGSTOP and SIGKILL faults) and docker
(iptables/tc cuts, disconnects, pauses, partitions). Each must end valid:
nothing acknowledged lost outside the RPO, nothing duplicated, every client
home, no fault left behind; and a Ctrl-C half-way heals everything."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_drill_local import _lab_processes, isolated_topology

from sipdrill.orchestrator.chaos.nemesis import LabShape, NemesisConfig, NemesisOpKind, schedule
from sipdrill.orchestrator.plan import RuntimeKind
from sipdrill.topology import load_topology

pytestmark = pytest.mark.slow

#: Seed 4 on paired-pools, 50 s: both pools cut or crashed and failed over
#: (the CMS forced over first), a site crash, DNS cut and SERVFAIL.
LOCAL_SEED = 4
LOCAL_OPTS = ["--duration", "50", "--gap", "3,10", "--hold", "4,12", "--clients", "12",
              "--home-bound", "90"]


def chaos(tmp_path: Path, topology: Path, *args: str, **popen: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sipdrill", "chaos", "run", str(topology),
         "--state-dir", str(tmp_path / "state"), "--out", str(tmp_path / "run"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen,
    )  # fmt: skip


def verdict_of(tmp_path: Path) -> dict[str, Any]:
    return dict(json.loads((tmp_path / "run" / "verdict.json").read_text()))


def _why(doc: dict[str, Any], out: str, err: str) -> str:
    """A failed run in full: each violation, then the ends of the output (a
    tuple's repr would be cut in the middle by pytest)."""
    verdict = doc.get("verdict") or {}
    lines = [f"status {doc.get('status')}, error {doc.get('error')}"]
    lines += [f"{v.get('rule')}: {v.get('message')}" for v in verdict.get("violations", [])]
    lines += [f"figures: {json.dumps(verdict.get('figures'))}", "--- stdout", out[-4000:],
              "--- stderr", err[-2000:]]
    return "\n".join(lines)


def test_a_seeded_local_run_is_valid(tmp_path: Path) -> None:
    topology = isolated_topology(tmp_path)
    planned = schedule(
        LOCAL_SEED, LabShape.from_topology(load_topology(topology).topology),
        NemesisConfig(duration=50, gap=(3, 10), hold=(4, 12)), RuntimeKind.LOCAL,
    )
    assert sum(op.op is NemesisOpKind.POOL_FAILOVER for op in planned) == 2
    start = time.monotonic()
    proc = chaos(tmp_path, topology, "--seed", str(LOCAL_SEED), *LOCAL_OPTS)
    out, err = proc.communicate(timeout=300)
    took = time.monotonic() - start
    doc = verdict_of(tmp_path)
    assert proc.returncode == 0, _why(doc, out, err)
    assert doc["status"] == "valid" and doc["seed"] == LOCAL_SEED
    figures = doc["verdict"]["figures"]
    print(f"local chaos run: {took:.0f} s", json.dumps(figures))
    assert figures["faults_injected"] >= 6 and figures["faults_refused"] == 0
    assert figures["pool_failovers"] == 2 and figures["pool_failbacks"] == 2
    assert figures["writes_checked"] >= 100
    assert figures["lost_outside_rpo"] == 0 and figures["duplicates"] == 0
    assert figures["leftovers"] == 0
    # The history replays: the file alone gives the same verdict.
    check = subprocess.run(
        [sys.executable, "-m", "sipdrill", "chaos", "check", str(tmp_path / "run/history.jsonl"),
         "--json"], capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert check.returncode == 0 and json.loads(check.stdout) == doc["verdict"]
    # The history's header holds the schedule the seed gives.
    header = json.loads((tmp_path / "run/history.jsonl").read_text().splitlines()[0])
    assert header["value"]["schedule"] == [op.to_json() for op in planned]
    assert _lab_processes(tmp_path / "state") == []


def test_ctrl_c_heals_and_stops_the_lab(tmp_path: Path) -> None:
    topology = isolated_topology(tmp_path)
    proc = chaos(
        tmp_path, topology, "--seed", "2", "--duration", "60", "--gap", "1,2", "--hold", "30,40",
        "--kinds", "cut", "--clients", "4",
    )
    history = tmp_path / "run" / "history.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # until the first fault is in force
        if history.exists() and '"ok", "f": "fault"' in history.read_text():
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail(f"no fault injected: {proc.communicate()}")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out[-2000:], err[-2000:])
    assert verdict_of(tmp_path)["status"] == "interrupted"
    lines = [json.loads(line) for line in history.read_text().splitlines()]
    assert [(o["f"], o["type"]) for o in lines if o["f"] == "heal-all"] == [
        ("heal-all", "invoke"), ("heal-all", "ok"),
    ]
    assert _lab_processes(tmp_path / "state") == []
    assert not (tmp_path / "state" / "paired-pools" / "faults.json").exists()


# --- docker ----------------------------------------------------------------------


def _docker_problem() -> str | None:
    from docker_labkit import docker_problem

    from sipdrill.orchestrator.docker_runtime import compose_command

    problem = docker_problem()
    if problem is None and compose_command() is None:
        problem = "no Compose CLI (docker compose or docker-compose)"
    return problem


@pytest.mark.docker
def test_a_seeded_docker_run_is_valid(tmp_path: Path) -> None:
    problem = _docker_problem()
    if problem:
        if os.environ.get("SIPDRILL_REQUIRE_DOCKER") == "1":
            pytest.fail(f"SIPDRILL_REQUIRE_DOCKER=1 but {problem}")
        pytest.skip(f"docker tests: {problem}")
    from docker_labkit import LAB_PREFIX
    from test_docker_lab import topology_on_free_subnets

    from sipdrill.orchestrator.docker_runtime import DockerRuntime

    lab = f"{LAB_PREFIX}chaos-{secrets.token_hex(3)}"
    topology = tmp_path / "topology.yaml"
    topology.write_text(topology_on_free_subnets(lab)[0])
    try:
        proc = chaos(tmp_path, topology, "--runtime", "docker", "--seed", str(DOCKER_SEED),
                     *DOCKER_OPTS)
        out, err = proc.communicate(timeout=400)
    finally:
        with DockerRuntime.from_env() as rt:
            leftovers = rt.labs(lab)
            rt.remove_lab(lab)
    assert leftovers == set(), "the run left containers, networks or volumes"
    doc = verdict_of(tmp_path)
    assert proc.returncode == 0, _why(doc, out, err)
    figures = doc["verdict"]["figures"]
    print("docker chaos run:", json.dumps(figures))
    assert figures["faults_injected"] >= 4 and figures["pool_failovers"] >= 1
    assert figures["writes_checked"] >= 50
    assert figures["lost_outside_rpo"] == 0 and figures["leftovers"] == 0


DOCKER_SEED = 8
DOCKER_OPTS = ["--duration", "45", "--gap", "3,8", "--hold", "4,10", "--clients", "8",
               "--home-bound", "90"]
