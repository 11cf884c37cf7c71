"""The ``sipdrill`` command line.

Each part of the lab owns its commands in its own module (``sipdrill.topology_cli``,
``sipdrill.sip.cli``, ...); this module only mounts them, so that adding a part
never means editing another part's code.
"""

from __future__ import annotations

import importlib.util

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


def _exists(module: str) -> bool:
    # find_spec, not try/except ImportError: a part that exists but fails to
    # import must fail loudly, not vanish from the CLI.
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _mount_optional() -> None:
    """Mount the parts that exist in this build of the package."""
    if _exists("sipdrill.sip.cli"):  # `sipdrill sip registrar ...`
        from sipdrill.sip.cli import app as sip_app

        app.add_typer(sip_app, name="sip")
    if _exists("sipdrill.dns.cli"):  # `sipdrill serve dns ...`
        from sipdrill.dns.cli import serve_dns

        serve_app.command("dns")(serve_dns)
    if _exists("sipdrill.services.cli"):  # `sipdrill serve pool|backup`, `sipdrill admin ...`
        from sipdrill.services import cli as services_cli

        serve_app.command("pool")(services_cli.serve_pool)
        if hasattr(services_cli, "serve_backup"):
            serve_app.command("backup")(services_cli.serve_backup)
        app.add_typer(services_cli.admin_app, name="admin")
    if _exists("sipdrill.clients.cli"):  # `sipdrill serve clients ...`
        from sipdrill.clients.cli import serve_clients

        serve_app.command("clients")(serve_clients)
    if _exists("sipdrill.orchestrator.cli"):  # `sipdrill lab ...`, `sipdrill drill ...`
        from sipdrill.orchestrator import cli as orchestrator_cli

        app.add_typer(orchestrator_cli.lab_app, name="lab")
        if hasattr(orchestrator_cli, "drill_app"):
            app.add_typer(orchestrator_cli.drill_app, name="drill")
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
