"""The administrator commands over the lab's control APIs: the Backup
Service, pool failover / failback and the CMS.

Mounted by :mod:`sipdrill.admin.cli`:

- ``sipdrill admin backup sync|status --pool P``  (Invoke-CsBackupServiceSync,
  Get-CsBackupServiceStatus)
- ``sipdrill admin cms failover [--force]|status``  (Invoke-CsManagementServerFailover,
  Get-CsManagementStoreReplicationStatus)
- ``sipdrill admin pool failover|failback --pool P1 [--disaster-mode]``
  (Invoke-CsPoolFailOver, Invoke-CsPoolFailBack)

Every admin command finds the lab's processes from the topology and the
address plan (:mod:`sipdrill.addresses`; ``--loopback`` for the local runtime), sends
``$SIPDRILL_CONTROL_TOKEN`` (or ``--token``), and exits 1 with the refusal's
message when an operation is refused.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from sipdrill.admin.failover import OperationReport, count_losses, pool_failback, pool_failover
from sipdrill.backup.client import LabClients
from sipdrill.backup.service import observe_direction
from sipdrill.cms.operations import cms_failover, cms_status
from sipdrill.control.cli import (
    LOOPBACK_OPTION,
    POOL_URL_OPTION,
    TOPOLOGY_OPTION,
    load_topology,
    parse_urls,
    pool_or_exit,
    refuse,
)
from sipdrill.control.settings import TOKEN_ENV, token_from_env
from sipdrill.errors import OperationError
from sipdrill.topology import Topology

T = TypeVar("T")

backup_app = typer.Typer(
    help="The Backup Service: sync now, status (Invoke-CsBackupServiceSync, "
    "Get-CsBackupServiceStatus).",
    no_args_is_help=True,
)
cms_app = typer.Typer(
    help="The Central Management Store: failover, replication status.", no_args_is_help=True
)

_TokenOpt = typer.Option(
    None, "--token", help=f"Bearer token for the control APIs (default: ${TOKEN_ENV})."
)
_JsonOpt = typer.Option(False, "--json", help="Print the result as JSON.")
_BackupUrlOpt = typer.Option(
    None, "--backup-url", help="FQDN=URL: reach this pool's Backup Service here; repeatable.",
    hidden=True,
)


def _out() -> Console:
    return Console()


def _err() -> Console:
    return Console(stderr=True)


def _run(
    topology: Topology,
    action: Callable[[LabClients], Awaitable[T]],
    *,
    token: str | None,
    loopback: bool,
    pool_urls: list[str] | None = None,
    backup_urls: list[str] | None = None,
) -> T:
    async def main() -> T:
        async with LabClients(
            topology,
            token=token_from_env(token),
            loopback=loopback,
            pool_urls=parse_urls(pool_urls, "--pool-url"),
            backup_urls=parse_urls(backup_urls, "--backup-url"),
        ) as clients:
            return await action(clients)

    try:
        return asyncio.run(main())
    except OperationError as exc:
        raise refuse(f"{exc.code}: {exc.message}") from None


def _when(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "never"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


# --- sipdrill admin backup sync|status -------------------------------------------------


def _direction_table(title: str, directions: list[dict[str, Any]]) -> Table:
    table = Table(title=title)
    for col in ("direction", "export", "import", "last sync", "backlog", "lag", "note"):
        table.add_column(col)
    for d in directions:
        notes = []
        if d.get("held"):
            notes.append(f"held: {d.get('backlog', 0)} change(s) of a failed-over pool")
        if d.get("observed_only"):
            notes.append("observed on the pools")
        if d.get("last_error"):
            notes.append(str(d["last_error"]))
        export = d.get("export_state", "?")
        colour = {"SteadyState": "green", "FinalState": "cyan", "ErrorState": "red"}.get(
            export, "yellow"
        )
        table.add_row(
            f"{d.get('source')} -> {d.get('target')}",
            f"[{colour}]{export}[/{colour}]",
            str(d.get("import_state", "?")),
            _when(d.get("last_sync")),
            str(d.get("backlog", "?")),
            f"{float(d.get('lag', 0.0)):.1f}s",
            "; ".join(notes),
        )
    return table


@backup_app.command("sync")
def backup_sync(
    pool: str = typer.Option(..., "--pool", help="The pool whose data to sync to its partner."),
    topology: Path = TOPOLOGY_OPTION,
    loopback: bool = LOOPBACK_OPTION,
    token: str | None = _TokenOpt,
    as_json: bool = _JsonOpt,
    pool_url: list[str] | None = POOL_URL_OPTION,
    backup_url: list[str] | None = _BackupUrlOpt,
) -> None:
    """Sync a pool's changes to its partner now (Invoke-CsBackupServiceSync)."""
    topo = load_topology(topology)
    fqdn = pool_or_exit(topo, pool)

    async def action(clients: LabClients) -> dict[str, Any]:
        service = clients.backup(fqdn)
        if service is None:
            raise OperationError("no-backup-pool", f"pool {fqdn} has no backup pool", 409)
        return await service.sync()

    result = _run(
        topo, action, token=token, loopback=loopback, pool_urls=pool_url, backup_urls=backup_url
    )
    if as_json:
        _print_json(result)
    else:
        _out().print(
            f"{result.get('source')} -> {result.get('target')}: {result.get('outcome')}, "
            f"{result.get('applied')} change(s) applied in "
            f"{float(result.get('duration', 0)):.3f}s; "
            f"position {result.get('position')}/{result.get('high_water_mark')}, "
            f"export {result.get('export_state')}, import {result.get('import_state')}",
            highlight=False,
        )
    if result.get("outcome") == "error":
        raise refuse(str(result.get("error")))


@backup_app.command("status")
def backup_status(
    pool: str = typer.Option(..., "--pool", help="The pool whose Backup Service to ask."),
    category: str = typer.Option(
        "UserData", "--category", help="UserData (the Backup Service) or CMS."
    ),
    topology: Path = TOPOLOGY_OPTION,
    loopback: bool = LOOPBACK_OPTION,
    token: str | None = _TokenOpt,
    as_json: bool = _JsonOpt,
    pool_url: list[str] | None = POOL_URL_OPTION,
    backup_url: list[str] | None = _BackupUrlOpt,
) -> None:
    """Export and import state per direction (Get-CsBackupServiceStatus)."""
    topo = load_topology(topology)
    fqdn = pool_or_exit(topo, pool)
    if category.lower() == "cms":
        cms_status_cmd(topology, loopback, token, as_json, pool_url, backup_url)
        return
    if category.lower() != "userdata":
        raise refuse("--category is UserData or CMS", 2)

    async def action(clients: LabClients) -> dict[str, Any]:
        status = await _service_status(clients)
        assert partner is not None
        losses = []
        for home in (fqdn, partner.fqdn):
            try:
                report = await count_losses(topo, home, clients)
            except (OperationError, OSError) as exc:
                status.setdefault("notes", []).append(f"RPO of {home}: {exc}")
                continue
            if report.state is not None:
                losses.append(report.to_json())
        status["losses"] = losses
        return status

    async def _service_status(clients: LabClients) -> dict[str, Any]:
        service = clients.backup(fqdn)
        assert partner is not None and service is not None
        try:
            return await service.status()
        except OperationError as exc:
            if exc.http_status not in (502, 503):
                raise
            # The service is away: show what the pools say.
            import time

            interval = topo.timers.sync_interval
            a, b = clients.pool(fqdn), clients.pool(partner.fqdn)
            now = time.time()
            return {
                "pool": fqdn,
                "partner": partner.fqdn,
                "service_error": str(exc),
                "directions": [
                    (await observe_direction(a, b, sync_interval=interval, now=now)).to_json(),
                    (await observe_direction(b, a, sync_interval=interval, now=now)).to_json(),
                ],
            }

    partner = topo.backup_of(fqdn)
    if partner is None:
        raise refuse(f"no-backup-pool: pool {fqdn} has no backup pool")
    status = _run(
        topo, action, token=token, loopback=loopback, pool_urls=pool_url, backup_urls=backup_url
    )
    if as_json:
        _print_json(status)
        return
    out = _out()
    if status.get("service_error"):
        _err().print(
            f"[yellow]the Backup Service of {fqdn} did not answer ({status['service_error']}); "
            "showing what the pools say[/yellow]",
            highlight=False,
        )
    title = f"Backup Service of {fqdn} (SyncInterval {status.get('sync_interval', '?')}s)"
    out.print(_direction_table(title, list(status.get("directions", []))))
    for loss in status.get("losses", []):
        parts = []
        if loss.get("failover_lost_writes") is not None:
            parts.append(
                f"its last disaster-mode failover lost {loss['failover_lost_writes']} write(s)"
            )
        if loss.get("failback_lost_writes") is not None:
            parts.append(
                f"its last disaster-mode failback lost {loss['failback_lost_writes']} write(s) "
                f"made on {loss['backup_pool']}"
            )
        if parts:
            out.print(f"RPO of {loss['home_pool']} ({loss['state']}): " + "; ".join(parts),
                      highlight=False)
    for note in status.get("notes", []):
        out.print(f"[yellow]note:[/yellow] {note}", highlight=False)


# --- sipdrill admin cms failover|status ------------------------------------------------


@cms_app.command("failover")
def cms_failover_cmd(
    force: bool = typer.Option(
        False, "--force", help="Move even when the active master is unreachable."
    ),
    topology: Path = TOPOLOGY_OPTION,
    loopback: bool = LOOPBACK_OPTION,
    token: str | None = _TokenOpt,
    as_json: bool = _JsonOpt,
    pool_url: list[str] | None = POOL_URL_OPTION,
    backup_url: list[str] | None = _BackupUrlOpt,
) -> None:
    """Move the active CMS master to its standby (Invoke-CsManagementServerFailover)."""
    topo = load_topology(topology)
    report = _run(
        topo, lambda c: cms_failover(topo, force, c), token=token, loopback=loopback,
        pool_urls=pool_url,
    )
    if as_json:
        _print_json(report.to_json())
        return
    out = _out()
    out.print(
        f"[green]CMS failed over[/green]: active master {report.source} -> {report.target} "
        f"(generation {report.generation}, version {report.version}) in {report.seconds:.3f}s"
        + (" [yellow](forced)[/yellow]" if report.forced else ""),
        highlight=False,
    )
    if report.lost_versions is None:
        out.print(
            f"[yellow]{report.source} did not answer: configuration changes it took after its "
            "last replication are lost[/yellow]",
            highlight=False,
        )
    for pool, outcome in sorted(report.replicated.items()):
        out.print(f"  replica {pool}: {outcome}", highlight=False)


@cms_app.command("status")
def cms_status_cmd(
    topology: Path = TOPOLOGY_OPTION,
    loopback: bool = LOOPBACK_OPTION,
    token: str | None = _TokenOpt,
    as_json: bool = _JsonOpt,
    pool_url: list[str] | None = POOL_URL_OPTION,
    backup_url: list[str] | None = _BackupUrlOpt,
) -> None:
    """ActiveMasterFqdn and replication state (Get-CsManagementStoreReplicationStatus)."""
    topo = load_topology(topology)
    status = _run(
        topo, lambda c: cms_status(topo, c), token=token, loopback=loopback, pool_urls=pool_url
    )
    if as_json:
        _print_json(status.to_json())
        return
    out = _out()
    colour = "green" if status.replication_state == "UpToDate" else "yellow"
    out.print(
        f"ActiveMasterFqdn: [bold]{status.active_master_fqdn}[/bold] "
        f"({'reachable' if status.active_reachable else '[red]unreachable[/red]'}), "
        f"standby {status.standby or 'none'}, version {status.version}, "
        f"generation {status.generation}; replication "
        f"[{colour}]{status.replication_state}[/{colour}]",
        highlight=False,
    )
    table = Table()
    for col in ("pool", "role", "reachable", "version", "generation", "UpToDate"):
        table.add_column(col)
    for r in status.replicas:
        table.add_row(
            r.pool, str(r.role or "-"), str(r.reachable), str(r.version), str(r.generation),
            str(r.up_to_date),
        )
    out.print(table)


# --- sipdrill admin pool failover|failback ----------------------------------------------


def _print_report(report: OperationReport) -> None:
    out = _out()
    verb = "failed over to" if report.operation == "failover" else "failed back to"
    out.print(
        f"[green]{report.home_pool}[/green]: users {verb} {report.serving_pool} in "
        f"{report.seconds:.3f}s"
        + (" [yellow](disaster mode)[/yellow]" if report.disaster_mode else ""),
        highlight=False,
    )
    table = Table(title="steps")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    for name, seconds in report.steps:
        table.add_row(name, f"{seconds:.3f}")
    out.print(table)
    out.print(f"changes synced: {report.synced_changes}", highlight=False)
    if report.lost_writes is None:
        out.print("[yellow]lost writes: unknown until the other pool is back[/yellow]")
    elif report.lost_writes:
        out.print(f"[red]lost writes (RPO): {report.lost_writes}[/red]", highlight=False)
    else:
        out.print("lost writes: 0", highlight=False)
    if report.failover_lost_writes is not None:
        out.print(
            f"writes the failover lost (known now): {report.failover_lost_writes}",
            highlight=False,
        )
    for note in report.notes:
        out.print(f"[yellow]note:[/yellow] {note}", highlight=False, soft_wrap=True)


def _pool_operation_command(
    operation: Callable[..., Awaitable[OperationReport]],
    *,
    pool_help: str,
    disaster_help: str,
    doc: str,
) -> Callable[..., None]:
    """The command of a pool failover or failback: run ``operation`` for
    ``--pool`` over the lab's control APIs and print its report."""

    def command(
        pool: str = typer.Option(..., "--pool", help=pool_help),
        disaster_mode: bool = typer.Option(False, "--disaster-mode", help=disaster_help),
        topology: Path = TOPOLOGY_OPTION,
        loopback: bool = LOOPBACK_OPTION,
        token: str | None = _TokenOpt,
        as_json: bool = _JsonOpt,
        pool_url: list[str] | None = POOL_URL_OPTION,
        backup_url: list[str] | None = _BackupUrlOpt,
    ) -> None:
        topo = load_topology(topology)
        fqdn = pool_or_exit(topo, pool)
        report = _run(
            topo, lambda c: operation(topo, fqdn, disaster_mode, c), token=token,
            loopback=loopback, pool_urls=pool_url, backup_urls=backup_url,
        )
        if as_json:
            _print_json(report.to_json())
        else:
            _print_report(report)

    command.__doc__ = doc
    return command


pool_failover_cmd = _pool_operation_command(
    pool_failover,
    pool_help="P1: the failed pool (the users' home).",
    disaster_help="Fail over without P1 (no final sync: writes after its last sync are lost).",
    doc="Fail P1's users over to its backup pool (Invoke-CsPoolFailOver).",
)
pool_failback_cmd = _pool_operation_command(
    pool_failback,
    pool_help="P1: the users' home pool, back in service.",
    disaster_help="Fail back even if the backup pool is down (what users wrote on it is lost).",
    doc="Bring P1's users home from its backup pool (Invoke-CsPoolFailBack).",
)
