"""Command-line pieces that the lab's process and administrator commands share:
the topology option and loading, refusals, and per-pool URL overrides."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from sipdrill.control.settings import TOPOLOGY_ENV
from sipdrill.topology import Topology
from sipdrill.topology_cli import load_or_exit

TOPOLOGY_OPTION = typer.Option(
    ..., "--topology", "-t", envvar=TOPOLOGY_ENV, dir_okay=False, help="The topology YAML file."
)
LOOPBACK_OPTION = typer.Option(
    False, "--loopback", help="Use the topology's 127.x stand-in addresses (local runtime)."
)
POOL_URL_OPTION = typer.Option(
    None,
    "--pool-url",
    help="FQDN=URL: reach this pool's control API here; repeatable.",
    hidden=True,
)


def refuse(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` on stderr; the exit to raise."""
    Console(stderr=True).print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def load_topology(path: Path) -> Topology:
    """The topology of ``path``, or exit with its errors."""
    return load_or_exit(path).topology


def parse_urls(items: list[str] | None, what: str) -> dict[str, str]:
    """``FQDN=URL`` overrides (``what`` names the option) as ``{fqdn: url}``."""
    out: dict[str, str] = {}
    for item in items or []:
        fqdn, sep, url = item.partition("=")
        if not sep or not url:
            raise refuse(f"{what} is FQDN=URL, e.g. pool1.lab.local=http://127.0.0.1:8080", 2)
        out[fqdn.lower()] = url
    return out


def pool_or_exit(topology: Topology, pool: str) -> str:
    """The FQDN of ``pool`` as the topology spells it, or exit naming the pools."""
    try:
        return topology.pool(pool).fqdn
    except KeyError:
        raise refuse(
            f"{pool} is not a pool of topology {topology.name} "
            f"(pools: {', '.join(p.fqdn for p in topology.pools)})"
        ) from None
