"""Commands of the services part: `sipdrill serve pool|backup` and
`sipdrill admin ...` (named after the Lync cmdlets they mirror, see
docs/cmdlets.md). The commands live next to the code they drive
(`pool_cli`, `backup_cli`); this module only assembles them."""

from __future__ import annotations

import typer

from sipdrill.services import backup_cli, pool_cli

admin_app = typer.Typer(
    help="Administrator operations, named after the Lync cmdlets they mirror.",
    no_args_is_help=True,
)

serve_pool = pool_cli.serve_pool
serve_backup = backup_cli.serve_backup

pool_app = pool_cli.pool_app
pool_app.command("failover")(backup_cli.pool_failover_cmd)
pool_app.command("failback")(backup_cli.pool_failback_cmd)

admin_app.add_typer(pool_cli.user_app, name="user")
admin_app.add_typer(backup_cli.backup_app, name="backup")
admin_app.add_typer(backup_cli.cms_app, name="cms")
admin_app.add_typer(pool_app, name="pool")
