"""A whole drill on the docker runtime (`sipdrill drill run`, runtime docker):
the lab as containers on per-site networks, site1 cut for real (a silent drop
on every interface of pool1 and backup-pool1), pool1's clients in resiliency
mode on pool2, home again after the heal; then site1 disconnected from its
networks, the same failover and failback. Short timers keep it near a minute.

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
from pathlib import Path
from typing import Any

import pytest
from docker_labkit import LAB_PREFIX, REQUIRED, docker_marks, lab_problem, leftovers_of
from test_docker_lab import topology_on_free_subnets

from sipdrill.orchestrator.docker_runtime import DockerRuntime

_PROBLEM = lab_problem(compose=True)
_REQUIRED = REQUIRED

pytestmark = docker_marks(_PROBLEM, slow=True)

DRILL = """\
name: docker-failover
topology: topology.yaml
runtime: docker
timers:
  failover_detection_interval: 6
  failback_interval: 6
  keepalive_interval: 5
  keepalive_pong_timeout: 3
  sync_interval: 5
clients: {count: 10}
steps:
  - wait: {mode: full}
    timeout: 90
  - fault: {kind: cut, target: site1, id: cut}
  - wait: {mode: resiliency, users: "pool1.lab.local:*", pool: pool2.lab.local}
    timeout: 120
    measure: time_to_resiliency
  - wait: {mode: full, users: "pool2.lab.local:*", pool: pool2.lab.local}
    timeout: 10
  - heal: cut
  - wait: {mode: full, users: "pool1.lab.local:*", pool: pool1.lab.local}
    timeout: 120
    measure: time_to_failback
  - fault: {kind: disconnect, target: site1, id: unplugged}
  - wait: {mode: resiliency, users: "pool1.lab.local:*", pool: pool2.lab.local}
    timeout: 120
    measure: disconnect_time_to_resiliency
  - heal: unplugged
  - wait: {mode: full, users: "pool1.lab.local:*", pool: pool1.lab.local}
    timeout: 120
    measure: disconnect_time_to_failback
expect:
  time_to_resiliency: {max: 90}
"""


def _drill(tmp_path: Path, lab: str, text: str) -> Path:
    # paired-pools on free subnets: a lab of compose.yaml or another test run may be up.
    (tmp_path / "topology.yaml").write_text(topology_on_free_subnets(lab)[0])
    drill = tmp_path / "drill.yaml"
    drill.write_text(text)
    return drill


def _run(tmp_path: Path, drill: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    reports = tmp_path / "reports"
    proc = subprocess.run(
        [
            sys.executable, "-m", "sipdrill", "drill", "run", str(drill),
            "--state-dir", str(tmp_path / "state"), "--report-dir", str(reports),
        ],
        capture_output=True, text=True, timeout=420, check=False,
    )  # fmt: skip
    assert reports.exists(), (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    (report_dir,) = reports.iterdir()
    return proc, json.loads((report_dir / "report.json").read_text())


def test_site_cut_and_disconnect_fail_over_and_come_home(tmp_path: Path) -> None:
    if _PROBLEM:
        pytest.fail(f"SIPDRILL_REQUIRE_DOCKER=1 but {_PROBLEM}")
    lab = f"{LAB_PREFIX}drill-{secrets.token_hex(3)}"
    try:
        proc, report = _run(tmp_path, _drill(tmp_path, lab, DRILL))
    finally:
        with DockerRuntime.from_env() as rt:
            leftovers = rt.labs(lab)
            rt.remove_lab(lab)
    assert leftovers == set(), "the drill left containers, networks or volumes"
    assert proc.returncode == 0, (report["error"], proc.stderr[-3000:])
    assert report["status"] == "passed" and report["healed"]
    assert report["runtime"] == "docker"
    # The clients' events reached the orchestrator from the containers: each
    # fault measured per client, every affected client back in full service.
    m = report["measurements"]
    assert m["clients"] > 0 and m["events"] > m["clients"] and m["events_lost"] == 0
    assert [f["affected"] > 0 and f["not_recovered"] == 0 for f in m["faults"]] == [True, True]
    assert m["rto"] is not None and m["distributions"]["reconnect"]["missing"] == 0
    metrics = report["metrics"]
    print("docker drill metrics:", json.dumps(metrics))
    # A silent drop is seen by the keep-alive (pong timeout 3 s) and by pool2's
    # detection interval (6 s): not before 3 s, and well within the bound.
    assert 3 <= metrics["time_to_resiliency"] <= 90
    assert metrics["time_to_failback"] <= 120
    assert 1 <= metrics["disconnect_time_to_resiliency"] <= 120
    assert metrics["disconnect_time_to_failback"] <= 120
    assert [s["status"] for s in report["steps"]] == ["passed"] * 10
    assert [(f["kind"], f["target"]) for f in report["faults"]] == [
        ("cut", "site1"),
        ("disconnect", "site1"),
    ]
    assert all(f["healed_at"] is not None for f in report["faults"])
    assert "healthy after" in proc.stderr  # progress lines while the lab came up
    assert not (tmp_path / "state" / lab / "faults.json").exists()


def test_a_drill_whose_lab_cannot_start_reports_why_and_leaves_nothing(tmp_path: Path) -> None:
    """A drill on a lab whose image does not exist: exit 1, a report that
    says why, nothing left on the engine."""
    lab = f"{LAB_PREFIX}nostart-{secrets.token_hex(3)}"
    drill = _drill(tmp_path, lab, DRILL)
    env = {**os.environ, "SIPDRILL_IMAGE": "sipdrill-test-missing:none"}
    reports = tmp_path / "reports"
    proc = subprocess.run(
        [
            sys.executable, "-m", "sipdrill", "drill", "run", str(drill),
            "--state-dir", str(tmp_path / "state"), "--report-dir", str(reports),
        ],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip
    assert proc.returncode == 2  # a lab error, not a failed expectation
    (report_dir,) = reports.iterdir()
    report = json.loads((report_dir / "report.json").read_text())
    assert report["status"] == "error"
    assert "the lab did not start" in report["error"] and "make image" in report["error"]
    assert leftovers_of(lab) == set()
