"""``sipdrill serve fault-agent``: the fault agent of a swarm lab (one per
node, started by the lab's stack; see :mod:`sipdrill.orchestrator.swarm_agent`).
Kept apart so that ``sipdrill --help`` does not load the docker SDK."""

from __future__ import annotations

import os
from pathlib import Path

import typer


def serve_fault_agent(
    lab: str = typer.Option(..., "--lab", help="The lab whose containers this agent acts on."),
    listen: str = typer.Option("0.0.0.0:18600", "--listen", help="HOST:PORT of the agent's API."),
    state_dir: Path = typer.Option(
        Path("/var/lib/sipdrill/agent"), "--state-dir", help="The journal and the lease."
    ),
    node: str = typer.Option(
        "", "--node", help="This node's name (default: $SIPDRILL_AGENT_NODE, else the hostname)."
    ),
) -> None:
    """The fault agent of a swarm lab on this node: applies and undoes network
    faults in the node's lab containers for the orchestrator (bearer token
    $SIPDRILL_CONTROL_TOKEN), heals them when the orchestrator's lease runs
    out, and routes the node to its tasks."""
    from sipdrill.orchestrator.swarm_agent import run_agent

    name = node or os.environ.get("SIPDRILL_AGENT_NODE") or os.uname().nodename
    run_agent(lab, listen, state_dir, name, os.environ.get("SIPDRILL_CONTROL_TOKEN") or None)
