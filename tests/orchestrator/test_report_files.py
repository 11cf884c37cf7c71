"""The report's files: report.html rendered by a real browser (headless
Chromium), its size at 10,000 clients, JUnit XML, and the terminal summary."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from rich.console import Console

from sipdrill.orchestrator.junit import junit_xml
from sipdrill.orchestrator.measure import measure
from sipdrill.orchestrator.report import Report, StepRecord
from sipdrill.orchestrator.terminal import print_summary
from sipdrill.orchestrator.timeline import MarkKind, Timeline

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_800_000_000.0
P1, P2 = "pool1.lab.local", "pool2.lab.local"
#: Where CI keeps what a person should look at (the screenshot).
ARTIFACTS = Path(os.environ.get("SIPDRILL_ARTIFACTS", ROOT / "artifacts"))


def synthetic_report(clients: int) -> Report:
    """A site loss on ``clients`` clients: a spread of detection and recovery
    times, one client that never recovers, a failover and a failback."""
    homes = {f"sip:u{i}@lab.local": (P1 if i % 4 else P2) for i in range(clients)}
    tl = Timeline(T0, homes, None)
    lines = []

    def ev(user: str, t: float, old: str, new: str, pool: str | None) -> None:
        lines.append(
            json.dumps(
                {
                    "event": "ModeChanged",
                    "user": user,
                    "wall": T0 + t,
                    "pool": pool,
                    "old": old,
                    "new": new,
                }
            )
        )

    for i, (user, home) in enumerate(homes.items()):
        ev(user, 0.01 * (i % 100), "SigningIn", "FullService", home)
    tl.ingest("clients-1", lines)
    tl.mark(MarkKind.FAULT, 10.0, T0 + 10, "cut site1", id="loss", kind="cut", target="site1")
    lines.clear()
    for i, (user, home) in enumerate(homes.items()):
        if home != P1:
            continue
        lost = 10 + 5 + (i % 97) * 0.2
        ev(user, lost, "FullService", "Discovering", P1)
        if i == 1:
            continue  # never recovers
        lines.append(
            json.dumps(
                {
                    "event": "TargetFailed",
                    "user": user,
                    "wall": T0 + lost + 1,
                    "pool": P1,
                    "failure": "connect-timeout",
                }
            )
        )
        ev(user, 40 + (i % 89) * 0.3, "SigningIn", "ResiliencyMode", P2)
        ev(user, 95 + (i % 83) * 0.1, "ResiliencyMode", "FullService", P2)
        ev(user, 140 + (i % 79) * 0.1, "FullService", "Discovering", P2)
        ev(user, 141 + (i % 79) * 0.1, "SigningIn", "FullService", P1)
    tl.ingest("clients-1", lines)
    tl.mark(
        MarkKind.ADMIN,
        90.0,
        T0 + 90,
        "pool-failover",
        op="pool-failover",
        pool=P1,
        start=80.0,
        end=90.0,
        ok=True,
        result={"lost_writes": None},
    )
    tl.mark(MarkKind.HEAL, 120.0, T0 + 120, "heal loss", id="loss", kind="cut", target="site1")
    tl.mark(
        MarkKind.ADMIN,
        135.0,
        T0 + 135,
        "pool-failback",
        op="pool-failback",
        pool=P1,
        start=130.0,
        end=135.0,
        ok=True,
        result={"failover_lost_writes": 3},
    )
    tl.acknowledged_writes(P1, [T0 + 5, T0 + 6, T0 + 7, T0 + 8])
    m = measure(tl, 160.0)
    report = Report("site-loss", "topologies/paired-pools.yaml", "local", T0, status="failed")
    report.error = "expectations not met: rto"
    report.duration = 160.0
    report.healed = True
    report.steps = [
        StepRecord(0, "every client signed in", "wait", 0.0, 0.5, "passed"),
        StepRecord(1, "site1 goes silent", "fault", 10.0, 0.0, "passed"),
        StepRecord(
            2, "Invoke-CsPoolFailOver", "admin", 80.0, 10.0, "passed", {"operation": "failover"}
        ),
        StepRecord(3, "pool1 users home | full", "wait", 135.0, 8.0, "failed", {"matching": 1}),
        StepRecord(4, "never run", "sleep", 160.0, None, "skipped"),
    ]
    report.faults = [
        {"id": "loss", "kind": "cut", "target": "site1", "injected_at": 10.0, "healed_at": 120.0}
    ]
    report.measured, report.measurements = m, m.summary()
    report.expectations = [
        {"metric": "rto", "bound": {"max": 60}, "value": m.rto, "ok": False},
        {
            "metric": "reconnect.p95",
            "bound": {"max": 120},
            "value": m.value("reconnect.p95"),
            "ok": True,
        },
    ]
    return report


def test_report_html_at_10000_clients_is_small_and_self_contained(tmp_path: Path) -> None:
    report = synthetic_report(10_000)
    report.write(tmp_path)
    html = (tmp_path / "report.html").read_text()
    assert len(html.encode()) <= 3 * 1024 * 1024
    # No script and nothing to fetch: every URL in it is the SVG namespace.
    assert "<script" not in html
    assert "https:" not in html
    assert html.count("http:") == html.count("http://www.w3.org/2000/svg")
    for part in (
        "Clients by mode over time",
        "Per-client times",
        "The slowest clients",
        "RTO",
        "RPO",
        "3 writes",
        "never",
    ):
        assert part in html, part
    rows = (tmp_path / "clients.csv").read_text().splitlines()
    assert len(rows) == 1 + 10_000


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    return found


def _render(page: Path, png: Path, home: Path) -> list[str]:
    """Screenshot ``page`` in headless Chromium; the console messages it logged."""
    proc = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1000,2600",
            f"--screenshot={png}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": str(home)},  # its profile, not the user's
    )
    assert png.exists() and png.stat().st_size > 0, proc.stderr[-3000:]
    return [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln]


@pytest.mark.slow
def test_report_html_renders_in_chromium_without_console_errors(tmp_path: Path) -> None:
    report = synthetic_report(400)
    report.write(tmp_path)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    png = ARTIFACTS / "report-html.png"
    png.unlink(missing_ok=True)
    console = _render(tmp_path / "report.html", png, tmp_path)
    assert console == []
    assert png.stat().st_size > 20_000  # a page with plots, not a blank one
    shutil.copy(tmp_path / "report.html", ARTIFACTS / "report.html")


@pytest.mark.slow
def test_the_console_check_sees_a_blocked_fetch(tmp_path: Path) -> None:
    """The check above can fail: a page that tries to load an image logs a
    console message (blocked by the same policy the report carries)."""
    report = synthetic_report(10)
    report.write(tmp_path)
    page = tmp_path / "report.html"
    page.write_text(
        page.read_text().replace("<body>", '<body><img src="http://127.0.0.1:9/x.png">')
    )
    assert _render(page, tmp_path / "bad.png", tmp_path) != []


def test_junit_has_a_case_per_step_and_expectation_with_the_numbers() -> None:
    report = synthetic_report(40)
    root = ET.fromstring(junit_xml(report))
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == 5 + 2 == int(suite.get("tests", "0")) == int(root.get("tests", "0"))
    assert suite.get("failures") == "2" and suite.get("skipped") == "1"
    by_name = {c.get("name"): c for c in cases}
    (fail,) = by_name["rto"].findall("failure")
    assert "expected max 60" in fail.get("message", "") and "not measured" in fail.get(
        "message", ""
    )
    assert by_name["04 pool1 users home | full"].find("failure") is not None
    assert by_name["05 never run"].find("skipped") is not None
    assert by_name["reconnect.p95"].find("failure") is None
    assert all(c.get("classname", "").startswith("drill.site-loss.") for c in cases)


def test_summary_is_compact_and_keeps_tables_whole_when_piped() -> None:
    report = synthetic_report(40)
    out = io.StringIO()
    print_summary(report, Path("reports/x"), Console(file=out, width=160, soft_wrap=False))
    text = out.getvalue()
    assert "FAILED" in text and "RTO" in text and "p95" in text and "reports/x/report.html" in text
    assert "## Steps" not in text and '"position"' not in text  # not the markdown, not raw JSON
    assert len(text.splitlines()) < 40
    # one table row per step: nothing wrapped onto a second line
    assert sum(1 for ln in text.splitlines() if "Invoke-CsPoolFailOver" in ln) == 1


def test_summary_says_which_metrics_no_client_reached() -> None:
    """A row of "missing" alone (budget DR: no resiliency, no home) is explained."""
    report = synthetic_report(40)
    dists = report.measurements["distributions"]
    out = io.StringIO()
    print_summary(report, Path("reports/x"), Console(file=out, width=160, soft_wrap=False))
    assert "no affected client reached" not in out.getvalue()
    dists["home"] = {**dists["home"], "count": 0, "missing": 12, "p50": None, "p95": None,
                     "max": None}
    out = io.StringIO()
    print_summary(report, Path("reports/x"), Console(file=out, width=160, soft_wrap=False))
    assert "no affected client reached home:" in out.getvalue()


def test_compare_side_by_side_and_the_regression_gate(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sipdrill.cli import app

    base = synthetic_report(40)
    base.write(tmp_path / "base")
    slower = synthetic_report(40)
    assert slower.measurements["distributions"]["reconnect"]["p95"] is not None
    slower.measurements["distributions"]["reconnect"]["p95"] *= 1.5
    slower.metrics = {"pool_failover": 12.0}
    base.metrics = {"pool_failover": 10.0}
    base.write(tmp_path / "base")
    slower.write(tmp_path / "slower")
    runner = CliRunner(env={"COLUMNS": "200"})
    args = ["drill", "compare", str(tmp_path / "base"), str(tmp_path / "slower")]
    ok = runner.invoke(app, [*args, "--html", str(tmp_path / "cmp.html")])
    assert ok.exit_code == 0, ok.output
    assert "reconnect.p95" in ok.output and "(+50 %)" in ok.output and "(+20 %)" in ok.output
    page = (tmp_path / "cmp.html").read_text()
    assert "<svg" in page and page.count("<polyline") >= 2  # one CDF line per report
    gate = runner.invoke(app, [*args, "--fail-if-slower", "25"])
    assert gate.exit_code == 1
    assert "reconnect.p95" in gate.output and "pool_failover" not in gate.output.split("slower:")[1]
    assert runner.invoke(app, [*args, "--fail-if-slower", "60"]).exit_code == 0
    bad = runner.invoke(app, ["drill", "compare", str(tmp_path / "nowhere")])
    assert bad.exit_code == 1 and "cannot read" in bad.output


def test_compare_keeps_two_reports_of_one_folder_name_apart(tmp_path: Path) -> None:
    from sipdrill.orchestrator.compare import compare, load_report

    for side in ("a", "b"):
        synthetic_report(20).write(tmp_path / side / "run-1")
    result = compare([load_report(tmp_path / s / "run-1") for s in ("a", "b")])
    assert result.labels == ["run-1", "run-1 #2"]


def test_sweep_plots_no_point_where_a_repeat_never_recovered() -> None:
    from sipdrill.orchestrator.sweep import _mean

    assert _mean([10.0, 20.0]) == 15.0
    assert _mean([10.0, None]) is None and _mean([]) is None


def test_marker_labels_close_in_time_do_not_overlap() -> None:
    """An import and a DNS repoint 0.1 s apart (budget DR) were drawn over each other."""
    import re

    from sipdrill.orchestrator.report_html import curve_svg

    curve = _curve_of(synthetic_report(10))
    svg = curve_svg(curve, [(5.0, "user-import", "#0969da"), (5.1, "dns-repoint", "#0969da"),
                            (30.0, "heal x", "#1a7f37")])
    ys = {label: y for y, label in re.findall(r'<text x="[\d.]+" y="([\d.]+)" fill="#[0-9a-f]+">'
                                              r"([^<]+)</text>", svg)}
    assert ys["user-import"] != ys["dns-repoint"]
    assert ys["heal x"] == ys["user-import"]  # far apart: the first row again


def _curve_of(report: Report) -> dict[str, object]:
    from sipdrill.orchestrator.report_html import _curve

    return _curve(report)
