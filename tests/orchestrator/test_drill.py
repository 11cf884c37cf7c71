"""Drill files: loading with located errors, and the engine against a fake lab
with a fake clock (no sleeping)."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from sipdrill.errors import DrillFileError, FaultError, FileIssue
from sipdrill.orchestrator.drill import AdminStep, FaultStep, WriteStep, load_drill
from sipdrill.orchestrator.engine import ClientCount, DrillEngine, DrillInterrupted

ROOT = Path(__file__).resolve().parents[2]
P1, P2 = "pool1.lab.local", "pool2.lab.local"
TOPOLOGY = load_drill(ROOT / "scenarios/site-loss.yaml").topology


def write_drill(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "d.yaml"
    path.write_text(f"topology: {ROOT / 'topologies/paired-pools.yaml'}\n" + body)
    return path


def issues(path: Path) -> list[FileIssue]:
    with pytest.raises(DrillFileError) as exc_info:
        load_drill(path)
    assert all(i.file == str(path) and i.fix for i in exc_info.value.issues)
    return exc_info.value.issues


def test_shipped_scenarios_load() -> None:
    for path in sorted((ROOT / "scenarios").glob("*.yaml")):
        loaded = load_drill(path)
        assert loaded.drill.steps, path


def test_timer_overrides_reach_the_topology() -> None:
    loaded = load_drill(ROOT / "scenarios/site-loss.yaml")
    assert loaded.topology.timers.failover_detection_interval == 30
    assert loaded.topology.timers.sync_interval == 10
    assert "failover_detection_interval: 30" in loaded.topology_yaml


def test_step_with_two_actions(tmp_path: Path) -> None:
    p = write_drill(tmp_path, "name: d\nsteps:\n  - wait: {mode: full}\n    sleep: 3\n")
    (i,) = issues(p)
    assert i.field == "steps[0]" and i.line == 4 and "exactly one" in i.message


def test_unknown_fault_target_and_heal(tmp_path: Path) -> None:
    p = write_drill(
        tmp_path,
        "name: d\nsteps:\n  - fault: {kind: cut, target: pool9, id: x}\n  - heal: y\n",
    )
    got = {i.field: i for i in issues(p)}
    assert got["steps[0].fault.target"].line == 4
    assert "pool1" in got["steps[0].fault.target"].fix
    assert got["steps[1].heal"].line == 5 and "x" in got["steps[1].heal"].fix


def test_timer_override_out_of_range(tmp_path: Path) -> None:
    p = write_drill(tmp_path, "name: d\ntimers:\n  sync_interval: 1\nsteps:\n  - sleep: 1\n")
    (i,) = issues(p)
    assert i.field == "timers" and i.line == 3 and "sync_interval" in i.message


def test_expectation_on_unmeasured_metric(tmp_path: Path) -> None:
    p = write_drill(tmp_path, "name: d\nsteps:\n  - sleep: 1\nexpect:\n  nope: {max: 3}\n")
    (i,) = issues(p)
    assert i.field == "expect.nope" and i.line == 6


@pytest.mark.parametrize(
    "step",
    [
        "{op: dns-repoint, pool: pool1.lab.local}",
        "{op: dns-repoint, pool: pool1.lab.local, to: pool9.lab.local}",
        "{op: dns-repoint, pool: pool1.lab.local, to: pool1.lab.local}",
    ],
)
def test_dns_repoint_needs_two_pools(tmp_path: Path, step: str) -> None:
    p = write_drill(tmp_path, f"name: d\nsteps:\n  - admin: {step}\n")
    (i,) = issues(p)
    assert i.field == "steps[0].admin" and i.line == 4
    assert "dns-repoint needs `pool:`" in i.message and P2 in i.fix


def budget_dr_drill(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "d.yaml"
    path.write_text(f"topology: {ROOT / 'topologies/budget-dr.yaml'}\n" + body)
    return path


@pytest.mark.parametrize(
    ("step", "field", "says"),
    [
        ("{op: user-move, to: drpool.lab.local}", "steps[0].admin", "either `user:`"),
        ("{op: user-move, user: 'sip:alice@lab.local', from_pool: pool1.lab.local, "
         "to: drpool.lab.local}", "steps[0].admin", "either `user:`"),
        ("{op: user-move, from_pool: pool9.lab.local, to: drpool.lab.local}",
         "steps[0].admin.from_pool", "unknown pool 'pool9.lab.local'"),
        ("{op: user-import, from_pool: pool1.lab.local}", "steps[0].admin.pool",
         "the pool to restore into"),
        ("{op: user-export, pool: drpool.lab.local}", "steps[0].admin.pool",
         "no scheduled export"),
    ],
)
def test_budget_dr_operations_are_checked(
    tmp_path: Path, step: str, field: str, says: str
) -> None:
    p = budget_dr_drill(tmp_path, f"name: d\nsteps:\n  - admin: {step}\n")
    got = {i.field: i for i in issues(p)}
    assert field in got and says in got[field].message, got
    assert got[field].line == 4


def test_dns_overrides_reach_the_topology(tmp_path: Path) -> None:
    loaded = load_drill(ROOT / "scenarios/budget-dr.yaml")
    assert (loaded.topology.dns.ttl, loaded.topology.dns.negative_ttl) == (30, 10)
    assert loaded.topology.timers.user_data_export_interval == 86400
    p = budget_dr_drill(tmp_path, "name: d\ndns: {ttl: -1}\nsteps:\n  - sleep: 1\n")
    (i,) = issues(p)
    assert i.field == "dns.ttl" and i.line == 3


def test_unknown_step_kind_is_named(tmp_path: Path) -> None:
    p = write_drill(tmp_path, "name: d\nsteps:\n  - explode: now\n")
    fields = {i.field for i in issues(p)}
    assert "steps[0].explode" in fields


# --- the engine ----------------------------------------------------------------


class FakeLab:
    """A lab whose clients react to faults and admin operations after delays,
    on a fake clock: pool1's users reach resiliency mode 40 s after site1 is
    cut, full service 20 s after pool failover, and home 10 s after failback."""

    def __init__(self, n: int = 10) -> None:
        self.now = 1000.0
        self.n = n
        # pool1's first n users: their events follow the counts above, spread over 1 s.
        self.users = [u.uri for u in TOPOLOGY.all_users() if u.home_pool == P1][:n]
        self.scripted: list[tuple[float, str]] = []  # (clock, JSON line), not yet read
        self.delivered = 0
        self.fetches = 0
        for user in self.users:
            self._event(user, self.now - 1, "SigningIn", "FullService", P1)
        self.events: list[tuple[float, str]] = []
        self.faults: dict[str, FaultStep] = {}
        self.healed_all = 0
        self.cut_at: float | None = None
        self.failover_at: float | None = None
        self.failback_at: float | None = None
        self.fail_admin: str | None = None
        self.interrupt_at: float | None = None

    def clock(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        if self.interrupt_at is not None and self.now >= self.interrupt_at:
            self.interrupt_at = None
            raise DrillInterrupted(signal.SIGTERM)

    def client_counts(self) -> list[ClientCount]:
        t = self.now
        mode, pool = "full", P1
        if self.failback_at is not None and t >= self.failback_at + 10:
            mode, pool = "full", P1
        elif self.failover_at is not None and t >= self.failover_at + 20:
            mode, pool = "full", P2
        elif self.cut_at is not None and t >= self.cut_at + 40:
            mode, pool = "resiliency", P2
        elif self.cut_at is not None:
            mode, pool = "signed-out", None
        return [ClientCount(P1, mode, pool, self.n), ClientCount(P2, "full", P2, self.n)]

    def inject(self, fault: FaultStep) -> str:
        if fault.target == "dns" and fault.kind == "degrade":
            raise FaultError("degrade", "local", "not supported")
        handle = f"h{len(self.faults)}"
        self.faults[handle] = fault
        if fault.target == "site1":
            self.cut_at = self.now
            for i, user in enumerate(self.users):
                self._event(user, self.now + 5 + i / self.n, "FullService", "Discovering", P1)
                self._event(user, self.now + 40, "Discovering", "ResiliencyMode", P2)
        self.events.append((self.now, f"inject {fault.kind} {fault.target}"))
        return handle

    def undo(self, handle: str) -> None:
        self.events.append((self.now, f"undo {self.faults.pop(handle).target}"))

    def heal_all(self) -> None:
        self.healed_all += 1
        self.faults.clear()

    def admin(self, op: AdminStep) -> dict[str, Any]:
        if op.op == self.fail_admin:
            from sipdrill.errors import OperationError

            raise OperationError("failover-order", "refused")
        self.now += 50  # seed 003: the failover cmdlet took about 50 s
        if op.op == "pool-failover":
            self.failover_at = self.now
            for user in self.users:
                self._event(user, self.now + 20, "ResiliencyMode", "FullService", P2)
        if op.op == "pool-failback":
            self.failback_at = self.now
            for user in self.users:
                self._event(user, self.now + 10, "FullService", "FullService", P1)
        if op.op == "pool-failover":  # P1 is cut: it cannot tell what it lost
            return {"op": op.op, "lost_writes": None}
        if op.op == "pool-failback":  # P1 is back and tells: 7 writes after the last sync
            return {"op": op.op, "lost_writes": 0, "failover_lost_writes": 7}
        return {"op": op.op}

    def write(self, op: WriteStep) -> dict[str, Any]:
        walls = [self.wall()] * (self.n * op.contacts)
        return {"acknowledged": self.n * op.contacts, "acked_walls": {P1: walls}}

    def _event(self, user: str, at: float, old: str, new: str, pool: str) -> None:
        body = {"event": "ModeChanged", "user": user, "wall": 1_700_000_000.0 + at}
        body |= {"pool": pool, "old": old, "new": new, "trigger": "fake"}
        self.scripted.append((at, json.dumps(body)))

    def event_sources(self) -> dict[str, str]:
        return {"clients-1": "fake://clients-1"}

    def fetch_events(self, url: str, after: int) -> tuple[list[str], int, int]:
        self.fetches += 1
        due = sorted((e for e in self.scripted if e[0] <= self.now), key=lambda e: e[0])
        self.scripted = [e for e in self.scripted if e[0] > self.now]
        lines = [
            json.dumps({**json.loads(text), "seq": self.delivered + i + 1})
            for i, (_t, text) in enumerate(due)
        ]
        self.delivered += len(due)
        return lines, 1, self.delivered

    def data_report(self) -> dict[str, Any]:
        return {
            "writes": {"acknowledged": 10, "refused": 0},
            "operations": [
                {
                    "operation": "failback",
                    "home_pool": P1,
                    "disaster_mode": False,
                    "seconds": 1.0,
                    "synced_changes": 3,
                    "lost_writes": 0,
                    "failover_lost_writes": 7,
                },
            ],
        }


def test_site_loss_drill_passes_and_measures() -> None:
    lab = FakeLab()
    report = DrillEngine(load_drill(ROOT / "scenarios/site-loss.yaml"), lab).run()
    assert report.status == "passed", report.error
    assert 40 <= report.metrics["time_to_resiliency"] <= 40 + 1
    assert report.metrics["pool_failover"] == 50
    assert report.healed and not lab.faults and lab.healed_all == 1
    assert all(e["ok"] for e in report.expectations)
    (fault,) = report.faults
    assert fault["id"] == "site1-loss" and fault["healed_at"] > fault["injected_at"]
    md = report.to_markdown()
    assert "| time_to_resiliency |" in md and "status: **passed**" in md
    assert "writes acknowledged by the pools: 10" in md
    assert "the earlier failover lost 7 write(s) taken after the last sync" in md


def test_wait_timeout_fails_and_heals(tmp_path: Path) -> None:
    p = write_drill(
        tmp_path,
        "name: d\nsteps:\n  - fault: {kind: cut, target: site1}\n"
        "  - wait: {mode: full, users: 'pool1.lab.local:*', pool: pool2.lab.local}\n"
        "    timeout: 30\n  - sleep: 5\n",
    )
    lab = FakeLab()
    report = DrillEngine(load_drill(p), lab).run()
    assert report.status == "failed"
    assert "timed out after 30 s" in (report.error or "")
    assert [s.status for s in report.steps] == ["passed", "failed", "skipped"]
    assert report.steps[1].detail["selected"] == 10
    assert not lab.faults and report.healed
    assert lab.events[-1][1] == "undo site1"


def test_refused_admin_operation_fails_the_drill(tmp_path: Path) -> None:
    p = write_drill(
        tmp_path,
        "name: d\nsteps:\n  - fault: {kind: cut, target: site1}\n"
        "  - admin: {op: pool-failover, pool: pool2.lab.local}\n",
    )
    lab = FakeLab()
    lab.fail_admin = "pool-failover"
    report = DrillEngine(load_drill(p), lab).run()
    assert report.status == "failed" and "failover-order" in (report.error or "")
    assert not lab.faults


def test_unexpected_error_in_a_step_still_reports_and_heals(tmp_path: Path) -> None:
    p = write_drill(
        tmp_path,
        "name: d\nsteps:\n  - fault: {kind: cut, target: site1}\n"
        "  - write: {users: '*', contacts: 1}\n",
    )
    lab = FakeLab()

    def broken_write(op: WriteStep) -> dict[str, Any]:
        raise ConnectionResetError("pool went away")

    lab.write = broken_write  # type: ignore[method-assign]
    report = DrillEngine(load_drill(p), lab).run()
    assert report.status == "failed"
    assert "ConnectionResetError: pool went away" in (report.error or "")
    assert not lab.faults and report.healed


def test_refused_fault_fails_cleanly(tmp_path: Path) -> None:
    p = write_drill(tmp_path, "name: d\nsteps:\n  - fault: {kind: degrade, target: dns}\n")
    report = DrillEngine(load_drill(p), FakeLab()).run()
    assert report.status == "failed" and "not supported" in (report.error or "")


def test_site_loss_per_client_measurements(tmp_path: Path) -> None:
    lab = FakeLab()
    report = DrillEngine(load_drill(ROOT / "scenarios/site-loss.yaml"), lab).run()
    m = report.measurements
    assert m["clients"] == 10 and m["events"] == 50 and m["events_lost"] == 0
    d = m["distributions"]
    # Each user lost service 5 to 5.9 s after the cut and was in resiliency mode at 40 s.
    assert d["detect"]["count"] == 10 and d["detect"]["min"] == pytest.approx(5.0)
    assert d["detect"]["max"] == pytest.approx(5.9)
    assert d["reconnect"]["p50"] == pytest.approx(40.0)
    # Resiliency at 40 s, then the CMS failover and the pool failover (50 s each in
    # this lab), full service 20 s after that: 160 s from the fault, not the 0.0 of a
    # wait step that starts after the failover.
    assert d["full_service"]["max"] == pytest.approx(160.0, abs=0.5)
    assert d["full_after_failover"]["p50"] == pytest.approx(70.0)  # the cmdlet took 50
    assert m["rto"] == pytest.approx(160.0, abs=0.5)
    assert d["home_after_failback"]["max"] == pytest.approx(60.0)
    # The failover could not count its loss; the failback did: 7 of the 10 writes, all
    # acknowledged at the same moment, just before the cut.
    assert m["rpo_writes"] == 7 and m["rpo_seconds"] == 0.0
    got = {e["metric"]: e for e in report.expectations}
    assert got["reconnect.p95"]["ok"] and got["rto"]["ok"] and got["full_service.max"]["ok"]
    files = report.write(tmp_path / "out")
    rows = (tmp_path / "out" / "clients.csv").read_text().splitlines()
    assert rows[0].startswith("user,home_pool,fault,affected") and len(rows) == 11
    assert files[1].read_text().count("| reconnect |") == 1


def test_an_expectation_on_a_percentile_can_fail(tmp_path: Path) -> None:
    p = write_drill(
        tmp_path,
        "name: d\nsteps:\n  - fault: {kind: cut, target: site1}\n"
        "  - wait: {mode: resiliency, users: 'pool1.lab.local:*'}\n"
        "expect:\n  reconnect.p95: {max: 30}\n  detect.max: {min: 1}\n",
    )
    report = DrillEngine(load_drill(p), FakeLab()).run()
    assert report.status == "failed" and "reconnect.p95" in (report.error or "")
    got = {e["metric"]: e for e in report.expectations}
    assert got["reconnect.p95"]["value"] == pytest.approx(40.0) and not got["reconnect.p95"]["ok"]
    assert got["detect.max"]["ok"]


def test_runtime_is_the_one_that_ran() -> None:
    report = DrillEngine(
        load_drill(ROOT / "scenarios/registrar-failover.yaml"), FakeLab(), runtime="docker"
    ).run()
    assert report.runtime == "docker"


def test_interrupt_heals_and_reports(tmp_path: Path) -> None:
    p = write_drill(
        tmp_path,
        "name: d\nsteps:\n  - fault: {kind: cut, target: site1, id: a}\n"
        "  - fault: {kind: crash, target: dns, id: b}\n  - sleep: 100\n  - heal: a\n",
    )
    lab = FakeLab()
    lab.interrupt_at = lab.now + 10
    report = DrillEngine(load_drill(p), lab).run()
    assert report.status == "interrupted" and report.exit_code == 130
    assert [s.status for s in report.steps] == ["passed", "passed", "interrupted", "skipped"]
    assert report.healed and not lab.faults and lab.healed_all == 1
    undone = sorted(e for _, e in lab.events if e.startswith("undo"))
    assert undone == ["undo dns", "undo site1"]


def test_unmet_expectation_fails(tmp_path: Path) -> None:
    p = write_drill(
        tmp_path,
        "name: d\nsteps:\n  - fault: {kind: cut, target: site1}\n"
        "  - wait: {mode: resiliency, users: 'pool1.lab.local:*'}\n    measure: t\n"
        "expect:\n  t: {max: 30}\n",
    )
    report = DrillEngine(load_drill(p), FakeLab()).run()
    assert report.status == "failed"
    (e,) = report.expectations
    assert e["ok"] is False and e["value"] >= 40


def test_report_files(tmp_path: Path) -> None:
    report = DrillEngine(load_drill(ROOT / "scenarios/site-loss.yaml"), FakeLab()).run()
    j, m = report.write(tmp_path / "out")
    assert '"status": "passed"' in j.read_text()
    assert m.read_text().startswith("# Drill report: site-loss")


def test_a_slow_inject_opens_the_fault_when_it_was_asked_for(tmp_path: Path) -> None:
    """A restart returns once the service is up again: clients that lost service
    meanwhile belong to the fault, which starts when it was asked for."""
    p = write_drill(
        tmp_path,
        "name: d\nsteps:\n  - fault: {kind: cut, target: site1}\n"
        "  - wait: {mode: resiliency, users: 'pool1.lab.local:*'}\n",
    )
    lab = FakeLab()
    inject = lab.inject

    def slow(fault: FaultStep) -> str:
        handle = inject(fault)
        lab.now += 8  # the clients lose service at +5 .. +5.9, inside the inject
        return handle

    lab.inject = slow  # type: ignore[method-assign]
    report = DrillEngine(load_drill(p), lab).run()
    (f,) = report.measurements["faults"]
    assert f["affected"] == 10 and f["injected_at"] == pytest.approx(0.0, abs=0.01)
    assert report.measurements["distributions"]["detect"]["min"] == pytest.approx(5.0)


def test_a_fault_left_in_place_fails_the_drill(tmp_path: Path) -> None:
    from sipdrill.orchestrator.junit import junit_xml

    p = write_drill(tmp_path, "name: d\nsteps:\n  - fault: {kind: cut, target: site1, id: a}\n")
    lab = FakeLab()

    def broken_undo(handle: str) -> None:
        raise FaultError("cut", "local", "the process is gone")

    lab.undo = broken_undo  # type: ignore[method-assign]
    report = DrillEngine(load_drill(p), lab).run()
    assert not report.healed and report.status == "failed" and report.exit_code == 1
    assert "not every fault was healed" in (report.error or "")
    assert 'name="healed"' in junit_xml(report)


def test_junit_of_a_lab_that_never_ran_is_an_error() -> None:
    from sipdrill.orchestrator.junit import junit_xml
    from sipdrill.orchestrator.report import Report

    report = Report("d", "t.yaml", "local", 0.0, status="error", error="the lab did not start")
    report.healed = True  # nothing was injected
    xml = junit_xml(report)
    assert 'tests="1"' in xml and 'errors="1"' in xml and "the lab did not start" in xml


def test_an_unregistered_wait_and_the_writes_seqs_reach_the_timeline(tmp_path: Path) -> None:
    """Clients with no registration anywhere (signed out, signing in, backing
    off) satisfy `unregistered`; a driver's seqs of acknowledged writes go to
    the timeline beside their times (the budget-DR RPO counts by them)."""

    class SeqLab(FakeLab):
        def write(self, op: WriteStep) -> dict[str, Any]:
            out = super().write(op)
            out["acked_seqs"] = {P1: list(range(1, self.n * op.contacts + 1))}
            return out

    p = write_drill(
        tmp_path,
        "name: d\nsteps:\n  - write: {users: 'pool1.lab.local:*'}\n"
        "  - fault: {kind: cut, target: site1, id: x}\n"
        "  - wait: {mode: unregistered, users: 'pool1.lab.local:*'}\n    timeout: 30\n"
        "    measure: time_to_outage\n",
    )
    engine = DrillEngine(load_drill(p), SeqLab())
    report = engine.run()
    assert report.status == "passed", report.error
    assert report.metrics["time_to_outage"] == 0
    assert [s for _t, s in engine.timeline.write_seqs[P1]] == list(range(1, 11))
    assert [t for t, _s in engine.timeline.write_seqs[P1]] == engine.timeline.writes[P1]
