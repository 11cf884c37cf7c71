"""The administrator commands over one pool's control API.

``user_app`` (``sipdrill admin user ...``) and ``pool_app`` (``sipdrill admin
pool ...``) talk to a pool's control API over HTTP; the pool's URL comes from
the topology (first front end, ``control_port``; ``--loopback`` for the local
runtime's addresses), the token from ``--token`` or ``SIPDRILL_CONTROL_TOKEN``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import httpx
import typer

from sipdrill.addresses import pool_control_url
from sipdrill.control.files import write_atomically
from sipdrill.control.settings import LOOPBACK_ENV, TOKEN_ENV, TOPOLOGY_ENV
from sipdrill.errors import TopologyError
from sipdrill.pool.bulk_moves import DEFAULT_RATE
from sipdrill.topology import Topology, load_topology
from sipdrill.topology_cli import load_or_exit

user_app = typer.Typer(
    help="Users: Move-CsUser (one user, or every user of a pool), Export/Import-CsUserData "
    "(dbimpexp) and the scheduled export's copies.",
    no_args_is_help=True,
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
        _fail(_refusal(response))
    return response


def _refusal(response: httpx.Response) -> str:
    try:
        body = response.json()
        return f"{body['code']}: {body['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:300]}"


def _fail(message: str) -> NoReturn:
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
    user: str | None = typer.Argument(
        None, help="The user's SIP URI, e.g. sip:alice@lab.local (or --from-pool)."
    ),
    to: str = typer.Option(..., "--to", help="The target pool's FQDN."),
    from_pool: str | None = typer.Option(
        None, "--from-pool",
        help="Move every user homed on this pool (Get-CsUser filtered on RegistrarPool), "
        "in one request.",
    ),
    force: bool = typer.Option(
        False, "--force", help="Move without the source pool: contacts and meetings are lost."
    ),
    rate: float = typer.Option(
        DEFAULT_RATE, "--rate", min=0.1, help="With --from-pool: users moved per second."
    ),
    topology: Path = _TopologyOpt,
    loopback: bool = _LoopbackOpt,
    token: str | None = _TokenOpt,
    as_json: bool = _JsonOpt,
) -> None:
    """Move-CsUser -Identity USER -Target POOL [-Force] (run by the target pool);
    with --from-pool, every user of that pool (exit 1 if any failed)."""
    if (user is None) == (from_pool is None):
        _fail("give a USER, or --from-pool POOL to move every user homed there")
    if from_pool is not None:
        _move_all(topology, from_pool, to, force, rate, loopback, token, as_json)
        return
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


def _move_all(
    topology: Path, from_pool: str, to: str, force: bool, rate: float,
    loopback: bool, token: str | None, as_json: bool,
) -> None:
    """One request to the target pool; its progress lines as they come."""
    body = {"from_pool": from_pool, "to": to, "force": force, "rate": rate}
    result: dict[str, Any] | None = None
    for event in _stream(topology, to, loopback, token, "/admin/users/move-all", body):
        if event.get("event") in ("started", "progress"):
            typer.echo(
                f"moving users of {from_pool} to {to}: {event['moved']}/{event['total']} moved, "
                f"{event['failed']} failed ({event['elapsed']:.1f} s)", err=True,
            )
        elif event.get("event") == "error":
            _fail(f"{event['code']}: {event['message']}")
        elif event.get("event") == "result":
            result = event
    if result is None:
        _fail(f"{to} ended the move without a result: check `sipdrill admin pool status`")
    d = result
    lines = [
        f"moved {d['moved']} of {d['total']} users from {d['source_pool']} to "
        f"{d['target_pool']} in {d['duration']:.1f} s" + (" (forced)" if d["force"] else "")
    ]
    counted = ", ".join(f"{n} from {k}" for k, n in sorted(d["counted_from"].items()))
    if d["force"]:
        lines.append(
            f"lost (not recoverable but by an import): {d['contacts_lost']} contacts, "
            f"{d['conferences_lost']} meetings (counted: {counted or 'none'})"
        )
        if d["counted_from"].get("nothing"):
            lines.append(
                f"{d['counted_from']['nothing']} users' losses could not be counted: "
                f"{d['source_pool']} did not answer and {to} holds no replica of them"
            )
    else:
        lines.append(f"moved along: {d['contacts_moved']} contacts, "
                     f"{d['conferences_moved']} meetings")
    if d["pending_source_cleanups"]:
        lines.append(f"{d['source_pool']} is down: {d['pending_source_cleanups']} stale "
                     "accounts are removed when it returns")
    for f in d["failed"]:
        lines.append(f"FAILED {f['user']}: {f['code']}: {f['message']}")
    _print({k: v for k, v in d.items() if k != "event"}, as_json, lines)
    if d["failed"]:
        raise typer.Exit(1)


def _stream(
    topology: Path, pool: str, loopback: bool, token: str | None, path: str, body: Any
) -> Iterator[dict[str, Any]]:
    """POST ``body`` and yield the answer's JSON lines as they arrive."""
    topo = _load(topology)
    try:
        url = pool_control_url(topo, pool, loopback=loopback)
    except KeyError:
        _fail(f"{pool} is not a pool of {topology}; pools: "
              + ", ".join(p.fqdn for p in topo.pools))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = httpx.Timeout(connect=10.0, read=None, write=60.0, pool=10.0)
    try:
        with httpx.Client(timeout=timeout, headers=headers) as client, client.stream(
            "POST", url + path, json=body
        ) as response:
            if response.status_code >= 400:
                response.read()
                _fail(_refusal(response))
            for line in response.iter_lines():
                if line.strip():
                    yield json.loads(line)
    except httpx.HTTPError as exc:
        _fail(f"pool {pool} does not answer at {url}: {exc}")


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
    """Export-CsUserData: the accounts, contact lists and meetings of the pool's users."""
    fmt = fmt or ("json" if out.suffix.lower() == ".json" else "xml")
    if fmt not in ("xml", "json"):
        _fail("--format is xml or json")
    r = _call(topology, pool, loopback, token, "GET", "/admin/users/export",
              params={"format": fmt})
    write_atomically(out.resolve(), r.content)
    users = r.headers.get("X-Sipdrill-Export-Users", "?")
    contacts = r.headers.get("X-Sipdrill-Export-Contacts", "?")
    meetings = r.headers.get("X-Sipdrill-Export-Meetings", "?")
    typer.echo(f"exported {users} users, {contacts} contacts and {meetings} meetings "
               f"of {pool} to {out}")


@user_app.command("export-job")
def user_export_job(
    pool: str = typer.Option(..., "--pool", help="The pool whose scheduled export to run."),
    topology: Path = _TopologyOpt,
    loopback: bool = _LoopbackOpt,
    token: str | None = _TokenOpt,
    as_json: bool = _JsonOpt,
) -> None:
    """Run the pool's scheduled export (dbimpexp, topology user_data_export) now, and
    copy it to its DR pool (exit 1 if the copy is still owed)."""
    d = _call(topology, pool, loopback, token, "POST", "/admin/users/export-job").json()
    e = d["export"]
    lines = [f"exported {e['users']} users, {e['contacts']} contacts and {e['meetings']} "
             f"meetings of {pool} as {d['name']} (seq {e['seq']})"]
    if d.get("copy_to"):
        lines.append(f"copied to {d['copy_to']}" if d["copied"] else
                     f"copy to {d['copy_to']} OWED (retried): {d['copy_error']}")
    _print(d, as_json, lines)
    if d.get("copy_to") and not d["copied"]:
        raise typer.Exit(1)


@user_app.command("exports")
def user_exports(
    pool: str = typer.Option(..., "--pool", help="The pool whose share to list (the DR pool)."),
    get: str | None = typer.Option(None, "--get", help="Download this copy (or `latest`)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Where --get writes it."),
    topology: Path = _TopologyOpt,
    loopback: bool = _LoopbackOpt,
    token: str | None = _TokenOpt,
    as_json: bool = _JsonOpt,
) -> None:
    """The exports other pools copied to this pool's share, newest first; --get downloads one."""
    held = _call(topology, pool, loopback, token, "GET", "/admin/users/share").json()
    if get is not None:
        if out is None:
            _fail("--get needs --out FILE")
        name = held[0]["name"] if get == "latest" and held else get
        r = _call(topology, pool, loopback, token, "GET", "/admin/users/share/file",
                  params={"name": name})
        write_atomically(out.resolve(), r.content)
        typer.echo(f"wrote {name} ({len(r.content)} bytes) to {out}")
        return
    lines = [f"{pool} holds {len(held)} export(s)"] + [
        f"{h['name']}  from {h['source_pool']}  {h['size']} bytes  "
        f"created {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(h['created']))}"
        for h in held
    ]
    _print(held, as_json, lines)


@user_app.command("import")
def user_import(
    file: Path | None = typer.Argument(
        None, exists=True, dir_okay=False, help="An export file (or --held)."
    ),
    pool: str = typer.Option(..., "--pool", help="The pool to restore into."),
    held: bool = typer.Option(
        False, "--held", help="Import an export the pool holds (its share): the newest, or --name."
    ),
    name: str | None = typer.Option(None, "--name", help="With --held: which copy."),
    from_pool: str | None = typer.Option(
        None, "--from-pool", help="With --held: the newest copy from this pool."
    ),
    topology: Path = _TopologyOpt,
    loopback: bool = _LoopbackOpt,
    token: str | None = _TokenOpt,
    as_json: bool = _JsonOpt,
) -> None:
    """Import-CsUserData: restore the contact lists and meetings of the users homed on
    the pool. A truncated, damaged or foreign file is refused and changes nothing;
    exit 1 if any user of the export was not restored (each is listed, with why)."""
    if (file is None) == (not held):
        _fail("give an export FILE, or --held to import one the pool holds")
    if file is not None:
        r = _call(topology, pool, loopback, token, "POST", "/admin/users/import",
                  content=file.read_bytes())
    else:
        r = _call(topology, pool, loopback, token, "POST", "/admin/users/import-held",
                  json={"name": name, "source_pool": from_pool})
    d = r.json()
    export = d.get("export") or {}
    source = f" from {d['name']}" if d.get("name") else ""
    lines = [
        f"restored {d['users_restored']} users, {d['contacts_restored']} contacts and "
        f"{d['meetings_restored']} meetings{source} (an export of {export.get('pool', '?')} "
        f"at seq {export.get('seq', '?')}, "
        + (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(export["created"]))
           if "created" in export else "?")
        + ")"
    ]
    for uri in d["skipped"]:
        lines.append(f"NOT RESTORED {uri}: {d['reasons'].get(uri, '?')}")
    _print(d, as_json, lines)
    if d["skipped"]:
        raise typer.Exit(1)


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
