"""`serve clients --offset`: one block of users per clients process (the lab plan
passes it when a drill runs several clients processes)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from sipdrill.cli import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner(env={"COLUMNS": "200"})


def test_offset_past_the_last_user_is_refused() -> None:
    result = runner.invoke(
        app,
        [
            "serve",
            "clients",
            "--topology",
            str(ROOT / "topologies/paired-pools.yaml"),
            "--offset",
            "400",
        ],
    )
    assert result.exit_code == 1
    assert "--offset 400: no user is left" in result.output
