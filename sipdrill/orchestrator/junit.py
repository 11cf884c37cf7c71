"""A drill report as JUnit XML (``sipdrill drill run --junit FILE``), for CI
systems that show test results: each step and each expectation is a test
case; a failed expectation is a failure that carries the numbers."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from pathlib import Path

from sipdrill.orchestrator.report import Report

__all__ = ["junit_xml", "write_junit"]


def junit_xml(report: Report) -> str:
    suites = ET.Element("testsuites", name="sipdrill")
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=f"drill {report.drill}",
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(report.started_wall)),
        time=f"{report.duration:.3f}",
    )
    tests = failures = skipped = errors = 0
    for s in report.steps:
        tests += 1
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"drill.{report.drill}.steps",
            name=f"{s.index + 1:02d} {s.description}",
            time=f"{s.duration or 0.0:.3f}",
        )
        if s.status == "failed":
            failures += 1
            message = _step_error(report, s.index) or f"step {s.index + 1} failed"
            fail = ET.SubElement(case, "failure", message=message, type="StepFailed")
            fail.text = "\n".join(f"{k}: {v}" for k, v in s.detail.items())
        elif s.status == "interrupted":
            errors += 1
            ET.SubElement(case, "error", message=report.error or "interrupted", type="Interrupted")
        elif s.status == "skipped":
            skipped += 1
            ET.SubElement(case, "skipped", message="not reached: an earlier step did not pass")
    for e in report.expectations:
        tests += 1
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"drill.{report.drill}.expect",
            name=e["metric"],
            time="0",
        )
        if not e["ok"]:
            failures += 1
            bound = ", ".join(f"{k} {v:g}" for k, v in e["bound"].items())
            value = "not measured" if e["value"] is None else f"{e['value']:.3f}"
            ET.SubElement(
                case,
                "failure",
                message=f"{e['metric']} = {value}, expected {bound}",
                type="ExpectationNotMet",
            )
    if report.status in ("error", "interrupted") and not any(
        s.status == "interrupted" for s in report.steps
    ):
        # The lab never ran (or the run was cut before any step): say so, not "0 tests".
        tests += 1
        errors += 1
        case = ET.SubElement(suite, "testcase", classname=f"drill.{report.drill}", name="lab")
        ET.SubElement(case, "error", message=report.error or report.status, type=report.status)
    if not report.healed:
        tests += 1
        errors += 1
        case = ET.SubElement(suite, "testcase", classname=f"drill.{report.drill}", name="healed")
        ET.SubElement(case, "error", message="not every fault was healed", type="NotHealed")
    for el in (suite, suites):
        el.set("tests", str(tests))
        el.set("failures", str(failures))
        el.set("errors", str(errors))
    suite.set("skipped", str(skipped))
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode")


def _step_error(report: Report, index: int) -> str | None:
    prefix = f"step {index + 1} "
    if report.error and report.error.startswith(prefix):
        return report.error
    return None


def write_junit(report: Report, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(junit_xml(report) + "\n", encoding="utf-8")
