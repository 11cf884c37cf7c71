"""The shipped budget DR drill (scenarios/budget-dr.yaml, seed 001) run as a
user runs it, `sipdrill drill run`: on the local runtime, and once on docker.

The primary site is cut; with no backup registrar pool1's users lose service;
every user of pool1 is force-moved to drpool in one request, the last nightly
export imported there, DNS repointed; the clients come back on drpool. The RPO
is exact: every pool1 user wrote one contact after the export, so 202 writes
are lost and no more; the DR pool's store holds the export's contacts and not
those writes. Only the topology's networks (and the clients count) differ from
the shipped file, so CI runs the drill a user would run.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import labnet
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "scenarios" / "budget-dr.yaml"
TOPOLOGY = ROOT / "topologies" / "budget-dr.yaml"
#: budget-dr.yaml's pool1 users: alice, bob and 200 generated ones.
POOL1_USERS = 202
#: Their contacts in the topology (8 per generated user, 1 each for alice and bob).
SEEDED_CONTACTS = 200 * 8 + 2


def _drill(tmp_path: Path, topology: str, *, runtime: str, clients: int) -> Path:
    (tmp_path / "topology.yaml").write_text(topology)
    drill = yaml.safe_load(SCENARIO.read_text())
    drill.update(topology="topology.yaml", runtime=runtime, clients={"count": clients})
    path = tmp_path / "budget-dr.yaml"
    path.write_text(yaml.safe_dump(drill, sort_keys=False))
    return path


def _run(tmp_path: Path, drill: Path, timeout: float) -> tuple[subprocess.CompletedProcess[str],
                                                              dict[str, Any]]:
    reports = tmp_path / "reports"
    proc = subprocess.run(
        [
            sys.executable, "-m", "sipdrill", "drill", "run", str(drill),
            "--state-dir", str(tmp_path / "state"), "--report-dir", str(reports),
        ],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert reports.exists(), (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    (report_dir,) = reports.iterdir()
    return proc, json.loads((report_dir / "report.json").read_text())


def _check(proc: subprocess.CompletedProcess[str], report: dict[str, Any], clients: int) -> None:
    assert proc.returncode == 0, (report["error"], proc.stderr[-3000:])
    assert report["status"] == "passed" and report["healed"]
    assert [s["status"] for s in report["steps"]] == ["passed"] * 12
    m = report["measurements"]
    print("budget-dr:", json.dumps({
        "rto": m["rto"], "rpo_writes": m["rpo_writes"], "rpo_seconds": m["rpo_seconds"],
        "reconnect": m["distributions"]["reconnect"], "metrics": report["metrics"],
    }))
    # Every client is a pool1 user: each lost service, none found a backup
    # registrar, each is back in full service on drpool.
    (fault,) = m["faults"]
    assert (fault["affected"], fault["not_recovered"]) == (clients, 0)
    d = m["distributions"]
    assert d["resiliency"]["count"] == 0 and d["full_service"]["missing"] == 0
    assert m["rto"] is not None and m["rto"] == d["full_service"]["max"]
    # Back only after the administrator's steps: the move, the import and the repoint.
    steps = {s["index"]: s for s in report["steps"]}
    repointed = steps[8]["started_at"] - fault["injected_at"]
    assert d["reconnect"]["min"] >= repointed
    # The RPO, exactly: the second write of each pool1 user came after the export.
    assert m["rpo_writes"] == POOL1_USERS
    assert 0 < m["rpo_seconds"] < steps[4]["started_at"] - steps[3]["started_at"] + 1
    moved = steps[6]["detail"]
    assert (moved["moved"], moved["failed"], moved["source_answered"]) == (POOL1_USERS, [], False)
    restored = steps[7]["detail"]
    assert (restored["users_restored"], restored["skipped"]) == (POOL1_USERS, [])
    assert restored["contacts_restored"] == SEEDED_CONTACTS + POOL1_USERS
    # The DR pool's store, read after the heal: the export's contacts, not the lost writes.
    store = report["data"]["drpool"]["store"]
    assert (store["homed_users"], store["contacts"]) == (POOL1_USERS, SEEDED_CONTACTS + POOL1_USERS)
    assert report["data"]["writes"] == {"acknowledged": 2 * POOL1_USERS, "refused": 0}


@pytest.mark.slow
def test_budget_dr_drill_on_the_local_runtime(tmp_path: Path) -> None:
    topology = TOPOLOGY.read_text() + f"\nlab:\n  loopback_network: {labnet.NET}\n"
    drill = _drill(tmp_path, topology, runtime="local", clients=12)
    proc, report = _run(tmp_path, drill, timeout=900)
    _check(proc, report, 12)
    assert report["runtime"] == "local"


@pytest.mark.slow
@pytest.mark.docker
def test_budget_dr_drill_on_docker(tmp_path: Path) -> None:
    from docker_labkit import LAB_PREFIX, build_image, docker_problem
    from test_docker_lab import topology_on_free_subnets

    from sipdrill.orchestrator.docker_runtime import DockerRuntime, compose_command

    problem = docker_problem()
    if problem and "no image" in problem and os.environ.get("SIPDRILL_BUILD_IMAGE") == "1":
        build_image()
        problem = docker_problem()
    if problem is None and compose_command() is None:
        problem = "no Compose CLI (docker compose or docker-compose)"
    if problem:
        if os.environ.get("SIPDRILL_REQUIRE_DOCKER") == "1":
            pytest.fail(f"SIPDRILL_REQUIRE_DOCKER=1 but {problem}")
        pytest.skip(f"docker tests: {problem}")
    lab = f"{LAB_PREFIX}budget-dr-{secrets.token_hex(3)}"
    topology, _dns = topology_on_free_subnets(lab, source=TOPOLOGY)
    drill = _drill(tmp_path, topology, runtime="docker", clients=12)
    try:
        proc, report = _run(tmp_path, drill, timeout=1200)
    finally:
        with DockerRuntime.from_env() as rt:
            leftovers = rt.labs(lab)
            rt.remove_lab(lab)
    assert leftovers == set(), "the drill left containers, networks or volumes"
    _check(proc, report, 12)
    assert report["runtime"] == "docker"
