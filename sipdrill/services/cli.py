"""Commands of the services part: `sipdrill serve pool|backup` and
`sipdrill admin ...` (named after the Lync cmdlets they mirror, see
docs/cmdlets.md). The commands live next to the code they drive
(`pool_cli`, `backup_cli`); this module only assembles them."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import typer

admin_app = typer.Typer(
    help="Administrator operations, named after the Lync cmdlets they mirror.",
    no_args_is_help=True,
)


def _part(module: str) -> Any | None:
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    return importlib.import_module(module) if found else None


pool_cli = _part("sipdrill.services.pool_cli")
backup_cli = _part("sipdrill.services.backup_cli")

pool_app: Any = getattr(pool_cli, "pool_app", None) or typer.Typer(
    help="Pool operations: status, failover, failback.", no_args_is_help=True
)
if pool_cli is not None:
    serve_pool = pool_cli.serve_pool
    if hasattr(pool_cli, "user_app"):
        admin_app.add_typer(pool_cli.user_app, name="user")
if backup_cli is not None:
    serve_backup = backup_cli.serve_backup
    admin_app.add_typer(backup_cli.backup_app, name="backup")
    admin_app.add_typer(backup_cli.cms_app, name="cms")
    pool_app.command("failover")(backup_cli.pool_failover_cmd)
    pool_app.command("failback")(backup_cli.pool_failback_cmd)
if pool_app.registered_commands or pool_app.registered_groups:
    admin_app.add_typer(pool_app, name="pool")
