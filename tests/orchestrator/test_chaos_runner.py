"""The chaos runner and the drill's `chaos:` step on an in-memory lab (a fake
clock, pools as dictionaries): the runner applies the schedule, the writers
record every write, and the checker's verdict becomes the step's outcome; a
lab that loses an acknowledged write or leaves a fault fails the step."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Literal

import pytest

from sipdrill.errors import DrillFileError, OperationError
from sipdrill.orchestrator.chaos.history import History, OpType
from sipdrill.orchestrator.chaos.nemesis import NemesisConfig
from sipdrill.orchestrator.chaos.runner import ChaosRunner, ChaosSettings
from sipdrill.orchestrator.drill import AdminStep, FaultStep, WriteStep, load_drill
from sipdrill.orchestrator.engine import ClientCount, DrillEngine
from sipdrill.orchestrator.plan import RuntimeKind
from sipdrill.topology import load_topology

ROOT = Path(__file__).resolve().parents[2]
TOPOLOGY = load_topology(ROOT / "topologies/paired-pools.yaml").topology
P1, P2 = "pool1.lab.local", "pool2.lab.local"
PARTNER = {P1: P2, P2: P1}
HOMES = {u.uri: u.home_pool for u in TOPOLOGY.all_users()}


class MemoryLab:
    """Two paired pools in memory. A pool failover replicates the home pool's
    lists to the backup up to the last sync (everything, here: ``takeover``
    is the home pool's seq); a failback copies the users' lists home."""

    def __init__(self) -> None:
        self.now = 0.0
        self.lock = threading.Lock()
        self.lists: dict[str, dict[str, list[str]]] = {P1: {}, P2: {}}
        self.seq = {P1: 0, P2: 0}
        self.failed_over: set[str] = set()
        self.faults: dict[str, FaultStep] = {}
        self.healed_all = 0
        self.ops: list[str] = []
        self.drop_one = False  # plant a loss: one acknowledged write vanishes
        self.planted_leftover: list[str] = []

    # --- clock ------------------------------------------------------------
    def clock(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now

    def sleep(self, seconds: float) -> None:
        time.sleep(0.002)  # let the writer threads in
        self.now += seconds

    # --- clients and faults ------------------------------------------------
    def client_counts(self) -> list[ClientCount]:
        return [ClientCount(P1, "full", P1, 5), ClientCount(P2, "full", P2, 5)]

    def inject(self, fault: FaultStep) -> str:
        handle = f"h{len(self.faults)}"
        self.faults[handle] = fault
        self.ops.append(f"fault {fault.kind} {fault.target}")
        return handle

    def undo(self, handle: str) -> None:
        self.faults.pop(handle, None)
        self.ops.append(f"undo {handle}")

    def heal_all(self) -> None:
        self.faults.clear()
        self.healed_all += 1

    def leftovers(self) -> list[str]:
        return [f"fault {h} in force" for h in self.faults] + self.planted_leftover

    # --- data and administration --------------------------------------------
    def _serving(self, user: str) -> str:
        home = HOMES[user]
        return PARTNER[home] if home in self.failed_over else home

    def add_contact(self, pool: str, user: str, contact: str, timeout: float
                    ) -> tuple[Literal["ok", "fail", "info"], dict[str, Any]]:
        with self.lock:
            if pool != self._serving(user):
                return "fail", {"error": "HTTP 409", "code": "not-served-here"}
            self.seq[pool] += 1
            self.lists[pool].setdefault(user, []).append(contact)
            return "ok", {"seq": self.seq[pool]}

    def user_data(self, pool: str, user: str) -> dict[str, Any]:
        with self.lock:
            contacts = list(self.lists[pool].get(user, []))
            if self.drop_one and contacts and pool == self._serving(user):
                contacts = contacts[1:]
                self.drop_one = False
            return {"serving_pool": self._serving(user), "contacts": contacts}

    def admin(self, op: AdminStep) -> dict[str, Any]:
        self.ops.append(f"{op.op} {op.pool or ''}".strip())
        with self.lock:
            if op.op == "pool-failover":
                home, backup = op.pool or "", PARTNER[op.pool or ""]
                for user, got in self.lists[home].items():
                    if HOMES[user] == home:
                        self.lists[backup][user] = list(got)
                self.failed_over.add(home)
                return {"home_pool": home, "backup_pool": backup, "disaster_mode": True,
                        "takeover_position": self.seq[home], "lost_writes": 0}
            if op.op == "pool-failback":
                home, backup = op.pool or "", PARTNER[op.pool or ""]
                if home not in self.failed_over:
                    raise OperationError("not-failed-over", f"{home} is not failed over", 409)
                for user, got in self.lists[backup].items():
                    if HOMES[user] == home:
                        self.lists[home][user] = list(got)
                self.failed_over.discard(home)
                return {"home_pool": home, "backup_pool": backup, "disaster_mode": False,
                        "lost_writes": 0, "failover_lost_writes": 0}
            return {}

    # --- the rest of a drill's LabDriver ------------------------------------
    def write(self, op: WriteStep) -> dict[str, Any]:
        return {"acknowledged": 0, "refused": 0}

    def data_report(self) -> dict[str, Any]:
        return {}

    def event_sources(self) -> dict[str, str]:
        return {}

    def fetch_events(self, url: str, after: int) -> tuple[list[str], int, int]:
        return [], 0, 0


SETTINGS = ChaosSettings(
    seed=4, nemesis=NemesisConfig(duration=120, failover_probability=1.0), write_interval=0.0
)


def run(lab: MemoryLab) -> Any:
    history = History(None, lab.clock, lab.wall)
    return ChaosRunner(lab, TOPOLOGY, RuntimeKind.LOCAL, SETTINGS, history).run()


def test_the_runner_applies_the_schedule_and_the_run_is_valid() -> None:
    lab = MemoryLab()
    result = run(lab)
    assert result.status == "valid", result.verdict.violations if result.verdict else result.error
    v = result.verdict
    assert v is not None and v.figures.writes_checked > 0
    assert v.figures.pool_failovers == v.figures.pool_failbacks >= 1
    # Every operation of the schedule ran, in order; then heal-all, failbacks, syncs.
    applied = [o for o in lab.ops if o.startswith(("fault", "pool-", "cms-"))]
    planned = [op for op in result.schedule if op.op.value != "heal"]
    assert len([o for o in applied if not o.startswith("backup")]) == len(planned)
    assert lab.healed_all == 1 and not lab.faults
    fs = [o.f for o in result.history]
    assert fs[0] == "meta" and fs[-1] == "leftovers"
    writes = [o for o in result.history if o.f == "write" and o.type is OpType.OK]
    assert {o.process for o in writes} == {"writer-pool1", "writer-pool2"}


def test_a_lab_that_loses_a_write_fails_the_run() -> None:
    lab = MemoryLab()
    lab.drop_one = True
    result = run(lab)
    assert result.status == "invalid" and result.exit_code == 1
    assert result.verdict is not None
    # The first write of a user was synced before a failover: it may never go.
    (violation,) = result.verdict.violations
    assert violation.rule.value in ("lost-synced-write", "lost-write")
    assert result.verdict.figures.lost_outside_rpo == 1


def test_a_leftover_fault_fails_the_run() -> None:
    lab = MemoryLab()
    lab.planted_leftover = ["pool1: stopped (SIGSTOP)"]
    result = run(lab)
    assert result.status == "invalid"
    assert [v.rule.value for v in result.verdict.violations] == ["leftover-fault"]  # type: ignore[union-attr]


DRILL = """\
name: chaos-step
topology: {topology}
runtime: local
steps:
  - wait: {{mode: full}}
  - fault: {{kind: cut, target: dns, id: first}}
  - name: chaos for two minutes
    chaos: {{seed: 4, duration: 120, kinds: [cut, crash], write_interval: 0}}
  - wait: {{mode: full}}
"""


def _drill(tmp_path: Path, text: str = DRILL) -> Path:
    path = tmp_path / "drill.yaml"
    path.write_text(text.format(topology=ROOT / "topologies/paired-pools.yaml"))
    return path


def test_a_chaos_step_in_a_drill(tmp_path: Path) -> None:
    lab = MemoryLab()
    engine = DrillEngine(load_drill(_drill(tmp_path)), lab, chaos_dir=tmp_path)  # type: ignore[arg-type]
    report = engine.run()
    assert report.status == "passed", report.error
    step = report.steps[2]
    assert step.action == "chaos" and step.detail["status"] == "valid"
    assert step.detail["verdict"]["figures"]["writes_checked"] > 0
    assert (tmp_path / "chaos-step3.jsonl").exists()
    # The drill's own fault was healed by the chaos step's heal-all, and says so.
    assert report.faults[0]["id"] == "first" and report.faults[0]["healed_at"] is not None


def test_a_chaos_step_that_finds_a_violation_fails_the_drill(tmp_path: Path) -> None:
    lab = MemoryLab()
    lab.drop_one = True
    report = DrillEngine(load_drill(_drill(tmp_path)), lab).run()  # type: ignore[arg-type]
    assert report.status == "failed"
    assert "lost-" in (report.error or "") and "chaos seed 4: invalid" in (report.error or "")
    assert [s.status for s in report.steps] == ["passed", "passed", "failed", "skipped"]


def test_a_chaos_step_is_validated(tmp_path: Path) -> None:
    bad = DRILL.replace("kinds: [cut, crash]", "kinds: [partition], gap: [9, 2]")
    with pytest.raises(DrillFileError) as err:
        load_drill(_drill(tmp_path, bad))
    text = str(err.value)
    assert "steps[2].chaos.kinds" in text and "cannot do partition" in text
    assert "steps[2].chaos.gap" in text
