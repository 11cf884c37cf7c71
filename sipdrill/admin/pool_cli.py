"""The administrator commands over one pool's control API.

``user_app`` (``sipdrill admin user ...``) and ``pool_app`` (``sipdrill admin
pool ...``) talk to a pool's control API over HTTP; the pool's URL comes from
the topology (first front end, ``control_port``; ``--loopback`` for the local
runtime's addresses), the token from ``--token`` or ``SIPDRILL_CONTROL_TOKEN``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import typer

from sipdrill.addresses import pool_control_url
from sipdrill.control.files import write_atomically
from sipdrill.control.settings import LOOPBACK_ENV, TOKEN_ENV, TOPOLOGY_ENV
from sipdrill.errors import TopologyError
from sipdrill.topology import Topology, load_topology
from sipdrill.topology_cli import load_or_exit

user_app = typer.Typer(
    help="Users: Move-CsUser, Export/Import-CsUserData (dbimpexp).", no_args_is_help=True
)
pool_app = typer.Typer(help="Pool operations: status, failover, failback.", no_args_is_help=True)


@pool_app.callback()
def _pool_group() -> None:
    """Pool operations: status, failover, failback."""
    # A callback keeps `pool` a group even while `status` is its only command
    # (failover and failback are added by the Backup Service's CLI).

_TopologyOpt = typer.Option(
    ..., "--topology", "-t", envvar=TOPOLOGY_ENV, exists=True, dir_okay=False,
    help="The lab's topology (to find the pools' control APIs).",
)
_LoopbackOpt = typer.Option(
    False, "--loopback", envvar=LOOPBACK_ENV,
    help="The lab runs on the local runtime's 127.x addresses.",
)
_TokenOpt = typer.Option(None, "--token", envvar=TOKEN_ENV, help="Control API bearer token.")
_JsonOpt = typer.Option(False, "--json", help="Print the answer as JSON.")


def _load(path: Path) -> Topology:
    # Only to find addresses: warnings (a short detection interval in a
    # lab) are for `topology validate`, not for every admin command.
    try:
        return load_topology(path).topology
    except TopologyError:
        return load_or_exit(path).topology


def _call(
    topology: Path,
    pool: str,
    loopback: bool,
    token: str | None,
    method: str,
    path: str,
    **kwargs: Any,
) -> httpx.Response:
    topo = _load(topology)
    try:
        url = pool_control_url(topo, pool, loopback=loopback)
    except KeyError:
        _fail(f"{pool} is not a pool of {topology}; pools: "
              + ", ".join(p.fqdn for p in topo.pools))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with httpx.Client(timeout=60.0, headers=headers) as client:
            response = client.request(method, url + path, **kwargs)
    except httpx.HTTPError as exc:
        _fail(f"pool {pool} does not answer at {url}: {exc}")
    if response.status_code >= 400:
        try:
            body = response.json()
            message = f"{body['code']}: {body['message']}"
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {response.status_code}: {response.text[:300]}"
        _fail(message)
    return response


def _fail(message: str) -> Any:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _print(doc: Any, as_json: bool, lines: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        for line in lines:
            typer.echo(line)


@user_app.command("move")
def user_move(
    user: str = typer.Argument(..., help="The user's SIP URI, e.g. sip:alice@lab.local."),
    to: str = typer.Option(..., "--to", help="The target pool's FQDN."),
    force: bool = typer.Option(
        False, "--force", help="Move without the source pool: contacts and meetings are lost."
    ),
    topology: Path = _TopologyOpt,
    loopback: bool = _LoopbackOpt,
    token: str | None = _TokenOpt,
    as_json: bool = _JsonOpt,
) -> None:
    """Move-CsUser -Identity USER -Target POOL [-Force] (run by the target pool)."""
    r = _call(topology, to, loopback, token, "POST", "/admin/users/move",
              json={"user": user, "to": to, "force": force})
    d = r.json()
    lines = [f"moved {d['user']} from {d['source_pool']} to {d['target_pool']}"]
    if d["force"]:
        lines.append(f"lost (not recoverable): {d['contacts_lost']} contacts, "
                     f"{d['conferences_lost']} meetings (counted from {d['counted_from']})")
    else:
        lines.append(f"moved along: {d['contacts_moved']} contacts, "
                     f"{d['conferences_moved']} meetings")
    if not d.get("source_cleaned", True):
        lines.append(f"{d['source_pool']} is down: its stale account is removed when it returns")
    _print(d, as_json, lines)


@user_app.command("export")
def user_export(
    pool: str = typer.Option(..., "--pool", help="The pool whose users to export."),
    out: Path = typer.Option(..., "--out", "-o", help="The file to write."),
    fmt: str | None = typer.Option(
        None, "--format", help="xml (dbimpexp's) or json; default from the file suffix."
    ),
    topology: Path = _TopologyOpt,
    loopback: bool = _LoopbackOpt,
    token: str | None = _TokenOpt,
) -> None:
    """Export-CsUserData: the accounts and contact lists of the pool's users."""
    fmt = fmt or ("json" if out.suffix.lower() == ".json" else "xml")
    if fmt not in ("xml", "json"):
        _fail("--format is xml or json")
    r = _call(topology, pool, loopback, token, "GET", "/admin/users/export",
              params={"format": fmt})
    write_atomically(out.resolve(), r.content)
    users = r.headers.get("X-Sipdrill-Export-Users", "?")
    contacts = r.headers.get("X-Sipdrill-Export-Contacts", "?")
    typer.echo(f"exported {users} users and {contacts} contacts of {pool} to {out}")


@user_app.command("import")
def user_import(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="An export file."),
    pool: str = typer.Option(..., "--pool", help="The pool to restore into."),
    topology: Path = _TopologyOpt,
    loopback: bool = _LoopbackOpt,
    token: str | None = _TokenOpt,
    as_json: bool = _JsonOpt,
) -> None:
    """Import-CsUserData: restore contact lists of users with an account on the pool."""
    r = _call(topology, pool, loopback, token, "POST", "/admin/users/import",
              content=file.read_bytes())
    d = r.json()
    lines = [f"restored {d['users_restored']} users, {d['contacts_restored']} contacts"]
    if d["skipped"]:
        lines.append(f"skipped {len(d['skipped'])} users without an account on {pool}")
    _print(d, as_json, lines)


@pool_app.command("status")
def pool_status(
    pool: str = typer.Option(..., "--pool", help="The pool's FQDN."),
    topology: Path = _TopologyOpt,
    loopback: bool = _LoopbackOpt,
    token: str | None = _TokenOpt,
    as_json: bool = _JsonOpt,
) -> None:
    """Get-CsPoolFabricState / Get-CsRegistrarStatus: failover states, partner,
    registrations by mode, store."""
    d = _call(topology, pool, loopback, token, "GET", "/status").json()
    regs = d["registrations"]
    lines = [
        f"pool {d['pool']} (site {d['site']}, {d['address']}), backup pool "
        f"{d['backup_pool'] or '-'}, CMS {d['cms_role'] or '-'}",
        f"store: {d['store']['users']} users ({d['store']['homed_users']} homed), "
        f"{d['store']['contacts']} contacts, seq {d['store']['high_water_mark']}"
        + (", READ-ONLY" if d["read_only"] else ""),
        f"registrations: {regs['full']} full, {regs['resiliency']} resiliency "
        f"({regs['bindings']} bindings)",
    ]
    for home, state in sorted(d["failover"].items()):
        lines.append(f"failover {home}: {state}")
    partner = d.get("partner")
    if partner:
        lines.append(
            f"partner {partner['pool']}: {partner['state']}, last heartbeat "
            f"{partner['last_heartbeat_age']}s ago"
        )
    if d.get("reregistration"):
        rr = d["reregistration"]
        lines.append(
            f"re-registration after {rr['reason']}: {rr['reregistered']}/{rr['users']} "
            f"(p50 {rr['p50']}s, max {rr['max']}s)"
        )
    _print(d, as_json, lines)
