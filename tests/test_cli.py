"""The `sipdrill` command line, run in-process and as the installed script."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from sipdrill.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner(env={"COLUMNS": "200"})


def _all_command_paths() -> list[list[str]]:
    root = typer.main.get_command(app)
    paths: list[list[str]] = [[]]

    # Duck-typed: typer 0.29 carries its own copy of click, whose Group is not click.Group.
    def walk(cmd: click.Command, prefix: list[str]) -> None:
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            paths.append([*prefix, name])
            walk(sub, [*prefix, name])

    walk(root, [])
    return paths


def _command(path: list[str]) -> click.Command:
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]  # type: ignore[attr-defined]
    return cmd


@pytest.mark.parametrize("path", _all_command_paths(), ids=lambda p: " ".join(p) or "sipdrill")
def test_help_everywhere(path: list[str]) -> None:
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    assert "<bool>" not in result.output  # a flag takes no value
    undocumented = [
        p.opts[0]
        for p in _command(path).params
        if getattr(p, "param_type_name", "") == "option" and not getattr(p, "help", None)
    ]
    assert undocumented == [], f"options without help: {undocumented}"


def test_every_command_is_walked() -> None:
    paths = {" ".join(p) for p in _all_command_paths()}
    assert {"drill run", "drill sweep", "lab fault", "serve clients", "admin pool"} <= paths


def test_validate_ok() -> None:
    result = runner.invoke(
        app, ["topology", "validate", str(ROOT / "topologies/paired-pools.yaml")]
    )
    assert result.exit_code == 0, result.output
    assert "valid" in result.output and "2 pool(s)" in result.output


def test_validate_reports_file_line_field(tmp_path: Path) -> None:
    text = (ROOT / "topologies/paired-pools.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("backup: pool2.lab.local", "backup: pool1.lab.local", 1))
    result = runner.invoke(app, ["topology", "validate", str(bad)])
    assert result.exit_code == 1
    line = 1 + text.splitlines().index("    backup: pool2.lab.local")
    assert f"bad.yaml:{line}: error: pools[0].backup" in result.output.replace("\n", "")


def test_validate_missing_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["topology", "validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1
    assert "nope.yaml" in result.output and "cannot read" in result.output


def test_show_lists_pools_pairs_and_records() -> None:
    result = runner.invoke(
        app,
        ["topology", "show", str(ROOT / "topologies/paired-pools.yaml")],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    out = result.output
    for needle in (
        "pool1.lab.local",
        "backup pool2.lab.local",
        "CMS active",
        "CMS standby",
        "_sipinternaltls._tcp.lab.local",
        "10 10 5061 pool2.lab.local.",
    ):
        assert needle in out, needle


@pytest.mark.skipif(shutil.which("sipdrill") is None, reason="package not installed as a script")
def test_installed_script_runs() -> None:
    proc = subprocess.run(["sipdrill", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("sipdrill ")


def test_module_entry_point() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sipdrill", "--version"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
