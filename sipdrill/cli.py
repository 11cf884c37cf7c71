"""The ``sipdrill`` command line.

Each part of the lab owns its commands in its own module (``sipdrill.topology_cli``,
``sipdrill.sip.cli``, ...); this module only mounts them, so that adding a part
never means editing another part's code.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import typer

from sipdrill import __version__
from sipdrill.topology_cli import app as topology_app

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


def _part(module: str) -> Any | None:
    # find_spec, not try/except ImportError: a part that exists but fails to
    # import must fail loudly, not vanish from the CLI.
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    return importlib.import_module(module) if found else None


def _mount_optional() -> None:
    """Mount the parts that exist in this build of the package."""
    if sip := _part("sipdrill.sip.cli"):  # `sipdrill sip registrar ...`
        app.add_typer(sip.app, name="sip")
    if dns := _part("sipdrill.dns.cli"):  # `sipdrill serve dns ...`
        serve_app.command("dns")(dns.serve_dns)
    if services := _part("sipdrill.services.cli"):  # `serve pool|backup`, `admin ...`
        for role in ("pool", "backup"):
            if hasattr(services, f"serve_{role}"):
                serve_app.command(role)(getattr(services, f"serve_{role}"))
        if services.admin_app.registered_groups or services.admin_app.registered_commands:
            app.add_typer(services.admin_app, name="admin")
    if clients := _part("sipdrill.clients.cli"):  # `sipdrill serve clients ...`
        serve_app.command("clients")(clients.serve_clients)
    if orchestrator := _part("sipdrill.orchestrator.cli"):  # `sipdrill lab|drill ...`
        app.add_typer(orchestrator.lab_app, name="lab")
        if hasattr(orchestrator, "drill_app"):
            app.add_typer(orchestrator.drill_app, name="drill")
    if serve_app.registered_commands:
        app.add_typer(serve_app, name="serve")


_mount_optional()


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
