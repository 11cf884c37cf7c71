"""`sipdrill topology validate|show`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from sipdrill.errors import TopologyError, TopologyIssue
from sipdrill.topology import LoadedTopology, Topology, load_topology

app = typer.Typer(help="Check and inspect topology files.", no_args_is_help=True)


def _out() -> Console:
    # Made per call, not at import, so the terminal width (COLUMNS) is read
    # when the command runs.
    return Console()


def _err() -> Console:
    return Console(stderr=True)


def _print_issues(issues: list[TopologyIssue]) -> None:
    err = _err()
    for issue in issues:
        style = "red" if issue.severity == "error" else "yellow"
        err.print(f"[{style}]{issue}[/{style}]", highlight=False, soft_wrap=True)


def load_or_exit(path: Path) -> LoadedTopology:
    """Load a topology for a command; print every issue and exit 1 if it is invalid."""
    try:
        loaded = load_topology(path)
    except TopologyError as exc:
        _print_issues(exc.issues)
        n = sum(1 for i in exc.issues if i.severity == "error")
        _err().print(f"[red]{path}: {n} error(s)[/red]", highlight=False)
        raise typer.Exit(1) from None
    _print_issues(loaded.warnings)
    return loaded


@app.command()
def validate(file: Path = typer.Argument(..., help="The topology YAML file.")) -> None:
    """Check a topology file; exit 0 if it is usable, 1 with every error otherwise."""
    loaded = load_or_exit(file)
    t = loaded.topology
    _out().print(
        f"[green]{file}: valid[/green] — {len(t.sites)} site(s), {len(t.pools)} pool(s), "
        f"{len(t.pairs())} pair(s), {len(t.all_users())} user(s), "
        f"{len(loaded.warnings)} warning(s)",
        highlight=False,
    )


def render(t: Topology) -> list[Tree | Table]:
    tree = Tree(f"[bold]{t.name}[/bold] — domain {t.domain}")
    counts = t.users_by_pool()
    for s in t.sites:
        st = tree.add(
            f"site [bold]{s.name}[/bold] {s.subnet}"
            + (f" — {s.description}" if s.description else "")
        )
        for p in (p for p in t.pools if p.site == s.name):
            tags = [p.edition.value, f"{counts[p.fqdn]} users"]
            if p.backup:
                tags.append(f"backup {p.backup}")
            if t.cms.active == p.fqdn:
                tags.append("CMS active")
            if t.cms_standby == p.fqdn:
                tags.append("CMS standby")
            pt = st.add(f"pool [bold]{p.fqdn}[/bold] ({', '.join(tags)})")
            for fe in p.front_ends:
                pt.add(f"{fe.fqdn} {fe.address}")
    tm = t.timers
    rx = tm.registration_expiry
    timers = Table(title="Resiliency timers", show_header=True)
    timers.add_column("setting")
    timers.add_column("value", justify="right")
    for name, value in [
        ("failover detection interval", f"{tm.failover_detection_interval:g} s"),
        ("failback interval", f"{tm.failback_interval:g} s"),
        ("Backup Service sync interval", f"{tm.sync_interval:g} s"),
        (
            "registration expiry default/min/max",
            f"{rx.default}/{rx.min}/{rx.max} s",
        ),
        ("keep-alive interval (Flow-Timer)", f"{tm.keepalive_interval:g} s"),
        ("BackupStoreUnavailableThreshold", f"{tm.backup_store_unavailable_threshold:g} s"),
    ]:
        timers.add_row(name, value)
    dns = Table(title=f"DNS records (default view), server {t.dns.address}", show_header=True)
    for col in ("name", "type", "ttl", "data"):
        dns.add_column(col)
    for r in t.dns_records():
        dns.add_row(r.name, r.rtype, str(r.ttl), r.data)
    return [tree, timers, dns]


@app.command()
def show(file: Path = typer.Argument(..., help="The topology YAML file.")) -> None:
    """Show sites, pools, pairs, the CMS, user counts, timers and the DNS records implied."""
    loaded = load_or_exit(file)
    out = _out()
    for part in render(loaded.topology):
        out.print(part)
