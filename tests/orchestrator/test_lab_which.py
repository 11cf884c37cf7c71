"""`sipdrill lab down|status|heal|fault`: which lab a command means."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from sipdrill.cli import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner(env={"COLUMNS": "200"})


def test_no_lab_named_and_none_running(tmp_path: Path) -> None:
    result = runner.invoke(app, ["lab", "status", "--state-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "no local lab has its state in" in result.output
    assert "--runtime docker" in result.output


def test_the_only_lab_running_is_the_default(tmp_path: Path) -> None:
    (tmp_path / "paired-pools").mkdir()
    (tmp_path / "paired-pools" / "lab.json").write_text("{}")
    (tmp_path / "stopped").mkdir()  # no state file: not running
    result = runner.invoke(app, ["lab", "heal", "--state-dir", str(tmp_path)])
    # It picked paired-pools, whose state is no lab's: a clear error, not a traceback.
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert "paired-pools/lab.json: not a lab state" in result.output
    assert "labs in" not in result.output


def test_two_labs_need_a_name(tmp_path: Path) -> None:
    for lab in ("a", "b"):
        (tmp_path / lab).mkdir()
        (tmp_path / lab / "lab.json").write_text("{}")
    result = runner.invoke(app, ["lab", "down", "--state-dir", str(tmp_path)])
    assert result.exit_code == 1 and "2 labs in" in result.output and "(a, b)" in result.output


def test_a_topology_file_names_its_lab(tmp_path: Path) -> None:
    topology = ROOT / "topologies/paired-pools.yaml"
    result = runner.invoke(app, ["lab", "status", str(topology), "--state-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "no lab 'paired-pools'" in result.output
    result = runner.invoke(app, ["lab", "down", str(topology), "--state-dir", str(tmp_path)])
    assert result.exit_code == 0 and "stopped 0 service(s)" in result.output
