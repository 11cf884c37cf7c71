"""Enterprise pools with every front end, on the local runtime: pool1 of three
front ends (processes on their own 127.x addresses, sharing the pool's Back
End), one lost (its clients move to another front end of pool1: no
resiliency mode), then two lost (fe3 alone is below the quorum of any 2 of
3, stops its SIP service, pool2 sees pool1 down and takes its users in
resiliency mode), then both back (quorum again, the users home)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import labnet
import pytest
from test_drill_local import ROOT, _lab_processes, sipdrill_cli

pytestmark = pytest.mark.slow

DRILL = """\
name: quick-front-end-loss
topology: {topology}
runtime: local
timers:
  failover_detection_interval: 6
  failback_interval: 6
  keepalive_interval: 4
  keepalive_pong_timeout: 2
  sync_interval: 5
clients: {{count: 12, seed: 3}}
steps:
  - wait: {{mode: full}}
    timeout: 60
  - fault: {{kind: cut, target: pool1/fe2, id: fe2}}
  - sleep: 8
  - wait: {{mode: full, users: "pool1.lab.local:*", pool: pool1.lab.local}}
    timeout: 20
  - heal: fe2
  - fault: {{kind: cut, target: pool1/fe1, id: fe1}}
  - fault: {{kind: cut, target: pool1/fe2, id: fe2-again}}
  - wait: {{mode: resiliency, users: "pool1.lab.local:*", pool: pool2.lab.local}}
    timeout: 90
    measure: time_to_resiliency
  - heal: all
  - wait: {{mode: full, users: "pool1.lab.local:*", pool: pool1.lab.local}}
    timeout: 90
    measure: time_to_failback
"""


def small_enterprise(tmp_path: Path) -> Path:
    """enterprise.yaml with pool2 on one front end (fewer processes to start)
    and few users, on the tests' loopback network."""
    text = (ROOT / "topologies/enterprise.yaml").read_text()
    for k in (2, 3):
        fe = f"      - {{fqdn: fe{k}.pool2.lab.local, address: 172.30.2.1{k}}}\n"
        text = text.replace(fe, "")
    text = text.replace("count: 100", "count: 10")
    path = tmp_path / "enterprise.yaml"
    path.write_text(text + f"\nlab:\n  loopback_network: {labnet.NET}\n")
    return path


def check_front_end_move(
    report_dir: Path, fe2: str, pool1: set[str], *, bound: float
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Fault ``fe2`` (cut of the front end at ``fe2``): the clients on it, and
    no other, register again on another of ``pool1``'s front ends in full
    service within ``bound`` s. Returns the faults' injection times and the
    drill's (non-refresh) Registered events."""
    timeline = [json.loads(x) for x in (report_dir / "events.jsonl").read_text().splitlines()]
    injected = {e["id"]: e["t"] for e in timeline if e["event"] == "FaultInjected"}
    healed = {e["id"]: e["t"] for e in timeline if e["event"] == "FaultHealed"}
    registered = [e for e in timeline if e["event"] == "Registered" and not e["refresh"]]
    before = [e for e in registered if e["t"] < injected["fe2"]]
    # DNS load balancing: pool1's clients were spread over more than one front end.
    assert len({e["address"] for e in before if e["pool"] == "pool1.lab.local"}) > 1, before
    on_fe2 = {e["user"]: e["address"] == fe2 for e in before}
    moved_users = {u for u, there in on_fe2.items() if there}
    assert moved_users, "the seed put no client on fe2: pick another seed"
    window = [e for e in registered if injected["fe2"] < e["t"] < healed["fe2"]]
    assert {e["user"] for e in window} == moved_users
    for e in window:
        # a front-end move: the same pool, another front end, full service, in seconds
        assert e["front_end_move"] and e["pool"] == "pool1.lab.local", e
        assert e["previous_address"] == fe2 and e["address"] in pool1 - {fe2}, e
        assert e["mode"] == "FullService", e
        assert e["t"] - injected["fe2"] <= bound, e  # keep-alive 4 s + pong 2 s, the move
    return injected, registered


def test_front_end_loss_then_pool_quorum_loss(tmp_path: Path) -> None:
    drill = tmp_path / "drill.yaml"
    drill.write_text(DRILL.format(topology=small_enterprise(tmp_path)))
    state, reports = tmp_path / "state", tmp_path / "reports"
    proc = sipdrill_cli(
        "drill",
        "run",
        str(drill),
        "--state-dir",
        str(state),
        "--report-dir",
        str(reports),
        timeout=400,
    )
    assert reports.exists(), (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    (report_dir,) = reports.iterdir()
    report = json.loads((report_dir / "report.json").read_text())
    assert proc.returncode == 0, (report["error"], proc.stdout[-3000:])
    assert report["status"] == "passed" and report["healed"]
    assert _lab_processes(state) == []

    fe2 = labnet.addr("1.12") + ":5061"
    pool1 = {labnet.addr(f"1.1{k}") + ":5061" for k in (1, 2, 3)}
    injected, registered = check_front_end_move(report_dir, fe2, pool1, bound=12)
    resiliency = [e for e in registered if e["mode"] == "ResiliencyMode"]
    assert all(e["t"] > injected["fe2-again"] for e in resiliency)

    # Quorum loss: the pool as a whole failed over to the backup registrar.
    assert {e["pool"] for e in resiliency} == {"pool2.lab.local"}
    assert not any(e["front_end_move"] for e in resiliency)
    # fe3 alone stopped its SIP service, and started it again with quorum.
    fe3_log = (state / "enterprise" / "logs" / "pool1-fe3.log").read_text()
    lost, back = fe3_log.index("lost its quorum"), fe3_log.index("has its quorum again")
    assert lost < back
    assert report["metrics"]["time_to_resiliency"] <= 60
