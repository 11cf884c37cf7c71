"""Enterprise pools with every front end on the docker runtime: pool1 of
three front ends, each its own container at its own address (the pool FQDN
resolving to the three), sharing the pool's store on the lab's volume.
`cut pool1/fe2` (one container silent) is a front-end move: fe2's clients
come back on another front end of pool1 in seconds, nobody in resiliency
mode. `cut pool1` (every front end's container, one fault) is the pool lost:
pool1's users in resiliency mode on pool2, home after the heal.

Needs a Docker engine, a Compose CLI and the image (`make image`); skipped
otherwise, unless SIPDRILL_REQUIRE_DOCKER=1 (CI), which turns the skip into a
failure.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from docker_labkit import LAB_PREFIX, REPO, REQUIRED, docker_marks, lab_problem
from test_docker_lab import topology_on_free_subnets
from test_front_end_loss import check_front_end_move

from sipdrill.orchestrator.docker_runtime import DockerRuntime

_PROBLEM = lab_problem(compose=True)
_REQUIRED = REQUIRED

pytestmark = docker_marks(_PROBLEM, slow=True)

DRILL = """\
name: docker-front-end-loss
topology: topology.yaml
runtime: docker
timers:
  failover_detection_interval: 6
  failback_interval: 6
  keepalive_interval: 4
  keepalive_pong_timeout: 2
  sync_interval: 5
clients: {count: 12, seed: 3}
steps:
  - wait: {mode: full}
    timeout: 90
  - fault: {kind: cut, target: pool1/fe2, id: fe2}
  - sleep: 8
  - wait: {mode: full, users: "pool1.lab.local:*", pool: pool1.lab.local}
    timeout: 20
  - heal: fe2
  - fault: {kind: cut, target: pool1, id: pool1}
  - wait: {mode: resiliency, users: "pool1.lab.local:*", pool: pool2.lab.local}
    timeout: 90
    measure: time_to_resiliency
  - heal: pool1
  - wait: {mode: full, users: "pool1.lab.local:*", pool: pool1.lab.local}
    timeout: 90
    measure: time_to_failback
"""


def small_enterprise(tmp_path: Path, lab: str) -> tuple[str, str]:
    """enterprise.yaml named ``lab`` on free subnets, with pool2 on one front
    end (fewer containers) and few users. Returns (text, the site prefix
    ``10.x.``)."""
    text = (REPO / "topologies/enterprise.yaml").read_text()
    for k in (2, 3):
        fe = f"      - {{fqdn: fe{k}.pool2.lab.local, address: 172.30.2.1{k}}}\n"
        text = text.replace(fe, "")
    source = tmp_path / "enterprise.yaml"
    source.write_text(text.replace("count: 100", "count: 10"))
    moved, dns = topology_on_free_subnets(lab, source=source)
    return moved, dns.rsplit(".", 2)[0] + "."


def test_front_end_lost_is_a_move_pool_lost_is_resiliency(tmp_path: Path) -> None:
    if _PROBLEM:
        pytest.fail(f"SIPDRILL_REQUIRE_DOCKER=1 but {_PROBLEM}")
    lab = f"{LAB_PREFIX}fe-{secrets.token_hex(3)}"
    text, net = small_enterprise(tmp_path, lab)
    (tmp_path / "topology.yaml").write_text(text)
    drill = tmp_path / "drill.yaml"
    drill.write_text(DRILL)
    reports = tmp_path / "reports"
    try:
        proc = subprocess.run(
            [
                sys.executable, "-m", "sipdrill", "drill", "run", str(drill),
                "--state-dir", str(tmp_path / "state"), "--report-dir", str(reports),
            ],
            capture_output=True, text=True, timeout=420, check=False,
        )  # fmt: skip
    finally:
        with DockerRuntime.from_env() as rt:
            leftovers = rt.labs(lab)
            rt.remove_lab(lab)
    assert leftovers == set(), "the drill left containers, networks or volumes"
    assert reports.exists(), (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    (report_dir,) = reports.iterdir()
    report: dict[str, Any] = json.loads((report_dir / "report.json").read_text())
    assert proc.returncode == 0, (report["error"], proc.stderr[-3000:])
    assert report["status"] == "passed" and report["healed"] and report["runtime"] == "docker"
    assert not (tmp_path / "state" / lab / "faults.json").exists()
    # One container per front end of pool1 (the runtime's progress lines).
    for k in (1, 2, 3):
        assert f"pool1-fe{k}: healthy" in proc.stderr

    # fe2 lost: its clients, and no other, move to another front end of pool1.
    fe2 = f"{net}1.12:5061"
    pool1 = {f"{net}1.1{k}:5061" for k in (1, 2, 3)}
    injected, registered = check_front_end_move(report_dir, fe2, pool1, bound=15)
    before = [e for e in registered if e["t"] < injected["fe2"]]
    resiliency = [e for e in registered if e["mode"] == "ResiliencyMode"]
    assert all(e["t"] > injected["pool1"] for e in resiliency), "resiliency mode before pool1 lost"

    # pool1 lost (all three containers, one fault): resiliency mode on pool2.
    (pool_fault,) = [f for f in report["faults"] if f["target"] == "pool1"]
    assert pool_fault["kind"] == "cut" and pool_fault["healed_at"] is not None
    assert {e["pool"] for e in resiliency} == {"pool2.lab.local"}
    assert {e["user"] for e in resiliency} >= {
        e["user"] for e in before if e["pool"] == "pool1.lab.local"
    }
    assert not any(e["front_end_move"] for e in resiliency)
    print("docker front-end drill metrics:", json.dumps(report["metrics"]))
