"""`drill compare-designs`: the variants each design runs, and the table built
from canned reports (n/a with its reason, not 0; RPO; calls in the outage).
No lab runs here: each design's drill has its own test (test_drill_local,
test_budget_dr_drill), and the variants are loaded as a drill run loads them."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from sipdrill.cli import app
from sipdrill.errors import OperationError
from sipdrill.orchestrator.designs import (
    DESIGNS,
    OUTAGE,
    DesignFacts,
    design_facts,
    design_row,
    design_variant,
    designs_html,
    designs_markdown,
    designs_svg,
    load_results,
)
from sipdrill.orchestrator.drill import load_drill

ROOT = Path(__file__).resolve().parents[2]
BY_KEY = {d.key: d for d in DESIGNS}


def _variant(tmp_path: Path, key: str, **kw: Any) -> tuple[dict[str, Any], list[str], DesignFacts]:
    design = BY_KEY[key]
    shipped = load_drill(ROOT / design.scenario)
    raw = yaml.safe_load((ROOT / design.scenario).read_text())
    variant, changes = design_variant(raw, shipped, **kw)
    path = tmp_path / f"{key}.yaml"
    path.write_text(yaml.safe_dump(variant, sort_keys=False))
    loaded = load_drill(path)  # the variant is a valid drill
    facts = design_facts(design, loaded, changes=tuple(changes))
    return variant, changes, facts


def test_the_three_shipped_drills_are_the_three_designs(tmp_path: Path) -> None:
    _v, _c, paired = _variant(tmp_path, "paired")
    _v, _c, backup = _variant(tmp_path, "backup-registrar")
    _v, _c, budget = _variant(tmp_path, "budget-dr")
    assert (paired.backup_registrar, paired.recovery, paired.failback) == (
        True,
        "pool-failover",
        "pool-failback",
    )
    assert (backup.backup_registrar, backup.recovery, backup.failback) == (True, None, "registrar")
    assert (budget.backup_registrar, budget.recovery, budget.failback) == (
        False,
        "user-move",
        None,
    )
    assert budget.moved_to == "drpool.lab.local"
    assert paired.failed_pools == backup.failed_pools == budget.failed_pools == ("pool1.lab.local",)


def test_the_variant_adds_calls_and_pins_the_outage_without_moving_a_step(tmp_path: Path) -> None:
    variant, changes, _f = _variant(tmp_path, "paired")
    shipped = yaml.safe_load((ROOT / "scenarios/site-loss.yaml").read_text())
    assert variant["clients"]["workload"] == ["call"]
    # The same steps, in the same order, with the same timeouts.
    strip = [{k: v for k, v in s.items() if k != "phase"} for s in variant["steps"]]
    assert strip == shipped["steps"]
    pinned = [s["name"] for s in variant["steps"] if s.get("phase") == OUTAGE]
    assert pinned == [
        "site1 goes silent (pool1 and its Backup Service)",
        "pool1 users reach resiliency mode on pool2",
    ]  # up to the CMS failover, the first recovery
    assert variant["timers"] == shipped["timers"]
    assert any("call workload" in c for c in changes)


def test_a_drill_without_writes_gets_them_before_the_fault(tmp_path: Path) -> None:
    variant, _c, _f = _variant(tmp_path, "backup-registrar")
    actions = [
        next(k for k in s if k in ("wait", "write", "fault", "heal")) for s in variant["steps"]
    ]
    assert actions[:3] == ["wait", "write", "fault"]
    assert variant["steps"][1]["write"] == {"users": "pool1.lab.local:*", "contacts": 1}
    # The budget DR drill writes already: nothing added.
    budget, _c, _f = _variant(tmp_path, "budget-dr")
    shipped = yaml.safe_load((ROOT / "scenarios/budget-dr.yaml").read_text())
    assert len(budget["steps"]) == len(shipped["steps"])


def test_hold_and_lync_timers(tmp_path: Path) -> None:
    variant, changes, facts = _variant(tmp_path, "budget-dr", hold=45, lync_timers=True)
    steps = variant["steps"]
    i = next(i for i, s in enumerate(steps) if s.get("sleep") == 45)
    assert steps[i]["phase"] == OUTAGE
    assert steps[i + 1]["admin"]["op"] == "user-move"  # the hold comes before the recovery
    assert variant["timers"]["failover_detection_interval"] == 120
    assert variant["timers"]["keepalive_interval"] == 120
    assert "dns" not in variant  # the zone's TTL, 300 s
    assert facts.dns_ttl == 300
    assert all(s["timeout"] >= 3600 for s in steps if "wait" in s)
    # Time bounds were for the short timers; the RPO's stays.
    assert set(variant["expect"]) == {"rpo_writes", "full_service.missing"}
    assert any("time bounds dropped (rto)" in c for c in changes)


# --- the table from canned reports ------------------------------------------------


def _d(p50: float | None, mx: float | None, count: int = 20, missing: int = 0) -> dict[str, Any]:
    return {"count": count, "missing": missing, "p50": p50, "max": mx}


def _phase(placed: int, answered: int, failed: int) -> dict[str, Any]:
    return {"placed": placed, "answered": answered, "failed": failed}


def _report(
    dists: dict[str, Any],
    rto: float | None,
    rpo: int | None,
    age: float | None,
    outage: dict[str, Any] | None,
    *,
    healed: float | None = 60.0,
    acked: int = 0,
) -> dict[str, Any]:
    return {
        "status": "passed",
        "drill": "x",
        "steps": [],
        "faults": [{"injected_at": 10.0, "healed_at": healed}],
        "data": {"writes": {"acknowledged": acked, "refused": 0}},
        "measurements": {
            "rto": rto,
            "rpo_writes": rpo,
            "rpo_seconds": age,
            "distributions": dists,
            "calls": None if outage is None else {"phases": {OUTAGE: outage}},
        },
    }


def _facts(key: str, **kw: Any) -> DesignFacts:
    base = {
        "paired": DesignFacts(
            "paired",
            "Paired",
            "s.yaml",
            "site1",
            ("pool1.lab.local",),
            True,
            "pool-failover",
            None,
            "pool-failback",
            True,
        ),
        "backup-registrar": DesignFacts(
            "backup-registrar",
            "Backup",
            "r.yaml",
            "site1",
            ("pool1.lab.local",),
            True,
            None,
            None,
            "registrar",
            True,
        ),
        "budget-dr": DesignFacts(
            "budget-dr",
            "Budget",
            "b.yaml",
            "primary",
            ("pool1.lab.local",),
            False,
            "user-move",
            "drpool.lab.local",
            None,
            True,
        ),
    }[key]
    return replace(base, **kw)


def test_paired_pools_row_has_every_number() -> None:
    r = _report(
        {"resiliency": _d(80.2, 91.0), "full_service": _d(98.0, 105.6), "home": _d(28.0, 29.4)},
        105.6,
        151,
        6.8,
        _phase(30, 24, 6),
        acked=302,
    )
    row = design_row(r, _facts("paired"))
    c = row.cells
    assert (c["limited"].text, c["limited"].value) == ("80.2 / 91.0 s", 91.0)
    assert (c["full"].text, c["full"].value) == ("98.0 / 105.6 s", 105.6)
    assert (c["home"].text, c["home"].value) == ("28.0 / 29.4 s", 29.4)
    assert (c["rto"].text, c["rto"].value) == ("105.6 s", 105.6)
    assert (c["rpo"].text, c["rpo"].value) == ("151 of 302 writes (6.8 s)", 151.0)
    assert (c["calls"].text, c["calls"].value) == ("80% (24/30 answered)", 0.8)
    assert all(cell.na is None for cell in c.values())


def test_backup_registrar_only_has_no_full_service_until_the_site_returns() -> None:
    r = _report(
        {"resiliency": _d(28.2, 29.4), "full_service": _d(50.0, 50.0), "home": _d(20.1, 20.2)},
        50.0,
        0,
        0.0,
        _phase(40, 40, 0),
        healed=40.4,
    )
    c = design_row(r, _facts("backup-registrar")).cells
    assert c["full"].value is None and c["rto"].value is None
    assert c["full"].text.startswith("n/a (no failover: full service only when site1 returns")
    assert "back 30.4 s after the fault" in c["full"].text  # the measured figures, as context
    assert c["rto"].text == "n/a (as long as site1 is down; here 50.0 s)"
    assert c["rpo"].text == "0 writes (no failover: the data waited on the failed pool)"
    assert c["rpo"].value == 0.0  # a measured 0, not an n/a
    assert c["home"].value == 20.2
    assert c["calls"].text == "100% (40/40 answered)"


def test_budget_dr_says_why_it_has_no_resiliency_and_no_home() -> None:
    r = _report(
        {
            "resiliency": _d(None, None, count=0, missing=40),
            "full_service": _d(62.9, 78.3),
            "home": _d(None, None, count=0, missing=40),
        },
        78.3,
        202,
        9.1,
        _phase(9, 0, 9),
        acked=404,
    )
    c = design_row(r, _facts("budget-dr")).cells
    assert c["limited"].text.startswith("n/a (no backup registrar")
    assert c["limited"].na == "no backup registrar" and c["limited"].value is None
    assert c["home"].text == "n/a (no failback: the users were moved to drpool for good)"
    assert c["rto"].value == 78.3
    assert c["rpo"].text == "202 of 404 writes (9.1 s)"
    assert (c["calls"].text, c["calls"].value) == ("0% (0/9 answered)", 0.0)


def test_no_call_could_be_placed_is_said_so() -> None:
    r = _report({"full_service": _d(60, 70)}, 70.0, 0, 0.0, _phase(0, 0, 0))
    cell = design_row(r, _facts("budget-dr")).cells["calls"]
    assert cell.text == "none (0 placed: nobody registered to call from)"
    r = _report({"full_service": _d(60, 70)}, 70.0, 0, 0.0, None)
    assert design_row(r, _facts("budget-dr")).cells["calls"].text.startswith("not measured")


def test_a_state_the_design_has_but_the_run_missed_is_not_reached_not_na() -> None:
    r = _report(
        {"resiliency": _d(None, None, count=0, missing=20), "full_service": _d(90, 100, 18, 2)},
        None,
        None,
        None,
        _phase(4, 1, 3),
    )
    c = design_row(r, _facts("paired")).cells
    assert c["limited"].text == "not reached (20 client(s) never got resiliency mode)"
    assert c["limited"].na is None
    assert c["full"].text == "90.0 / 100.0 s (2 never)" and c["full"].value is None
    assert c["rto"].text == "not reached (2 client(s) never got full service)"
    assert c["rpo"].text.startswith("unknown")


def test_a_design_that_did_not_run_says_so() -> None:
    r = {
        "status": "error",
        "error": "the lab did not start: port taken",
        "drill": "x",
        "steps": [],
        "measurements": {},
    }
    row = design_row(r, _facts("paired"))
    assert row.status == "error"
    assert all(
        c.text.startswith("not run (error: the lab did not start") for c in row.cells.values()
    )


def _folder(tmp_path: Path) -> Path:
    out = tmp_path / "designs-1"
    canned = {
        "paired": _report(
            {"resiliency": _d(80, 91), "full_service": _d(98, 105)}, 105.0, 1, 2.0, _phase(10, 8, 2)
        ),
        "budget-dr": _report({"full_service": _d(60, 70)}, 70.0, 5, 3.0, _phase(0, 0, 0)),
    }
    for key, report in canned.items():
        (out / key).mkdir(parents=True)
        (out / key / "report.json").write_text(json.dumps(report))
        (out / key / "design.json").write_text(json.dumps(asdict(_facts(key))))
    return out


def test_the_files_and_the_chart(tmp_path: Path) -> None:
    out = _folder(tmp_path)
    results = load_results(out)
    assert [f.key for _r, f, _p in results] == ["paired", "budget-dr"]
    rows = [design_row(r, f, str(p)) for r, f, p in results]
    facts = [f for _r, f, _p in results]
    md = designs_markdown(rows, facts)
    assert "| Paired | passed | 80.0 / 91.0 s |" in md
    assert "n/a (no backup registrar" in md
    page = designs_html(rows, facts)
    assert "default-src 'none'" in page and "<script" not in page
    chart = designs_svg(rows)
    assert chart.count("<rect") >= 3 + 2  # bars and the legend's swatches
    assert ">n/a</text>" in chart  # budget DR's limited service: written, not a 0 bar


def test_tables_only_rebuilds_from_a_folder(tmp_path: Path) -> None:
    out = _folder(tmp_path)
    result = CliRunner().invoke(
        app, ["drill", "compare-designs", "--tables-only", str(out)], terminal_width=200
    )
    assert result.exit_code == 0, result.output
    assert "Paired" in result.output and "n/a (no backup registrar" in result.output
    assert {p.name for p in out.iterdir()} >= {
        "designs.md",
        "designs.html",
        "designs.svg",
        "designs.json",
    }


def test_a_folder_without_designs_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OperationError, match="no design folder"):
        load_results(tmp_path)
    result = CliRunner().invoke(app, ["drill", "compare-designs", "--tables-only", str(tmp_path)])
    assert result.exit_code == 1


def test_run_designs_runs_each_variant_in_turn_and_writes_the_table(tmp_path: Path) -> None:
    """The runner with the drill run replaced by canned reports: the variants
    it hands over, their order, their folders, and the table at the end."""
    from sipdrill.orchestrator.designs import run_designs

    ran: list[tuple[str, Path]] = []
    said: list[str] = []

    class Done:
        status = "passed"

    def run_one(loaded: Any, folder: Path) -> Done:
        ran.append((loaded.drill.name, folder))
        assert "call" in loaded.drill.clients.workload
        assert str(loaded.topology.lab.loopback_network) == "127.81.128.0/17"
        report = _report(
            {"resiliency": _d(30, 40), "full_service": _d(50, 60)}, 60.0, 0, 0.0, _phase(5, 5, 0)
        )
        (folder / "report.json").write_text(json.dumps(report))
        return Done()

    out = tmp_path / "designs"
    rows = run_designs(
        ROOT,
        out,
        run_one,
        said.append,
        keys=["budget-dr", "paired"],
        loopback_network="127.81.128.0/17",
    )
    # The designs' order, whatever order they were asked in.
    assert [name for name, _f in ran] == ["site-loss", "budget-dr"]
    assert [f.name for _n, f in ran] == ["paired", "budget-dr"]
    assert [r.key for r in rows] == ["paired", "budget-dr"]
    assert said[0].startswith("design 1/2: Paired pools + pool failover")
    assert (out / "designs.md").is_file() and (out / "paired" / "drill.yaml").is_file()
    with pytest.raises(OperationError, match="unknown design"):
        run_designs(ROOT, out, run_one, said.append, keys=["metro"])


def test_a_design_interrupted_before_it_ran_is_a_row_that_says_so(tmp_path: Path) -> None:
    out = _folder(tmp_path)
    (out / "paired" / "report.json").unlink()
    rows = [design_row(r, f, str(p)) for r, f, p in load_results(out)]
    assert rows[0].status == "not run"
    assert rows[0].cells["rto"].text == "not run (interrupted before it ran)"
    assert rows[1].cells["rto"].text == "70.0 s"
