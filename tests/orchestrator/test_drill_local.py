"""A whole drill on the local runtime: real DNS, pools, Backup Services and
clients as processes on 127.78.x.y; site1 cut with SIGSTOP, registrar failover
to pool2 in resiliency mode, failback home. Short timers keep it under a minute."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def isolated_topology(tmp_path: Path) -> Path:
    """paired-pools on 127.78.x.y: a lab the user runs on the default 127.77
    range (or another test) cannot collide with the test's."""
    text = (ROOT / "topologies/paired-pools.yaml").read_text()
    path = tmp_path / "paired-pools.yaml"
    path.write_text(text + "\nlab:\n  loopback_network: 127.78.0.0/16\n")
    return path


pytestmark = pytest.mark.slow

DRILL = """\
name: quick-failover
topology: {topology}
runtime: local
timers:
  failover_detection_interval: 6
  failback_interval: 6
  keepalive_interval: 5
  keepalive_pong_timeout: 3
  sync_interval: 5
clients: {{count: 12}}
steps:
  - wait: {{mode: full}}
    timeout: 60
  - fault: {{kind: cut, target: site1, id: loss}}
  - wait: {{mode: resiliency, users: "pool1.lab.local:*", pool: pool2.lab.local}}
    timeout: 90
    measure: time_to_resiliency
  - wait: {{mode: full, users: "pool2.lab.local:*", pool: pool2.lab.local}}
    timeout: 5
  - heal: loss
  - wait: {{mode: full, users: "pool1.lab.local:*", pool: pool1.lab.local}}
    timeout: 90
    measure: time_to_failback
expect:
  time_to_resiliency: {{max: 60}}
"""


def _lab_processes(state: Path) -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"sipdrill" in cmd and str(state).encode() in cmd:
            pids.append(int(pid))
    return pids


def run_drill(tmp_path: Path, text: str, timeout: float) -> dict:
    """Run `sipdrill drill run` on ``text`` in a subprocess; its report, once it passed."""
    drill = tmp_path / "drill.yaml"
    drill.write_text(text.format(topology=isolated_topology(tmp_path)))
    state, reports = tmp_path / "state", tmp_path / "reports"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sipdrill",
            "drill",
            "run",
            str(drill),
            "--state-dir",
            str(state),
            "--report-dir",
            str(reports),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert reports.exists(), (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    (report_dir,) = reports.iterdir()
    report = json.loads((report_dir / "report.json").read_text())
    assert proc.returncode == 0, (report["error"], proc.stderr[-3000:])
    assert report["status"] == "passed" and report["healed"]
    assert _lab_processes(state) == [], "the drill left lab processes behind"
    return report


def test_registrar_failover_drill(tmp_path: Path) -> None:
    report = run_drill(tmp_path, DRILL, timeout=400)
    # Detection needs the pong timeout (3 s) and the backup's detection interval (6 s).
    assert 3 <= report["metrics"]["time_to_resiliency"] <= 60
    assert report["metrics"]["time_to_failback"] <= 90
    assert [s["status"] for s in report["steps"]] == ["passed"] * 6


def test_lab_that_cannot_start_still_reports(tmp_path: Path) -> None:
    """The DNS server's address is taken: the lab cannot start, the drill exits
    1, says why in a report, and leaves no process behind."""
    import socket

    drill = tmp_path / "drill.yaml"
    drill.write_text(DRILL.format(topology=isolated_topology(tmp_path)))
    state, reports = tmp_path / "state", tmp_path / "reports"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.78.0.53", 5353))
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "sipdrill",
                "drill",
                "run",
                str(drill),
                "--state-dir",
                str(state),
                "--report-dir",
                str(reports),
            ],
            capture_output=True,
            text=True,
            timeout=200,
        )
    assert proc.returncode == 1
    (report_dir,) = reports.iterdir()
    report = json.loads((report_dir / "report.json").read_text())
    assert report["status"] == "failed"
    assert "the lab did not start" in report["error"] and "dns" in report["error"]
    assert _lab_processes(state) == []


SITE_LOSS = """\
name: quick-site-loss
topology: {topology}
runtime: local
timers:
  failover_detection_interval: 6
  failback_interval: 6
  keepalive_interval: 5
  keepalive_pong_timeout: 3
  sync_interval: 300
clients: {{count: 8}}
steps:
  - wait: {{mode: full}}
    timeout: 60
  - admin: {{op: backup-sync, pool: pool1.lab.local}}
  - write: {{users: "pool1.lab.local:*", contacts: 1}}
  - fault: {{kind: cut, target: site1, id: loss}}
  - wait: {{mode: resiliency, users: "pool1.lab.local:*", pool: pool2.lab.local}}
    timeout: 120
  - admin: {{op: cms-failover, force: true}}
  - admin: {{op: pool-failover, pool: pool1.lab.local, disaster_mode: true}}
  - wait: {{mode: full, users: "pool1.lab.local:*", pool: pool2.lab.local}}
    timeout: 120
  - heal: loss
  - admin: {{op: pool-failback, pool: pool1.lab.local}}
  - wait: {{mode: full, users: "pool1.lab.local:*", pool: pool1.lab.local}}
    timeout: 120
"""


def test_site_loss_drill_with_admin_steps_counts_the_rpo(tmp_path: Path) -> None:
    """CMS failover, disaster-mode pool failover and failback run as admin steps;
    the writes taken after the last sync (the sync interval is 300 s, so every
    one of them) are reported lost, exactly."""
    report = run_drill(tmp_path, SITE_LOSS, timeout=600)
    written = report["data"]["writes"]["acknowledged"]
    assert written > 0
    failover, failback = report["data"]["operations"]
    assert failover["operation"] == "failover" and failover["disaster_mode"]
    assert failback["operation"] == "failback"
    assert failback["failover_lost_writes"] == written
