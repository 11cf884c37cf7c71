"""The ``sipdrill`` command line.

Each part of the lab owns its commands in its own module (``sipdrill.topology_cli``,
``sipdrill.sip.cli``, ...); this module only mounts them, so that adding a part
never means editing another part's code.
"""

from __future__ import annotations

from typing import Any

import typer
import typer.core

from sipdrill import __version__
from sipdrill.admin.cli import admin_app
from sipdrill.backup.cli import serve_backup
from sipdrill.clients.cli import serve_clients
from sipdrill.dns.cli import serve_dns
from sipdrill.orchestrator import cli as orchestrator_cli
from sipdrill.orchestrator.chaos.cli import chaos_app
from sipdrill.orchestrator.swarm_cli import serve_fault_agent
from sipdrill.pool.cli import serve_pool
from sipdrill.sip import cli as sip_cli
from sipdrill.topology_cli import app as topology_app

_display_type = typer.core.TyperOption.display_type_rich


def _flag_takes_no_value(self: typer.core.TyperOption, ctx: Any) -> str | None:
    """A flag takes no value, so its help shows no type (typer 0.29 prints
    ``<bool>`` beside every flag, --help included, as if it wanted one)."""
    if self.is_flag and self.metavar is None:
        return None
    return _display_type(self, ctx)


typer.core.TyperOption.display_type_rich = _flag_takes_no_value  # type: ignore[method-assign]

app = typer.Typer(
    name="sipdrill",
    help="A networked lab for site-resiliency drills on SIP Front End pools.",
    no_args_is_help=True,
    add_completion=False,
)
serve_app = typer.Typer(
    help="Run one role of the lab in the foreground (dns, pool, backup, clients).",
    no_args_is_help=True,
)

app.add_typer(topology_app, name="topology")
app.add_typer(sip_cli.app, name="sip")  # `sipdrill sip registrar ...`
serve_app.command("dns")(serve_dns)
serve_app.command("pool")(serve_pool)
serve_app.command("backup")(serve_backup)
app.add_typer(admin_app, name="admin")
serve_app.command("clients")(serve_clients)
serve_app.command("fault-agent")(serve_fault_agent)
app.add_typer(orchestrator_cli.lab_app, name="lab")
app.add_typer(orchestrator_cli.drill_app, name="drill")
app.add_typer(chaos_app, name="chaos")
app.add_typer(serve_app, name="serve")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sipdrill {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """A networked lab for site-resiliency drills on SIP Front End pools."""


def main() -> None:
    app()
