"""The call workload's numbers on synthetic timelines: phases from the marks
(or pinned to steps), success ratio, setup times, and the drill file's side."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pytest

from sipdrill.errors import DrillFileError
from sipdrill.orchestrator.call_metrics import call_phases, is_call_metric, measure_calls
from sipdrill.orchestrator.drill import load_drill
from sipdrill.orchestrator.measure import is_known_metric, measure
from sipdrill.orchestrator.plan import RuntimeKind, lab_plan
from sipdrill.orchestrator.report import Report
from sipdrill.orchestrator.report_html import render_html
from sipdrill.orchestrator.timeline import MarkKind, Timeline

ROOT = Path(__file__).resolve().parents[2]
P1, P2 = "pool1.lab.local", "pool2.lab.local"
A, B = "sip:a@lab.local", "sip:b@lab.local"
T0 = 1_800_000_000.0


def ev(user: str, t: float, event: str, **fields: Any) -> str:
    return json.dumps({"event": event, "seq": 0, "user": user, "wall": T0 + t, **fields})


def placed(user: str, t: float, cid: str, mode: str = "FullService") -> str:
    return ev(user, t, "CallPlaced", call_id=cid, target=B, mode=mode)


def answered(user: str, t: float, cid: str, setup: float) -> str:
    return ev(user, t, "CallAnswered", call_id=cid, target=B, status_code=200, setup=setup,
              mode="FullService")


def failed(user: str, t: float, cid: str, status: int | None, elapsed: float = 0.1) -> str:
    return ev(user, t, "CallFailed", call_id=cid, target=B, status_code=status, elapsed=elapsed,
              mode="FullService")


def ended(user: str, t: float, cid: str, *, dropped: bool = False) -> str:
    return ev(user, t, "CallEnded", call_id=cid, target=B, duration=3.0, ok=not dropped,
              dropped=dropped, by_remote=False)


def timeline() -> Timeline:
    return Timeline(T0, {A: P1, B: P2}, io.StringIO())


def mark(tl: Timeline, kind: MarkKind, t: float, **detail: Any) -> None:
    tl.mark(kind, t, T0 + t, kind.value, **detail)


def test_phases_of_a_registrar_failover() -> None:
    tl = timeline()
    mark(tl, MarkKind.FAULT, 10.0, id="f")
    mark(tl, MarkKind.HEAL, 50.0, id="f")
    names = [(w.name, w.start, w.end) for w in call_phases(tl.marks)]
    assert names == [("before", -math.inf, 10.0), ("resiliency", 10.0, 50.0),
                     ("failback", 50.0, math.inf)]


def test_phases_of_a_site_loss_with_pool_failover_and_failback() -> None:
    tl = timeline()
    mark(tl, MarkKind.FAULT, 10.0, id="f")
    mark(tl, MarkKind.ADMIN, 90.0, op="pool-failover", ok=True, start=40.0)
    mark(tl, MarkKind.HEAL, 100.0, id="f")  # still failed over: the heal changes nothing
    mark(tl, MarkKind.ADMIN, 150.0, op="pool-failback", ok=False, start=120.0)  # refused
    mark(tl, MarkKind.ADMIN, 200.0, op="pool-failback", ok=True, start=160.0)
    names = [(w.name, w.start, w.end) for w in call_phases(tl.marks)]
    assert names == [("before", -math.inf, 10.0), ("resiliency", 10.0, 40.0),
                     ("failover", 40.0, 160.0), ("failback", 160.0, math.inf)]


def test_success_ratio_and_setup_per_phase() -> None:
    tl = timeline()
    tl.ingest("c", [
        placed(A, 1.0, "c1"), answered(A, 1.02, "c1", 0.02), ended(A, 4.0, "c1"),
        placed(A, 5.0, "c2"), answered(A, 5.01, "c2", 0.01), ended(A, 6.0, "c2", dropped=True),
        placed(A, 12.0, "c3"), failed(A, 12.1, "c3", 480),
        placed(A, 20.0, "c4", "ResiliencyMode"), failed(A, 52.0, "c4", None, 32.0),
        placed(A, 30.0, "c5", "ResiliencyMode"), answered(A, 30.05, "c5", 0.05),
        # The CallPlaced of c6 was lost: its answer says when it was placed.
        answered(A, 60.5, "c6", 0.5),
        placed(A, 70.0, "c7"),  # no outcome by the end
    ])
    mark(tl, MarkKind.FAULT, 10.0, id="f")
    mark(tl, MarkKind.HEAL, 50.0, id="f")
    calls = measure_calls(tl)
    assert calls is not None
    o = calls.overall
    assert (o.placed, o.answered, o.failed, o.unfinished, o.dropped) == (7, 4, 2, 1, 1)
    assert o.success_ratio == pytest.approx(4 / 6)
    assert o.failures == {"480": 1, "none": 1}
    assert (o.setup.count, o.setup.min, o.setup.p50, o.setup.max) == (4, 0.01, 0.02, 0.5)
    before, res, back = calls.phases["before"], calls.phases["resiliency"], calls.phases["failback"]
    assert (before.placed, before.success_ratio) == (2, 1.0)
    assert (res.placed, res.answered, res.failed, res.placed_in_resiliency) == (3, 1, 2, 2)
    assert res.success_ratio == pytest.approx(1 / 3)
    assert (back.placed, back.answered, back.unfinished) == (2, 1, 1)
    # As a drill names them.
    assert calls.value("success_ratio") == pytest.approx(4 / 6)
    assert calls.value("resiliency.setup.max") == pytest.approx(0.05)
    assert calls.value("before.placed") == 2.0
    assert calls.value("failover.success_ratio") is None  # no such phase here
    m = measure(tl, 80.0)
    assert m.value("calls.resiliency.failed") == 2.0
    assert m.value("calls.setup.p95") == pytest.approx(0.5)
    summary = json.loads(json.dumps(m.summary()))
    assert summary["calls"]["phases"]["resiliency"]["windows"] == [[10.0, 50.0]]


def test_a_step_pins_a_phase_to_its_time() -> None:
    tl = timeline()
    for i, t in enumerate((0.0, 10.0, 40.0, 70.0)):
        mark(tl, MarkKind.STEP, t, index=i, action="x")
    mark(tl, MarkKind.FAULT, 10.0, id="f")
    tl.ingest("c", [
        placed(A, 15.0, "early"), failed(A, 15.5, "early", 480),  # on the way to resiliency
        placed(A, 45.0, "steady", "ResiliencyMode"), answered(A, 45.1, "steady", 0.1),
    ])
    calls = measure_calls(tl, {2: "resiliency"})
    assert calls is not None
    res = calls.phases["resiliency"]
    assert (res.placed, res.success_ratio) == (1, 1.0)
    assert [(w.start, w.end, w.pinned) for w in calls.windows if w.name == "resiliency"] == [
        (40.0, 70.0, True)
    ]
    # The transition is counted apart.
    assert calls.outside is not None and (calls.outside.placed, calls.outside.failed) == (1, 1)
    m = measure(tl, 80.0, {2: "resiliency"})
    r = Report("d", "t.yaml", "local", T0, measured=m, measurements=m.summary())
    assert "| (between the phases) | | | 1 | 0 | 0 | 1 | 0.000 |" in r.to_markdown()
    assert "(between the phases)" in render_html(r)
    # Without the pin, the transition counts.
    auto = measure_calls(tl)
    assert auto is not None and auto.phases["resiliency"].success_ratio == 0.5


def test_no_calls_no_call_numbers() -> None:
    tl = timeline()
    assert measure_calls(tl) is None
    m = measure(tl, 10.0)
    assert m.calls is None and m.value("calls.success_ratio") is None
    assert m.summary()["calls"] is None


@pytest.mark.parametrize(
    ("name", "known"),
    [
        ("calls.success_ratio", True),
        ("calls.setup.p95", True),
        ("calls.resiliency.success_ratio", True),
        ("calls.failback.setup.max", True),
        ("calls.steady.placed", False),
        ("calls.setup.p42", False),
        ("calls", False),
        ("calls.nope", False),
    ],
)
def test_call_metric_names(name: str, known: bool) -> None:
    assert is_call_metric(name) is known
    assert is_known_metric(name) is known
    assert is_known_metric("calls.steady.placed", ["steady"])


def write_drill(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "d.yaml"
    path.write_text(f"topology: {ROOT / 'topologies/paired-pools.yaml'}\n" + body)
    return path


def test_the_drill_file_turns_calls_on_and_names_phases(tmp_path: Path) -> None:
    p = write_drill(tmp_path, (
        "name: d\n"
        "clients:\n  count: 4\n  workload: [call]\n  calls: {fraction: 0.5, interval: 5, hold: 1}\n"
        "steps:\n  - sleep: 1\n    phase: steady\n"
        "expect:\n  calls.steady.success_ratio: {min: 1}\n  calls.setup.p95: {max: 1}\n"
    ))
    d = load_drill(p).drill
    assert d.clients.process_args() == (
        "--workload", "call", "--call-fraction", "0.5", "--call-interval", "5",
        "--call-hold", "1",
    )
    topo = load_drill(p).topology
    [clients] = [s for s in lab_plan(topo, RuntimeKind.LOCAL, topology_path="t", state_dir="s",
                                     clients=4, client_args=d.clients.process_args())
                 if s.role == "clients"]
    assert clients.args[-8:] == d.clients.process_args()


def test_drill_file_errors_about_calls(tmp_path: Path) -> None:
    p = write_drill(tmp_path, (
        "name: d\nclients:\n  calls: {fraction: 0.5}\nsteps:\n  - sleep: 1\n    phase: placed\n"
        "expect:\n  calls.success_ratio: {min: 1}\n"
    ))
    with pytest.raises(DrillFileError) as exc_info:
        load_drill(p)
    got = {i.field: i for i in exc_info.value.issues}
    assert "add `call` to `workload:`" in got["clients"].message
    # The calls: error stops the model before the rest is checked; fix it and look again.
    p.write_text(p.read_text().replace("  calls: {fraction: 0.5}\n", "  count: 2\n"))
    with pytest.raises(DrillFileError) as exc_info:
        load_drill(p)
    got = {i.field: i for i in exc_info.value.issues}
    assert "name of a call metric" in got["steps[0].phase"].message
    assert "does not run" in got["expect.calls.success_ratio"].message
    assert "clients.workload" in got["expect.calls.success_ratio"].fix


def test_the_report_shows_the_calls(tmp_path: Path) -> None:
    tl = timeline()
    tl.ingest("c", [placed(A, 1.0, "c1"), answered(A, 1.012, "c1", 0.012),
                    placed(A, 2.0, "c2"), failed(A, 2.1, "c2", 486)])
    m = measure(tl, 10.0)
    r = Report("d", "t.yaml", "local", T0, status="passed", measured=m,
               measurements=m.summary())
    r.expectations = [{"metric": "calls.success_ratio", "bound": {"min": 0.9}, "value": 0.5,
                       "ok": False}]
    md = r.to_markdown()
    assert "## Calls" in md and "2 placed, 1 answered, 1 failed (486: 1)" in md
    assert "| before | start | end | 2 | 0 | 1 | 1 | 0.500 | 12 |" in md
    assert "| calls.success_ratio | >= 0.9 | 0.5 | NO |" in md
    r.write(tmp_path)
    html = (tmp_path / "report.html").read_text()
    assert "<h2>Calls</h2>" in html and "486: 1" in html
