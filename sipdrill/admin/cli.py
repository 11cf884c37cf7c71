"""``sipdrill admin ...``: the administrator commands, named after the Lync
cmdlets they mirror (docs/cmdlets.md). The commands live next to what they
drive (:mod:`.pool_cli` over one pool's control API, :mod:`.lab_cli` over
the lab's); this module only assembles them."""

from __future__ import annotations

import typer

from sipdrill.admin import lab_cli, pool_cli

admin_app = typer.Typer(
    help="Administrator operations, named after the Lync cmdlets they mirror.",
    no_args_is_help=True,
)

pool_app = pool_cli.pool_app
pool_app.command("failover")(lab_cli.pool_failover_cmd)
pool_app.command("failback")(lab_cli.pool_failback_cmd)

admin_app.add_typer(pool_cli.user_app, name="user")
admin_app.add_typer(lab_cli.backup_app, name="backup")
admin_app.add_typer(lab_cli.cms_app, name="cms")
admin_app.add_typer(pool_app, name="pool")
